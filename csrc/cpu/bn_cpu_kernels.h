// CPU kernels of the four BN primitives (contract: fusedres/reference.py).
//
// Included by one translation unit per instruction set (bn_cpu_kernels_default.cpp,
// bn_cpu_kernels_avx2.cpp) with FUSEDRES_ISA naming the namespace; bn_cpu.cpp checks
// the inputs, allocates the outputs and picks the instruction set at run time.
//
// Layout of the work:
// * An (N, C, S) tensor is walked either as ROWS (one (n, s) pair per row, channels
//   inner: vectorised across C, the channels_last case) or as PLANES (one (n, c) pair
//   per plane, spatial inner: vectorised across S, the NCHW case). A tensor whose
//   inner stride is not 1 is read with scalar gathers (the generic strided path).
// * Elementwise kernels walk the *output* order, in blocks of 8*k outer rows, so
//   every block starts on a mask byte and no two threads write the same mask byte.
// * Reductions split the work into chunks that depend on the shape only (never on
//   the number of threads), keep per-chunk double partials (blocked sums of x and x^2
//   for stats; centred sums for backward, see "block sums") and merge them per channel
//   in chunk order: results are bitwise reproducible for any thread count.
// * Reductions take their chunks last to first, elementwise passes first to last, so
//   every pass starts on the lines the one before it touched last, while they are still
//   in the cache: stats -> apply, backward reduce -> backward apply, and a producer that
//   wrote its output in order -> the next reduction. (The tensors of a training step of
//   a 14x14 layer at batch 8 overflow a core's L2: forward+backward 5-8% faster.)
// * fp32 (fp64 for double) math, one cast at the store. The pre-activation is centred,
//   (x - mean)*scale + shift with shift the BN bias: x - mean is exact when x is near
//   the mean, so a large mean with a small spread cancels nothing (x*scale + (bias -
//   mean*scale) lost up to 5x torch's own fp32 error there). It is never a fused
//   multiply-add (fp-contract off), in forward and backward alike, so the ReLU mask
//   matches the reference bit for bit; the statistics and gradients use explicit fma() where the
//   instruction set has it (fewer operations, and one rounding instead of two).
// * ReLU is (pre < 0) ? 0 : pre (NaN propagates); the mask bit is !(pre <= 0).
#pragma once

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/bn_cpu.h"

#ifndef FUSEDRES_ISA
#error "define FUSEDRES_ISA before including bn_cpu_kernels.h"
#endif

namespace fusedres::cpu::FUSEDRES_ISA {
namespace {

using at::vec::Vectorized;

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements per reduction chunk / elementwise block (shape-only, never thread-dependent).
constexpr int64_t kChunkElems = 65536;
constexpr int64_t kBlockElems = 32768;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// step(group, r) for every full group of G rows in [r0, r1), then for every row left
// over one at a time; `group` is a std::integral_constant holding the row count, so the
// loops over the rows of a group unroll completely.
template <int G, typename Step>
inline void for_row_groups(int64_t r0, int64_t r1, Step&& step) {
  int64_t r = r0;
  for (; r + G <= r1; r += G) step(std::integral_constant<int, G>{}, r);
  for (; r < r1; ++r) step(std::integral_constant<int, 1>{}, r);
}

// Grain of a parallel_for over items of `work` elements each: small problems run on
// the calling thread. (Only how items are spread over threads depends on it, never
// what an item computes.)
constexpr int64_t kMinTaskElems = 32768;
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(work, 1));
}

// step(j, count) over the vectors of [0, inner): `count` is the constant W for every full
// vector (the hot loop then has no bounds checks), and inner - j for a last partial one.
template <int64_t W, typename Step>
inline void for_vectors(int64_t inner, Step&& step) {
  int64_t j = 0;
  for (; j + W <= inner; j += W) step(j, std::integral_constant<int64_t, W>{});
  if (j < inner) step(j, inner - j);
}

// f(std::bool_constant<v>...) for runtime flags v: one instantiation per combination.
template <size_t I = 0, size_t N, typename F, typename... Done>
inline void with_bools(const bool (&v)[N], F&& f, Done... done) {
  if constexpr (I == N) {
    f(done...);
  } else if (v[I]) {
    with_bools<I + 1>(v, f, done..., std::true_type{});
  } else {
    with_bools<I + 1>(v, f, done..., std::false_type{});
  }
}

// ---- loads and stores ---------------------------------------------------------------

// `count` (<= vector size) elements of a tensor with inner stride `stride`
// (1 when CONTIG), converted to the acc dtype; missing lanes are 0.
template <bool CONTIG, typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline Vectorized<acc_t> load(const scalar_t* p, int64_t stride, int64_t count) {
  using V = Vectorized<acc_t>;
  if constexpr (CONTIG && std::is_same_v<scalar_t, acc_t>) {
    return count >= V::size() ? V::loadu(p) : V::loadu(p, count);
  } else {
    __at_align__ acc_t buf[V::size()];
    if (count >= V::size()) {
      for (int i = 0; i < V::size(); ++i)
        buf[i] = static_cast<acc_t>(p[CONTIG ? i : i * stride]);
    } else {
      for (int i = 0; i < V::size(); ++i)
        buf[i] = i < count ? static_cast<acc_t>(p[CONTIG ? i : i * stride]) : acc_t(0);
    }
    return V::loadu(buf);
  }
}

template <typename acc_t>
inline Vectorized<acc_t> loadp(const acc_t* p, int64_t count) {
  using V = Vectorized<acc_t>;
  return count >= V::size() ? V::loadu(p) : V::loadu(p, count);
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* p, const Vectorized<acc_t>& v, int64_t count) {
  using V = Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (count >= V::size()) v.store(p); else v.store(p, static_cast<int>(count));
  } else {
    __at_align__ acc_t buf[V::size()];
    v.store(buf);
    if (count >= V::size()) {
      for (int i = 0; i < V::size(); ++i) p[i] = static_cast<scalar_t>(buf[i]);
    } else {
      for (int64_t i = 0; i < count; ++i) p[i] = static_cast<scalar_t>(buf[i]);
    }
  }
}

// Outputs larger than a core's L2 cache per thread are written with non-temporal stores:
// no read of each line before it is overwritten, and no eviction of the inputs. In a
// training step at ResNet-50 shapes (batch 8, 1 thread) that made the BN-Add-ReLU
// forward+backward 1.1-1.6x faster from 3 MiB outputs up; an output that fits in the L2
// stays there for the next op. FUSEDRES_CPU_STREAM_BYTES (per thread; read once) moves
// the threshold, for measuring.
constexpr int64_t kStreamBytesPerThread = 2 << 20;  // the L2 of a recent Xeon core

