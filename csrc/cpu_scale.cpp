// CPU op of scale_ (schema in library.cpp): the backward of every fused op on its saved unit gradients, in
// place. Argument checks (scale_checks.h), then the instruction-set variant of the kernel (cpu_scale.h).
#include <torch/library.h>

#include "cpu_scale.h"
#include "scale_checks.h"

namespace ofdkern {
namespace {

void scale_cpu(const at::Tensor& gradient, const at::Tensor& factor) {
  check_scale_args(gradient, factor);
  if (gradient.numel() != 0) kScaleCpuKernels_here().scale(gradient, factor);
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) { m.impl("scale_", &scale_cpu); }

}  // namespace ofdkern
