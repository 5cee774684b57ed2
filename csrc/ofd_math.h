// Per-element math of the OFD loss (Heo et al., ICCV 2019), written once (for a math policy, math_policy.h) for
// the CPU kernels (scalars in ofd_cpu.cpp, at::vec vectors in the channel alignment's) and the CUDA kernels.
//
// Mirrors the reference `distillation_loss`:
//   t' = max(t, m)                        (torch.maximum: NaN in either argument propagates)
//   l  = (s - t')^2 * [(s > t') | (t' > 0)]   (the mask multiplies, so inf * 0 gives NaN as in eager)
// and the derivatives autograd takes through it (the mask is not differentiated; torch.maximum
// sends half of the gradient to each side at an exact tie t == m).
#pragma once

#include "accumulation.h"
#include "math_policy.h"

namespace ofdkern {
namespace {

template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V margin_relu(const V& t, const V& m) {
  // t != t is true only for NaN: keep it, like torch.maximum does. Bitwise | (not ||) keeps the
  // math branch-free so the CPU loops vectorize and random data costs no mispredictions.
  return M::select((t > m) | (t != t), t, m);
}

template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V partial_l2_mask(const V& s, const V& t_prime) {
  using S = typename M::scalar;
  return M::select((s > t_prime) | (t_prime > V(S(0))), V(S(1)), V(S(0)));
}

template <typename V>
struct OFDPoint {
  V loss;       // (s - t')^2 * mask
  V d_student;  // d loss / d s = 2 (s - t') * mask; d loss / d t' is its negation
};

template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE OFDPoint<V> ofd_point(const V& s, const V& t, const V& m) {
  using S = typename M::scalar;
  const V t_prime = margin_relu<M>(t, m);
  const V mask = partial_l2_mask<M>(s, t_prime);
  const V diff = s - t_prime;
  return OFDPoint<V>{diff * diff * mask, V(S(2)) * diff * mask};
}

// Share of d loss / d t' that reaches the teacher (masked_fill semantics: exactly 0 below the margin,
// even when d_student is NaN or inf).
template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V teacher_grad(const V& d_student, const V& t, const V& m) {
  using S = typename M::scalar;
  const V share = M::select(t == m, -d_student * V(S(0.5)), -d_student);
  return M::select(t < m, V(S(0)), share);
}

// Share of d loss / d t' that reaches the margin (exactly 0 above the margin).
template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V margin_grad(const V& d_student, const V& t, const V& m) {
  using S = typename M::scalar;
  const V share = M::select(t == m, -d_student * V(S(0.5)), -d_student);
  return M::select(t > m, V(S(0)), share);
}

}  // namespace
}  // namespace ofdkern