inline int64_t stream_bytes_per_thread() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("FUSEDRES_CPU_STREAM_BYTES");
    return env != nullptr ? std::atoll(env) : kStreamBytesPerThread;
  }();
  return bytes;
}

inline bool stream_output(int64_t numel, size_t elem_size) {
  const int64_t threads = std::max(1, at::get_num_threads());
  return static_cast<int64_t>(elem_size) * numel >= stream_bytes_per_thread() * threads;
}

// store() with a non-temporal store for a full, 64-byte aligned vector of the acc dtype
// when `stream` (AVX2/AVX-512 builds); sfence() before the data is read elsewhere.
template <typename scalar_t, typename acc_t>
inline void store_maybe_stream(scalar_t* p, const Vectorized<acc_t>& v, int64_t count,
                               bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stream && count >= Vectorized<acc_t>::size() &&
        (reinterpret_cast<uintptr_t>(p) & (sizeof(v) - 1)) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<acc_t, float>) _mm512_stream_ps(p, v);
      else _mm512_stream_pd(p, v);
#else
      if constexpr (std::is_same_v<acc_t, float>) _mm256_stream_ps(p, v);
      else _mm256_stream_pd(p, v);
#endif
      return;
    }
  }
#endif
  store(p, v, count);
}

// Orders this thread's non-temporal stores before what follows (the join of the
// parallel region, then whoever reads the output).
inline void stream_fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();
#endif
}

// a*b + c: one fused multiply-add on AVX2/AVX-512, a*b then +c on the baseline.
template <typename acc_t>
inline Vectorized<acc_t> fma(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b,
                             const Vectorized<acc_t>& c) {
  return at::vec::fmadd(a, b, c);
}

// The pre-activation of one BN input, (x - mean)*scale + shift: three roundings, never a
// fused multiply-add (the ReLU mask must match the reference bit for bit).
template <typename acc_t>
inline Vectorized<acc_t> centred(const Vectorized<acc_t>& x, const Vectorized<acc_t>& mean,
                                 const Vectorized<acc_t>& scale,
                                 const Vectorized<acc_t>& shift) {
  return (x - mean) * scale + shift;
}

// ---- the 1-bit mask -----------------------------------------------------------------

inline uint32_t low_bits(int64_t count) {
  return count >= 32 ? 0xffffffffu : ((1u << count) - 1u);
}

// Appends bits LSB first to a byte stream that starts on a byte boundary.
struct BitWriter {
  uint8_t* p;
  uint64_t buf = 0;
  int n = 0;
  explicit BitWriter(uint8_t* ptr) : p(ptr) {}
  inline void put(uint32_t bits, int count) {
    buf |= static_cast<uint64_t>(bits) << n;
    n += count;
    while (n >= 8) {
      *p++ = static_cast<uint8_t>(buf);
      buf >>= 8;
      n -= 8;
    }
  }
  inline void flush() {
    if (n > 0) *p++ = static_cast<uint8_t>(buf);
    buf = 0;
    n = 0;
  }
};

// `count` (<= 24) bits starting at bit `off`, lane i from bit off + i*stride.
inline uint32_t read_bits(const uint8_t* m, int64_t nbytes, int64_t off, int64_t stride,
                          int64_t count) {
  if (stride == 1 && (off & 7) == 0) {  // whole bytes: one per 8 lanes
    if (count == 8) return m[off >> 3];
    if (count == 16) return m[off >> 3] | (static_cast<uint32_t>(m[(off >> 3) + 1]) << 8);
  }
  if (stride == 1) {
    const int64_t b = off >> 3;
    const int sh = static_cast<int>(off & 7);
    uint64_t w = 0;
    const int64_t need = (sh + count + 7) >> 3;
    for (int64_t k = 0; k < need && b + k < nbytes; ++k)
      w |= static_cast<uint64_t>(m[b + k]) << (8 * k);
    return static_cast<uint32_t>(w >> sh) & low_bits(count);
  }
  uint32_t bits = 0;
  for (int64_t i = 0; i < count; ++i, off += stride)
    bits |= static_cast<uint32_t>((m[off >> 3] >> (off & 7)) & 1) << i;
  return bits;
}

// ---- lane selects -------------------------------------------------------------------
//
// AVX-512 compares write mask registers, and a masked move uses one directly; AVX2 and
// the baseline build vector masks and blend. Same results, lane for lane.

#if defined(CPU_CAPABILITY_AVX512)
template <typename acc_t>
inline auto to_mmask(uint32_t bits) {
  if constexpr (std::is_same_v<acc_t, float>) return static_cast<__mmask16>(bits);
  else return static_cast<__mmask8>(bits);
}
#else
// Lanes all-ones where the bit is set (a blendv mask): one load from a table of every
// lane pattern (2^lanes rows; 8 KiB for 8 float lanes), not a loop per vector -- the
// backward of BN-Add-ReLU reads the mask for every vector it gates.
template <typename acc_t>
struct LaneMasks {
  using I = at::vec::int_same_size_t<acc_t>;
  static constexpr int kLanes = Vectorized<acc_t>::size();
  static_assert(kLanes <= 8, "8 lanes at most: 2^lanes rows");
  __at_align__ I rows[1 << kLanes][kLanes] = {};
  constexpr LaneMasks() {
    for (int b = 0; b < (1 << kLanes); ++b)
      for (int i = 0; i < kLanes; ++i) rows[b][i] = ((b >> i) & 1) ? I(-1) : I(0);
  }
};
#endif

// d where the bit of the lane is set, 0 elsewhere.
template <typename acc_t>
inline Vectorized<acc_t> keep_where(uint32_t bits, const Vectorized<acc_t>& d) {
  using V = Vectorized<acc_t>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return V(_mm512_maskz_mov_ps(to_mmask<acc_t>(bits), d));
  } else {
    return V(_mm512_maskz_mov_pd(to_mmask<acc_t>(bits), d));
  }
#else
  static constexpr LaneMasks<acc_t> table{};  // built by the compiler: no guard at run time
  return V::blendv(V(acc_t(0)), d, V::loadu(table.rows[bits & ((1u << V::size()) - 1u)]));
#endif
}

