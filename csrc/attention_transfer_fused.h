// Contract of the fused attention-transfer ops shared by their kernels: argument checks and output allocation.
//
// Schemas (defined in attention_transfer_op.cpp; the Triton kernels in
// ofdkern/kernels/attention_transfer_triton.py take the same):
//   attention_map(Tensor feature, float p) -> Tensor
//       feature: (N, C, S) with any strides (the caller merges the spatial dims into S), p > 0.
//       Returns a = mean_c(feature^p) as a contiguous (N, S) float64 tensor, whatever the feature's dtype: the
//       loss normalizes the difference of two maps, which are close when a student learns its teacher, and
//       magnifies their rounding in the gradient; float32 maps (even rounded once) left the float32 gradient
//       less accurate than eager's. The kernels sum the channels in the accumulation dtype in leaves of a few
//       channels and add the leaves in float64.
//   attention_map_backward(Tensor feature, Tensor grad_map, float p) -> Tensor
//       grad_map: contiguous (N, S) float64. Returns d<grad_map, a>/d feature with feature's sizes, strides and
//       dtype (feature must be non-overlapping and dense).
//   attention_transfer_maps(Tensor map_student, Tensor map_teacher, bool grad_student, bool grad_teacher)
//       -> (Tensor row_loss, Tensor grad_map_student, Tensor grad_map_teacher)
//       map_student, map_teacher: contiguous (N, S) maps of one dtype, float32 or float64 (attention_map's
//       outputs are float64). row_loss: (N,) per sample sum_j (u_s,j - u_t,j)^2 with u = map / max(|map|, 1e-12) (the
//       norm over j; F.normalize). The gradients are those of sum(row_loss) wrt the maps, or empty when not
//       asked.
//   attention_transfer_forward(Tensor student, Tensor teacher, float p, int count)
//       -> (Tensor loss, Tensor grad_map_student, Tensor grad_map_teacher)
//       student, teacher: (N, C, S) features as attention_map takes them, with equal N and S (the channel counts
//       may differ). The composite of the three ops above on the features' device: loss is the sum of the row
//       losses divided by count (as is for count 1), 0-dim in the features' promoted dtype; the gradients are
//       those of the summed row losses wrt each map, in its map's dtype.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "empty_like.h"

namespace ofdkern {

// An (N, C, S) feature's sizes and strides, as the attention-map kernels walk it.
struct FeatureGeometry {
  int64_t batch, channels, positions;
  int64_t batch_stride, channel_stride, position_stride;
};

inline FeatureGeometry geometry(const at::Tensor& feature) {
  return FeatureGeometry{feature.size(0),   feature.size(1),   feature.size(2),
                         feature.stride(0), feature.stride(1), feature.stride(2)};
}

inline void check_attention_feature(const at::Tensor& feature, double p, const char* op) {
  TORCH_CHECK_VALUE(feature.dim() == 3, op, ": feature must be (N, C, S), got shape ", feature.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(feature.scalar_type()), op, ": feature must be floating point, got ",
                   feature.scalar_type());
  TORCH_CHECK_VALUE(p > 0 && std::isfinite(p), op, ": p must be positive and finite, got ", p);
}

// The (N, C, S) feature layouts the attention kernels walk: positions innermost (NCHW-like; also S = 1 unless
// channels are contiguous) or channels innermost (channels_last-like). The ops copy any other layout.
inline bool attention_positions_inner(const at::Tensor& feature) {
  return feature.size(2) == 1 ? feature.size(1) == 1 || feature.stride(1) != 1 : feature.stride(2) == 1;
}

inline bool attention_channels_inner(const at::Tensor& feature) {
  return feature.size(1) == 1 || feature.stride(1) == 1;
}

// feature itself when the attention kernels walk its layout, else a contiguous copy.
inline at::Tensor attention_walkable(const at::Tensor& feature) {
  return attention_positions_inner(feature) || attention_channels_inner(feature) ? feature : feature.contiguous();
}

inline at::Tensor allocate_attention_map(const at::Tensor& feature, double p) {
  check_attention_feature(feature, p, "attention_map");
  return at::empty({feature.size(0), feature.size(2)}, feature.options().dtype(at::kDouble));
}

inline at::Tensor allocate_attention_feature_grad(const at::Tensor& feature, const at::Tensor& grad_map, double p,
                                                  EmptyLike empty_like = default_empty_like) {
  check_attention_feature(feature, p, "attention_map_backward");
  TORCH_CHECK_VALUE(feature.is_non_overlapping_and_dense(),
                    "attention_map_backward: feature must be non-overlapping and dense");
  TORCH_CHECK_VALUE(grad_map.dim() == 2 && grad_map.size(0) == feature.size(0) &&
                        grad_map.size(1) == feature.size(2) && grad_map.is_contiguous() &&
                        grad_map.scalar_type() == at::kDouble,
                    "attention_map_backward: grad_map must be a contiguous (", feature.size(0), ", ",
                    feature.size(2), ") float64 tensor, got shape ", grad_map.sizes(), " dtype ",
                    grad_map.scalar_type());
  TORCH_CHECK_VALUE(feature.device() == grad_map.device(),
                    "attention_map_backward: feature and grad_map must be on one device");
  // A dense feature's own strides (empty_like keeps them).
  return empty_like(feature, feature.options());
}

using AttentionMapsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline void check_attention_transfer_features(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.dim() == 3 && teacher.dim() == 3 && student.size(0) == teacher.size(0) &&
                        student.size(2) == teacher.size(2),
                    "attention_transfer_forward: student and teacher must be (N, C, S) with equal N and S, got "
                    "shapes ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.device() == teacher.device(),
                    "attention_transfer_forward: student and teacher must be on one device");
}

inline AttentionMapsOutputs allocate_attention_maps_outputs(const at::Tensor& map_student,
                                                            const at::Tensor& map_teacher, bool grad_student,
                                                            bool grad_teacher) {
  TORCH_CHECK_VALUE(map_student.dim() == 2, "attention_transfer_maps: map_student must be (N, S), got shape ",
                    map_student.sizes());
  TORCH_CHECK_VALUE(map_student.sizes() == map_teacher.sizes(), "attention_transfer_maps: map_student ",
                    map_student.sizes(), " and map_teacher ", map_teacher.sizes(), " differ in shape");
  const auto dtype = map_student.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "attention_transfer_maps: map_student must be float32 or float64, got ", dtype);
  TORCH_CHECK_TYPE(map_teacher.scalar_type() == dtype, "attention_transfer_maps: map_teacher dtype ",
                   map_teacher.scalar_type(), " differs from map_student dtype ", dtype);
  TORCH_CHECK_VALUE(map_student.is_contiguous() && map_teacher.is_contiguous(),
                    "attention_transfer_maps: maps must be contiguous");
  TORCH_CHECK_VALUE(map_student.device() == map_teacher.device(),
                    "attention_transfer_maps: map_student and map_teacher must be on one device");
  auto maybe = [](bool wanted, const at::Tensor& like) {
    return wanted ? at::empty_like(like) : at::empty({0}, like.options());
  };
  return {at::empty({map_student.size(0)}, map_student.options()), maybe(grad_student, map_student),
          maybe(grad_teacher, map_teacher)};
}

}  // namespace ofdkern
