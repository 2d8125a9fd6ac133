// The CPU kernels for one x86-64 vector instruction set, with ATen's Vectorized<> of
// that set. Included by bn_cpu_kernels_avx2.cpp / bn_cpu_kernels_avx512.cpp after they
// define FUSEDRES_ISA (the namespace) and, for AVX-512, FUSEDRES_ISA_AVX512.
//
// setup.py gives every file the same flags, so the instruction set is chosen here, and
// only for ATen's vector headers and the kernels: every other header is included first,
// for the baseline instruction set, so that no inline function shared with the other
// files (c10::Half conversions, TORCH_CHECK helpers ...) gets an AVX2/AVX-512 copy the
// linker could pick for code that runs on any processor. FMA contraction stays off (see
// bn_cpu_kernels.h) so the ReLU mask matches the reference bit for bit.
#include "cpu/bn_cpu.h"  // defines FUSEDRES_HAVE_X86_KERNELS (x86-64 with GCC)
#ifdef FUSEDRES_HAVE_X86_KERNELS

// 1. Baseline instruction set: everything outside ATen's vector library.
#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

// 2. The vector instruction set: ATen's vector library (at::vec::AVX2 / AVX512) and
//    the kernels (fusedres::cpu::FUSEDRES_ISA). GCC does not define the feature macros
//    for a target pragma; sleef.h tests them.
#pragma GCC push_options
#ifdef FUSEDRES_ISA_AVX512
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#else
#pragma GCC target("avx,avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
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
#include <ATen/cpu/vec/vec.h>

#include "cpu/bn_cpu_kernels.h"
#pragma GCC pop_options

#endif  // FUSEDRES_HAVE_X86_KERNELS
