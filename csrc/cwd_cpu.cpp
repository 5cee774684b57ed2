// CPU op of CWD on channels_last maps: argument checks and allocation (cwd_fused.h), then the instruction-set
// variant of the KD kernel's channels_last entry (kd_cpu.h).
#include <torch/library.h>

#include "cpu_buffers.h"
#include "cwd_fused.h"
#include "kd_cpu.h"

namespace ofdkern {
namespace {

KDOutputs cwd_channels_last_fused_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                      bool grad_student, bool grad_teacher) {
  auto outputs = allocate_cwd_channels_last_outputs(student, teacher, temperature, grad_student, grad_teacher,
                                                    empty_like_hugepage);
  if (std::get<0>(outputs).numel() == 0) return outputs;
  // No positions: KL over nothing is 0, as the reference's sum.
  if (student.numel() == 0) std::get<0>(outputs).zero_();
  else kKDCpuKernels_here().cwd_channels_last(student, teacher, temperature, outputs);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) { m.impl("cwd_channels_last_fused", &cwd_channels_last_fused_cpu); }

}  // namespace ofdkern
