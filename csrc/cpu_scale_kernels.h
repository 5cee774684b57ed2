// The CPU kernel of scale_ (cpu_scale.h) on at::vec vectors of the instruction set CPU_CAPABILITY. Included by
// cpu_isa_<isa>.cpp, after cpu_isa_prelude.h and that file's #pragma GCC target.
//
// Each element is widened to the accumulation type, multiplied by the factor (kept in that type) and rounded
// once, the bits of torch's mul_ by a 0-dim tensor. Half precision is converted a vector pair at a time: torch's
// mul_ of a bfloat16 gradient runs at about a tenth of the copy bandwidth on this build's 2-core Xeon.
#pragma once

#include "cpu_scale.h"
#include "cpu_vec.h"

namespace ofdkern {
namespace CPU_CAPABILITY {
namespace {

// Vector pairs per parallel task (256 KiB and more of gradient): short gradients stay on one thread.
constexpr int64_t kScaleGrainPairs = 2048;

template <typename scalar_t>
void scale_typed(const at::Tensor& gradient, const at::Tensor& factor) {
  using acc_t = accumulation_t<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t step = kPairWidth<acc_t>;
  scalar_t* data = gradient.mutable_data_ptr<scalar_t>();
  const Vec by(*factor.const_data_ptr<acc_t>());
  const int64_t numel = gradient.numel();
  at::parallel_for(0, (numel + step - 1) / step, kScaleGrainPairs, [&](int64_t first, int64_t last) {
    const int64_t end = std::min(last * step, numel);
    for (int64_t i = first * step; i < end; i += step) {
      const int64_t n = std::min(step, numel - i);
      const VectorPair<acc_t> v = load_pair(data + i, n);
      store_pair(data + i, VectorPair<acc_t>{v.low * by, v.high * by}, n);
    }
  });
}

void scale_kernel(const at::Tensor& gradient, const at::Tensor& factor) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gradient.scalar_type(), "scale_cpu",
                                  [&] { scale_typed<scalar_t>(gradient, factor); });
}

}  // namespace

const ScaleCpuKernels kScaleCpuKernels{&scale_kernel};

}  // namespace CPU_CAPABILITY
}  // namespace ofdkern