// Bits set where the gradient passes: !(pre <= 0) (NaN passes).
template <typename acc_t>
inline uint32_t pass_bits(const Vectorized<acc_t>& pre, int64_t count) {
  using V = Vectorized<acc_t>;
#if defined(CPU_CAPABILITY_AVX512)
  uint32_t bits;  // not (pre <= 0), unordered: NaN passes
  if constexpr (std::is_same_v<acc_t, float>) {
    bits = _mm512_cmp_ps_mask(pre, _mm512_setzero_ps(), _CMP_NLE_UQ);
  } else {
    bits = _mm512_cmp_pd_mask(pre, _mm512_setzero_pd(), _CMP_NLE_UQ);
  }
  return bits & low_bits(count);
#else
  return static_cast<uint32_t>((pre <= V(acc_t(0))).zero_mask()) & low_bits(count);
#endif
}

// d, 0 where pre <= 0: the ReLU gate recomputed from the pre-activation.
template <typename acc_t>
inline Vectorized<acc_t> gate_by_pre(const Vectorized<acc_t>& pre, const Vectorized<acc_t>& d) {
  using V = Vectorized<acc_t>;
#if defined(CPU_CAPABILITY_AVX512)
  return keep_where<acc_t>(pass_bits(pre, V::size()), d);
#else
  const V zero(acc_t(0));
  return V::blendv(d, zero, pre <= zero);
#endif
}

template <typename acc_t>
inline Vectorized<acc_t> relu(const Vectorized<acc_t>& pre) {
  using V = Vectorized<acc_t>;
#if defined(CPU_CAPABILITY_AVX512)
  // Lanes < 0 become 0 (ordered compare: NaN stays NaN).
  if constexpr (std::is_same_v<acc_t, float>) {
    return V(_mm512_mask_mov_ps(pre, _mm512_cmp_ps_mask(pre, _mm512_setzero_ps(), _CMP_LT_OQ),
                                _mm512_setzero_ps()));
  } else {
    return V(_mm512_mask_mov_pd(pre, _mm512_cmp_pd_mask(pre, _mm512_setzero_pd(), _CMP_LT_OQ),
                                _mm512_setzero_pd()));
  }
#else
  const V zero(acc_t(0));
  return V::blendv(pre, zero, pre < zero);  // NaN stays NaN
#endif
}

// ---- block sums ---------------------------------------------------------------------
//
// Every reduction folds at most kBlockRows values per lane in the acc dtype -- one per row
// of a block of rows, or one per vector step of a plane -- into double partials. No float
// accumulator ever holds more than a block's worth of values; the partials, their merge
// across chunks (in chunk order) and the per-channel results are double, as torch's own
// CPU batch norm accumulates.
// * Statistics (blocked Welford/Chan): a block's values are centred on the block's own
//   float mean bm, so d = x - bm is exact-ish whatever the mean's size; the block's
//   (sum d, sum d^2) and bm - pivot then enter double sums of x - pivot and (x - pivot)^2
//   by the exact algebra of a shift (Chan's merge, in sum form). The pivot is a value of
//   the channel, so the final M2 = S2 - S1^2/M cancels only in double.
// * Backward: centred sums, sum(g) and sum(g*(x - mean)), a block in float, then double.
constexpr int kBlockRows = 16;

// The lanes of v as doubles, in d[0, lanes).
template <typename acc_t>
inline void to_double(const Vectorized<acc_t>& v, double* d) {
  __at_align__ acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  for (int l = 0; l < Vectorized<acc_t>::size(); ++l) d[l] = static_cast<double>(buf[l]);
}

// f(lane, count) over lanes [0, cnt) of a vector of acc_t: in double vectors when every
// lane is there, else one lane at a time (f(l, 1) with a scalar view).
template <typename acc_t, typename Count, typename F>
inline void for_double_lanes(Count cnt, F&& f) {
  using D = Vectorized<double>;
  constexpr int lanes = Vectorized<acc_t>::size();
  if (static_cast<int64_t>(cnt) == lanes && lanes % D::size() == 0) {
    for (int l = 0; l < lanes; l += D::size()) f(l, std::integral_constant<int, D::size()>{});
  } else {
    for (int64_t l = 0; l < static_cast<int64_t>(cnt); ++l) f(l, std::integral_constant<int, 1>{});
  }
}

// Doubles p[0, w) as a vector (w = D::size()) or a scalar (w = 1), and back.
template <int W>
inline auto dload(const double* p) {
  if constexpr (W == 1) return *p; else return Vectorized<double>::loadu(p);
}
template <typename T>
inline void dstore(double* p, const T& v) {
  if constexpr (std::is_same_v<T, double>) *p = v; else v.store(p);
}

// into[0, cnt) += the lanes of v, in double.
template <typename acc_t, typename Count>
inline void add_lanes(double* into, const Vectorized<acc_t>& v, Count cnt) {
  __at_align__ double d[Vectorized<acc_t>::size()];
  to_double(v, d);
  for_double_lanes<acc_t>(cnt, [&](int l, auto w) {
    dstore(into + l, dload<decltype(w)::value>(into + l) + dload<decltype(w)::value>(d + l));
  });
}

inline void normalise(const Shape& sh, Ncs& t) {
  if (sh.C == 1) t.sC = 1;
  if (sh.S == 1) t.sS = 1;
}

// The skeleton both channels-inner (ROWS) reductions share. The R = N*S rows are cut
// into chunks of whole rows whose size depends on the shape only (never on the number
// of threads, so results are bitwise the same for any thread count); each chunk reduces
// into its own two per-channel double partial arrays (zeroed), then each channel is
// finished from the chunks' partials, added in chunk order.
struct RowChunks {
  int64_t R, C, rows_per_chunk, nchunks;
  std::vector<double> part_a, part_b;  // nchunks x C each

  RowChunks(int64_t rows, int64_t channels)
      : R(rows), C(channels), rows_per_chunk(std::max<int64_t>(1, kChunkElems / channels)),
        nchunks(ceil_div(rows, rows_per_chunk)), part_a(nchunks * channels),
        part_b(nchunks * channels) {}

  // chunk(a, b, r0, r1): rows [r0, r1) into the chunk's partials a, b; chunks in parallel.
  template <typename Chunk>
  void reduce(Chunk&& chunk) {
    at::parallel_for(0, nchunks, grain_for(rows_per_chunk * C), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k1 - 1; k >= k0; --k) {  // last chunk first (see the top)
        double* a = part_a.data() + k * C;
        double* b = part_b.data() + k * C;
        std::fill(a, a + C, 0.0);
        std::fill(b, b + C, 0.0);
        const int64_t r0 = k * rows_per_chunk;
        chunk(a, b, r0, std::min(R, r0 + rows_per_chunk));
      }
    });
  }

  // finish(c, sum_a, sum_b) for every channel.
  template <typename Finish>
  void finish(Finish&& finish_channel) const {
    at::parallel_for(0, C, grain_for(nchunks), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sa = 0, sb = 0;
        for (int64_t k = 0; k < nchunks; ++k) {
          sa += part_a[k * C + c];
          sb += part_b[k * C + c];
        }
        finish_channel(c, sa, sb);
      }
    });
  }
};

