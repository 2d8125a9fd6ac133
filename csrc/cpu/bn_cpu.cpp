// CPU implementations of the fusedres BN primitives: input checks, output allocation,
// choice of the instruction set, registration under the CPU dispatch key.
// The contract is fusedres/reference.py; the kernels are in bn_cpu_kernels.h.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "cpu/bn_cpu.h"

namespace fusedres::cpu {
namespace {

using at::Tensor;

// The widest kernels this processor runs, no wider than torch's own CPU capability (so
// ATEN_CPU_CAPABILITY=avx2 caps both), nor than FUSEDRES_CPU_ISA=default|avx2|avx512 (a
// cap for testing and measuring each set; read per call).
enum class Isa { kDefault, kAvx2, kAvx512 };

Isa pick_isa() {
#ifdef FUSEDRES_HAVE_X86_KERNELS
  static const Isa widest = [] {
    const std::string torch_cap = at::get_cpu_capability();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    if (avx512 && torch_cap == "AVX512") return Isa::kAvx512;
    if (avx2 && torch_cap != "DEFAULT") return Isa::kAvx2;
    return Isa::kDefault;
  }();
  const char* env = std::getenv("FUSEDRES_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "default") == 0) return Isa::kDefault;
  if (env != nullptr && std::strcmp(env, "avx2") == 0) return std::min(widest, Isa::kAvx2);
  return widest;
#else
  return Isa::kDefault;
#endif
}

// The instruction set the kernels run with now: "avx512", "avx2" or "default".
std::string cpu_isa() {
  switch (pick_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

#ifdef FUSEDRES_HAVE_X86_KERNELS
#define FUSEDRES_CALL(fn, dtype, args)                                   \
  switch (pick_isa()) {                                                  \
    case Isa::kAvx512: isa_avx512::fn(dtype, args); break;               \
    case Isa::kAvx2: isa_avx2::fn(dtype, args); break;                   \
    default: isa_default::fn(dtype, args); break;                        \
  }
#else
#define FUSEDRES_CALL(fn, dtype, args) isa_default::fn(dtype, args)
#endif

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor empty_ncs(int64_t n, int64_t c, int64_t s, bool channels_last,
                 const at::TensorOptions& opts) {
  if (channels_last) return at::empty({n, s, c}, opts).permute({0, 2, 1});
  return at::empty({n, c, s}, opts);
}

Ncs view_of(const Tensor& t) {
  Ncs v;
  v.data = t.data_ptr();
  v.sN = t.stride(0);
  v.sC = t.stride(1);
  v.sS = t.stride(2);
  return v;
}

Shape shape_of(const Tensor& x) { return Shape{x.size(0), x.size(1), x.size(2)}; }

void check_activation(const Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3, "fusedres::", op, ": x must be a 3-D (N, C, S) tensor, got ",
              x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), "fusedres::", op, ": x must be a CPU tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "fusedres::", op, ": x must be float, double, half or bfloat16, got ", t);
}

void check_like_x(const Tensor& t, const Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(t.device() == x.device(), "fusedres::", op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.sizes() == x.sizes(), "fusedres::", op, ": ", name, " must have x's shape ",
              x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fusedres::", op, ": ", name,
              " must have x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
}

// A per-channel vector: (C,) on x's device in the acc dtype; returned dense.
Tensor channel_vector(const Tensor& v, const Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(v.device() == x.device(), "fusedres::", op, ": ", name, " is on ", v.device(),
              " but x is on ", x.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "fusedres::", op, ": ", name,
              " must be a (C,) vector with C = ", x.size(1), ", got shape ", v.sizes());
  const auto acc = acc_dtype(x.scalar_type());
  TORCH_CHECK(v.scalar_type() == acc, "fusedres::", op, ": ", name, " must be ", acc,
              " (the accumulation dtype of ", x.scalar_type(), " activations), got ",
              v.scalar_type());
  return v.contiguous();
}

// The mask if one is given with elements, else an undefined tensor.
Tensor checked_mask(const std::optional<Tensor>& mask, const Tensor& x, const char* op) {
  if (!mask.has_value() || !mask->defined() || mask->numel() == 0) return Tensor();
  const Tensor& m = *mask;
  TORCH_CHECK(m.device() == x.device(), "fusedres::", op, ": mask is on ", m.device(),
              " but x is on ", x.device());
  TORCH_CHECK(m.scalar_type() == at::kByte, "fusedres::", op, ": mask must be uint8, got ",
              m.scalar_type());
  const int64_t want = (x.numel() + 7) / 8;
  TORCH_CHECK(m.numel() == want, "fusedres::", op, ": mask must have ceil(N*C*S/8) = ", want,
              " bytes, got ", m.numel());
  return m.contiguous();
}

// ---- bn_stats -----------------------------------------------------------------------

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x, bool channels_last) {
  (void)channels_last;  // the traversal is chosen from x's strides
  check_activation(x, "bn_stats");
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const int64_t C = x.size(1);
  if (x.size(0) * x.size(2) == 0 || C == 0) {
    return {at::zeros({C}, opts), at::zeros({C}, opts)};
  }
  Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts);
  StatsArgs a;
  a.sh = shape_of(x);
  a.x = view_of(x);
  a.mean = mean.data_ptr();
  a.var = var.data_ptr();
  FUSEDRES_CALL(bn_stats, x.scalar_type(), a);
  return {mean, var};
}

// ---- bn_apply -----------------------------------------------------------------------

std::tuple<Tensor, Tensor> bn_apply(const Tensor& x, const Tensor& mean, const Tensor& scale,
                                    const Tensor& shift, const std::optional<Tensor>& residual,
                                    const std::optional<Tensor>& x2,
                                    const std::optional<Tensor>& mean2,
                                    const std::optional<Tensor>& scale2,
                                    const std::optional<Tensor>& shift2, bool relu,
                                    bool save_mask, bool channels_last) {
  const char* op = "bn_apply";
  check_activation(x, op);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  Tensor mn = channel_vector(mean, x, "mean", op);
  Tensor sc = channel_vector(scale, x, "scale", op);
  Tensor sh = channel_vector(shift, x, "shift", op);
  const bool has_res = residual.has_value() && residual->defined();
  const bool has_x2 = x2.has_value() && x2->defined();
  if (has_res) check_like_x(*residual, x, "residual", op);
  Tensor mn2, sc2, sh2;
  if (has_x2) {
    check_like_x(*x2, x, "x2", op);
    TORCH_CHECK(mean2.has_value() && mean2->defined() && scale2.has_value() &&
                    scale2->defined() && shift2.has_value() && shift2->defined(),
                "fusedres::bn_apply: x2 needs mean2, scale2 and shift2");
    mn2 = channel_vector(*mean2, x, "mean2", op);
    sc2 = channel_vector(*scale2, x, "scale2", op);
    sh2 = channel_vector(*shift2, x, "shift2", op);
  }
  Tensor out = empty_ncs(N, C, S, channels_last, x.options());
  Tensor mask = save_mask ? at::empty({(x.numel() + 7) / 8}, x.options().dtype(at::kByte))
                          : at::empty({0}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {out, mask};
  ApplyArgs a;
  a.sh = shape_of(x);
  a.x = view_of(x);
  if (has_res) a.res = view_of(*residual);
  if (has_x2) a.x2 = view_of(*x2);
  a.mean = mn.data_ptr();
  a.scale = sc.data_ptr();
  a.shift = sh.data_ptr();
  a.mean2 = has_x2 ? mn2.data_ptr() : nullptr;
  a.scale2 = has_x2 ? sc2.data_ptr() : nullptr;
  a.shift2 = has_x2 ? sh2.data_ptr() : nullptr;
  a.has_res = has_res;
  a.has_x2 = has_x2;
  a.relu = relu;
  a.channels_last = channels_last;
  a.out = out.data_ptr();
  a.mask = save_mask ? mask.data_ptr<uint8_t>() : nullptr;
  FUSEDRES_CALL(bn_apply, x.scalar_type(), a);
  return {out, mask};
}

// ---- backward -----------------------------------------------------------------------

// The inputs both backward primitives read, checked; the dense per-channel vectors and
// the mask stay alive here while the kernel arguments point into them.
struct BackwardInputs {
  Tensor dout, x, mean, scale, shift, mask;

  BackwardArgs args(bool relu, bool channels_last) const {
    BackwardArgs a;
    a.sh = shape_of(x);
    a.dout = view_of(dout);
    a.x = view_of(x);
    a.mean = mean.data_ptr();
    a.scale = scale.data_ptr();
    a.shift = shift.data_ptr();
    a.mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
    a.mask_bytes = mask.defined() ? mask.numel() : 0;
    a.relu = relu;
    a.channels_last = channels_last;
    return a;
  }
};

BackwardInputs backward_inputs(const char* op, const Tensor& dout, const Tensor& x,
                               const Tensor& mean, const Tensor& scale, const Tensor& shift,
                               const std::optional<Tensor>& mask) {
  check_activation(x, op);
  check_like_x(dout, x, "dout", op);
  return BackwardInputs{dout,
                        x,
                        channel_vector(mean, x, "mean", op),
                        channel_vector(scale, x, "scale", op),
                        channel_vector(shift, x, "shift", op),
                        checked_mask(mask, x, op)};
}

std::tuple<Tensor, Tensor> bn_backward_reduce(const Tensor& dout, const Tensor& x,
                                              const Tensor& mean, const Tensor& scale,
                                              const Tensor& shift,
                                              const std::optional<Tensor>& mask, bool relu,
                                              bool channels_last) {
  const BackwardInputs in =
      backward_inputs("bn_backward_reduce", dout, x, mean, scale, shift, mask);
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const int64_t C = x.size(1);
  if (x.numel() == 0) return {at::zeros({C}, opts), at::zeros({C}, opts)};
  Tensor sum_g = at::empty({C}, opts), sum_g_xc = at::empty({C}, opts);
  BackwardArgs a = in.args(relu, channels_last);
  a.sum_g = sum_g.data_ptr();
  a.sum_g_xc = sum_g_xc.data_ptr();
  FUSEDRES_CALL(bn_backward_reduce, x.scalar_type(), a);
  return {sum_g, sum_g_xc};
}

std::tuple<Tensor, Tensor> bn_backward_apply(const Tensor& dout, const Tensor& x,
                                             const Tensor& mean, const Tensor& scale,
                                             const Tensor& shift,
                                             const std::optional<Tensor>& mask,
                                             const Tensor& coef_g, const Tensor& coef_xc,
                                             const Tensor& coef_c, bool relu,
                                             bool write_grad_residual, bool channels_last) {
  const char* op = "bn_backward_apply";
  const BackwardInputs in = backward_inputs(op, dout, x, mean, scale, shift, mask);
  Tensor cg = channel_vector(coef_g, x, "coef_g", op);
  Tensor cxc = channel_vector(coef_xc, x, "coef_xc", op);
  Tensor cc = channel_vector(coef_c, x, "coef_c", op);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  Tensor dx = empty_ncs(N, C, S, channels_last, x.options());
  Tensor dres = write_grad_residual ? empty_ncs(N, C, S, channels_last, x.options())
                                    : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dres};
  BackwardArgs a = in.args(relu, channels_last);
  a.coef_g = cg.data_ptr();
  a.coef_xc = cxc.data_ptr();
  a.coef_c = cc.data_ptr();
  a.dx = dx.data_ptr();
  a.dres = write_grad_residual ? dres.data_ptr() : nullptr;
  FUSEDRES_CALL(bn_backward_apply, x.scalar_type(), a);
  return {dx, dres};
}

}  // namespace
}  // namespace fusedres::cpu

TORCH_LIBRARY_FRAGMENT(fusedres, m) {
  m.def("cpu_isa() -> str", &fusedres::cpu::cpu_isa);  // no tensors: one kernel for all keys
}

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("bn_stats", &fusedres::cpu::bn_stats);
  m.impl("bn_apply", &fusedres::cpu::bn_apply);
  m.impl("bn_backward_reduce", &fusedres::cpu::bn_backward_reduce);
  m.impl("bn_backward_apply", &fusedres::cpu::bn_backward_apply);
}
