#include "bn_kernels_emu.cpp"  // bn_kernels.cu with its launches rewritten (build.py)
using namespace fusedres::cuda;
static void* wsalloc(void*, size_t b) { return std::calloc(b + 16, 1); }  // leaked: fine for tests
static Strides3 S3(const int64_t* s) { return Strides3{s[0], s[1], s[2]}; }
static Shape3 H3(const int64_t* s) { return Shape3{s[0], s[1], s[2]}; }
template <class F> void disp(int dt, F f) {
  if (dt == 0) f((float*)0); else if (dt == 1) f((double*)0); else if (dt == 2) f((__half*)0); else f((__nv_bfloat16*)0);
}
extern "C" {
void emu_bn_stats(int dt, const void* x, const int64_t* xs, const int64_t* sh, void* mean, void* var) {
  disp(dt, [&](auto p) { using T = std::remove_pointer_t<decltype(p)>; using A = acc_t<T>;
    launch_bn_stats<T>((const T*)x, S3(xs), H3(sh), (A*)mean, (A*)var, Workspace{wsalloc, nullptr}, nullptr); });
}
void emu_bn_apply(int dt, const void* x, const int64_t* xs, const void* scale, const void* shift,
                  const void* res, const int64_t* rs, const void* x2, const int64_t* x2s,
                  const void* scale2, const void* shift2, int relu, void* out, void* mask,
                  const int64_t* sh, int cl, int sms) {
  disp(dt, [&](auto p) { using T = std::remove_pointer_t<decltype(p)>; using A = acc_t<T>;
    launch_bn_apply<T>((const T*)x, S3(xs), (const A*)scale, (const A*)shift, (const T*)res, S3(rs),
                       (const T*)x2, S3(x2s), (const A*)scale2, (const A*)shift2, relu, (T*)out,
                       (uint8_t*)mask, H3(sh), cl, sms, nullptr); });
}
void emu_bn_backward_reduce(int dt, const void* dout, const int64_t* ds, const void* x, const int64_t* xs,
                            const void* mean, const void* scale, const void* shift, const void* mask,
                            int relu, const int64_t* sh, int cl, void* sg, void* sgx) {
  disp(dt, [&](auto p) { using T = std::remove_pointer_t<decltype(p)>; using A = acc_t<T>;
    launch_bn_backward_reduce<T>((const T*)dout, S3(ds), (const T*)x, S3(xs), (const A*)mean,
        (const A*)scale, (const A*)shift, (const uint8_t*)mask, relu, H3(sh), cl, (A*)sg, (A*)sgx,
        Workspace{wsalloc, nullptr}, nullptr); });
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
