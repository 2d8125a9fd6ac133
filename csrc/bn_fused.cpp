// The fused BN pipeline on the C++/CUDA primitives, for the `cpu` and `cuda` backends:
//
//   bn_act_forward   statistics (or running statistics) -> finalize -> apply
//   bn_act_backward  per BN input: reduce -> coefficients -> elementwise
//   update_running_stats   running <- running + f*(batch - running), on the device
//
// This is fusedres/ops.py's `batch_norm_act` / `batch_norm_act_backward` pipeline with
// the per-call Python removed (a few dozen small tensor ops and a dispatch per
// primitive: ~100-300 us per call on CPU, more than the kernels of a 7x7 layer). The
// Python version stays the readable reference and runs the Triton primitives; tests
// compare the two. Same math: one `scale_shift` for forward and backward, so the ReLU
// mask recomputed in backward is bitwise the forward's.
//
// Device-generic: the primitives are called through the dispatcher (CPU or CUDA
// kernels by the tensors' device); registered under the CPU key, and the CUDA key when
// the CUDA kernels are built. Autograd and fake kernels are registered from Python.
// The CPU loops below evaluate the same expressions as the tensor ops they replace, one
// rounding per operation: no contraction into fused multiply-adds.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fusedres {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Pair = std::tuple<Tensor, Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- the primitives, by name (contract: fusedres/reference.py) -----------------------

// The op `name` through the dispatcher, typed as `Fn`: each caller below has the
// signature of the op's kernels and names itself (decltype) or the kernel.
template <typename Fn>
c10::TypedOperatorHandle<Fn> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

Pair bn_stats(const Tensor& x, bool channels_last) {
  static const auto op = typed_op<decltype(bn_stats)>("fusedres::bn_stats");
  return op.call(x, channels_last);
}

Pair bn_apply(const Tensor& x, const Tensor& mean, const Tensor& scale, const Tensor& shift,
              const OptTensor& residual, const OptTensor& x2, const OptTensor& mean2,
              const OptTensor& scale2, const OptTensor& shift2, bool relu, bool save_mask,
              bool channels_last) {
  static const auto op = typed_op<decltype(bn_apply)>("fusedres::bn_apply");
  return op.call(x, mean, scale, shift, residual, x2, mean2, scale2, shift2, relu, save_mask,
                 channels_last);
}

Pair bn_backward_reduce(const Tensor& dout, const Tensor& x, const Tensor& mean,
                        const Tensor& scale, const Tensor& shift, const OptTensor& mask, bool relu,
                        bool channels_last) {
  static const auto op = typed_op<decltype(bn_backward_reduce)>("fusedres::bn_backward_reduce");
  return op.call(dout, x, mean, scale, shift, mask, relu, channels_last);
}

Pair bn_backward_apply(const Tensor& dout, const Tensor& x, const Tensor& mean,
                       const Tensor& scale, const Tensor& shift, const OptTensor& mask,
                       const Tensor& coef_g, const Tensor& coef_xc, const Tensor& coef_c,
                       bool relu, bool write_grad_residual, bool channels_last) {
  static const auto op = typed_op<decltype(bn_backward_apply)>("fusedres::bn_backward_apply");
  return op.call(dout, x, mean, scale, shift, mask, coef_g, coef_xc, coef_c, relu,
                 write_grad_residual, channels_last);
}

// ---- finalize (fusedres.ops.centred_scale_shift / backward_coefficients) ------------
//
// A handful of (C,) vectors. On CPU tensors a plain loop: as ~20 small tensor ops they
// cost ~40 us per training step there, more than the kernels of a 7x7 layer. On CUDA the
// ops of csrc/cuda/bn_cuda.cpp: the finalize in the merge kernel of the statistics (or
// one kernel), the coefficients in the merge kernel of the backward sums -- a BN
// forward+backward in 8 launches, running statistics included, instead of ~30 (counted
// by tests/test_launch_count_cuda.py). Other devices: tensor ops. All evaluate the same
// expressions in the same order in the acc dtype, one rounding per operation.

