// CPU kernels of the fused FRSKD ops: attention maps and their feature gradient, and the row-wise KD loss.
// Every output element is written by one thread and every sum runs in a fixed order, so results do not
// depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "frskd_fused.h"
#include "frskd_math.h"

namespace ofdkern {
namespace {

// Positions per attention-map tile (channel-major layouts): one accumulator row stays in L1.
constexpr int64_t kPositionTile = 1024;
// Classes per online-softmax block: one max per block, then one exp per element.
constexpr int64_t kClassBlock = 256;

// Runs body(exponent) where exponent(p) returns p, as a compile-time constant for p = 2 and p = 1 so the
// per-element math folds to a multiply.
template <typename acc_t, typename Body>
void with_exponent(acc_t p, Body body) {
  if (p == acc_t(2)) body([](acc_t) { return acc_t(2); });
  else if (p == acc_t(1)) body([](acc_t) { return acc_t(1); });
  else body([](acc_t value) { return value; });
}

struct FeatureStrides {
  int64_t batch, channel, position;
};

// Calls visit(n, j0, j1) over blocks of positions covering (N, S), in parallel. Channel-major layouts
// (NCHW) get tiles of positions; channels-innermost layouts (channels_last) single positions, whose
// channels are contiguous.
template <typename Visit>
void for_position_blocks(int64_t batch, int64_t positions, bool channels_inner, Visit visit) {
  const int64_t tile = channels_inner ? 1 : kPositionTile;
  const int64_t tiles_per_sample = (positions + tile - 1) / tile;
  const int64_t grain = channels_inner ? 64 : 1;
  at::parallel_for(0, batch * tiles_per_sample, grain, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t n = t / tiles_per_sample;
      const int64_t j0 = (t % tiles_per_sample) * tile;
      visit(n, j0, std::min(positions, j0 + tile));
    }
  });
}

at::Tensor attention_map_cpu(const at::Tensor& feature, double p) {
  at::Tensor map = allocate_attention_map(feature);
  const int64_t batch = feature.size(0), channels = feature.size(1), positions = feature.size(2);
  if (map.numel() == 0) return map;
  const FeatureStrides st{feature.stride(0), feature.stride(1), feature.stride(2)};
  const bool channels_inner = st.channel == 1 && positions > 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature.scalar_type(), "attention_map_cpu", [&] {
    using acc_t = accumulation_t<scalar_t>;
    const scalar_t* f = feature.const_data_ptr<scalar_t>();
    acc_t* out = map.mutable_data_ptr<acc_t>();
    const acc_t exponent_value = static_cast<acc_t>(p);
    with_exponent(exponent_value, [&](auto exponent) {
      const acc_t e = exponent(exponent_value);
      for_position_blocks(batch, positions, channels_inner, [&](int64_t n, int64_t j0, int64_t j1) {
        // Sums over channels in ascending order whatever the layout, so both loop orders give the same bits.
        acc_t sums[kPositionTile] = {};
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* row = f + n * st.batch + c * st.channel;
          for (int64_t j = j0; j < j1; ++j) {
            sums[j - j0] += attention_power(static_cast<acc_t>(row[j * st.position]), e);
          }
        }
        for (int64_t j = j0; j < j1; ++j) out[n * positions + j] = sums[j - j0] / static_cast<acc_t>(channels);
      });
    });
  });
  return map;
}

at::Tensor attention_map_backward_cpu(const at::Tensor& feature, const at::Tensor& grad_map, double p) {
  at::Tensor grad = allocate_attention_feature_grad(feature, grad_map);
  const int64_t batch = feature.size(0), channels = feature.size(1), positions = feature.size(2);
  if (grad.numel() == 0) return grad;
  const FeatureStrides st{feature.stride(0), feature.stride(1), feature.stride(2)};
  const bool channels_inner = st.channel == 1 && positions > 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature.scalar_type(), "attention_map_backward_cpu", [&] {
    using acc_t = accumulation_t<scalar_t>;
    const scalar_t* f = feature.const_data_ptr<scalar_t>();
    const acc_t* g = grad_map.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const acc_t exponent_value = static_cast<acc_t>(p);
    with_exponent(exponent_value, [&](auto exponent) {
      const acc_t e = exponent(exponent_value);
      for_position_blocks(batch, positions, channels_inner, [&](int64_t n, int64_t j0, int64_t j1) {
        // The mean's backward (g / C) times the power's (p f^(p-1)), in the order autograd applies them.
        acc_t grad_mean[kPositionTile];
        for (int64_t j = j0; j < j1; ++j) grad_mean[j - j0] = g[n * positions + j] / static_cast<acc_t>(channels);
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t base = n * st.batch + c * st.channel;
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t i = base + j * st.position;
            out[i] = static_cast<scalar_t>(grad_mean[j - j0] *
                                           attention_power_grad(static_cast<acc_t>(f[i]), e));
          }
        }
      });
    });
  });
  return grad;
}

