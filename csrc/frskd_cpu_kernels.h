// The FRSKD CPU kernels (frskd_cpu.h) on at::vec vectors of the instruction set CPU_CAPABILITY. Included by
// cpu_isa_<isa>.cpp, after cpu_isa_prelude.h and that file's #pragma GCC target; everything here is in the
// namespace ofdkern::CPU_CAPABILITY, so the variants stay apart.
//
// KD: a row is split into blocks of kClassBlock classes. Pass 1 takes each block's max and sum of
// e = exp((v - max) / T) (two sweeps over the block, which stays in cache) and keeps the e; the blocks of a row
// are merged in block order; pass 2 turns the kept e into probabilities and writes each block's share of KL
// and its student gradient; the row's KL is the sum of the shares in block order; the teacher gradient, which
// needs that KL, is a pass 3. Two exps per class in all. With many rows (or rows of one block) a row is a task
// and its passes run back to back on one thread, its logits and e in that thread's cache; with few wide rows
// the blocks are the tasks, pass by pass. The blocks and every order of summation depend on the shape only, so
// neither the schedule nor the thread count changes a bit.
#pragma once

#include "cpu_vec.h"
#include "frskd_fused.h"
#include "frskd_math.h"

namespace ofdkern {
namespace CPU_CAPABILITY {
namespace {

// Classes per KD block: both logit blocks (2 x 16 KiB in fp32) stay in L1/L2 between the sweeps of a pass.
constexpr int64_t kClassBlock = 4096;
// Positions per attention tile when positions are innermost: one accumulator row stays in L1.
constexpr int64_t kPositionTile = 1024;
// Tiles of at most this many vectors of positions keep their sums in registers over all the channels.
constexpr int kMapRegisterVectors = 8;
// Bytes per cache line.
constexpr uintptr_t kCacheLine = 64;
// Positions per task when channels are innermost.
constexpr int64_t kChannelsInnerTile = 16;

// The maximum over the lanes, in lane order.
template <typename acc_t>
acc_t lane_max(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t result = lanes[0];
  for (acc_t lane : lanes) result = ScalarMath<acc_t>::max(result, lane);
  return result;
}

// --- KD ---------------------------------------------------------------------------------------------------

// Max and sum of e = exp((v - shift) / T) of n logits, writing each e to exps: the max first (the block is in
// cache), then one exp per class.
template <typename acc_t>
SoftmaxStats<acc_t> softmax_stats(const acc_t* logits, int64_t n, acc_t inv_temperature, acc_t* exps) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kWidth4 = 4 * kWidth<acc_t>;
  const acc_t minus_inf = negative_infinity<acc_t>();
  // Four independent maxima: one chain of NaN-propagating maxima would wait on its own latency.
  Vec max[4] = {Vec(minus_inf), Vec(minus_inf), Vec(minus_inf), Vec(minus_inf)};
  int64_t i = 0;
  for (; i + kWidth4 <= n; i += kWidth4) {
    for (int k = 0; k < 4; ++k) max[k] = at::vec::maximum(max[k], Vec::loadu(logits + i + k * kWidth<acc_t>));
  }
  for (; i < n; i += kWidth<acc_t>) {
    max[0] = at::vec::maximum(max[0], load_lanes(logits + i, std::min(kWidth<acc_t>, n - i), minus_inf));
  }
  const acc_t block_max =
      lane_max(at::vec::maximum(at::vec::maximum(max[0], max[1]), at::vec::maximum(max[2], max[3])));
  const Vec shift(softmax_shift(block_max)), scale(inv_temperature);
  Vec sum(acc_t(0));
  for (i = 0; i < n; i += kWidth<acc_t>) {
    const int64_t lanes = std::min(kWidth<acc_t>, n - i);
    const Vec e = kd_scaled(Vec::loadu(logits + i, lanes), shift, scale).exp();
    sum += first_lanes(e, lanes);
    e.store(exps + i, lanes);
  }
  return SoftmaxStats<acc_t>{block_max, lane_sum(sum)};
}

template <typename acc_t>
struct KDBlockStats {
  SoftmaxStats<acc_t> student, teacher;
};

// A row's constants and its max and sum (from which kd_block derives each block's factors p = e * scale).
template <typename acc_t>
struct KDRowOfBlocks {
  KDRow<acc_t> row;
  SoftmaxStats<acc_t> student, teacher;  // the row's max and sum
};

// The row from its blocks' stats: the row max first, then each block's sum rescaled to it once, added in
// block order.
template <typename acc_t>
KDRowOfBlocks<acc_t> merged_row(const KDBlockStats<acc_t>* blocks, int64_t count, acc_t temperature,
                                acc_t inv_temperature) {
  SoftmaxStats<acc_t> student{negative_infinity<acc_t>(), 0}, teacher{negative_infinity<acc_t>(), 0};
  for (int64_t b = 0; b < count; ++b) {
    student.max = ScalarMath<acc_t>::max(student.max, blocks[b].student.max);
    teacher.max = ScalarMath<acc_t>::max(teacher.max, blocks[b].teacher.max);
  }
  for (int64_t b = 0; b < count; ++b) {
    student.sum += blocks[b].student.sum * block_rescale(blocks[b].student.max, student.max, inv_temperature);
    teacher.sum += blocks[b].teacher.sum * block_rescale(blocks[b].teacher.max, teacher.max, inv_temperature);
  }
  return KDRowOfBlocks<acc_t>{kd_row(student, teacher, temperature, inv_temperature), student, teacher};
}

template <typename acc_t>
KDRow<Vectorized<acc_t>> broadcast(const KDRow<acc_t>& row) {
  using Vec = Vectorized<acc_t>;
  return KDRow<Vec>{Vec(row.shift_s), Vec(row.shift_t), Vec(row.inv_temperature), Vec(row.temperature),
                    Vec(row.log_ratio)};
}

// One block of a row: its logits and their e in the accumulation type, and the factors p = e * scale.
template <typename acc_t>
struct KDBlock {
  const acc_t *s, *t, *e_s, *e_t;
  int64_t n;
  acc_t scale_s, scale_t;
};

template <typename acc_t>
KDBlock<acc_t> kd_block(const acc_t* s, const acc_t* t, const acc_t* e_s, const acc_t* e_t, int64_t n,
                        const KDBlockStats<acc_t>& stats, const KDRowOfBlocks<acc_t>& row) {
  const acc_t inv_temperature = row.row.inv_temperature;
  return KDBlock<acc_t>{s, t, e_s, e_t, n,
                        block_rescale(stats.student.max, row.student.max, inv_temperature) / row.student.sum,
                        block_rescale(stats.teacher.max, row.teacher.max, inv_temperature) / row.teacher.sum};
}

// Pass 2 over a block: returns its share of KL; writes d (T^2 KL) / d s when d_student is not null.
template <typename acc_t>
acc_t kd_block_terms(const KDBlock<acc_t>& block, const KDRow<acc_t>& row, acc_t* d_student) {
  using Vec = Vectorized<acc_t>;
  const KDRow<Vec> lanes_row = broadcast(row);
  const Vec scale_s(block.scale_s), scale_t(block.scale_t);
  // Locals: the stores to d_student could alias the block's fields for all the compiler knows.
  const acc_t *s = block.s, *t = block.t, *e_s = block.e_s, *e_t = block.e_t;
  const int64_t n = block.n;
  Vec kl(acc_t(0));
  for (int64_t i = 0; i < n; i += kWidth<acc_t>) {
    const int64_t lanes = std::min(kWidth<acc_t>, n - i);
    const auto terms = kd_class_terms<VecMath<acc_t>>(Vec::loadu(s + i, lanes), Vec::loadu(t + i, lanes),
                                                      Vec::loadu(e_s + i, lanes) * scale_s,
                                                      Vec::loadu(e_t + i, lanes) * scale_t, lanes_row);
    kl += first_lanes(terms.loss, lanes);
    if (d_student) terms.d_student.store(d_student + i, lanes);
  }
  return lane_sum(kl);
}

// Pass 3 over a block: d (T^2 KL) / d t, given the row's KL.
template <typename acc_t>
void kd_block_teacher_grad(const KDBlock<acc_t>& block, const KDRow<acc_t>& row, acc_t kl, acc_t* d_teacher) {
  using Vec = Vectorized<acc_t>;
  const KDRow<Vec> lanes_row = broadcast(row);
  const Vec scale_t(block.scale_t), row_kl(kl);
  const acc_t *s = block.s, *t = block.t, *e_t = block.e_t;
  const int64_t n = block.n;
  for (int64_t i = 0; i < n; i += kWidth<acc_t>) {
    const int64_t lanes = std::min(kWidth<acc_t>, n - i);
    kd_teacher_grad<VecMath<acc_t>>(Vec::loadu(s + i, lanes), Vec::loadu(t + i, lanes),
                                    Vec::loadu(e_t + i, lanes) * scale_t, lanes_row, row_kl)
        .store(d_teacher + i, lanes);
  }
}

// One thread's buffers for a block: both logit blocks in the accumulation type and a gradient block.
template <typename scalar_t>
struct KDBuffers {
  InputBlock<scalar_t, kClassBlock> student, teacher;
  OutputBlock<scalar_t, kClassBlock> grad;
};

// Rows per thread from which each row is one task (one parallel region, a row and its e in one thread's
// cache); fewer rows, and their blocks are the tasks (a parallel region per pass).
constexpr int64_t kRowTasksPerThread = 4;
// The e of the block-task schedule are kept for at most this many bytes of rows at a time.
constexpr int64_t kExpScratchBytes = int64_t{8} << 20;

template <typename scalar_t>
void kd_typed(const at::Tensor& student, const at::Tensor& teacher, double temperature, const KDOutputs& outputs) {
  using acc_t = accumulation_t<scalar_t>;
  const int64_t rows = student.size(0), classes = student.size(1);
  const int64_t blocks = (classes + kClassBlock - 1) / kClassBlock;
  const scalar_t* s_all = student.const_data_ptr<scalar_t>();
  const scalar_t* t_all = teacher.const_data_ptr<scalar_t>();
  acc_t* row_loss = std::get<0>(outputs).mutable_data_ptr<acc_t>();
  const auto gradient = [](const at::Tensor& out) {
    return out.numel() ? out.mutable_data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr);
  };
  scalar_t* gs_all = gradient(std::get<1>(outputs));
  scalar_t* gt_all = gradient(std::get<2>(outputs));
  const acc_t temp = static_cast<acc_t>(temperature);
  const acc_t inv_temp = static_cast<acc_t>(1 / temperature);
  // T^2 rounded once, as the reference's `* temperature ** 2`.
  const acc_t temp_squared = static_cast<acc_t>(temperature * temperature);