// The per-channel ops of the CUDA pipeline, by name.
std::tuple<Tensor, Tensor, Tensor> bn_finalize_op(const Tensor& mean, const Tensor& var,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  double eps) {
  static const auto op = typed_op<decltype(bn_finalize_op)>("fusedres::bn_finalize");
  return op.call(mean, var, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_stats_finalize_op(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps,
    bool channels_last) {
  static const auto op =
      typed_op<decltype(bn_stats_finalize_op)>("fusedres::bn_stats_finalize");
  return op.call(x, weight, bias, eps, channels_last);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_backward_reduce_finalize_op(
    const Tensor& dout, const Tensor& x, const Tensor& mean, const Tensor& scale,
    const Tensor& shift, const OptTensor& mask, const Tensor& invstd, bool relu,
    bool channels_last, double count, bool training) {
  static const auto op = typed_op<decltype(bn_backward_reduce_finalize_op)>(
      "fusedres::bn_backward_reduce_finalize");
  return op.call(dout, x, mean, scale, shift, mask, invstd, relu, channels_last, count,
                 training);
}

// Whether the per-channel steps run as the CUDA ops above.
bool on_cuda(const Tensor& t) { return t.is_cuda(); }

struct ScaleShift {
  Tensor invstd, scale, shift;
};

// (C,) contiguous in the acc dtype, or an undefined tensor.
Tensor acc_vector(const OptTensor& t, const Tensor& like) {
  return given(t) ? t->to(like.scalar_type()).contiguous() : Tensor();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

ScaleShift scale_shift(const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
                       const Tensor& var, double eps) {
  ScaleShift r;
  if (on_cuda(mean)) {
    std::tie(r.invstd, r.scale, r.shift) = bn_finalize_op(mean, var, weight, bias, eps);
    return r;
  }
  if (!mean.is_cpu()) {
    r.invstd = at::rsqrt(var + eps);
    r.scale = given(weight) ? weight->to(mean.scalar_type()) * r.invstd : r.invstd;
    r.shift = given(bias) ? bias->to(mean.scalar_type()) : at::zeros_like(mean);
    return r;
  }
  const Tensor w = acc_vector(weight, mean), b = acc_vector(bias, mean);
  const Tensor v = var.contiguous();
  r.invstd = at::empty_like(v);
  r.scale = given(weight) ? at::empty_like(v) : r.invstd;
  r.shift = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "fusedres_scale_shift", [&] {
    const scalar_t *wp = ptr_or_null<scalar_t>(w), *bp = ptr_or_null<scalar_t>(b);
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t *ip = r.invstd.data_ptr<scalar_t>(), *sp = r.scale.data_ptr<scalar_t>();
    scalar_t* tp = r.shift.data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < v.numel(); ++c) {
      const scalar_t invstd = scalar_t(1) / std::sqrt(vp[c] + e);
      const scalar_t scale = wp ? wp[c] * invstd : invstd;
      ip[c] = invstd;
      sp[c] = scale;
      tp[c] = bp ? bp[c] : scalar_t(0);
    }
  });
  return r;
}

// (coef_xc, coef_c) of the training-mode input gradient
// dx = scale*(g - sum(g)/M - xhat*sum(g*xhat)/M) = scale*g + coef_xc*(x - mean) + coef_c.
Pair backward_coefficients(const ScaleShift& ss, const Tensor& sum_g, const Tensor& sum_g_xc,
                           double count) {
  if (!sum_g.is_cpu()) {
    return {-ss.scale * ss.invstd * ss.invstd * sum_g_xc / count, -ss.scale * sum_g / count};
  }
  Tensor coef_xc = at::empty_like(ss.scale), coef_c = at::empty_like(ss.scale);
  AT_DISPATCH_FLOATING_TYPES(ss.scale.scalar_type(), "fusedres_backward_coefficients", [&] {
    const scalar_t *sp = ss.scale.const_data_ptr<scalar_t>();
    const scalar_t *ip = ss.invstd.const_data_ptr<scalar_t>();
    const scalar_t *gp = sum_g.const_data_ptr<scalar_t>();
    const scalar_t *gxp = sum_g_xc.const_data_ptr<scalar_t>();
    scalar_t *xcp = coef_xc.data_ptr<scalar_t>(), *cp = coef_c.data_ptr<scalar_t>();
    const auto m = static_cast<scalar_t>(count);
    for (int64_t c = 0; c < coef_c.numel(); ++c) {
      xcp[c] = -sp[c] * ip[c] * ip[c] * gxp[c] / m;
      cp[c] = -sp[c] * gp[c] / m;
    }
  });
  return {coef_xc, coef_c};
}

// a*b of two (C,) vectors (dweight = sum_g_xc * invstd).
Tensor product(const Tensor& a, const Tensor& b) {
  if (!a.is_cpu() || !a.is_contiguous() || !b.is_contiguous()) return a * b;
  Tensor out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fusedres_product", [&] {
    const scalar_t *ap = a.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t c = 0; c < a.numel(); ++c) op[c] = ap[c] * bp[c];
  });
  return out;
}

