// CPU kernel of the fused channel-wise alignment op: the tile pipeline of align_fused.h with GEMMs through ATen.
// The GEMMs run in the accumulation dtype, except bfloat16 ones on CPUs where bfloat16 GEMMs are the faster ones
// (bfloat16_gemms_faster_here; set_cpu_bfloat16_gemms overrides it): those run in bfloat16 (oneDNN, fp32 sums
// inside each GEMM, outputs rounded to bfloat16 as eager's convolutions do), with every elementwise pass in fp32
// (align_cpu.h: vectorized, per instruction set) and the weight gradients summed over the tiles in fp32.
//
// A tile's pixels are cut into column blocks (whole samples, or slices of one sample) of up to about
// kMinBlockColumns pixels (more at few channels, see kBlockBytes): an even number of nearly equal blocks where
// there is enough to cut, so that two threads share them evenly.
// The forward and the backward down to dH run block by block, each block's GEMMs followed at once by their
// elementwise pass while the block is in cache. Where the weights are small beside the tile, each block then
// computes its own partial sums of the weight gradients, added up in block order afterwards, and its d student:
// one parallel region per tile, of equal tasks (likewise when no weight gradient is asked). Elsewhere the weight
// gradients are GEMMs over all of the tile's pixels, cut into blocks of rows, and d student follows block by
// block: three parallel regions per tile.
//
// Determinism: the tiles and blocks are a function of the shapes only, every partial sum is combined in block
// order, and every GEMM is a single-threaded call on one block (multi-threaded GEMMs of small matrices change
// their bits with the thread count, and even a lone MKL or oneDNN call picks its blocking from torch's thread
// count unless pinned to one thread, see OneThreadGemm); so the loss and every gradient are bit-identical whatever
// torch.get_num_threads() is.
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <vector>

#include "align_cpu.h"
#include "align_fused.h"
#include "cpu_buffers.h"

#if AT_MKLDNN_ENABLED()
namespace at::native {
// oneDNN's matmul, result = beta result + alpha mat1 mat2 on strided operands; exported by libtorch_cpu but
// declared in a header (ATen/native/mkldnn/Matmul.h) that torch does not install.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native
#endif

namespace ofdkern {
namespace {

// A column block: at least kMinBlockColumns pixels, more where their X, H, Y and dH take less than kBlockBytes
// (a block's buffers stay in cache between a GEMM and its pass at few channels). Narrower GEMMs take MKL's
// unpacked kernels, and oneDNN's set-up per call adds up (forward + backward on a 2-core Intel Xeon, 64 columns
// and 64 weight-gradient rows -> 2048 and 256, with blocks in even numbers: 16x1024x7x7 -> 2048 fp32
// 175 -> 121 ms, bf16 65 -> 46 ms; 32x64x56x56 -> 256 fp32 293 -> 243 ms, bf16 108 -> 91 ms).
constexpr int64_t kBlockBytes = int64_t{1} << 20;
constexpr int64_t kMinBlockColumns = 2048;
// Tile buffers at least this many times the weights' bytes (CpuDevice::tile_pixels).
constexpr int64_t kTileWeightRatio = 16;
// Rows of a weight gradient per GEMM block.
constexpr int64_t kGemmRows = 256;

// Float GEMMs of at least this many multiply-adds go to oneDNN on CPUs other than Intel's: on one AMD EPYC core
// it runs them at about twice the speed of ATen's BLAS (200 against 95 GFLOP/s), but smaller ones lose to its
// set-up. On an Intel Xeon core MKL is the faster one (154-168 against 127-153 GFLOP/s), so it keeps them.
constexpr int64_t kOneDnnMinMacs = int64_t{1} << 21;

bool cpu_is_intel() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

// Whether bfloat16 GEMMs run in bfloat16 (oneDNN) by default, rather than in float32 on converted tiles: where
// they are the faster ones. Measured on one core (2048x1024 by 1024x784 and smaller, against the float32 GEMMs
// of the same shapes): an Intel Xeon with AMX 2.8-3.5x the float32 rate; an AMD EPYC with AVX512-BF16 about
// 2x; an Intel Xeon with AVX512-BF16 but no AMX (oneDNN's avx512_core_bf16 kernels) about half, 89-99 against
// MKL's 146-212 GFLOP/s. Without either, oneDNN emulates them.
bool bfloat16_gemms_faster_here() {
#if AT_MKLDNN_ENABLED() && (defined(__x86_64__) || defined(__i386__))
  if (!at::globalContext().userEnabledMkldnn()) return false;
  if (__builtin_cpu_supports("amx-bf16") && at::cpu::init_amx()) return true;
  return __builtin_cpu_supports("avx512bf16") && !cpu_is_intel();
#else
  return false;
#endif
}

// set_cpu_bfloat16_gemms: -1 follows bfloat16_gemms_faster_here(), 0 and 1 force float32 or bfloat16 GEMMs.
std::atomic<int64_t> bfloat16_gemms_mode{-1};

int64_t set_cpu_bfloat16_gemms(int64_t mode) {
  TORCH_CHECK_VALUE(mode >= -1 && mode <= 1, "set_cpu_bfloat16_gemms: mode must be -1, 0 or 1, got ", mode);
  return bfloat16_gemms_mode.exchange(mode);
}

bool bfloat16_gemms() {
  static const bool faster_here = bfloat16_gemms_faster_here();
  const int64_t mode = bfloat16_gemms_mode.load();
  return mode == -1 ? faster_here : mode == 1;
}

// MKL, when torch's BLAS is MKL (weak: absent otherwise).
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

// Inside a parallel region MKL and oneDNN run on one thread, but they pick their blocking (and oneDNN its split
// of a long sum) from the thread count they may use, torch.get_num_threads(). Pinned to one thread for the call,
// each GEMM is the same computation whatever that count is.
class OneThreadGemm {
 public:
  OneThreadGemm()
      : mkl_threads_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0), omp_threads_(omp_threads()) {
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
  }
  ~OneThreadGemm() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_threads_);
#ifdef _OPENMP
    omp_set_num_threads(omp_threads_);
#endif
  }

