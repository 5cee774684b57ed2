// The vectorized CPU kernels (cpu_isa.h) for AVX-512 (F, BW, VL, DQ: torch's AVX512 capability): 16 floats
// per vector.
#include "cpu_isa.h"

#if OFDKERN_CPU_ISA_VARIANTS
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu_isa_prelude.h"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "cpu_isa_sleef.h"
#include "attention_transfer_cpu_kernels.h"
#include "cpu_scale_kernels.h"
#include "kd_cpu_kernels.h"
#include "align_cpu_kernels.h"
#include "ofd_cpu_kernels.h"
#endif