  // The passes over block b of row r; e_s and e_t hold the row's e (indexed by class). Whatever thread runs
  // them and in whatever schedule, they compute the same bits.
  const auto block_logits = [&](KDBuffers<scalar_t>& buf, int64_t r, int64_t b) {
    const int64_t begin = b * kClassBlock, n = std::min(kClassBlock, classes - begin);
    const int64_t offset = r * classes + begin;
    return std::make_tuple(offset, n, buf.student.load(s_all + offset, n), buf.teacher.load(t_all + offset, n));
  };
  const auto stats_pass = [&](KDBuffers<scalar_t>& buf, int64_t r, int64_t b, acc_t* e_s, acc_t* e_t) {
    const auto [offset, n, s, t] = block_logits(buf, r, b);
    const int64_t begin = b * kClassBlock;
    return KDBlockStats<acc_t>{softmax_stats(s, n, inv_temp, e_s + begin), softmax_stats(t, n, inv_temp, e_t + begin)};
  };
  const auto terms_pass = [&](KDBuffers<scalar_t>& buf, int64_t r, int64_t b, const acc_t* e_s, const acc_t* e_t,
                              const KDBlockStats<acc_t>& stats, const KDRowOfBlocks<acc_t>& row) {
    const auto [offset, n, s, t] = block_logits(buf, r, b);
    const int64_t begin = b * kClassBlock;
    const auto block = kd_block(s, t, e_s + begin, e_t + begin, n, stats, row);
    const acc_t kl = kd_block_terms(block, row.row, gs_all ? buf.grad.data(gs_all + offset) : nullptr);
    if (gs_all) buf.grad.store(gs_all + offset, n);
    return kl;
  };
  const auto teacher_pass = [&](KDBuffers<scalar_t>& buf, int64_t r, int64_t b, const acc_t* e_s, const acc_t* e_t,
                                const KDBlockStats<acc_t>& stats, const KDRowOfBlocks<acc_t>& row, acc_t kl) {
    const auto [offset, n, s, t] = block_logits(buf, r, b);
    const int64_t begin = b * kClassBlock;
    kd_block_teacher_grad(kd_block(s, t, e_s + begin, e_t + begin, n, stats, row), row.row, kl,
                          buf.grad.data(gt_all + offset));
    buf.grad.store(gt_all + offset, n);
  };
  // The row's KL: its blocks' shares added in block order.
  const auto row_kl_of = [&](const acc_t* block_kl) {
    acc_t kl = 0;
    for (int64_t b = 0; b < blocks; ++b) kl += block_kl[b];
    return kl;
  };

