// The vectorized CPU kernels are compiled once per instruction set: cpu_isa_default.cpp, cpu_isa_avx2.cpp and
// cpu_isa_avx512.cpp each include every op's kernel header (<op>_cpu_kernels.h) under
// their own CPU_CAPABILITY namespace and at::vec vector width (Sleef's functions of that width), and each
// defines the op's kernel table there. An op declares its table type and picks the variant torch itself runs
// on here (at::get_cpu_capability, which honours ATEN_CPU_CAPABILITY) with OFDKERN_CPU_KERNEL_TABLE.
#pragma once

#include <ATen/Version.h>

#include <string>

// The instruction-set variants exist for x86-64 builds with GCC (#pragma GCC target); others build only the
// baseline one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OFDKERN_CPU_ISA_VARIANTS 1
#else
#define OFDKERN_CPU_ISA_VARIANTS 0
#endif

namespace ofdkern {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

// The widest variant of this build that torch's own kernels use on this CPU.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#if OFDKERN_CPU_ISA_VARIANTS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return CpuIsa::kAvx512;
    if (capability == "AVX2") return CpuIsa::kAvx2;
#endif
    return CpuIsa::kBaseline;
  }();
  return isa;
}

}  // namespace ofdkern

// Declares the kernel table `name` of type Type in every variant's namespace and defines name##_here(), the
// variant for this CPU.
#if OFDKERN_CPU_ISA_VARIANTS
#define OFDKERN_CPU_KERNEL_TABLE(Type, name)                                     \
  namespace DEFAULT { extern const Type name; }                                  \
  namespace AVX2 { extern const Type name; }                                     \
  namespace AVX512 { extern const Type name; }                                   \
  inline const Type& name##_here() {                                             \
    switch (cpu_isa()) {                                                         \
      case CpuIsa::kAvx512: return AVX512::name;                                 \
      case CpuIsa::kAvx2: return AVX2::name;                                     \
      default: return DEFAULT::name;                                             \
    }                                                                            \
  }
#else
#define OFDKERN_CPU_KERNEL_TABLE(Type, name)    \
  namespace DEFAULT { extern const Type name; } \
  inline const Type& name##_here() { return DEFAULT::name; }
#endif
