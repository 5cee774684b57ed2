// CPU ops of the fused FRSKD losses: argument checks and allocation (frskd_fused.h), the choice of the
// instruction-set variant of the vectorized kernels (frskd_cpu.h), and the small per-sample kernel of the
// attention-map math (normalize, difference, gradient).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu_buffers.h"
#include "frskd_cpu.h"
#include "frskd_fused.h"
#include "frskd_math.h"

namespace ofdkern {
namespace {

at::Tensor attention_map_cpu(const at::Tensor& feature, double p) {
  at::Tensor map = allocate_attention_map(feature, p);
  if (map.numel() != 0) kFrskdCpuKernels_here().attention_map(attention_walkable(feature), p, map);
  return map;
}

at::Tensor attention_map_backward_cpu(const at::Tensor& feature, const at::Tensor& grad_map, double p) {
  at::Tensor grad = allocate_attention_feature_grad(feature, grad_map, p, empty_like_hugepage);
  if (grad.numel() == 0) return grad;
  const at::Tensor source = attention_walkable(feature);
  if (source.is_same(feature)) {
    kFrskdCpuKernels_here().attention_map_backward(feature, grad_map, p, grad);
  } else {
    // A dense layout the kernels do not walk (e.g. batch innermost): compute contiguously, then lay out.
    const at::Tensor contiguous_grad = at::empty_like(source);
    kFrskdCpuKernels_here().attention_map_backward(source, grad_map, p, contiguous_grad);
    grad.copy_(contiguous_grad);
  }
  return grad;
}

// One sample's maps: three sweeps over its S positions (the norms; the normalized difference with the loss
// and the two projections; the gradients), each summing in position order.
template <typename acc_t>
void attention_maps_row(const acc_t* map_s, const acc_t* map_t, int64_t positions, acc_t* loss, acc_t* grad_s,
                        acc_t* grad_t) {
  acc_t squares_s = 0, squares_t = 0;
  for (int64_t j = 0; j < positions; ++j) {
    squares_s += map_s[j] * map_s[j];
    squares_t += map_t[j] * map_t[j];
  }
  const acc_t norm_s = std::sqrt(squares_s), norm_t = std::sqrt(squares_t);
  const acc_t divisor_s = normalize_divisor(norm_s), divisor_t = normalize_divisor(norm_t);
  acc_t total = 0, dot_s = 0, dot_t = 0;
  for (int64_t j = 0; j < positions; ++j) {
    const acc_t u_s = map_s[j] / divisor_s, u_t = map_t[j] / divisor_t;
    const acc_t diff = u_s - u_t;
    total += diff * diff;
    dot_s += u_s * diff;
    dot_t += u_t * diff;
  }
  *loss = total;
  if (!grad_s && !grad_t) return;
  // d total / d u_s = 2 diff, d total / d u_t = -2 diff.
  for (int64_t j = 0; j < positions; ++j) {
    const acc_t u_s = map_s[j] / divisor_s, u_t = map_t[j] / divisor_t;
    const acc_t diff = u_s - u_t;
    if (grad_s) grad_s[j] = normalize_grad(acc_t(2) * diff, u_s, acc_t(2) * dot_s, norm_s);
    if (grad_t) grad_t[j] = normalize_grad(acc_t(-2) * diff, u_t, acc_t(-2) * dot_t, norm_t);
  }
}

AttentionMapsOutputs attention_transfer_maps_cpu(const at::Tensor& map_student, const at::Tensor& map_teacher,
                                                 bool grad_student, bool grad_teacher) {
  auto outputs = allocate_attention_maps_outputs(map_student, map_teacher, grad_student, grad_teacher);
  const int64_t batch = map_student.size(0), positions = map_student.size(1);
  AT_DISPATCH_FLOATING_TYPES(map_student.scalar_type(), "attention_transfer_maps_cpu", [&] {
    const scalar_t* map_s = map_student.const_data_ptr<scalar_t>();
    const scalar_t* map_t = map_teacher.const_data_ptr<scalar_t>();
    scalar_t* loss = std::get<0>(outputs).mutable_data_ptr<scalar_t>();
    scalar_t* grad_s = grad_student ? std::get<1>(outputs).mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_t = grad_teacher ? std::get<2>(outputs).mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(positions, 1));
    at::parallel_for(0, batch, grain, [&](int64_t first, int64_t last) {
      for (int64_t n = first; n < last; ++n) {
        const int64_t offset = n * positions;
        attention_maps_row(map_s + offset, map_t + offset, positions, loss + n, grad_s ? grad_s + offset : nullptr,
                           grad_t ? grad_t + offset : nullptr);
      }
    });
  });
  return outputs;
}

KDOutputs kd_fused_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature, bool grad_student,
                       bool grad_teacher) {
  auto outputs = allocate_kd_outputs(student, teacher, temperature, grad_student, grad_teacher,
                                     empty_like_hugepage);
  if (student.size(0) == 0) return outputs;
  // No classes: KL over nothing is 0, as the reference's sum.
  if (student.size(1) == 0) std::get<0>(outputs).zero_();
  else kFrskdCpuKernels_here().kd(student, teacher, temperature, outputs);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) {
  m.impl("attention_map", &attention_map_cpu);
  m.impl("attention_map_backward", &attention_map_backward_cpu);
  m.impl("attention_transfer_maps", &attention_transfer_maps_cpu);
  m.impl("kd_fused", &kd_fused_cpu);
}

}  // namespace ofdkern
