// CUDA on the CPU, for running ofdkern's CUDA kernels without a GPU (python_tests/cuda_on_cpu.py rewrites
// csrc/*.cu into C++ that includes this first). A launch runs its blocks one after another; a block's threads
// are fibers (ucontext) on the calling thread, switched at barriers and shuffles, so that the kernels' indexing,
// grid-stride loops, barriers, warp shuffles, fixed-order reductions and the host code around them (tiles,
// buffers, GEMMs through ATen) run as written, on CPU tensors, deterministically. What it does not model: the
// GPU's memory model and races (compute-sanitizer's job, tools/sanitize_cuda.sh), device math intrinsics (the
// host branch of the shared math runs), speed.
//
// __shared__ variables become function statics: one block runs at a time, so its threads share them. A thread
// that returns leaves its block's barriers, as on a GPU. A shuffle that reads a lane that has returned, a
// barrier that cannot complete (a live thread waits at another one, or returned from the middle of a warp's
// shuffle), an exception in a kernel, or a launch that CUDA would refuse fails the call with an error.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// The running thread's indices: the scheduler sets them before it switches to a thread.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

// The CUDA runtime and c10/cuda names the kernels' host code uses.
using cudaStream_t = void*;
using cudaError_t = int;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };

// Few SMs (OFDKERN_EMULATED_SMS, default 2), so that grids capped by the SM count loop over their work.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  const char* sms = std::getenv("OFDKERN_EMULATED_SMS");
  *value = sms != nullptr ? std::atoi(sms) : 2;
  return 0;
}

#define C10_COMPILE_TIME_MAX_GPUS 16
#define C10_CUDA_CHECK(expression) ((void)(expression))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = size_t{256} << 10;

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Thread {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::kNone;
  unsigned char slot[16];  // this lane's value in a shuffle
};

// The block being run: its threads and the scheduler's context.
struct Block {
  std::vector<Thread> threads;
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
};

inline Block* block = nullptr;

inline void set_thread_index(int t) {
  threadIdx = uint3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
}

// Back to the scheduler until the thread's barrier completes.
inline void wait_at(Wait kind) {
  Thread& self = block->threads[block->current];
  self.wait = kind;
  swapcontext(&self.context, &block->scheduler);
}

inline void thread_entry() {
  try {
    (*block->body)();
  } catch (...) {
    if (!block->error) block->error = std::current_exception();
  }
  block->threads[block->current].wait = Wait::kDone;  // uc_link returns to the scheduler
}

// Releases the barriers that every live thread concerned has reached; false when none can be released.
inline bool release_barriers(std::vector<Thread>& threads) {
  bool any_live = false, all_at_block = true;
  for (const Thread& t : threads) {
    if (t.wait == Wait::kDone) continue;
    any_live = true;
    all_at_block &= t.wait == Wait::kBlock;
  }
  if (!any_live) return false;
  if (all_at_block) {
    for (Thread& t : threads)
      if (t.wait == Wait::kBlock) t.wait = Wait::kNone;
    return true;
  }
  bool released = false;
  for (size_t first = 0; first < threads.size(); first += kWarpSize) {
    const size_t last = std::min(threads.size(), first + kWarpSize);
    bool waiting = false, all_at_warp = true;
    for (size_t t = first; t < last; ++t) {
      if (threads[t].wait == Wait::kDone) continue;
      waiting |= threads[t].wait == Wait::kWarp;
      all_at_warp &= threads[t].wait == Wait::kWarp;
    }
    if (waiting && all_at_warp) {
      for (size_t t = first; t < last; ++t)
        if (threads[t].wait == Wait::kWarp) threads[t].wait = Wait::kNone;
      released = true;
    }
  }
  return released;
}

struct Config {
  dim3 grid, block;
};

inline Config config(dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) { return {grid, block}; }

// Runs body() as the kernel's threads: every block of the grid in turn, each as block.x * block.y * block.z
// fibers.
inline void launch(const Config& c, const std::function<void()>& body) {
  const int threads = static_cast<int>(c.block.x * c.block.y * c.block.z);
  const int64_t blocks = int64_t{c.grid.x} * c.grid.y * c.grid.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024, "cuda_on_cpu: a block of ", threads, " threads");
  TORCH_CHECK(c.grid.y <= 65535 && c.grid.z <= 65535, "cuda_on_cpu: a grid of (", c.grid.x, ", ", c.grid.y, ", ",
              c.grid.z, ") blocks");
  TORCH_CHECK(blocks > 0, "cuda_on_cpu: a launch of 0 blocks");
  TORCH_CHECK(block == nullptr, "cuda_on_cpu: a launch from inside a kernel");
  Block run;
  run.threads.resize(threads);
  run.body = &body;
  for (Thread& t : run.threads) t.stack.reset(new char[kStackBytes]);  // uninitialized: nothing to clear
  blockDim = c.block;
  gridDim = c.grid;
  block = &run;
  for (int64_t b = 0; b < blocks && !run.error; ++b) {
    blockIdx = uint3(b % c.grid.x, b / c.grid.x % c.grid.y, b / (int64_t{c.grid.x} * c.grid.y));
    for (Thread& t : run.threads) {
      getcontext(&t.context);
      t.context.uc_stack.ss_sp = t.stack.get();
      t.context.uc_stack.ss_size = kStackBytes;
      t.context.uc_link = &run.scheduler;
      makecontext(&t.context, &thread_entry, 0);
      t.wait = Wait::kNone;
    }
    // Each runnable thread in turn, until it waits or returns; then the barriers everyone reached open.
    for (bool progress = true; progress;) {
      for (int t = 0; t < threads; ++t) {
        if (run.threads[t].wait != Wait::kNone) continue;
        run.current = t;
        set_thread_index(t);
        swapcontext(&run.scheduler, &run.threads[t].context);
      }
      progress = release_barriers(run.threads);
    }
    bool all_done = true;
    for (const Thread& t : run.threads) all_done &= t.wait == Wait::kDone;
    if (!all_done && !run.error) {
      block = nullptr;
      TORCH_CHECK(false, "cuda_on_cpu: a barrier or shuffle that not every live thread of the block (or warp) "
                  "reaches, in block ", b);
    }
  }
  block = nullptr;
  if (run.error) std::rethrow_exception(run.error);
}

}  // namespace emu

inline void __syncthreads() { emu::wait_at(emu::Wait::kBlock); }

// The value of lane (this lane + delta) of the warp, or this lane's own past the warp's end.
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = emu::kWarpSize) {
  static_assert(sizeof(T) <= sizeof(emu::Thread::slot), "a shuffle of more than 16 bytes");
  TORCH_CHECK(mask == 0xffffffffu && width == emu::kWarpSize, "cuda_on_cpu: a shuffle of part of a warp");
  std::vector<emu::Thread>& threads = emu::block->threads;
  const int t = emu::block->current;
  std::memcpy(threads[t].slot, &value, sizeof(T));
  emu::wait_at(emu::Wait::kWarp);  // every lane has written its value
  T result = value;
  const int lane = t % emu::kWarpSize, source = t + static_cast<int>(delta);
  if (lane + static_cast<int>(delta) < emu::kWarpSize) {
    TORCH_CHECK(source < static_cast<int>(threads.size()) && threads[source].wait != emu::Wait::kDone,
                "cuda_on_cpu: a shuffle read lane ", source % emu::kWarpSize, ", which has returned or does not "
                "exist");
    std::memcpy(&result, threads[source].slot, sizeof(T));
  }
  emu::wait_at(emu::Wait::kWarp);  // every lane has read before any writes again
  return result;
}
