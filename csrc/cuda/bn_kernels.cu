// CUDA kernels of the fusedres BatchNorm primitives: bn_stats, bn_apply,
// bn_backward_reduce, bn_backward_apply. The contract (shapes, layouts, mask bits) is
// fusedres/reference.py; the launchers are declared in bn_kernels.h.
//
// Plain CUDA C++ (no torch headers). Element types float, double, __half,
// __nv_bfloat16; math in Acc<T> (double for double, float otherwise), one cast at the
// store. All offsets are int64.
//
// Elementwise kernels (bn_apply, bn_backward_apply): each thread handles chunks of 8
// consecutive elements of the dense output, so it owns whole mask bytes (byte k of the
// mask is chunk k) and no two threads write one byte. When every activation input has
// the dense output's strides and every pointer is 16-byte aligned, a chunk moves as
// 16-byte loads and stores (VEC); otherwise each element is addressed through its
// (n, c, s) and the input's strides. A thread walks its chunks with an odometer over
// (n, c, s) so that the grid-stride loop needs no integer division per chunk.
//
// Reductions (bn_stats, bn_backward_reduce): two traversals, chosen from the strides of x:
// * channel-outer (S contiguous, NCHW): block (c, p) reduces partition p of channel c's
//   N*S elements, each thread 8 elements of the flattened (n, s) at a time: 8
//   consecutive ones as a 16-byte-aligned vector when S % 8 == 0 and the view allows it,
//   else 8 scalar loads 256 elements apart (consecutive threads, consecutive elements);
// * channel-inner (C contiguous, channels-last): a (TX, TY) block covers TX groups of V
//   channels (V*sizeof(T) = 16 bytes when C % V == 0, else V = 1) and TY row lanes,
//   each thread 4 rows (n, s) at a time.
// Each block writes one partial per channel into two [P, C] arrays (Partials); a merge
// kernel combines the P partials of a channel in a fixed order, in the closed form of
// Chan's merge (partition counts come from the plan: every partition but the last holds
// the same count). Why this shape, with the figures: docs/cuda_reductions.md. No
// atomics: bitwise reproducible from run to run (and across GPUs: the partitioning
// depends only on shapes, strides and pointer alignment). Statistics use Welford: a thread turns each
// batch of loaded values into (count, mean, M2) exactly and folds it in with Chan's
// formula, and partials merge with Chan's formula (never E[x^2] - E[x]^2). They run on
// x - pivot, the pivot a value of the channel (x[0, c, 0]): every running mean then has
// the size of the spread, not of the mean, so its roundings do not grow with |mean|
// (at mean 10, std 0.5 the unshifted means cost dweight 5.6x torch's error); the merge
// kernel adds the pivot back. No integer division in a reduction kernel: (n, s) of a
// flat row comes from a reciprocal (split_row), since a 64-bit division is a called
// routine whose register saves spilled.
//
// ReLU propagates NaN (pre < 0 ? 0 : pre); a mask bit is !(pre <= 0).
#include "cuda/bn_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fusedres {
namespace cuda {
namespace {

constexpr int kThreads = 256;            // threads per block, every kernel
constexpr int kUnit = 8;                 // elements per chunk: one mask byte
constexpr int kRows = 4;                 // rows per thread and step, channel-inner reductions
constexpr int64_t kTargetBlocks = 2048;  // reduction blocks aimed at (shape-only choice)
constexpr int64_t kMinSteps = 4;         // least steps per thread before splitting further
// Partitions per channel at most: the merge kernel's kMergeLanes lanes of a channel then
// read <= 16 partials each, all issued before the first is used (see merge_partials_kernel).
// At C = 64 (one channel block) the grid is P blocks: 512 left a second, short wave of
// 3-4 resident blocks per SM; 1024 makes the blocks shorter and the last wave smaller.
constexpr int64_t kMaxParts = 1024;
static_assert(kMaxParts <= 65535, "P is grid dimension y");
constexpr int kMergeChannels = 8;   // channels per merge block: one 32-byte sector of floats
constexpr int kMergeThreads = 512;  // merge block: kMergeChannels x kMergeLanes
constexpr int kMergeLanes = kMergeThreads / kMergeChannels;
// The channels-inner reductions at small shapes (7x7x512, batch 64): 4 steps per thread
// left ~12 KiB of loads in flight per SM, under the ~13 KiB (H100) to ~18 KiB (H200) that
// near-copy bandwidth needs; 2 steps give twice the blocks. A 16-bit statistics thread
// loads half the bytes per step of the others (one tensor, 2-byte elements): 1 step.
constexpr int64_t kMinStepsInner = 2;
constexpr int kBlocksPerSm = 8;          // elementwise grid: blocks per SM (grid-stride beyond)

enum Mode { kStats = 0, kBackward = 1 };
constexpr int64_t min_steps_inner(int mode, size_t elem_bytes) {
  return mode == kStats && elem_bytes < 4 ? 1 : kMinStepsInner;
}

// Resident 256-thread blocks per SM asked of the elementwise kernels: 4 (<= 64 registers,
// half the SM's threads) keeps enough bytes in flight; double needs more registers.
// The kRowsPath kernels of a dual BN or a recomputed backward gate read 6 per-channel
// vectors of 8 per chunk: 2 blocks (128 registers) instead of spilling.
template <typename T, int PATH = 0, bool HEAVY = false>
constexpr int min_blocks_elementwise() {
  return sizeof(T) == 8 || (PATH != 0 && HEAVY) ? 2 : 4;
}

// ------------------------------------------------------------------------------------
// Element types: scalar loads, 16-byte vector loads/stores, conversions
// ------------------------------------------------------------------------------------

__device__ __forceinline__ float mad(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mad(double a, double b, double c) { return fma(a, b, c); }

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kPerVec = 4;  // elements in 16 bytes
  __device__ static float load(const float* p) { return __ldg(p); }
  __device__ static void store(float* p, float v) { *p = v; }
  __device__ static void unpack(uint4 r, float* v) {
    v[0] = __uint_as_float(r.x);
    v[1] = __uint_as_float(r.y);
    v[2] = __uint_as_float(r.z);
    v[3] = __uint_as_float(r.w);
  }
  __device__ static uint4 pack(const float* v) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
  }
};

template <>
struct Elem<double> {
  static constexpr int kPerVec = 2;
  __device__ static double load(const double* p) { return __ldg(p); }
  __device__ static void store(double* p, double v) { *p = v; }
  __device__ static void unpack(uint4 r, double* v) {
    v[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    v[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  __device__ static uint4 pack(const double* v) {
    return make_uint4(static_cast<unsigned>(__double2loint(v[0])),
                      static_cast<unsigned>(__double2hiint(v[0])),
                      static_cast<unsigned>(__double2loint(v[1])),
                      static_cast<unsigned>(__double2hiint(v[1])));
  }
};

// 16-bit types: element 2k is the low half of 32-bit word k (little endian).
template <typename T, typename Cvt>
struct Elem16 {
  static constexpr int kPerVec = 8;
  __device__ static float load(const T* p) {
    return Cvt::to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  __device__ static void store(T* p, float v) {
    *reinterpret_cast<unsigned short*>(p) = Cvt::from_float(v);
  }
  __device__ static void unpack(uint4 r, float* v) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = Cvt::to_float(static_cast<unsigned short>(w[k] & 0xffffu));
      v[2 * k + 1] = Cvt::to_float(static_cast<unsigned short>(w[k] >> 16));
    }
  }
  __device__ static uint4 pack(const float* v) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = static_cast<unsigned>(Cvt::from_float(v[2 * k])) |
             (static_cast<unsigned>(Cvt::from_float(v[2 * k + 1])) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

struct HalfCvt {
  __device__ static float to_float(unsigned short b) { return __half2float(__ushort_as_half(b)); }
  __device__ static unsigned short from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};
struct BFloat16Cvt {
  __device__ static float to_float(unsigned short b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  __device__ static unsigned short from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};
template <>
struct Elem<__half> : Elem16<__half, HalfCvt> {};
template <>
struct Elem<__nv_bfloat16> : Elem16<__nv_bfloat16, BFloat16Cvt> {
  // A bf16 is the high half of its float: one shift or one mask per element (the generic
  // unpack takes a shift and a multiply for the high halves).
  __device__ static void unpack(uint4 r, float* v) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = __uint_as_float(w[k] << 16);
      v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
};

// 8 consecutive elements from a 16-byte-aligned pointer.
template <typename T>
__device__ __forceinline__ void load8(const T* p, acc_t<T>* v) {
  constexpr int kVecs = kUnit / Elem<T>::kPerVec;
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int k = 0; k < kVecs; ++k) Elem<T>::unpack(__ldg(q + k), v + k * Elem<T>::kPerVec);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const acc_t<T>* v) {
  constexpr int kVecs = kUnit / Elem<T>::kPerVec;
  uint4* q = reinterpret_cast<uint4*>(p);
  // __stwb: one 16-byte store (a plain uint4 assignment of packed halves came out as four
  // 4-byte stores).
#pragma unroll
  for (int k = 0; k < kVecs; ++k) __stwb(q + k, Elem<T>::pack(v + k * Elem<T>::kPerVec));
}

__device__ __forceinline__ int64_t offset3(const Strides3& st, int64_t n, int64_t c, int64_t s) {
  return n * st.n + c * st.c + s * st.s;
}

// Bit of element (n, c, s) in a mask packed in the dense layout `cl`.
__device__ __forceinline__ bool mask_bit(const uint8_t* mask, bool cl, int64_t C, int64_t S,
                                         int64_t n, int64_t c, int64_t s) {
  const int64_t o = cl ? (n * S + s) * C + c : (n * C + c) * S + s;
  return (__ldg(mask + (o >> 3)) >> (o & 7)) & 1;
}

template <typename acc>
__device__ __forceinline__ acc relu_nan(acc v) {
  return v < acc(0) ? acc(0) : v;  // NaN < 0 is false: NaN passes (never fmax)
}

// ------------------------------------------------------------------------------------
// Odometer over the dense output order: digits (in, mid, out) of sizes (I, Mi, -).
// Channels-last: (c, s, n) with I = C, Mi = S. NCHW: (s, c, n) with I = S, Mi = C.
// ------------------------------------------------------------------------------------

// Digits are 32-bit (the launchers require N, C, S < 2^30); offsets stay 64-bit.
struct Odo {
  int in, mid, out;
};

__device__ __forceinline__ Odo odo_from(int64_t o, int I, int Mi) {
  const int64_t t = o / I;
  return Odo{static_cast<int>(o - t * I), static_cast<int>(t % Mi), static_cast<int>(t / Mi)};
}

__device__ __forceinline__ void odo_next(Odo& d, int I, int Mi) {
  if (++d.in == I) {
    d.in = 0;
    if (++d.mid == Mi) {
      d.mid = 0;
      ++d.out;
    }
  }
}

// d += step, where step.in < I and step.mid < Mi (a decomposed constant).
__device__ __forceinline__ void odo_add(Odo& d, const Odo& step, int I, int Mi) {
  d.in += step.in;
  int carry = 0;
  if (d.in >= I) {
    d.in -= I;
    carry = 1;
  }
  d.mid += step.mid + carry;
  if (d.mid >= Mi) {
    d.mid -= Mi;
    d.out += 1;
  }
  d.out += step.out;
}

struct ElemIndex {
  int I, Mi;  // odometer digit sizes
  bool cl;    // output layout
  Odo step;   // grid-stride step in elements, decomposed
};

__device__ __forceinline__ void nc_s(const ElemIndex& ix, const Odo& d, int& n, int& c, int& s) {
  n = d.out;
  c = ix.cl ? d.in : d.mid;
  s = ix.cl ? d.mid : d.in;
}

// ------------------------------------------------------------------------------------
// Elementwise kernels: bn_apply and bn_backward_apply
// ------------------------------------------------------------------------------------
//
// Three traversals (the launcher picks one; every one walks chunks of 8 output elements):
// * kRowsPath (channels-last output, C % 8 == 0, every activation dense and 16-byte aligned):
//   thread t owns channel group g = t % (C/8), channels [8g, 8g + 8), for every row (n, s)
//   it visits: rows t / (C/8), + R, + 2R, ... with R = threads / (C/8). Its per-channel
//   values are loaded once, before the loop, and stay in registers; the loop is the
//   vector loads, the math and the stores (no index arithmetic per element).
// * kPlanesPath (NCHW output, S >= 8, dense and aligned): a chunk lies in one plane (n, c)
//   or spans two consecutive ones (c, then c + 1 mod C), never more. Two passes, so that
//   no warp runs both kinds of chunk in one loop (divergent warps would issue both):
//   the chunks inside one plane, with an odometer over (s, c, n) moving by the grid
//   stride, each with its channel's values (scalar loads that hit L1) and no selects;
//   then the chunks across a plane boundary (at most one per plane: <= 8/S of the
//   chunks), one per boundary, each element selecting its channel's values.
// * kGeneric (any strides, misalignment, small inner dims): element by element through
//   (n, c, s) and each input's strides, with 16-byte loads when VEC.

enum Path { kGeneric = 0, kGenericVec = 1, kRowsPath = 2, kPlanesPath = 3 };

// The centred pre-activation of one BN input: (x - mean)*scale + shift, shift the BN
// bias. x - mean is exact when x is near the mean (nothing cancels when |mean| >> std);
// one fused multiply-add, written once here for the forward and both backward kernels,
// so a recomputed ReLU mask is bit for bit the forward's.
template <typename acc>
__device__ __forceinline__ acc centred(acc x, acc mean, acc scale, acc shift) {
  return mad(x - mean, scale, shift);
}

// A 16-byte read-only load issued where it is written: the compiler may not hoist it out
// of a loop (it would keep the values in registers across the loop, and spill).
__device__ __forceinline__ uint4 ldg_here(const uint4* p) {
#ifdef __CUDA_ARCH__
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
#else
  return __ldg(p);
#endif
}

// 8 consecutive per-channel values (a 16-byte-aligned pointer: c0 % 8 == 0), loaded in
// every iteration of the loop that uses them (L1 hits).
template <typename acc>
__device__ __forceinline__ void load8_acc(const acc* p, acc* v) {
  constexpr int kPer = 16 / sizeof(acc);
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int k = 0; k < kUnit / kPer; ++k) {
    if constexpr (sizeof(acc) == 4) {
      Elem<float>::unpack(ldg_here(q + k), v + k * kPer);
    } else {
      Elem<double>::unpack(ldg_here(q + k), v + k * kPer);
    }
  }
}

// Per-channel values of one BN input for the 8 elements of a chunk.
template <typename acc>
struct Channels8 {
  acc mean[kUnit], scale[kUnit], shift[kUnit];
};

// kRowsPath: channels [c0, c0 + 8).
template <typename acc>
__device__ __forceinline__ void load_group(Channels8<acc>& ch, const acc* mean, const acc* scale,
                                           const acc* shift, int64_t c0) {
  load8_acc(mean + c0, ch.mean);
  load8_acc(scale + c0, ch.scale);
  load8_acc(shift + c0, ch.shift);
}

template <typename T>
struct ApplyArgs {
  const T* x;  // (N, C, S) any strides
  Strides3 xs;
  const acc_t<T>* mean;   // (C,)
  const acc_t<T>* scale;  // (C,)
  const acc_t<T>* shift;  // (C,)
  const T* res;           // (N, C, S) any strides, or null
  Strides3 rs;
  const T* x2;  // (N, C, S) any strides, or null
  Strides3 x2s;
  const acc_t<T>* mean2;   // (C,) when x2
  const acc_t<T>* scale2;  // (C,) when x2
  const acc_t<T>* shift2;  // (C,) when x2
  T* out;                  // (N, C, S) dense in layout ix.cl
  uint8_t* mask;           // ceil(E/8) bytes, or null
  bool relu;
  int64_t E, chunks;  // N*C*S, ceil(E/8)
  int64_t row_step;   // kRowsPath: rows between a thread's chunks (R)
  ElemIndex ix;
};

// The output of one element from its loaded inputs and its channel's values; X2: a second
// BN (a.x2 set), known at compile time.
template <bool X2, typename T, typename acc>
__device__ __forceinline__ acc apply_one(const ApplyArgs<T>& a, acc x, acc r, acc x2, acc m,
                                         acc s, acc b, acc m2, acc s2, acc b2, bool& pass) {
  acc pre = centred(x, m, s, b);
  if (X2) pre = pre + centred(x2, m2, s2, b2);
  if (a.res) pre = pre + r;
  pass = !(pre <= acc(0));
  return a.relu ? relu_nan(pre) : pre;
}

// Chunk k (elements 8k .. 8k+7 of the output, `pos` their first's odometer), element by
// element: kGeneric, and the last, partial chunk of kPlanesPath.
template <typename T, bool VEC, bool X2>
__device__ __forceinline__ void apply_chunk_generic(const ApplyArgs<T>& a, int64_t k, Odo pos) {
  using acc = acc_t<T>;
  const int64_t o0 = k * kUnit;
  const int valid = static_cast<int>(min(static_cast<int64_t>(kUnit), a.E - o0));
  acc xv[kUnit], rv[kUnit], x2v[kUnit];  // xv becomes the output
  const bool vec = VEC && valid == kUnit;
  if (vec) {
    load8(a.x + o0, xv);
    if (a.res) load8(a.res + o0, rv);
    if (X2) load8(a.x2 + o0, x2v);
  }
  unsigned bits = 0;
  Odo d = pos;  // (n, c, s) of element o0 + j
#pragma unroll
  for (int j = 0; j < kUnit; ++j, odo_next(d, a.ix.I, a.ix.Mi)) {
    int n, c, s;  // c is a valid channel even past E
    nc_s(a.ix, d, n, c, s);
    if (!vec) {
      xv[j] = rv[j] = x2v[j] = acc(0);
      if (j < valid) {
        xv[j] = Elem<T>::load(a.x + offset3(a.xs, n, c, s));
        if (a.res) rv[j] = Elem<T>::load(a.res + offset3(a.rs, n, c, s));
        if (X2) x2v[j] = Elem<T>::load(a.x2 + offset3(a.x2s, n, c, s));
      }
    }
    bool pass;
    const acc m2 = X2 ? __ldg(a.mean2 + c) : acc(0);
    const acc s2 = X2 ? __ldg(a.scale2 + c) : acc(0);
    const acc b2 = X2 ? __ldg(a.shift2 + c) : acc(0);
    xv[j] = apply_one<X2>(a, xv[j], rv[j], x2v[j], __ldg(a.mean + c), __ldg(a.scale + c),
                      __ldg(a.shift + c), m2, s2, b2, pass);
    if (j < valid && pass) bits |= 1u << j;
    if (!vec && j < valid) Elem<T>::store(a.out + o0 + j, xv[j]);
  }
  if (vec) store8(a.out + o0, xv);
  if (a.mask) a.mask[k] = static_cast<uint8_t>(bits);
}

// The traversal both elementwise kernels share (see "Elementwise kernels"): calls
// rows(o0, c0) for each kRowsPath chunk (its first output offset and channel group),
// planes(k, c0, c1, split, straddle) for each full kPlanesPath chunk k (straddle: a
// std::bool_constant, whether the chunk spans two planes; then elements j < split, 1 <=
// split < 8, are channel c0's and the rest c1's, else all are c0's), and generic(k, pos,
// vec) for every other chunk (pos: the odometer of its first element; vec: a
// std::bool_constant, 16-byte accesses allowed).
template <int PATH, typename Rows, typename Planes, typename Generic>
__device__ __forceinline__ void walk_chunks(const ElemIndex& ix, int64_t E, int64_t chunks,
                                            int64_t row_step, Rows&& rows, Planes&& planes,
                                            Generic&& generic) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  if constexpr (PATH == kRowsPath) {
    const int64_t C = ix.I, groups = C / kUnit;
    const int64_t row = first / groups, c0 = (first - row * groups) * kUnit;
    if (row >= row_step) return;
    const int64_t step = row_step * C;
    for (int64_t o0 = row * C + c0; o0 < E; o0 += step) rows(o0, c0);
  } else if constexpr (PATH == kPlanesPath) {
    const int S = ix.I, C = ix.Mi;
    const int64_t full = E / kUnit;
    if (first < chunks) {
      Odo pos = odo_from(first * kUnit, S, C);
      int64_t k = first;
      for (; k < full; k += stride, odo_add(pos, ix.step, S, C)) {
        if (S - pos.in >= kUnit) planes(k, pos.mid, pos.mid, kUnit, std::false_type{});
      }
      if (k < chunks) generic(k, pos, std::false_type{});  // the partial last chunk
    }
    if (S % kUnit == 0) return;  // no chunk spans two planes
    // Boundary b = p*S between planes p - 1 and p (channel p mod C), p = 1 .. N*C - 1.
    const int64_t planes_n = E / S;
    int64_t p = first + 1;
    if (p >= planes_n) return;
    int c = static_cast<int>(p % C);
    const int c_step = static_cast<int>(stride % C);
    for (; p < planes_n; p += stride) {
      const int64_t b = p * S, k = b / kUnit;
      const int split = static_cast<int>(b - k * kUnit);
      if (split != 0 && k < full) planes(k, c == 0 ? C - 1 : c - 1, c, split, std::true_type{});
      c += c_step;
      if (c >= C) c -= C;
    }
  } else {
    if (first >= chunks) return;
    Odo pos = odo_from(first * kUnit, ix.I, ix.Mi);
    for (int64_t k = first; k < chunks; k += stride, odo_add(pos, ix.step, ix.I, ix.Mi)) {
      generic(k, pos, std::bool_constant<PATH == kGenericVec>{});
    }
  }
}

// Whether element j of a kPlanesPath chunk is channel c0's: elements 0 and 7 of a chunk
// across a boundary are known (1 <= split <= 7), so only 1 .. 6 select.
template <bool STRADDLE>
__device__ __forceinline__ bool first_channel(int j, int split) {
  return !STRADDLE || j == 0 || (j < kUnit - 1 && j < split);
}

template <typename T, int PATH, bool X2>
__global__ void __launch_bounds__(kThreads, min_blocks_elementwise<T, PATH, X2>())
    bn_apply_kernel(ApplyArgs<T> a) {
  using acc = acc_t<T>;
  const auto rows = [&](int64_t o0, int64_t c0) {
    // The same 16-byte lines every iteration (L1 hits): held in registers across the
    // loop they would spill (6 vectors of 8 with a second BN).
    Channels8<acc> ch, ch2;
    load_group(ch, a.mean, a.scale, a.shift, c0);
    if (X2) load_group(ch2, a.mean2, a.scale2, a.shift2, c0);
    acc xv[kUnit], rv[kUnit], x2v[kUnit];
    load8(a.x + o0, xv);
    if (a.res) load8(a.res + o0, rv);
    if (X2) load8(a.x2 + o0, x2v);
    unsigned bits = 0;
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      bool pass;
      xv[j] = apply_one<X2>(a, xv[j], rv[j], x2v[j], ch.mean[j], ch.scale[j], ch.shift[j],
                            ch2.mean[j], ch2.scale[j], ch2.shift[j], pass);
      bits |= static_cast<unsigned>(pass) << j;
    }
    store8(a.out + o0, xv);
    if (a.mask) a.mask[o0 / kUnit] = static_cast<uint8_t>(bits);
  };
  const auto planes = [&](int64_t k, int c0, int c1, int split, auto straddle) {
    constexpr bool kStraddle = decltype(straddle)::value;
    const int64_t o0 = k * kUnit;
    acc xv[kUnit], rv[kUnit], x2v[kUnit];
    load8(a.x + o0, xv);
    if (a.res) load8(a.res + o0, rv);
    if (X2) load8(a.x2 + o0, x2v);
    // Channel c0's values, and c1's across a boundary, selected per element (no indexed
    // arrays: those would live in local memory).
    acc v0[6] = {}, v1[6] = {};
    const acc* const vecs[6] = {a.mean, a.scale, a.shift, a.mean2, a.scale2, a.shift2};
#pragma unroll
    for (int i = 0; i < (X2 ? 6 : 3); ++i) {
      v0[i] = __ldg(vecs[i] + c0);
      if (kStraddle) v1[i] = __ldg(vecs[i] + c1);
    }
    unsigned bits = 0;
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      const bool f = first_channel<kStraddle>(j, split);
      bool pass;
      xv[j] = apply_one<X2>(a, xv[j], rv[j], x2v[j], f ? v0[0] : v1[0], f ? v0[1] : v1[1],
                            f ? v0[2] : v1[2], f ? v0[3] : v1[3], f ? v0[4] : v1[4],
                            f ? v0[5] : v1[5], pass);
      bits |= static_cast<unsigned>(pass) << j;
    }
    store8(a.out + o0, xv);
    if (a.mask) a.mask[k] = static_cast<uint8_t>(bits);
  };
  const auto generic = [&](int64_t k, Odo pos, auto vec) {
    apply_chunk_generic<T, decltype(vec)::value, X2>(a, k, pos);
  };
  walk_chunks<PATH>(a.ix, a.E, a.chunks, a.row_step, rows, planes, generic);
}

// ------------------------------------------------------------------------------------
// bn_backward_apply: dx = coef_g*g + coef_xc*(x - mean) + coef_c, dres = g
// ------------------------------------------------------------------------------------

template <typename T>
struct BackwardApplyArgs {
  const T* dout;  // (N, C, S) any strides
  Strides3 ds;
  const T* x;  // (N, C, S) any strides
  Strides3 xs;
  const acc_t<T>* mean;     // (C,)
  const acc_t<T>* scale;    // (C,) relu recompute
  const acc_t<T>* shift;    // (C,) relu recompute
  const uint8_t* mask;      // packed in layout ix.cl, or null
  const acc_t<T>* coef_g;   // (C,)
  const acc_t<T>* coef_xc;  // (C,)
  const acc_t<T>* coef_c;   // (C,)
  bool relu;
  T* dx;    // (N, C, S) dense in layout ix.cl
  T* dres;  // same, or null
  int64_t E, chunks;
  int64_t row_step;  // kRowsPath: rows between a thread's chunks
  ElemIndex ix;
};

// How g = dout * passes gets its gate: no ReLU, the saved mask, or recomputed from x.
// kMaskAnyGate (reductions only): a mask packed in the layout the traversal does not
// follow, read bit by bit.
enum Gate { kNoGate = 0, kMaskGate = 1, kRecomputeGate = 2, kMaskAnyGate = 3 };

// Per-channel values of the backward for one element.
template <typename acc>
struct BackwardChannel {
  acc mean, scale, shift, cg, cxc, cc;
};

template <int GATE, typename T>
__device__ __forceinline__ BackwardChannel<acc_t<T>> backward_channel(
    const BackwardApplyArgs<T>& a, int64_t c) {
  BackwardChannel<acc_t<T>> ch{__ldg(a.mean + c), 0, 0, __ldg(a.coef_g + c),
                               __ldg(a.coef_xc + c), __ldg(a.coef_c + c)};
  if (GATE == kRecomputeGate) {
    ch.scale = __ldg(a.scale + c);
    ch.shift = __ldg(a.shift + c);
  }
  return ch;
}

// Member-wise a or b (selects: no indexed array in local memory).
template <typename acc>
__device__ __forceinline__ BackwardChannel<acc> select(bool first, const BackwardChannel<acc>& a,
                                                       const BackwardChannel<acc>& b) {
  return BackwardChannel<acc>{first ? a.mean : b.mean,   first ? a.scale : b.scale,
                              first ? a.shift : b.shift, first ? a.cg : b.cg,
                              first ? a.cxc : b.cxc,     first ? a.cc : b.cc};
}

// dx of one element; g (the gradient after the ReLU) written to `g`.
template <int GATE, typename acc>
__device__ __forceinline__ acc backward_one(acc d, acc x, unsigned byte, int j,
                                            const BackwardChannel<acc>& ch, acc& g) {
  bool pass = true;
  if (GATE == kMaskGate) pass = (byte >> j) & 1u;
  if (GATE == kRecomputeGate) pass = !(centred(x, ch.mean, ch.scale, ch.shift) <= acc(0));
  g = pass ? d : acc(0);
  return mad(ch.cg, g, mad(ch.cxc, x - ch.mean, ch.cc));
}

template <typename T>
__device__ __forceinline__ int gate_of(const BackwardApplyArgs<T>& a) {
  return a.mask ? kMaskGate : a.relu ? kRecomputeGate : kNoGate;
}

template <typename T, int GATE, bool VEC>
__device__ __forceinline__ void backward_chunk_generic(const BackwardApplyArgs<T>& a, int64_t k,
                                                       Odo pos) {
  using acc = acc_t<T>;
  const int64_t o0 = k * kUnit;
  const int valid = static_cast<int>(min(static_cast<int64_t>(kUnit), a.E - o0));
  acc dv[kUnit], xv[kUnit], gv[kUnit], dxv[kUnit];
  const bool vec = VEC && valid == kUnit;
  if (vec) {
    load8(a.dout + o0, dv);
    load8(a.x + o0, xv);
  }
  // The mask is packed in the output's layout: chunk k is mask byte k.
  const unsigned byte = GATE == kMaskGate ? static_cast<unsigned>(__ldg(a.mask + k)) : 0xffu;
  Odo d = pos;  // (n, c, s) of element o0 + j
#pragma unroll
  for (int j = 0; j < kUnit; ++j, odo_next(d, a.ix.I, a.ix.Mi)) {
    int n, c, s;  // c is a valid channel even past E
    nc_s(a.ix, d, n, c, s);
    if (!vec) {
      dv[j] = xv[j] = acc(0);
      if (j < valid) {
        dv[j] = Elem<T>::load(a.dout + offset3(a.ds, n, c, s));
        xv[j] = Elem<T>::load(a.x + offset3(a.xs, n, c, s));
      }
    }
    dxv[j] = backward_one<GATE>(dv[j], xv[j], byte, j, backward_channel<GATE>(a, c), gv[j]);
    if (!vec && j < valid) {
      Elem<T>::store(a.dx + o0 + j, dxv[j]);
      if (a.dres) Elem<T>::store(a.dres + o0 + j, gv[j]);
    }
  }
  if (vec) {
    store8(a.dx + o0, dxv);
    if (a.dres) store8(a.dres + o0, gv);
  }
}

// The three traversals as bn_apply_kernel's; GATE a compile-time switch (the kRowsPath
// registers hold 4 or 6 per-channel vectors).
template <typename T, int PATH, int GATE>
__global__ void __launch_bounds__(kThreads,
                                  min_blocks_elementwise<T, PATH, GATE == kRecomputeGate>())
    bn_backward_apply_kernel(const BackwardApplyArgs<T> a) {
  using acc = acc_t<T>;
  const auto rows = [&](int64_t o0, int64_t c0) {
    // Per-channel values reloaded each iteration (L1 hits), as in bn_apply_kernel.
    acc mean[kUnit], scale[kUnit], shift[kUnit], cg[kUnit], cxc[kUnit], cc[kUnit];
    load8_acc(a.mean + c0, mean);
    load8_acc(a.coef_g + c0, cg);
    load8_acc(a.coef_xc + c0, cxc);
    load8_acc(a.coef_c + c0, cc);
    if (GATE == kRecomputeGate) {
      load8_acc(a.scale + c0, scale);
      load8_acc(a.shift + c0, shift);
    }
    acc dv[kUnit], xv[kUnit], gv[kUnit];
    load8(a.dout + o0, dv);
    load8(a.x + o0, xv);
    const unsigned byte =
        GATE == kMaskGate ? static_cast<unsigned>(__ldg(a.mask + o0 / kUnit)) : 0xffu;
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      const BackwardChannel<acc> ch{mean[j], scale[j], shift[j], cg[j], cxc[j], cc[j]};
      xv[j] = backward_one<GATE>(dv[j], xv[j], byte, j, ch, gv[j]);
    }
    store8(a.dx + o0, xv);
    if (a.dres) store8(a.dres + o0, gv);
  };
  const auto planes = [&](int64_t k, int c0, int c1, int split, auto straddle) {
    constexpr bool kStraddle = decltype(straddle)::value;
    const int64_t o0 = k * kUnit;
    acc dv[kUnit], xv[kUnit], gv[kUnit];
    load8(a.dout + o0, dv);
    load8(a.x + o0, xv);
    const unsigned byte = GATE == kMaskGate ? static_cast<unsigned>(__ldg(a.mask + k)) : 0xffu;
    const BackwardChannel<acc> ch0 = backward_channel<GATE>(a, c0);
    const BackwardChannel<acc> ch1 = kStraddle ? backward_channel<GATE>(a, c1) : ch0;
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      const bool f = first_channel<kStraddle>(j, split);
      xv[j] = backward_one<GATE>(dv[j], xv[j], byte, j, select(f, ch0, ch1), gv[j]);
    }
    store8(a.dx + o0, xv);
    if (a.dres) store8(a.dres + o0, gv);
  };
  const auto generic = [&](int64_t k, Odo pos, auto vec) {
    backward_chunk_generic<T, GATE, decltype(vec)::value>(a, k, pos);
  };
  walk_chunks<PATH>(a.ix, a.E, a.chunks, a.row_step, rows, planes, generic);
}

