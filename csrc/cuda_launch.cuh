// What the CUDA kernels share: the block shape, a grid that depends only on the device and the work (so that
// per-block partial sums, and the loss bits, are reproducible), and the fixed-tree block sum.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/core/Device.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>

namespace ofdkern {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
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

}  // namespace ofdkern
