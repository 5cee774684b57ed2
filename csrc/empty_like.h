// How an op's contract header allocates its feature-sized outputs: at::empty_like by default, and on the CPU
// the huge-page allocator of cpu_buffers.h, which the CPU ops pass in.
#pragma once

#include <ATen/ATen.h>

namespace ofdkern {

using EmptyLike = at::Tensor (*)(const at::Tensor& like, at::TensorOptions options);

inline at::Tensor default_empty_like(const at::Tensor& like, at::TensorOptions options) {
  return at::empty_like(like, options);
}

}  // namespace ofdkern
