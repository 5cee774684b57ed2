// The attention-transfer CPU kernels (attention_transfer_cpu.h) on at::vec vectors of the instruction set
// CPU_CAPABILITY. Included by cpu_isa_<isa>.cpp, after cpu_isa_prelude.h and that file's #pragma GCC target;
// everything here is in the namespace ofdkern::CPU_CAPABILITY, so the variants stay apart.
#pragma once

#include "attention_transfer_fused.h"
#include "attention_transfer_math.h"
#include "cpu_vec.h"

namespace ofdkern {
namespace CPU_CAPABILITY {
namespace {

// Positions per attention tile when positions are innermost: one accumulator row stays in L1.
constexpr int64_t kPositionTile = 1024;
// Tiles of at most this many vectors of positions keep their sums in registers over all the channels.
constexpr int kMapRegisterVectors = 8;
// Positions per task when channels are innermost.
constexpr int64_t kChannelsInnerTile = 16;

// Calls visit(n, j0, j1) over tiles of `tile` positions covering (N, S), in parallel.
template <typename Visit>
void for_position_tiles(const FeatureGeometry& g, int64_t tile, Visit&& visit) {
  const int64_t tiles_per_sample = (g.positions + tile - 1) / tile;
  at::parallel_for(0, g.batch * tiles_per_sample, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t n = item / tiles_per_sample;
      const int64_t j0 = (item % tiles_per_sample) * tile;
      visit(n, j0, std::min(g.positions, j0 + tile));
    }
  });
}

// A map adds its channels in leaves of kChannelLeaf consecutive channels, each summed in order in the
// accumulation type, and adds the leaves' sums in float64, the maps' dtype (attention_transfer_fused.h). The
// order depends on the channel count alone, so the bits do not depend on threads or schedule.
constexpr int64_t kChannelLeaf = 8;

// How far ahead of the channel row being summed the map kernels ask for rows (bytes): rows of a few positions
// are read as one stream per thread, which the hardware prefetcher alone leaves at about half the bandwidth
// of the several streams of an elementwise op.
constexpr int64_t kPrefetchAheadBytes = 4096;

// Asks for the row `ahead` rows past `row` (one request per cache line of its `bytes`) when it is in the map.
template <typename scalar_t>
OFDKERN_INLINE_VEC void prefetch_row_ahead(const scalar_t* row, int64_t c, int64_t ahead, int64_t channels,
                                           int64_t channel_stride, int64_t bytes) {
  if (c + ahead >= channels) return;
  const char* next = reinterpret_cast<const char*>(row + ahead * channel_stride);
  for (int64_t line = 0; line < bytes; line += kCacheLine) __builtin_prefetch(next + line, 0, 3);
}

// sums[0, n) = sum_c f^p over `channels` rows channel_stride apart from f, for n positions in K vectors (the
// last one last_lanes wide): a leaf in K vector registers, the leaves' total in float64.
template <int K, int kExponent, typename scalar_t>
void channel_power_sums(const scalar_t* f, int64_t channel_stride, int64_t channels, int64_t last_lanes,
                        const Vectorized<accumulation_t<scalar_t>>& exponent, double* sums) {
  using acc_t = accumulation_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t width = Vec::size();
  const auto lanes = [&](int k) { return k == K - 1 ? last_lanes : width; };
  const int64_t row_bytes = ((K - 1) * width + last_lanes) * int64_t{sizeof(scalar_t)};
  const int64_t ahead = std::max<int64_t>(1, kPrefetchAheadBytes / (channel_stride * int64_t{sizeof(scalar_t)}));
  acc_t leaf[K * width];
  double total[K * width] = {};
  for (int64_t first = 0; first < channels; first += kChannelLeaf) {
    Vec acc[K];
    for (int k = 0; k < K; ++k) acc[k] = Vec(acc_t(0));
    for (int64_t c = first; c < std::min(channels, first + kChannelLeaf); ++c) {
      const scalar_t* row = f + c * channel_stride;
      prefetch_row_ahead(row, c, ahead, channels, channel_stride, row_bytes);
      for (int k = 0; k < K; ++k) {
        acc[k] += attention_power<VecMath<acc_t>, kExponent>(load_widened(row + k * width, lanes(k)), exponent);
      }
    }
    for (int k = 0; k < K; ++k) acc[k].store(leaf + k * width);
    for (int64_t i = 0; i < K * width; ++i) total[i] += leaf[i];
  }
  std::copy(total, total + (K - 1) * width + last_lanes, sums);
}

// channel_power_sums<vectors> for 1 <= vectors <= kMapRegisterVectors.
template <int K = 1, int kExponent, typename scalar_t>
void channel_power_sums_of(int64_t vectors, const scalar_t* f, int64_t channel_stride, int64_t channels,
                           int64_t last_lanes, const Vectorized<accumulation_t<scalar_t>>& exponent, double* sums) {
  if constexpr (K < kMapRegisterVectors) {
    if (vectors > K) {
      channel_power_sums_of<K + 1, kExponent>(vectors, f, channel_stride, channels, last_lanes, exponent, sums);
      return;
    }
  }
  channel_power_sums<K, kExponent>(f, channel_stride, channels, last_lanes, exponent, sums);
}

// a = mean_c(f^p) in float64, the channels added in leaves (kChannelLeaf): for positions innermost (NCHW), a
// tile of positions accumulates in vectors across positions; for channels innermost (channels_last), each
// position sums a leaf's channels in vector lanes, then adds the lanes in float64 in order.
template <typename scalar_t, int kExponent>
void attention_map_typed(const at::Tensor& feature, double p, const at::Tensor& map) {
  using acc_t = accumulation_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using M = VecMath<acc_t>;
  constexpr int64_t width = Vec::size();
  const FeatureGeometry g = geometry(feature);
  const scalar_t* f = feature.const_data_ptr<scalar_t>();
  double* out = map.mutable_data_ptr<double>();
  const Vec exponent(static_cast<acc_t>(p));
  const double channels = static_cast<double>(g.channels);

  if (attention_positions_inner(feature)) {
    for_position_tiles(g, kPositionTile, [&](int64_t n, int64_t j0, int64_t j1) {
      double sums[kPositionTile];
      const int64_t len = j1 - j0;
      const scalar_t* tile = f + n * g.batch_stride + j0;
      const int64_t vectors = (len + width - 1) / width;
      if (vectors <= kMapRegisterVectors) {
        // Few positions: in memory, each channel's update of a leaf's sums would wait on the last one's store.
        channel_power_sums_of<1, kExponent>(vectors, tile, g.channel_stride, g.channels,
                                            len - (vectors - 1) * width, exponent, sums);
      } else {
        // Many: the rows stream in order; the leaf's store-to-load latency hides behind a row of vectors.
        acc_t leaf[kPositionTile];
        std::fill(sums, sums + len, 0.0);
        for (int64_t first = 0; first < g.channels; first += kChannelLeaf) {
          std::fill(leaf, leaf + len, acc_t(0));
          for (int64_t c = first; c < std::min(g.channels, first + kChannelLeaf); ++c) {
            const scalar_t* x = tile + c * g.channel_stride;
            for (int64_t i = 0; i < len; i += width) {
              const int64_t lanes = std::min(width, len - i);
              (Vec::loadu(leaf + i, lanes) + attention_power<M, kExponent>(load_widened(x + i, lanes), exponent))
                  .store(leaf + i, lanes);
            }
          }
          for (int64_t i = 0; i < len; ++i) sums[i] += leaf[i];
        }
      }
      for (int64_t i = 0; i < len; ++i) out[n * g.positions + j0 + i] = sums[i] / channels;
    });
  } else {
    for_position_tiles(g, kChannelsInnerTile, [&](int64_t n, int64_t j0, int64_t j1) {
      acc_t lanes_of_leaf[width];
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* position = f + n * g.batch_stride + j * g.position_stride;
        double total = 0;
        for (int64_t first = 0; first < g.channels; first += kChannelLeaf * width) {
          Vec sum(acc_t(0));
          for (int64_t c = first; c < std::min(g.channels, first + kChannelLeaf * width); c += width) {
            const int64_t lanes = std::min(width, g.channels - c);
            sum += first_lanes(attention_power<M, kExponent>(load_widened(position + c, lanes), exponent), lanes);
          }
          sum.store(lanes_of_leaf);
          for (acc_t lane : lanes_of_leaf) total += lane;
        }
        out[n * g.positions + j] = total / channels;
      }
    });
  }
}