  if (blocks == 1 || rows >= kRowTasksPerThread * at::get_num_threads()) {
    const int64_t grain = std::max<int64_t>(1, kClassBlock / classes);
    at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
      KDBuffers<scalar_t> buf;
      // Uninitialized: pass 1 writes every e before pass 2 reads it.
      const std::unique_ptr<acc_t[]> exps(new acc_t[2 * classes]);
      acc_t* e_s = exps.get();
      acc_t* e_t = e_s + classes;
      std::vector<KDBlockStats<acc_t>> stats(blocks);
      std::vector<acc_t> block_kl(blocks);
      for (int64_t r = first; r < last; ++r) {
        for (int64_t b = 0; b < blocks; ++b) stats[b] = stats_pass(buf, r, b, e_s, e_t);
        const KDRowOfBlocks<acc_t> row = merged_row(stats.data(), blocks, temp, inv_temp);
        for (int64_t b = 0; b < blocks; ++b) block_kl[b] = terms_pass(buf, r, b, e_s, e_t, stats[b], row);
        const acc_t kl = row_kl_of(block_kl.data());
        row_loss[r] = kl * temp_squared;
        if (gt_all) {
          for (int64_t b = 0; b < blocks; ++b) teacher_pass(buf, r, b, e_s, e_t, stats[b], row, kl);
        }
      }
    });
    return;
  }

  // Few wide rows: the blocks are the tasks, pass by pass, over groups of rows whose e fit the scratch.
  const int64_t group_rows =
      std::clamp<int64_t>(kExpScratchBytes / (2 * classes * int64_t{sizeof(acc_t)}), 1, rows);
  const at::Tensor scratch = at::empty({group_rows, 2, classes}, std::get<0>(outputs).options());
  std::vector<KDBlockStats<acc_t>> stats(group_rows * blocks);
  std::vector<KDRowOfBlocks<acc_t>> row_of_blocks(group_rows);
  std::vector<acc_t> block_kl(group_rows * blocks), row_kl(group_rows);
  for (int64_t first_row = 0; first_row < rows; first_row += group_rows) {
    const int64_t count = std::min(group_rows, rows - first_row);
    // body(buffers, row in the group, block, its row's e_s and e_t) for every block of the group, in parallel.
    const auto for_each_block = [&](auto&& body) {
      at::parallel_for(0, count * blocks, 1, [&](int64_t first, int64_t last) {
        KDBuffers<scalar_t> buf;
        for (int64_t item = first; item < last; ++item) {
          const int64_t g = item / blocks;
          acc_t* e_s = scratch.mutable_data_ptr<acc_t>() + g * 2 * classes;
          body(buf, g, item % blocks, e_s, e_s + classes);
        }
      });
    };
    for_each_block([&](KDBuffers<scalar_t>& buf, int64_t g, int64_t b, acc_t* e_s, acc_t* e_t) {
      stats[g * blocks + b] = stats_pass(buf, first_row + g, b, e_s, e_t);
    });
    for (int64_t g = 0; g < count; ++g) row_of_blocks[g] = merged_row(&stats[g * blocks], blocks, temp, inv_temp);
    for_each_block([&](KDBuffers<scalar_t>& buf, int64_t g, int64_t b, acc_t* e_s, acc_t* e_t) {
      block_kl[g * blocks + b] = terms_pass(buf, first_row + g, b, e_s, e_t, stats[g * blocks + b], row_of_blocks[g]);
    });
    for (int64_t g = 0; g < count; ++g) {
      row_kl[g] = row_kl_of(&block_kl[g * blocks]);
      row_loss[first_row + g] = row_kl[g] * temp_squared;
    }
    if (gt_all) {
      for_each_block([&](KDBuffers<scalar_t>& buf, int64_t g, int64_t b, acc_t* e_s, acc_t* e_t) {
        teacher_pass(buf, first_row + g, b, e_s, e_t, stats[g * blocks + b], row_of_blocks[g], row_kl[g]);
      });
    }
  }
}