// ------------------------------------------------------------------------------------
// Reductions: accumulators, warp/block merges
// ------------------------------------------------------------------------------------

template <typename acc, int MODE>
struct Acc;

// Welford state: count, mean, M2 = sum((x - mean)^2).
template <typename acc>
struct Acc<acc, kStats> {
  acc mean, m2;
  int64_t n;
  __device__ static Acc identity() { return Acc{acc(0), acc(0), 0}; }
  // Chan's parallel merge, in a fixed order (this, then b); n = 0 guarded.
  __device__ void merge(const Acc& b) {
    if (b.n == 0) return;
    if (n == 0) {
      *this = b;
      return;
    }
    const int64_t nt = n + b.n;
    const acc fb = static_cast<acc>(b.n) / static_cast<acc>(nt);
    const acc d = b.mean - mean;
    mean = mad(d, fb, mean);
    m2 = m2 + b.m2 + d * d * (static_cast<acc>(n) * fb);
    n = nt;
  }
  __device__ Acc shfl_down(unsigned delta) const {
    return Acc{__shfl_down_sync(0xffffffffu, mean, delta), __shfl_down_sync(0xffffffffu, m2, delta),
               static_cast<int64_t>(
                   __shfl_down_sync(0xffffffffu, static_cast<long long>(n), delta))};
  }
};

