// CPU kernel of the fused OFD op: one pass over student and teacher in memory order that writes the
// loss partials (or per-element losses) and the requested gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>

#include "ofd_fused.h"
#include "ofd_math.h"

namespace ofdkern {
namespace {

// Elements per partial sum. Fixed, so the summation order (and the loss bits) do not depend on the
// number of threads; large enough that the partial vector is tiny next to the features.
constexpr int64_t kChunk = 1 << 15;
// Independent accumulators per run: breaks the add dependency chain so the loop vectorizes.
constexpr int kLanes = 16;

template <typename scalar_t, typename acc_t>
struct CpuPointers {
  const scalar_t* student;
  const scalar_t* teacher;
  const acc_t* margin;
  acc_t* loss_elems;  // per-element loss (elementwise mode)
  scalar_t* grad_student;
  scalar_t* grad_teacher;
  acc_t* grad_margin;
};

// What a loop writes besides the loss partials, fixed at compile time so the hot loops are
// branch-free. kChecked: any combination, each output tested against null (the rarer cases).
template <bool kGradStudent, bool kChecked>
struct Writes {
  static constexpr bool grad_student = kGradStudent;
  static constexpr bool checked = kChecked;
};
using LossOnly = Writes<false, false>;
using LossAndStudentGrad = Writes<true, false>;
using AnyOutputs = Writes<false, true>;

template <typename W, typename scalar_t, typename acc_t>
inline acc_t ofd_element(const CpuPointers<scalar_t, acc_t>& p, int64_t i, acc_t m) {
  const acc_t t = static_cast<acc_t>(p.teacher[i]);
  const auto point = ofd_point<acc_t>(static_cast<acc_t>(p.student[i]), t, m);
  if constexpr (W::grad_student) p.grad_student[i] = static_cast<scalar_t>(point.d_student);
  if constexpr (W::checked) {
    if (p.loss_elems) p.loss_elems[i] = point.loss;
    if (p.grad_student) p.grad_student[i] = static_cast<scalar_t>(point.d_student);
    if (p.grad_teacher) p.grad_teacher[i] = static_cast<scalar_t>(teacher_grad(point.d_student, t, m));
    if (p.grad_margin) p.grad_margin[i] = margin_grad(point.d_student, t, m);
  }
  return point.loss;
}

// Memory offsets [begin, end) whose margins are margin_run[0], margin_run[step], margin_run[2 * step], ...
// (step 0: one channel for the whole run, NCHW-like; step 1: channels_last, one channel per element).
template <typename W, int64_t step, typename scalar_t, typename acc_t>
inline void ofd_run(const CpuPointers<scalar_t, acc_t>& p, int64_t begin, int64_t end,
                    const acc_t* margin_run, std::array<acc_t, kLanes>& lanes) {
  const int64_t n = end - begin;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      lanes[lane] += ofd_element<W>(p, begin + j + lane, margin_run[(j + lane) * step]);
    }
  }
  for (; j < n; ++j) lanes[j % kLanes] += ofd_element<W>(p, begin + j, margin_run[j * step]);
}

// One chunk of memory offsets, split into runs of one channel (NCHW-like) or of consecutive channels
// (channels_last). Returns the chunk's loss partial, summed in a fixed order.
template <typename W, typename scalar_t, typename acc_t>
acc_t ofd_chunk(const CpuPointers<scalar_t, acc_t>& p, ChannelIndexer index, int64_t begin,
                int64_t end) {
  std::array<acc_t, kLanes> lanes{};
  for (int64_t i = begin; i < end;) {
    if (index.channel_stride == 1) {
      const int64_t channel = i % index.channels;
      const int64_t run_end = std::min(end, i + (index.channels - channel));
      ofd_run<W, 1>(p, i, run_end, p.margin + channel, lanes);
      i = run_end;
    } else {
      const int64_t block = i / index.channel_stride;
      const int64_t run_end = std::min(end, (block + 1) * index.channel_stride);
      ofd_run<W, 0>(p, i, run_end, p.margin + block % index.channels, lanes);
      i = run_end;
    }
  }
  acc_t total = 0;
  for (acc_t lane : lanes) total += lane;
  return total;
}

template <typename W, typename scalar_t, typename acc_t>
void ofd_launch(const CpuPointers<scalar_t, acc_t>& p, ChannelIndexer index, int64_t numel,
                acc_t* partials) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const acc_t partial = ofd_chunk<W>(p, index, c * kChunk, std::min(numel, (c + 1) * kChunk));
      if (partials) partials[c] = partial;
    }
  });
}

FusedOutputs ofd_fused_cpu(const at::Tensor& student, const at::Tensor& teacher,
                           const at::Tensor& margin, bool elementwise, bool grad_student,
                           bool grad_teacher, bool grad_margin) {
  const int64_t numel = student.numel();
  auto outputs = allocate_fused_outputs(student, teacher, margin, elementwise, grad_student,
                                        grad_teacher, grad_margin, (numel + kChunk - 1) / kChunk);
  if (numel == 0) return outputs;
  const at::Tensor& loss = std::get<0>(outputs);
  const ChannelIndexer index = channel_indexer(student);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ofd_fused_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto data = [](bool wanted, const at::Tensor& out, auto type_tag) {
      using T = decltype(type_tag);
      return wanted ? out.mutable_data_ptr<T>() : static_cast<T*>(nullptr);
    };
    const CpuPointers<scalar_t, acc_t> p{
        student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(),
        margin.const_data_ptr<acc_t>(),     data(elementwise, loss, acc_t{}),
        data(grad_student, std::get<1>(outputs), scalar_t{}),
        data(grad_teacher, std::get<2>(outputs), scalar_t{}),
        data(grad_margin, std::get<3>(outputs), acc_t{})};
    acc_t* partials = elementwise ? nullptr : loss.mutable_data_ptr<acc_t>();
    // The common cases get their own branch-free loops; the rest share one general loop.
    if (elementwise || grad_teacher || grad_margin) ofd_launch<AnyOutputs>(p, index, numel, partials);
    else if (grad_student) ofd_launch<LossAndStudentGrad>(p, index, numel, partials);
    else ofd_launch<LossOnly>(p, index, numel, partials);
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) { m.impl("ofd_fused", &ofd_fused_cpu); }

}  // namespace ofdkern
