// CUDA kernels of the fused KD op (contract in kd_fused.h, per-element math in kd_math.h).
//
// Determinism: grids and per-thread work depend on the shapes only; every thread sums its elements in a fixed
// order and every block reduces its threads in a fixed tree (block_reduce), so results are bit-identical run to
// run. No atomics, no host sync.
//
// A row is split into chunks of kChunk classes, one block each, every thread holding kItems classes of
// both logit rows in registers. A row of one chunk is one block that reads its logits once (kd_terms_kernel
// with kSingleChunk: stats, terms, loss and both gradients). Wider rows: kd_stats_kernel writes each chunk's
// max and sum of exps; kd_terms_kernel merges its row's chunks (the row max first, then every chunk's sum
// rescaled to it, in a fixed tree) and writes the student gradient and the chunk's share of KL; kd_finish_kernel
// adds the shares per row in chunk order; kd_teacher_grad_kernel, which needs the row's KL, writes the teacher
// gradient.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda_launch.cuh"
#include "kd_fused.h"
#include "kd_math.h"

namespace ofdkern {
namespace {

constexpr int kItems = 16;
constexpr int64_t kChunk = int64_t{kThreads} * kItems;
// Chunk stats: student max and sum, teacher max and sum.
constexpr int kStatsPerChunk = 4;

template <typename scalar_t>
struct KDArgs {
  using acc_t = accumulation_t<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t classes, chunks;
  acc_t temperature, inv_temperature, temperature_squared;
  acc_t* stats;     // (rows, chunks, kStatsPerChunk), wide rows only
  acc_t* partials;  // (rows, chunks) shares of KL, wide rows only
  acc_t* row_kl;    // (rows,), wide rows only
  acc_t* row_loss;
  scalar_t* grad_student;  // null when not asked
  scalar_t* grad_teacher;
};

// The kItems classes of this thread in chunk `chunk` of row `row`: class chunk * kChunk + k * kThreads + tid.
__device__ int64_t class_of(int64_t chunk, int k) { return chunk * kChunk + int64_t{k} * kThreads + threadIdx.x; }

// This thread's logits of one row; classes past the row read as `fill`.
template <typename scalar_t>
__device__ void load_items(const scalar_t* row, int64_t chunk, int64_t classes, accumulation_t<scalar_t> fill,
                           accumulation_t<scalar_t> (&items)[kItems]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t j = class_of(chunk, k);
    items[k] = j < classes ? static_cast<accumulation_t<scalar_t>>(row[j]) : fill;
  }
}

// Max and sum of e = exp((v - shift) / T) over the block's items (padding -inf), e kept per item.
template <typename acc_t>
__device__ SoftmaxStats<acc_t> chunk_stats(const acc_t (&v)[kItems], acc_t inv_temperature, acc_t (&e)[kItems]) {
  acc_t max = negative_infinity<acc_t>();
#pragma unroll
  for (int k = 0; k < kItems; ++k) max = ScalarMath<acc_t>::max(max, v[k]);
  max = block_reduce(max, MaxOp{});
  const acc_t shift = softmax_shift(max);
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    e[k] = std::exp(kd_scaled(v[k], shift, inv_temperature));
    sum += e[k];
  }
  return SoftmaxStats<acc_t>{max, block_reduce(sum, SumOp{})};
}

// A wide row's max and sum from its chunks' stats (`which`: 0 student, 2 teacher): the row max first, then each
// chunk's sum rescaled to it once; every thread takes chunks tid, tid + kThreads, ... then a fixed tree.
template <typename acc_t>
__device__ SoftmaxStats<acc_t> merged_stats(const acc_t* row_stats, int64_t chunks, int which, acc_t inv_temperature) {
  acc_t max = negative_infinity<acc_t>();
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads)
    max = ScalarMath<acc_t>::max(max, row_stats[c * kStatsPerChunk + which]);
  max = block_reduce(max, MaxOp{});
  acc_t sum = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    const acc_t* chunk = row_stats + c * kStatsPerChunk + which;
    sum += chunk[1] * block_rescale(chunk[0], max, inv_temperature);
  }
  return SoftmaxStats<acc_t>{max, block_reduce(sum, SumOp{})};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) kd_stats_kernel(KDArgs<scalar_t> args) {
  using acc_t = accumulation_t<scalar_t>;
  const int64_t row = blockIdx.x / args.chunks, chunk = blockIdx.x % args.chunks;
  acc_t s[kItems], t[kItems], e[kItems];
  load_items(args.student + row * args.classes, chunk, args.classes, negative_infinity<acc_t>(), s);
  load_items(args.teacher + row * args.classes, chunk, args.classes, negative_infinity<acc_t>(), t);
  const SoftmaxStats<acc_t> student = chunk_stats(s, args.inv_temperature, e);
  const SoftmaxStats<acc_t> teacher = chunk_stats(t, args.inv_temperature, e);
  if (threadIdx.x == 0) {
    acc_t* out = args.stats + blockIdx.x * int64_t{kStatsPerChunk};
    out[0] = student.max;
    out[1] = student.sum;
    out[2] = teacher.max;
    out[3] = teacher.sum;
  }
}