// d <grad_map, a> / d f = (grad_map / C) * p f^(p-1) (the mean's backward, in float64 and rounded once to the
// accumulation type, then the power's, as autograd applies them); one read of the feature and one write of its
// gradient, in the feature's layout.
template <typename scalar_t, int kExponent>
void attention_map_backward_typed(const at::Tensor& feature, const at::Tensor& grad_map, double p,
                                  const at::Tensor& grad) {
  using acc_t = accumulation_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using M = VecMath<acc_t>;
  constexpr int64_t step = kPairWidth<acc_t>;
  const FeatureGeometry g = geometry(feature);
  const scalar_t* f = feature.const_data_ptr<scalar_t>();
  const double* gm = grad_map.const_data_ptr<double>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  const Vec exponent(static_cast<acc_t>(p));
  const double channels = static_cast<double>(g.channels);
  // n (<= step) elements of f's gradient from those at x and their factors grad_map / C.
  const auto pair_grad_of = [&](const scalar_t* x, const VectorPair<acc_t>& grad_mean, int64_t n) {
    const VectorPair<acc_t> v = load_pair(x, n);
    return VectorPair<acc_t>{grad_mean.low * attention_power_grad<M, kExponent>(v.low, exponent),
                             grad_mean.high * attention_power_grad<M, kExponent>(v.high, exponent)};
  };
  const auto pair_grad = [&](const scalar_t* x, const VectorPair<acc_t>& grad_mean, int64_t n, scalar_t* y) {
    store_pair(y, pair_grad_of(x, grad_mean, n), n);
  };
  const bool streaming = grad.nbytes() >= kStreamingStoreBytes;

  if (attention_positions_inner(feature)) {
    for_position_tiles(g, kPositionTile, [&](int64_t n, int64_t j0, int64_t j1) {
      const int64_t len = j1 - j0;
      // The factors of the tile's positions, repeated past its end: element e of a row (or of the run below)
      // takes its step factors from e % len on.
      acc_t grad_mean[kPositionTile + step];
      for (int64_t i = 0; i < len + step; ++i) {
        grad_mean[i] = static_cast<acc_t>(gm[n * g.positions + j0 + i % len] / channels);
      }
      // A sample whose channel rows follow each other is one run of C * len elements, walked in full steps
      // however short its rows (a dense gradient: rows never overlap, so this means the whole sample).
      const bool one_run = g.channel_stride == len;
      const int64_t run = one_run ? g.channels * len : len;
      const int64_t step_phase = step % len;
      for (int64_t c = 0; c < (one_run ? 1 : g.channels); ++c) {
        const int64_t offset = n * g.batch_stride + c * g.channel_stride + j0;
        // A first step up to the gradient's next cache line: the steps after it store whole lines (a store
        // split over two lines costs twice).
        const auto misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + offset) % kCacheLine);
        int64_t e = std::min<int64_t>(run, (kCacheLine - misalignment) % kCacheLine / int64_t{sizeof(scalar_t)});
        if (e > 0) pair_grad(f + offset, load_pair(grad_mean, e), e, out + offset);
        // Whole steps (their width known to the compiler; line-aligned, so streamed when the gradient is
        // large), then the rest.
        int64_t phase = e % len;
        for (; e + step <= run; e += step) {
          const VectorPair<acc_t> gradient = pair_grad_of(f + offset + e, load_pair(grad_mean + phase, step), step);
          if (streaming) {
            stream_pair(out + offset + e, gradient);
          } else {
            store_pair(out + offset + e, gradient, step);
          }
          phase += step_phase;
          if (phase >= len) phase -= len;
        }
        if (e < run) pair_grad(f + offset + e, load_pair(grad_mean + phase, run - e), run - e, out + offset + e);
      }
      if (streaming) stream_fence();
    });
  } else {
    for_position_tiles(g, kChannelsInnerTile, [&](int64_t n, int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const Vec grad_mean(static_cast<acc_t>(gm[n * g.positions + j] / channels));
        const int64_t offset = n * g.batch_stride + j * g.position_stride;
        int64_t c = 0;
        for (; c + step <= g.channels; c += step) {
          pair_grad(f + offset + c, {grad_mean, grad_mean}, step, out + offset + c);
        }
        if (c < g.channels) pair_grad(f + offset + c, {grad_mean, grad_mean}, g.channels - c, out + offset + c);
      }
    });
  }
}