// A channel's PLANES pieces: (n, c, segment of S) for every n and segment of at most
// kChunkElems (a whole number of vectors) elements.
struct PlanePieces {
  int64_t N, C, S, seg, nseg, items;
  PlanePieces(const Shape& sh, int lanes)
      : N(sh.N), C(sh.C), S(sh.S),
        seg(std::max<int64_t>(lanes, kChunkElems / lanes * lanes)),
        nseg(ceil_div(S, seg)), items(N * C * nseg) {}

  // piece(it, n, c, s0, len) for every piece, in parallel, last first (see the top).
  template <typename Piece>
  void reduce(Piece&& piece) const {
    at::parallel_for(0, items, grain_for(std::min(S, seg)), [&](int64_t i0, int64_t i1) {
      for (int64_t it = i1 - 1; it >= i0; --it) {
        const int64_t g = it % nseg, nc = it / nseg, c = nc % C, n = nc / C;
        const int64_t s0 = g * seg;
        piece(it, n, c, s0, std::min(S, s0 + seg) - s0);
      }
    });
  }

  // finish(c, sum_a, sum_b): a channel's pieces added in (n, segment) order.
  template <typename Finish>
  void finish(const std::vector<double>& wa, const std::vector<double>& wb,
              Finish&& finish_channel) const {
    at::parallel_for(0, C, grain_for(N * nseg), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sa = 0, sb = 0;
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t g = 0; g < nseg; ++g) {
            sa += wa[(n * C + c) * nseg + g];
            sb += wb[(n * C + c) * nseg + g];
          }
        }
        finish_channel(c, sa, sb);
      }
    });
  }
};

// Lane sums of f(vector i) for i in [0, nvec) over blocks of kBlockRows vectors, then the
// lanes (and `tail`, added last) summed in double: (sum of a, sum of b).
template <typename acc_t, typename Step>
inline std::pair<double, double> plane_sums(int64_t nvec, Step&& step) {
  using V = Vectorized<acc_t>;
  double la[V::size()] = {}, lb[V::size()] = {};
  for (int64_t b0 = 0; b0 < nvec; b0 += kBlockRows) {
    const int64_t b1 = std::min(nvec, b0 + kBlockRows);
    V ta(acc_t(0)), tb(acc_t(0));
    for (int64_t i = b0; i < b1; ++i) step(i, ta, tb);
    add_lanes(la, ta, std::integral_constant<int64_t, V::size()>{});
    add_lanes(lb, tb, std::integral_constant<int64_t, V::size()>{});
  }
  double sa = 0, sb = 0;
  for (int l = 0; l < V::size(); ++l) {
    sa += la[l];
    sb += lb[l];
  }
  return {sa, sb};
}

// =====================================================================================
// bn_stats
// =====================================================================================

// The per-channel pivot of the statistics sums: the channel's first value (0 if that is
// not finite, so an inf or NaN elsewhere propagates as it would unshifted).
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
std::vector<acc_t> pivots(const Shape& sh, const Ncs& x) {
  std::vector<acc_t> k(sh.C);
  const scalar_t* p = static_cast<const scalar_t*>(x.data);
  for (int64_t c = 0; c < sh.C; ++c) {
    const acc_t v = static_cast<acc_t>(p[c * x.sC]);
    k[c] = std::isfinite(v) ? v : acc_t(0);
  }
  return k;
}

// mean and biased variance of M values from the sums of d = x - pivot and of d^2.
template <typename acc_t>
inline void finish_stats(int64_t m, acc_t pivot, double s1, double s2, acc_t* mean, acc_t* var) {
  const double dm = s1 / static_cast<double>(m);
  const double v = (s2 - s1 * dm) / static_cast<double>(m);
  *mean = static_cast<acc_t>(static_cast<double>(pivot) + dm);
  *var = static_cast<acc_t>(v < 0 ? 0.0 : v);  // rounding below 0; NaN stays NaN
}

// v[0] + ... + v[NR-1] by a pairwise tree (depth log2 NR instead of a chain of NR - 1
// dependent additions).
template <int NR, typename V>
inline V pairwise_sum(V (&v)[NR]) {
#pragma GCC unroll 8
  for (int h = 1; h < NR; h *= 2) {
#pragma GCC unroll 16
    for (int u = 0; u + h < NR; u += 2 * h) v[u] = v[u] + v[u + h];
  }
  return v[0];
}

// The NR (>= 1) values of a block per lane, xs[0..NR), folded into the double sums
// s1 += sum(x - k), s2 += sum((x - k)^2) of lanes [0, cnt): see "block sums".
template <int NR, typename acc_t, typename Count>
inline void fold_block(const Vectorized<acc_t> (&xs)[NR], const Vectorized<acc_t>& k,
                       double* s1, double* s2, Count cnt) {
  using V = Vectorized<acc_t>;
  // Short dependency chains (a tree, 4 accumulators): a block is ~150 instructions per
  // channel vector, so the out-of-order window holds about two, and chains of 16
  // dependent additions and multiply-adds set the pace (8x512x7x7 statistics, AVX-512,
  // 1 thread: 18.4 us with the chains, 15.7-17.2 us without).
  V d[NR];
#pragma GCC unroll 16
  for (int u = 0; u < NR; ++u) d[u] = xs[u];
  const V bm = pairwise_sum(d) * V(acc_t(1) / acc_t(NR));
  constexpr int kAcc = NR < 4 ? NR : 4;
  V q[kAcc];
#pragma GCC unroll 4
  for (int k = 0; k < kAcc; ++k) q[k] = V(acc_t(0));
#pragma GCC unroll 16
  for (int u = 0; u < NR; ++u) {
    d[u] = xs[u] - bm;
    q[u % kAcc] = fma(d[u], d[u], q[u % kAcc]);
  }
  const V t1 = pairwise_sum(d), t2 = pairwise_sum(q);
  __at_align__ double d_m[V::size()], d_k[V::size()], d_1[V::size()], d_2[V::size()];
  to_double(bm, d_m);
  to_double(k, d_k);
  to_double(t1, d_1);
  to_double(t2, d_2);
  for_double_lanes<acc_t>(cnt, [&](int l, auto w) {
    using T = decltype(dload<decltype(w)::value>(s1));
    const T off = dload<decltype(w)::value>(d_m + l) - dload<decltype(w)::value>(d_k + l);
    const T a = dload<decltype(w)::value>(d_1 + l);
    const T nr = T(static_cast<double>(NR));
    dstore(s1 + l, dload<decltype(w)::value>(s1 + l) + (a + nr * off));
    dstore(s2 + l, dload<decltype(w)::value>(s2 + l) + (dload<decltype(w)::value>(d_2 + l) + off * (T(2.0) * a + nr * off)));
  });
}

