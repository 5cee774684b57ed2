// CUDA kernel of the fused channel-wise alignment op: the tile pipeline of align_fused.h with cuBLAS GEMMs
// through ATen in the compute dtype (tensor cores for bfloat16/float16; for float32, TF32 exactly when torch's
// matmul precision allows it), and one elementwise kernel after each forward GEMM and after dH.
//
// Per tile: H = W1 X + b1 as one GEMM and the ReLU kernel (NaN stays NaN); Y = W2 H and the loss kernel (dY in
// place of Y, the teacher's gradient, per-block loss partials); dW2 += dY H^T and db2 += rows(dY) (accumulated
// in float32 for half precision); dH = W2^T dY and the ReLU-backward kernel; dW1 += dH X^T, db1 += rows(dH);
// d student = W1^T dH.
// The bias in H's GEMM rounds each half-precision pre-activation once, as the CPU pipeline, the Triton kernels
// and eager on CPU do, so that ReLU's mask is the exact one's (eager on CUDA adds a convolution's bias after
// cuDNN's rounding: twice). H is channel-major, so ATen copies the bias into it and the GEMM adds to that
// (cuBLASLt's bias epilogue would need H pixel-major): one more write and read of H than a bias added after.
// Determinism: cuBLAS and ATen's sums give the same bits run to run, the loss partials come from a grid that
// depends only on the device and the tile, and they are summed in a fixed order. No atomics, no host sync.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "align_fused.h"
#include "align_math.h"
#include "cuda_launch.cuh"

namespace ofdkern {
namespace {

// h = relu(h), elementwise.
template <typename gemm_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) relu_kernel(gemm_t* h, int64_t numel) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    h[i] = static_cast<gemm_t>(relu<ScalarMath<acc_t>>(static_cast<acc_t>(h[i])));
  }
}

// dh = relu'(h) dh, elementwise.
template <typename gemm_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) relu_backward_kernel(gemm_t* dh, const gemm_t* h, int64_t numel) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    dh[i] = static_cast<gemm_t>(
        relu_backward<ScalarMath<acc_t>>(static_cast<acc_t>(dh[i]), static_cast<acc_t>(h[i])));
  }
}

// Where the loss kernel finds the teacher tile: (samples, channels, positions) strides.
struct TeacherTile {
  int64_t sample_stride, channel_stride, position_stride;
};

// An index of the tile's Y buffer as three digits, fastest first: (position, sample, channel) for a
// channel-major buffer (channels, pixels), (channel, position, sample) for one with channels innermost
// (pixels, channels). The grid-stride loop advances it by additions and carries: no 64-bit division per
// element (a pixel's channel and sample are what the teacher's offset and the margin need).
struct TileDigits {
  int64_t d0, d1, d2;
};

struct TileRadix {
  int64_t r0, r1;    // the two faster digits' ranges (the slowest needs none: the loop bound stops it)
  TileDigits grid;   // the grid stride as digits, each below its range
};

inline TileRadix tile_radix(int64_t r0, int64_t r1, int64_t grid_stride) {
  return TileRadix{r0, r1, TileDigits{grid_stride % r0, (grid_stride / r0) % r1, grid_stride / (r0 * r1)}};
}

__device__ __forceinline__ TileDigits tile_digits(int64_t i, const TileRadix& radix) {
  const int64_t above = i / radix.r0;
  return TileDigits{i - above * radix.r0, above % radix.r1, above / radix.r1};
}

// digits += step (each of step's digits below its range, so one carry per digit suffices).
__device__ __forceinline__ void advance(TileDigits& digits, const TileDigits& step, const TileRadix& radix) {
  digits.d0 += step.d0;
  digits.d1 += step.d1;
  digits.d2 += step.d2;
  if (digits.d0 >= radix.r0) {
    digits.d0 -= radix.r0;
    ++digits.d1;
  }
  if (digits.d1 >= radix.r1) {
    digits.d1 -= radix.r1;
    ++digits.d2;
  }
}

