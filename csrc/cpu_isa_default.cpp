// The vectorized CPU kernels (cpu_isa.h) for the baseline instruction set, the fallback on any CPU.
#define CPU_CAPABILITY DEFAULT
#include "cpu_isa_prelude.h"
#include "attention_transfer_cpu_kernels.h"
#include "cpu_scale_kernels.h"
#include "kd_cpu_kernels.h"
#include "align_cpu_kernels.h"
#include "ofd_cpu_kernels.h"