// ROWS: per chunk of rows, per-channel blocked sums vectorised across C.
template <typename scalar_t, bool CONTIG>
void stats_rows(const StatsArgs& a, const Ncs& x) {
  using acc_t = acc_type_t<scalar_t>;
  using V = Vectorized<acc_t>;
  const int64_t N = a.sh.N, C = a.sh.C, S = a.sh.S;
  const std::vector<acc_t> pivot = pivots<scalar_t>(a.sh, x);
  RowChunks chunks(N * S, C);
  const scalar_t* xp = static_cast<const scalar_t*>(x.data);
  chunks.reduce([&](double* s1, double* s2, int64_t r0, int64_t r1) {
    for_row_groups<kBlockRows>(r0, r1, [&](auto group, int64_t r) {
      constexpr int nr = decltype(group)::value;
      const scalar_t* rows[nr];
      for (int u = 0; u < nr; ++u) {
        const int64_t n = (r + u) / S, s = (r + u) % S;
        rows[u] = xp + n * x.sN + s * x.sS;
      }
      for_vectors<V::size()>(C, [&](int64_t j, auto count) {
        V xs[nr];
        for (int u = 0; u < nr; ++u)
          xs[u] = load<CONTIG>(rows[u] + j * (CONTIG ? 1 : x.sC), x.sC, count);
        fold_block(xs, loadp(pivot.data() + j, count), s1 + j, s2 + j, count);
      });
    });
  });
  acc_t* mean = static_cast<acc_t*>(a.mean);
  acc_t* var = static_cast<acc_t*>(a.var);
  chunks.finish([&](int64_t c, double s1, double s2) {
    finish_stats(N * S, pivot[c], s1, s2, mean + c, var + c);
  });
}

// PLANES (S contiguous): pieces (n, c, segment of S), lane-wise blocked sums, then a
// channel's pieces added in (n, segment) order.
template <typename scalar_t>
void stats_planes(const StatsArgs& a, const Ncs& x) {
  using acc_t = acc_type_t<scalar_t>;
  using V = Vectorized<acc_t>;
  const PlanePieces pieces(a.sh, V::size());
  const std::vector<acc_t> pivot = pivots<scalar_t>(a.sh, x);
  std::vector<double> ws1(pieces.items), ws2(pieces.items);
  const scalar_t* xp = static_cast<const scalar_t*>(x.data);
  pieces.reduce([&](int64_t it, int64_t n, int64_t c, int64_t s0, int64_t len) {
    const scalar_t* p = xp + n * x.sN + c * x.sC + s0;
    const acc_t k = pivot[c];
    const V kv(k);
    constexpr auto full = std::integral_constant<int64_t, V::size()>{};
    double l1[V::size()] = {}, l2[V::size()] = {};
    const int64_t nfull = len / V::size();
    int64_t i = 0;
    for (; i + kBlockRows <= nfull; i += kBlockRows) {
      V xs[kBlockRows];
      for (int u = 0; u < kBlockRows; ++u) xs[u] = load<true>(p + (i + u) * V::size(), 1, full);
      fold_block(xs, kv, l1, l2, full);
    }
    for (; i < nfull; ++i) {  // a last partial block, one vector at a time
      V xs[1] = {load<true>(p + i * V::size(), 1, full)};
      fold_block(xs, kv, l1, l2, full);
    }
    double s1 = 0, s2 = 0;
    for (int l = 0; l < V::size(); ++l) {
      s1 += l1[l];
      s2 += l2[l];
    }
    for (int64_t e = nfull * V::size(); e < len; ++e) {
      const double d = static_cast<double>(static_cast<acc_t>(p[e])) - static_cast<double>(k);
      s1 += d;
      s2 += d * d;
    }
    ws1[it] = s1;
    ws2[it] = s2;
  });
  acc_t* mean = static_cast<acc_t*>(a.mean);
  acc_t* var = static_cast<acc_t*>(a.var);
  pieces.finish(ws1, ws2, [&](int64_t c, double s1, double s2) {
    finish_stats(pieces.N * pieces.S, pivot[c], s1, s2, mean + c, var + c);
  });
}

template <typename scalar_t>
void stats_impl(const StatsArgs& a) {
  Ncs x = a.x;
  normalise(a.sh, x);
  if (x.sS == 1 && (x.sC != 1 || a.sh.C == 1)) {
    stats_planes<scalar_t>(a, x);
  } else if (x.sC == 1) {
    stats_rows<scalar_t, true>(a, x);
  } else {
    stats_rows<scalar_t, false>(a, x);
  }
}

// =====================================================================================
// Elementwise walk in output order (bn_apply, bn_backward_apply)
// =====================================================================================

// Calls body(o, n, cs) for every outer index o in [o0, o1) of the output order, in
// blocks of whole mask bytes per thread; cs is s (ROWS) or c (PLANES).
// begin(o0) / end() run once per thread range.
template <bool ROWS, typename Begin, typename Body, typename End>
void walk_output(const Shape& sh, Begin&& begin, Body&& body, End&& end) {
  const int64_t outer = ROWS ? sh.N * sh.S : sh.N * sh.C;
  const int64_t inner = ROWS ? sh.C : sh.S;
  const int64_t div = ROWS ? sh.S : sh.C;
  const int64_t rows = kBlockElems / std::max<int64_t>(inner, 1);
  const int64_t block = std::max<int64_t>(8, ceil_div(rows, 8) * 8);  // whole mask bytes
  const int64_t nblocks = ceil_div(outer, block);
  at::parallel_for(0, nblocks, grain_for(block * inner), [&](int64_t b0, int64_t b1) {
    const int64_t o0 = b0 * block, o1 = std::min(outer, b1 * block);
    auto state = begin(o0);
    // (n, cs) of o counted along: a 64-bit division per row costs ~10 us on a 7x7 layer.
    int64_t n = o0 / div, cs = o0 % div;
    for (int64_t o = o0; o < o1; ++o) {
      body(state, o, n, cs);
      if (++cs == div) {
        cs = 0;
        ++n;
      }
    }
    end(state);
  });
}

