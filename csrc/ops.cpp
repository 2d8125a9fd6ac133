// Schemas of the C++/CUDA kernel primitives of fusedres.
//
// The contract of every primitive (shapes, layouts, dtypes, the 1-bit ReLU mask) is
// written once, in fusedres/reference.py, beside its pure-PyTorch reference. The CPU
// kernels register under the CPU key (csrc/cpu/), the CUDA kernels under the CUDA key
// (csrc/cuda/). Autograd and fake kernels are registered from Python (fusedres/ops.py).
#include <torch/library.h>
#include <Python.h>

// Importing fusedres._C registers the ops; the module itself holds nothing.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fusedres, m) {
  m.def("bn_stats(Tensor x, bool channels_last) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_apply(Tensor x, Tensor mean, Tensor scale, Tensor shift, Tensor? residual, "
      "Tensor? x2, Tensor? mean2, Tensor? scale2, Tensor? shift2, bool relu, bool save_mask, "
      "bool channels_last) "
      "-> (Tensor out, Tensor mask)");
  m.def(
      "bn_backward_reduce(Tensor dout, Tensor x, Tensor mean, Tensor scale, Tensor shift, "
      "Tensor? mask, bool relu, bool channels_last) -> (Tensor sum_g, Tensor sum_g_xc)");
  m.def(
      "bn_backward_apply(Tensor dout, Tensor x, Tensor mean, Tensor scale, Tensor shift, "
      "Tensor? mask, Tensor coef_g, Tensor coef_xc, Tensor coef_c, bool relu, "
      "bool write_grad_residual, bool channels_last) -> (Tensor dx, Tensor dres)");
  // The fused pipeline on these primitives (csrc/bn_fused.cpp), for the cpu and cuda
  // backends: (N, C, *) tensors, outputs channels-last when x is; autograd in C++.
  m.def(
      "bn_act_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean_in, Tensor? var_in, "
      "Tensor? residual, Tensor? x2, Tensor? weight2, Tensor? bias2, Tensor? mean2_in, "
      "Tensor? var2_in, bool training, float eps, bool relu) "
      "-> (Tensor out, Tensor mean, Tensor var, Tensor mean2, Tensor var2, Tensor mask)");
  m.def(
      "bn_act_backward(Tensor dout, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor var, Tensor? mask, Tensor? x2, Tensor? weight2, Tensor? bias2, Tensor? mean2, "
      "Tensor? var2, bool training, float eps, bool relu, bool has_residual, "
      "bool[5] needs) -> (Tensor dx, Tensor dweight, Tensor dbias, "
      "Tensor dresidual, Tensor dx2, Tensor dweight2, Tensor dbias2)");
  // The per-channel steps of that pipeline on CUDA (csrc/cuda/bn_cuda.cpp): the finalize
  // (invstd, scale = weight*invstd, shift = bias) alone or in the statistics' merge kernel,
  // the input-gradient coefficients in the backward sums' merge kernel, the running
  // statistics in one kernel. Internal: the CPU pipeline runs plain loops instead.
  m.def(
      "bn_finalize(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor invstd, Tensor scale, Tensor shift)");
  m.def(
      "bn_stats_finalize(Tensor x, Tensor? weight, Tensor? bias, float eps, bool channels_last) "
      "-> (Tensor mean, Tensor var, Tensor invstd, Tensor scale, Tensor shift)");
  m.def(
      "bn_backward_reduce_finalize(Tensor dout, Tensor x, Tensor mean, Tensor scale, "
      "Tensor shift, Tensor? mask, Tensor invstd, bool relu, bool channels_last, float count, "
      "bool training) -> (Tensor sum_g, Tensor sum_g_xc, Tensor coef_xc, Tensor coef_c, "
      "Tensor dweight)");
  m.def(
      "running_stats_update(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
      "Tensor var, float var_correction, float momentum, Tensor? num_batches_tracked) -> ()");
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
      "Tensor var, float var_correction, float momentum, Tensor? num_batches_tracked) -> ()");
}
