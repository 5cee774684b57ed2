// The vectorized CPU kernel of KD (kd_cpu_kernels.h), compiled once per instruction set (cpu_isa.h); kd_cpu.cpp
// calls the variant for this CPU.
//
// The kernel fills outputs that kd_cpu.cpp has checked and allocated (kd_fused.h); each output element is
// written by one thread and every sum runs in an order fixed by the shapes alone, so results do not depend on
// the thread count.
#pragma once

#include <ATen/ATen.h>

#include "cpu_isa.h"
#include "kd_fused.h"

namespace ofdkern {

struct KDCpuKernels {
  // Logits of N > 0 rows of K > 0 classes.
  void (*kd)(const at::Tensor& student, const at::Tensor& teacher, double temperature, const KDOutputs& outputs);
  // Channel-wise distillation of channels_last (N, C, *spatial) maps with N, C and positions > 0
  // (cwd_fused.h): the bits kd gives on their NCHW rows.
  void (*cwd_channels_last)(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                            const KDOutputs& outputs);
};

OFDKERN_CPU_KERNEL_TABLE(KDCpuKernels, kKDCpuKernels)

}  // namespace ofdkern
