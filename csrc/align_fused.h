// The fused channel-wise alignment op shared by the CPU and CUDA kernels: its contract, and the one tile
// pipeline both run, with the device's own elementwise passes (align_cpu.cpp, align_cuda.cu).
//
// Schema (defined in align_op.cpp):
//   align_fused(Tensor student, Tensor teacher, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? margin,
//               bool grad_student, bool grad_teacher, bool grad_weights)
//     -> (Tensor loss, Tensor grad_student, Tensor grad_teacher, Tensor grad_w1, Tensor grad_b1,
//         Tensor grad_w2, Tensor grad_b2)
//
// student (N, Cs, ...) and teacher (N, Ct, ...): 2 to 5 dims, equal batch and spatial sizes, each either
// contiguous (NCHW) or dense with channels innermost (channels_last); any floating dtypes. w1 (H, Cs), b1 (H),
// w2 (Ct, H), b2 (Ct): contiguous, all in one floating "compute" dtype (the eager reference's promoted dtype).
// margin: None (plain L2) or a contiguous (Ct,) tensor in the accumulation dtype of the compute dtype (OFD's
// margin ReLU + partial L2). Outputs, for a unit upstream gradient and no reduction scaling:
//   loss          0-dim, the sum of every pixel's loss, accumulation dtype.
//   grad_student  like student (same strides and dtype), or empty when not asked; grad_teacher likewise.
//   grad_w1 .. grad_b2   like the weights in the accumulation dtype, or empty when grad_weights is false.
//
// The pipeline walks the pixels in tiles of a fixed size (whole samples, or a slice of one sample's positions),
// never holding the projection or the hidden activation beyond a tile. Per tile, in the GEMM dtype of the device
// (CPU: the accumulation dtype, or bfloat16 on CPUs where bfloat16 GEMMs are the faster ones; CUDA: the compute
// dtype, tensor cores for half precision), each device's run_tile computes
//   X = student tile (Cs, T)            H = relu(W1 X + b1) (H, T)        Y = W2 H + b2 (Ct, T)
//   loss, dY and d teacher in one pass   dW2 += dY H^T, db2 += rows(dY)   dH = relu'(W2^T dY)
//   dW1 += dH X^T, db1 += rows(dH)       d student tile = W1^T dH
// X and d student are laid out like the student (so the copies in and out are contiguous), Y and dY like the
// teacher (so the loss pass reads and writes both in memory order), H and dH channel-major. Tiles run in a fixed
// order and every sum over pixels is taken in a fixed order: the bits do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "accumulation.h"
#include "layout.h"

namespace ofdkern {

using AlignOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A feature as (N, C, positions), and whether its channels are innermost (strides (P*C, 1, C)).
struct AlignFeature {
  at::Tensor merged;
  bool channels_inner;
};

inline AlignFeature align_feature(const at::Tensor& feature, const char* name) {
  TORCH_CHECK_VALUE(feature.dim() >= 2 && feature.dim() <= 5, "align_fused: ", name,
                    " must have 2 to 5 dims, got shape ", feature.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(feature.scalar_type()), "align_fused: ", name,
                   " must be floating point, got ", feature.scalar_type());
  const int64_t batch = feature.size(0), channels = feature.size(1);
  const int64_t positions = feature.numel() / std::max<int64_t>(batch * channels, 1);
  if (feature.is_contiguous()) return {feature.view({batch, channels, positions}), false};
  TORCH_CHECK_VALUE(channels_innermost(feature), "align_fused: ", name,
                    " must be contiguous or channels_last, got strides ", feature.strides(), " for shape ",
                    feature.sizes());
  return {at::as_strided(feature, {batch, channels, positions}, {positions * channels, 1, channels}), true};
}

// Pixels [n0, n0 + samples) x [p0, p0 + positions): whole samples, or a slice of one sample's positions.
struct AlignTile {
  int64_t n0, samples, p0, positions;
  int64_t pixels() const { return samples * positions; }
};

inline std::vector<AlignTile> align_tiles(int64_t batch, int64_t positions, int64_t tile_pixels) {
  std::vector<AlignTile> tiles;
  if (positions >= tile_pixels) {
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t p = 0; p < positions; p += tile_pixels)
        tiles.push_back({n, 1, p, std::min(tile_pixels, positions - p)});
  } else {
    const int64_t samples = std::max<int64_t>(tile_pixels / std::max<int64_t>(positions, 1), 1);
    for (int64_t n = 0; n < batch; n += samples) tiles.push_back({n, std::min(samples, batch - n), 0, positions});
  }
  return tiles;
}

// A tile of a feature, (samples, C, positions), strided into the feature.
inline at::Tensor feature_tile(const AlignFeature& feature, const AlignTile& tile) {
  return feature.merged.narrow(0, tile.n0, tile.samples).narrow(2, tile.p0, tile.positions);
}

// Columns [first, first + pixels) of a tile's buffers hold the pixels of ``pixels``, a piece of the tile (whole
// samples of it, or a slice of one of its samples).
struct TileColumns {
  AlignTile pixels;
  int64_t first;
};