// This thread's e relative to the row max, for a wide row (a single chunk keeps them from chunk_stats).
template <typename acc_t>
__device__ void row_exps(const acc_t (&v)[kItems], acc_t row_max, acc_t inv_temperature, acc_t (&e)[kItems]) {
  const acc_t shift = softmax_shift(row_max);
#pragma unroll
  for (int k = 0; k < kItems; ++k) e[k] = std::exp(kd_scaled(v[k], shift, inv_temperature));
}

template <typename scalar_t, bool kSingleChunk, bool kGradStudent, bool kGradTeacher>
__global__ void __launch_bounds__(kThreads) kd_terms_kernel(KDArgs<scalar_t> args) {
  using acc_t = accumulation_t<scalar_t>;
  using M = ScalarMath<acc_t>;
  const int64_t row = blockIdx.x / args.chunks, chunk = blockIdx.x % args.chunks;
  const int64_t offset = row * args.classes;
  acc_t s[kItems], t[kItems], e_s[kItems], e_t[kItems];
  load_items(args.student + offset, chunk, args.classes, negative_infinity<acc_t>(), s);
  load_items(args.teacher + offset, chunk, args.classes, negative_infinity<acc_t>(), t);
  SoftmaxStats<acc_t> student, teacher;
  if constexpr (kSingleChunk) {
    student = chunk_stats(s, args.inv_temperature, e_s);
    teacher = chunk_stats(t, args.inv_temperature, e_t);
  } else {
    const acc_t* row_stats = args.stats + row * args.chunks * kStatsPerChunk;
    student = merged_stats(row_stats, args.chunks, 0, args.inv_temperature);
    teacher = merged_stats(row_stats, args.chunks, 2, args.inv_temperature);
    row_exps(s, student.max, args.inv_temperature, e_s);
    row_exps(t, teacher.max, args.inv_temperature, e_t);
  }
  const KDRow<acc_t> kd = kd_row(student, teacher, args.temperature, args.inv_temperature);
  const acc_t inv_sum_s = acc_t(1) / student.sum, inv_sum_t = acc_t(1) / teacher.sum;
  acc_t kl = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t j = class_of(chunk, k);
    if (j >= args.classes) continue;
    const auto terms = kd_class_terms<M>(s[k], t[k], e_s[k] * inv_sum_s, e_t[k] * inv_sum_t, kd);
    kl += terms.loss;
    if constexpr (kGradStudent) args.grad_student[offset + j] = static_cast<scalar_t>(terms.d_student);
  }
  kl = block_reduce(kl, SumOp{});
  if constexpr (kSingleChunk) {
    if (threadIdx.x == 0) args.row_loss[row] = kl * args.temperature_squared;
    if constexpr (kGradTeacher) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int64_t j = class_of(chunk, k);
        if (j < args.classes)
          args.grad_teacher[offset + j] = static_cast<scalar_t>(kd_teacher_grad<M>(s[k], t[k], e_t[k] * inv_sum_t, kd, kl));
      }
    }
  } else {
    if (threadIdx.x == 0) args.partials[blockIdx.x] = kl;
  }
}