// Folds the classes [begin, end) of one row into its online state: one max per block and row, then
// the sums rescaled once and extended with one exp per element.
template <typename scalar_t, typename acc_t>
void kd_absorb_block(const scalar_t* s, const scalar_t* t, int64_t begin, int64_t end, acc_t temperature,
                     KDRowState<acc_t>& st) {
  acc_t block_max_s = st.max_s, block_max_t = st.max_t;
  for (int64_t j = begin; j < end; ++j) {
    block_max_s = std::max(block_max_s, static_cast<acc_t>(s[j]) / temperature);
    block_max_t = std::max(block_max_t, static_cast<acc_t>(t[j]) / temperature);
  }
  const acc_t factor_s = rescale_factor(st.max_s, block_max_s);
  const acc_t factor_t = rescale_factor(st.max_t, block_max_t);
  st.max_s = block_max_s;
  st.max_t = block_max_t;
  const acc_t shift_s = softmax_shift(st.max_s), shift_t = softmax_shift(st.max_t);
  acc_t sum_s = 0, sum_t = 0, cross = 0;
  for (int64_t j = begin; j < end; ++j) {
    const acc_t x = static_cast<acc_t>(s[j]) / temperature;
    const acc_t y = static_cast<acc_t>(t[j]) / temperature;
    sum_s += std::exp(x - shift_s);
    sum_t += std::exp(y - shift_t);
    cross += kd_cross_term(x, y, shift_t);
  }
  st.sum_s = st.sum_s * factor_s + sum_s;
  st.sum_t = st.sum_t * factor_t + sum_t;
  st.cross = st.cross * factor_t + cross;
}

KDOutputs kd_fused_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                       bool grad_student, bool grad_teacher) {
  auto outputs = allocate_kd_outputs(student, teacher, temperature, grad_student, grad_teacher);
  const int64_t rows = student.size(0), classes = student.size(1);
  if (rows == 0) return outputs;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fused_cpu", [&] {
    using acc_t = accumulation_t<scalar_t>;
    const scalar_t* s_all = student.const_data_ptr<scalar_t>();
    const scalar_t* t_all = teacher.const_data_ptr<scalar_t>();
    acc_t* row_loss = std::get<0>(outputs).mutable_data_ptr<acc_t>();
    scalar_t* gs_all = grad_student ? std::get<1>(outputs).mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt_all = grad_teacher ? std::get<2>(outputs).mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t temp = static_cast<acc_t>(temperature);

    at::parallel_for(0, rows, 1, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t offset = r * classes;
        const scalar_t* s = s_all + offset;
        const scalar_t* t = t_all + offset;
        KDRowState<acc_t> st;
        for (int64_t j = 0; j < classes; j += kClassBlock) {
          kd_absorb_block(s, t, j, std::min(classes, j + kClassBlock), temp, st);
        }
        const KDRowResult<acc_t> row = kd_finish(st);
        row_loss[r] = row.kl * temp * temp;
        if (!gs_all && !gt_all) continue;
        // Second read of the row (still in cache for all but the widest rows) writes the gradients.
        for (int64_t j = 0; j < classes; ++j) {
          const auto g = kd_class_grad(static_cast<acc_t>(s[j]) / temp, static_cast<acc_t>(t[j]) / temp, row, temp);
          if (gs_all) gs_all[offset + j] = static_cast<scalar_t>(g.d_student);
          if (gt_all) gt_all[offset + j] = static_cast<scalar_t>(g.d_teacher);
        }
      }
    });
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) {
  m.impl("attention_map", &attention_map_cpu);
  m.impl("attention_map_backward", &attention_map_backward_cpu);
  m.impl("kd_fused", &kd_fused_cpu);
}

}  // namespace ofdkern
