// CUDA kernels of the fused OFD op: one grid-stride pass over student and teacher in memory order that
// writes the per-block loss partials (or per-element losses) and the requested gradients.
//
// Determinism: the grid depends only on the device and numel, every thread sums its elements in a
// fixed order and each block reduces its threads in a fixed tree, so the partial vector (summed in
// fixed order by the Python layer) is bit-identical run to run. No atomics, no host sync.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda_launch.cuh"
#include "ofd_fused.h"
#include "ofd_math.h"

namespace ofdkern {
namespace {

// What advancing a memory offset by a fixed distance does to its channel position.
struct ChannelStep {
  int64_t within;   // distance % channel_stride
  int64_t channel;  // (distance / channel_stride) % channels
};

inline ChannelStep channel_step(ChannelIndexer index, int64_t distance) {
  return ChannelStep{distance % index.channel_stride,
                     (distance / index.channel_stride) % index.channels};
}

// The channel of a memory offset, advanced by additions instead of a 64-bit division per element.
struct ChannelCursor {
  int64_t within;  // offset % channel_stride
  int64_t channel;

  __device__ static ChannelCursor at(int64_t offset, ChannelIndexer index) {
    const int64_t block = offset / index.channel_stride;
    return ChannelCursor{offset - block * index.channel_stride, block % index.channels};
  }

