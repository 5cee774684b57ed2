// The vectorized CPU kernels of the FRSKD ops (frskd_cpu_kernels.h), compiled once per instruction set
// (cpu_isa.h); frskd_cpu.cpp calls the variant for this CPU.
//
// The kernels fill outputs that frskd_cpu.cpp has checked and allocated (frskd_fused.h); each output element is
// written by one thread and every sum runs in an order fixed by the shapes alone, so results do not depend on
// the thread count.
#pragma once

#include <ATen/ATen.h>

#include "cpu_isa.h"
#include "frskd_fused.h"

namespace ofdkern {

struct FrskdCpuKernels {
  // feature: (N, C, S) with positions or channels innermost (above); map: allocated output.
  void (*attention_map)(const at::Tensor& feature, double p, const at::Tensor& map);
  // feature as above; grad: allocated with feature's strides.
  void (*attention_map_backward)(const at::Tensor& feature, const at::Tensor& grad_map, double p,
                                 const at::Tensor& grad);
  // The map math of attention_transfer_maps: checked maps, allocated outputs (gradients empty when not asked).
  void (*attention_transfer_maps)(const at::Tensor& map_student, const at::Tensor& map_teacher,
                                  const AttentionMapsOutputs& outputs);
  // Logits of N > 0 rows of K > 0 classes.
  void (*kd)(const at::Tensor& student, const at::Tensor& teacher, double temperature, const KDOutputs& outputs);
};

OFDKERN_CPU_KERNEL_TABLE(FrskdCpuKernels, kFrskdCpuKernels)

}  // namespace ofdkern
