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

#include "empty_like.h"
#include "kd_fused.h"
#include "layout.h"

namespace ofdkern {

inline KDOutputs allocate_cwd_channels_last_outputs(const at::Tensor& student, const at::Tensor& teacher,
                                                    double temperature, bool grad_student, bool grad_teacher,
                                                    EmptyLike empty_like = default_empty_like) {
  TORCH_CHECK_VALUE(student.dim() >= 3 && student.dim() <= 5,
                    "cwd_channels_last_fused: maps must be (N, C, *spatial) with 1 to 3 spatial dims, got shape ",
                    student.sizes());
  check_kd_pair("cwd_channels_last_fused", "maps", student, teacher, temperature,
                [&] { return channels_innermost(student) && channels_innermost(teacher); },
                "dense with the channels innermost (channels_last)");
  return allocate_kd_pair_outputs(student.size(0) * student.size(1), student, teacher, grad_student, grad_teacher,
                                  empty_like);
}

}  // namespace ofdkern
