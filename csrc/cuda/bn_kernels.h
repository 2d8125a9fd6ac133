// Host launchers of the fusedres CUDA kernel primitives (bn_kernels.cu).
//
// Plain CUDA C++: no torch headers, so bn_kernels.cu compiles in seconds. The torch
// side (bn_cuda.cpp) checks inputs, allocates outputs and calls these launchers.
//
// Conventions (the contract is fusedres/reference.py):
// * an activation is a 3-D (N, C, S) view: a base pointer and int64 element strides
//   (sn, sc, ss), arbitrary (zero strides included); outputs are dense, channels-last
//   (strides (S*C, 1, C)) or not ((C*S, S, 1)) as `channels_last` says;
// * per-channel vectors are dense, C elements of Acc<T> (double for double, else float);
// * the ReLU mask is uint8, ceil(N*C*S/8) bytes, bit o of the element at offset o of
//   the dense output (LSB first), 1 where !(pre <= 0);
// * N*C*S > 0 (the torch side handles empty tensors without a launch);
// * every launcher only enqueues work on `stream`; the caller checks for launch errors.
//
// T is float, double, __half or __nv_bfloat16 (explicit instantiations in the .cu).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace fusedres {
namespace cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// Element strides of an (N, C, S) view.
struct Strides3 {
  int64_t n, c, s;
};

// Sizes of an (N, C, S) view.
struct Shape3 {
  int64_t N, C, S;
};

// Scratch memory for the per-block partials of a reduction: the launcher calls
// alloc(ctx, bytes) once and uses the memory in stream order (the torch side hands out
// a tensor from the caching allocator, which keeps that safe).
struct Workspace {
  void* (*alloc)(void* ctx, size_t bytes);
  void* ctx;
};

// The per-channel finalize of a BN: invstd = 1/sqrt(var + eps), scale = weight*invstd
// (invstd without weight), shift = bias (0 without): the centred apply's vectors. IEEE
// division and square root, no contraction: bitwise the CPU pipeline's loop. weight and
// bias are nullable; the outputs are not.
template <typename acc>
struct Finalize {
  const acc *weight, *bias;  // (C,) inputs, nullable
  acc eps;
  acc *invstd, *scale, *shift;  // (C,) outputs
};

// The per-channel coefficients of the input gradient from the backward sums:
// coef_xc = -scale*invstd*invstd*sum_g_xc/count and coef_c = -scale*sum_g/count when
// training (0 and 0 in eval), dweight = sum_g_xc*invstd (nullable).
template <typename acc>
struct Coefficients {
  const acc *scale, *invstd;  // (C,) inputs
  acc count;
  bool training;
  acc *coef_xc, *coef_c, *dweight;  // (C,) outputs, dweight nullable
};

// mean[c], var[c] (biased) over (N, S). Welford per thread, Chan merges, per-block
// partials in the workspace, merged in a fixed order: bitwise reproducible. With `fin`
// (nullable) the merge kernel also finalizes: two launches in all.
template <typename T>
void launch_bn_stats(const T* x, Strides3 xs, Shape3 shape, acc_t<T>* mean, acc_t<T>* var,
                     const Finalize<acc_t<T>>* fin, Workspace ws, cudaStream_t stream);

// Finalize alone (eval mode, backward): one launch.
template <typename acc>
void launch_bn_finalize(const acc* mean, const acc* var, Finalize<acc> fin, int64_t C,
                        cudaStream_t stream);

// running <- running + f*(batch - running) if |f| < 0.5 else batch - (batch - running)*(1 - f),
// both statistics in one launch; f = 1/num_batches_tracked[0] when that pointer is not
// null (read on the device), else momentum; the variance's batch value is
// var*var_correction. Running statistics in the acc dtype, strided; one rounding per
// operation (fusedres.ops.update_running_stats_reference, bit for bit).
template <typename acc>
void launch_running_stats_update(acc* running_mean, int64_t mean_stride, acc* running_var,
                                 int64_t var_stride, const acc* mean, const acc* var,
                                 acc var_correction, acc momentum,
                                 const int64_t* num_batches_tracked, int64_t C,
                                 cudaStream_t stream);

// out = [relu]((x - mean)*scale + shift [+ (x2 - mean2)*scale2 + shift2] [+ residual]),
// dense in the layout `channels_last`; mask (nullable) receives the packed ReLU mask
// (relu must be true). residual, x2 (with mean2, scale2, shift2) are nullable.
template <typename T>
void launch_bn_apply(const T* x, Strides3 xs, const acc_t<T>* mean, const acc_t<T>* scale,
                     const acc_t<T>* shift, const T* residual, Strides3 rs, const T* x2,
                     Strides3 x2s, const acc_t<T>* mean2, const acc_t<T>* scale2,
                     const acc_t<T>* shift2, bool relu, T* out, uint8_t* mask, Shape3 shape,
                     bool channels_last, int num_sms, cudaStream_t stream);

// sum_g[c] = sum(g), sum_g_xc[c] = sum(g*(x - mean)) with g = dout * passes; passes from
// mask (nullable, packed in the layout `channels_last`) if given, else recomputed as
// !((x - mean)*scale + shift <= 0) when relu, else all true. Deterministic as bn_stats.
// With `coef` (nullable) the merge kernel also computes the coefficients: two launches.
template <typename T>
void launch_bn_backward_reduce(const T* dout, Strides3 ds, const T* x, Strides3 xs,
                               const acc_t<T>* mean, const acc_t<T>* scale,
                               const acc_t<T>* shift, const uint8_t* mask, bool relu,
                               Shape3 shape, bool channels_last, acc_t<T>* sum_g,
                               acc_t<T>* sum_g_xc, const Coefficients<acc_t<T>>* coef,
                               Workspace ws, cudaStream_t stream);

// dx = coef_g*g + coef_xc*(x - mean) + coef_c and, when dres is not null, dres = g;
// g as in launch_bn_backward_reduce; dx and dres dense in the layout `channels_last`.
template <typename T>
void launch_bn_backward_apply(const T* dout, Strides3 ds, const T* x, Strides3 xs,
                              const acc_t<T>* mean, const acc_t<T>* scale,
                              const acc_t<T>* shift, const uint8_t* mask,
                              const acc_t<T>* coef_g, const acc_t<T>* coef_xc,
                              const acc_t<T>* coef_c, bool relu, T* dx, T* dres,
                              Shape3 shape, bool channels_last, int num_sms,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedres
