#include "cpu_buffers.h"

#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <list>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ofdkern {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Below this, glibc serves blocks from its heap. Above it (up to its adaptive mmap threshold) it may map them
// anew on every call, depending on what else the process allocated and freed: after a torch.compile'd step,
// a 128x64x8x8 bf16 channel alignment faulted in its 5 MiB of buffers on every call (400-1,200 page faults per
// step), 1.5 -> 2.5 ms on a 2-core AMD EPYC.
constexpr size_t kMinHugeBytes = size_t{256} << 10;

size_t initial_cache_limit() {
  const char* mib = std::getenv("OFDKERN_CPU_CACHE_MB");
  return mib != nullptr ? static_cast<size_t>(std::strtoull(mib, nullptr, 10)) << 20 : size_t{2} << 30;
}

// A block of `bytes` (a multiple of kHugePage) starting on a huge-page boundary, mapped on its own rather
// than taken from malloc: glibc serves blocks under its (adaptive, up to 32 MiB) mmap threshold from the heap,
// where freeing does not give the memory back to the system.
#if defined(__linux__)
void* map_block(size_t bytes) {
  // Over-map by one huge page, then unmap the slack on both sides of the aligned block.
  const size_t mapped = bytes + kHugePage;
  void* raw = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  char* start = static_cast<char*>(raw);
  char* block = start + (kHugePage - reinterpret_cast<uintptr_t>(start) % kHugePage) % kHugePage;
  if (block > start) munmap(start, block - start);
  if (start + mapped > block + bytes) munmap(block + bytes, start + mapped - (block + bytes));
  madvise(block, bytes, MADV_HUGEPAGE);  // advisory: without THP the block is ordinary memory
  return block;
}

void unmap_block(void* block, size_t bytes) { munmap(block, bytes); }
#else
void* map_block(size_t bytes) {
  void* block = nullptr;
  return posix_memalign(&block, kHugePage, bytes) == 0 ? block : nullptr;
}

void unmap_block(void* block, size_t) { std::free(block); }
#endif

// Freed huge-page blocks, reused only for a request of the same rounded size. Oldest blocks leave first
// when the cap is reached.
class BlockCache {
  struct Block {
    void* data;
    size_t bytes;
  };

 public:
  // A cached block of exactly `bytes`, else a new one (nullptr when out of memory).
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Newest first: the most recently freed block is the likeliest to be in the CPU caches.
      for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
        if (it->bytes == bytes) {
          void* data = it->data;
          cached_bytes_ -= bytes;
          blocks_.erase(std::next(it).base());
          return data;
        }
      }
    }
    return map_block(bytes);
  }

  void give_back(void* data, size_t bytes) {
    std::vector<Block> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes <= limit_bytes_) {
        blocks_.push_back({data, bytes});
        cached_bytes_ += bytes;
        data = nullptr;
      }
      evict_to_limit(released);
    }
    if (data != nullptr) unmap_block(data, bytes);
    release(released);
  }

  size_t set_limit(size_t bytes) {
    std::vector<Block> released;
    size_t old_limit;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      old_limit = limit_bytes_;
      limit_bytes_ = bytes;
      evict_to_limit(released);
    }
    release(released);
    return old_limit;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

 private:
  // Called with mutex_ held; the blocks are unmapped after unlocking (munmap is slow).
  void evict_to_limit(std::vector<Block>& released) {
    while (cached_bytes_ > limit_bytes_) {
      released.push_back(blocks_.front());
      cached_bytes_ -= blocks_.front().bytes;
      blocks_.pop_front();
    }
  }

  static void release(const std::vector<Block>& blocks) {
    for (const Block& block : blocks) unmap_block(block.data, block.bytes);
  }

  std::mutex mutex_;
  std::list<Block> blocks_;  // in the order they were freed
  size_t cached_bytes_ = 0;
  size_t limit_bytes_ = initial_cache_limit();
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors ran.
BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

}  // namespace

namespace {

// A CPU tensor of the given sizes and strides over a cached huge-page block when it is large enough, else
// an ordinary one.
at::Tensor empty_strided_hugepage(at::IntArrayRef sizes, at::IntArrayRef strides, at::TensorOptions options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (options.device().is_cpu() && bytes >= kMinHugeBytes) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (void* data = block_cache().take(rounded)) {
      return at::from_blob(data, sizes, strides, [rounded](void* block) { block_cache().give_back(block, rounded); },
                           options);
    }
  }
  return at::empty_strided(sizes, strides, options);
}

}  // namespace

at::Tensor empty_like_hugepage(const at::Tensor& like, at::TensorOptions options) {
  // The dense strides empty_like would give (owned: the meta tensor dies with this statement).
  const std::vector<int64_t> strides = at::empty_like(like, options.device(at::kMeta)).strides().vec();
  return empty_strided_hugepage(like.sizes(), strides, options.device(like.device()));
}

at::Tensor empty_hugepage(int64_t numel, at::TensorOptions options) {
  return empty_strided_hugepage({numel}, {1}, options);
}

int64_t cpu_buffer_cache_bytes() { return static_cast<int64_t>(block_cache().cached_bytes()); }

int64_t set_cpu_buffer_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "the CPU buffer cache limit must be >= 0 bytes, got ", bytes);
  return static_cast<int64_t>(block_cache().set_limit(static_cast<size_t>(bytes)));
}

TORCH_LIBRARY_FRAGMENT(ofdkern, m) {
  m.def("empty_like_hugepage(Tensor like) -> Tensor");
  m.def("cpu_buffer_cache_bytes() -> int", &cpu_buffer_cache_bytes);
  m.def("set_cpu_buffer_cache_limit(int bytes) -> int", &set_cpu_buffer_cache_limit);
}

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) {
  m.impl("empty_like_hugepage", [](const at::Tensor& like) { return empty_like_hugepage(like, like.options()); });
}

}  // namespace ofdkern
