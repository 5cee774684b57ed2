// Per-element math of the OFD loss (Heo et al., ICCV 2019), shared by the CPU and CUDA kernels.
//
// Mirrors the reference `distillation_loss`:
//   t' = max(t, m)                        (torch.maximum: NaN in either argument propagates)
//   l  = (s - t')^2 * [(s > t') | (t' > 0)]   (the mask multiplies, so inf * 0 gives NaN as in eager)
// and the derivatives autograd takes through it (the mask is not differentiated; torch.maximum
// sends half of the gradient to each side at an exact tie t == m).
#pragma once

#include "accumulation.h"

namespace ofdkern {

template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t margin_relu(acc_t t, acc_t m) {
  // t != t is true only for NaN: keep it, like torch.maximum does. Bitwise | (not ||) keeps the
  // math branch-free so the CPU loops vectorize and random data costs no mispredictions.
  return ((t > m) | (t != t)) ? t : m;
}

template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t partial_l2_mask(acc_t s, acc_t t_prime) {
  return static_cast<acc_t>((s > t_prime) | (t_prime > acc_t(0)));
}

template <typename acc_t>
struct OFDPoint {
  acc_t loss;       // (s - t')^2 * mask
  acc_t d_student;  // d loss / d s = 2 (s - t') * mask; d loss / d t' is its negation
};

template <typename acc_t>
OFDKERN_HOST_DEVICE OFDPoint<acc_t> ofd_point(acc_t s, acc_t t, acc_t m) {
  const acc_t t_prime = margin_relu(t, m);
  const acc_t mask = partial_l2_mask(s, t_prime);
  const acc_t diff = s - t_prime;
  return OFDPoint<acc_t>{diff * diff * mask, acc_t(2) * diff * mask};
}

// Share of d loss / d t' that reaches the teacher (masked_fill semantics: exactly 0 below the margin,
// even when d_student is NaN or inf).
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t teacher_grad(acc_t d_student, acc_t t, acc_t m) {
  const acc_t share = (t == m) ? -d_student * acc_t(0.5) : -d_student;
  return (t < m) ? acc_t(0) : share;
}

// Share of d loss / d t' that reaches the margin (exactly 0 above the margin).
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t margin_grad(acc_t d_student, acc_t t, acc_t m) {
  const acc_t share = (t == m) ? -d_student * acc_t(0.5) : -d_student;
  return (t > m) ? acc_t(0) : share;
}

}  // namespace ofdkern