 private:
  static int omp_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }
  int mkl_threads_, omp_threads_;
};

// out = a b, or out += a b when accumulate; on one thread. bfloat16 operands go through at::mm / addmm_ to oneDNN.
void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const OneThreadGemm one_thread;
#if AT_MKLDNN_ENABLED()
  static const bool onednn_for_float = !cpu_is_intel();
  if (onednn_for_float && out.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn() &&
      a.size(0) * a.size(1) * b.size(1) >= kOneDnnMinMacs) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.f : 0.f, 1.f);
    return;
  }
#endif
  if (accumulate) out.addmm_(a, b);
  else at::mm_out(out, a, b);
}

// Runs block(b) for b in [0, blocks) inside a parallel region, so that every GEMM in it is single-threaded
// (MKL and oneDNN run sequentially inside an OpenMP region; with one torch thread they have one thread anyway).
// A lone block gets a region too: called outside one, they would thread it. Each thread takes the next block
// left when it is done with one, so a thread slowed down (on shared cores) holds the others up by at most a
// block; which thread runs a block changes no bit of it.
template <typename Block>
void in_parallel_region(int64_t blocks, Block block) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(std::min<int64_t>(blocks, at::get_num_threads()), 2);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t b = next++; b < blocks; b = next++) block(b);
  });
}

// Where [0, count) is cut into parts of at most about `most`: part b is [cuts[b], cuts[b + 1]), all of nearly
// one size. An odd number of parts is made even (where there is enough to cut), so that two threads get equal
// shares; like every block size here, a function of the shapes only.
std::vector<int64_t> even_cuts(int64_t count, int64_t most) {
  int64_t parts = (count + most - 1) / most;
  if (parts % 2 == 1 && parts < count) ++parts;
  std::vector<int64_t> cuts(parts + 1);
  for (int64_t b = 0; b <= parts; ++b) cuts[b] = b * count / parts;
  return cuts;
}

std::vector<TileColumns> column_blocks(const AlignProblem& p, const AlignTile& tile) {
  const int64_t bytes_per_pixel = (p.s_channels + 2 * p.hidden + p.t_channels) * p.w1.element_size();
  const int64_t columns = std::max(kMinBlockColumns, kBlockBytes / bytes_per_pixel);
  std::vector<TileColumns> blocks;
  if (tile.samples == 1 || columns < tile.positions) {  // slices of each sample
    const std::vector<int64_t> cuts = even_cuts(tile.positions, columns);
    for (int64_t i = 0; i < tile.samples; ++i)
      for (size_t b = 0; b + 1 < cuts.size(); ++b)
        blocks.push_back({{tile.n0 + i, 1, tile.p0 + cuts[b], cuts[b + 1] - cuts[b]},
                          i * tile.positions + cuts[b]});
  } else {  // whole samples, as many as fill a block
    const std::vector<int64_t> cuts = even_cuts(tile.samples, std::max<int64_t>(1, columns / tile.positions));
    for (size_t b = 0; b + 1 < cuts.size(); ++b)
      blocks.push_back({{tile.n0 + cuts[b], cuts[b + 1] - cuts[b], tile.p0, tile.positions},
                        cuts[b] * tile.positions});
  }
  return blocks;
}