void kd_kernel(const at::Tensor& student, const at::Tensor& teacher, double temperature, const KDOutputs& outputs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fused_cpu",
                                  [&] { kd_typed<scalar_t>(student, teacher, temperature, outputs); });
}

// --- attention maps ---------------------------------------------------------------------------------------

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

// sums[0, n) = sum_c f^p over `channels` rows channel_stride apart from f, channel after channel, for n
// positions in K vectors (the last one last_lanes wide), with the sums in registers.
template <int K, int kExponent, typename scalar_t>
void channel_power_sums(const scalar_t* f, int64_t channel_stride, int64_t channels, int64_t last_lanes,
                        const Vectorized<accumulation_t<scalar_t>>& exponent, accumulation_t<scalar_t>* sums) {
  using acc_t = accumulation_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t width = Vec::size();
  const auto lanes = [&](int k) { return k == K - 1 ? last_lanes : width; };
  Vec acc[K];
  for (int k = 0; k < K; ++k) acc[k] = Vec(acc_t(0));
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* row = f + c * channel_stride;
    for (int k = 0; k < K; ++k) {
      acc[k] += attention_power<VecMath<acc_t>, kExponent>(load_widened(row + k * width, lanes(k)), exponent);
    }
  }
  for (int k = 0; k < K; ++k) acc[k].store(sums + k * width, lanes(k));
}

