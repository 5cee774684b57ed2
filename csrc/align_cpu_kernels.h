// The elementwise passes of the CPU channel-wise alignment kernel (align_cpu.h) for the instruction set
// CPU_CAPABILITY. Included by cpu_isa_<isa>.cpp, after cpu_isa_prelude.h and that file's #pragma GCC target.
//
// Each pass walks its rows in chunks of kChunk elements: half-precision chunks are widened into a float
// buffer and narrowed back in at::vec vectors (cpu_vec.h); the per-element math of align_math.h runs on the
// float chunk in loops the compiler vectorizes at this instruction set's width. Sums run over kLanes
// independent lanes in an order fixed by the shapes.
#pragma once

#include "align_cpu.h"
#include "align_fused.h"
#include "align_math.h"
#include "cpu_vec.h"

namespace ofdkern {
namespace CPU_CAPABILITY {
namespace {

// Elements converted and computed at a time (a few KiB of buffers, in L1).
constexpr int64_t kChunk = 256;
// Independent accumulators per sum: breaks the add dependency chain so the loops vectorize.
constexpr int kLanes = 16;

template <typename acc_t>
class LaneSum {
 public:
  template <typename Term>
  void add(int64_t n, Term term) {
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes)
      for (int lane = 0; lane < kLanes; ++lane) lanes_[lane] += term(k + lane);
    for (; k < n; ++k) lanes_[k % kLanes] += term(k);
  }
  acc_t total() const {
    acc_t sum = 0;
    for (acc_t lane : lanes_) sum += lane;
    return sum;
  }

