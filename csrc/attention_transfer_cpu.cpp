// CPU ops of attention transfer: argument checks and allocation (attention_transfer_fused.h), and the choice of
// the instruction-set variant of the vectorized kernels (attention_transfer_cpu.h).
#include <torch/library.h>

#include "attention_transfer_cpu.h"
#include "attention_transfer_fused.h"
#include "cpu_buffers.h"

namespace ofdkern {
namespace {

at::Tensor attention_map_cpu(const at::Tensor& feature, double p) {
  at::Tensor map = allocate_attention_map(feature, p);
  if (map.numel() != 0) kAttentionTransferCpuKernels_here().attention_map(attention_walkable(feature), p, map);
  return map;
}

at::Tensor attention_map_backward_cpu(const at::Tensor& feature, const at::Tensor& grad_map, double p) {
  at::Tensor grad = allocate_attention_feature_grad(feature, grad_map, p, empty_like_hugepage);
  if (grad.numel() == 0) return grad;
  const at::Tensor source = attention_walkable(feature);
  if (source.is_same(feature)) {
    kAttentionTransferCpuKernels_here().attention_map_backward(feature, grad_map, p, grad);
  } else {
    // A dense layout the kernels do not walk (e.g. batch innermost): compute contiguously, then lay out.
    const at::Tensor contiguous_grad = at::empty_like(source);
    kAttentionTransferCpuKernels_here().attention_map_backward(source, grad_map, p, contiguous_grad);
    grad.copy_(contiguous_grad);
  }
  return grad;
}

AttentionMapsOutputs attention_transfer_maps_cpu(const at::Tensor& map_student, const at::Tensor& map_teacher,
                                                 bool grad_student, bool grad_teacher) {
  auto outputs = allocate_attention_maps_outputs(map_student, map_teacher, grad_student, grad_teacher);
  if (map_student.size(0) != 0) {
    kAttentionTransferCpuKernels_here().attention_transfer_maps(map_student, map_teacher, outputs);
  }
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) {
  m.impl("attention_map", &attention_map_cpu);
  m.impl("attention_map_backward", &attention_map_backward_cpu);
  m.impl("attention_transfer_maps", &attention_transfer_maps_cpu);
}

}  // namespace ofdkern