// channel_power_sums<vectors> for 1 <= vectors <= kMapRegisterVectors.
template <int K = 1, int kExponent, typename scalar_t>
void channel_power_sums_of(int64_t vectors, const scalar_t* f, int64_t channel_stride, int64_t channels,
                           int64_t last_lanes, const Vectorized<accumulation_t<scalar_t>>& exponent,
                           accumulation_t<scalar_t>* sums) {
  if constexpr (K < kMapRegisterVectors) {
    if (vectors > K) {
      channel_power_sums_of<K + 1, kExponent>(vectors, f, channel_stride, channels, last_lanes, exponent, sums);
      return;
    }
  }
  channel_power_sums<K, kExponent>(f, channel_stride, channels, last_lanes, exponent, sums);
}

// a = mean_c(f^p): for positions innermost (NCHW), a tile of positions accumulates channel after channel in
// vectors across positions; for channels innermost (channels_last), each position sums its channels in vector
// lanes, added in lane order.
template <typename scalar_t, int kExponent>
void attention_map_typed(const at::Tensor& feature, double p, const at::Tensor& map) {
  using acc_t = accumulation_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using M = VecMath<acc_t>;
  constexpr int64_t width = Vec::size();
  const FeatureGeometry g = geometry(feature);
  const scalar_t* f = feature.const_data_ptr<scalar_t>();
  acc_t* out = map.mutable_data_ptr<acc_t>();
  const Vec exponent(static_cast<acc_t>(p));
  const acc_t channels = static_cast<acc_t>(g.channels);

  if (attention_positions_inner(feature)) {
    for_position_tiles(g, kPositionTile, [&](int64_t n, int64_t j0, int64_t j1) {
      acc_t sums[kPositionTile];
      const int64_t len = j1 - j0;
      const scalar_t* tile = f + n * g.batch_stride + j0;
      const int64_t vectors = (len + width - 1) / width;
      if (vectors <= kMapRegisterVectors) {
        // Few positions: in memory, each channel's update of their sums would wait on the last one's store.
        channel_power_sums_of<1, kExponent>(vectors, tile, g.channel_stride, g.channels,
                                            len - (vectors - 1) * width, exponent, sums);
      } else {
        // Many: the rows stream in order; the sums' store-to-load latency hides behind a row of vectors.
        std::fill(sums, sums + len, acc_t(0));
        for (int64_t c = 0; c < g.channels; ++c) {
          const scalar_t* x = tile + c * g.channel_stride;
          for (int64_t i = 0; i < len; i += width) {
            const int64_t lanes = std::min(width, len - i);
            (Vec::loadu(sums + i, lanes) + attention_power<M, kExponent>(load_widened(x + i, lanes), exponent))
                .store(sums + i, lanes);
          }
        }
      }
      for (int64_t i = 0; i < len; ++i) out[n * g.positions + j0 + i] = sums[i] / channels;
    });
  } else {
    for_position_tiles(g, kChannelsInnerTile, [&](int64_t n, int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* position = f + n * g.batch_stride + j * g.position_stride;
        Vec sum(acc_t(0));
        for (int64_t c = 0; c < g.channels; c += width) {
          const int64_t lanes = std::min(width, g.channels - c);
          sum += first_lanes(attention_power<M, kExponent>(load_widened(position + c, lanes), exponent), lanes);
        }
        out[n * g.positions + j] = lane_sum(sum) / channels;
      }
    });
  }
}

