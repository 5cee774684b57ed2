// Per-element math of the FRSKD losses (Ji et al., CVPR 2021), written for both the CPU and the CUDA kernels
// (host/device functions); today only the CPU kernels (frskd_cpu.cpp) include it.
//
// Attention transfer: the attention map of a feature is mean_c(f^p); its derivative wrt f is p f^(p-1) / C.
// Soft-label KD: per row, KL(softmax(t/T) || softmax(s/T)) * T^2, computed from an online (max, sum)
// state of both rows so a row of any width is read once for the loss.
#pragma once

#include <cmath>
#include <limits>

#include "accumulation.h"

namespace ofdkern {

// f^p as torch.pow computes it; p = 2 and p = 1 (the common exponents) skip pow. The branches depend
// only on p, so they are uniform over a kernel.
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t attention_power(acc_t x, acc_t p) {
  if (p == acc_t(2)) return x * x;
  if (p == acc_t(1)) return x;
  return std::pow(x, p);
}

// d f^p / d f = p f^(p-1), as autograd takes it through torch.pow.
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t attention_power_grad(acc_t x, acc_t p) {
  if (p == acc_t(2)) return acc_t(2) * x;
  if (p == acc_t(1)) return acc_t(1);
  return p * std::pow(x, p - acc_t(1));
}

// Running state of one KD row: both rows' max and sum of exp(v - max) (softmax normalizers), and
// cross = sum exp(y - max_t) (y - x), which gives sum_j p_t,j (y_j - x_j) once divided by sum_t.
// x = s / T (student), y = t / T (teacher).
template <typename acc_t>
struct KDRowState {
  acc_t max_s = -std::numeric_limits<acc_t>::infinity();
  acc_t sum_s = 0;
  acc_t max_t = -std::numeric_limits<acc_t>::infinity();
  acc_t sum_t = 0;
  acc_t cross = 0;
};

// exp(old_max - new_max): the factor that rescales sums kept against old_max; 0 while nothing was summed.
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t rescale_factor(acc_t old_max, acc_t new_max) {
  return old_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : std::exp(old_max - new_max);
}

// The value exp(v - shift) is taken against: the running max, or 0 while it is -inf (then every value
// seen is -inf and exp(-inf - 0) = 0, where exp(-inf - -inf) would be NaN).
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t softmax_shift(acc_t running_max) {
  return running_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : running_max;
}

// One teacher term of cross: exp(y - shift_t) (y - x), exactly 0 where the teacher probability is 0
// (y = -inf gives 0 * -inf in the product; the reference's xlogy makes it 0).
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t kd_cross_term(acc_t x, acc_t y, acc_t shift_t) {
  const acc_t e = std::exp(y - shift_t);
  return e > acc_t(0) ? e * (y - x) : acc_t(0);
}

// Log-normalizers and the unscaled KL of a finished row.
template <typename acc_t>
struct KDRowResult {
  acc_t log_z_s;
  acc_t log_z_t;
  acc_t kl;  // KL(p_t || p_s), before the T^2 factor
};

template <typename acc_t>
OFDKERN_HOST_DEVICE KDRowResult<acc_t> kd_finish(const KDRowState<acc_t>& st) {
  const acc_t log_z_s = st.max_s + std::log(st.sum_s);
  const acc_t log_z_t = st.max_t + std::log(st.sum_t);
  // KL = sum p_t ((y - log_z_t) - (x - log_z_s)).
  return KDRowResult<acc_t>{log_z_s, log_z_t, st.cross / st.sum_t - log_z_t + log_z_s};
}

// Gradients of KL * T^2 for one class: wrt s, T (p_s - p_t); wrt t, T p_t (log p_t - log p_s - KL)
// (0 where p_t is 0, as autograd through the reference's xlogy gives).
template <typename acc_t>
struct KDClassGrad {
  acc_t d_student;
  acc_t d_teacher;
};

template <typename acc_t>
OFDKERN_HOST_DEVICE KDClassGrad<acc_t> kd_class_grad(acc_t x, acc_t y, const KDRowResult<acc_t>& row,
                                                    acc_t temperature) {
  const acc_t log_p_s = x - row.log_z_s;
  const acc_t log_p_t = y - row.log_z_t;
  const acc_t p_t = std::exp(log_p_t);
  const acc_t d_teacher = p_t > acc_t(0) ? temperature * p_t * (log_p_t - log_p_s - row.kl) : acc_t(0);
  return KDClassGrad<acc_t>{temperature * (std::exp(log_p_s) - p_t), d_teacher};
}

}  // namespace ofdkern