// A wide row's KL: its chunks' shares in chunk order (a thread per row).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) kd_finish_kernel(KDArgs<scalar_t> args, int64_t rows) {
  using acc_t = accumulation_t<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  acc_t kl = 0;
  for (int64_t c = 0; c < args.chunks; ++c) kl += args.partials[row * args.chunks + c];
  args.row_kl[row] = kl;
  args.row_loss[row] = kl * args.temperature_squared;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) kd_teacher_grad_kernel(KDArgs<scalar_t> args) {
  using acc_t = accumulation_t<scalar_t>;
  using M = ScalarMath<acc_t>;
  const int64_t row = blockIdx.x / args.chunks, chunk = blockIdx.x % args.chunks;
  const int64_t offset = row * args.classes;
  acc_t s[kItems], t[kItems], e_t[kItems];
  load_items(args.student + offset, chunk, args.classes, acc_t(0), s);
  load_items(args.teacher + offset, chunk, args.classes, acc_t(0), t);
  const acc_t* row_stats = args.stats + row * args.chunks * kStatsPerChunk;
  const SoftmaxStats<acc_t> student = merged_stats(row_stats, args.chunks, 0, args.inv_temperature);
  const SoftmaxStats<acc_t> teacher = merged_stats(row_stats, args.chunks, 2, args.inv_temperature);
  row_exps(t, teacher.max, args.inv_temperature, e_t);
  const KDRow<acc_t> kd = kd_row(student, teacher, args.temperature, args.inv_temperature);
  const acc_t inv_sum_t = acc_t(1) / teacher.sum, kl = args.row_kl[row];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t j = class_of(chunk, k);
    if (j < args.classes)
      args.grad_teacher[offset + j] = static_cast<scalar_t>(kd_teacher_grad<M>(s[k], t[k], e_t[k] * inv_sum_t, kd, kl));
  }
}

KDOutputs kd_fused_cuda(const at::Tensor& student, const at::Tensor& teacher, double temperature, bool grad_student,
                        bool grad_teacher) {
  auto outputs = allocate_kd_outputs(student, teacher, temperature, grad_student, grad_teacher);
  const int64_t rows = student.size(0), classes = student.size(1);
  if (rows == 0) return outputs;
  const c10::cuda::CUDAGuard device_guard(student.device());
  // No classes: KL over nothing is 0, as the reference's sum.
  if (classes == 0) {
    std::get<0>(outputs).zero_();
    return outputs;
  }
  const int64_t chunks = (classes + kChunk - 1) / kChunk;
  const bool single = chunks == 1;
  const auto acc_options = std::get<0>(outputs).options();
  // Scratch of the wide-row path (empty for rows of one chunk).
  const at::Tensor stats = at::empty({single ? 0 : rows * chunks * kStatsPerChunk}, acc_options);
  const at::Tensor partials = at::empty({single ? 0 : rows * chunks}, acc_options);
  const at::Tensor row_kl = at::empty({single ? 0 : rows}, acc_options);
  const int grid = grid_of(rows * chunks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fused_cuda", [&] {
    using acc_t = accumulation_t<scalar_t>;
    const auto data = [](const at::Tensor& tensor) {
      return tensor.numel() ? tensor.mutable_data_ptr<acc_t>() : static_cast<acc_t*>(nullptr);
    };
    const auto grad = [](const at::Tensor& tensor) {
      return tensor.numel() ? tensor.mutable_data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr);
    };
    const KDArgs<scalar_t> args{student.const_data_ptr<scalar_t>(),
                                teacher.const_data_ptr<scalar_t>(),
                                classes,
                                chunks,
                                static_cast<acc_t>(temperature),
                                static_cast<acc_t>(1 / temperature),
                                // T^2 rounded once, as the reference's `* temperature ** 2`.
                                static_cast<acc_t>(temperature * temperature),
                                data(stats),
                                data(partials),
                                data(row_kl),
                                std::get<0>(outputs).mutable_data_ptr<acc_t>(),
                                grad(std::get<1>(outputs)),
                                grad(std::get<2>(outputs))};
    if (!single) {
      kd_stats_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    with_flag(single, [&](auto single_chunk) {
      with_flag(grad_student, [&](auto writes_student) {
        // Wide rows write the teacher gradient in their own kernel, once the row's KL is known.
        with_flag(grad_teacher && single, [&](auto writes_teacher) {
          kd_terms_kernel<scalar_t, decltype(single_chunk)::value, decltype(writes_student)::value,
                          decltype(writes_teacher)::value><<<grid, kThreads, 0, stream>>>(args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
    if (!single) {
      kd_finish_kernel<scalar_t><<<grid_of((rows + kThreads - 1) / kThreads), kThreads, 0, stream>>>(args, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (grad_teacher) {
        kd_teacher_grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CUDA, m) { m.impl("kd_fused", &kd_fused_cuda); }

}  // namespace ofdkern
