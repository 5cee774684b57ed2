// The FRSKD CPU kernels for the baseline instruction set (frskd_cpu.h), the fallback on any CPU.
#define CPU_CAPABILITY DEFAULT
#include "frskd_cpu_prelude.h"
#include "frskd_cpu_kernels.h"
