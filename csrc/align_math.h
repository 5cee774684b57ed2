// Per-element math of the channel-wise alignment loss (Liu et al., ICCVW 2023), shared by the CPU and CUDA
// kernels: the MLP's ReLU and its backward as autograd takes them through torch.relu, and the plain L2 of the
// projected student against the teacher (the OFD variant uses ofd_math.h).
#pragma once

#include "accumulation.h"
#include "ofd_math.h"

namespace ofdkern {

// torch.relu: NaN stays NaN. Bitwise | keeps it branch-free (the CPU loops vectorize).
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t relu(acc_t x) {
  return ((x > acc_t(0)) | (x != x)) ? x : acc_t(0);
}

// d relu(x) / d x applied to grad, given h = relu(x): 0 where h <= 0, grad elsewhere (so NaN passes on).
template <typename acc_t>
OFDKERN_HOST_DEVICE acc_t relu_backward(acc_t grad, acc_t h) {
  return h <= acc_t(0) ? acc_t(0) : grad;
}

// (y - t)^2 and its derivative wrt y; the teacher's is the negation.
template <typename acc_t>
OFDKERN_HOST_DEVICE OFDPoint<acc_t> l2_point(acc_t y, acc_t t) {
  const acc_t diff = y - t;
  return OFDPoint<acc_t>{diff * diff, acc_t(2) * diff};
}

// The loss of one projected value y (bias included) against teacher t, with margin m when kOFD.
template <bool kOFD, typename acc_t>
OFDKERN_HOST_DEVICE OFDPoint<acc_t> align_point(acc_t y, acc_t t, acc_t m) {
  if constexpr (kOFD) {
    return ofd_point<acc_t>(y, t, m);
  } else {
    return l2_point<acc_t>(y, t);
  }
}

// The teacher's gradient from d_y: the OFD split at the margin, or -d_y for plain L2.
template <bool kOFD, typename acc_t>
OFDKERN_HOST_DEVICE acc_t align_teacher_grad(acc_t d_y, acc_t t, acc_t m) {
  if constexpr (kOFD) {
    return teacher_grad<acc_t>(d_y, t, m);
  } else {
    return -d_y;
  }
}

}  // namespace ofdkern
