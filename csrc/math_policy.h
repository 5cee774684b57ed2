// The math policies of the per-element math headers (<op>_math.h). Each of their
// functions is written once for a policy M: it computes on M::value, which is M::scalar in the CUDA kernels and
// in scalar CPU code (ScalarMath, below) and an at::vec vector of it in the vectorized CPU kernels (VecMath,
// cpu_vec.h), and calls M::abs / pow / max / select; comparisons of values give select's mask.
//
// Internal linkage here and in those headers: the CPU kernels compile them once per instruction set
// (cpu_isa_<isa>.cpp), and those copies must not be merged by the linker.
#pragma once

#include <cmath>

#include "accumulation.h"

namespace ofdkern {
namespace {

template <typename acc_t>
struct ScalarMath {
  using scalar = acc_t;
  using value = acc_t;
  static OFDKERN_HOST_DEVICE acc_t abs(acc_t x) { return std::abs(x); }
  static OFDKERN_HOST_DEVICE acc_t pow(acc_t x, acc_t p) { return std::pow(x, p); }
  // NaN-propagating, like torch.max.
  static OFDKERN_HOST_DEVICE acc_t max(acc_t a, acc_t b) { return (a > b || a != a) ? a : b; }
  static OFDKERN_HOST_DEVICE acc_t select(bool mask, acc_t if_true, acc_t if_false) {
    return mask ? if_true : if_false;
  }
};

}  // namespace
}  // namespace ofdkern
