// Feature-sized CPU output buffers: transparent huge pages and a cache of freed blocks.
//
// A fresh feature-sized tensor costs more to fault in than the fused kernel costs to fill it: glibc maps
// blocks over 32 MiB (and, depending on the heap's history, smaller ones) anew on every allocation, and the
// kernel faults them in (and zeroes them) page by page (measured at ~40 ms per 100 MB on 2 cores, twice the
// time of the OFD pass itself). A 2 MiB-aligned
// block with MADV_HUGEPAGE faults in 2 MiB at a time, and a block reused from the cache is not faulted at
// all: a training loop asks for the same buffers every step, as the CUDA caching allocator assumes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ofdkern {

// Like at::empty_like(like, options) (same sizes, dense strides in like's dim order), for CPU tensors.
at::Tensor empty_like_hugepage(const at::Tensor& like, at::TensorOptions options);

// A 1-D CPU tensor of numel elements, like at::empty({numel}, options): scratch that the kernels fill.
at::Tensor empty_hugepage(int64_t numel, at::TensorOptions options);

// Bytes of freed blocks the cache holds for reuse.
int64_t cpu_buffer_cache_bytes();

// Caps the cache (0 disables it) and hands blocks over the new cap back to the system; returns the old cap.
// The initial cap is OFDKERN_CPU_CACHE_MB (MiB) when set, else 2 GiB.
int64_t set_cpu_buffer_cache_limit(int64_t bytes);

}  // namespace ofdkern
