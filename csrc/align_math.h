// Per-element math of the channel-wise alignment loss (Liu et al., ICCVW 2023), written once (for a math
// policy, math_policy.h) for the CPU kernels, which run it on at::vec vectors (align_cpu_kernels.h), and the
// CUDA kernels, which run it on scalars (align_cuda.cu): the MLP's ReLU and its backward as autograd takes
// them through torch.relu, and the plain L2 of the projected student against the teacher (the OFD variant
// uses ofd_math.h).
#pragma once

#include "accumulation.h"
#include "math_policy.h"
#include "ofd_math.h"

namespace ofdkern {
namespace {

// torch.relu: NaN stays NaN.
template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V relu(const V& x) {
  using S = typename M::scalar;
  return M::select((x > V(S(0))) | (x != x), x, V(S(0)));
}

// d relu(x) / d x applied to grad, given h = relu(x): 0 where h <= 0, grad elsewhere (so NaN passes on).
template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V relu_backward(const V& grad, const V& h) {
  using S = typename M::scalar;
  return M::select(h <= V(S(0)), V(S(0)), grad);
}

// (y - t)^2 and its derivative wrt y; the teacher's is the negation.
template <typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE OFDPoint<V> l2_point(const V& y, const V& t) {
  using S = typename M::scalar;
  const V diff = y - t;
  return OFDPoint<V>{diff * diff, V(S(2)) * diff};
}

// The loss of one projected value y (bias included) against teacher t, with margin m when kOFD.
template <bool kOFD, typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE OFDPoint<V> align_point(const V& y, const V& t, const V& m) {
  if constexpr (kOFD) {
    return ofd_point<M>(y, t, m);
  } else {
    return l2_point<M>(y, t);
  }
}

// The teacher's gradient from d_y: the OFD split at the margin, or -d_y for plain L2.
template <bool kOFD, typename M, typename V = typename M::value>
OFDKERN_HOST_DEVICE V align_teacher_grad(const V& d_y, const V& t, const V& m) {
  if constexpr (kOFD) {
    return teacher_grad<M>(d_y, t, m);
  } else {
    return -d_y;
  }
}

}  // namespace
}  // namespace ofdkern
