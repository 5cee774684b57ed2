// The type every kernel computes and accumulates in, and the host/device qualifier of the per-element math
// headers (<op>_math.h) that the CPU and CUDA kernels share.
#pragma once

#include <c10/core/ScalarType.h>

#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define OFDKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OFDKERN_HOST_DEVICE inline
#endif

namespace ofdkern {

// float64 for float64 inputs, float32 for every other floating type (half precision included).
template <typename scalar_t>
using accumulation_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The ScalarType twin of accumulation_t (and of ofdkern._dtypes.accumulation_dtype in Python).
inline at::ScalarType accumulation_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace ofdkern
