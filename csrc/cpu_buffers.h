// Feature-sized CPU output buffers backed by transparent huge pages.
//
// A fresh feature-sized tensor costs more to fault in than the fused kernel costs to fill it: glibc maps
// blocks over 32 MiB anew on every allocation, and the kernel faults them in 4 KiB at a time (measured
// at ~40 ms per 100 MB on 2 cores, twice the time of the OFD pass itself). A 2 MiB-aligned block with
// MADV_HUGEPAGE faults in 2 MiB at a time.
#pragma once

#include <ATen/ATen.h>

namespace ofdkern {

// Like at::empty_like(like, options) (same sizes, dense strides in like's dim order), for CPU tensors.
at::Tensor empty_like_hugepage(const at::Tensor& like, at::TensorOptions options);

}  // namespace ofdkern
