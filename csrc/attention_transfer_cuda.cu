// CUDA kernels of the fused attention-transfer ops (contract in attention_transfer_fused.h, per-element math in
// attention_transfer_math.h).
//
// Determinism: grids and per-thread work depend on the shapes only; every thread sums its elements in a fixed
// order and every block reduces its threads in a fixed tree (block_reduce), so results are bit-identical run to
// run. No atomics, no host sync.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "attention_transfer_fused.h"
#include "attention_transfer_math.h"
#include "cuda_launch.cuh"

namespace ofdkern {
namespace {

// A thread sums its channels in leaves of kChannelLeaf, in order, in the accumulation type, and adds the leaves'
// sums in float64, the maps' dtype (attention_transfer_fused.h).
constexpr int kChannelLeaf = 8;

// sum of f^p over channels first, first + step, ... below `channels` of one position, in leaves.
template <int kExponent, typename scalar_t>
__device__ double strided_channel_power_sum(const scalar_t* position, int64_t channel_stride, int64_t first,
                                            int64_t step, int64_t channels, accumulation_t<scalar_t> p) {
  using acc_t = accumulation_t<scalar_t>;
  using M = ScalarMath<acc_t>;
  double total = 0;
  const int64_t leaf_span = step * kChannelLeaf;
  for (int64_t leaf_first = first; leaf_first < channels; leaf_first += leaf_span) {
    acc_t leaf = 0;
    const int64_t leaf_end = leaf_first + leaf_span < channels ? leaf_first + leaf_span : channels;
    for (int64_t c = leaf_first; c < leaf_end; c += step)
      leaf += attention_power<M, kExponent>(static_cast<acc_t>(position[c * channel_stride]), p);
    total += leaf;
  }
  return total;
}

// Positions innermost: a block is 32 consecutive positions (coalesced) x 8 channel groups; group k sums the
// channels k, k + 8, ... (strided_channel_power_sum), and the groups are added in a fixed tree.
constexpr int kPositionLanes = 32;
constexpr int kChannelGroups = kThreads / kPositionLanes;

template <typename scalar_t, int kExponent>
__global__ void __launch_bounds__(kThreads)
    attention_map_positions_kernel(const scalar_t* feature, FeatureGeometry g, accumulation_t<scalar_t> p,
                                   double* map, int64_t tiles) {
  __shared__ double group_sums[kChannelGroups][kPositionLanes];
  const int64_t n = blockIdx.x / tiles;
  const int64_t j = (blockIdx.x % tiles) * kPositionLanes + threadIdx.x;
  double sum = 0;
  if (j < g.positions) {
    const scalar_t* position = feature + n * g.batch_stride + j * g.position_stride;
    sum = strided_channel_power_sum<kExponent>(position, g.channel_stride, threadIdx.y, kChannelGroups, g.channels,
                                               p);
  }
  group_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < g.positions) {
    double level[kChannelGroups];
#pragma unroll
    for (int k = 0; k < kChannelGroups; ++k) level[k] = group_sums[k][threadIdx.x];
#pragma unroll
    for (int width = kChannelGroups / 2; width > 0; width /= 2) {
#pragma unroll
      for (int k = 0; k < width; ++k) level[k] += level[k + width];
    }
    map[n * g.positions + j] = level[0] / static_cast<double>(g.channels);
  }
}

// Channels innermost: a warp per position, its lanes over the (coalesced) channels (strided_channel_power_sum),
// added in a fixed tree.
template <typename scalar_t, int kExponent>
__global__ void __launch_bounds__(kThreads)
    attention_map_channels_kernel(const scalar_t* feature, FeatureGeometry g, accumulation_t<scalar_t> p,
                                  double* map) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (q >= g.batch * g.positions) return;  // whole warps leave: the shuffles below stay full-warp
  const int64_t n = q / g.positions, j = q % g.positions;
  const scalar_t* position = feature + n * g.batch_stride + j * g.position_stride;
  double sum = strided_channel_power_sum<kExponent>(position, g.channel_stride, lane, kWarpSize, g.channels, p);
  sum = warp_reduce(sum, SumOp{});
  if (lane == 0) map[q] = sum / static_cast<double>(g.channels);
}