// A (C, T) buffer of the tile laid out like a feature: channel-major rows (C, samples, positions), or channels
// innermost (samples, positions, C). ``matrix`` is its (C, T) GEMM operand, ``grid`` the same memory shaped like
// the feature tile's (C, samples, positions) permutation, for the copies in and out.
struct TileBuffer {
  at::Tensor matrix;
  at::Tensor grid;
  bool channels_inner;
};

inline TileBuffer tile_buffer(const at::Tensor& storage, int64_t channels, const AlignTile& tile,
                              bool channels_inner) {
  const at::Tensor flat = storage.narrow(0, 0, channels * tile.pixels());
  if (channels_inner) {
    return {flat.view({tile.pixels(), channels}).t(),
            flat.view({tile.samples, tile.positions, channels}).permute({2, 0, 1}), true};
  }
  return {flat.view({channels, tile.pixels()}), flat.view({channels, tile.samples, tile.positions}), false};
}

// The columns of a tile buffer: its (C, width) GEMM operand and its grid.
inline TileBuffer columns_of(const TileBuffer& buffer, const TileColumns& columns) {
  const AlignTile& part = columns.pixels;
  const at::Tensor matrix = buffer.matrix.narrow(1, columns.first, part.pixels());
  if (buffer.channels_inner) {
    return {matrix, matrix.t().view({part.samples, part.positions, matrix.size(0)}).permute({2, 0, 1}), true};
  }
  return {matrix, matrix.view({matrix.size(0), part.samples, part.positions}), false};
}

// The feature tile as its buffer's grid sees it: (C, samples, positions).
inline at::Tensor as_grid(const at::Tensor& tile) { return tile.permute({1, 0, 2}); }

// The tensors every tile's work reads and writes (align_fused prepares them; each device's run_tile uses them).
struct AlignProblem {
  AlignFeature student, teacher, grad_student, grad_teacher;  // the gradients' merged views undefined when unasked
  at::Tensor w1, w2;                                          // GEMM dtype, detached
  at::Tensor b1, b2, margin;                                  // accumulation dtype; no margin: plain L2
  at::Tensor loss;                                            // the 0-dim accumulation-dtype total
  at::Tensor d_w1, d_b1, d_w2, d_b2;                          // accumulation dtype, undefined when unasked
  at::Tensor x_storage, h_storage, y_storage, dh_storage;     // the tile buffers, GEMM dtype
  int64_t s_channels, hidden, t_channels;

  bool grad_weights() const { return d_w1.defined(); }
  bool backward() const { return grad_student.merged.defined() || grad_weights(); }
  TileBuffer x(const AlignTile& tile) const { return tile_buffer(x_storage, s_channels, tile, student.channels_inner); }
  TileBuffer h(const AlignTile& tile) const { return tile_buffer(h_storage, hidden, tile, false); }
  TileBuffer y(const AlignTile& tile) const { return tile_buffer(y_storage, t_channels, tile, teacher.channels_inner); }
  TileBuffer dh(const AlignTile& tile) const { return tile_buffer(dh_storage, hidden, tile, false); }
};

