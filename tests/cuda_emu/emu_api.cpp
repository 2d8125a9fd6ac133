#include "bn_kernels_emu.cpp"  // bn_kernels.cu with its launches rewritten (build.py)
using namespace fusedres::cuda;
static void* wsalloc(void*, size_t b) { return std::calloc(b + 16, 1); }  // leaked: fine for tests
static Strides3 S3(const int64_t* s) { return Strides3{s[0], s[1], s[2]}; }
static Shape3 H3(const int64_t* s) { return Shape3{s[0], s[1], s[2]}; }
template <class F> void disp(int dt, F f) {
  if (dt == 0) f((float*)0); else if (dt == 1) f((double*)0); else if (dt == 2) f((__half*)0); else f((__nv_bfloat16*)0);
}
// fin: {weight, bias, invstd, scale, shift} pointers (weight/bias nullable), eps.
template <class A> static Finalize<A> F5(void* const* p, double eps) {
  return Finalize<A>{(const A*)p[0], (const A*)p[1], (A)eps, (A*)p[2], (A*)p[3], (A*)p[4]};
}
extern "C" {
void emu_bn_stats(int dt, const void* x, const int64_t* xs, const int64_t* sh, void* mean, void* var) {
  disp(dt, [&](auto p) { using T = std::remove_pointer_t<decltype(p)>; using A = acc_t<T>;
    launch_bn_stats<T>((const T*)x, S3(xs), H3(sh), (A*)mean, (A*)var, nullptr, Workspace{wsalloc, nullptr}, nullptr); });
}
long long emu_launches() { return emu::launches; }
// The reduction planner's launch geometry for an (N, C, S) view with strides xs (dout with
// the same strides in backward), 16-byte-aligned pointers: out = {inner, vec, gx, P, tx,
// ty, per_part, part_elems}.
void emu_reduce_plan(int dt, int backward, const int64_t* xs, const int64_t* sh, int64_t* out) {
  disp(dt, [&](auto p) { using T = std::remove_pointer_t<decltype(p)>;
    ReduceArgs<T> a{};
    a.x = a.dout = reinterpret_cast<const T*>(uintptr_t{4096});
    a.xs = a.ds = S3(xs);
    const ReducePlan pl = backward ? plan_reduce<T, kBackward>(a, H3(sh)) : plan_reduce<T, kStats>(a, H3(sh));
    const int64_t v[8] = {pl.inner, pl.vec, pl.gx, pl.P, pl.tx, pl.ty, pl.per_part, pl.part_elems};
    std::copy(v, v + 8, out); });
}
void emu_bn_stats_finalize(int dt, const void* x, const int64_t* xs, const int64_t* sh, void* mean,
                           void* var, void* const* fin, double eps) {
  disp(dt, [&](auto p) { using T = std::remove_pointer_t<decltype(p)>; using A = acc_t<T>;
    const Finalize<A> f = F5<A>(fin, eps);
    launch_bn_stats<T>((const T*)x, S3(xs), H3(sh), (A*)mean, (A*)var, &f, Workspace{wsalloc, nullptr}, nullptr); });
}
void emu_bn_finalize(int is_double, const void* var, void* const* fin, double eps, int64_t C) {
  if (is_double) launch_bn_finalize<double>(nullptr, (const double*)var, F5<double>(fin, eps), C, nullptr);
  else launch_bn_finalize<float>(nullptr, (const float*)var, F5<float>(fin, eps), C, nullptr);
}
void emu_running_stats_update(int is_double, void* rm, int64_t rms, void* rv, int64_t rvs, const void* mean,
                              const void* var, double corr, double momentum, const int64_t* nbt, int64_t C) {
  if (is_double) launch_running_stats_update<double>((double*)rm, rms, (double*)rv, rvs, (const double*)mean,
                                                     (const double*)var, corr, momentum, nbt, C, nullptr);
  else launch_running_stats_update<float>((float*)rm, rms, (float*)rv, rvs, (const float*)mean,
                                          (const float*)var, (float)corr, (float)momentum, nbt, C, nullptr);
}
void emu_bn_apply(int dt, const void* x, const int64_t* xs, const void* mean, const void* scale,
                  const void* shift, const void* res, const int64_t* rs, const void* x2,
                  const int64_t* x2s, const void* mean2, const void* scale2, const void* shift2,
                  int relu, void* out, void* mask,
                  const int64_t* sh, int cl, int sms) {
  disp(dt, [&](auto p) { using T = std::remove_pointer_t<decltype(p)>; using A = acc_t<T>;
    launch_bn_apply<T>((const T*)x, S3(xs), (const A*)mean, (const A*)scale, (const A*)shift,
                       (const T*)res, S3(rs), (const T*)x2, S3(x2s), (const A*)mean2,
                       (const A*)scale2, (const A*)shift2, relu, (T*)out,
                       (uint8_t*)mask, H3(sh), cl, sms, nullptr); });
}
void emu_bn_backward_reduce(int dt, const void* dout, const int64_t* ds, const void* x, const int64_t* xs,
                            const void* mean, const void* scale, const void* shift, const void* mask,
                            int relu, const int64_t* sh, int cl, void* sg, void* sgx,
                            void* const* coef, double count, int training) {
  // coef (nullable): {invstd, coef_xc, coef_c, dweight}; the scale is `scale`.
  disp(dt, [&](auto p) { using T = std::remove_pointer_t<decltype(p)>; using A = acc_t<T>;
    Coefficients<A> k{};
    if (coef) k = Coefficients<A>{(const A*)scale, (const A*)coef[0], (A)count, training != 0,
                                  (A*)coef[1], (A*)coef[2], (A*)coef[3]};
    launch_bn_backward_reduce<T>((const T*)dout, S3(ds), (const T*)x, S3(xs), (const A*)mean,
        (const A*)scale, (const A*)shift, (const uint8_t*)mask, relu, H3(sh), cl, (A*)sg, (A*)sgx,
        coef ? &k : nullptr, Workspace{wsalloc, nullptr}, nullptr); });
}
void emu_bn_backward_apply(int dt, const void* dout, const int64_t* ds, const void* x, const int64_t* xs,
                           const void* mean, const void* scale, const void* shift, const void* mask,
                           const void* cg, const void* cxc, const void* cc, int relu, void* dx, void* dres,
                           const int64_t* sh, int cl, int sms) {
  disp(dt, [&](auto p) { using T = std::remove_pointer_t<decltype(p)>; using A = acc_t<T>;
    launch_bn_backward_apply<T>((const T*)dout, S3(ds), (const T*)x, S3(xs), (const A*)mean,
        (const A*)scale, (const A*)shift, (const uint8_t*)mask, (const A*)cg, (const A*)cxc, (const A*)cc,
        relu, (T*)dx, (T*)dres, H3(sh), cl, sms, nullptr); });
}
}