// d <grad_map, a> / d f = (grad_map / C) * p f^(p-1) (the mean's backward, then the power's, as autograd
// applies them); one read of the feature and one write of its gradient, in the feature's layout.
template <typename scalar_t, int kExponent>
void attention_map_backward_typed(const at::Tensor& feature, const at::Tensor& grad_map, double p,
                                  const at::Tensor& grad) {
  using acc_t = accumulation_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using M = VecMath<acc_t>;
  constexpr int64_t step = kPairWidth<acc_t>;
  const FeatureGeometry g = geometry(feature);
  const scalar_t* f = feature.const_data_ptr<scalar_t>();
  const acc_t* gm = grad_map.const_data_ptr<acc_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  const Vec exponent(static_cast<acc_t>(p));
  const acc_t channels = static_cast<acc_t>(g.channels);
  // n (<= step) elements of f's gradient from those at x and their factors grad_map / C.
  const auto pair_grad = [&](const scalar_t* x, const VectorPair<acc_t>& grad_mean, int64_t n, scalar_t* y) {
    const VectorPair<acc_t> v = load_pair(x, n);
    store_pair(y,
               {grad_mean.low * attention_power_grad<M, kExponent>(v.low, exponent),
                grad_mean.high * attention_power_grad<M, kExponent>(v.high, exponent)},
               n);
  };

  if (attention_positions_inner(feature)) {
    for_position_tiles(g, kPositionTile, [&](int64_t n, int64_t j0, int64_t j1) {
      const int64_t len = j1 - j0;
      // The factors of the tile's positions, repeated past its end: element e of a row (or of the run below)
      // takes its step factors from e % len on.
      acc_t grad_mean[kPositionTile + step];
      for (int64_t i = 0; i < len + step; ++i) grad_mean[i] = gm[n * g.positions + j0 + i % len] / channels;
      // A sample whose channel rows follow each other is one run of C * len elements, walked in full steps
      // however short its rows (a dense gradient: rows never overlap, so this means the whole sample).
      const bool one_run = g.channel_stride == len;
      const int64_t run = one_run ? g.channels * len : len;
      const int64_t step_phase = step % len;
      for (int64_t c = 0; c < (one_run ? 1 : g.channels); ++c) {
        const int64_t offset = n * g.batch_stride + c * g.channel_stride + j0;
        // A first step up to the gradient's next cache line: the steps after it store whole lines (a store
        // split over two lines costs twice).
        const auto misalignment = reinterpret_cast<uintptr_t>(out + offset) % kCacheLine;
        int64_t e = std::min<int64_t>(run, (kCacheLine - misalignment) % kCacheLine / sizeof(scalar_t));
        if (e > 0) pair_grad(f + offset, load_pair(grad_mean, e), e, out + offset);
        // Whole steps (their width known to the compiler), then the rest.
        int64_t phase = e % len;
        for (; e + step <= run; e += step) {
          pair_grad(f + offset + e, load_pair(grad_mean + phase, step), step, out + offset + e);
          phase += step_phase;
          if (phase >= len) phase -= len;
        }
        if (e < run) pair_grad(f + offset + e, load_pair(grad_mean + phase, run - e), run - e, out + offset + e);
      }
    });
  } else {
    for_position_tiles(g, kChannelsInnerTile, [&](int64_t n, int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const Vec grad_mean(gm[n * g.positions + j] / channels);
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

const FrskdCpuKernels kFrskdCpuKernels{&attention_map_kernel, &attention_map_backward_kernel,
                                       &attention_transfer_maps_kernel, &kd_kernel};

}  // namespace CPU_CAPABILITY
}  // namespace ofdkern
