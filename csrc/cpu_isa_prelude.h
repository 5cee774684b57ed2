// Included first by each cpu_isa_<isa>.cpp, before its #pragma GCC target: every header outside at::vec that
// the kernels (<op>_cpu_kernels.h) and at::vec pull in. Code is compiled for the
// instruction set in force where it is defined, so these headers' inline functions, which other translation
// units define too, stay baseline code; only at::vec (in its per-capability namespace) and ofdkern's kernels
// (in per-capability or internal namespaces) are compiled for the wider instruction set.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "accumulation.h"
#include "align_cpu.h"
#include "align_fused.h"
#include "attention_transfer_cpu.h"
#include "attention_transfer_fused.h"
#include "cpu_buffers.h"
#include "cpu_scale.h"
#include "cwd_fused.h"
#include "kd_cpu.h"
#include "kd_fused.h"
#include "ofd_cpu.h"
#include "ofd_fused.h"
