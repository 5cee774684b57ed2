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

// The checks of a student and teacher pair that kd_fused and cwd_channels_last_fused (cwd_fused.h) share, in
// this order: shape, dtype, floating point, the op's layout (layout_ok(), else "<op>: <noun> must be <layout>"),
// device and temperature.
template <typename LayoutOk>
void check_kd_pair(const char* op, const char* noun, const at::Tensor& student, const at::Tensor& teacher,
                   double temperature, LayoutOk layout_ok, const char* layout) {
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), op, ": student ", student.sizes(), " and teacher ",
                    teacher.sizes(), " differ in shape");
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), op, ": student dtype ", student.scalar_type(),
                   " differs from teacher dtype ", teacher.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(student.scalar_type()), op, ": ", noun, " must be floating point, got ",
                   student.scalar_type());
  TORCH_CHECK_VALUE(layout_ok(), op, ": ", noun, " must be ", layout);
  TORCH_CHECK_VALUE(student.device() == teacher.device(), op, ": student and teacher must be on one device");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), op,
                    ": temperature must be positive and finite, got ", temperature);
}

// The outputs of `rows` rows: their losses in the accumulation dtype, and the gradients asked for, like the
// inputs (empty when not asked).
inline KDOutputs allocate_kd_pair_outputs(int64_t rows, const at::Tensor& student, const at::Tensor& teacher,
                                          bool grad_student, bool grad_teacher, EmptyLike empty_like) {
  const auto acc_options = student.options().dtype(accumulation_dtype(student.scalar_type()));
  auto maybe = [empty_like](bool wanted, const at::Tensor& like) {
    return wanted ? empty_like(like, like.options()) : at::empty({0}, like.options());
  };
  return {at::empty({rows}, acc_options), maybe(grad_student, student), maybe(grad_teacher, teacher)};
}

inline KDOutputs allocate_kd_outputs(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                     bool grad_student, bool grad_teacher,
                                     EmptyLike empty_like = default_empty_like) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kd_fused: student must be (N, K) logits, got shape ", student.sizes());
  check_kd_pair("kd_fused", "logits", student, teacher, temperature,
                [&] { return student.is_contiguous() && teacher.is_contiguous(); }, "contiguous");
  return allocate_kd_pair_outputs(student.size(0), student, teacher, grad_student, grad_teacher, empty_like);
}

}  // namespace ofdkern
