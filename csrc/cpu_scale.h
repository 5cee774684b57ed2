// The vectorized CPU kernel of scale_ (cpu_scale_kernels.h), compiled once per instruction set (cpu_isa.h);
// cpu_scale.cpp calls the variant for this CPU.
#pragma once

#include <ATen/ATen.h>

#include "cpu_isa.h"

namespace ofdkern {

struct ScaleCpuKernels {
  // gradient *= factor in place; arguments checked (scale_checks.h), gradient not empty.
  void (*scale)(const at::Tensor& gradient, const at::Tensor& factor);
};

OFDKERN_CPU_KERNEL_TABLE(ScaleCpuKernels, kScaleCpuKernels)

}  // namespace ofdkern
