// Host emulation of the CUDA execution model, just enough for bn_kernels.cu:
// blocks run one after another, the threads of a block run as std::threads.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <thread>
#include <vector>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <functional>
#include <memory>

#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline

namespace emu {
inline thread_local uint3 tIdx, bIdx;
inline thread_local dim3 bDim, gDim;
struct WarpCtx { std::barrier<> bar{32}; uint64_t buf[32]; };
inline thread_local std::barrier<>* block_bar;
inline thread_local WarpCtx* warp;
inline thread_local int lane;
}
#define threadIdx emu::tIdx
#define blockIdx emu::bIdx
#define blockDim emu::bDim
#define gridDim emu::gDim

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
template <class T> T __shfl_down_sync(unsigned, T v, unsigned delta) {
  static_assert(sizeof(T) <= 8);
  auto& w = *emu::warp;
  std::memcpy(&w.buf[emu::lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  int src = emu::lane + (int)delta;
  std::memcpy(&r, &w.buf[src < 32 ? src : emu::lane], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}
template <class T> T __ldg(const T* p) { return *p; }
template <class T> void __stwb(T* p, T v) { *p = v; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline double __hiloint2double(int hi, int lo) {
  uint64_t b = ((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo; double d; std::memcpy(&d, &b, 8); return d; }
inline int __double2loint(double d) { uint64_t b; std::memcpy(&b, &d, 8); return (int)(uint32_t)b; }
inline int __double2hiint(double d) { uint64_t b; std::memcpy(&b, &d, 8); return (int)(uint32_t)(b >> 32); }
// Rounded operations: g++ without -ffp-contract=fast never fuses a*b + c.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
using std::fabs;
using std::isfinite;
using std::min;
using std::sqrt;
using std::fma;
using std::fmaf;

namespace emu {
// Kernel launches so far (tests/test_launch_count_cuda.py reads it through emu_launches).
inline int64_t launches = 0;

template <class... P, class... A>
void launch(void (*f)(P...), dim3 grid, dim3 block, size_t, cudaStream_t, A... args) {
  ++launches;
  const int nt = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> bar(nt);
    std::vector<std::unique_ptr<WarpCtx>> warps;
    for (int w = 0; w < (nt + 31) / 32; ++w) warps.emplace_back(new WarpCtx());
    std::vector<std::thread> th;
    for (int t = 0; t < nt; ++t) {
      th.emplace_back([&, t] {
        tIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        bIdx = uint3{bx, by, bz};
        bDim = block; gDim = grid;
        block_bar = &bar; warp = warps[t / 32].get(); lane = t % 32;
        f(args...);
        warp->bar.arrive_and_drop();
        bar.arrive_and_drop();
      });
    }
    for (auto& x : th) x.join();
  }
}
}  // namespace emu
