// CUDA kernels of the fused FRSKD ops (contracts in frskd_fused.h, per-element math in frskd_math.h).
//
// Determinism: grids and per-thread work depend on the shapes only; every thread sums its elements in a fixed
// order and every block reduces its threads in a fixed tree (block_reduce), so results are bit-identical run to
// run. No atomics, no host sync.
//
// KD: a row is split into chunks of kChunk classes, one block each, every thread holding kItems classes of
// both logit rows in registers. A row of one chunk is one block that reads its logits once (kd_terms_kernel
// with kSingleChunk: stats, terms, loss and both gradients). Wider rows: kd_stats_kernel writes each chunk's
// max and sum of exps; kd_terms_kernel merges its row's chunks (the row max first, then every chunk's sum
// rescaled to it, in a fixed tree) and writes the student gradient and the chunk's share of KL; kd_finish_kernel
// adds the shares per row in chunk order; kd_teacher_grad_kernel, which needs the row's KL, writes the teacher
// gradient.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "frskd_fused.h"
#include "frskd_math.h"

namespace ofdkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;

struct SumOp {
  template <typename acc_t>
  __device__ acc_t operator()(acc_t a, acc_t b) const {
    return a + b;
  }
};

struct MaxOp {  // NaN-propagating
  template <typename acc_t>
  __device__ acc_t operator()(acc_t a, acc_t b) const {
    return ScalarMath<acc_t>::max(a, b);
  }
};

// Reduction over a warp in a fixed tree; valid in lane 0.
template <typename acc_t, typename Op>
__device__ acc_t warp_reduce(acc_t value, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
  return value;
}

// Reduction over a block of kThreads threads in a fixed tree (warps, then the warp results), returned to every
// thread. Every thread of the block must call it.
template <typename acc_t, typename Op>
__device__ acc_t block_reduce(acc_t value, Op op) {
  __shared__ acc_t warp_results[kWarps];
  __shared__ acc_t result;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  value = warp_reduce(value, op);
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  if (warp == 0) {
    // Lanes past kWarps hold copies; lane 0's tree reads lanes below kWarps only.
    value = warp_results[lane % kWarps];
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset /= 2) value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
    if (lane == 0) result = value;
  }
  __syncthreads();
  return result;
}

// Calls f with std::integral_constant<bool, flag>.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

int grid_of(int64_t blocks) {
  TORCH_CHECK_VALUE(blocks <= INT32_MAX, "ofdkern: too many CUDA blocks (", blocks, ")");
  return static_cast<int>(blocks);
}

// --- attention maps -------------------------------------------------------------------------------------------

// Positions innermost: a block is 32 consecutive positions (coalesced) x 8 channel groups; group k sums the
// channels k, k + 8, ... in order, and the groups are added in group order.
constexpr int kPositionLanes = 32;
constexpr int kChannelGroups = kThreads / kPositionLanes;

template <typename scalar_t, int kExponent>
__global__ void __launch_bounds__(kThreads)
    attention_map_positions_kernel(const scalar_t* feature, FeatureGeometry g, accumulation_t<scalar_t> p,
                                   accumulation_t<scalar_t>* map, int64_t tiles) {
  using acc_t = accumulation_t<scalar_t>;
  using M = ScalarMath<acc_t>;
  __shared__ acc_t group_sums[kChannelGroups][kPositionLanes];
  const int64_t n = blockIdx.x / tiles;
  const int64_t j = (blockIdx.x % tiles) * kPositionLanes + threadIdx.x;
  acc_t sum = 0;
  if (j < g.positions) {
    const scalar_t* position = feature + n * g.batch_stride + j * g.position_stride;
    for (int64_t c = threadIdx.y; c < g.channels; c += kChannelGroups)
      sum += attention_power<M, kExponent>(static_cast<acc_t>(position[c * g.channel_stride]), p);
  }
  group_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < g.positions) {
    acc_t total = 0;
    for (int k = 0; k < kChannelGroups; ++k) total += group_sums[k][threadIdx.x];
    map[n * g.positions + j] = total / static_cast<acc_t>(g.channels);
  }
}

