// Contract of CWD's channels_last CPU kernel: argument checks and output allocation. NCHW maps need no kernel
// of their own: ofdkern/ops/cwd.py runs the KD op (kd_fused.h) on their (N * C, positions) rows.
//
// Schema (defined in cwd_op.cpp):
//   cwd_channels_last_fused(Tensor student, Tensor teacher, float temperature, bool grad_student,
//                           bool grad_teacher) -> (Tensor row_loss, Tensor grad_student, Tensor grad_teacher)
//       student, teacher: (N, C, *spatial) maps of one dtype with 1 to 3 spatial dims, dense with the channels
//       innermost (channels_last). row_loss: (N * C,) KL * T^2 of each (n, c) map's softmax over its
//       positions, in the accumulation dtype: the kd_fused row losses of the maps' NCHW rows, bit for bit. The
//       gradients are those of sum(row_loss), with the maps' strides, or empty when not asked.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "accumulation.h"
#include "empty_like.h"
#include "kd_fused.h"

namespace ofdkern {

// Whether the channels are innermost and the rest dense in (N, *spatial) order: channels_last (3d) strides.
inline bool channels_innermost(const at::Tensor& maps) {
  if (maps.size(1) != 1 && maps.stride(1) != 1) return false;
  int64_t expected = maps.size(1);
  for (int64_t d = maps.dim() - 1; d >= 2; --d) {
    if (maps.size(d) != 1 && maps.stride(d) != expected) return false;
    expected *= maps.size(d);
  }
  return maps.size(0) == 1 || maps.stride(0) == expected;
}

inline KDOutputs allocate_cwd_channels_last_outputs(const at::Tensor& student, const at::Tensor& teacher,
                                                    double temperature, bool grad_student, bool grad_teacher,
                                                    EmptyLike empty_like = default_empty_like) {
  TORCH_CHECK_VALUE(student.dim() >= 3 && student.dim() <= 5,
                    "cwd_channels_last_fused: maps must be (N, C, *spatial) with 1 to 3 spatial dims, got shape ",
                    student.sizes());
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "cwd_channels_last_fused: student ", student.sizes(),
                    " and teacher ", teacher.sizes(), " differ in shape");
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), "cwd_channels_last_fused: student dtype ",
                   student.scalar_type(), " differs from teacher dtype ", teacher.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(student.scalar_type()),
                   "cwd_channels_last_fused: maps must be floating point, got ", student.scalar_type());
  TORCH_CHECK_VALUE(channels_innermost(student) && channels_innermost(teacher),
                    "cwd_channels_last_fused: maps must be dense with the channels innermost (channels_last)");
  TORCH_CHECK_VALUE(student.device() == teacher.device(),
                    "cwd_channels_last_fused: student and teacher must be on one device");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
                    "cwd_channels_last_fused: temperature must be positive and finite, got ", temperature);
  const auto acc_options = student.options().dtype(accumulation_dtype(student.scalar_type()));
  auto maybe = [empty_like](bool wanted, const at::Tensor& like) {
    return wanted ? empty_like(like, like.options()) : at::empty({0}, like.options());
  };
  return {at::empty({student.size(0) * student.size(1)}, acc_options), maybe(grad_student, student),
          maybe(grad_teacher, teacher)};
}

}  // namespace ofdkern