 private:
  acc_t lanes_[kLanes] = {};
};

// Calls chunk(offset, n) over [0, count) in chunks of at most kChunk.
template <typename Chunk>
inline void for_chunks(int64_t count, Chunk chunk) {
  for (int64_t j = 0; j < count; j += kChunk) chunk(j, std::min(kChunk, count - j));
}

// Adds the n values at data (as stored, e.g. rounded to bfloat16) to sum.
template <typename scalar_t, typename acc_t>
inline void add_stored(const scalar_t* data, int64_t n, LaneSum<acc_t>& sum) {
  InputBlock<scalar_t, kChunk> stored;
  const auto* v = stored.load(data, n);
  sum.add(n, [&](int64_t k) { return static_cast<acc_t>(v[k]); });
}

template <typename gemm_t>
void relu_typed(const at::Tensor& h) {
  const int64_t rows = h.size(0), width = h.size(1), stride = h.stride(0);
  gemm_t* data = h.mutable_data_ptr<gemm_t>();
  for (int64_t r = 0; r < rows; ++r) {
    gemm_t* row = data + r * stride;
    for_chunks(width, [&](int64_t j, int64_t n) {
      InPlaceBlock<gemm_t, kChunk> block;
      auto* x = block.load(row + j, n);
      for (int64_t k = 0; k < n; ++k) x[k] = relu(x[k]);
      block.store(row + j, n);
    });
  }
}

template <typename gemm_t>
void relu_backward_typed(const at::Tensor& dh, const at::Tensor& h, const at::Tensor& bias_grad) {
  using acc_t = accumulation_t<gemm_t>;
  const int64_t rows = dh.size(0), width = dh.size(1), stride = dh.stride(0);
  gemm_t* grad = dh.mutable_data_ptr<gemm_t>();
  const gemm_t* activation = h.const_data_ptr<gemm_t>();
  acc_t* sums = bias_grad.defined() ? bias_grad.mutable_data_ptr<acc_t>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    gemm_t* g_row = grad + r * stride;
    const gemm_t* h_row = activation + r * stride;
    LaneSum<acc_t> sum;
    for_chunks(width, [&](int64_t j, int64_t n) {
      InPlaceBlock<gemm_t, kChunk> block;
      InputBlock<gemm_t, kChunk> h_in;
      auto* g = block.load(g_row + j, n);
      const auto* a = h_in.load(h_row + j, n);
      for (int64_t k = 0; k < n; ++k) g[k] = relu_backward(g[k], a[k]);
      block.store(g_row + j, n);
      if (sums) add_stored(g_row + j, n, sum);
    });
    if (sums) sums[r] += sum.total();
  }
}

// n elements of y (W2 H, bias not yet added) against the teacher t: adds the bias, turns y into d loss / d y,
// writes the teacher's gradient when kGradTeacher, adds the loss to loss and the stored d loss / d y to
// bias_sum (kStep 0) or bias_grad (kStep 1). kStep 0: one channel for the whole run (bias and margin are
// scalars); kStep 1: one channel per element (they are vectors).
template <bool kOFD, bool kGradTeacher, int kStep, typename acc_t, typename gemm_t, typename teacher_t>
inline void loss_run(gemm_t* y, const teacher_t* t, teacher_t* d_t, int64_t count, const acc_t* bias,
                     const acc_t* margin, LaneSum<acc_t>& loss, LaneSum<acc_t>* bias_sum, acc_t* bias_grad) {
  // Local sums the compiler can keep in registers: the caller's might alias the outputs.
  LaneSum<acc_t> run_loss = loss, run_bias_sum = bias_sum ? *bias_sum : LaneSum<acc_t>();
  for_chunks(count, [&](int64_t j, int64_t n) {
    InPlaceBlock<gemm_t, kChunk> y_block;
    InputBlock<teacher_t, kChunk> t_in;
    OutputBlock<teacher_t, kChunk> dt_out;
    auto* dy = y_block.load(y + j, n);
    const auto* tv = t_in.load(t + j, n);
    auto* dt = kGradTeacher ? dt_out.data(d_t + j) : nullptr;
    const acc_t* b = bias + j * kStep;
    const acc_t* m = kOFD ? margin + j * kStep : nullptr;
    run_loss.add(n, [&](int64_t k) {
      const acc_t target = static_cast<acc_t>(tv[k]);
      const acc_t mk = kOFD ? m[k * kStep] : acc_t(0);
      const auto point = align_point<kOFD>(static_cast<acc_t>(dy[k]) + b[k * kStep], target, mk);
      dy[k] = point.d_student;
      if constexpr (kGradTeacher) dt[k] = align_teacher_grad<kOFD>(point.d_student, target, mk);
      return point.loss;
    });
    y_block.store(y + j, n);
    if constexpr (kGradTeacher) dt_out.store(d_t + j, n);
    if constexpr (kStep == 0) {
      if (bias_sum) add_stored(y + j, n, run_bias_sum);
    } else if (bias_grad) {
      InputBlock<gemm_t, kChunk> stored;
      const auto* v = stored.load(y + j, n);
      for (int64_t k = 0; k < n; ++k) bias_grad[j + k] += static_cast<acc_t>(v[k]);
    }
  });
  loss = run_loss;
  if (bias_sum) *bias_sum = run_bias_sum;
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
  LaneSum<acc_t> loss;
  if (!y.channels_inner) {
    // Rows of one channel and sample: the buffer's and the teacher's, both contiguous.
    const int64_t row_stride = y.matrix.stride(0);
    for (int64_t c = 0; c < channels; ++c) {
      LaneSum<acc_t> bias_sum;
      for (int64_t i = 0; i < samples; ++i) {
        const int64_t offset = i * t_tile.stride(0) + c * t_tile.stride(1);
        loss_run<kOFD, kGradTeacher, 0, acc_t>(dy + c * row_stride + i * positions, t + offset,
                                        kGradTeacher ? d_t + offset : nullptr, positions, bias + c,
                                        kOFD ? margin + c : nullptr, loss, bias_grads ? &bias_sum : nullptr,
                                        nullptr);
      }
      if (bias_grads) bias_grads[c] += bias_sum.total();
    }
  } else {
    // Channels innermost: the block is one contiguous run of pixels in the buffer and in the teacher.
    for (int64_t q = 0; q < samples * positions; ++q) {
      loss_run<kOFD, kGradTeacher, 1, acc_t>(dy + q * channels, t + q * channels,
                                      kGradTeacher ? d_t + q * channels : nullptr, channels, bias, margin, loss,
                                      nullptr, bias_grads);
    }
  }
  return static_cast<double>(loss.total());
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
