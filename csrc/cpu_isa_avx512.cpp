// The vectorized CPU kernels (cpu_isa.h) for AVX-512 (F, BW, VL, DQ: torch's AVX512 capability): 16 floats
// per vector.
#include "cpu_isa.h"

#if OFDKERN_CPU_ISA_VARIANTS
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu_isa_prelude.h"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC's C++ front end does not define the pragma's target macros; sleef.h declares its 512-bit functions
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#include "frskd_cpu_kernels.h"
#include "align_cpu_kernels.h"
#endif