// One sample's maps: three sweeps over its S positions (the norms; the normalized difference with the loss and
// the two projections; the gradients), each summing in the lanes of a vector, then over the lanes in order.
template <typename acc_t>
void attention_maps_row(const acc_t* map_s, const acc_t* map_t, int64_t positions, acc_t* loss, acc_t* grad_s,
                        acc_t* grad_t) {
  using Vec = Vectorized<acc_t>;
  using M = VecMath<acc_t>;
  constexpr int64_t width = Vec::size();
  // Lanes past the row load as 0 (u = 0, diff = 0): they add nothing.
  Vec squares_s(acc_t(0)), squares_t(acc_t(0));
  for (int64_t j = 0; j < positions; j += width) {
    const int64_t n = std::min(width, positions - j);
    const Vec a_s = Vec::loadu(map_s + j, n), a_t = Vec::loadu(map_t + j, n);
    squares_s += a_s * a_s;
    squares_t += a_t * a_t;
  }
  const acc_t norm_s = std::sqrt(lane_sum(squares_s)), norm_t = std::sqrt(lane_sum(squares_t));
  const Vec divisor_s(normalize_divisor(norm_s)), divisor_t(normalize_divisor(norm_t));
  const auto unit_maps = [&](int64_t j, int64_t n) {
    return std::pair<Vec, Vec>{Vec::loadu(map_s + j, n) / divisor_s, Vec::loadu(map_t + j, n) / divisor_t};
  };
  Vec total(acc_t(0)), dot_s(acc_t(0)), dot_t(acc_t(0));
  for (int64_t j = 0; j < positions; j += width) {
    const auto [u_s, u_t] = unit_maps(j, std::min(width, positions - j));
    const Vec diff = u_s - u_t;
    total += diff * diff;
    dot_s += u_s * diff;
    dot_t += u_t * diff;
  }
  *loss = lane_sum(total);
  if (!grad_s && !grad_t) return;
  // d total / d u_s = 2 diff, d total / d u_t = -2 diff.
  const Vec two(acc_t(2)), minus_two(acc_t(-2));
  const Vec two_dot_s(acc_t(2) * lane_sum(dot_s)), minus_two_dot_t(acc_t(-2) * lane_sum(dot_t));
  for (int64_t j = 0; j < positions; j += width) {
    const int64_t n = std::min(width, positions - j);
    const auto [u_s, u_t] = unit_maps(j, n);
    const Vec diff = u_s - u_t;
    if (grad_s) normalize_grad<M>(two * diff, u_s, two_dot_s, Vec(norm_s)).store(grad_s + j, n);
    if (grad_t) normalize_grad<M>(minus_two * diff, u_t, minus_two_dot_t, Vec(norm_t)).store(grad_t + j, n);
  }
}