// Channels innermost: a warp per position, its lanes over the (coalesced) channels, added in a fixed tree.
template <typename scalar_t, int kExponent>
__global__ void __launch_bounds__(kThreads)
    attention_map_channels_kernel(const scalar_t* feature, FeatureGeometry g, accumulation_t<scalar_t> p,
                                  accumulation_t<scalar_t>* map) {
  using acc_t = accumulation_t<scalar_t>;
  using M = ScalarMath<acc_t>;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (q >= g.batch * g.positions) return;  // whole warps leave: the shuffles below stay full-warp
  const int64_t n = q / g.positions, j = q % g.positions;
  const scalar_t* position = feature + n * g.batch_stride + j * g.position_stride;
  acc_t sum = 0;
  for (int64_t c = lane; c < g.channels; c += kWarpSize)
    sum += attention_power<M, kExponent>(static_cast<acc_t>(position[c * g.channel_stride]), p);
  sum = warp_reduce(sum, SumOp{});
  if (lane == 0) map[q] = sum / static_cast<acc_t>(g.channels);
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
    acc_t* out = map.mutable_data_ptr<acc_t>();
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
                                  const accumulation_t<scalar_t>* grad_map, accumulation_t<scalar_t> p,
                                  scalar_t* grad) {
  using acc_t = accumulation_t<scalar_t>;
  using M = ScalarMath<acc_t>;
  const int64_t inner = kChannelsInner ? g.channels : g.positions;
  const int64_t outer = kChannelsInner ? g.positions : g.channels;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= g.batch * outer) return;
  const int64_t n = row / outer, o = row % outer;
  const acc_t channels = static_cast<acc_t>(g.channels);
  for (int64_t i = threadIdx.x; i < inner; i += blockDim.x) {
    const int64_t c = kChannelsInner ? i : o, j = kChannelsInner ? o : i;
    const acc_t x = static_cast<acc_t>(feature[n * g.batch_stride + c * g.channel_stride + j * g.position_stride]);
    // The mean's backward (g / C), then the power's, as autograd applies them.
    const acc_t value = (grad_map[n * g.positions + j] / channels) * attention_power_grad<M, kExponent>(x, p);
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
               stream>>>(feature.const_data_ptr<scalar_t>(), g, out_g, grad_map.const_data_ptr<acc_t>(),
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

// --- KD -------------------------------------------------------------------------------------------------------

constexpr int kItems = 16;
constexpr int64_t kChunk = int64_t{kThreads} * kItems;
// Chunk stats: student max and sum, teacher max and sum.
constexpr int kStatsPerChunk = 4;

template <typename scalar_t>
struct KDArgs {
  using acc_t = accumulation_t<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t classes, chunks;
  acc_t temperature, inv_temperature, temperature_squared;
  acc_t* stats;     // (rows, chunks, kStatsPerChunk), wide rows only
  acc_t* partials;  // (rows, chunks) shares of KL, wide rows only
  acc_t* row_kl;    // (rows,), wide rows only
  acc_t* row_loss;
  scalar_t* grad_student;  // null when not asked
  scalar_t* grad_teacher;
};

// The kItems classes of this thread in chunk `chunk` of row `row`: class chunk * kChunk + k * kThreads + tid.
__device__ int64_t class_of(int64_t chunk, int k) { return chunk * kChunk + int64_t{k} * kThreads + threadIdx.x; }

// This thread's logits of one row; classes past the row read as `fill`.
template <typename scalar_t>
__device__ void load_items(const scalar_t* row, int64_t chunk, int64_t classes, accumulation_t<scalar_t> fill,
                           accumulation_t<scalar_t> (&items)[kItems]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t j = class_of(chunk, k);
    items[k] = j < classes ? static_cast<accumulation_t<scalar_t>>(row[j]) : fill;
  }
}

// Max and sum of e = exp((v - shift) / T) over the block's items (padding -inf), e kept per item.
template <typename acc_t>
__device__ SoftmaxStats<acc_t> chunk_stats(const acc_t (&v)[kItems], acc_t inv_temperature, acc_t (&e)[kItems]) {
  acc_t max = negative_infinity<acc_t>();
#pragma unroll
  for (int k = 0; k < kItems; ++k) max = ScalarMath<acc_t>::max(max, v[k]);
  max = block_reduce(max, MaxOp{});
  const acc_t shift = softmax_shift(max);
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    e[k] = std::exp(kd_scaled(v[k], shift, inv_temperature));
    sum += e[k];
  }
  return SoftmaxStats<acc_t>{max, block_reduce(sum, SumOp{})};
}

// A wide row's max and sum from its chunks' stats (`which`: 0 student, 2 teacher): the row max first, then each
// chunk's sum rescaled to it once; every thread takes chunks tid, tid + kThreads, ... then a fixed tree.
template <typename acc_t>
__device__ SoftmaxStats<acc_t> merged_stats(const acc_t* row_stats, int64_t chunks, int which, acc_t inv_temperature) {
  acc_t max = negative_infinity<acc_t>();
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads)
    max = ScalarMath<acc_t>::max(max, row_stats[c * kStatsPerChunk + which]);
  max = block_reduce(max, MaxOp{});
  acc_t sum = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    const acc_t* chunk = row_stats + c * kStatsPerChunk + which;
    sum += chunk[1] * block_rescale(chunk[0], max, inv_temperature);
  }
  return SoftmaxStats<acc_t>{max, block_reduce(sum, SumOp{})};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) kd_stats_kernel(KDArgs<scalar_t> args) {
  using acc_t = accumulation_t<scalar_t>;
  const int64_t row = blockIdx.x / args.chunks, chunk = blockIdx.x % args.chunks;
  acc_t s[kItems], t[kItems], e[kItems];
  load_items(args.student + row * args.classes, chunk, args.classes, negative_infinity<acc_t>(), s);
  load_items(args.teacher + row * args.classes, chunk, args.classes, negative_infinity<acc_t>(), t);
  const SoftmaxStats<acc_t> student = chunk_stats(s, args.inv_temperature, e);
  const SoftmaxStats<acc_t> teacher = chunk_stats(t, args.inv_temperature, e);
  if (threadIdx.x == 0) {
    acc_t* out = args.stats + blockIdx.x * int64_t{kStatsPerChunk};
    out[0] = student.max;
    out[1] = student.sum;
    out[2] = teacher.max;
    out[3] = teacher.sum;
  }
}

// This thread's e relative to the row max, for a wide row (a single chunk keeps them from chunk_stats).
template <typename acc_t>
__device__ void row_exps(const acc_t (&v)[kItems], acc_t row_max, acc_t inv_temperature, acc_t (&e)[kItems]) {
  const acc_t shift = softmax_shift(row_max);
#pragma unroll
  for (int k = 0; k < kItems; ++k) e[k] = std::exp(kd_scaled(v[k], shift, inv_temperature));
}

template <typename scalar_t, bool kSingleChunk, bool kGradStudent, bool kGradTeacher>
__global__ void __launch_bounds__(kThreads) kd_terms_kernel(KDArgs<scalar_t> args) {
  using acc_t = accumulation_t<scalar_t>;
  using M = ScalarMath<acc_t>;
  const int64_t row = blockIdx.x / args.chunks, chunk = blockIdx.x % args.chunks;
  const int64_t offset = row * args.classes;
  acc_t s[kItems], t[kItems], e_s[kItems], e_t[kItems];
  load_items(args.student + offset, chunk, args.classes, negative_infinity<acc_t>(), s);
  load_items(args.teacher + offset, chunk, args.classes, negative_infinity<acc_t>(), t);
  SoftmaxStats<acc_t> student, teacher;
  if constexpr (kSingleChunk) {
    student = chunk_stats(s, args.inv_temperature, e_s);
    teacher = chunk_stats(t, args.inv_temperature, e_t);
  } else {
    const acc_t* row_stats = args.stats + row * args.chunks * kStatsPerChunk;
    student = merged_stats(row_stats, args.chunks, 0, args.inv_temperature);
    teacher = merged_stats(row_stats, args.chunks, 2, args.inv_temperature);
    row_exps(s, student.max, args.inv_temperature, e_s);
    row_exps(t, teacher.max, args.inv_temperature, e_t);
  }
  const KDRow<acc_t> kd = kd_row(student, teacher, args.temperature, args.inv_temperature);
  const acc_t inv_sum_s = acc_t(1) / student.sum, inv_sum_t = acc_t(1) / teacher.sum;
  acc_t kl = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t j = class_of(chunk, k);
    if (j >= args.classes) continue;
    const auto terms = kd_class_terms<M>(s[k], t[k], e_s[k] * inv_sum_s, e_t[k] * inv_sum_t, kd);
    kl += terms.loss;
    if constexpr (kGradStudent) args.grad_student[offset + j] = static_cast<scalar_t>(terms.d_student);
  }
  kl = block_reduce(kl, SumOp{});
  if constexpr (kSingleChunk) {
    if (threadIdx.x == 0) args.row_loss[row] = kl * args.temperature_squared;
    if constexpr (kGradTeacher) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int64_t j = class_of(chunk, k);
        if (j < args.classes)
          args.grad_teacher[offset + j] = static_cast<scalar_t>(kd_teacher_grad<M>(s[k], t[k], e_t[k] * inv_sum_t, kd, kl));
      }
    }
  } else {
    if (threadIdx.x == 0) args.partials[blockIdx.x] = kl;
  }
}