// Backward sums: a = sum(g), b = sum(g*(x - mean)).
template <typename acc>
struct Acc<acc, kBackward> {
  acc a, b;
  __device__ static Acc identity() { return Acc{acc(0), acc(0)}; }
  __device__ void merge(const Acc& o) {
    a += o.a;
    b += o.b;
  }
  __device__ Acc shfl_down(unsigned delta) const {
    return Acc{__shfl_down_sync(0xffffffffu, a, delta), __shfl_down_sync(0xffffffffu, b, delta)};
  }
};

// The [P, C] partials of a reduction, one array per value (coalesced in the merge kernel):
// statistics a = mean of x - pivot over partition p, b = its M2; backward a = sum(g),
// b = sum(g*(x - mean)). A partition's count is not stored: every partition but the last
// holds part_elems elements of each channel, the last the rest (ReducePlan).
template <typename acc>
struct Partials {
  acc *a, *b;
};

// Lane 0 gets lane 0 (+) lane 1 (+) ... in a fixed tree order.
template <typename A>
__device__ __forceinline__ A warp_reduce(A v) {
#pragma unroll
  for (unsigned delta = 16; delta > 0; delta >>= 1) v.merge(v.shfl_down(delta));
  return v;
}

// Thread 0 of a 1-D block of kThreads gets the block's merge.
template <typename A>
__device__ __forceinline__ A block_reduce(A v) {
  __shared__ A partial[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? partial[lane] : A::identity();
    v = warp_reduce(v);
  }
  return v;
}

