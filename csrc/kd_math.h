// Per-element math of soft-label KD (Hinton et al.) and of channel-wise distillation, which is KD over the
// positions of each channel's map, written once (for a math policy, math_policy.h) for the CPU kernels, which
// run it on at::vec vectors (kd_cpu_kernels.h), and for the CUDA kernels, which run it on scalars (kd_cuda.cu).
//
// Per row, KL(p_t || p_s) * T^2 with p = softmax(logits / T), computed from the logits relative to their row
// max, a = (s - max s) / T and b = (t - max t) / T, their exps e = exp(a), the sums
// S = sum e and the probabilities p = e / S (never the exp of a difference with log S):
//   r = log p_t - log p_s = (b - a) + log(S_s / S_t)
//   KL = sum_j p_t,j g(r_j)   with g(r) = r - 1 + exp(-r) >= 0.
// The g form adds sum p_s - sum p_t = 0 to the plain sum p_t r. Every term is non-negative, so nothing cancels
// when the rows are close (KL ~ r^2 where each p_t r is ~ r), and where all |r| are small a rounding error in
// log(S_s / S_t) moves KL only at second order. Nothing of the size of the logits themselves is ever
// subtracted (a shift of 1e3 costs no digits), and a single class gives exactly 0.
#pragma once

#include <cmath>
#include <limits>

#include "accumulation.h"
#include "math_policy.h"

namespace ofdkern {
namespace {

template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t negative_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}


// (v - shift) / T, as (v - shift) * (1 / T): a multiply for a division, one rounding more where 1 / T is not
// exact (it is for the usual T = 1, 2, 4).
template <typename V>
OFDKERN_HOST_DEVICE V kd_scaled(const V& logit, const V& shift, const V& inv_temperature) {
  return (logit - shift) * inv_temperature;
}

// Max and sum of e = exp((v - softmax_shift(max)) / T) of some logits of one row (a block, or the whole row).
template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t sum;
};

// What logits are taken relative to: their max, or 0 when that is -inf (every value is then -inf and
// exp(-inf - 0) = 0, where -inf - -inf would be NaN).
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t softmax_shift(acc_t max) {
  return max == negative_infinity<acc_t>() ? acc_t(0) : max;
}

// exp((block shift - row shift) / T): what turns a block's e into exps relative to the row max (0 for an
// all -inf block, whose e are all 0).
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t block_rescale(acc_t block_max, acc_t row_max, acc_t inv_temperature) {
  if (block_max == negative_infinity<acc_t>()) return acc_t(0);
  return std::exp(kd_scaled(block_max, softmax_shift(row_max), inv_temperature));
}

// The per-row constants of the per-class KD math.
template <typename V>
struct KDRow {
  V shift_s, shift_t;   // softmax_shift of the row maxima (logit units)
  V inv_temperature;    // 1 / T
  V temperature;
  V log_ratio;          // log(S_s / S_t): r = (b - a) + log_ratio
};

template <typename acc_t>
OFDKERN_HOST_DEVICE KDRow<acc_t> kd_row(SoftmaxStats<acc_t> student, SoftmaxStats<acc_t> teacher, acc_t temperature,
                                       acc_t inv_temperature) {
  return KDRow<acc_t>{softmax_shift(student.max), softmax_shift(teacher.max), inv_temperature, temperature,
                      std::log(student.sum / teacher.sum)};
}

// |r| below which g(r) comes from its series (above it, r + (p_s / p_t - 1) cancels at most ~5 bits).
constexpr double kKDSeriesBound = 0.5;

constexpr double inverse_factorial(int n) {
  double factorial = 1;
  for (int i = 2; i <= n; ++i) factorial *= i;
  return 1 / factorial;
}

// sum_{i=k}^{kLast} x^(i-k) / i!, by Horner's rule.
template <typename M, int k, int kLast, typename V = typename M::value>
OFDKERN_HOST_DEVICE V exp_series_tail(const V& x) {
  using S = typename M::scalar;
  constexpr S coefficient = S(inverse_factorial(k));
  if constexpr (k == kLast) return V(coefficient);
  else return exp_series_tail<M, k + 1, kLast>(x) * x + V(coefficient);
}

// g(r) = r - 1 + exp(-r) = r^2 sum_{i>=2} (-r)^(i-2) / i! for |r| < kKDSeriesBound, truncated where the
// next term is below the type's rounding (r^9 for float, r^16 for double).
template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V kd_divergence_series(const V& r) {
  constexpr int kLast = sizeof(typename M::scalar) == sizeof(double) ? 16 : 9;
  return r * r * exp_series_tail<M, 2, kLast>(V(typename M::scalar(0)) - r);
}

template <typename V>
struct KDClassTerms {
  V loss;       // the class's share of KL: p_t g(r) (a class with p_t = 0 adds its p_s, see above)
  V d_student;  // d (T^2 KL) / d s = T (p_s - p_t)
};

// One class, from its logits and its probabilities under both softmaxes.
template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE KDClassTerms<V> kd_class_terms(const V& s, const V& t, const V& p_s, const V& p_t,
                                                   const KDRow<V>& row) {
  using S = typename M::scalar;
  const V zero(S(0));
  const V r = (kd_scaled(t, row.shift_t, row.inv_temperature) - kd_scaled(s, row.shift_s, row.inv_temperature)) +
              row.log_ratio;
  const auto near_zero = M::abs(r) < V(S(kKDSeriesBound));
  const V g = kd_divergence_series<M>(r);
  // Away from r = 0: p_t g = p_t r + (p_s - p_t), with p_s for p_t exp(-r) (exact where p_t underflows);
  // p_t r is 0 where p_t is (the reference's xlogy), also for r = -inf.
  const V loss = M::select(near_zero, p_t * g, M::select(p_t > zero, p_t * r, zero) + (p_s - p_t));
  // p_s - p_t = p_t (g - r): the series form where the two probabilities nearly cancel.
  const V d_student = row.temperature * M::select(near_zero, p_t * (g - r), p_s - p_t);
  return KDClassTerms<V>{loss, d_student};
}

// d (T^2 KL) / d t = T p_t (r - KL) for one class; 0 where p_t is 0 (the limit: autograd through the
// reference's xlogy gives NaN there).
template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V kd_teacher_grad(const V& s, const V& t, const V& p_t, const KDRow<V>& row, const V& kl) {
  using S = typename M::scalar;
  const V zero(S(0));
  const V r = (kd_scaled(t, row.shift_t, row.inv_temperature) - kd_scaled(s, row.shift_s, row.inv_temperature)) +
              row.log_ratio;
  return M::select(p_t > zero, row.temperature * p_t * (r - kl), zero);
}

}  // namespace
}  // namespace ofdkern