at::Tensor attention_map_cuda(const at::Tensor& feature_in, double p) {
  at::Tensor map = allocate_attention_map(feature_in, p);
  if (map.numel() == 0) return map;
  const c10::cuda::CUDAGuard device_guard(feature_in.device());
  const at::Tensor feature = attention_walkable(feature_in);
  const FeatureGeometry g = geometry(feature);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool positions_inner = attention_positions_inner(feature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature.scalar_type(), "attention_map_cuda", [&] {
    using acc_t = accumulation_t<scalar_t>;
    const scalar_t* f = feature.const_data_ptr<scalar_t>();
    double* out = map.mutable_data_ptr<double>();
    with_attention_exponent(p, [&](auto kind) {
      constexpr int kExponent = decltype(kind)::value;
      if (positions_inner) {
        const int64_t tiles = (g.positions + kPositionLanes - 1) / kPositionLanes;
        attention_map_positions_kernel<scalar_t, kExponent>
            <<<grid_of(g.batch * tiles), dim3(kPositionLanes, kChannelGroups), 0, stream>>>(
                f, g, static_cast<acc_t>(p), out, tiles);
      } else {
        attention_map_channels_kernel<scalar_t, kExponent>
            <<<grid_of((g.batch * g.positions + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
                f, g, static_cast<acc_t>(p), out);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return map;
}

// d <grad_map, a> / d f = (grad_map / C) * p f^(p-1): one read of the feature and one write of its gradient.
// A block is 32 consecutive elements of the innermost dim (positions or channels) x 8 rows of the other two.
template <typename scalar_t, int kExponent, bool kChannelsInner>
__global__ void __launch_bounds__(kThreads)
    attention_map_backward_kernel(const scalar_t* feature, FeatureGeometry g, FeatureGeometry out_g,
                                  const double* grad_map, accumulation_t<scalar_t> p, scalar_t* grad) {
  using acc_t = accumulation_t<scalar_t>;
  using M = ScalarMath<acc_t>;
  const int64_t inner = kChannelsInner ? g.channels : g.positions;
  const int64_t outer = kChannelsInner ? g.positions : g.channels;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= g.batch * outer) return;
  const int64_t n = row / outer, o = row % outer;
  const double channels = static_cast<double>(g.channels);
  for (int64_t i = threadIdx.x; i < inner; i += blockDim.x) {
    const int64_t c = kChannelsInner ? i : o, j = kChannelsInner ? o : i;
    const acc_t x = static_cast<acc_t>(feature[n * g.batch_stride + c * g.channel_stride + j * g.position_stride]);
    // The mean's backward (g / C, rounded once to acc_t), then the power's, as autograd applies them.
    const acc_t value =
        static_cast<acc_t>(grad_map[n * g.positions + j] / channels) * attention_power_grad<M, kExponent>(x, p);
    grad[n * out_g.batch_stride + c * out_g.channel_stride + j * out_g.position_stride] = static_cast<scalar_t>(value);
  }
}

at::Tensor attention_map_backward_cuda(const at::Tensor& feature_in, const at::Tensor& grad_map, double p) {
  at::Tensor grad = allocate_attention_feature_grad(feature_in, grad_map, p);
  if (grad.numel() == 0) return grad;
  const c10::cuda::CUDAGuard device_guard(feature_in.device());
  const at::Tensor feature = attention_walkable(feature_in);
  const FeatureGeometry g = geometry(feature), out_g = geometry(grad);
  const bool channels_inner = !attention_positions_inner(feature);
  const int64_t rows = g.batch * (channels_inner ? g.positions : g.channels);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature.scalar_type(), "attention_map_backward_cuda", [&] {
    using acc_t = accumulation_t<scalar_t>;
    with_attention_exponent(p, [&](auto kind) {
      with_flag(channels_inner, [&](auto layout) {
        attention_map_backward_kernel<scalar_t, decltype(kind)::value, decltype(layout)::value>
            <<<grid_of((rows + kChannelGroups - 1) / kChannelGroups), dim3(kPositionLanes, kChannelGroups), 0,
               stream>>>(feature.const_data_ptr<scalar_t>(), g, out_g, grad_map.const_data_ptr<double>(),
                         static_cast<acc_t>(p), grad.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad;
}

// One block per sample: three sweeps over its positions (the norms; the normalized difference with the loss
// and the two projections; the gradients).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    attention_maps_kernel(const acc_t* map_student, const acc_t* map_teacher, int64_t positions, acc_t* row_loss,
                          acc_t* grad_student, acc_t* grad_teacher) {
  using M = ScalarMath<acc_t>;
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * positions;
  const acc_t* a_s = map_student + offset;
  const acc_t* a_t = map_teacher + offset;
  acc_t squares_s = 0, squares_t = 0;
  for (int64_t j = threadIdx.x; j < positions; j += kThreads) {
    squares_s += a_s[j] * a_s[j];
    squares_t += a_t[j] * a_t[j];
  }
  const acc_t norm_s = std::sqrt(block_reduce(squares_s, SumOp{}));
  const acc_t norm_t = std::sqrt(block_reduce(squares_t, SumOp{}));
  const acc_t divisor_s = normalize_divisor(norm_s), divisor_t = normalize_divisor(norm_t);
  acc_t total = 0, dot_s = 0, dot_t = 0;
  for (int64_t j = threadIdx.x; j < positions; j += kThreads) {
    const acc_t u_s = a_s[j] / divisor_s, u_t = a_t[j] / divisor_t;
    const acc_t diff = u_s - u_t;
    total += diff * diff;
    dot_s += u_s * diff;
    dot_t += u_t * diff;
  }
  total = block_reduce(total, SumOp{});
  dot_s = block_reduce(dot_s, SumOp{});
  dot_t = block_reduce(dot_t, SumOp{});
  if (threadIdx.x == 0) row_loss[blockIdx.x] = total;
  if (!grad_student && !grad_teacher) return;
  // d total / d u_s = 2 diff, d total / d u_t = -2 diff.
  for (int64_t j = threadIdx.x; j < positions; j += kThreads) {
    const acc_t u_s = a_s[j] / divisor_s, u_t = a_t[j] / divisor_t;
    const acc_t diff = u_s - u_t;
    if (grad_student) grad_student[offset + j] = normalize_grad<M>(acc_t(2) * diff, u_s, acc_t(2) * dot_s, norm_s);
    if (grad_teacher) grad_teacher[offset + j] = normalize_grad<M>(acc_t(-2) * diff, u_t, acc_t(-2) * dot_t, norm_t);
  }
}

AttentionMapsOutputs attention_transfer_maps_cuda(const at::Tensor& map_student, const at::Tensor& map_teacher,
                                                  bool grad_student, bool grad_teacher) {
  auto outputs = allocate_attention_maps_outputs(map_student, map_teacher, grad_student, grad_teacher);
  const int64_t batch = map_student.size(0), positions = map_student.size(1);
  if (batch == 0) return outputs;
  const c10::cuda::CUDAGuard device_guard(map_student.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(map_student.scalar_type(), "attention_transfer_maps_cuda", [&] {
    attention_maps_kernel<scalar_t><<<grid_of(batch), kThreads, 0, stream>>>(
        map_student.const_data_ptr<scalar_t>(), map_teacher.const_data_ptr<scalar_t>(), positions,
        std::get<0>(outputs).mutable_data_ptr<scalar_t>(),
        grad_student ? std::get<1>(outputs).mutable_data_ptr<scalar_t>() : nullptr,
        grad_teacher ? std::get<2>(outputs).mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CUDA, m) {
  m.impl("attention_map", &attention_map_cuda);
  m.impl("attention_map_backward", &attention_map_backward_cuda);
  m.impl("attention_transfer_maps", &attention_transfer_maps_cuda);
}

}  // namespace ofdkern
