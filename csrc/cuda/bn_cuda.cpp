// CUDA implementations of the fusedres primitives (bn_stats, bn_apply,
// bn_backward_reduce, bn_backward_apply): input checks, output allocation, dtype
// dispatch and registration under the CUDA key. The kernels are in bn_kernels.cu; the
// contract is fusedres/reference.py.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>
#include <tuple>

#include "cuda/bn_kernels.h"

namespace fusedres {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kMaxDim = int64_t(1) << 30;  // kernels index N, C, S in 32 bits

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_act(const Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "fusedres::", op, " (CUDA): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "fusedres::", op, ": x must be 3-D (N, C, S), got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "fusedres::", op, ": x must be float32, float64, float16 or bfloat16, got ", t);
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(x.size(d) < kMaxDim, "fusedres::", op, ": each of N, C, S must be < 2^30, got ",
                x.sizes());
  }
}

// Another (N, C, S) activation read alongside x.
void check_like(const Tensor& t, const Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fusedres::", op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.sizes() == x.sizes(), "fusedres::", op, ": ", name, " has shape ", t.sizes(),
              ", expected x's shape ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fusedres::", op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected x's dtype ", x.scalar_type());
}

// A per-channel vector: C elements of the accumulation dtype, on x's device. Returns it
// contiguous.
Tensor channel_vec(const Tensor& v, const Tensor& x, const char* op, const char* name) {
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(v.device() == x.device(), "fusedres::", op, ": ", name, " is on ", v.device(),
              " but x is on ", x.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "fusedres::", op, ": ", name,
              " must have shape (C,) = (", x.size(1), ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc, "fusedres::", op, ": ", name, " must be ", acc,
              " (the accumulation dtype of ", x.scalar_type(), " activations), got ",
              v.scalar_type());
  return v.contiguous();
}

// The optional packed mask: null when absent or empty (as the reference treats it).
std::optional<Tensor> mask_arg(const OptTensor& mask, const Tensor& x, const char* op) {
  if (!mask.has_value() || !mask->defined() || mask->numel() == 0) return std::nullopt;
  const Tensor& m = *mask;
  TORCH_CHECK(m.device() == x.device(), "fusedres::", op, ": mask is on ", m.device(),
              " but x is on ", x.device());
  TORCH_CHECK(m.scalar_type() == at::kByte, "fusedres::", op, ": mask must be uint8, got ",
              m.scalar_type());
  const int64_t bytes = (x.numel() + 7) / 8;
  TORCH_CHECK(m.numel() == bytes, "fusedres::", op, ": mask must hold ceil(N*C*S/8) = ", bytes,
              " bytes, got ", m.numel());
  return m.contiguous();
}

Tensor empty_ncs(const Tensor& x, bool channels_last) {
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2);
  if (channels_last) return at::empty({n, s, c}, x.options()).permute({0, 2, 1});
  return at::empty({n, c, s}, x.options());
}

Strides3 strides(const Tensor& t) { return Strides3{t.stride(0), t.stride(1), t.stride(2)}; }
Strides3 strides(const OptTensor& t) {
  return t.has_value() ? strides(*t) : Strides3{0, 0, 0};
}
Shape3 shape(const Tensor& x) { return Shape3{x.size(0), x.size(1), x.size(2)}; }

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Workspace from the caching allocator; kept alive by the caller until the launch is
// enqueued (later frees are stream-ordered).
struct WorkspaceHolder {
  at::TensorOptions opts;
  Tensor buf;
  static void* alloc(void* ctx, size_t bytes) {
    auto* self = static_cast<WorkspaceHolder*>(ctx);
    self->buf = at::empty({static_cast<int64_t>(bytes)}, self->opts.dtype(at::kByte));
    return self->buf.data_ptr();
  }
};

