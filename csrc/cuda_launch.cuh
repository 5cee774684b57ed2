// What the CUDA kernels share: the block shape, a grid that depends only on the device and the work (so that
// per-block partial sums, and the loss bits, are reproducible), vector loads, compile-time flags, and the
// fixed-tree block reductions.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "math_policy.h"

namespace ofdkern {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// Resident blocks per SM: 1024 threads each with 128-bit loads in flight saturate HBM.
constexpr int kBlocksPerSm = 4;
// Fewest elements per thread before another block is added: tiny inputs get few partials.
constexpr int64_t kMinElementsPerThread = 8;

inline int sm_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// A function of the device and numel only, so that the partials (and the loss bits) are reproducible.
inline int grid_size(int64_t numel, c10::DeviceIndex device) {
  if (numel == 0) return 0;
  const int64_t by_work = (numel + kThreads * kMinElementsPerThread - 1) / (kThreads * kMinElementsPerThread);
  return static_cast<int>(std::min<int64_t>(by_work, int64_t{sm_count(device)} * kBlocksPerSm));
}

// A grid of `blocks` blocks on the x axis, refused beyond its limit.
inline int grid_of(int64_t blocks) {
  TORCH_CHECK_VALUE(blocks <= INT32_MAX, "ofdkern: too many CUDA blocks (", blocks, ")");
  return static_cast<int>(blocks);
}

// Bytes per vector load or store.
constexpr int kVectorBytes = 16;

// Register image of n consecutive elements, aligned so that one load/store moves it whole.
template <typename T, int n>
struct alignas(sizeof(T) * n) Pack {
  T v[n];
};

inline bool aligned(const void* pointer, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(pointer) % bytes == 0;
}

// Calls f with std::integral_constant<bool, flag>.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// Sum over the block in a fixed tree (warp shuffles, then the warp totals); valid in thread 0. For blocks of
// kThreads threads, all of which call it; it ends on a barrier, so a kernel may call it again.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_totals[kThreads / kWarpSize];
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) warp_totals[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / kWarpSize ? warp_totals[lane] : acc_t(0);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // warp 0 has read warp_totals before anyone writes them again
  return value;
}

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

}  // namespace ofdkern
