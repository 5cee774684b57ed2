// CPU kernel of the fused channel-wise alignment op: the tile pipeline of align_fused.h with MKL/oneDNN GEMMs
// through ATen in the accumulation dtype (half-precision tiles are converted on the way in and out), and
// elementwise passes that each read and write a tile once.
//
// Determinism: the tiles run in a fixed order, each pass splits its work into fixed pieces whose partial sums
// are combined in a fixed order, and every GEMM is split into fixed blocks, each one a single-threaded BLAS call
// (MKL's multi-threaded GEMMs of small matrices change their bits with the thread count); so the loss and every
// gradient are bit-identical whatever torch.get_num_threads() is.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "align_fused.h"
#include "align_math.h"

namespace ofdkern {
namespace {

// Independent accumulators per loop: breaks the add dependency chain so the loops vectorize.
constexpr int kLanes = 16;
// Pixels per piece of a channels-innermost loss pass, and channels per piece of its channel sums.
constexpr int64_t kPixelsPerPiece = 64;
constexpr int64_t kChannelsPerPiece = 64;
// The GEMM blocks: columns (pixels) of a product, rows of a sum over pixels.
constexpr int64_t kGemmColumns = 256;
constexpr int64_t kGemmRows = 64;

// Runs block(b) for b in [0, blocks) inside a parallel region, so that every BLAS call in it is single-threaded
// (MKL runs sequentially inside an OpenMP region; with one torch thread it has one thread anyway). A lone block
// gets a region too: called outside one, MKL would thread it.
template <typename Block>
void in_parallel_region(int64_t blocks, Block block) {
  at::parallel_for(0, std::max<int64_t>(blocks, 2), 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < std::min(last, blocks); ++b) block(b);
  });
}

template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, F term) {
  std::array<acc_t, kLanes> lanes{};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += term(k + lane);
  for (; k < n; ++k) lanes[k % kLanes] += term(k);
  acc_t total = 0;
  for (acc_t lane : lanes) total += lane;
  return total;
}

// n elements of the projection y (W2 H, bias not yet added) against the teacher t: adds the bias, turns y into
// d loss / d y, writes the teacher's gradient when asked, returns the loss. kStep 0: one channel for the whole
// run (bias and margin are scalars); kStep 1: one channel per element (they are vectors).
template <bool kOFD, bool kGradTeacher, int kStep, typename acc_t, typename teacher_t>
inline acc_t loss_run(acc_t* y, const teacher_t* t, teacher_t* d_t, int64_t n, const acc_t* bias,
                      const acc_t* margin) {
  return lane_sum<acc_t>(n, [&](int64_t k) {
    const acc_t tv = static_cast<acc_t>(t[k]);
    const acc_t m = kOFD ? margin[k * kStep] : acc_t(0);
    const auto point = align_point<kOFD>(y[k] + bias[k * kStep], tv, m);
    y[k] = point.d_student;
    if constexpr (kGradTeacher) d_t[k] = static_cast<teacher_t>(align_teacher_grad<kOFD>(point.d_student, tv, m));
    return point.loss;
  });
}

template <bool kOFD, bool kGradTeacher, typename acc_t, typename teacher_t>
acc_t loss_tile(const LossPass& pass) {
  acc_t* y = pass.y.matrix.mutable_data_ptr<acc_t>();
  const teacher_t* t = pass.teacher.const_data_ptr<teacher_t>();
  teacher_t* d_t = kGradTeacher ? pass.grad_teacher.mutable_data_ptr<teacher_t>() : nullptr;
  const acc_t* bias = pass.bias.const_data_ptr<acc_t>();
  const acc_t* margin = kOFD ? pass.margin.const_data_ptr<acc_t>() : nullptr;
  const int64_t samples = pass.teacher.size(0), channels = pass.teacher.size(1), positions = pass.teacher.size(2);
  const int64_t pixels = samples * positions;
  const int64_t sample_stride = pass.teacher.stride(0), channel_stride = pass.teacher.stride(1);
  std::vector<acc_t> partials;
  if (!pass.y.channels_inner) {
    // Rows of one channel and sample: y[c, i, :] against t[i, c, :], both contiguous.
    partials.resize(channels * samples);
    at::parallel_for(0, channels * samples, 1, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t c = r / samples, i = r % samples;
        const int64_t t_offset = i * sample_stride + c * channel_stride;
        partials[r] = loss_run<kOFD, kGradTeacher, 0>(y + c * pixels + i * positions, t + t_offset,
                                                      kGradTeacher ? d_t + t_offset : nullptr, positions,
                                                      bias + c, kOFD ? margin + c : nullptr);
      }
    });
  } else {
    // Channels innermost: the tile (whole samples, or one sample's slice) is one contiguous block of pixels
    // in both y and t; pieces of pixels, each pixel one run over its channels.
    TORCH_INTERNAL_ASSERT(channel_stride == 1 && (samples == 1 || sample_stride == pixels / samples * channels));
    const int64_t pieces = (pixels + kPixelsPerPiece - 1) / kPixelsPerPiece;
    partials.resize(pieces);
    at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
      for (int64_t piece = first; piece < last; ++piece) {
        acc_t sum = 0;
        for (int64_t q = piece * kPixelsPerPiece; q < std::min(pixels, (piece + 1) * kPixelsPerPiece); ++q) {
          sum += loss_run<kOFD, kGradTeacher, 1>(y + q * channels, t + q * channels,
                                                 kGradTeacher ? d_t + q * channels : nullptr, channels, bias,
                                                 margin);
        }
        partials[piece] = sum;
      }
    });
  }
  acc_t total = 0;
  for (acc_t partial : partials) total += partial;
  return total;
}