void attention_transfer_maps_kernel(const at::Tensor& map_student, const at::Tensor& map_teacher,
                                    const AttentionMapsOutputs& outputs) {
  const int64_t batch = map_student.size(0), positions = map_student.size(1);
  AT_DISPATCH_FLOATING_TYPES(map_student.scalar_type(), "attention_transfer_maps_cpu", [&] {
    const scalar_t* map_s = map_student.const_data_ptr<scalar_t>();
    const scalar_t* map_t = map_teacher.const_data_ptr<scalar_t>();
    scalar_t* loss = std::get<0>(outputs).mutable_data_ptr<scalar_t>();
    scalar_t* grad_s = std::get<1>(outputs).numel() ? std::get<1>(outputs).mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_t = std::get<2>(outputs).numel() ? std::get<2>(outputs).mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(positions, 1));
    at::parallel_for(0, batch, grain, [&](int64_t first, int64_t last) {
      for (int64_t n = first; n < last; ++n) {
        const int64_t offset = n * positions;
        attention_maps_row(map_s + offset, map_t + offset, positions, loss + n, grad_s ? grad_s + offset : nullptr,
                           grad_t ? grad_t + offset : nullptr);
      }
    });
  });
}

void attention_map_kernel(const at::Tensor& feature, double p, const at::Tensor& map) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature.scalar_type(), "attention_map_cpu", [&] {
    with_attention_exponent(p, [&](auto kind) { attention_map_typed<scalar_t, kind>(feature, p, map); });
  });
}

void attention_map_backward_kernel(const at::Tensor& feature, const at::Tensor& grad_map, double p,
                                   const at::Tensor& grad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature.scalar_type(), "attention_map_backward_cpu",
                                  [&] {
                                    with_attention_exponent(p, [&](auto kind) {
                                      attention_map_backward_typed<scalar_t, kind>(feature, grad_map, p, grad);
                                    });
                                  });
}

}  // namespace

const AttentionTransferCpuKernels kAttentionTransferCpuKernels{&attention_map_kernel, &attention_map_backward_kernel,
                                                               &attention_transfer_maps_kernel};

}  // namespace CPU_CAPABILITY
}  // namespace ofdkern
