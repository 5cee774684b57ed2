// The CPU kernels of the FRSKD ops, compiled once per instruction set: frskd_cpu_kernels.h is included by
// frskd_cpu_default.cpp, frskd_cpu_avx2.cpp and frskd_cpu_avx512.cpp, each with its at::vec vector width
// (Sleef's exp and log of that width), and frskd_cpu.cpp picks the one torch itself runs on
// (at::get_cpu_capability, which honours ATEN_CPU_CAPABILITY).
//
// The kernels fill outputs that frskd_cpu.cpp has checked and allocated (frskd_fused.h); each output element is
// written by one thread and every sum runs in an order fixed by the shapes alone, so results do not depend on
// the thread count.
#pragma once

#include <ATen/ATen.h>

#include "frskd_fused.h"

// The instruction-set variants exist for x86-64 builds with GCC (#pragma GCC target); others build only the
// baseline one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OFDKERN_FRSKD_X86_VARIANTS 1
#else
#define OFDKERN_FRSKD_X86_VARIANTS 0
#endif

namespace ofdkern {

struct FrskdCpuKernels {
  // feature: (N, C, S) with positions or channels innermost (above); map: allocated output.
  void (*attention_map)(const at::Tensor& feature, double p, const at::Tensor& map);
  // feature as above; grad: allocated with feature's strides.
  void (*attention_map_backward)(const at::Tensor& feature, const at::Tensor& grad_map, double p,
                                 const at::Tensor& grad);
  // Logits of N > 0 rows of K > 0 classes.
  void (*kd)(const at::Tensor& student, const at::Tensor& teacher, double temperature, const KDOutputs& outputs);
};

namespace DEFAULT {
extern const FrskdCpuKernels kFrskdCpuKernels;
}
#if OFDKERN_FRSKD_X86_VARIANTS
namespace AVX2 {
extern const FrskdCpuKernels kFrskdCpuKernels;
}
namespace AVX512 {
extern const FrskdCpuKernels kFrskdCpuKernels;
}
#endif

}  // namespace ofdkern