template <typename T>
struct ReduceArgs {
  const T* x;  // (N, C, S) any strides
  Strides3 xs;
  const T* dout;  // (N, C, S) any strides (backward only)
  Strides3 ds;
  const acc_t<T>* mean;   // (C,) backward
  const acc_t<T>* scale;  // (C,) backward, relu recompute
  const acc_t<T>* shift;  // (C,) backward, relu recompute
  const uint8_t* mask;    // backward: packed in layout mask_cl, or null
  bool relu, mask_cl;
  int64_t N, C, S;
  int64_t per_part;        // units (outer) or rows (inner) per partition
  int64_t step_q, step_r;  // a thread's step through flat (n, s): step_q*S + step_r
  int64_t lane_q, lane_r;  // channel-outer scalar path: kThreads = lane_q*S + lane_r
  double inv_S;            // 1.0 / S, for split_row
  acc_t<T>* pivot_out;     // statistics: (C,) the pivots, read back by the merge kernel
};

// (n, s) = (r / S, r % S) for 0 <= r < 2^52 without a division: the reciprocal's quotient
// is off by at most one, then corrected.
__device__ __forceinline__ void split_row(int64_t r, int64_t S, double inv_S, int64_t& n,
                                          int64_t& s) {
  n = static_cast<int64_t>(static_cast<double>(r) * inv_S);
  s = r - n * S;
  if (s < 0) {
    --n;
    s += S;
  } else if (s >= S) {
    ++n;
    s -= S;
  }
}

// A statistics pivot: the value, or 0 if not finite (an inf or NaN elsewhere then
// propagates as it would unshifted).
template <typename acc>
__device__ __forceinline__ acc finite_or_zero(acc v) {
  return isfinite(v) ? v : acc(0);
}

// The statistics' pivot of channel c: x[0, c, 0].
template <typename T>
__device__ __forceinline__ acc_t<T> channel_pivot(const ReduceArgs<T>& a, int64_t c) {
  return finite_or_zero(Elem<T>::load(a.x + c * a.xs.c));
}

// V consecutive values to memory: 16-byte stores when V fills them (dst 16-byte aligned).
template <typename acc, int V>
__device__ __forceinline__ void store_vec(acc* dst, const acc* v) {
  constexpr int kPer = 16 / sizeof(acc);
  if constexpr (V % kPer == 0) {
#pragma unroll
    for (int k = 0; k < V / kPer; ++k)
      *reinterpret_cast<uint4*>(dst + k * kPer) = Elem<acc>::pack(v + k * kPer);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) dst[j] = v[j];
  }
}

// Advance flat (n, s) by step_q*S + step_r, step_r < S.
__device__ __forceinline__ void ns_add(int64_t& n, int64_t& s, int64_t q, int64_t r, int64_t S) {
  s += r;
  n += q;
  if (s >= S) {
    s -= S;
    ++n;
  }
}

// Folds a batch of nb (>= 1) values of one channel into a Welford state whose count
// is cnt (the caller updates cnt): exact batch mean and M2, then Chan's formula with
// fb = nb/(cnt+nb) and fa = cnt*nb/(cnt+nb).
template <typename acc, int B>
__device__ __forceinline__ void welford_batch(acc& mean, acc& m2, const acc* v, int nb,
                                              acc inv_nb, acc fb, acc fa) {
  acc sum = acc(0);
#pragma unroll
  for (int j = 0; j < B; ++j)
    if (j < nb) sum += v[j];
  const acc bm = sum * inv_nb;
  acc bm2 = acc(0);
#pragma unroll
  for (int j = 0; j < B; ++j) {
    if (j < nb) {
      const acc d = v[j] - bm;
      bm2 = mad(d, d, bm2);
    }
  }
  const acc d = bm - mean;
  mean = mad(d, fb, mean);
  m2 = m2 + bm2 + d * d * fa;
}

// Folds the first `valid` (>= 1) of 8 loaded elements of one channel into a thread's
// state: stats, a Welford batch of x - pivot (s0 = mean, s1 = M2, cnt = count; mean_c is
// the pivot); backward, the sums
// s0 += g, s1 += g*(x - mean) with g = pass ? dout : 0.
template <typename acc, int MODE>
__device__ __forceinline__ void accumulate(acc& s0, acc& s1, int& cnt, const acc* xv,
                                           const acc* dv, const bool* pass, int valid,
                                           acc mean_c) {
  if (MODE == kStats) {  // mean_c: the channel's pivot
    acc d[kUnit];
#pragma unroll
    for (int j = 0; j < kUnit; ++j) d[j] = xv[j] - mean_c;
    const acc nb = static_cast<acc>(valid);
    const acc fb = nb / static_cast<acc>(cnt + valid);
    welford_batch<acc, kUnit>(s0, s1, d, valid, acc(1) / nb, fb, static_cast<acc>(cnt) * fb);
    cnt += valid;
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      if (j < valid) {
        const acc g = pass[j] ? dv[j] : acc(0);
        s0 += g;
        s1 = mad(g, xv[j] - mean_c, s1);
      }
    }
  }
}

// Whether element (n, c, s), the j-th of its unit, passes the gradient. GATE: kNoGate,
// kRecomputeGate, kMaskGate (its bit is bit j of `byte`, loaded by the caller: the mask
// is packed in the traversal's order) or kMaskAnyGate (the mask in the other layout: one
// byte load per element).
template <int GATE, typename T, typename acc>
__device__ __forceinline__ bool reduce_gate(const ReduceArgs<T>& a, unsigned byte, int j,
                                            int64_t C, int64_t S, int64_t n, int64_t c,
                                            int64_t s, acc x, acc mean, acc scale, acc shift) {
  if (GATE == kMaskGate) return (byte >> j) & 1u;
  if (GATE == kMaskAnyGate) return mask_bit(a.mask, a.mask_cl, C, S, n, c, s);
  if (GATE == kRecomputeGate) return !(centred(x, mean, scale, shift) <= acc(0));
  return true;
}

