// Per-element math of attention transfer (Zagoruyko & Komodakis; FRSKD's feature loss), written once (for a
// math policy, math_policy.h) for the CPU kernels, which run it on at::vec vectors
// (attention_transfer_cpu_kernels.h), and for the CUDA kernels, which run it on scalars
// (attention_transfer_cuda.cu).
//
// The map of a feature is a = mean_c(f^p), F.normalize divides it by max(|a|, 1e-12), and the loss of a sample
// is sum_j (u_s,j - u_t,j)^2 with u = a / max(|a|, eps).
#pragma once

#include <type_traits>

#include "accumulation.h"
#include "math_policy.h"

namespace ofdkern {
namespace {

// Exponents with code of their own: f^2 is a multiply and f^1 a copy (p = 2 is FRSKD's); any other p uses pow.
constexpr int kAnyExponent = 0;

// Runs body(std::integral_constant<int, kind>) with the exponent kind of p (host code).
template <typename Body>
void with_attention_exponent(double p, Body&& body) {
  if (p == 2) body(std::integral_constant<int, 2>{});
  else if (p == 1) body(std::integral_constant<int, 1>{});
  else body(std::integral_constant<int, kAnyExponent>{});
}

// f^p as torch.pow computes it.
template <typename M, int kExponent, typename V = typename M::value>
OFDKERN_HOST_DEVICE V attention_power(const V& x, const V& p) {
  if constexpr (kExponent == 2) return x * x;
  else if constexpr (kExponent == 1) return x;
  else return M::pow(x, p);
}

// d f^p / d f = p f^(p-1), as autograd takes it through torch.pow.
template <typename M, int kExponent, typename V = typename M::value>
OFDKERN_HOST_DEVICE V attention_power_grad(const V& x, const V& p) {
  using S = typename M::scalar;
  if constexpr (kExponent == 2) return V(S(2)) * x;
  else if constexpr (kExponent == 1) return V(S(1));
  else return p * M::pow(x, p - V(S(1)));
}

// F.normalize's eps: the map's norm is clamped below at it.
constexpr double kNormalizeEps = 1e-12;

// max(norm, eps), keeping a NaN norm like clamp_min does.
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t normalize_divisor(acc_t norm) {
  return norm < acc_t(kNormalizeEps) ? acc_t(kNormalizeEps) : norm;
}

// d/d a_j of <g, a / max(|a|, eps)> as autograd takes it through F.normalize: the projection off the map's
// direction u, (g_j - u_j <g, u>) / |a|, where |a| >= eps; g_j / eps below (the clamp passes no gradient).
template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V normalize_grad(const V& g, const V& u, const V& g_dot_u, const V& norm) {
  using S = typename M::scalar;
  const V eps(static_cast<S>(kNormalizeEps));
  return M::select(norm >= eps, (g - u * g_dot_u) / norm, g / eps);
}

}  // namespace
}  // namespace ofdkern
