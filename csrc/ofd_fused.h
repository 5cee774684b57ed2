// The fused OFD op shared by the CPU and CUDA kernels: argument checks, output allocation and the
// channel indexing of a dense tensor walked in memory order.
//
// Schema (defined in ofd_op.cpp, same for the Triton kernel in ofdkern/kernels/ofd_triton.py):
//   ofd_fused(Tensor student, Tensor teacher, Tensor margin, bool elementwise,
//             bool grad_student, bool grad_teacher, bool grad_margin)
//     -> (Tensor loss, Tensor grad_student, Tensor grad_teacher, Tensor grad_margin)
//
// student and teacher: same sizes, dtype and strides, non-overlapping and dense (NCHW, channels_last or
// any permutation). margin: contiguous (C,) in the accumulation dtype (float64 for float64 features,
// float32 otherwise). Outputs:
//   loss          elementwise: per-element loss laid out like student, accumulation dtype;
//                 otherwise: 1-D partial sums (accumulation dtype) whose fixed-order sum is the loss.
//   grad_student  d loss / d student (unit upstream gradient) like student, or empty when not asked.
//   grad_teacher  d loss / d teacher like teacher, or empty.
//   grad_margin   per-element d loss / d margin like student in the accumulation dtype (reduced over
//                 the non-channel dims by the caller), or empty.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <type_traits>

#include "accumulation.h"
#include "empty_like.h"

namespace ofdkern {

using FusedOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validates the fused op's inputs (the Python layer already gave the user a clear error; these
// guard direct calls of the op) and allocates the outputs. partial_count is the length of the
// partial-sum vector when the loss is reduced.
// empty_like allocates the feature-sized outputs (the CPU kernel passes its huge-page allocator).
inline FusedOutputs allocate_fused_outputs(const at::Tensor& student, const at::Tensor& teacher,
                                           const at::Tensor& margin, bool elementwise,
                                           bool grad_student, bool grad_teacher, bool grad_margin,
                                           int64_t partial_count,
                                           EmptyLike empty_like = default_empty_like) {
  TORCH_CHECK_VALUE(student.dim() >= 2, "ofd_fused: student must have a channel dim 1, got shape ",
              student.sizes());
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "ofd_fused: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " differ in shape");
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), "ofd_fused: student dtype ",
              student.scalar_type(), " differs from teacher dtype ", teacher.scalar_type());
  TORCH_CHECK_VALUE(student.strides() == teacher.strides(),
              "ofd_fused: student and teacher must share strides, got ", student.strides(), " and ",
              teacher.strides());
  TORCH_CHECK_VALUE(student.is_non_overlapping_and_dense(),
              "ofd_fused: student must be non-overlapping and dense");
  const auto acc = accumulation_dtype(student.scalar_type());
  TORCH_CHECK_VALUE(margin.dim() == 1 && margin.size(0) == student.size(1) && margin.is_contiguous() &&
                  margin.scalar_type() == acc,
              "ofd_fused: margin must be a contiguous (", student.size(1), ",) tensor of dtype ",
              acc, ", got shape ", margin.sizes(), " dtype ", margin.scalar_type());
  TORCH_CHECK_VALUE(student.device() == teacher.device() && student.device() == margin.device(),
              "ofd_fused: student, teacher and margin must be on one device");

  const auto acc_options = student.options().dtype(acc);
  at::Tensor loss = elementwise ? empty_like(student, acc_options)
                                : at::empty({partial_count}, acc_options);
  auto maybe = [empty_like](bool wanted, const at::Tensor& like, at::TensorOptions options) {
    return wanted ? empty_like(like, options) : at::empty({0}, options);
  };
  return {loss, maybe(grad_student, student, student.options()),
          maybe(grad_teacher, teacher, teacher.options()), maybe(grad_margin, student, acc_options)};
}

// Raw pointers of one fused call; null for the outputs not asked for.
template <typename scalar_t, typename acc_t>
struct FusedPointers {
  const scalar_t* student;
  const scalar_t* teacher;
  const acc_t* margin;
  acc_t* loss_elems;  // per-element loss (elementwise mode), else null: the loss output holds partials
  scalar_t* grad_student;
  scalar_t* grad_teacher;
  acc_t* grad_margin;
};

template <typename scalar_t, typename acc_t>
FusedPointers<scalar_t, acc_t> fused_pointers(const at::Tensor& student, const at::Tensor& teacher,
                                              const at::Tensor& margin, const FusedOutputs& outputs,
                                              bool elementwise) {
  auto data = [](const at::Tensor& out, auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    return out.numel() ? out.mutable_data_ptr<T>() : static_cast<T*>(nullptr);
  };
  return {student.const_data_ptr<scalar_t>(),
          teacher.const_data_ptr<scalar_t>(),
          margin.const_data_ptr<acc_t>(),
          elementwise ? data(std::get<0>(outputs), static_cast<acc_t*>(nullptr)) : nullptr,
          data(std::get<1>(outputs), static_cast<scalar_t*>(nullptr)),
          data(std::get<2>(outputs), static_cast<scalar_t*>(nullptr)),
          data(std::get<3>(outputs), static_cast<acc_t*>(nullptr))};
}

// Elements at memory offsets [k * channel_stride, (k + 1) * channel_stride) of a dense tensor share
// channel k % channels; with channel_stride == 1 (channels_last) the channel advances every element.
struct ChannelIndexer {
  int64_t channel_stride;
  int64_t channels;
};

inline ChannelIndexer channel_indexer(const at::Tensor& dense) {
  // A size-1 channel dim may carry any stride; every element is then channel 0.
  return ChannelIndexer{dense.size(1) == 1 ? 1 : dense.stride(1), dense.size(1)};
}

}  // namespace ofdkern