// The loss pass over the tile's Y buffer, in its memory order: channel-major (channels, pixels) or channels
// innermost (pixels, channels). Adds the bias, turns y into d loss / d y, writes the teacher's gradient (same
// strides as the teacher), and one loss partial per block.
template <bool kOFD, bool kGradTeacher, typename gemm_t, typename teacher_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    align_loss_kernel(gemm_t* y, const teacher_t* t, teacher_t* d_t, const acc_t* bias, const acc_t* margin,
                      int64_t numel, bool channels_inner, TileRadix radix, TeacherTile tile, acc_t* partials) {
  using M = ScalarMath<acc_t>;
  acc_t sum = 0;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  TileDigits at = tile_digits(first, radix);
  for (int64_t i = first; i < numel; i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = channels_inner ? at.d0 : at.d2;
    const int64_t position = channels_inner ? at.d1 : at.d0;
    const int64_t sample = channels_inner ? at.d2 : at.d1;
    const int64_t offset = sample * tile.sample_stride + c * tile.channel_stride + position * tile.position_stride;
    const acc_t tv = static_cast<acc_t>(t[offset]);
    const acc_t m = kOFD ? margin[c] : acc_t(0);
    const auto point = align_point<kOFD, M>(static_cast<acc_t>(y[i]) + bias[c], tv, m);
    y[i] = static_cast<gemm_t>(point.d_student);
    if constexpr (kGradTeacher) {
      d_t[offset] = static_cast<teacher_t>(align_teacher_grad<kOFD, M>(point.d_student, tv, m));
    }
    sum += point.loss;
    advance(at, radix.grid, radix);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

template <typename Body>
void with_gemm_type(at::ScalarType dtype, Body body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "align_cuda", [&] { body(scalar_t{}); });
}

struct CudaDevice {
  // GEMMs in the compute dtype: the dtype eager's convolutions run in.
  static at::ScalarType gemm_dtype(at::ScalarType compute_dtype) { return compute_dtype; }
  // Large tiles for few launches, yet an eighth of what the buffers of every pixel would take (eager keeps
  // several of those for its backward): 8 to 256 MiB.
  static int64_t tile_pixels(int64_t pixels, int64_t bytes_per_pixel, int64_t) {
    return std::clamp(pixels * bytes_per_pixel / 8, int64_t{8} << 20, int64_t{256} << 20) / bytes_per_pixel;
  }
  // The caching allocator's blocks.
  static at::Tensor empty_like(const at::Tensor& feature) {
    return at::empty_strided(feature.sizes(), feature.strides(), feature.options());
  }
  static at::Tensor empty(int64_t numel, at::TensorOptions options) { return at::empty({numel}, options); }

  // sum += a b, accumulated in sum's (float32 or float64) dtype.
  static void add_product(const at::Tensor& sum, const at::Tensor& a, const at::Tensor& b) {
    if (a.scalar_type() == sum.scalar_type()) sum.addmm_(a, b);
    else sum.add_(at::mm(a, b, sum.scalar_type()));
  }

  static void add_channel_sums(const at::Tensor& sum, const at::Tensor& m) {
    sum.add_(at::sum(m, {1}, false, sum.scalar_type()));
  }

  static void run_tile(const AlignProblem& p, const AlignTile& tile) {
    const c10::DeviceIndex device = p.w1.device().index();
    TileBuffer x = p.x(tile), h = p.h(tile), y = p.y(tile);
    x.grid.copy_(as_grid(feature_tile(p.student, tile)));
    // H^T = X^T W1^T + b1: addmm adds the 1-D bias to every row of H^T (a pixel's hidden channels). In the GEMM
    // dtype, to which the bias converts exactly (the weights and biases come in one compute dtype).
    at::Tensor h_rows = h.matrix.t();
    at::addmm_out(h_rows, p.b1.to(p.w1.scalar_type()), x.matrix.t(), p.w1.t());
    const int64_t hidden_numel = h.matrix.numel();
    with_gemm_type(p.w1.scalar_type(), [&](auto zero) {
      using gemm_t = decltype(zero);
      using acc_t = accumulation_t<gemm_t>;
      relu_kernel<gemm_t, acc_t><<<grid_size(hidden_numel, device), kThreads, 0, stream()>>>(
          h.matrix.mutable_data_ptr<gemm_t>(), hidden_numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mm_out(y.matrix, p.w2, h.matrix);
      run_loss<gemm_t, acc_t>(p, tile, y);
      if (!p.backward()) return;
      if (p.grad_weights()) {
        add_product(p.d_w2, y.matrix, h.matrix.t());
        add_channel_sums(p.d_b2, y.matrix);
      }
      TileBuffer dh = p.dh(tile);
      at::mm_out(dh.matrix, p.w2.t(), y.matrix);
      relu_backward_kernel<gemm_t, acc_t><<<grid_size(hidden_numel, device), kThreads, 0, stream()>>>(
          dh.matrix.mutable_data_ptr<gemm_t>(), h.matrix.const_data_ptr<gemm_t>(), hidden_numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (p.grad_weights()) {
        add_product(p.d_w1, dh.matrix, x.matrix.t());
        add_channel_sums(p.d_b1, dh.matrix);
      }
      if (p.grad_student.merged.defined()) {
        at::mm_out(x.matrix, p.w1.t(), dh.matrix);  // x is done: d student takes its place
        as_grid(feature_tile(p.grad_student, tile)).copy_(x.grid);
      }
    });
  }

  template <typename gemm_t, typename acc_t>
  static void run_loss(const AlignProblem& p, const AlignTile& tile, const TileBuffer& y) {
    const at::Tensor t_tile = feature_tile(p.teacher, tile);
    const at::Tensor d_t_tile = p.grad_teacher.merged.defined() ? feature_tile(p.grad_teacher, tile) : at::Tensor();
    const int64_t channels = p.t_channels, numel = channels * tile.pixels();
    const int grid = grid_size(numel, p.w1.device().index());
    const at::Tensor partials = at::empty({grid}, p.loss.options());
    const TeacherTile where{t_tile.stride(0), t_tile.stride(1), t_tile.stride(2)};
    const int64_t grid_stride = int64_t{grid} * kThreads;
    const TileRadix radix = y.channels_inner ? tile_radix(channels, tile.positions, grid_stride)
                                             : tile_radix(tile.positions, tile.samples, grid_stride);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t_tile.scalar_type(), "align_loss_cuda", [&] {
      auto launch = [&](auto ofd, auto grad_teacher) {
        align_loss_kernel<decltype(ofd)::value, decltype(grad_teacher)::value, gemm_t, scalar_t, acc_t>
            <<<grid, kThreads, 0, stream()>>>(
                y.matrix.mutable_data_ptr<gemm_t>(), t_tile.const_data_ptr<scalar_t>(),
                grad_teacher ? d_t_tile.mutable_data_ptr<scalar_t>() : nullptr, p.b2.const_data_ptr<acc_t>(),
                ofd ? p.margin.const_data_ptr<acc_t>() : nullptr, numel, y.channels_inner, radix, where,
                partials.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      using yes = std::true_type;
      using no = std::false_type;
      const bool ofd = p.margin.defined(), grad_teacher = d_t_tile.defined();
      if (ofd) grad_teacher ? launch(yes{}, yes{}) : launch(yes{}, no{});
      else grad_teacher ? launch(no{}, yes{}) : launch(no{}, no{});
    });
    p.loss.add_(partials.sum());
  }
};

AlignOutputs align_fused_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1,
                              const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                              const std::optional<at::Tensor>& margin, bool grad_student, bool grad_teacher,
                              bool grad_weights) {
  const c10::cuda::CUDAGuard device_guard(student.device());
  return align_fused<CudaDevice>(student, teacher, w1, b1, w2, b2, margin, grad_student, grad_teacher,
                                 grad_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CUDA, m) { m.impl("align_fused", &align_fused_cuda); }

}  // namespace ofdkern
