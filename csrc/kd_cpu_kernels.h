// The KD CPU kernel (kd_cpu.h) on at::vec vectors of the instruction set CPU_CAPABILITY. Included by
// cpu_isa_<isa>.cpp, after cpu_isa_prelude.h and that file's #pragma GCC target; everything here is in the
// namespace ofdkern::CPU_CAPABILITY, so the variants stay apart.
//
// A row is split into blocks of kClassBlock classes. Pass 1 takes each block's max and sum of
// e = exp((v - max) / T) (two sweeps over the block, which stays in cache) and keeps the e; the blocks of a row
// are merged in block order; pass 2 turns the kept e into probabilities and writes each block's share of KL
// and its student gradient; the row's KL is the sum of the shares in block order; the teacher gradient, which
// needs that KL, is a pass 3. Two exps per class in all. With many rows (or rows of one block) a row is a task
// and its passes run back to back on one thread, its logits and e in that thread's cache; with few wide rows
// the blocks are the tasks, pass by pass. The blocks and every order of summation depend on the shape only, so
// neither the schedule nor the thread count changes a bit. Channel-wise distillation of channels_last maps
// (cwd_fused.h) runs the same row passes on groups of channels copied into rows.
#pragma once

#include "cpu_vec.h"
#include "kd_fused.h"
#include "kd_math.h"