// Channel-outer: grid (C, P), block kThreads; block (c, p) reduces partition p of the
// flat (n, s) elements of channel c, 8 elements per thread at a time.
// VEC: S % 8 == 0, ss == 1 and the view 16-byte aligned: 8 consecutive elements of a
// row are one vector load. Otherwise scalar loads, consecutive threads on consecutive
// elements.
template <typename T, int MODE, bool VEC, int GATE>
__global__ void __launch_bounds__(kThreads)
    reduce_outer_kernel(const ReduceArgs<T> a, const Partials<acc_t<T>> ws) {
  using acc = acc_t<T>;
  using A = Acc<acc, MODE>;
  const int64_t c = blockIdx.x, p = blockIdx.y;
  const int64_t C = a.C, S = a.S, M = a.N * a.S;

  acc mean_c = acc(0), scale_c = acc(0), shift_c = acc(0);
  if (MODE == kStats) {  // the pivot, subtracted from every value (accumulate)
    mean_c = channel_pivot(a, c);
    if (p == 0 && threadIdx.x == 0) a.pivot_out[c] = mean_c;
  } else {
    mean_c = __ldg(a.mean + c);
    if (GATE == kRecomputeGate) {
      scale_c = __ldg(a.scale + c);
      shift_c = __ldg(a.shift + c);
    }
  }
  acc s0 = acc(0), s1 = acc(0);  // stats: mean, M2; backward: sum g, sum g*xc
  int cnt = 0;                   // stats: this thread's count
  acc xv[kUnit], dv[kUnit];
  bool pass[kUnit];

  if (VEC) {
    // Units [p*per_part, (p+1)*per_part): a unit is 8 consecutive flat (n, s) of one row,
    // one 16-byte-aligned vector; thread t takes units t, t + 256, ...
    const int64_t units = M / kUnit;  // M is a multiple of 8
    const int64_t ubeg = p * a.per_part, uend = min(ubeg + a.per_part, units);
    int64_t u = ubeg + threadIdx.x;
    int64_t n = 0, s = 0;
    if (u < uend) split_row(u * kUnit, S, a.inv_S, n, s);
    for (; u < uend; u += kThreads, ns_add(n, s, a.step_q, a.step_r, S)) {
      load8(a.x + offset3(a.xs, n, c, s), xv);
      if (MODE == kBackward) {
        load8(a.dout + offset3(a.ds, n, c, s), dv);
        unsigned byte = 0xffu;
        if (GATE == kMaskGate) {  // NCHW mask: o = (n*C + c)*S + s is a multiple of 8
          const int64_t o = (n * C + c) * S + s;
          byte = __ldg(a.mask + (o >> 3));
        }
#pragma unroll
        for (int j = 0; j < kUnit; ++j) {
          pass[j] = reduce_gate<GATE>(a, byte, j, C, S, n, c, s + j, xv[j], mean_c, scale_c,
                                      shift_c);
        }
      }
      accumulate<acc, MODE>(s0, s1, cnt, xv, dv, pass, kUnit, mean_c);
    }
  } else {
    // Tiles [p*per_part, (p+1)*per_part) of kThreads*8 flat (n, s): thread t takes
    // elements t, t + 256, ..., t + 7*256 of a tile (coalesced scalar loads).
    const int64_t tile = static_cast<int64_t>(kThreads) * kUnit;
    const int64_t mbeg = p * a.per_part * tile, mend = min(mbeg + a.per_part * tile, M);
    const int64_t lane_q = a.lane_q, lane_r = a.lane_r;
    int64_t m = mbeg + threadIdx.x;
    int64_t n = 0, s = 0;
    if (m < mend) split_row(m, S, a.inv_S, n, s);
    for (; m < mend; m += tile, ns_add(n, s, a.step_q, a.step_r, S)) {
      // Elements j < valid exist: m + j*256 < mend.
      const int valid =
          static_cast<int>(min(static_cast<int64_t>(kUnit), (mend - m + kThreads - 1) / kThreads));
      int64_t nj = n, sj = s;
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        xv[j] = dv[j] = acc(0);
        pass[j] = false;
        if (j < valid) {
          xv[j] = Elem<T>::load(a.x + offset3(a.xs, nj, c, sj));
          if (MODE == kBackward) {
            dv[j] = Elem<T>::load(a.dout + offset3(a.ds, nj, c, sj));
            pass[j] = reduce_gate<GATE>(a, 0xffu, j, C, S, nj, c, sj, xv[j], mean_c, scale_c,
                                        shift_c);
          }
        }
        ns_add(nj, sj, lane_q, lane_r, S);
      }
      accumulate<acc, MODE>(s0, s1, cnt, xv, dv, pass, valid, mean_c);
    }
  }
  A v;
  if constexpr (MODE == kStats) {
    v = A{s0, s1, static_cast<int64_t>(cnt)};
  } else {
    v = A{s0, s1};
  }
  v = block_reduce(v);
  if (threadIdx.x == 0) {
    if constexpr (MODE == kStats) {
      ws.a[p * C + c] = v.mean;
      ws.b[p * C + c] = v.m2;
    } else {
      ws.a[p * C + c] = v.a;
      ws.b[p * C + c] = v.b;
    }
  }
}

// Channels [c0, c0 + V) of row (n, s) of an (N, C, S) view; zeros when !ok. V > 1: one
// 16-byte load (sc == 1 and aligned, checked by the launcher).
template <typename T, int V>
__device__ __forceinline__ void load_row(const T* p, const Strides3& st, int64_t n, int64_t s,
                                         int64_t c0, bool ok, acc_t<T>* v) {
  if (!ok) {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = acc_t<T>(0);
  } else if (V > 1) {
    Elem<T>::unpack(__ldg(reinterpret_cast<const uint4*>(p + n * st.n + s * st.s + c0)), v);
  } else {
    v[0] = Elem<T>::load(p + offset3(st, n, c0, s));
  }
}

// Channels [c0, c0 + V) of row (n, s) as loaded: one 16-byte word when V > 1 (converted
// later by unpack_raw), else the value; zeros when !ok. Loading every row of a step as raw
// words first lets the compiler issue all the loads before the first conversion waits.
template <typename T, int V>
using RawRow = std::conditional_t<(V > 1), uint4, acc_t<T>>;

template <typename T, int V>
__device__ __forceinline__ RawRow<T, V> load_raw(const T* p, const Strides3& st, int64_t n,
                                                 int64_t s, int64_t c0, bool ok) {
  if constexpr (V > 1) {
    return ok ? __ldg(reinterpret_cast<const uint4*>(p + n * st.n + s * st.s + c0))
              : make_uint4(0, 0, 0, 0);
  } else {
    acc_t<T> v;
    load_row<T, 1>(p, st, n, s, c0, ok, &v);
    return v;
  }
}

template <typename T, int V>
__device__ __forceinline__ void unpack_raw(const RawRow<T, V>& r, acc_t<T>* v) {
  if constexpr (V > 1) {
    Elem<T>::unpack(r, v);
  } else {
    v[0] = r;
  }
}

// Row 0 of the [rows][cols] arrays x and y (rows a power of two; y may be x) becomes the
// column sums, by a pairwise tree in a fixed order: at level h, row r += row r + h for
// r < h. Every thread of the (kThreads-thread) block takes part, consecutive threads on
// consecutive columns (no bank conflicts); ends with a barrier.
template <typename acc>
__device__ __forceinline__ void sum_rows(acc* x, acc* y, int rows, int cols) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  for (int h = rows / 2; h > 0; h >>= 1) {
    for (int i = t; i < h * cols; i += kThreads) {
      x[i] += x[i + h * cols];
      if (y != x) y[i] += y[i + h * cols];
    }
    __syncthreads();
  }
}

// Resident 256-thread blocks per SM asked of reduce_inner_kernel; 0 leaves the register
// count to ptxas. Given only the block size, ptxas picks its own register target for
// occupancy and accepted spills in two instantiations (sm_90, nvcc 13.0): the scalar
// backward with the mask in the other layout (40 registers, 6 blocks: the row index
// spilled inside the loop; 48 without) and the double statistics on 2-channel vectors
// (64 registers, 4 blocks: blockDim.x spilled around the double division's call; 70
// without). Asking for 5 and 3 blocks caps them at 51 and 85 registers: no spills.
// With the shared-memory row sums (sum_rows) ptxas also spilled 8-32 bytes in three other
// scalar (V = 1) instantiations at 40-48 registers; 4 blocks (64 registers) for every
// other scalar one: no spills.
template <typename T, int MODE, int V, int GATE>
constexpr int min_blocks_inner() {
  if (V == 1) return GATE == kMaskAnyGate ? 5 : 4;
  if (sizeof(T) == 8 && MODE == kStats && V > 1) return 3;
  return 0;
}

