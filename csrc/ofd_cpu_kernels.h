// The OFD CPU kernel (ofd_cpu.h) for the instruction set CPU_CAPABILITY: one pass over student and teacher in
// memory order that writes the loss partials (or per-element losses) and the requested gradients. Included by
// cpu_isa_<isa>.cpp, after cpu_isa_prelude.h and that file's #pragma GCC target; everything here is in the
// namespace ofdkern::CPU_CAPABILITY, so the variants stay apart.
//
// Scalar loops over 16 independent accumulators that the compiler vectorizes for the variant's instruction
// set: 256-bit vectors read the features ~10% faster than the baseline's 128-bit ones.
#pragma once

#include "ofd_cpu.h"
#include "ofd_fused.h"
#include "ofd_math.h"

namespace ofdkern {
namespace CPU_CAPABILITY {
namespace {

// Independent accumulators per run: breaks the add dependency chain so the loop vectorizes.
constexpr int kLanes = 16;

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

// Elements converted to the accumulation type at a time: half-precision loads and stores go through
// small buffers so the math loop is the same vectorized float loop for every dtype.
constexpr int64_t kTile = 256;

template <typename from_t, typename to_t>
inline void convert(const from_t* src, to_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  // c10::Half converts one value per call; F16C converts eight per instruction.
  if constexpr (std::is_same_v<from_t, c10::Half> && std::is_same_v<to_t, float>) {
    for (; i + 8 <= n; i += 8) {
      const __m128i half8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(half8));
    }
  } else if constexpr (std::is_same_v<from_t, float> && std::is_same_v<to_t, c10::Half>) {
    for (; i + 8 <= n; i += 8) {
      const __m128i half8 = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), half8);
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<to_t>(src[i]);
}

// A tile of an input in the accumulation type: the data itself when no conversion is needed.
template <typename acc_t, typename scalar_t>
inline const acc_t* load_tile(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    convert(src, buffer, n);
    return buffer;
  }
}

// Where the math writes a tile of an output: the output itself, or a buffer stored by store_tile.
template <typename acc_t, typename out_t>
inline acc_t* output_tile(out_t* out, acc_t* buffer) {
  if constexpr (std::is_same_v<out_t, acc_t>) return out;
  else return out ? buffer : nullptr;
}

template <typename acc_t, typename out_t>
inline void store_tile(const acc_t* tile, out_t* out, int64_t n) {
  if constexpr (!std::is_same_v<out_t, acc_t>) {
    if (out) convert(tile, out, n);
  }
}

// Memory offsets [begin, end) whose margins are margin_run[0], margin_run[step], margin_run[2 * step], ...
// (step 0: one channel for the whole run, NCHW-like; step 1: channels_last, one channel per element).
template <typename W, int64_t step, typename scalar_t, typename acc_t>
inline void ofd_run(const FusedPointers<scalar_t, acc_t>& p, int64_t begin, int64_t end,
                            const acc_t* margin_run, std::array<acc_t, kLanes>& chunk_lanes) {
  // A local copy the compiler can keep in registers: the caller's array might alias the outputs.
  std::array<acc_t, kLanes> lanes = chunk_lanes;
  acc_t student_buf[kTile], teacher_buf[kTile], grad_student_buf[kTile], grad_teacher_buf[kTile];
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int64_t n = std::min(kTile, end - tile);
    const acc_t* s = load_tile<acc_t>(p.student + tile, n, student_buf);
    const acc_t* t = load_tile<acc_t>(p.teacher + tile, n, teacher_buf);
    const acc_t* m = margin_run + (tile - begin) * step;
    acc_t* d_s = output_tile<acc_t>(p.grad_student ? p.grad_student + tile : nullptr, grad_student_buf);
    acc_t* d_t = output_tile<acc_t>(p.grad_teacher ? p.grad_teacher + tile : nullptr, grad_teacher_buf);
    acc_t* loss = p.loss_elems ? p.loss_elems + tile : nullptr;
    acc_t* d_m = p.grad_margin ? p.grad_margin + tile : nullptr;
    auto element = [&](int64_t k) {
      const auto point = ofd_point<ScalarMath<acc_t>>(s[k], t[k], m[k * step]);
      if constexpr (W::grad_student) d_s[k] = point.d_student;
      if constexpr (W::checked) {
        if (loss) loss[k] = point.loss;
        if (d_s) d_s[k] = point.d_student;
        if (d_t) d_t[k] = teacher_grad<ScalarMath<acc_t>>(point.d_student, t[k], m[k * step]);
        if (d_m) d_m[k] = margin_grad<ScalarMath<acc_t>>(point.d_student, t[k], m[k * step]);
      }
      return point.loss;
    };
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) {
      for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += element(k + lane);
    }
    for (; k < n; ++k) lanes[k % kLanes] += element(k);
    store_tile(d_s, p.grad_student ? p.grad_student + tile : nullptr, n);
    store_tile(d_t, p.grad_teacher ? p.grad_teacher + tile : nullptr, n);
  }
  chunk_lanes = lanes;
}

// One chunk of memory offsets, split into runs of one channel (NCHW-like) or of consecutive channels
// (channels_last). Returns the chunk's loss partial, summed in a fixed order.
template <typename W, typename scalar_t, typename acc_t>
acc_t ofd_chunk(const FusedPointers<scalar_t, acc_t>& p, ChannelIndexer index,
                                   int64_t begin, int64_t end) {
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
void ofd_launch(const FusedPointers<scalar_t, acc_t>& p, ChannelIndexer index, int64_t numel,
                acc_t* partials) {
  const int64_t chunks = (numel + kOfdCpuChunk - 1) / kOfdCpuChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const acc_t partial =
          ofd_chunk<W>(p, index, c * kOfdCpuChunk, std::min(numel, (c + 1) * kOfdCpuChunk));
      if (partials) partials[c] = partial;
    }
  });
}

void ofd_kernel(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& margin, bool elementwise,
                const FusedOutputs& outputs) {
  const int64_t numel = student.numel();
  const ChannelIndexer index = channel_indexer(student);
  const bool grad_student = std::get<1>(outputs).numel() != 0;
  const bool others = std::get<2>(outputs).numel() != 0 || std::get<3>(outputs).numel() != 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ofd_fused_cpu", [&] {
    using acc_t = accumulation_t<scalar_t>;
    const auto p = fused_pointers<scalar_t, acc_t>(student, teacher, margin, outputs, elementwise);
    acc_t* partials = elementwise ? nullptr : std::get<0>(outputs).mutable_data_ptr<acc_t>();
    // The common cases get their own branch-free loops; the rest share one general loop.
    if (elementwise || others) ofd_launch<AnyOutputs>(p, index, numel, partials);
    else if (grad_student) ofd_launch<LossAndStudentGrad>(p, index, numel, partials);
    else ofd_launch<LossOnly>(p, index, numel, partials);
  });
}

}  // namespace

const OfdCpuKernels kOfdCpuKernels{&ofd_kernel};

}  // namespace CPU_CAPABILITY
}  // namespace ofdkern