namespace ofdkern {
namespace CPU_CAPABILITY {
namespace {

// Classes per KD block: both logit blocks (2 x 16 KiB in fp32) stay in L1/L2 between the sweeps of a pass.
constexpr int64_t kClassBlock = 4096;

// The maximum over the lanes, in lane order.
template <typename acc_t>
acc_t lane_max(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t result = lanes[0];
  for (acc_t lane : lanes) result = ScalarMath<acc_t>::max(result, lane);
  return result;
}

// Max and sum of e = exp((v - shift) / T) of n logits, writing each e to exps: the max first (the block is in
// cache), then one exp per class. The exp sweep also asks for the `ahead` bytes at `next` (the next block's
// logits) into L2, a line per vector: alone, the max sweep would wait on memory for every line of a block
// (a third of the whole pass at the Cityscapes shape), as the exps leave the memory bus idle.
template <typename acc_t>
SoftmaxStats<acc_t> softmax_stats(const acc_t* logits, int64_t n, acc_t inv_temperature, acc_t* exps,
                                  const char* next, int64_t ahead) {
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
  int64_t line = 0;
  for (i = 0; i < n; i += kWidth<acc_t>, line += kCacheLine) {
    if (line < ahead) __builtin_prefetch(next + line, 0, 2);
    const int64_t lanes = std::min(kWidth<acc_t>, n - i);
    const Vec e = kd_scaled(Vec::loadu(logits + i, lanes), shift, scale).exp();
    sum += first_lanes(e, lanes);
    e.store(exps + i, lanes);
  }
  for (; line < ahead; line += kCacheLine) __builtin_prefetch(next + line, 0, 2);
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

// The passes of the KD kernel over contiguous (rows, classes) logits, for any schedule: pass 1 (stats), pass 2
// (terms and student gradient) and pass 3 (teacher gradient) of block b of row r; e_s and e_t hold the row's e
// (indexed by class). Whatever thread runs them and in whatever schedule, they compute the same bits.
template <typename scalar_t>
class KDPasses {
  using acc_t = accumulation_t<scalar_t>;

 public:
  // gs, gt: the gradients, or nullptr when not asked for.
  KDPasses(const scalar_t* s, const scalar_t* t, scalar_t* gs, scalar_t* gt, int64_t rows, int64_t classes,
           double temperature)
      : s_(s), t_(t), gs_(gs), gt_(gt), rows_(rows), classes_(classes),
        blocks_((classes + kClassBlock - 1) / kClassBlock),
        temp_(static_cast<acc_t>(temperature)), inv_temp_(static_cast<acc_t>(1 / temperature)),
        // T^2 rounded once, as the reference's `* temperature ** 2`.
        temp_squared_(static_cast<acc_t>(temperature * temperature)) {}

  int64_t blocks() const { return blocks_; }
  bool teacher_grad() const { return gt_ != nullptr; }

  KDBlockStats<acc_t> stats(KDBuffers<scalar_t>& buf, int64_t r, int64_t b, acc_t* e_s, acc_t* e_t) const {
    const auto [offset, n, s, t] = block_logits(buf, r, b, true);
    const int64_t begin = b * kClassBlock, end = offset + n, ahead = bytes_after(end);
    const auto next = [end](const scalar_t* all) { return reinterpret_cast<const char*>(all + end); };
    return KDBlockStats<acc_t>{softmax_stats(s, n, inv_temp_, e_s + begin, next(s_), ahead),
                               softmax_stats(t, n, inv_temp_, e_t + begin, next(t_), ahead)};
  }

  KDRowOfBlocks<acc_t> row(const KDBlockStats<acc_t>* stats) const {
    return merged_row(stats, blocks_, temp_, inv_temp_);
  }

  // Returns the block's share of the row's KL.
  acc_t terms(KDBuffers<scalar_t>& buf, int64_t r, int64_t b, const acc_t* e_s, const acc_t* e_t,
              const KDBlockStats<acc_t>& stats, const KDRowOfBlocks<acc_t>& row) const {
    const auto [offset, n, s, t] = block_logits(buf, r, b, reload());
    const int64_t begin = b * kClassBlock;
    const auto block = kd_block(s, t, e_s + begin, e_t + begin, n, stats, row);
    const acc_t kl = kd_block_terms(block, row.row, gs_ ? buf.grad.data(gs_ + offset) : nullptr);
    if (gs_) buf.grad.store(gs_ + offset, n);
    return kl;
  }

  void teacher(KDBuffers<scalar_t>& buf, int64_t r, int64_t b, const acc_t* e_s, const acc_t* e_t,
               const KDBlockStats<acc_t>& stats, const KDRowOfBlocks<acc_t>& row, acc_t kl) const {
    const auto [offset, n, s, t] = block_logits(buf, r, b, reload());
    const int64_t begin = b * kClassBlock;
    kd_block_teacher_grad(kd_block(s, t, e_s + begin, e_t + begin, n, stats, row), row.row, kl,
                          buf.grad.data(gt_ + offset));
    buf.grad.store(gt_ + offset, n);
  }

  // The row's KL: its blocks' shares added in block order.
  acc_t row_kl(const acc_t* block_kl) const {
    acc_t kl = 0;
    for (int64_t b = 0; b < blocks_; ++b) kl += block_kl[b];
    return kl;
  }

  // A row's loss from its KL: KL * T^2.
  acc_t loss(acc_t kl) const { return kl * temp_squared_; }

  // Rows [first, last) one after the other on this thread, each row's passes back to back (its logits and e
  // in this thread's cache); row_loss[r - first] gets row r's loss.
  void run_rows(int64_t first, int64_t last, acc_t* row_loss) const {
    KDBuffers<scalar_t> buf;
    // Uninitialized: pass 1 writes every e before pass 2 reads it.
    const std::unique_ptr<acc_t[]> exps(new acc_t[2 * classes_]);
    acc_t* e_s = exps.get();
    acc_t* e_t = e_s + classes_;
    std::vector<KDBlockStats<acc_t>> block_stats(blocks_);
    std::vector<acc_t> block_kl(blocks_);
    for (int64_t r = first; r < last; ++r) {
      for (int64_t b = 0; b < blocks_; ++b) block_stats[b] = stats(buf, r, b, e_s, e_t);
      const KDRowOfBlocks<acc_t> merged = row(block_stats.data());
      for (int64_t b = 0; b < blocks_; ++b) block_kl[b] = terms(buf, r, b, e_s, e_t, block_stats[b], merged);
      const acc_t kl = row_kl(block_kl.data());
      row_loss[r - first] = loss(kl);
      if (gt_) {
        for (int64_t b = 0; b < blocks_; ++b) teacher(buf, r, b, e_s, e_t, block_stats[b], merged, kl);
      }
    }
  }

 private:
  // A row of one block keeps its logits in the thread's buffers from pass 1 to pass 3 (half precision is
  // widened once); the blocks of wider rows are loaded again in each pass.
  bool reload() const { return blocks_ > 1; }

  std::tuple<int64_t, int64_t, const acc_t*, const acc_t*> block_logits(KDBuffers<scalar_t>& buf, int64_t r,
                                                                        int64_t b, bool load) const {
    const int64_t begin = b * kClassBlock, n = std::min(kClassBlock, classes_ - begin);
    const int64_t offset = r * classes_ + begin;
    if (!load) return {offset, n, buf.student.loaded(s_ + offset), buf.teacher.loaded(t_ + offset)};
    return {offset, n, buf.student.load(s_ + offset, n), buf.teacher.load(t_ + offset, n)};
  }

  // The bytes of the next block's logits, which a block's pass 1 prefetches (rows are contiguous: the next
  // block may start the next row).
  int64_t bytes_after(int64_t end) const {
    return (std::min(end + kClassBlock, rows_ * classes_) - end) * int64_t{sizeof(scalar_t)};
  }

  const scalar_t *s_, *t_;
  scalar_t *gs_, *gt_;
  int64_t rows_, classes_, blocks_;
  acc_t temp_, inv_temp_, temp_squared_;
};

template <typename scalar_t>
scalar_t* gradient_data(const at::Tensor& gradient) {
  return gradient.numel() ? gradient.mutable_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
void kd_typed(const at::Tensor& student, const at::Tensor& teacher, double temperature, const KDOutputs& outputs) {
  using acc_t = accumulation_t<scalar_t>;
  const int64_t rows = student.size(0), classes = student.size(1);
  const KDPasses<scalar_t> passes(student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
                                  gradient_data<scalar_t>(std::get<1>(outputs)),
                                  gradient_data<scalar_t>(std::get<2>(outputs)), rows, classes, temperature);
  const int64_t blocks = passes.blocks();
  acc_t* row_loss = std::get<0>(outputs).mutable_data_ptr<acc_t>();

  if (blocks == 1 || rows >= kRowTasksPerThread * at::get_num_threads()) {
    const int64_t grain = std::max<int64_t>(1, kClassBlock / classes);
    at::parallel_for(0, rows, grain,
                     [&](int64_t first, int64_t last) { passes.run_rows(first, last, row_loss + first); });
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
      stats[g * blocks + b] = passes.stats(buf, first_row + g, b, e_s, e_t);
    });
    for (int64_t g = 0; g < count; ++g) row_of_blocks[g] = passes.row(&stats[g * blocks]);
    for_each_block([&](KDBuffers<scalar_t>& buf, int64_t g, int64_t b, acc_t* e_s, acc_t* e_t) {
      block_kl[g * blocks + b] =
          passes.terms(buf, first_row + g, b, e_s, e_t, stats[g * blocks + b], row_of_blocks[g]);
    });
    for (int64_t g = 0; g < count; ++g) {
      row_kl[g] = passes.row_kl(&block_kl[g * blocks]);
      row_loss[first_row + g] = passes.loss(row_kl[g]);
    }
    if (passes.teacher_grad()) {
      for_each_block([&](KDBuffers<scalar_t>& buf, int64_t g, int64_t b, acc_t* e_s, acc_t* e_t) {
        passes.teacher(buf, first_row + g, b, e_s, e_t, stats[g * blocks + b], row_of_blocks[g], row_kl[g]);
      });
    }
  }
}

void kd_kernel(const at::Tensor& student, const at::Tensor& teacher, double temperature, const KDOutputs& outputs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fused_cpu",
                                  [&] { kd_typed<scalar_t>(student, teacher, temperature, outputs); });
}

// Channels per task of the channels_last CWD kernel: a task copies that many channels' maps of one sample into
// rows (a 64-byte line of float32 channels per position) and runs the row passes on them. Also the side of
// the blocks those copies transpose (at::vec's AVX-512 block).
constexpr int64_t kChannelGroup = 16;

// Tiles of positions ahead whose lines the copies below prefetch: each position's channels are a line (or two)
// of their own, kChannelGroup of them per tile, a stride the hardware prefetcher follows too late.
constexpr int64_t kTilesAhead = 2;

// Asks for the lines of `count` channels at the positions kTilesAhead tiles after p0 (for writing: kWrite, a
// template argument as __builtin_prefetch needs a constant).
template <bool kWrite, typename scalar_t>
OFDKERN_INLINE_VEC void prefetch_tile_ahead(const scalar_t* maps, int64_t channels, int64_t positions,
                                            int64_t count, int64_t p0) {
  const int64_t first = p0 + kTilesAhead * kChannelGroup;
  const int64_t last = std::min(first + kChannelGroup, positions);
  for (int64_t p = first; p < last; ++p) {
    const scalar_t* position = maps + p * channels;
    __builtin_prefetch(position, kWrite, 3);
    __builtin_prefetch(position + count - 1, kWrite, 3);
  }
}

// The maps of `count` (<= kChannelGroup) channels of one sample of channels_last maps (position p of channel c
// at maps[p * channels + c]) as contiguous rows of the accumulation type, kChannelGroup positions at a time
// through at::vec's block transpose (half precision widened first, exactly).
template <typename scalar_t>
void gather_channel_rows(const scalar_t* maps, int64_t channels, int64_t positions, int64_t count,
                         accumulation_t<scalar_t>* rows) {
  using acc_t = accumulation_t<scalar_t>;
  for (int64_t p0 = 0; p0 < positions; p0 += kChannelGroup) {
    const int tile_positions = static_cast<int>(std::min(kChannelGroup, positions - p0));
    prefetch_tile_ahead<false>(maps, channels, positions, count, p0);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      at::vec::transpose_mxn<acc_t>(maps + p0 * channels, channels, rows + p0, positions, tile_positions,
                                    static_cast<int>(count));
    } else {
      acc_t tile[kChannelGroup * kChannelGroup];
      for (int i = 0; i < tile_positions; ++i) widen(maps + (p0 + i) * channels, count, tile + i * kChannelGroup);
      at::vec::transpose_mxn<acc_t>(tile, kChannelGroup, rows + p0, positions, tile_positions,
                                    static_cast<int>(count));
    }
  }
}

// The inverse of gather_channel_rows, rounding each element to scalar_t once (as narrow does on NCHW rows).
template <typename scalar_t>
void scatter_channel_rows(const accumulation_t<scalar_t>* rows, int64_t channels, int64_t positions, int64_t count,
                          scalar_t* maps) {
  using acc_t = accumulation_t<scalar_t>;
  for (int64_t p0 = 0; p0 < positions; p0 += kChannelGroup) {
    const int tile_positions = static_cast<int>(std::min(kChannelGroup, positions - p0));
    prefetch_tile_ahead<true>(maps, channels, positions, count, p0);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      at::vec::transpose_mxn<acc_t>(rows + p0, positions, maps + p0 * channels, channels, static_cast<int>(count),
                                    tile_positions);
    } else {
      acc_t tile[kChannelGroup * kChannelGroup];
      at::vec::transpose_mxn<acc_t>(rows + p0, positions, tile, kChannelGroup, static_cast<int>(count),
                                    tile_positions);
      for (int i = 0; i < tile_positions; ++i) narrow(tile + i * kChannelGroup, count, maps + (p0 + i) * channels);
    }
  }
}