inline void check_align_weight(const at::Tensor& weight, const char* name, at::IntArrayRef shape,
                               const at::Tensor& like) {
  TORCH_CHECK_VALUE(weight.sizes() == shape, "align_fused: ", name, " must have shape ", shape, ", got ",
                    weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == like.scalar_type(), "align_fused: ", name, " must have dtype ",
                   like.scalar_type(), " (the weights' compute dtype), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.is_contiguous(), "align_fused: ", name, " must be contiguous");
  TORCH_CHECK_VALUE(weight.device() == like.device(), "align_fused: ", name, " must be on ", like.device(),
                    ", got ", weight.device());
}

// Device: the GEMM dtype of a compute dtype, the pixels of a tile (given the problem's pixels, the bytes of
// their tile buffers per pixel and the bytes of the two weights), its allocators (a feature gradient with the
// feature's strides; a 1-D tile buffer or weight gradient), and the work of one tile:
//   static at::ScalarType gemm_dtype(at::ScalarType compute_dtype);
//   static int64_t tile_pixels(int64_t pixels, int64_t bytes_per_pixel, int64_t weight_bytes);
//   static at::Tensor empty_like(const at::Tensor& feature);
//   static at::Tensor empty(int64_t numel, at::TensorOptions options);
//   static void run_tile(const AlignProblem& problem, const AlignTile& tile);
template <typename Device>
AlignOutputs align_fused(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1,
                         const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                         const std::optional<at::Tensor>& margin, bool grad_student, bool grad_teacher,
                         bool grad_weights) {
  // The ATen ops below are this kernel's own: autograd must not record them (the op's autograd lives in
  // Python), nor track their views and in-place updates, nor autocast cast them (custom ops fall through it,
  // so its state is still on here). Work that runs on worker threads, which these guards do not reach, sees
  // only detached tensors.
  const at::AutoDispatchBelowADInplaceOrView below_autograd_and_views;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  AlignProblem p;
  p.student = align_feature(student.detach(), "student");
  p.teacher = align_feature(teacher.detach(), "teacher");
  TORCH_CHECK_VALUE(p.student.merged.size(0) == p.teacher.merged.size(0) &&
                        student.sizes().slice(2) == teacher.sizes().slice(2),
                    "align_fused: student ", student.sizes(), " and teacher ", teacher.sizes(),
                    " must have the same batch and spatial sizes");
  p.s_channels = student.size(1);
  p.t_channels = teacher.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2, "align_fused: w1 must be (hidden, ", p.s_channels, "), got ", w1.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(w1.scalar_type()), "align_fused: w1 must be floating point, got ",
                   w1.scalar_type());
  p.hidden = w1.size(0);
  check_align_weight(w1, "w1", {p.hidden, p.s_channels}, w1);
  check_align_weight(b1, "b1", {p.hidden}, w1);
  check_align_weight(w2, "w2", {p.t_channels, p.hidden}, w1);
  check_align_weight(b2, "b2", {p.t_channels}, w1);
  TORCH_CHECK_VALUE(p.s_channels > 0 && p.hidden > 0 && p.t_channels > 0,
                    "align_fused: the MLP needs at least one channel in every layer, got student ", p.s_channels,
                    ", hidden ", p.hidden, " and teacher ", p.t_channels, " channels");
  TORCH_CHECK_VALUE(student.device() == w1.device() && teacher.device() == w1.device(),
                    "align_fused: student, teacher and the weights must be on one device");
  const auto acc = accumulation_dtype(w1.scalar_type());
  const auto acc_options = w1.options().dtype(acc);
  if (margin.has_value()) {
    TORCH_CHECK_VALUE(margin->sizes() == at::IntArrayRef{p.t_channels} && margin->is_contiguous() &&
                          margin->scalar_type() == acc && margin->device() == w1.device(),
                      "align_fused: margin must be a contiguous (", p.t_channels, ",) tensor of dtype ", acc,
                      " on ", w1.device(), ", got shape ", margin->sizes(), " dtype ", margin->scalar_type());
    p.margin = margin->detach();
  }

  p.loss = at::zeros({}, acc_options);
  auto feature_grad = [](bool wanted, const at::Tensor& like) {
    return wanted ? Device::empty_like(like) : at::empty({0}, like.options());
  };
  const at::Tensor d_student = feature_grad(grad_student, student), d_teacher = feature_grad(grad_teacher, teacher);
  if (grad_student) p.grad_student = align_feature(d_student, "grad_student");
  if (grad_teacher) p.grad_teacher = align_feature(d_teacher, "grad_teacher");
  auto weight_grad = [&](const at::Tensor& w) {
    return grad_weights ? Device::empty(w.numel(), acc_options).view(w.sizes()).zero_()
                        : at::empty({0}, acc_options);
  };
  const at::Tensor d_w1 = weight_grad(w1), d_b1 = weight_grad(b1), d_w2 = weight_grad(w2), d_b2 = weight_grad(b2);
  if (grad_weights) std::tie(p.d_w1, p.d_b1, p.d_w2, p.d_b2) = std::tie(d_w1, d_b1, d_w2, d_b2);
  const AlignOutputs outputs{p.loss, d_student, d_teacher, d_w1, d_b1, d_w2, d_b2};
  const int64_t batch = p.student.merged.size(0), positions = p.student.merged.size(2);
  if (batch * positions == 0) return outputs;

  const auto gemm = w1.options().dtype(Device::gemm_dtype(w1.scalar_type()));
  p.w1 = w1.detach().to(gemm.dtype());
  p.w2 = w2.detach().to(gemm.dtype());
  p.b1 = b1.detach().to(acc);
  p.b2 = b2.detach().to(acc);
  const int64_t bytes_per_pixel =
      (p.s_channels + 2 * p.hidden + p.t_channels) * at::elementSize(gemm.dtype().toScalarType());
  const int64_t weight_bytes =
      (p.s_channels + p.t_channels) * p.hidden * at::elementSize(gemm.dtype().toScalarType());
  const int64_t tile_pixels = Device::tile_pixels(batch * positions, bytes_per_pixel, weight_bytes);
  const std::vector<AlignTile> tiles = align_tiles(batch, positions, std::max<int64_t>(128, tile_pixels));
  const int64_t most_pixels = tiles.front().pixels();
  p.x_storage = Device::empty(p.s_channels * most_pixels, gemm);
  p.h_storage = Device::empty(p.hidden * most_pixels, gemm);
  p.y_storage = Device::empty(p.t_channels * most_pixels, gemm);
  if (p.backward()) p.dh_storage = Device::empty(p.hidden * most_pixels, gemm);
  for (const AlignTile& tile : tiles) Device::run_tile(p, tile);
  return outputs;
}

}  // namespace ofdkern
