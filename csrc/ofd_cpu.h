// The OFD CPU kernel (ofd_cpu_kernels.h), compiled once per instruction set (cpu_isa.h); ofd_cpu.cpp calls the
// variant for this CPU.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cpu_isa.h"
#include "ofd_fused.h"

namespace ofdkern {

// Elements per loss partial. Fixed, so the summation order (and the loss bits) do not depend on the number of
// threads; large enough that the partial vector is tiny next to the features.
constexpr int64_t kOfdCpuChunk = int64_t{1} << 15;

struct OfdCpuKernels {
  // The fused pass over checked inputs of numel > 0 and the outputs allocated for them (ofd_fused.h), with
  // kOfdCpuChunk elements per partial; the gradients not asked for are empty.
  void (*ofd)(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& margin, bool elementwise,
              const FusedOutputs& outputs);
};

OFDKERN_CPU_KERNEL_TABLE(OfdCpuKernels, kOfdCpuKernels)

}  // namespace ofdkern
