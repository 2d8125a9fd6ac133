// The CPU kernels compiled for AVX2 (x86-64 only), with ATen's AVX2 Vectorized<float>.
// bn_cpu.cpp calls them only when the processor has AVX2 and FMA. The build flags are
// the same for every file (setup.py), so the instruction set is chosen here; FMA
// contraction stays off (see bn_cpu_kernels.h) so the ReLU mask matches the reference.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx,avx2,fma,f16c")
// GCC does not define the feature macros for a target pragma; headers (sleef.h) test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FUSEDRES_ISA isa_avx2
#include "cpu/bn_cpu_kernels.h"
#endif
