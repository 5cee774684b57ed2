#include "cpu_buffers.h"

#include <torch/library.h>

#include <cstdlib>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ofdkern {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Below this, glibc reuses freed heap blocks and there is nothing to gain.
constexpr size_t kMinHugeBytes = size_t{8} << 20;

}  // namespace

at::Tensor empty_like_hugepage(const at::Tensor& like, at::TensorOptions options) {
  // The dense strides empty_like would give (owned: the meta tensor dies with this statement).
  const std::vector<int64_t> strides = at::empty_like(like, options.device(at::kMeta)).strides().vec();
  const size_t bytes = static_cast<size_t>(like.numel()) * options.dtype().itemsize();
#if defined(__linux__)
  if (like.device().is_cpu() && bytes >= kMinHugeBytes) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, rounded) == 0) {
      madvise(data, rounded, MADV_HUGEPAGE);  // advisory: without THP the buffer is ordinary memory
      return at::from_blob(data, like.sizes(), strides, [](void* p) { std::free(p); },
                           options.device(like.device()));
    }
  }
#endif
  return at::empty_strided(like.sizes(), strides, options.device(like.device()));
}

TORCH_LIBRARY_FRAGMENT(ofdkern, m) {
  m.def("empty_like_hugepage(Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) {
  m.impl("empty_like_hugepage", [](const at::Tensor& like) { return empty_like_hugepage(like, like.options()); });
}

}  // namespace ofdkern
