// The CUDA kernel of scale_ (schema in library.cpp), which every fused op's backward runs on its saved unit
// gradients.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "accumulation.h"
#include "cuda_launch.cuh"
#include "scale_checks.h"

namespace ofdkern {
namespace {

// The backward of every fused op: a saved unit gradient times grad_output, in place. The factor is read on
// the device (no host sync) in the accumulation type, so every element is rounded once. (torch's mul_ by
// a 0-dim CUDA tensor of another dtype rounds the factor to a half-precision gradient's dtype first and
// leaves its vectorized path: about a third of the copy bandwidth on an H100.)
template <typename scalar_t, typename acc_t, int kVec>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    scale_kernel(scalar_t* gradient, const acc_t* factor_ptr, int64_t numel) {
  const acc_t factor = *factor_ptr;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * kThreads * kVec;
  const int64_t vector_end = numel / kVec * kVec;
  for (int64_t offset = thread * kVec; offset < vector_end; offset += grid_stride) {
    auto* pack = reinterpret_cast<Pack<scalar_t, kVec>*>(gradient + offset);
    Pack<scalar_t, kVec> values = *pack;
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      values.v[k] = static_cast<scalar_t>(static_cast<acc_t>(values.v[k]) * factor);
    *pack = values;
  }
  const int64_t tail = vector_end + thread;
  if (kVec > 1 && tail < numel)
    gradient[tail] = static_cast<scalar_t>(static_cast<acc_t>(gradient[tail]) * factor);
}

void scale_cuda(const at::Tensor& gradient, const at::Tensor& factor) {
  check_scale_args(gradient, factor);
  const c10::cuda::CUDAGuard device_guard(gradient.device());
  const int64_t numel = gradient.numel();
  if (numel == 0) return;
  const int grid = grid_size(numel, gradient.device().index());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gradient.scalar_type(), "scale_cuda", [&] {
    using acc_t = accumulation_t<scalar_t>;
    constexpr int kVec = kVectorBytes / sizeof(scalar_t);
    scalar_t* data = gradient.mutable_data_ptr<scalar_t>();
    const acc_t* factor_data = factor.const_data_ptr<acc_t>();
    if (aligned(data, kVectorBytes))
      scale_kernel<scalar_t, acc_t, kVec><<<grid, kThreads, 0, stream>>>(data, factor_data, numel);
    else
      scale_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(data, factor_data, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CUDA, m) { m.impl("scale_", &scale_cuda); }

}  // namespace ofdkern
