// The vectorized CPU kernels (cpu_isa.h) for AVX2 with FMA: 8 floats per vector.
#include "cpu_isa.h"

#if OFDKERN_CPU_ISA_VARIANTS
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu_isa_prelude.h"
#pragma GCC target("avx2,fma,f16c")
// GCC's C++ front end does not define the pragma's target macros; sleef.h declares its 256-bit functions
// under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#include "frskd_cpu_kernels.h"
#include "align_cpu_kernels.h"
#endif