template <typename T>
const T* ptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
const T* ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? static_cast<const T*>(t->const_data_ptr()) : nullptr;
}
template <typename T>
T* mut_ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the CUDA element type of dtype t.
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kDouble: f(TypeTag<double>{}); break;
    case at::kHalf: f(TypeTag<__half>{}); break;
    case at::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, "fusedres: unsupported dtype ", t);
  }
}

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x, bool channels_last) {
  (void)channels_last;  // the traversal is chosen from x's strides
  check_act(x, "bn_stats");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc_type(x.scalar_type()));
  const int64_t C = x.size(1);
  if (x.numel() == 0) {  // no elements per channel: NaN, as torch.var_mean
    return {at::full({C}, NAN, opts), at::full({C}, NAN, opts)};
  }
  Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts);
  WorkspaceHolder holder{x.options(), Tensor()};
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    launch_bn_stats<T>(ptr<T>(x), strides(x), shape(x), mut_ptr<A>(mean), mut_ptr<A>(var),
                       nullptr, Workspace{&WorkspaceHolder::alloc, &holder},
                       at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor> bn_apply(const Tensor& x, const Tensor& mean, const Tensor& scale,
                                    const Tensor& shift, const OptTensor& residual,
                                    const OptTensor& x2, const OptTensor& mean2,
                                    const OptTensor& scale2, const OptTensor& shift2, bool relu,
                                    bool save_mask, bool channels_last) {
  const char* op = "bn_apply";
  check_act(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(!save_mask || relu, "fusedres::bn_apply: save_mask requires relu");
  const Tensor mn = channel_vec(mean, x, op, "mean");
  const Tensor sc = channel_vec(scale, x, op, "scale"), sh = channel_vec(shift, x, op, "shift");
  OptTensor res, x2v, mn2, sc2, sh2;
  if (residual.has_value() && residual->defined()) {
    check_like(*residual, x, op, "residual");
    res = *residual;
  }
  if (x2.has_value() && x2->defined()) {
    check_like(*x2, x, op, "x2");
    TORCH_CHECK(mean2.has_value() && mean2->defined() && scale2.has_value() &&
                    scale2->defined() && shift2.has_value() && shift2->defined(),
                "fusedres::bn_apply: x2 needs mean2, scale2 and shift2");
    x2v = *x2;
    mn2 = channel_vec(*mean2, x, op, "mean2");
    sc2 = channel_vec(*scale2, x, op, "scale2");
    sh2 = channel_vec(*shift2, x, op, "shift2");
  }
  Tensor out = empty_ncs(x, channels_last);
  Tensor mask = at::empty({save_mask ? (x.numel() + 7) / 8 : 0}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {out, mask};
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    launch_bn_apply<T>(ptr<T>(x), strides(x), ptr<A>(mn), ptr<A>(sc), ptr<A>(sh), ptr<T>(res),
                       strides(res), ptr<T>(x2v), strides(x2v), ptr<A>(mn2), ptr<A>(sc2),
                       ptr<A>(sh2), relu,
                       mut_ptr<T>(out), save_mask ? mut_ptr<uint8_t>(mask) : nullptr, shape(x),
                       channels_last, num_sms(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mask};
}

// The backward sums (sum_g, sum_g_xc) and, with `invstd`, the merge kernel's coefficients
// (coef_xc, coef_c, dweight; undefined tensors without it).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_sums(
    const char* op, const Tensor& dout, const Tensor& x, const Tensor& mean, const Tensor& scale,
    const Tensor& shift, const OptTensor& mask, bool relu, bool channels_last,
    const Tensor* invstd, double count, bool training) {
  check_act(x, op);
  check_like(dout, x, op, "dout");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor mn = channel_vec(mean, x, op, "mean");
  const Tensor sc = channel_vec(scale, x, op, "scale"), sh = channel_vec(shift, x, op, "shift");
  const Tensor is = invstd ? channel_vec(*invstd, x, op, "invstd") : Tensor();
  const OptTensor m = mask_arg(mask, x, op);
  const auto opts = x.options().dtype(acc_type(x.scalar_type()));
  const int64_t C = x.size(1);
  Tensor coef_xc, coef_c, dweight;
  if (invstd) {
    coef_xc = at::empty({C}, opts), coef_c = at::empty({C}, opts), dweight = at::empty({C}, opts);
  }
  if (x.numel() == 0) {
    if (invstd) coef_xc.zero_(), coef_c.zero_(), dweight.zero_();
    return {at::zeros({C}, opts), at::zeros({C}, opts), coef_xc, coef_c, dweight};
  }
  Tensor sum_g = at::empty({C}, opts), sum_g_xc = at::empty({C}, opts);
  WorkspaceHolder holder{x.options(), Tensor()};
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    Coefficients<A> coef{};
    if (invstd) {
      coef = Coefficients<A>{ptr<A>(sc), ptr<A>(is), static_cast<A>(count), training,
                             mut_ptr<A>(coef_xc), mut_ptr<A>(coef_c), mut_ptr<A>(dweight)};
    }
    launch_bn_backward_reduce<T>(ptr<T>(dout), strides(dout), ptr<T>(x), strides(x), ptr<A>(mn),
                                 ptr<A>(sc), ptr<A>(sh), ptr<uint8_t>(m), relu, shape(x),
                                 channels_last, mut_ptr<A>(sum_g), mut_ptr<A>(sum_g_xc),
                                 invstd ? &coef : nullptr,
                                 Workspace{&WorkspaceHolder::alloc, &holder},
                                 at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_g, sum_g_xc, coef_xc, coef_c, dweight};
}

std::tuple<Tensor, Tensor> bn_backward_reduce(const Tensor& dout, const Tensor& x,
                                              const Tensor& mean, const Tensor& scale,
                                              const Tensor& shift, const OptTensor& mask,
                                              bool relu, bool channels_last) {
  auto r = backward_sums("bn_backward_reduce", dout, x, mean, scale, shift, mask, relu,
                         channels_last, nullptr, 0.0, false);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<Tensor, Tensor> bn_backward_apply(const Tensor& dout, const Tensor& x,
                                             const Tensor& mean, const Tensor& scale,
                                             const Tensor& shift, const OptTensor& mask,
                                             const Tensor& coef_g, const Tensor& coef_xc,
                                             const Tensor& coef_c, bool relu,
                                             bool write_grad_residual, bool channels_last) {
  const char* op = "bn_backward_apply";
  check_act(x, op);
  check_like(dout, x, op, "dout");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor mn = channel_vec(mean, x, op, "mean");
  const Tensor sc = channel_vec(scale, x, op, "scale"), sh = channel_vec(shift, x, op, "shift");
  const Tensor cg = channel_vec(coef_g, x, op, "coef_g");
  const Tensor cxc = channel_vec(coef_xc, x, op, "coef_xc");
  const Tensor cc = channel_vec(coef_c, x, op, "coef_c");
  const OptTensor m = mask_arg(mask, x, op);
  Tensor dx = empty_ncs(x, channels_last);
  Tensor dres = write_grad_residual ? empty_ncs(x, channels_last) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dres};
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    launch_bn_backward_apply<T>(ptr<T>(dout), strides(dout), ptr<T>(x), strides(x), ptr<A>(mn),
                                ptr<A>(sc), ptr<A>(sh), ptr<uint8_t>(m), ptr<A>(cg),
                                ptr<A>(cxc), ptr<A>(cc), relu, mut_ptr<T>(dx),
                                write_grad_residual ? mut_ptr<T>(dres) : nullptr, shape(x),
                                channels_last, num_sms(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dres};
}

// ---- the per-channel steps of the fused pipeline (csrc/bn_fused.cpp) -------------------
//
// The finalize after the statistics and the coefficients after the backward sums run in
// the merge kernels of the reductions, the finalize alone and the running-statistics
// update in one small kernel each: a BN forward+backward in 8 launches (see
// tests/test_launch_count_cuda.py).

// An optional (C,) parameter in the acc dtype (weight, bias), or an undefined tensor.
Tensor param_vec(const OptTensor& p, const Tensor& like, const char* op, const char* name) {
  if (!p.has_value() || !p->defined()) return Tensor();
  TORCH_CHECK(p->device() == like.device(), "fusedres::", op, ": ", name, " is on ",
              p->device(), " but the statistics are on ", like.device());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == like.size(0), "fusedres::", op, ": ", name,
              " must have shape (C,) = (", like.size(0), ",), got ", p->sizes());
  return p->to(like.scalar_type()).contiguous();
}

template <typename A>
Finalize<A> finalize_args(const Tensor& w, const Tensor& b, double eps, Tensor& invstd,
                          Tensor& scale, Tensor& shift) {
  return Finalize<A>{w.defined() ? ptr<A>(w) : nullptr, b.defined() ? ptr<A>(b) : nullptr,
                     static_cast<A>(eps), mut_ptr<A>(invstd), mut_ptr<A>(scale),
                     mut_ptr<A>(shift)};
}

template <typename F>
void dispatch_acc(at::ScalarType t, F&& f) {
  if (t == at::kDouble) f(TypeTag<double>{});
  else f(TypeTag<float>{});
}

std::tuple<Tensor, Tensor, Tensor> bn_finalize(const Tensor& mean, const Tensor& var,
                                               const OptTensor& weight, const OptTensor& bias,
                                               double eps) {
  const char* op = "bn_finalize";
  TORCH_CHECK(mean.is_cuda() && var.device() == mean.device(), "fusedres::", op,
              ": mean and var must be on one CUDA device");
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes(), "fusedres::", op,
              ": mean and var must be (C,) vectors");
  const auto t = mean.scalar_type();
  TORCH_CHECK((t == at::kFloat || t == at::kDouble) && var.scalar_type() == t, "fusedres::", op,
              ": mean and var must both be float32 or float64");
  const c10::cuda::CUDAGuard guard(mean.device());
  const Tensor v = var.contiguous();
  const Tensor w = param_vec(weight, mean, op, "weight"), b = param_vec(bias, mean, op, "bias");
  Tensor invstd = at::empty_like(v), scale = at::empty_like(v), shift = at::empty_like(v);
  if (mean.numel() == 0) return {invstd, scale, shift};
  dispatch_acc(t, [&](auto tag) {
    using A = typename decltype(tag)::type;
    launch_bn_finalize<A>(nullptr, ptr<A>(v), finalize_args<A>(w, b, eps, invstd, scale, shift),
                          mean.numel(), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {invstd, scale, shift};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_stats_finalize(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps,
    bool channels_last) {
  const char* op = "bn_stats_finalize";
  check_act(x, op);
  if (x.numel() == 0) {  // NaN statistics, as bn_stats; then the finalize alone
    auto [mean, var] = bn_stats(x, channels_last);
    auto [invstd, scale, shift] = bn_finalize(mean, var, weight, bias, eps);
    return {mean, var, invstd, scale, shift};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc_type(x.scalar_type()));
  const int64_t C = x.size(1);
  Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts);
  Tensor invstd = at::empty({C}, opts), scale = at::empty({C}, opts), shift = at::empty({C}, opts);
  const Tensor w = param_vec(weight, mean, op, "weight"), b = param_vec(bias, mean, op, "bias");
  WorkspaceHolder holder{x.options(), Tensor()};
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const Finalize<A> fin = finalize_args<A>(w, b, eps, invstd, scale, shift);
    launch_bn_stats<T>(ptr<T>(x), strides(x), shape(x), mut_ptr<A>(mean), mut_ptr<A>(var), &fin,
                       Workspace{&WorkspaceHolder::alloc, &holder},
                       at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var, invstd, scale, shift};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_backward_reduce_finalize(
    const Tensor& dout, const Tensor& x, const Tensor& mean, const Tensor& scale,
    const Tensor& shift, const OptTensor& mask, const Tensor& invstd, bool relu,
    bool channels_last, double count, bool training) {
  return backward_sums("bn_backward_reduce_finalize", dout, x, mean, scale, shift, mask, relu,
                       channels_last, &invstd, count, training);
}

// The caller (update_running_stats, bn_fused.cpp) checked: running statistics 1-D in the
// acc dtype of mean/var, same length, not overlapping; num_batches_tracked int64.
void running_stats_update(Tensor running_mean, Tensor running_var, const Tensor& mean,
                          const Tensor& var, double var_correction, double momentum,
                          const OptTensor& num_batches_tracked) {
  const c10::cuda::CUDAGuard guard(mean.device());
  const Tensor m = mean.contiguous(), v = var.contiguous();
  const bool nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (m.numel() == 0) return;
  dispatch_acc(m.scalar_type(), [&](auto tag) {
    using A = typename decltype(tag)::type;
    launch_running_stats_update<A>(
        mut_ptr<A>(running_mean), running_mean.stride(0), mut_ptr<A>(running_var),
        running_var.stride(0), ptr<A>(m), ptr<A>(v), static_cast<A>(var_correction),
        static_cast<A>(momentum), nbt ? ptr<int64_t>(*num_batches_tracked) : nullptr, m.numel(),
        at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("bn_finalize", &fusedres::cuda::bn_finalize);
  m.impl("bn_stats_finalize", &fusedres::cuda::bn_stats_finalize);
  m.impl("bn_backward_reduce_finalize", &fusedres::cuda::bn_backward_reduce_finalize);
  m.impl("running_stats_update", &fusedres::cuda::running_stats_update);
  m.impl("bn_stats", &fusedres::cuda::bn_stats);
  m.impl("bn_apply", &fusedres::cuda::bn_apply);
  m.impl("bn_backward_reduce", &fusedres::cuda::bn_backward_reduce);
  m.impl("bn_backward_apply", &fusedres::cuda::bn_backward_apply);
}
