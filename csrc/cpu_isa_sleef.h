// Included by cpu_isa_avx2.cpp and cpu_isa_avx512.cpp right after their #pragma GCC target: GCC's C++ front
// end does not define the pragma's target macros, and sleef.h declares its 256- and 512-bit functions under
// them.
#pragma once

#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#if defined(CPU_CAPABILITY_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#endif