// A wide row's KL: its chunks' shares in chunk order (a thread per row).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) kd_finish_kernel(KDArgs<scalar_t> args, int64_t rows) {
  using acc_t = accumulation_t<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  acc_t kl = 0;
  for (int64_t c = 0; c < args.chunks; ++c) kl += args.partials[row * args.chunks + c];
  args.row_kl[row] = kl;
  args.row_loss[row] = kl * args.temperature_squared;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) kd_teacher_grad_kernel(KDArgs<scalar_t> args) {
  using acc_t = accumulation_t<scalar_t>;
  using M = ScalarMath<acc_t>;
  const int64_t row = blockIdx.x / args.chunks, chunk = blockIdx.x % args.chunks;
  const int64_t offset = row * args.classes;
  acc_t s[kItems], t[kItems], e_t[kItems];
  load_items(args.student + offset, chunk, args.classes, acc_t(0), s);
  load_items(args.teacher + offset, chunk, args.classes, acc_t(0), t);
  const acc_t* row_stats = args.stats + row * args.chunks * kStatsPerChunk;
  const SoftmaxStats<acc_t> student = merged_stats(row_stats, args.chunks, 0, args.inv_temperature);
  const SoftmaxStats<acc_t> teacher = merged_stats(row_stats, args.chunks, 2, args.inv_temperature);
  row_exps(t, teacher.max, args.inv_temperature, e_t);
  const KDRow<acc_t> kd = kd_row(student, teacher, args.temperature, args.inv_temperature);
  const acc_t inv_sum_t = acc_t(1) / teacher.sum, kl = args.row_kl[row];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t j = class_of(chunk, k);
    if (j < args.classes)
      args.grad_teacher[offset + j] = static_cast<scalar_t>(kd_teacher_grad<M>(s[k], t[k], e_t[k] * inv_sum_t, kd, kl));
  }
}

KDOutputs kd_fused_cuda(const at::Tensor& student, const at::Tensor& teacher, double temperature, bool grad_student,
                        bool grad_teacher) {
  auto outputs = allocate_kd_outputs(student, teacher, temperature, grad_student, grad_teacher);
  const int64_t rows = student.size(0), classes = student.size(1);
  if (rows == 0) return outputs;
  const c10::cuda::CUDAGuard device_guard(student.device());
  // No classes: KL over nothing is 0, as the reference's sum.
  if (classes == 0) {
    std::get<0>(outputs).zero_();
    return outputs;
  }
  const int64_t chunks = (classes + kChunk - 1) / kChunk;
  const bool single = chunks == 1;
  const auto acc_options = std::get<0>(outputs).options();
  // Scratch of the wide-row path (empty for rows of one chunk).
  const at::Tensor stats = at::empty({single ? 0 : rows * chunks * kStatsPerChunk}, acc_options);
  const at::Tensor partials = at::empty({single ? 0 : rows * chunks}, acc_options);
  const at::Tensor row_kl = at::empty({single ? 0 : rows}, acc_options);
  const int grid = grid_of(rows * chunks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fused_cuda", [&] {
    using acc_t = accumulation_t<scalar_t>;
    const auto data = [](const at::Tensor& tensor) {
      return tensor.numel() ? tensor.mutable_data_ptr<acc_t>() : static_cast<acc_t*>(nullptr);
    };
    const auto grad = [](const at::Tensor& tensor) {
      return tensor.numel() ? tensor.mutable_data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr);
    };
    const KDArgs<scalar_t> args{student.const_data_ptr<scalar_t>(),
                                teacher.const_data_ptr<scalar_t>(),
                                classes,
                                chunks,
                                static_cast<acc_t>(temperature),
                                static_cast<acc_t>(1 / temperature),
                                // T^2 rounded once, as the reference's `* temperature ** 2`.
                                static_cast<acc_t>(temperature * temperature),
                                data(stats),
                                data(partials),
                                data(row_kl),
                                std::get<0>(outputs).mutable_data_ptr<acc_t>(),
                                grad(std::get<1>(outputs)),
                                grad(std::get<2>(outputs))};
    if (!single) {
      kd_stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    with_flag(single, [&](auto single_chunk) {
      with_flag(grad_student, [&](auto writes_student) {
        // Wide rows write the teacher gradient in their own kernel, once the row's KL is known.
        with_flag(grad_teacher && single, [&](auto writes_teacher) {
          kd_terms_kernel<scalar_t, decltype(single_chunk)::value, decltype(writes_student)::value,
                          decltype(writes_teacher)::value><<<grid, kThreads, 0, stream>>>(args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
    if (!single) {
      kd_finish_kernel<scalar_t><<<grid_of((rows + kThreads - 1) / kThreads), kThreads, 0, stream>>>(args, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (grad_teacher) {
        kd_teacher_grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CUDA, m) {
  m.impl("attention_map", &attention_map_cuda);
  m.impl("attention_map_backward", &attention_map_backward_cuda);
  m.impl("attention_transfer_maps", &attention_transfer_maps_cuda);
  m.impl("kd_fused", &kd_fused_cuda);
}

}  // namespace ofdkern
