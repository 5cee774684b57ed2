// CPU op of KD: argument checks and allocation (kd_fused.h), and the choice of the instruction-set variant of
// the vectorized kernel (kd_cpu.h).
#include <torch/library.h>

#include "cpu_buffers.h"
#include "kd_cpu.h"
#include "kd_fused.h"

namespace ofdkern {
namespace {

KDOutputs kd_fused_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature, bool grad_student,
                       bool grad_teacher) {
  auto outputs = allocate_kd_outputs(student, teacher, temperature, grad_student, grad_teacher,
                                     empty_like_hugepage);
  if (student.size(0) == 0) return outputs;
  // No classes: KL over nothing is 0, as the reference's sum.
  if (student.size(1) == 0) std::get<0>(outputs).zero_();
  else kKDCpuKernels_here().kd(student, teacher, temperature, outputs);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) { m.impl("kd_fused", &kd_fused_cpu); }

}  // namespace ofdkern
