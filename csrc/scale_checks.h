// The argument checks of scale_ (schema in library.cpp), shared by its CPU kernel (cpu_scale.cpp) and its
// CUDA kernel (cuda_scale.cu).
#pragma once

#include <ATen/ATen.h>

#include "accumulation.h"

namespace ofdkern {

inline void check_scale_args(const at::Tensor& gradient, const at::Tensor& factor) {
  TORCH_CHECK_VALUE(gradient.is_non_overlapping_and_dense(), "scale_: gradient must be non-overlapping and dense");
  const auto acc = accumulation_dtype(gradient.scalar_type());
  TORCH_CHECK_VALUE(factor.dim() == 0 && factor.scalar_type() == acc && factor.device() == gradient.device(),
                    "scale_: factor must be a 0-dim ", acc, " tensor on ", gradient.device(), ", got shape ",
                    factor.sizes(), " dtype ", factor.scalar_type(), " on ", factor.device());
}

}  // namespace ofdkern