// Channel-inner: grid (GX, P), block (TX, TY) with TX*TY = kThreads, TY a power of
// two; thread (tx, ty) reduces channels [c0, c0 + V), c0 = (blockIdx.x*TX + tx)*V, over
// rows ty*4 + k*TY*4 of partition p, 4 rows at a time. V > 1: sc == 1, C % V == 0 and
// the view 16-byte aligned: V channels of a row are one vector load.
template <typename T, int MODE, int V, int GATE>
__global__ void __launch_bounds__(kThreads, min_blocks_inner<T, MODE, V, GATE>())
    reduce_inner_kernel(const ReduceArgs<T> a, const Partials<acc_t<T>> ws) {
  using acc = acc_t<T>;
  static_assert(V == 1 || V == Elem<T>::kPerVec, "V is 1 or one 16-byte vector");
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t C = a.C, S = a.S, M = a.N * a.S;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * TX + tx) * V;
  const int64_t p = blockIdx.y;
  const int64_t rbeg = p * a.per_part, rend = min(rbeg + a.per_part, M);
  const bool active = c0 < C;  // V > 1: C % V == 0, so all V channels exist

  acc mean_c[V], scale_c[V], shift_c[V], s0[V], s1[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mean_c[j] = scale_c[j] = shift_c[j] = s0[j] = s1[j] = acc(0);
    if (MODE == kBackward && active) {
      mean_c[j] = __ldg(a.mean + c0 + j);
      if (GATE == kRecomputeGate) {
        scale_c[j] = __ldg(a.scale + c0 + j);
        shift_c[j] = __ldg(a.shift + c0 + j);
      }
    }
  }
  if (MODE == kStats && active) {  // the pivots, x[0, c0 + j, 0]: one row, one vector load
    load_row<T, V>(a.x, a.xs, 0, 0, c0, true, mean_c);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      mean_c[j] = finite_or_zero(mean_c[j]);
      if (p == 0 && ty == 0) a.pivot_out[c0 + j] = mean_c[j];
    }
  }
  int cnt = 0;

  int64_t r = rbeg + static_cast<int64_t>(ty) * kRows;
  int64_t n = 0, s = 0;
  if (active && r < rend) split_row(r, S, a.inv_S, n, s);
  for (; active && r < rend; r += static_cast<int64_t>(TY) * kRows,
                             ns_add(n, s, a.step_q, a.step_r, S)) {
    const int valid = static_cast<int>(min(static_cast<int64_t>(kRows), rend - r));
    int64_t nk = n, sk = s;  // row r + k
    if (MODE == kStats) {
      RawRow<T, V> xr[kRows];
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        xr[k] = load_raw<T, V>(a.x, a.xs, nk, sk, c0, k < valid);
        if (++sk == S) {
          sk = 0;
          ++nk;
        }
      }
      acc xv[kRows][V];
#pragma unroll
      for (int k = 0; k < kRows; ++k) unpack_raw<T, V>(xr[k], xv[k]);
      const acc nb = static_cast<acc>(valid);
      const acc fb = nb / static_cast<acc>(cnt + valid);
      const acc fa = static_cast<acc>(cnt) * fb;
      const acc inv_nb = acc(1) / nb;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc col[kRows];
#pragma unroll
        for (int k = 0; k < kRows; ++k) col[k] = xv[k][j] - mean_c[j];
        welford_batch<acc, kRows>(s0[j], s1[j], col, valid, inv_nb, fb, fa);
      }
      cnt += valid;
    } else {
      // Every row's loads first (rows past the partition load nothing), then the sums:
      // kRows rows of both inputs in flight per thread, not one row at a time.
      RawRow<T, V> xr[kRows], dr[kRows];
      unsigned row_bits[kRows];
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        xr[k] = load_raw<T, V>(a.x, a.xs, nk, sk, c0, k < valid);
        dr[k] = load_raw<T, V>(a.dout, a.ds, nk, sk, c0, k < valid);
        // Channels-last mask (kMaskGate, V > 1): o = (nk*S + sk)*C + c0 is a multiple of V
        // (C % V == 0) and V divides 8, so the V bits lie in one byte.
        row_bits[k] = 0xffu;
        if (GATE == kMaskGate && k < valid) {  // the byte; shifted below, after every load
          row_bits[k] = __ldg(a.mask + (((r + k) * C + c0) >> 3));
        }
        if (++sk == S) {
          sk = 0;
          ++nk;
        }
      }
      nk = n;
      sk = s;
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        if (GATE == kMaskGate) row_bits[k] >>= ((r + k) * C + c0) & 7;  // row r + k's bits
        if (k < valid) {
          acc xv[V], dv[V];
          unpack_raw<T, V>(xr[k], xv);
          unpack_raw<T, V>(dr[k], dv);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const bool pass = reduce_gate<GATE>(a, row_bits[k], j, C, S, nk, c0 + j, sk, xv[j],
                                                mean_c[j], scale_c[j], shift_c[j]);
            const acc g = pass ? dv[j] : acc(0);
            s0[j] += g;
            s1[j] = mad(g, xv[j] - mean_c[j], s1[j]);
          }
        }
        if (++sk == S) {
          sk = 0;
          ++nk;
        }
      }
    }
  }

  // The block's partial of each channel, in closed form (no per-pair Chan merges, no
  // divisions but one): thread (tx, ty) stores V values in row ty, columns
  // [tx*V, tx*V + V) of a [TY][TX*V] array in shared memory (16-byte stores,
  // conflict-free), and the TY rows of every column are summed by a pairwise tree
  // (sum_rows: every thread, log2(TY) levels; a sequential sum over up to 256 rows cost
  // the backward sums 3.6x torch's error). Column u is channel blockIdx.x*TX*V + u.
  // Statistics: mean = sum(n_y*mean_y)/n (n the partition's rows), then
  // M2 = sum(M2_y + n_y*(mean_y - mean)^2), n_y a thread's count; backward: the two sums.
  __shared__ __align__(16) acc sh_a[kThreads * V];
  __shared__ __align__(16) acc sh_b[kThreads * V];
  const int cols = TX * V, t = ty * TX + tx;
  if constexpr (MODE == kStats) {
    const acc n_y = static_cast<acc>(cnt);
    acc w[V];
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] = n_y * s0[j];
    store_vec<acc, V>(sh_a + t * V, w);
    __syncthreads();
    sum_rows(sh_a, sh_a, TY, cols);  // row 0: sum(n_y*mean_y) per column
    const acc n = static_cast<acc>(min(a.per_part, M - rbeg));
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc d = s0[j] - sh_a[tx * V + j] / n;
      w[j] = s1[j] + n_y * (d * d);
    }
    store_vec<acc, V>(sh_b + t * V, w);
    __syncthreads();
    sum_rows(sh_b, sh_b, TY, cols);
    if (t < cols) sh_a[t] = sh_a[t] / n;
  } else {
    store_vec<acc, V>(sh_a + t * V, s0);
    store_vec<acc, V>(sh_b + t * V, s1);
    __syncthreads();
    sum_rows(sh_a, sh_b, TY, cols);
  }
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cols + t;
  if (t < cols && c < C) {
    ws.a[p * C + c] = sh_a[t];
    ws.b[p * C + c] = sh_b[t];
  }
}

// ------------------------------------------------------------------------------------
// Per-channel math: the finalize, the backward coefficients, the running statistics
// ------------------------------------------------------------------------------------
//
// Each is a few operations per channel: done by the merge kernel of the reduction
// before it (an epilogue) or by one small kernel, never as a chain of tensor ops (a
// launch each: ~30 per BN forward+backward before). Products and quotients only, each
// rounded (mul_rn: no contraction into a multiply-add), as the CPU loops.

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename acc>
__device__ __forceinline__ void finalize_channel(const Finalize<acc>& f, int64_t c, acc var) {
  const acc invstd = acc(1) / sqrt(add_rn(var, f.eps));
  f.invstd[c] = invstd;
  f.scale[c] = f.weight ? mul_rn(f.weight[c], invstd) : invstd;
  f.shift[c] = f.bias ? f.bias[c] : acc(0);
}

template <typename acc>
__device__ __forceinline__ void coefficients_channel(const Coefficients<acc>& k, int64_t c,
                                                     acc sum_g, acc sum_g_xc) {
  const acc s = k.scale[c], i = k.invstd[c];
  k.coef_xc[c] = k.training ? mul_rn(mul_rn(mul_rn(-s, i), i), sum_g_xc) / k.count : acc(0);
  k.coef_c[c] = k.training ? mul_rn(-s, sum_g) / k.count : acc(0);
  if (k.dweight) k.dweight[c] = mul_rn(sum_g_xc, i);
}

template <typename acc, int MODE>
using Epilogue = std::conditional_t<MODE == kStats, Finalize<acc>, Coefficients<acc>>;

template <typename acc>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const acc* __restrict__ var, Finalize<acc> f, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c < C) finalize_channel(f, c, var[c]);
}

template <typename acc>
__global__ void __launch_bounds__(kThreads)
    running_stats_kernel(acc* running_mean, int64_t mean_stride, acc* running_var,
                         int64_t var_stride, const acc* __restrict__ mean,
                         const acc* __restrict__ var, acc correction, acc momentum,
                         const int64_t* __restrict__ nbt, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  const acc f = nbt ? acc(1) / static_cast<acc>(static_cast<double>(nbt[0])) : momentum;
  const bool small = fabs(f) < acc(0.5);
  const acc one_minus_f = add_rn(acc(1), -f);
  const auto update = [&](acc* r_ptr, acc b) {
    const acc r = *r_ptr, d = add_rn(b, -r);
    *r_ptr = small ? add_rn(r, mul_rn(f, d)) : add_rn(b, -mul_rn(d, one_minus_f));
  };
  update(running_mean + c * mean_stride, mean[c]);
  update(running_var + c * var_stride, correction == acc(1) ? var[c] : mul_rn(var[c], correction));
}

// v[0] + ... + v[K-1] by a pairwise tree (K a power of two, unrolled: registers only).
template <int K, typename acc>
__device__ __forceinline__ acc tree_sum(acc (&v)[K]) {
#pragma unroll
  for (int h = K / 2; h > 0; h /= 2) {
#pragma unroll
    for (int k = 0; k < h; ++k) v[k] += v[k + h];
  }
  return v[0];
}

// Per channel, the sum of one value over the kMergeLanes lanes of a merge block, by a
// pairwise tree in a fixed order (every thread gets it): lanes 4w..4w+3 of a channel sit
// in warp w (lane ch + 8k), folded by two shuffles, then the warps' sums as a tree.
template <typename acc>
__device__ __forceinline__ acc merge_lanes_sum(acc v) {
  constexpr int kWarps = kMergeThreads / 32;
  __shared__ acc part[kWarps][kMergeChannels];
  v += __shfl_down_sync(0xffffffffu, v, 16);
  v += __shfl_down_sync(0xffffffffu, v, 8);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, ch = threadIdx.x % kMergeChannels;
  __syncthreads();  // the previous call's readers are done with part
  if (lane < kMergeChannels) part[warp][lane] = v;
  __syncthreads();
  acc w[kWarps];
#pragma unroll
  for (int k = 0; k < kWarps; ++k) w[k] = part[k][ch];
  return tree_sum(w);
}

// Merges the [P, C] partials: block b takes channels [8b, 8b + 8), thread (ch, lane) =
// (t % 8, t / 8) partials p = lane, lane + 64, ... (<= 16 each: P <= kMaxParts), loaded
// before any is used; a warp reads 4 partial rows of 8 channels, one 32-byte sector each.
// Statistics, the closed form of Chan's merge in two passes over the (L2-resident)
// partials: mean = sum(n_p*mean_p)/M, then M2 = sum(M2_p + n_p*(mean_p - mean)^2), n_p
// the partition's count (part_elems, the last one the rest); out_a = pivot + mean (out_a
// holds the pivot on entry), out_b = M2/M (biased). Backward: the two sums. Then the
// epilogue when it has outputs (ep.scale / ep.coef_xc not null). Fixed order throughout.
template <typename acc, int MODE>
__global__ void __launch_bounds__(kMergeThreads)
    merge_partials_kernel(const Partials<acc> ws, int64_t P, int64_t C, int64_t part_elems,
                          int64_t M, acc* __restrict__ out_a, acc* __restrict__ out_b,
                          const Epilogue<acc, MODE> ep) {
  constexpr int kPer = static_cast<int>(kMaxParts / kMergeLanes);
  static_assert((kPer & (kPer - 1)) == 0, "tree_sum takes a power of two");
  const int ch = threadIdx.x % kMergeChannels, lane = threadIdx.x / kMergeChannels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kMergeChannels + ch;
  const bool ok = c < C;  // no early return: every thread takes part in the block sums
  acc va[kPer], vb[kPer], w[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t p = lane + static_cast<int64_t>(k) * kMergeLanes;
    const bool in = ok && p < P;
    va[k] = in ? ws.a[p * C + c] : acc(0);
    vb[k] = in ? ws.b[p * C + c] : acc(0);
    w[k] = in ? static_cast<acc>(min(part_elems, M - p * part_elems)) : acc(0);
  }
  if constexpr (MODE == kStats) {
    acc t[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) t[k] = w[k] * va[k];
    const acc mean = merge_lanes_sum(tree_sum(t)) / static_cast<acc>(M);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const acc d = va[k] - mean;
      t[k] = w[k] > acc(0) ? vb[k] + w[k] * (d * d) : acc(0);
    }
    const acc var = merge_lanes_sum(tree_sum(t)) / static_cast<acc>(M);
    if (ok && lane == 0) {
      out_a[c] = out_a[c] + mean;  // out_a holds the pivot (the reduction wrote it)
      out_b[c] = var;
      if (ep.scale) finalize_channel(ep, c, var);
    }
  } else {
    const acc sa = merge_lanes_sum(tree_sum(va)), sb = merge_lanes_sum(tree_sum(vb));
    if (ok && lane == 0) {
      out_a[c] = sa;
      out_b[c] = sb;
      if (ep.coef_xc) coefficients_channel(ep, c, sa, sb);
    }
  }
}