  __device__ void advance(ChannelStep step, ChannelIndexer index) {
    within += step.within;
    channel += step.channel;
    if (within >= index.channel_stride) {
      within -= index.channel_stride;
      ++channel;
    }
    if (channel >= index.channels) channel -= index.channels;
  }
};

struct ChannelWalk {
  ChannelIndexer index;
  ChannelStep element;  // to the next element
  ChannelStep grid;     // to the same thread's next vector in the grid-stride loop
};

// Which outputs a kernel instance writes (a bit mask: nvcc's kernel stubs take no class-type template
// arguments); compile-time so forward-only code holds no gradient math.
enum OutputBits : unsigned {
  kElementwise = 1u,
  kGradStudent = 2u,
  kGradTeacher = 4u,
  kGradMargin = 8u,
  kAllOutputs = 16u,  // number of masks
};

__host__ __device__ constexpr bool writes(unsigned mask, OutputBits output) { return (mask & output) != 0; }

// n consecutive elements from memory offset `offset`, the first of which is at `cursor`. kOneChannel: the
// caller knows they all share that channel (one margin load, no cursor steps per element).
template <unsigned kOut, int n, bool kOneChannel, typename scalar_t, typename acc_t>
__device__ __forceinline__ void ofd_pack(const FusedPointers<scalar_t, acc_t>& p, int64_t offset,
                                         ChannelCursor cursor, const ChannelWalk& walk,
                                         acc_t& sum) {
  const auto s = *reinterpret_cast<const Pack<scalar_t, n>*>(p.student + offset);
  const auto t = *reinterpret_cast<const Pack<scalar_t, n>*>(p.teacher + offset);
  Pack<acc_t, n> loss;
  Pack<scalar_t, n> d_student;
  Pack<scalar_t, n> d_teacher;
  Pack<acc_t, n> d_margin;
  acc_t m = p.margin[cursor.channel];
#pragma unroll
  for (int k = 0; k < n; ++k) {
    if (!kOneChannel && k > 0) {
      cursor.advance(walk.element, walk.index);
      m = p.margin[cursor.channel];
    }
    const acc_t tv = static_cast<acc_t>(t.v[k]);
    const auto point = ofd_point<ScalarMath<acc_t>>(static_cast<acc_t>(s.v[k]), tv, m);
    if constexpr (writes(kOut, kElementwise)) loss.v[k] = point.loss;
    else sum += point.loss;
    if constexpr (writes(kOut, kGradStudent)) d_student.v[k] = static_cast<scalar_t>(point.d_student);
    if constexpr (writes(kOut, kGradTeacher))
      d_teacher.v[k] = static_cast<scalar_t>(teacher_grad<ScalarMath<acc_t>>(point.d_student, tv, m));
    if constexpr (writes(kOut, kGradMargin)) {
      d_margin.v[k] = margin_grad<ScalarMath<acc_t>>(point.d_student, tv, m);
    }
  }
  if constexpr (writes(kOut, kElementwise)) *reinterpret_cast<Pack<acc_t, n>*>(p.loss_elems + offset) = loss;
  if constexpr (writes(kOut, kGradStudent))
    *reinterpret_cast<Pack<scalar_t, n>*>(p.grad_student + offset) = d_student;
  if constexpr (writes(kOut, kGradTeacher))
    *reinterpret_cast<Pack<scalar_t, n>*>(p.grad_teacher + offset) = d_teacher;
  if constexpr (writes(kOut, kGradMargin))
    *reinterpret_cast<Pack<acc_t, n>*>(p.grad_margin + offset) = d_margin;
}

// The grid-stride loop over this thread's whole vectors, from memory offset `offset`.
template <unsigned kOut, int kVec, bool kOneChannel, typename scalar_t, typename acc_t>
__device__ __forceinline__ void ofd_vectors(const FusedPointers<scalar_t, acc_t>& p, int64_t offset,
                                            int64_t vector_end, int64_t grid_stride,
                                            const ChannelWalk& walk, acc_t& sum) {
  ChannelCursor cursor = ChannelCursor::at(offset, walk.index);
  for (; offset < vector_end; offset += grid_stride) {
    ofd_pack<kOut, kVec, kOneChannel>(p, offset, cursor, walk, sum);
    cursor.advance(walk.grid, walk.index);
  }
}

// kVec elements per step (1: the scalar kernel for misaligned pointers). The numel % kVec elements
// past the last whole vector are taken one each by the first threads.
template <typename scalar_t, typename acc_t, int kVec, unsigned kOut>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    ofd_fused_kernel(FusedPointers<scalar_t, acc_t> p, int64_t numel, ChannelWalk walk,
                     acc_t* partials) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * kThreads * kVec;
  const int64_t vector_end = numel / kVec * kVec;
  acc_t sum = 0;
  // Vectors start at multiples of kVec: when channels span a multiple of kVec elements (NCHW with
  // H * W % kVec == 0, the usual case) no vector straddles two channels.
  if (kVec > 1 && walk.index.channel_stride % kVec == 0)
    ofd_vectors<kOut, kVec, true>(p, thread * kVec, vector_end, grid_stride, walk, sum);
  else
    ofd_vectors<kOut, kVec, false>(p, thread * kVec, vector_end, grid_stride, walk, sum);
  if constexpr (kVec > 1) {
    const int64_t tail = vector_end + thread;
    if (tail < numel) ofd_pack<kOut, 1, true>(p, tail, ChannelCursor::at(tail, walk.index), walk, sum);
  }
  if constexpr (!writes(kOut, kElementwise)) {
    sum = block_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
  }
}

// Calls f with std::integral_constant<unsigned, mask>.
template <unsigned kCandidate = 0, typename F>
void with_output_mask(unsigned mask, F&& f) {
  if constexpr (kCandidate < kAllOutputs) {
    if (mask == kCandidate) f(std::integral_constant<unsigned, kCandidate>{});
    else with_output_mask<kCandidate + 1>(mask, f);
  }
}

template <typename scalar_t, typename acc_t>
void launch(const FusedPointers<scalar_t, acc_t>& p, int64_t numel, ChannelIndexer index,
            unsigned output_mask, int grid, acc_t* partials) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  static_assert(kVec <= kThreads, "the scalar tail takes one element per thread of the first block");
  // Outputs are fresh allocations; inputs may be views at any element offset.
  const bool vectorized =
      aligned(p.student, kVectorBytes) && aligned(p.teacher, kVectorBytes) &&
      aligned(p.grad_student, kVectorBytes) && aligned(p.grad_teacher, kVectorBytes) &&
      aligned(p.loss_elems, sizeof(acc_t) * kVec) && aligned(p.grad_margin, sizeof(acc_t) * kVec);
  const int vec = vectorized ? kVec : 1;
  const ChannelWalk walk{index, channel_step(index, 1), channel_step(index, int64_t{grid} * kThreads * vec)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_output_mask(output_mask, [&](auto mask) {
    constexpr unsigned kOut = decltype(mask)::value;
    if (vectorized)
      ofd_fused_kernel<scalar_t, acc_t, kVec, kOut>
          <<<grid, kThreads, 0, stream>>>(p, numel, walk, partials);
    else
      ofd_fused_kernel<scalar_t, acc_t, 1, kOut><<<grid, kThreads, 0, stream>>>(p, numel, walk, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

FusedOutputs ofd_fused_cuda(const at::Tensor& student, const at::Tensor& teacher,
                            const at::Tensor& margin, bool elementwise, bool grad_student,
                            bool grad_teacher, bool grad_margin) {
  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t numel = student.numel();
  const int grid = grid_size(numel, student.device().index());
  auto outputs = allocate_fused_outputs(student, teacher, margin, elementwise, grad_student,
                                        grad_teacher, grad_margin, grid);
  if (numel == 0) return outputs;
  const at::Tensor& loss = std::get<0>(outputs);
  const ChannelIndexer index = channel_indexer(student);
  const unsigned output_mask = (elementwise ? kElementwise : 0u) | (grad_student ? kGradStudent : 0u) |
                               (grad_teacher ? kGradTeacher : 0u) | (grad_margin ? kGradMargin : 0u);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ofd_fused_cuda", [&] {
    using acc_t = accumulation_t<scalar_t>;
    const auto p = fused_pointers<scalar_t, acc_t>(student, teacher, margin, outputs, elementwise);
    launch(p, numel, index, output_mask, grid, elementwise ? nullptr : loss.mutable_data_ptr<acc_t>());
  });
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(ofdkern, CUDA, m) { m.impl("ofd_fused", &ofd_fused_cuda); }

}  // namespace ofdkern
