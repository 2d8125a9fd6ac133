// The CPU kernels compiled for AVX2 (x86-64 only), with ATen's AVX2 Vectorized<float>.
// bn_cpu.cpp calls them only when the processor has AVX2 and FMA.
//
// setup.py gives every file the same flags, so the instruction set is chosen here, and
// only for ATen's vector headers and the kernels: every other header is included
// first, for the baseline instruction set, so that no inline function shared with the
// other files (c10::Half conversions, TORCH_CHECK helpers ...) gets an AVX2 copy the
// linker could pick for code that runs on any processor. FMA contraction stays off
// (see bn_cpu_kernels.h) so the ReLU mask matches the reference bit for bit.
#include "cpu/bn_cpu.h"  // defines FUSEDRES_HAVE_AVX2_KERNELS (x86-64 with GCC)
#ifdef FUSEDRES_HAVE_AVX2_KERNELS

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

// 2. AVX2: ATen's vector library (namespace at::vec::AVX2) and the kernels
//    (namespace fusedres::cpu::isa_avx2).
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c")
// GCC does not define the feature macros for a target pragma; sleef.h tests them.
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
#include <ATen/cpu/vec/vec.h>

#define FUSEDRES_ISA isa_avx2
#include "cpu/bn_cpu_kernels.h"
#pragma GCC pop_options

#endif  // FUSEDRES_HAVE_AVX2_KERNELS