// ------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Strides equal to a dense layout's, ignoring dims of size 1 (their stride is never used).
inline bool has_strides(const Strides3& st, const Shape3& sh, const Strides3& dense) {
  return (sh.N == 1 || st.n == dense.n) && (sh.C == 1 || st.c == dense.c) &&
         (sh.S == 1 || st.s == dense.s);
}

inline Strides3 dense_strides(const Shape3& sh, bool cl) {
  return cl ? Strides3{sh.S * sh.C, 1, sh.C} : Strides3{sh.C * sh.S, sh.S, 1};
}

inline ElemIndex elem_index(const Shape3& sh, bool cl, int64_t step) {
  ElemIndex ix;
  ix.cl = cl;
  const int64_t I = cl ? sh.C : sh.S, Mi = cl ? sh.S : sh.C, t = step / I;
  ix.I = static_cast<int>(I);
  ix.Mi = static_cast<int>(Mi);
  ix.step = Odo{static_cast<int>(step - t * I), static_cast<int>(t % Mi), static_cast<int>(t / Mi)};
  return ix;
}

inline int elementwise_blocks(int64_t chunks, int num_sms) {
  const int64_t cap = static_cast<int64_t>(std::max(num_sms, 1)) * kBlocksPerSm;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(chunks, kThreads), cap)));
}

// The elementwise traversal (see "Elementwise kernels"); kRowsPath sets row_step.
inline int elementwise_path(const Shape3& sh, bool cl, bool vec, bool vec_channels, int blocks,
                            int64_t& row_step) {
  row_step = 0;
  if (!vec) return kGeneric;
  const int64_t threads = static_cast<int64_t>(blocks) * kThreads;
  if (cl && sh.C % kUnit == 0 && vec_channels && sh.C / kUnit <= threads) {
    row_step = threads / (sh.C / kUnit);
    return kRowsPath;
  }
  if (!cl && sh.S >= kUnit) return kPlanesPath;
  return kGenericVec;
}

// Whether a 16-byte-element-offset multiple: stride*elem bytes % 16 == 0 (size-1 dims skip).
inline bool stride_aligned(int64_t size, int64_t stride, size_t elem) {
  return size == 1 || (stride * static_cast<int64_t>(elem)) % 16 == 0;
}

// Channel-inner traversal when channels are the cheaper (smaller-stride) direction.
inline bool use_inner(const Strides3& xs, const Shape3& sh) {
  if (sh.C == 1) return false;
  if (sh.N * sh.S <= kUnit) return true;
  const int64_t outer_stride = sh.S > 1 ? xs.s : xs.n;  // stride of the flat (n, s) index
  if (xs.c == 1) return true;
  if (outer_stride == 1) return false;
  return xs.c <= outer_stride;
}

// The gate of a backward reduction; `bytewise`: the mask's bits of a unit lie in one byte.
template <typename T>
int reduce_gate_of(const ReduceArgs<T>& a, bool bytewise) {
  if (a.mask) return bytewise ? kMaskGate : kMaskAnyGate;
  return a.relu ? kRecomputeGate : kNoGate;
}

// f(std::integral_constant<int, GATE>) for a backward reduction's gate; statistics: kNoGate.
template <int MODE, typename F>
void with_gate(int gate, F&& f) {
  if constexpr (MODE == kStats) {
    f(std::integral_constant<int, kNoGate>{});
  } else {
    switch (gate) {
      case kMaskGate: f(std::integral_constant<int, kMaskGate>{}); break;
      case kMaskAnyGate: f(std::integral_constant<int, kMaskAnyGate>{}); break;
      case kRecomputeGate: f(std::integral_constant<int, kRecomputeGate>{}); break;
      default: f(std::integral_constant<int, kNoGate>{}); break;
    }
  }
}

// The launch geometry of a reduction, from shapes, strides, pointer alignment only (the
// partials, hence the bits of the result, do not depend on the GPU).
struct ReducePlan {
  bool inner;          // channel-inner traversal (reduce_inner_kernel), else channel-outer
  bool vec;            // 16-byte vector loads
  int64_t gx, P;       // grid (gx, P): channel blocks (inner) or channels (outer), partitions
  int tx, ty;          // block (inner; outer: kThreads, 1)
  int64_t per_part;    // rows (inner), units of 8 (outer vec) or tiles (outer scalar)
  int64_t part_elems;  // elements of a channel in every partition but the last
  int64_t step;        // flat (n, s) positions a thread advances per step
};

// Channel-outer: partitions of whole units (8 consecutive elements, vec) or tiles
// (kThreads*8 elements), ~kTargetBlocks blocks, >= kMinSteps steps per thread.
// Channel-inner: TX = min(32, pow2 >= C/V) channel groups per block, TY = kThreads/TX row
// lanes of kRows rows per step; partitions are whole steps of the block (TY*kRows rows,
// so every thread of a partition but the last has the same count), ~kTargetBlocks blocks,
// >= min_steps_inner steps per thread. Both: P <= kMaxParts (the merge kernel's bound).
template <typename T, int MODE>
ReducePlan plan_reduce(const ReduceArgs<T>& a, const Shape3& sh) {
  const size_t esz = sizeof(T);
  const int64_t C = sh.C, S = sh.S, M = sh.N * sh.S;
  const bool bwd = MODE == kBackward;
  ReducePlan pl{};
  pl.inner = use_inner(a.xs, sh);
  int64_t P = 1;
  if (!pl.inner) {
    auto view_ok = [&](const void* p, const Strides3& st) {
      return aligned16(p) && st.s == 1 && stride_aligned(sh.N, st.n, esz) &&
             stride_aligned(C, st.c, esz);
    };
    pl.vec = S % kUnit == 0 && view_ok(a.x, a.xs) && (!bwd || view_ok(a.dout, a.ds));
    // VEC partitions count units of 8 elements, the scalar path tiles of kThreads*8.
    const int64_t unit = pl.vec ? kUnit : static_cast<int64_t>(kThreads) * kUnit;
    const int64_t pieces = ceil_div(M, unit);
    const int64_t pieces_per_step = pl.vec ? kThreads : 1;
    P = std::min({ceil_div(kTargetBlocks, C), ceil_div(pieces, pieces_per_step * kMinSteps),
                  kMaxParts});
    P = std::max<int64_t>(1, P);
    pl.per_part = ceil_div(pieces, P);
    pl.part_elems = pl.per_part * unit;
    pl.gx = C;
    pl.tx = kThreads;
    pl.ty = 1;
    pl.step = static_cast<int64_t>(kThreads) * kUnit;
  } else {
    constexpr int kV = Elem<T>::kPerVec;
    auto view_ok = [&](const void* p, const Strides3& st) {
      return aligned16(p) && st.c == 1 && stride_aligned(sh.N, st.n, esz) &&
             stride_aligned(S, st.s, esz);
    };
    pl.vec = C % kV == 0 && view_ok(a.x, a.xs) && (!bwd || view_ok(a.dout, a.ds));
    const int64_t groups = ceil_div(C, pl.vec ? kV : 1);
    pl.tx = 1;
    while (pl.tx < 32 && pl.tx < groups) pl.tx <<= 1;
    pl.ty = kThreads / pl.tx;
    pl.gx = ceil_div(groups, pl.tx);
    pl.step = static_cast<int64_t>(pl.ty) * kRows;  // rows of one block step
    const int64_t steps = ceil_div(M, pl.step);
    P = std::min({ceil_div(kTargetBlocks, pl.gx), ceil_div(steps, min_steps_inner(MODE, esz)),
                  kMaxParts});
    P = std::max<int64_t>(1, P);
    pl.per_part = ceil_div(steps, P) * pl.step;
    pl.part_elems = pl.per_part;
  }
  pl.P = ceil_div(M, pl.part_elems);
  return pl;
}

template <typename T, int MODE>
void launch_reduce(ReduceArgs<T> a, Shape3 sh, acc_t<T>* out_a, acc_t<T>* out_b,
                   const Epilogue<acc_t<T>, MODE>* ep, Workspace wsp, cudaStream_t stream) {
  using acc = acc_t<T>;
  const int64_t C = sh.C, S = sh.S, M = sh.N * sh.S;
  a.N = sh.N;
  a.C = C;
  a.S = S;
  a.inv_S = 1.0 / static_cast<double>(S);
  a.lane_q = kThreads / S;
  a.lane_r = kThreads % S;
  a.pivot_out = out_a;
  const ReducePlan pl = plan_reduce<T, MODE>(a, sh);
  a.per_part = pl.per_part;
  a.step_q = pl.step / S;
  a.step_r = pl.step % S;
  acc* buf = static_cast<acc*>(wsp.alloc(wsp.ctx, static_cast<size_t>(2 * pl.P * C) * sizeof(acc)));
  const Partials<acc> ws{buf, buf + pl.P * C};
  const dim3 grid(static_cast<unsigned>(pl.gx), static_cast<unsigned>(pl.P));
  if (!pl.inner) {
    // One byte per unit of 8 when the mask is packed NCHW and the units are vectors.
    const int gate = reduce_gate_of(a, pl.vec && !a.mask_cl);
    with_gate<MODE>(gate, [&](auto g) {
      if (pl.vec) {
        reduce_outer_kernel<T, MODE, true, g.value><<<grid, kThreads, 0, stream>>>(a, ws);
      } else {
        reduce_outer_kernel<T, MODE, false, g.value><<<grid, kThreads, 0, stream>>>(a, ws);
      }
    });
  } else {
    constexpr int kV = Elem<T>::kPerVec;
    const dim3 block(static_cast<unsigned>(pl.tx), static_cast<unsigned>(pl.ty));
    const int gate = reduce_gate_of(a, pl.vec && a.mask_cl);  // one byte per row of V
    with_gate<MODE>(gate, [&](auto g) {
      if (pl.vec) {
        reduce_inner_kernel<T, MODE, kV, g.value><<<grid, block, 0, stream>>>(a, ws);
      } else {
        reduce_inner_kernel<T, MODE, 1, g.value><<<grid, block, 0, stream>>>(a, ws);
      }
    });
  }
  const int64_t merge_blocks = ceil_div(C, kMergeChannels);
  const Epilogue<acc, MODE> none{};
  merge_partials_kernel<acc, MODE><<<static_cast<unsigned>(merge_blocks), kMergeThreads, 0,
                                     stream>>>(ws, pl.P, C, pl.part_elems, M, out_a, out_b,
                                               ep ? *ep : none);
}

}  // namespace

