// Vector helpers of the per-instruction-set CPU kernels (cpu_isa.h) on at::vec vectors of CPU_CAPABILITY:
// partial loads, lane sums, and half-precision blocks widened to (and narrowed from) the accumulation type.
// Included by the kernel headers (<op>_cpu_kernels.h) after cpu_isa_prelude.h.
#pragma once

// at::vec's headers carry pragmas for other compilers and return vectors from functions compiled for narrower
// targets in code this file never calls; GCC 12 takes the deliberately undefined pass-through operand of some
// AVX-512 conversion intrinsics for an uninitialized variable.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "accumulation.h"
#include "math_policy.h"

namespace ofdkern {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename acc_t>
constexpr int64_t kWidth = Vectorized<acc_t>::size();

// On the vector helpers of innermost loops: GCC keeps some out of line (a call per vector), and a loop that
// calls cannot keep its accumulators in registers.
#define OFDKERN_INLINE_VEC inline __attribute__((always_inline))

// Bytes per cache line.
constexpr int64_t kCacheLine = 64;

// The vector policy of the per-element math headers (math_policy.h); pow is Sleef's, through at::vec.
template <typename acc_t>
struct VecMath {
  using scalar = acc_t;
  using value = Vectorized<acc_t>;
  static value abs(const value& x) { return x.abs(); }
  static value pow(const value& x, const value& p) { return x.pow(p); }
  static value select(const value& mask, const value& if_true, const value& if_false) {
    return value::blendv(if_false, if_true, mask);
  }
};

// The first n (1 <= n <= width) elements at data, the other lanes set to fill.
template <typename acc_t>
Vectorized<acc_t> load_lanes(const acc_t* data, int64_t n, acc_t fill) {
  using Vec = Vectorized<acc_t>;
  return n == Vec::size() ? Vec::loadu(data) : Vec::set(Vec(fill), Vec::loadu(data, n), n);
}

// v with the lanes from n on zeroed (n = width: all of v).
template <typename acc_t>
OFDKERN_INLINE_VEC Vectorized<acc_t> first_lanes(const Vectorized<acc_t>& v, int64_t n) {
  using Vec = Vectorized<acc_t>;
  return n == Vec::size() ? v : Vec::set(Vec(acc_t(0)), v, n);
}

// The sum over the lanes, in lane order.
template <typename acc_t>
acc_t lane_sum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (acc_t lane : lanes) total += lane;
  return total;
}


// n (1 <= n <= width) elements at src in the accumulation type, the lanes from n on 0. Half precision is
// widened one accumulation vector (half a Half vector) at a time, so rows shorter than a Half vector (a 4x4
// map's 16 positions) convert in vectors too.
template <typename scalar_t>
OFDKERN_INLINE_VEC Vectorized<accumulation_t<scalar_t>> load_widened(const scalar_t* src, int64_t n) {
  using acc_t = accumulation_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vec::loadu(src, n);
  } else {
    if (n == Vec::size()) {
      Vec v;
      at::vec::load_to_float(src, v);
      return v;
    }
    return at::vec::convert<acc_t>(Vectorized<scalar_t>::loadu(src, n));
  }
}

// Two vectors of the accumulation type, the unit of the narrowing stores.
template <typename acc_t>
struct VectorPair {
  Vectorized<acc_t> low, high;
};

// Elements in a VectorPair: the step of the vectorized passes.
template <typename acc_t>
constexpr int64_t kPairWidth = 2 * kWidth<acc_t>;

// n (1 <= n <= 2 width) elements at src in the accumulation type, the lanes from n on 0.
template <typename scalar_t>
OFDKERN_INLINE_VEC VectorPair<accumulation_t<scalar_t>> load_pair(const scalar_t* src, int64_t n) {
  using acc_t = accumulation_t<scalar_t>;
  constexpr int64_t width = kWidth<acc_t>;
  return {load_widened(src, std::min(n, width)),
          n > width ? load_widened(src + width, n - width) : Vectorized<acc_t>(acc_t(0))};
}

// v with the lanes from n on zeroed (n >= 2 width: all of v).
template <typename acc_t>
OFDKERN_INLINE_VEC VectorPair<acc_t> first_lanes(const VectorPair<acc_t>& v, int64_t n) {
  constexpr int64_t width = kWidth<acc_t>;
  return {first_lanes(v.low, std::min(n, width)),
          n > width ? first_lanes(v.high, std::min(n - width, width)) : Vectorized<acc_t>(acc_t(0))};
}

// Stores the first n (1 <= n <= 2 width) lanes of v at dst, rounded to scalar_t. Half precision is narrowed
// a Half vector (two accumulation vectors) at a time, which costs a quarter less than a vector at a time.
template <typename scalar_t>
void store_pair(scalar_t* dst, const VectorPair<accumulation_t<scalar_t>>& v, int64_t n) {
  using acc_t = accumulation_t<scalar_t>;
  constexpr int64_t width = kWidth<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.low.store(dst, std::min(n, width));
    if (n > width) v.high.store(dst + width, n - width);
  } else {
    at::vec::convert_from_float<scalar_t>(v.low, v.high).store(dst, n);
  }
}

// Whether an output of this many bytes is written with stream_pair: far larger than the caches, so that a
// store that first reads its line would cost a third more memory traffic than it writes.
constexpr int64_t kStreamingStoreBytes = int64_t{16} << 20;

