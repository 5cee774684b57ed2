// The FRSKD CPU kernels for AVX2 with FMA (frskd_cpu.h): 8 floats per vector.
#include "frskd_cpu.h"

#if OFDKERN_FRSKD_X86_VARIANTS
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "frskd_cpu_prelude.h"
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
#endif