// CWD of channels_last maps: each task copies a group of channels of one sample into rows of the accumulation
// type and runs the KD row passes on them, then copies the gradient rows back. The rows hold the values the KD
// kernel widens an NCHW map's rows to, and the gradient is rounded once, as there: the same bits as kd on the
// NCHW rows, without the transposing copies of whole maps (at 2x256x100x152, torch's contiguous() of each map
// takes longer than the whole fused pass).
template <typename scalar_t>
void cwd_channels_last_typed(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                             const KDOutputs& outputs) {
  using acc_t = accumulation_t<scalar_t>;
  const int64_t batch = student.size(0), channels = student.size(1);
  const int64_t positions = student.numel() / (batch * channels);
  const int64_t groups = (channels + kChannelGroup - 1) / kChannelGroup;
  const scalar_t* s_all = student.const_data_ptr<scalar_t>();
  const scalar_t* t_all = teacher.const_data_ptr<scalar_t>();
  scalar_t* gs_all = gradient_data<scalar_t>(std::get<1>(outputs));
  scalar_t* gt_all = gradient_data<scalar_t>(std::get<2>(outputs));
  acc_t* row_loss = std::get<0>(outputs).mutable_data_ptr<acc_t>();
  const int64_t tile = kChannelGroup * positions;
  const int64_t tiles = 2 + (gs_all != nullptr) + (gt_all != nullptr);
  const auto acc_options = std::get<0>(outputs).options();
  at::parallel_for(0, batch * groups, 1, [&](int64_t first, int64_t last) {
    // Cached huge-page blocks: a fresh scratch of this size would fault in page by page on every call.
    const at::Tensor scratch = empty_hugepage(tiles * tile, acc_options);
    acc_t* s_rows = scratch.mutable_data_ptr<acc_t>();
    acc_t* t_rows = s_rows + tile;
    acc_t* gs_rows = gs_all ? t_rows + tile : nullptr;
    acc_t* gt_rows = gt_all ? t_rows + (tiles - 2) * tile : nullptr;
    for (int64_t task = first; task < last; ++task) {
      const int64_t n = task / groups, c0 = task % groups * kChannelGroup;
      const int64_t count = std::min(kChannelGroup, channels - c0);
      const int64_t offset = n * positions * channels + c0;
      gather_channel_rows(s_all + offset, channels, positions, count, s_rows);
      gather_channel_rows(t_all + offset, channels, positions, count, t_rows);
      KDPasses<acc_t>(s_rows, t_rows, gs_rows, gt_rows, count, positions, temperature)
          .run_rows(0, count, row_loss + n * channels + c0);
      if (gs_all) scatter_channel_rows(gs_rows, channels, positions, count, gs_all + offset);
      if (gt_all) scatter_channel_rows(gt_rows, channels, positions, count, gt_all + offset);
    }
  });
}

void cwd_channels_last_kernel(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                              const KDOutputs& outputs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "cwd_channels_last_cpu",
                                  [&] { cwd_channels_last_typed<scalar_t>(student, teacher, temperature, outputs); });
}

}  // namespace

const KDCpuKernels kKDCpuKernels{&kd_kernel, &cwd_channels_last_kernel};

}  // namespace CPU_CAPABILITY
}  // namespace ofdkern
