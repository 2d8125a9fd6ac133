// Plain argument structs shared by the CPU wrappers (bn_cpu.cpp) and the kernels
// (bn_cpu_kernels.h, compiled once per instruction set by bn_cpu_kernels_*.cpp).
// No ATen vector headers here, so every translation unit can include it.
#pragma once
#include <cstdint>

#include <c10/core/ScalarType.h>

namespace fusedres::cpu {

// One (N, C, S) view: data pointer and element strides (any strides, int64).
struct Ncs {
  const void* data = nullptr;
  int64_t sN = 0, sC = 0, sS = 0;
};

struct Shape {
  int64_t N = 0, C = 0, S = 0;
};

// Per-channel vectors are dense, in the accumulation dtype (double for double
// activations, float otherwise).
struct StatsArgs {
  Shape sh;
  Ncs x;
  void* mean = nullptr;  // (C,) out
  void* var = nullptr;   // (C,) out, biased
};

// pre = (x - mean)*scale + shift [+ (x2 - mean2)*scale2 + shift2] [+ res]: centred, so
// nothing cancels when |mean| >> std (shift is the BN bias, not bias - mean*scale).
struct ApplyArgs {
  Shape sh;
  Ncs x, res, x2;  // res / x2 used when has_res / has_x2
  const void* mean = nullptr;
  const void* scale = nullptr;
  const void* shift = nullptr;
  const void* mean2 = nullptr;
  const void* scale2 = nullptr;
  const void* shift2 = nullptr;
  bool has_res = false, has_x2 = false, relu = false;
  bool channels_last = false;  // layout of out and of the mask
  void* out = nullptr;         // dense in the layout channels_last
  uint8_t* mask = nullptr;     // ceil(N*C*S/8) bytes, or null
};

struct BackwardArgs {
  Shape sh;
  Ncs dout, x;
  const void* mean = nullptr;
  const void* scale = nullptr;
  const void* shift = nullptr;
  const uint8_t* mask = nullptr;  // null: recompute from x when relu
  int64_t mask_bytes = 0;
  bool relu = false;
  bool channels_last = false;  // layout the mask was packed in / outputs' layout
  // reduce
  void* sum_g = nullptr;
  void* sum_g_xc = nullptr;
  // apply
  const void* coef_g = nullptr;
  const void* coef_xc = nullptr;
  const void* coef_c = nullptr;
  void* dx = nullptr;
  void* dres = nullptr;  // null unless the residual gradient is written
};

#define FUSEDRES_DECLARE_CPU_KERNELS(ISA)                                   \
  namespace ISA {                                                           \
  void bn_stats(c10::ScalarType dtype, const StatsArgs& a);                 \
  void bn_apply(c10::ScalarType dtype, const ApplyArgs& a);                 \
  void bn_backward_reduce(c10::ScalarType dtype, const BackwardArgs& a);    \
  void bn_backward_apply(c10::ScalarType dtype, const BackwardArgs& a);     \
  }

FUSEDRES_DECLARE_CPU_KERNELS(isa_default)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDRES_HAVE_X86_KERNELS 1
FUSEDRES_DECLARE_CPU_KERNELS(isa_avx2)
FUSEDRES_DECLARE_CPU_KERNELS(isa_avx512)
#endif

}  // namespace fusedres::cpu