template <typename T>
void launch_bn_stats(const T* x, Strides3 xs, Shape3 shape, acc_t<T>* mean, acc_t<T>* var,
                     const Finalize<acc_t<T>>* fin, Workspace ws, cudaStream_t stream) {
  ReduceArgs<T> a{};
  a.x = x;
  a.xs = xs;
  launch_reduce<T, kStats>(a, shape, mean, var, fin, ws, stream);
}

template <typename acc>
void launch_bn_finalize(const acc* mean, const acc* var, Finalize<acc> fin, int64_t C,
                        cudaStream_t stream) {
  (void)mean;  // the centred apply needs no shift from the mean
  finalize_kernel<acc><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
      var, fin, C);
}

template <typename acc>
void launch_running_stats_update(acc* running_mean, int64_t mean_stride, acc* running_var,
                                 int64_t var_stride, const acc* mean, const acc* var,
                                 acc var_correction, acc momentum,
                                 const int64_t* num_batches_tracked, int64_t C,
                                 cudaStream_t stream) {
  running_stats_kernel<acc><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0,
                              stream>>>(running_mean, mean_stride, running_var, var_stride, mean,
                                        var, var_correction, momentum, num_batches_tracked, C);
}

template <typename T>
void launch_bn_backward_reduce(const T* dout, Strides3 ds, const T* x, Strides3 xs,
                               const acc_t<T>* mean, const acc_t<T>* scale,
                               const acc_t<T>* shift, const uint8_t* mask, bool relu,
                               Shape3 shape, bool channels_last, acc_t<T>* sum_g,
                               acc_t<T>* sum_g_xc, const Coefficients<acc_t<T>>* coef,
                               Workspace ws, cudaStream_t stream) {
  ReduceArgs<T> a{};
  a.x = x;
  a.xs = xs;
  a.dout = dout;
  a.ds = ds;
  a.mean = mean;
  a.scale = scale;
  a.shift = shift;
  a.mask = mask;
  a.relu = relu;
  a.mask_cl = channels_last;
  launch_reduce<T, kBackward>(a, shape, sum_g, sum_g_xc, coef, ws, stream);
}

// f(std::integral_constant<int, PATH>) for an elementwise traversal. double has no
// kRowsPath instantiation (its registers would spill); elementwise_path never picks it.
template <typename T, typename F>
void with_path(int path, F&& f) {
  if constexpr (sizeof(T) < 8) {
    if (path == kRowsPath) return f(std::integral_constant<int, kRowsPath>{});
  }
  switch (path) {
    case kPlanesPath: return f(std::integral_constant<int, kPlanesPath>{});
    case kGenericVec: return f(std::integral_constant<int, kGenericVec>{});
    default: return f(std::integral_constant<int, kGeneric>{});
  }
}

struct ElemLaunch {
  int blocks, path;
};

// The grid, odometer and traversal of an elementwise launch (a: ApplyArgs or
// BackwardApplyArgs): sets a.E, a.chunks, a.ix and a.row_step. vec: the activations allow
// 16-byte accesses; vec_channels: the per-channel vectors do.
template <typename T, typename Args>
ElemLaunch elementwise_launch(Args& a, const Shape3& sh, bool cl, int num_sms, bool vec,
                              bool vec_channels) {
  a.E = sh.N * sh.C * sh.S;
  a.chunks = ceil_div(a.E, kUnit);
  const int blocks = elementwise_blocks(a.chunks, num_sms);
  a.ix = elem_index(sh, cl, static_cast<int64_t>(blocks) * kThreads * kUnit);
  return {blocks, elementwise_path(sh, cl, vec, vec_channels && sizeof(T) < 8, blocks,
                                   a.row_step)};
}

template <typename T>
void launch_bn_apply(const T* x, Strides3 xs, const acc_t<T>* mean, const acc_t<T>* scale,
                     const acc_t<T>* shift, const T* residual, Strides3 rs, const T* x2,
                     Strides3 x2s, const acc_t<T>* mean2, const acc_t<T>* scale2,
                     const acc_t<T>* shift2, bool relu, T* out, uint8_t* mask, Shape3 shape,
                     bool channels_last, int num_sms, cudaStream_t stream) {
  ApplyArgs<T> a{};
  a.x = x;
  a.xs = xs;
  a.mean = mean;
  a.scale = scale;
  a.shift = shift;
  a.res = residual;
  a.rs = rs;
  a.x2 = x2;
  a.x2s = x2s;
  a.mean2 = mean2;
  a.scale2 = scale2;
  a.shift2 = shift2;
  a.out = out;
  a.mask = mask;
  a.relu = relu;
  const Strides3 dense = dense_strides(shape, channels_last);
  const bool vec = aligned16(out) && aligned16(x) && has_strides(xs, shape, dense) &&
                   (!residual || (aligned16(residual) && has_strides(rs, shape, dense))) &&
                   (!x2 || (aligned16(x2) && has_strides(x2s, shape, dense)));
  const bool vec_channels = aligned16(mean) && aligned16(scale) && aligned16(shift) &&
                            aligned16(mean2) && aligned16(scale2) && aligned16(shift2);
  const ElemLaunch l = elementwise_launch<T>(a, shape, channels_last, num_sms, vec, vec_channels);
  with_path<T>(l.path, [&](auto p) {
    if (x2) {
      bn_apply_kernel<T, p.value, true><<<l.blocks, kThreads, 0, stream>>>(a);
    } else {
      bn_apply_kernel<T, p.value, false><<<l.blocks, kThreads, 0, stream>>>(a);
    }
  });
}

template <typename T>
void launch_bn_backward_apply(const T* dout, Strides3 ds, const T* x, Strides3 xs,
                              const acc_t<T>* mean, const acc_t<T>* scale,
                              const acc_t<T>* shift, const uint8_t* mask,
                              const acc_t<T>* coef_g, const acc_t<T>* coef_xc,
                              const acc_t<T>* coef_c, bool relu, T* dx, T* dres,
                              Shape3 shape, bool channels_last, int num_sms,
                              cudaStream_t stream) {
  BackwardApplyArgs<T> a{};
  a.dout = dout;
  a.ds = ds;
  a.x = x;
  a.xs = xs;
  a.mean = mean;
  a.scale = scale;
  a.shift = shift;
  a.mask = mask;
  a.coef_g = coef_g;
  a.coef_xc = coef_xc;
  a.coef_c = coef_c;
  a.relu = relu;
  a.dx = dx;
  a.dres = dres;
  const Strides3 dense = dense_strides(shape, channels_last);
  const bool vec = aligned16(dx) && aligned16(dres) && aligned16(dout) && aligned16(x) &&
                   has_strides(ds, shape, dense) && has_strides(xs, shape, dense);
  const bool vec_channels = aligned16(mean) && aligned16(scale) && aligned16(shift) &&
                            aligned16(coef_g) && aligned16(coef_xc) && aligned16(coef_c);
  const ElemLaunch l = elementwise_launch<T>(a, shape, channels_last, num_sms, vec, vec_channels);
  with_path<T>(l.path, [&](auto p) {
    if (mask) {
      bn_backward_apply_kernel<T, p.value, kMaskGate><<<l.blocks, kThreads, 0, stream>>>(a);
    } else if (relu) {
      bn_backward_apply_kernel<T, p.value, kRecomputeGate><<<l.blocks, kThreads, 0, stream>>>(a);
    } else {
      bn_backward_apply_kernel<T, p.value, kNoGate><<<l.blocks, kThreads, 0, stream>>>(a);
    }
  });
}

#define FUSEDRES_INSTANTIATE(T)                                                               \
  template void launch_bn_stats<T>(const T*, Strides3, Shape3, acc_t<T>*, acc_t<T>*,          \
                                   const Finalize<acc_t<T>>*, Workspace, cudaStream_t);       \
  template void launch_bn_apply<T>(const T*, Strides3, const acc_t<T>*, const acc_t<T>*,      \
                                   const acc_t<T>*, const T*, Strides3, const T*, Strides3,   \
                                   const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, bool,   \
                                   T*, uint8_t*, Shape3, bool, int, cudaStream_t);            \
  template void launch_bn_backward_reduce<T>(const T*, Strides3, const T*, Strides3,          \
                                             const acc_t<T>*, const acc_t<T>*,                \
                                             const acc_t<T>*, const uint8_t*, bool, Shape3,   \
                                             bool, acc_t<T>*, acc_t<T>*,                      \
                                             const Coefficients<acc_t<T>>*, Workspace,        \
                                             cudaStream_t);                                   \
  template void launch_bn_backward_apply<T>(const T*, Strides3, const T*, Strides3,           \
                                            const acc_t<T>*, const acc_t<T>*,                 \
                                            const acc_t<T>*, const uint8_t*, const acc_t<T>*, \
                                            const acc_t<T>*, const acc_t<T>*, bool, T*, T*,   \
                                            Shape3, bool, int, cudaStream_t);

FUSEDRES_INSTANTIATE(float)
FUSEDRES_INSTANTIATE(double)
FUSEDRES_INSTANTIATE(__half)
FUSEDRES_INSTANTIATE(__nv_bfloat16)

#undef FUSEDRES_INSTANTIATE

#define FUSEDRES_INSTANTIATE_ACC(A)                                                         \
  template void launch_bn_finalize<A>(const A*, const A*, Finalize<A>, int64_t, cudaStream_t); \
  template void launch_running_stats_update<A>(A*, int64_t, A*, int64_t, const A*, const A*,  \
                                               A, A, const int64_t*, int64_t, cudaStream_t);

FUSEDRES_INSTANTIATE_ACC(float)
FUSEDRES_INSTANTIATE_ACC(double)

#undef FUSEDRES_INSTANTIATE_ACC

}  // namespace cuda
}  // namespace fusedres