// sum += a b (or sum = a b), sum in the accumulation dtype. A bfloat16 GEMM gives the product rounded once to
// bfloat16 (like eager's whole-batch weight gradient), added to the fp32 sum.
void add_product(const at::Tensor& sum, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == sum.scalar_type()) {
    gemm(sum, a, b, accumulate);
    return;
  }
  at::Tensor product = at::empty(sum.sizes(), a.options());
  gemm(product, a, b, false);
  if (accumulate) sum.add_(product);
  else sum.copy_(product);
}

// sum += a b in blocks of sum's rows, each one GEMM over every pixel of the tile.
struct RowBlocks {
  at::Tensor sum, a, b;
  int64_t count() const { return (sum.size(0) + kGemmRows - 1) / kGemmRows; }
  void run(int64_t block) const {
    const int64_t first = block * kGemmRows, rows = std::min(kGemmRows, sum.size(0) - first);
    add_product(sum.narrow(0, first, rows), a.narrow(0, first, rows), b, true);
  }
};

// A column block's partial sums of the gradients it computes: the biases' always, the weights' where the
// blocks take their share of them.
struct BlockSums {
  at::Tensor d_b2, d_b1, d_w2, d_w1;
};

// d student of one column block, from its dH (its X buffer is free by then).
void student_grad_block(const AlignProblem& p, const AlignTile& tile, const TileColumns& block) {
  TileBuffer x = columns_of(p.x(tile), block);
  gemm(x.matrix, p.w1.t(), columns_of(p.dh(tile), block).matrix, false);
  as_grid(feature_tile(p.grad_student, block.pixels)).copy_(x.grid);
}

// The work of one column block: the forward and the backward down to dH, its loss and bias-gradient partials;
// its weight-gradient partials where sums has them; its d student where with_student (no later GEMM reads X).
void block_work(const AlignProblem& p, const AlignTile& tile, const TileColumns& block, double& loss,
                const BlockSums& sums, bool with_student) {
  static const AlignCpuPasses& passes = kAlignCpuPasses_here();
  TileBuffer x = columns_of(p.x(tile), block), h = columns_of(p.h(tile), block), y = columns_of(p.y(tile), block);
  x.grid.copy_(as_grid(feature_tile(p.student, block.pixels)));
  // The bias goes in first and the GEMM adds W1 X to it in its own sums: each pre-activation is rounded once
  // (like eager's convolution with bias), so relu's mask is the exact one's even when H is stored in bf16.
  h.matrix.copy_(p.b1.unsqueeze(1).expand_as(h.matrix));
  gemm(h.matrix, p.w1, x.matrix, true);
  passes.relu(h.matrix);
  gemm(y.matrix, p.w2, h.matrix, false);
  loss = passes.loss(p, y, block, sums.d_b2);
  if (!p.backward()) return;
  TileBuffer dh = columns_of(p.dh(tile), block);
  gemm(dh.matrix, p.w2.t(), y.matrix, false);
  passes.relu_backward(dh.matrix, h.matrix, sums.d_b1);
  if (sums.d_w2.defined()) {
    add_product(sums.d_w2, y.matrix, h.matrix.t(), false);
    add_product(sums.d_w1, dh.matrix, x.matrix.t(), false);
  }
  if (with_student) student_grad_block(p, tile, block);
}

struct CpuDevice {
  static at::ScalarType gemm_dtype(at::ScalarType compute_dtype) {
    return compute_dtype == at::kBFloat16 && bfloat16_gemms() ? at::kBFloat16 : accumulation_dtype(compute_dtype);
  }
  // Tiles whose buffers stay in the last-level cache between a tile's parallel regions (4 MiB), or
  // larger where the weights are large (up to 32 MiB): every tile adds its weight-gradient products to the
  // sums, at a cost that grows with the weights and falls with the tile's pixels. At least four column blocks.
  static int64_t tile_pixels(int64_t, int64_t bytes_per_pixel, int64_t weight_bytes) {
    const int64_t bytes = std::clamp(kTileWeightRatio * weight_bytes, int64_t{4} << 20, int64_t{32} << 20);
    return std::max(4 * kMinBlockColumns, bytes / bytes_per_pixel);
  }
  // Cached huge-page blocks (cpu_buffers.h): fresh ones of this size fault in page by page, every call.
  static at::Tensor empty_like(const at::Tensor& feature) { return empty_like_hugepage(feature, feature.options()); }
  static at::Tensor empty(int64_t numel, at::TensorOptions options) { return empty_hugepage(numel, options); }