Tensor nothing(const Tensor& x) { return at::empty({0}, x.options()); }

Pair batch_or_running_stats(const Tensor& x, const OptTensor& mean_in, const OptTensor& var_in,
                            bool training, bool channels_last) {
  if (training) return bn_stats(x, channels_last);
  TORCH_CHECK(given(mean_in) && given(var_in),
              "fusedres::bn_act_forward: eval mode needs running_mean and running_var");
  const auto acc = acc_dtype(x);
  return {mean_in->to(acc, /*non_blocking=*/false, /*copy=*/true),
          var_in->to(acc, /*non_blocking=*/false, /*copy=*/true)};
}

// Statistics (batch or running) and their finalize; on CUDA in training one op (two
// launches: the reduction, then the merge that finalizes).
std::tuple<Tensor, Tensor, ScaleShift> stats_and_finalize(
    const Tensor& x3, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean_in,
    const OptTensor& var_in, bool training, double eps, bool channels_last) {
  if (training && on_cuda(x3)) {
    auto [mean, var, invstd, scale, shift] =
        bn_stats_finalize_op(x3, weight, bias, eps, channels_last);
    return {mean, var, ScaleShift{invstd, scale, shift}};
  }
  auto [mean, var] = batch_or_running_stats(x3, mean_in, var_in, training, channels_last);
  return {mean, var, scale_shift(weight, bias, mean, var, eps)};
}

// ---- forward ------------------------------------------------------------------------

// (N, C, *spatial) -> (N, C, S): a view whenever the strides allow (as ops.ncs).
Tensor ncs(const Tensor& t) {
  const auto sizes = t.sizes();
  const int64_t s = c10::multiply_integers(sizes.begin() + 2, sizes.end());
  return t.reshape({sizes[0], sizes[1], s});
}
OptTensor ncs(const OptTensor& t) { return given(t) ? OptTensor(ncs(*t)) : std::nullopt; }