// The features are compile-time switches: with them known, the inner loop is the few
// vector operations each case needs (twice as fast as runtime branches on 7x7 layers).
template <typename scalar_t, bool ROWS, bool CONTIG, bool HAS_RES, bool HAS_X2, bool RELU>
void apply_walk(const ApplyArgs& a, const Ncs& x, const Ncs& res, const Ncs& x2) {
  using acc_t = acc_type_t<scalar_t>;
  using V = Vectorized<acc_t>;
  const int64_t inner = ROWS ? a.sh.C : a.sh.S;
  const scalar_t* xp = static_cast<const scalar_t*>(x.data);
  const scalar_t* rp = static_cast<const scalar_t*>(res.data);
  const scalar_t* x2p = static_cast<const scalar_t*>(x2.data);
  scalar_t* outp = static_cast<scalar_t*>(a.out);
  uint8_t* mask = a.mask;
  const bool stream = stream_output(a.sh.N * a.sh.C * a.sh.S, sizeof(scalar_t));
  walk_output<ROWS>(
      a.sh,
      [&](int64_t o0) { return BitWriter(mask ? mask + ((o0 * inner) >> 3) : nullptr); },
      [&](BitWriter& bw, int64_t o, int64_t n, int64_t cs) {
        // Loop invariants as locals: the vector stores may alias anything the lambda
        // captures by reference, which would force a reload every iteration.
        constexpr bool has_res = HAS_RES, has_x2 = HAS_X2, relu_on = RELU;
        const bool want_mask = mask != nullptr, stream_out = stream;
        const int64_t inner = ROWS ? a.sh.C : a.sh.S;
        const acc_t* mean = static_cast<const acc_t*>(a.mean);
        const acc_t* scale = static_cast<const acc_t*>(a.scale);
        const acc_t* shift = static_cast<const acc_t*>(a.shift);
        const acc_t* mean2 = static_cast<const acc_t*>(a.mean2);
        const acc_t* scale2 = static_cast<const acc_t*>(a.scale2);
        const acc_t* shift2 = static_cast<const acc_t*>(a.shift2);
        const int64_t xi = ROWS ? x.sC : x.sS, ri = ROWS ? res.sC : res.sS;
        const int64_t x2i = ROWS ? x2.sC : x2.sS;
        // ROWS: cs = s, channel = inner index; PLANES: cs = c, one channel.
        const int64_t sN = n, sC = ROWS ? 0 : cs, sS = ROWS ? cs : 0;
        const scalar_t* xr = xp + sN * x.sN + sC * x.sC + sS * x.sS;
        const scalar_t* rr = has_res ? rp + sN * res.sN + sC * res.sC + sS * res.sS : nullptr;
        const scalar_t* x2r = has_x2 ? x2p + sN * x2.sN + sC * x2.sC + sS * x2.sS : nullptr;
        scalar_t* out_row = outp + o * inner;
        BitWriter w = bw;
        V mn, sc, sh, mn2, sc2, sh2;
        if constexpr (!ROWS) {
          mn = V(mean[cs]);
          sc = V(scale[cs]);
          sh = V(shift[cs]);
          if (has_x2) {
            mn2 = V(mean2[cs]);
            sc2 = V(scale2[cs]);
            sh2 = V(shift2[cs]);
          }
        }
        for_vectors<V::size()>(inner, [&](int64_t j, auto count) {
          const int64_t cnt = count;
          if constexpr (ROWS) {
            mn = loadp(mean + j, cnt);
            sc = loadp(scale + j, cnt);
            sh = loadp(shift + j, cnt);
            if (has_x2) {
              mn2 = loadp(mean2 + j, cnt);
              sc2 = loadp(scale2 + j, cnt);
              sh2 = loadp(shift2 + j, cnt);
            }
          }
          V pre = centred(load<CONTIG>(xr + j * (CONTIG ? 1 : xi), xi, cnt), mn, sc, sh);
          if (has_x2) {
            pre = pre + centred(load<CONTIG>(x2r + j * (CONTIG ? 1 : x2i), x2i, cnt), mn2, sc2,
                                sh2);
          }
          if (has_res) pre = pre + load<CONTIG>(rr + j * (CONTIG ? 1 : ri), ri, cnt);
          if (want_mask) w.put(pass_bits(pre, cnt), static_cast<int>(cnt));
          if (relu_on) pre = relu(pre);
          store_maybe_stream(out_row + j, pre, cnt, stream_out);
        });
        bw = w;
      },
      [&](BitWriter& bw) {
        if (mask) bw.flush();
        stream_fence(stream);
      });
}

template <typename scalar_t>
void apply_impl(const ApplyArgs& a) {
  Ncs x = a.x, res = a.res, x2 = a.x2;
  normalise(a.sh, x);
  normalise(a.sh, res);
  normalise(a.sh, x2);
  const bool rows = a.channels_last;
  const bool contig = rows
      ? x.sC == 1 && (!a.has_res || res.sC == 1) && (!a.has_x2 || x2.sC == 1)
      : x.sS == 1 && (!a.has_res || res.sS == 1) && (!a.has_x2 || x2.sS == 1);
  with_bools({rows, contig, a.has_res, a.has_x2, a.relu}, [&](auto... flag) {
    apply_walk<scalar_t, decltype(flag)::value...>(a, x, res, x2);
  });
}

// =====================================================================================
// Backward: g = dout * passes (mask bit, or recomputed !((x-mean)*scale+shift <= 0))
// =====================================================================================

// How g = dout * passes gets its gate: no ReLU, the saved mask, or recomputed from x.
enum Gate : int { kNoGate = 0, kMaskGate = 1, kRecomputeGate = 2 };

inline int gate_of(const BackwardArgs& a) {
  return a.mask ? kMaskGate : (a.relu ? kRecomputeGate : kNoGate);
}