// Calls body(acc_t) with the buffers' dtype (the accumulation dtype: float or double).
template <typename Body>
void dispatch_accumulation(const at::Tensor& buffer, Body body) {
  if (buffer.scalar_type() == at::kDouble) body(double{});
  else body(float{});
}

struct CpuAlignPasses {
  static at::ScalarType gemm_dtype(at::ScalarType compute_dtype) { return accumulation_dtype(compute_dtype); }
  // Tile buffers of 8 MiB: GEMMs of hundreds to thousands of pixels, and the tile mostly in the last cache.
  static constexpr int64_t kTileBytes = int64_t{8} << 20;

  static void bias_relu(const at::Tensor& h, const at::Tensor& bias) {
    dispatch_accumulation(h, [&](auto zero) {
      using acc_t = decltype(zero);
      acc_t* data = h.mutable_data_ptr<acc_t>();
      const acc_t* b = bias.const_data_ptr<acc_t>();
      const int64_t pixels = h.size(1);
      at::parallel_for(0, h.size(0), 1, [&](int64_t first, int64_t last) {
        for (int64_t c = first; c < last; ++c) {
          acc_t* row = data + c * pixels;
          for (int64_t j = 0; j < pixels; ++j) row[j] = relu(row[j] + b[c]);
        }
      });
    });
  }

  static void loss(const LossPass& pass) {
    dispatch_accumulation(pass.y.matrix, [&](auto zero) {
      using acc_t = decltype(zero);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pass.teacher.scalar_type(), "align_loss_cpu", [&] {
        const bool ofd = pass.margin.defined(), grad_teacher = pass.grad_teacher.defined();
        acc_t total;
        if (ofd) total = grad_teacher ? loss_tile<true, true, acc_t, scalar_t>(pass)
                                      : loss_tile<true, false, acc_t, scalar_t>(pass);
        else total = grad_teacher ? loss_tile<false, true, acc_t, scalar_t>(pass)
                                  : loss_tile<false, false, acc_t, scalar_t>(pass);
        *pass.loss.mutable_data_ptr<acc_t>() += total;
      });
    });
  }

  static void relu_backward(const at::Tensor& dh, const at::Tensor& h) {
    dispatch_accumulation(h, [&](auto zero) {
      using acc_t = decltype(zero);
      acc_t* grad = dh.mutable_data_ptr<acc_t>();
      const acc_t* activation = h.const_data_ptr<acc_t>();
      at::parallel_for(0, h.numel(), 1 << 14, [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) grad[i] = ofdkern::relu_backward(grad[i], activation[i]);
      });
    });
  }

  static void product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    const int64_t columns = out.size(1);
    in_parallel_region((columns + kGemmColumns - 1) / kGemmColumns, [&](int64_t block) {
      const int64_t first = block * kGemmColumns, width = std::min(kGemmColumns, columns - first);
      at::Tensor out_block = out.narrow(1, first, width);
      at::mm_out(out_block, a, b.narrow(1, first, width));
    });
  }

  static void add_product(at::Tensor& sum, const at::Tensor& a, const at::Tensor& b) {
    const int64_t rows = sum.size(0);
    in_parallel_region((rows + kGemmRows - 1) / kGemmRows, [&](int64_t block) {
      const int64_t first = block * kGemmRows, height = std::min(kGemmRows, rows - first);
      sum.narrow(0, first, height).addmm_(a.narrow(0, first, height), b);
    });
  }

  static void add_channel_sums(at::Tensor& sum, const TileBuffer& m) {
    dispatch_accumulation(m.matrix, [&](auto zero) {
      using acc_t = decltype(zero);
      const acc_t* data = m.matrix.const_data_ptr<acc_t>();
      acc_t* out = sum.mutable_data_ptr<acc_t>();
      const int64_t channels = m.matrix.size(0), pixels = m.matrix.size(1);
      if (!m.channels_inner) {
        at::parallel_for(0, channels, 1, [&](int64_t first, int64_t last) {
          for (int64_t c = first; c < last; ++c) {
            const acc_t* row = data + c * pixels;
            out[c] += lane_sum<acc_t>(pixels, [&](int64_t j) { return row[j]; });
          }
        });
        return;
      }
      // Channels innermost: each piece of channels sums its columns over every pixel, in pixel order.
      const int64_t pieces = (channels + kChannelsPerPiece - 1) / kChannelsPerPiece;
      at::parallel_for(0, pieces, 1, [&](int64_t first, int64_t last) {
        for (int64_t piece = first; piece < last; ++piece) {
          const int64_t c0 = piece * kChannelsPerPiece, c1 = std::min(channels, c0 + kChannelsPerPiece);
          std::array<acc_t, kChannelsPerPiece> column{};
          for (int64_t q = 0; q < pixels; ++q)
            for (int64_t c = c0; c < c1; ++c) column[c - c0] += data[q * channels + c];
          for (int64_t c = c0; c < c1; ++c) out[c] += column[c - c0];
        }
      });
    });
  }
};

AlignOutputs align_fused_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1,
                             const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                             const std::optional<at::Tensor>& margin, bool grad_student, bool grad_teacher,
                             bool grad_weights) {
  return align_fused<CpuAlignPasses>(student, teacher, w1, b1, w2, b2, margin, grad_student, grad_teacher,
                                     grad_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) { m.impl("align_fused", &align_fused_cpu); }

}  // namespace ofdkern