// Outputs are written channels-last when the input is laid out that way.
bool is_channels_last(const Tensor& x3) {
  return x3.size(1) > 1 && x3.size(2) > 1 && x3.stride(1) < x3.stride(2);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_act_forward(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean_in,
    const OptTensor& var_in, const OptTensor& residual, const OptTensor& x2,
    const OptTensor& weight2, const OptTensor& bias2, const OptTensor& mean2_in,
    const OptTensor& var2_in, bool training, double eps, bool relu) {
  TORCH_CHECK(x.dim() >= 2, "fusedres::bn_act_forward: x must have 2 or more dims, got ",
              x.dim());
  const Tensor x3 = ncs(x);
  const OptTensor x2_3 = ncs(x2);
  const bool channels_last = is_channels_last(x3);
  auto [mean, var, ss] = stats_and_finalize(x3, weight, bias, mean_in, var_in, training, eps,
                                            channels_last);
  Tensor mean2, var2;
  OptTensor scale2, shift2;
  if (given(x2)) {
    ScaleShift ss2;
    std::tie(mean2, var2, ss2) = stats_and_finalize(*x2_3, weight2, bias2, mean2_in, var2_in,
                                                    training, eps, channels_last);
    scale2 = ss2.scale;
    shift2 = ss2.shift;
  } else {  // outputs of an op may not alias each other: two distinct empties
    mean2 = nothing(mean);
    var2 = nothing(mean);
  }
  const bool save_mask = relu && (given(residual) || given(x2));
  const OptTensor centre2 = given(x2) ? OptTensor(mean2) : std::nullopt;
  auto [out, mask] = bn_apply(x3, mean, ss.scale, ss.shift, ncs(residual), x2_3, centre2, scale2,
                              shift2, relu, save_mask, channels_last);
  return {out.view(x.sizes()), mean, var, mean2, var2, mask};
}

// ---- backward -----------------------------------------------------------------------

// Gradients of one BN input: (dx, dweight, dbias, dres); empty where not needed.
std::tuple<Tensor, Tensor, Tensor, Tensor> input_backward(
    const Tensor& dout, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const Tensor& mean, const Tensor& var, const OptTensor& mask, bool training, double eps,
    bool relu, bool write_grad_residual, bool channels_last, bool need_dx, bool need_affine) {
  const ScaleShift ss = scale_shift(weight, bias, mean, var, eps);
  const double count = static_cast<double>(x.size(0) * x.size(2));
  Tensor sum_g, sum_g_xc, coef_xc, coef_c, dweight_acc;
  if (on_cuda(x) && (training || need_affine)) {  // the sums and the coefficients: one op
    std::tie(sum_g, sum_g_xc, coef_xc, coef_c, dweight_acc) = bn_backward_reduce_finalize_op(
        dout, x, mean, ss.scale, ss.shift, mask, ss.invstd, relu, channels_last, count,
        training);
  } else if (training || need_affine) {
    std::tie(sum_g, sum_g_xc) =
        bn_backward_reduce(dout, x, mean, ss.scale, ss.shift, mask, relu, channels_last);
  }
  Tensor dweight = nothing(x);
  if (need_affine && given(weight)) {
    if (!dweight_acc.defined()) dweight_acc = product(sum_g_xc, ss.invstd);
    dweight = dweight_acc.to(weight->scalar_type());
  }
  Tensor dbias = need_affine && given(bias) ? sum_g.to(bias->scalar_type()) : nothing(x);
  if (!(need_dx || write_grad_residual)) return {nothing(x), dweight, dbias, nothing(x)};
  if (!coef_xc.defined()) {  // not already computed with the sums
    if (training) {
      std::tie(coef_xc, coef_c) = backward_coefficients(ss, sum_g, sum_g_xc, count);
    } else {
      coef_xc = at::zeros_like(ss.scale);
      coef_c = at::zeros_like(ss.scale);
    }
  }
  auto [dx, dres] = bn_backward_apply(dout, x, mean, ss.scale, ss.shift, mask, ss.scale, coef_xc,
                                      coef_c, relu, write_grad_residual, channels_last);
  return {dx, dweight, dbias, dres};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_act_backward(
    const Tensor& dout, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
    const Tensor& mean, const Tensor& var, const OptTensor& mask, const OptTensor& x2,
    const OptTensor& weight2, const OptTensor& bias2, const OptTensor& mean2,
    const OptTensor& var2, bool training, double eps, bool relu, bool has_residual,
    std::array<bool, 5> needs) {
  const auto [need_dx, need_affine, need_res, need_dx2, need_affine2] = needs;
  const Tensor x3 = ncs(x), dout3 = ncs(dout);
  const bool channels_last = is_channels_last(x3);
  const OptTensor m = given(mask) && mask->numel() > 0 ? mask : std::nullopt;
  auto [dx, dweight, dbias, dres] =
      input_backward(dout3, x3, weight, bias, mean, var, m, training, eps, relu,
                     need_res && has_residual, channels_last, need_dx, need_affine);
  Tensor dx2 = nothing(x), dweight2 = nothing(x), dbias2 = nothing(x);
  if (given(x2) && (need_dx2 || need_affine2)) {
    TORCH_CHECK(given(mean2) && given(var2), "fusedres::bn_act_backward: x2 needs mean2, var2");
    std::tie(dx2, dweight2, dbias2, std::ignore) =
        input_backward(dout3, ncs(*x2), weight2, bias2, *mean2, *var2, m, training, eps, relu,
                       false, channels_last, need_dx2, need_affine2);
  }
  const auto full = [&](const Tensor& t) { return t.numel() ? t.view(x.sizes()) : t; };
  return {full(dx), dweight, dbias, full(dres), full(dx2), dweight2, dbias2};
}

// ---- autograd -----------------------------------------------------------------------
//
// In C++ rather than with torch.library.register_autograd: the Python autograd wrapper
// and a Python backward op cost ~250 us per training step of a BN on CPU, more than the
// kernels of a 14x14 layer. Same formula as fusedres/ops.py's `_backward`.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kTensorArgs = 11;  // x .. var2_in, in schema order
enum Arg { kX, kWeight, kBias, kMeanIn, kVarIn, kResidual, kX2, kWeight2, kBias2 };

struct BnActFunction : public torch::autograd::Function<BnActFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& mean_in,
                               const OptTensor& var_in, const OptTensor& residual,
                               const OptTensor& x2, const OptTensor& weight2,
                               const OptTensor& bias2, const OptTensor& mean2_in,
                               const OptTensor& var2_in, bool training, double eps, bool relu) {
    // Edge index of each tensor argument: torch counts only the ones given.
    const std::array<const OptTensor*, kTensorArgs - 1> opt = {
        &weight, &bias, &mean_in, &var_in, &residual, &x2, &weight2, &bias2, &mean2_in,
        &var2_in};
    std::vector<int64_t> edge(kTensorArgs, -1);
    edge[kX] = 0;
    int64_t next = 1;
    for (int i = 1; i < kTensorArgs; ++i) {
      if (given(*opt[i - 1])) edge[i] = next++;
    }
    static const auto op = typed_op<decltype(bn_act_forward)>("fusedres::bn_act_forward");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, mean, var, mean2, var2, mask] =
        op.call(x, weight, bias, mean_in, var_in, residual, x2, weight2, bias2, mean2_in,
                var2_in, training, eps, relu);
    const Tensor none;
    ctx->save_for_backward({x, weight.value_or(none), bias.value_or(none), mean, var, mask,
                            x2.value_or(none), weight2.value_or(none), bias2.value_or(none),
                            mean2, var2});
    ctx->saved_data["edge"] = c10::IValue(edge);
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_residual"] = given(residual);
    ctx->mark_non_differentiable({mean, var, mean2, var2, mask});
    ctx->set_materialize_grads(false);  // no zero tensors for the statistics' gradients
    return {out, mean, var, mean2, var2, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto edge = ctx->saved_data["edge"].toIntVector();
    const auto need = [&](Arg a) { return edge[a] >= 0 && ctx->needs_input_grad(edge[a]); };
    const std::array<bool, 5> needs = {need(kX), need(kWeight) || need(kBias), need(kResidual),
                                       need(kX2), need(kWeight2) || need(kBias2)};
    variable_list result(kTensorArgs + 3);  // undefined: no gradient
    const Tensor& dout = grads[0];
    if (!dout.defined() || !(needs[0] || needs[1] || needs[2] || needs[3] || needs[4])) {
      return result;
    }
    const auto s = ctx->get_saved_variables();
    const auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    static const auto op = typed_op<decltype(bn_act_backward)>("fusedres::bn_act_backward");
    // create_graph=True (gradient penalties): through the dispatcher's autograd key, where
    // fusedres/functional.py registers the backward op's derivative (the reference
    // composite). Otherwise straight to the kernel: the autograd layer of a backward op
    // costs ~30 us per call for nothing when no second-order graph is recorded.
    const bool create_graph =
        at::GradMode::is_enabled() &&
        (dout.requires_grad() ||
         std::any_of(s.begin(), s.end(), [](const Tensor& t) { return t.requires_grad(); }));
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!create_graph) below.emplace();
    auto [dx, dweight, dbias, dres, dx2, dweight2, dbias2] = op.call(
        dout, s[0], opt(s[1]), opt(s[2]), s[3], s[4], opt(s[5]), opt(s[6]), opt(s[7]),
        opt(s[8]), opt(s[9]), opt(s[10]), ctx->saved_data["training"].toBool(),
        ctx->saved_data["eps"].toDouble(), ctx->saved_data["relu"].toBool(),
        ctx->saved_data["has_residual"].toBool(), needs);
    const auto keep = [&](Arg a, const Tensor& g) { if (need(a)) result[a] = g; };
    keep(kX, dx);
    keep(kWeight, dweight);
    keep(kBias, dbias);
    keep(kResidual, dres);
    keep(kX2, dx2);
    keep(kWeight2, dweight2);
    keep(kBias2, dbias2);
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_act_forward_autograd(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean_in,
    const OptTensor& var_in, const OptTensor& residual, const OptTensor& x2,
    const OptTensor& weight2, const OptTensor& bias2, const OptTensor& mean2_in,
    const OptTensor& var2_in, bool training, double eps, bool relu) {
  auto r = BnActFunction::apply(x, weight, bias, mean_in, var_in, residual, x2, weight2, bias2,
                                mean2_in, var2_in, training, eps, relu);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

// ---- running statistics -------------------------------------------------------------
//
// running <- running + f*(batch - running)        when |f| < 0.5
//            batch - (batch - running)*(1 - f)    otherwise (exact at f = 1)
// with f = momentum, or 1/num_batches_tracked (momentum=None), and the variance's batch
// value var * var_correction (Bessel's M/(M-1)), in the acc dtype, stored rounded to the
// running statistics' dtype. On CPU a plain loop, one rounding per operation
// (fusedres.ops.update_running_stats_reference, bit for bit): as tensor ops the update
// cost ~30 us in a training step of a 7x7 layer there -- each op's code cold in the cache
// after the layer's data went through -- more than the layer's statistics kernel.
// Elsewhere torch.lerp (one kernel per statistic, launched asynchronously; the same
// formula, whose multiply-add the device compiler may fuse).

// The loop takes the common case; anything unusual goes to the tensor ops, whose checks
// raise before anything is written (overlapping or grad-requiring running statistics,
// inference tensors outside inference mode, other dtypes, sizes or devices).
bool update_on_cpu(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                   const Tensor& var, const OptTensor& num_batches_tracked) {
  const auto acc = mean.scalar_type();
  for (const Tensor* t : {&running_mean, &running_var, &mean, &var}) {
    if (!t->is_cpu() || t->dim() != 1 || t->numel() != mean.numel()) return false;
  }
  for (const Tensor* t : {&running_mean, &running_var}) {
    const auto dtype = t->scalar_type();
    if (!(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
          dtype == at::kBFloat16) ||
        t->requires_grad() || t->is_inference() ||
        (t->stride(0) == 0 && t->numel() > 1)) {  // 1-D: overlaps only when expanded
      return false;
    }
  }
  return (acc == at::kFloat || acc == at::kDouble) && var.scalar_type() == acc &&
         (!given(num_batches_tracked) || num_batches_tracked->is_cpu());
}

// CUDA, one kernel for both statistics: running statistics in the acc dtype (1-D, not
// expanded, no autograd), num_batches_tracked int64 on the device. Anything else: lerp.
bool update_on_cuda(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean,
                    const Tensor& var, const OptTensor& num_batches_tracked) {
  const auto acc = mean.scalar_type();
  if (!(acc == at::kFloat || acc == at::kDouble) || !on_cuda(mean)) return false;
  for (const Tensor* t : {&running_mean, &running_var, &mean, &var}) {
    if (t->device() != mean.device() || t->dim() != 1 || t->numel() != mean.numel() ||
        t->scalar_type() != acc) {
      return false;
    }
  }
  for (const Tensor* t : {&running_mean, &running_var}) {
    if (t->requires_grad() || t->is_inference() || (t->stride(0) == 0 && t->numel() > 1)) {
      return false;
    }
  }
  return !given(num_batches_tracked) ||
         (num_batches_tracked->device() == mean.device() &&
          num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1);
}

template <typename acc_t>
void update_loop_cpu(Tensor& running, const Tensor& batch_t, acc_t f, acc_t correction) {
  const Tensor batch = batch_t.contiguous();
  const acc_t* bp = batch.const_data_ptr<acc_t>();
  const int64_t n = batch.numel(), stride = running.stride(0);
  const bool small = std::abs(f) < acc_t(0.5);
  const acc_t one_minus_f = acc_t(1) - f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(),
                                  "fusedres_update_running_stats", [&] {
    scalar_t* rp = running.data_ptr<scalar_t>();
    for (int64_t c = 0; c < n; ++c) {
      const acc_t r = static_cast<acc_t>(rp[c * stride]);
      const acc_t b = correction == acc_t(1) ? bp[c] : bp[c] * correction;
      const acc_t d = b - r;
      rp[c * stride] = static_cast<scalar_t>(small ? r + f * d : b - d * one_minus_f);
    }
  });
  // As an in-place tensor op would: autograd refuses graphs that saved the old values.
  torch::autograd::impl::bump_version(running);
}

void update_running_stats(Tensor running_mean, Tensor running_var, const Tensor& mean,
                          const Tensor& var, double var_correction, double momentum,
                          const OptTensor& num_batches_tracked) {
  // On the device, no host sync: capturable in a CUDA graph.
  const auto acc = mean.scalar_type();
  if (update_on_cpu(running_mean, running_var, mean, var, num_batches_tracked)) {
    AT_DISPATCH_FLOATING_TYPES(acc, "fusedres_update_running_stats", [&] {
      using acc_t = scalar_t;
      const acc_t f = given(num_batches_tracked)
          ? acc_t(1) / static_cast<acc_t>(num_batches_tracked->item<double>())
          : static_cast<acc_t>(momentum);
      update_loop_cpu<acc_t>(running_mean, mean, f, acc_t(1));
      update_loop_cpu<acc_t>(running_var, var, f, static_cast<acc_t>(var_correction));
    });
    return;
  }
  if (update_on_cuda(running_mean, running_var, mean, var, num_batches_tracked)) {
    static const auto op =
        typed_op<decltype(update_running_stats)>("fusedres::running_stats_update");
    op.call(running_mean, running_var, mean, var, var_correction, momentum, num_batches_tracked);
    torch::autograd::impl::bump_version(running_mean);
    torch::autograd::impl::bump_version(running_var);
    return;
  }
  const Tensor factor = given(num_batches_tracked)
                            ? at::reciprocal(num_batches_tracked->to(acc)) : Tensor();
  const Tensor var_batch = var_correction == 1.0 ? var : var * var_correction;
  for (auto [running, batch] :
       {std::pair{running_mean, mean}, std::pair{running_var, var_batch}}) {
    // Half running statistics are updated in the acc dtype and stored rounded.
    Tensor r = running.scalar_type() == acc ? running : running.to(acc);
    if (factor.defined()) r.lerp_(batch, factor);
    else r.lerp_(batch, momentum);
    if (!r.is_same(running)) running.copy_(r);
  }
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, Autograd, m) {
  m.impl("bn_act_forward", &fusedres::bn_act_forward_autograd);
}

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("bn_act_forward", &fusedres::bn_act_forward);
  m.impl("bn_act_backward", &fusedres::bn_act_backward);
}

