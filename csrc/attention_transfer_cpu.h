// The vectorized CPU kernels of attention transfer (attention_transfer_cpu_kernels.h), compiled once per
// instruction set (cpu_isa.h); attention_transfer_cpu.cpp calls the variant for this CPU.
//
// The kernels fill outputs that attention_transfer_cpu.cpp has checked and allocated
// (attention_transfer_fused.h); each output element is written by one thread and every sum runs in an order
// fixed by the shapes alone, so results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>

#include "attention_transfer_fused.h"
#include "cpu_isa.h"

namespace ofdkern {

struct AttentionTransferCpuKernels {
  // feature: (N, C, S) with positions or channels innermost (attention_transfer_fused.h); map: allocated output.
  void (*attention_map)(const at::Tensor& feature, double p, const at::Tensor& map);
  // feature as above; grad: allocated with feature's strides.
  void (*attention_map_backward)(const at::Tensor& feature, const at::Tensor& grad_map, double p,
                                 const at::Tensor& grad);
  // The map math of attention_transfer_maps: checked maps, allocated outputs (gradients empty when not asked).
  void (*attention_transfer_maps)(const at::Tensor& map_student, const at::Tensor& map_teacher,
                                  const AttentionMapsOutputs& outputs);
};

OFDKERN_CPU_KERNEL_TABLE(AttentionTransferCpuKernels, kAttentionTransferCpuKernels)

}  // namespace ofdkern