// Gradient after the ReLU for `cnt` lanes. `moff`/`mstride`: bit offset of lane 0 and
// bit step between lanes in the mask.
template <int GATE, typename acc_t>
inline Vectorized<acc_t> gated(const uint8_t* mask, int64_t mask_bytes,
                               const Vectorized<acc_t>& d, const Vectorized<acc_t>& xv,
                               const Vectorized<acc_t>& mn, const Vectorized<acc_t>& sc,
                               const Vectorized<acc_t>& sh, int64_t moff, int64_t mstride,
                               int64_t cnt) {
  if constexpr (GATE == kMaskGate) {
    return keep_where<acc_t>(read_bits(mask, mask_bytes, moff, mstride, cnt), d);
  } else if constexpr (GATE == kRecomputeGate) {
    return gate_by_pre<acc_t>(centred(xv, mn, sc, sh), d);
  } else {
    return d;
  }
}

template <typename F>
void with_gate(int gate, F&& f) {
  switch (gate) {
    case kMaskGate: f(std::integral_constant<int, kMaskGate>{}); break;
    case kRecomputeGate: f(std::integral_constant<int, kRecomputeGate>{}); break;
    default: f(std::integral_constant<int, kNoGate>{}); break;
  }
}

template <typename scalar_t, bool ROWS, bool CONTIG, int GATE>
void backward_apply_walk(const BackwardArgs& a, const Ncs& dout, const Ncs& x) {
  using acc_t = acc_type_t<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr bool need_pass = GATE == kRecomputeGate;
  const bool stream = stream_output(a.sh.N * a.sh.C * a.sh.S, sizeof(scalar_t));
  walk_output<ROWS>(
      a.sh, [](int64_t) { return 0; },
      [&](int, int64_t o, int64_t n, int64_t cs) {
        const bool stream_out = stream;
        // Locals, not captures: see apply_walk.
        const int64_t C = a.sh.C, S = a.sh.S;
        const int64_t inner = ROWS ? C : S;
        const acc_t* mean = static_cast<const acc_t*>(a.mean);
        [[maybe_unused]] const acc_t* scale = static_cast<const acc_t*>(a.scale);
        [[maybe_unused]] const acc_t* shift = static_cast<const acc_t*>(a.shift);
        const acc_t* cg = static_cast<const acc_t*>(a.coef_g);
        const acc_t* cxc = static_cast<const acc_t*>(a.coef_xc);
        const acc_t* cc = static_cast<const acc_t*>(a.coef_c);
        const scalar_t* dp = static_cast<const scalar_t*>(dout.data);
        const scalar_t* xp = static_cast<const scalar_t*>(x.data);
        scalar_t* dxp = static_cast<scalar_t*>(a.dx);
        scalar_t* drp = static_cast<scalar_t*>(a.dres);
        [[maybe_unused]] const uint8_t* mask = a.mask;
        [[maybe_unused]] const int64_t mask_bytes = a.mask_bytes;
        const int64_t di = ROWS ? dout.sC : dout.sS, xi = ROWS ? x.sC : x.sS;
        const int64_t sC = ROWS ? 0 : cs, sS = ROWS ? cs : 0;
        const scalar_t* dr = dp + n * dout.sN + sC * dout.sC + sS * dout.sS;
        const scalar_t* xr = xp + n * x.sN + sC * x.sC + sS * x.sS;
        V mn, sc, sh, vg, vxc, vc;
        if constexpr (!ROWS) {
          mn = V(mean[cs]);
          vg = V(cg[cs]);
          vxc = V(cxc[cs]);
          vc = V(cc[cs]);
          if constexpr (need_pass) {
            sc = V(scale[cs]);
            sh = V(shift[cs]);
          }
        }
        for_vectors<V::size()>(inner, [&](int64_t j, auto count) {
          const int64_t cnt = count;
          if constexpr (ROWS) {
            mn = loadp(mean + j, cnt);
            vg = loadp(cg + j, cnt);
            vxc = loadp(cxc + j, cnt);
            vc = loadp(cc + j, cnt);
            if constexpr (need_pass) {
              sc = loadp(scale + j, cnt);
              sh = loadp(shift + j, cnt);
            }
          }
          const V d = load<CONTIG>(dr + j * (CONTIG ? 1 : di), di, cnt);
          const V xv = load<CONTIG>(xr + j * (CONTIG ? 1 : xi), xi, cnt);
          const V g =
              gated<GATE, acc_t>(mask, mask_bytes, d, xv, mn, sc, sh, o * inner + j, 1, cnt);
          const V dx = fma(vg, g, fma(vxc, xv - mn, vc));
          store_maybe_stream(dxp + o * inner + j, dx, cnt, stream_out);
          if (drp) store_maybe_stream(drp + o * inner + j, g, cnt, stream_out);
        });
      },
      [&](int) { stream_fence(stream); });
}

template <typename scalar_t>
void backward_apply_impl(const BackwardArgs& a) {
  Ncs dout = a.dout, x = a.x;
  normalise(a.sh, dout);
  normalise(a.sh, x);
  with_gate(gate_of(a), [&](auto gate) {
    constexpr int G = decltype(gate)::value;
    if (a.channels_last) {
      if (dout.sC == 1 && x.sC == 1) backward_apply_walk<scalar_t, true, true, G>(a, dout, x);
      else backward_apply_walk<scalar_t, true, false, G>(a, dout, x);
    } else {
      if (dout.sS == 1 && x.sS == 1) backward_apply_walk<scalar_t, false, true, G>(a, dout, x);
      else backward_apply_walk<scalar_t, false, false, G>(a, dout, x);
    }
  });
}