#ifdef FUSEDRES_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("bn_act_forward", &fusedres::bn_act_forward);
  m.impl("bn_act_backward", &fusedres::bn_act_backward);
}
#endif

// Shapes of the CUDA pipeline's per-channel ops (fake tensors: torch.compile, and the
// launch count of tests/test_launch_count_cuda.py).
namespace fusedres {
namespace {
Tensor channel_like(const Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(acc_dtype(x)));
}
std::tuple<Tensor, Tensor, Tensor> bn_finalize_meta(const Tensor& mean, const Tensor& var,
                                                    const OptTensor&, const OptTensor&, double) {
  return {at::empty_like(var), at::empty_like(var), at::empty_like(var)};
}
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_stats_finalize_meta(
    const Tensor& x, const OptTensor&, const OptTensor&, double, bool) {
  return {channel_like(x), channel_like(x), channel_like(x), channel_like(x), channel_like(x)};
}
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_backward_reduce_finalize_meta(
    const Tensor&, const Tensor& x, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, const Tensor&, bool, bool, double, bool) {
  return {channel_like(x), channel_like(x), channel_like(x), channel_like(x), channel_like(x)};
}
void running_stats_update_meta(Tensor, Tensor, const Tensor&, const Tensor&, double, double,
                               const OptTensor&) {}
}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, Meta, m) {
  m.impl("bn_finalize", &fusedres::bn_finalize_meta);
  m.impl("bn_stats_finalize", &fusedres::bn_stats_finalize_meta);
  m.impl("bn_backward_reduce_finalize", &fusedres::bn_backward_reduce_finalize_meta);
  m.impl("running_stats_update", &fusedres::running_stats_update_meta);
}

// Plain tensor math, correct on any device and under fake tensors (torch.compile).
TORCH_LIBRARY_IMPL(fusedres, CompositeExplicitAutograd, m) {
  m.impl("update_running_stats", &fusedres::update_running_stats);
}