#if defined(CPU_CAPABILITY_AVX512)
// One vector's streaming store (at a vector-aligned dst): written without reading its line first.
inline void stream_vector(float* dst, const Vectorized<float>& v) { _mm512_stream_ps(dst, v); }
inline void stream_vector(double* dst, const Vectorized<double>& v) { _mm512_stream_pd(dst, v); }
template <typename half_t>
void stream_vector(half_t* dst, const Vectorized<half_t>& v) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream_vector(float* dst, const Vectorized<float>& v) { _mm256_stream_ps(dst, v); }
inline void stream_vector(double* dst, const Vectorized<double>& v) { _mm256_stream_pd(dst, v); }
template <typename half_t>
void stream_vector(half_t* dst, const Vectorized<half_t>& v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), v);
}
#endif

// Stores a whole VectorPair (kPairWidth elements) at dst, which is cache-line aligned, rounded to scalar_t; with
// AVX2 or AVX-512 past the caches (streaming stores). A thread that streamed calls stream_fence() before its
// stores may be read.
template <typename scalar_t>
OFDKERN_INLINE_VEC void stream_pair(scalar_t* dst, const VectorPair<accumulation_t<scalar_t>>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, accumulation_t<scalar_t>>) {
    stream_vector(dst, v.low);
    stream_vector(dst + kWidth<scalar_t>, v.high);
  } else {
    stream_vector(dst, at::vec::convert_from_float<scalar_t>(v.low, v.high));
  }
#else
  store_pair(dst, v, kPairWidth<accumulation_t<scalar_t>>);
#endif
}

// Orders a thread's streaming stores before its later stores (the end of a parallel task).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// load_pair into vectors of acc_t, which need not be scalar_t's accumulation type (a float32 teacher of a
// float64 computation): then element by element.
template <typename acc_t, typename scalar_t>
OFDKERN_INLINE_VEC VectorPair<acc_t> load_pair_as(const scalar_t* src, int64_t n) {
  if constexpr (std::is_same_v<accumulation_t<scalar_t>, acc_t>) {
    return load_pair(src, n);
  } else {
    acc_t values[kPairWidth<acc_t>] = {};
    for (int64_t k = 0; k < n; ++k) values[k] = static_cast<acc_t>(src[k]);
    return {Vectorized<acc_t>::loadu(values), Vectorized<acc_t>::loadu(values + kWidth<acc_t>)};
  }
}

// store_pair from vectors of acc_t, likewise.
template <typename scalar_t, typename acc_t>
void store_pair_as(scalar_t* dst, const VectorPair<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<accumulation_t<scalar_t>, acc_t>) {
    store_pair(dst, v, n);
  } else {
    acc_t values[kPairWidth<acc_t>];
    v.low.store(values);
    v.high.store(values + kWidth<acc_t>);
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(values[k]);
  }
}

// The n elements at src in the accumulation type, into dst (half precision: widened vector by vector).
template <typename scalar_t>
void widen(const scalar_t* src, int64_t n, accumulation_t<scalar_t>* dst) {
  using acc_t = accumulation_t<scalar_t>;
  for (int64_t i = 0; i < n; i += kWidth<acc_t>) {
    const int64_t lanes = std::min(kWidth<acc_t>, n - i);
    load_widened(src + i, lanes).store(dst + i, lanes);
  }
}

// The n accumulation-type elements at src rounded into dst, two accumulation vectors at a time.
template <typename scalar_t>
void narrow(const accumulation_t<scalar_t>* src, int64_t n, scalar_t* dst) {
  using acc_t = accumulation_t<scalar_t>;
  for (int64_t i = 0; i < n; i += kPairWidth<acc_t>) {
    const int64_t lanes = std::min(kPairWidth<acc_t>, n - i);
    store_pair(dst + i, load_pair(src + i, lanes), lanes);
  }
}

// Up to kCapacity elements of an input in the accumulation type: the data itself, or (half precision) a
// widened copy.
template <typename scalar_t, int64_t kCapacity>
class InputBlock {
  using acc_t = accumulation_t<scalar_t>;
  static constexpr bool kConverts = !std::is_same_v<scalar_t, acc_t>;

 public:
  const acc_t* load(const scalar_t* src, int64_t n) {
    if constexpr (kConverts) {
      widen(src, n, buffer_);
      return buffer_;
    } else {
      return src;
    }
  }

  // The elements of the last load(src, n), not converted again.
  const acc_t* loaded(const scalar_t* src) const {
    if constexpr (kConverts) return buffer_;
    else return src;
  }

 private:
  acc_t buffer_[kConverts ? kCapacity : 1];
};

// Where up to kCapacity elements of an output are computed in the accumulation type: the output itself, or
// (half precision) a buffer that store() narrows into it.
template <typename scalar_t, int64_t kCapacity>
class OutputBlock {
  using acc_t = accumulation_t<scalar_t>;

 protected:
  static constexpr bool kConverts = !std::is_same_v<scalar_t, acc_t>;

 public:
  acc_t* data(scalar_t* dst) {
    if constexpr (kConverts) return buffer_;
    else return dst;
  }

  void store(scalar_t* dst, int64_t n) const {
    if constexpr (kConverts) narrow(buffer_, n, dst);
  }

 private:
  acc_t buffer_[kConverts ? kCapacity : 1];
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace ofdkern
