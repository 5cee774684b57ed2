// Contract of the fused KD op shared by its kernels: argument checks and output allocation.
//
// Schema (defined in kd_op.cpp; the Triton kernel in ofdkern/kernels/kd_triton.py takes the same):
//   kd_fused(Tensor student, Tensor teacher, float temperature, bool grad_student, bool grad_teacher)
//       -> (Tensor row_loss, Tensor grad_student, Tensor grad_teacher)
//       student, teacher: contiguous (N, K) logits of one dtype. row_loss: (N,) KL * T^2 per row in the
//       accumulation dtype (0 for K = 0). The gradients are those of sum(row_loss), like the logits, or
//       empty when not asked.
// Channel-wise distillation (ofdkern.cwd_loss) calls it on the (N * C, positions) rows of NCHW maps.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "accumulation.h"
#include "empty_like.h"

namespace ofdkern {

using KDOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline KDOutputs allocate_kd_outputs(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                     bool grad_student, bool grad_teacher,
                                     EmptyLike empty_like = default_empty_like) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kd_fused: student must be (N, K) logits, got shape ", student.sizes());
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "kd_fused: student ", student.sizes(), " and teacher ",
                    teacher.sizes(), " differ in shape");
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), "kd_fused: student dtype ",
                   student.scalar_type(), " differs from teacher dtype ", teacher.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(student.scalar_type()), "kd_fused: logits must be floating point, got ",
                   student.scalar_type());
  TORCH_CHECK_VALUE(student.is_contiguous() && teacher.is_contiguous(), "kd_fused: logits must be contiguous");
  TORCH_CHECK_VALUE(student.device() == teacher.device(), "kd_fused: student and teacher must be on one device");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
                    "kd_fused: temperature must be positive and finite, got ", temperature);
  const auto acc_options = student.options().dtype(accumulation_dtype(student.scalar_type()));
  auto maybe = [empty_like](bool wanted, const at::Tensor& like) {
    return wanted ? empty_like(like, like.options()) : at::empty({0}, like.options());
  };
  return {at::empty({student.size(0)}, acc_options), maybe(grad_student, student), maybe(grad_teacher, teacher)};
}

}  // namespace ofdkern
