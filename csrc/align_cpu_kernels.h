// The elementwise passes of the CPU channel-wise alignment kernel (align_cpu.h) for the instruction set
// CPU_CAPABILITY. Included by cpu_isa_<isa>.cpp, after cpu_isa_prelude.h and that file's #pragma GCC target.
//
// Each pass walks its rows in steps of two at::vec vectors of the accumulation type: half-precision elements
// are widened on load and narrowed on store (cpu_vec.h), and the per-element math of align_math.h runs on the
// vectors (VecMath). Sums run over the vectors' lanes in an order fixed by the shapes.
#pragma once

#include "align_cpu.h"
#include "align_fused.h"
#include "align_math.h"
#include "cpu_vec.h"

namespace ofdkern {
namespace CPU_CAPABILITY {
namespace {

template <typename acc_t>
using Pair = VectorPair<acc_t>;

template <typename acc_t>
Pair<acc_t> broadcast_pair(acc_t value) {
  return {Vectorized<acc_t>(value), Vectorized<acc_t>(value)};
}

template <typename acc_t>
void add_to(Pair<acc_t>& sum, const Pair<acc_t>& v) {
  sum.low += v.low;
  sum.high += v.high;
}

template <typename acc_t>
acc_t pair_sum(const Pair<acc_t>& v) {
  return lane_sum(v.low + v.high);
}

// n (<= kPairWidth) elements at data after a store: the values as stored (rounded to bfloat16, say), lanes from n on
// 0. `computed` is what was stored, before the rounding.
template <typename gemm_t, typename acc_t>
Pair<acc_t> as_stored(const gemm_t* data, const Pair<acc_t>& computed, int64_t n) {
  if constexpr (std::is_same_v<gemm_t, acc_t>) return first_lanes(computed, n);
  else return load_pair(data, n);
}

template <typename gemm_t>
void relu_typed(const at::Tensor& h) {
  using acc_t = accumulation_t<gemm_t>;
  using M = VecMath<acc_t>;
  const int64_t rows = h.size(0), width = h.size(1), stride = h.stride(0);
  gemm_t* data = h.mutable_data_ptr<gemm_t>();
  for (int64_t r = 0; r < rows; ++r) {
    gemm_t* row = data + r * stride;
    for (int64_t j = 0; j < width; j += kPairWidth<acc_t>) {
      const int64_t n = std::min(kPairWidth<acc_t>, width - j);
      const Pair<acc_t> x = load_pair(row + j, n);
      store_pair(row + j, {relu<M>(x.low), relu<M>(x.high)}, n);
    }
  }
}

template <typename gemm_t>
void relu_backward_typed(const at::Tensor& dh, const at::Tensor& h, const at::Tensor& bias_grad) {
  using acc_t = accumulation_t<gemm_t>;
  using M = VecMath<acc_t>;
  const int64_t rows = dh.size(0), width = dh.size(1), stride = dh.stride(0);
  gemm_t* grad = dh.mutable_data_ptr<gemm_t>();
  const gemm_t* activation = h.const_data_ptr<gemm_t>();
  acc_t* sums = bias_grad.defined() ? bias_grad.mutable_data_ptr<acc_t>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    gemm_t* g_row = grad + r * stride;
    const gemm_t* h_row = activation + r * stride;
    Pair<acc_t> sum = broadcast_pair(acc_t(0));
    for (int64_t j = 0; j < width; j += kPairWidth<acc_t>) {
      const int64_t n = std::min(kPairWidth<acc_t>, width - j);
      const Pair<acc_t> g = load_pair(g_row + j, n), a = load_pair(h_row + j, n);
      const Pair<acc_t> d = {relu_backward<M>(g.low, a.low), relu_backward<M>(g.high, a.high)};
      store_pair(g_row + j, d, n);
      if (sums) add_to(sum, as_stored(g_row + j, d, n));
    }
    if (sums) sums[r] += pair_sum(sum);
  }
}

// count elements of y (W2 H, bias not yet added) against the teacher t: adds the bias, turns y into
// d loss / d y, writes the teacher's gradient when kGradTeacher, adds the loss to `loss` and the stored
// d loss / d y to bias_sum (kChannelRun false) or bias_grad (true). kChannelRun false: one channel for the whole
// run (bias and margin are scalars); true: channels innermost, one per element (they are arrays).
template <bool kOFD, bool kGradTeacher, bool kChannelRun, typename acc_t, typename gemm_t, typename teacher_t>
inline void loss_run(gemm_t* y, const teacher_t* t, teacher_t* d_t, int64_t count, const acc_t* bias,
                     const acc_t* margin, Pair<acc_t>& loss, Pair<acc_t>* bias_sum, acc_t* bias_grad) {
  using M = VecMath<acc_t>;
  const Pair<acc_t> run_bias = broadcast_pair(kChannelRun ? acc_t(0) : *bias);
  const Pair<acc_t> run_margin = broadcast_pair(kOFD && !kChannelRun ? *margin : acc_t(0));
  for (int64_t j = 0; j < count; j += kPairWidth<acc_t>) {
    const int64_t n = std::min(kPairWidth<acc_t>, count - j);
    const Pair<acc_t> yv = load_pair(y + j, n), tv = load_pair_as<acc_t>(t + j, n);
    const Pair<acc_t> b = kChannelRun ? load_pair(bias + j, n) : run_bias;
    const Pair<acc_t> m = kOFD && kChannelRun ? load_pair(margin + j, n) : run_margin;
    const auto low = align_point<kOFD, M>(yv.low + b.low, tv.low, m.low);
    const auto high = align_point<kOFD, M>(yv.high + b.high, tv.high, m.high);
    add_to(loss, first_lanes(Pair<acc_t>{low.loss, high.loss}, n));
    const Pair<acc_t> d_y = {low.d_student, high.d_student};
    store_pair(y + j, d_y, n);
    if constexpr (kGradTeacher) {
      store_pair_as(d_t + j,
                    Pair<acc_t>{align_teacher_grad<kOFD, M>(low.d_student, tv.low, m.low),
                                align_teacher_grad<kOFD, M>(high.d_student, tv.high, m.high)},
                    n);
    }
    if (bias_sum) {
      add_to(*bias_sum, as_stored(y + j, d_y, n));
    } else if (bias_grad) {
      Pair<acc_t> sums = load_pair(bias_grad + j, n);
      add_to(sums, as_stored(y + j, d_y, n));
      store_pair(bias_grad + j, sums, n);
    }
  }
}

template <bool kOFD, bool kGradTeacher, typename gemm_t, typename teacher_t>
double loss_typed(const AlignProblem& p, const TileBuffer& y, const TileColumns& block, const at::Tensor& bias_grad) {
  using acc_t = accumulation_t<gemm_t>;
  const at::Tensor t_tile = feature_tile(p.teacher, block.pixels);
  const teacher_t* t = t_tile.const_data_ptr<teacher_t>();
  teacher_t* d_t = kGradTeacher ? feature_tile(p.grad_teacher, block.pixels).mutable_data_ptr<teacher_t>() : nullptr;
  gemm_t* dy = y.matrix.mutable_data_ptr<gemm_t>();
  const acc_t* bias = p.b2.const_data_ptr<acc_t>();
  const acc_t* margin = kOFD ? p.margin.const_data_ptr<acc_t>() : nullptr;
  acc_t* bias_grads = bias_grad.defined() ? bias_grad.mutable_data_ptr<acc_t>() : nullptr;
  const int64_t channels = t_tile.size(1), samples = t_tile.size(0), positions = t_tile.size(2);
  Pair<acc_t> loss = broadcast_pair(acc_t(0));
  if (!y.channels_inner) {
    // Rows of one channel and sample: the buffer's and the teacher's, both contiguous.
    const int64_t row_stride = y.matrix.stride(0);
    for (int64_t c = 0; c < channels; ++c) {
      Pair<acc_t> bias_sum = broadcast_pair(acc_t(0));
      for (int64_t i = 0; i < samples; ++i) {
        const int64_t offset = i * t_tile.stride(0) + c * t_tile.stride(1);
        loss_run<kOFD, kGradTeacher, false, acc_t>(dy + c * row_stride + i * positions, t + offset,
                                                   kGradTeacher ? d_t + offset : nullptr, positions, bias + c,
                                                   kOFD ? margin + c : nullptr, loss,
                                                   bias_grads ? &bias_sum : nullptr, nullptr);
      }
      if (bias_grads) bias_grads[c] += pair_sum(bias_sum);
    }
  } else {
    // Channels innermost: the block is one contiguous run of pixels in the buffer and in the teacher.
    for (int64_t q = 0; q < samples * positions; ++q) {
      loss_run<kOFD, kGradTeacher, true, acc_t>(dy + q * channels, t + q * channels,
                                                kGradTeacher ? d_t + q * channels : nullptr, channels, bias,
                                                margin, loss, nullptr, bias_grads);
    }
  }
  return static_cast<double>(pair_sum(loss));
}

// Calls body(gemm_t{}) with the buffers' (GEMM dtype's) type.
template <typename Body>
void with_gemm_type(at::ScalarType gemm_dtype, Body body) {
  if (gemm_dtype == at::kDouble) body(double{});
  else if (gemm_dtype == at::kBFloat16) body(at::BFloat16{});
  else body(float{});
}

void relu_kernel(const at::Tensor& h) {
  with_gemm_type(h.scalar_type(), [&](auto gemm_zero) { relu_typed<decltype(gemm_zero)>(h); });
}

void relu_backward_kernel(const at::Tensor& dh, const at::Tensor& h, const at::Tensor& bias_grad) {
  with_gemm_type(dh.scalar_type(), [&](auto gemm_zero) { relu_backward_typed<decltype(gemm_zero)>(dh, h, bias_grad); });
}

double loss_kernel(const AlignProblem& p, const TileBuffer& y, const TileColumns& block, const at::Tensor& bias_grad) {
  double loss = 0;
  with_gemm_type(y.matrix.scalar_type(), [&](auto gemm_zero) {
    using gemm_t = decltype(gemm_zero);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.teacher.merged.scalar_type(), "align_loss_cpu", [&] {
      const bool ofd = p.margin.defined(), grad_teacher = p.grad_teacher.merged.defined();
      if (ofd) loss = grad_teacher ? loss_typed<true, true, gemm_t, scalar_t>(p, y, block, bias_grad)
                                   : loss_typed<true, false, gemm_t, scalar_t>(p, y, block, bias_grad);
      else loss = grad_teacher ? loss_typed<false, true, gemm_t, scalar_t>(p, y, block, bias_grad)
                               : loss_typed<false, false, gemm_t, scalar_t>(p, y, block, bias_grad);
    });
  });
  return loss;
}

}  // namespace

const AlignCpuPasses kAlignCpuPasses{&relu_kernel, &loss_kernel, &relu_backward_kernel};

}  // namespace CPU_CAPABILITY
}  // namespace ofdkern
