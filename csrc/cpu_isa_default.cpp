// The vectorized CPU kernels (cpu_isa.h) for the baseline instruction set, the fallback on any CPU.
#define CPU_CAPABILITY DEFAULT
#include "cpu_isa_prelude.h"
#include "frskd_cpu_kernels.h"
#include "align_cpu_kernels.h"