// ROWS reduction: per chunk of rows, per-channel partial sums vectorised across C.
template <typename scalar_t, bool CONTIG, int GATE>
void backward_reduce_rows(const BackwardArgs& a, const Ncs& dout, const Ncs& x) {
  using acc_t = acc_type_t<scalar_t>;
  using V = Vectorized<acc_t>;
  const int64_t N = a.sh.N, C = a.sh.C, S = a.sh.S;
  RowChunks chunks(N * S, C);
  const acc_t* mean = static_cast<const acc_t*>(a.mean);
  const acc_t* scale = static_cast<const acc_t*>(a.scale);
  const acc_t* shift = static_cast<const acc_t*>(a.shift);
  const scalar_t* dp = static_cast<const scalar_t*>(dout.data);
  const scalar_t* xp = static_cast<const scalar_t*>(x.data);
  constexpr bool need_pass = GATE == kRecomputeGate;
  const uint8_t* mask = a.mask;
  const int64_t mask_bytes = a.mask_bytes;
  const int64_t mstride = a.channels_last ? 1 : S;
  chunks.reduce([&](double* sg, double* sgx, int64_t r0, int64_t r1) {
    // A block of rows at a time, its sums in registers, then added to the double partials.
    for_row_groups<kBlockRows>(r0, r1, [&](auto group, int64_t r) {
      constexpr int nr = decltype(group)::value;
      const scalar_t* drs[kBlockRows];
      const scalar_t* xrs[kBlockRows];
      int64_t moffs[kBlockRows];
      for (int u = 0; u < nr; ++u) {
        const int64_t n = (r + u) / S, s = (r + u) % S;
        drs[u] = dp + n * dout.sN + s * dout.sS;
        xrs[u] = xp + n * x.sN + s * x.sS;
        moffs[u] = a.channels_last ? (r + u) * C : n * C * S + s;
      }
      for_vectors<V::size()>(C, [&](int64_t j, auto count) {
        const int64_t cnt = count;
        V sc, sh;
        if constexpr (need_pass) {
          sc = loadp(scale + j, cnt);
          sh = loadp(shift + j, cnt);
        }
        const V mn = loadp(mean + j, cnt);
        V tg(acc_t(0)), tgx(acc_t(0));
        const int64_t mj = a.channels_last ? j : j * S;
        for (int u = 0; u < nr; ++u) {
          const V d = load<CONTIG>(drs[u] + j * (CONTIG ? 1 : dout.sC), dout.sC, cnt);
          const V xv = load<CONTIG>(xrs[u] + j * (CONTIG ? 1 : x.sC), x.sC, cnt);
          const V g = gated<GATE, acc_t>(mask, mask_bytes, d, xv, mn, sc, sh, moffs[u] + mj,
                                         mstride, cnt);
          tg = tg + g;
          tgx = fma(g, xv - mn, tgx);
        }
        add_lanes(sg + j, tg, count);
        add_lanes(sgx + j, tgx, count);
      });
    });
  });
  acc_t* out_g = static_cast<acc_t*>(a.sum_g);
  acc_t* out_gx = static_cast<acc_t*>(a.sum_g_xc);
  chunks.finish([&](int64_t c, double sg, double sgx) {
    out_g[c] = static_cast<acc_t>(sg);
    out_gx[c] = static_cast<acc_t>(sgx);
  });
}

// PLANES reduction (S contiguous): pieces (n, c, segment), lane sums in blocks, then a
// channel's pieces added in (n, segment) order.
template <typename scalar_t, int GATE>
void backward_reduce_planes(const BackwardArgs& a, const Ncs& dout, const Ncs& x) {
  using acc_t = acc_type_t<scalar_t>;
  using V = Vectorized<acc_t>;
  const int64_t C = a.sh.C, S = a.sh.S;
  const PlanePieces pieces(a.sh, V::size());
  std::vector<double> ws_g(pieces.items), ws_gx(pieces.items);
  const acc_t* mean = static_cast<const acc_t*>(a.mean);
  const acc_t* scale = static_cast<const acc_t*>(a.scale);
  const acc_t* shift = static_cast<const acc_t*>(a.shift);
  const scalar_t* dp = static_cast<const scalar_t*>(dout.data);
  const scalar_t* xp = static_cast<const scalar_t*>(x.data);
  constexpr bool need_pass = GATE == kRecomputeGate;
  const uint8_t* mask = a.mask;
  const int64_t mask_bytes = a.mask_bytes;
  const int64_t mstride = a.channels_last ? C : 1;
  pieces.reduce([&](int64_t it, int64_t n, int64_t c, int64_t s0, int64_t len) {
    const scalar_t* dr = dp + n * dout.sN + c * dout.sC + s0;
    const scalar_t* xr = xp + n * x.sN + c * x.sC + s0;
    const V mn(mean[c]);
    V sc, sh;
    if constexpr (need_pass) {
      sc = V(scale[c]);
      sh = V(shift[c]);
    }
    // Vectors [0, ceil(len / lanes)): the missing lanes of a last partial vector load as
    // 0 and contribute 0.
    auto [sg, sgx] = plane_sums<acc_t>(ceil_div(len, V::size()), [&](int64_t i, V& tg, V& tgx) {
      const int64_t j = i * V::size();
      const int64_t cnt = std::min<int64_t>(V::size(), len - j);
      const V d = load<true>(dr + j, 1, cnt);
      const V xv = load<true>(xr + j, 1, cnt);
      const int64_t s = s0 + j;
      const int64_t moff = a.channels_last ? (n * S + s) * C + c : (n * C + c) * S + s;
      const V gv = gated<GATE, acc_t>(mask, mask_bytes, d, xv, mn, sc, sh, moff, mstride, cnt);
      tg = tg + gv;
      tgx = fma(gv, xv - mn, tgx);
    });
    ws_g[it] = sg;
    ws_gx[it] = sgx;
  });
  acc_t* out_g = static_cast<acc_t*>(a.sum_g);
  acc_t* out_gx = static_cast<acc_t*>(a.sum_g_xc);
  pieces.finish(ws_g, ws_gx, [&](int64_t c, double sg, double sgx) {
    out_g[c] = static_cast<acc_t>(sg);
    out_gx[c] = static_cast<acc_t>(sgx);
  });
}

template <typename scalar_t>
void backward_reduce_impl(const BackwardArgs& a) {
  Ncs dout = a.dout, x = a.x;
  normalise(a.sh, dout);
  normalise(a.sh, x);
  const bool rows = dout.sC == 1 && x.sC == 1;
  const bool planes = dout.sS == 1 && x.sS == 1;
  with_gate(gate_of(a), [&](auto gate) {
    constexpr int G = decltype(gate)::value;
    if (planes && (!rows || a.sh.C == 1)) {
      backward_reduce_planes<scalar_t, G>(a, dout, x);
    } else if (rows) {
      backward_reduce_rows<scalar_t, true, G>(a, dout, x);
    } else {
      backward_reduce_rows<scalar_t, false, G>(a, dout, x);
    }
  });
}

}  // namespace

void bn_stats(c10::ScalarType dtype, const StatsArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedres_bn_stats_cpu",
                                  [&] { stats_impl<scalar_t>(a); });
}

void bn_apply(c10::ScalarType dtype, const ApplyArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedres_bn_apply_cpu",
                                  [&] { apply_impl<scalar_t>(a); });
}

void bn_backward_reduce(c10::ScalarType dtype, const BackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "fusedres_bn_backward_reduce_cpu",
                                  [&] { backward_reduce_impl<scalar_t>(a); });
}

void bn_backward_apply(c10::ScalarType dtype, const BackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "fusedres_bn_backward_apply_cpu",
                                  [&] { backward_apply_impl<scalar_t>(a); });
}

}  // namespace fusedres::cpu::FUSEDRES_ISA
