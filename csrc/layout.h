// The feature layouts the kernels walk in place, for the ops' contracts (the twin of ofdkern/_layout.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ofdkern {

// Whether an (N, C, ...) feature is dense with the channels innermost: the strides channels_last (or
// channels_last_3d, or an (N, L, C) transpose) gives. The stride of a size-1 dim is free.
inline bool channels_innermost(const at::Tensor& feature) {
  int64_t expected = feature.size(1);
  for (int64_t d = feature.dim() - 1; d >= 2; --d) {
    if (feature.size(d) != 1 && feature.stride(d) != expected) return false;
    expected *= feature.size(d);
  }
  return (feature.size(1) == 1 || feature.stride(1) == 1) && (feature.size(0) == 1 || feature.stride(0) == expected);
}

}  // namespace ofdkern