  static void run_tile(const AlignProblem& p, const AlignTile& tile) {
    const std::vector<TileColumns> blocks = column_blocks(p, tile);
    const int64_t count = static_cast<int64_t>(blocks.size());
    const bool weights = p.grad_weights();
    // The blocks take their share of the weight gradients where their partial sums are small beside the tile's
    // buffers (adding them up costs less than a pass over the buffers): no dW2 GEMM that outlasts the dW1 one
    // while a thread waits (at 64 -> 256 -> 256 channels four times as long), no further regions.
    const int64_t weight_numel = p.d_w2.defined() ? p.d_w2.numel() + p.d_w1.numel() : 0;
    const bool block_weights =
        weights && count * weight_numel <= tile.pixels() * (p.s_channels + 2 * p.hidden + p.t_channels);
    // Per block: its loss (exact in a double) and its gradient partial sums (db2, db1, then dW2 and dW1).
    std::vector<double> losses(count);
    const int64_t bias_numel = p.t_channels + p.hidden;
    at::Tensor parts;
    if (weights) {
      parts = at::empty({count, bias_numel + (block_weights ? weight_numel : 0)}, p.d_b1.options());
      parts.narrow(1, 0, bias_numel).zero_();
    }
    auto sums_of = [&](int64_t b) {
      if (!weights) return BlockSums{};
      const at::Tensor part = parts[b];
      BlockSums sums{part.narrow(0, 0, p.t_channels), part.narrow(0, p.t_channels, p.hidden), {}, {}};
      if (block_weights) {
        sums.d_w2 = part.narrow(0, bias_numel, p.d_w2.numel()).view(p.d_w2.sizes());
        sums.d_w1 = part.narrow(0, bias_numel + p.d_w2.numel(), p.d_w1.numel()).view(p.d_w1.sizes());
      }
      return sums;
    };
    // d student in the blocks' tasks, unless the tile's weight-gradient GEMMs read X after them.
    const bool student_in_blocks = p.grad_student.merged.defined() && (block_weights || !weights);
    in_parallel_region(count, [&](int64_t b) {
      block_work(p, tile, blocks[b], losses[b], sums_of(b), student_in_blocks);
    });
    AT_DISPATCH_FLOATING_TYPES(p.loss.scalar_type(), "align_tile_sums_cpu", [&] {
      // In block order, in the accumulation dtype.
      scalar_t tile_loss = 0;
      for (double loss : losses) tile_loss += static_cast<scalar_t>(loss);
      *p.loss.mutable_data_ptr<scalar_t>() += tile_loss;
      if (!weights) return;
      const scalar_t* first_part = parts.const_data_ptr<scalar_t>();
      scalar_t* d_b2 = p.d_b2.mutable_data_ptr<scalar_t>();
      scalar_t* d_b1 = p.d_b1.mutable_data_ptr<scalar_t>();
      for (int64_t b = 0; b < count; ++b) {
        const scalar_t* part = first_part + b * parts.size(1);
        for (int64_t c = 0; c < p.t_channels; ++c) d_b2[c] += part[c];
        for (int64_t c = 0; c < p.hidden; ++c) d_b1[c] += part[p.t_channels + c];
      }
    });
    if (block_weights) {
      for (int64_t b = 0; b < count; ++b) {
        const BlockSums sums = sums_of(b);
        p.d_w2.add_(sums.d_w2);
        p.d_w1.add_(sums.d_w1);
      }
    } else if (weights) {
      const TileBuffer x = p.x(tile), h = p.h(tile), y = p.y(tile), dh = p.dh(tile);
      const RowBlocks products[] = {{p.d_w2, y.matrix, h.matrix.t()}, {p.d_w1, dh.matrix, x.matrix.t()}};
      const int64_t first_of_second = products[0].count();
      in_parallel_region(first_of_second + products[1].count(), [&](int64_t b) {
        if (b < first_of_second) products[0].run(b);
        else products[1].run(b - first_of_second);
      });
    }
    if (p.grad_student.merged.defined() && !student_in_blocks)
      in_parallel_region(count, [&](int64_t b) { student_grad_block(p, tile, blocks[b]); });
  }
};

AlignOutputs align_fused_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1,
                             const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                             const std::optional<at::Tensor>& margin, bool grad_student, bool grad_teacher,
                             bool grad_weights) {
  return align_fused<CpuDevice>(student, teacher, w1, b1, w2, b2, margin, grad_student, grad_teacher,
                                grad_weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ofdkern, m) {
  m.def("set_cpu_bfloat16_gemms(int mode) -> int", &set_cpu_bfloat16_gemms);
}

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) { m.impl("align_fused", &align_fused_cpu); }

}  // namespace ofdkern
