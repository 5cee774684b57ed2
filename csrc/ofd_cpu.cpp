// CPU op of the fused OFD loss: argument checks and allocation (ofd_fused.h), and the choice of the
// instruction-set variant of its kernel (ofd_cpu.h).
#include <torch/library.h>

#include "cpu_buffers.h"
#include "ofd_cpu.h"
#include "ofd_fused.h"

namespace ofdkern {
namespace {

FusedOutputs ofd_fused_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& margin,
                           bool elementwise, bool grad_student, bool grad_teacher, bool grad_margin) {
  const int64_t numel = student.numel();
  auto outputs = allocate_fused_outputs(student, teacher, margin, elementwise, grad_student, grad_teacher,
                                        grad_margin, (numel + kOfdCpuChunk - 1) / kOfdCpuChunk,
                                        empty_like_hugepage);
  if (numel != 0) kOfdCpuKernels_here().ofd(student, teacher, margin, elementwise, outputs);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) { m.impl("ofd_fused", &ofd_fused_cpu); }

}  // namespace ofdkern
