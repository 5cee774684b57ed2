// CPU kernel of the fused OFD op: one pass over student and teacher in memory order that writes the
// loss partials (or per-element losses) and the requested gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "ofd_fused.h"
#include "ofd_math.h"

namespace ofdkern {
namespace {

// Elements per partial sum. Fixed, so the summation order (and the loss bits) do not depend on the
// number of threads; large enough that the partial vector is tiny next to the features.
constexpr int64_t kChunk = 1 << 15;
// Independent accumulators per chunk: breaks the add dependency chain so the loop vectorizes.
constexpr int kLanes = 8;

template <typename scalar_t, typename acc_t>
struct CpuPointers {
  const scalar_t* student;
  const scalar_t* teacher;
  const acc_t* margin;
  acc_t* loss_elems;      // per-element loss, or null when the loss is reduced
  scalar_t* grad_student;  // null when not asked
  scalar_t* grad_teacher;
  acc_t* grad_margin;
};

// Processes memory offsets [begin, end) whose margins are margin_run[0 * step], margin_run[1 * step], ...
// (step 0: one channel for the whole run; step 1: channels_last, one channel per element).
template <typename scalar_t, typename acc_t, int64_t step>
inline void ofd_run(const CpuPointers<scalar_t, acc_t>& p, int64_t begin, int64_t end,
                    const acc_t* margin_run, std::array<acc_t, kLanes>& lanes) {
  const int64_t n = end - begin;
  const scalar_t* s = p.student + begin;
  const scalar_t* t = p.teacher + begin;
  const bool reduce = p.loss_elems == nullptr;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const int64_t k = j + lane;
      const acc_t m = margin_run[k * step];
      const acc_t tv = static_cast<acc_t>(t[k]);
      const auto point = ofd_point<acc_t>(static_cast<acc_t>(s[k]), tv, m);
      if (reduce) lanes[lane] += point.loss;
      else p.loss_elems[begin + k] = point.loss;
      if (p.grad_student) p.grad_student[begin + k] = static_cast<scalar_t>(point.d_student);
      if (p.grad_teacher)
        p.grad_teacher[begin + k] = static_cast<scalar_t>(teacher_grad(point.d_student, tv, m));
      if (p.grad_margin) p.grad_margin[begin + k] = margin_grad(point.d_student, tv, m);
    }
  }
  for (; j < n; ++j) {
    const acc_t m = margin_run[j * step];
    const acc_t tv = static_cast<acc_t>(t[j]);
    const auto point = ofd_point<acc_t>(static_cast<acc_t>(s[j]), tv, m);
    if (reduce) lanes[j % kLanes] += point.loss;
    else p.loss_elems[begin + j] = point.loss;
    if (p.grad_student) p.grad_student[begin + j] = static_cast<scalar_t>(point.d_student);
    if (p.grad_teacher)
      p.grad_teacher[begin + j] = static_cast<scalar_t>(teacher_grad(point.d_student, tv, m));
    if (p.grad_margin) p.grad_margin[begin + j] = margin_grad(point.d_student, tv, m);
  }
}

// One chunk of memory offsets, split into runs over which the margin is constant (NCHW-like) or
// advances with the element (channels_last).
template <typename scalar_t, typename acc_t>
acc_t ofd_chunk(const CpuPointers<scalar_t, acc_t>& p, ChannelIndexer index, int64_t begin,
                int64_t end) {
  std::array<acc_t, kLanes> lanes{};
  int64_t i = begin;
  while (i < end) {
    if (index.channel_stride == 1) {
      const int64_t channel = i % index.channels;
      const int64_t run_end = std::min(end, i + (index.channels - channel));
      ofd_run<scalar_t, acc_t, 1>(p, i, run_end, p.margin + channel, lanes);
      i = run_end;
    } else {
      const int64_t block = i / index.channel_stride;
      const int64_t run_end = std::min(end, (block + 1) * index.channel_stride);
      ofd_run<scalar_t, acc_t, 0>(p, i, run_end, p.margin + block % index.channels, lanes);
      i = run_end;
    }
  }
  acc_t total = 0;
  for (acc_t lane : lanes) total += lane;
  return total;
}

FusedOutputs ofd_fused_cpu(const at::Tensor& student, const at::Tensor& teacher,
                           const at::Tensor& margin, bool elementwise, bool grad_student,
                           bool grad_teacher, bool grad_margin) {
  const int64_t numel = student.numel();
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  auto outputs = allocate_fused_outputs(student, teacher, margin, elementwise, grad_student,
                                        grad_teacher, grad_margin, chunks);
  at::Tensor& loss = std::get<0>(outputs);
  at::Tensor& d_student = std::get<1>(outputs);
  at::Tensor& d_teacher = std::get<2>(outputs);
  at::Tensor& d_margin = std::get<3>(outputs);
  if (numel == 0) return outputs;
  const ChannelIndexer index = channel_indexer(student);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ofd_fused_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const CpuPointers<scalar_t, acc_t> p{
        student.const_data_ptr<scalar_t>(),
        teacher.const_data_ptr<scalar_t>(),
        margin.const_data_ptr<acc_t>(),
        elementwise ? loss.mutable_data_ptr<acc_t>() : nullptr,
        grad_student ? d_student.mutable_data_ptr<scalar_t>() : nullptr,
        grad_teacher ? d_teacher.mutable_data_ptr<scalar_t>() : nullptr,
        grad_margin ? d_margin.mutable_data_ptr<acc_t>() : nullptr};
    acc_t* partials = elementwise ? nullptr : loss.mutable_data_ptr<acc_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const acc_t partial = ofd_chunk(p, index, c * kChunk, std::min(numel, (c + 1) * kChunk));
        if (partials) partials[c] = partial;
      }
    });
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CPU, m) { m.impl("ofd_fused", &ofd_fused_cpu); }

}  // namespace ofdkern
