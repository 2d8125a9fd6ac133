// cuDNN graph-API convolutions with fused BN statistics (and a BN-ReLU prologue), through
// the header-only cudnn-frontend C++ API and the libcudnn torch already loads.
//
// Graph kinds (NHWC activations, KRSC weights, fp16/bf16 I/O, fp32 math and sums):
//   F0  conv_fprop(x, w) -> y, genstats(y) -> (sum, sq_sum)
//   F1  relu(x*scale + shift) -> conv_fprop(., w) -> y, genstats(y) -> (sum, sq_sum)
//       scale/shift fp32 (1, C, 1, 1); the conv's zero padding is of the prologue's
//       output (the prologue is a virtual tensor the conv reads), so padded taps are 0.
// The reference of each graph is fusedres/reference.py (graph_f0, graph_f1).
//
// Ops (namespace fusedres; fake kernels and autograd in fusedres/cudnn_graph.py):
//   cudnn_graph_plan(x, w, prologue, stride, padding) -> str
//       builds (once) and caches the plan of the graph those tensors need: "" when cuDNN
//       runs it, else why not (validate / heuristics / check_support / build_plans
//       failed). Never throws for an unsupported graph: it is remembered, as supported.
//   cudnn_graph_conv_stats(x, w, scale?, shift?, stride, padding) -> (y, sum, sq_sum)
//       runs the cached plan (y channels_last, sums fp32); an unsupported graph raises
//       here (the Python side asks cudnn_graph_plan first and falls back).
//   cudnn_graph_version() -> int   cudnnGetVersion() of the loaded libcudnn.
//
// Plans are cached per (device, dtype, sizes, stride, padding, graph kind; the tensors are
// channels_last, described to cuDNN with canonical NHWC strides) in a
// process-wide map under a mutex; a plan is built on first use, so build them before
// CUDA-graph capture (the first call NVRTC-compiles runtime-fusion engines). The handle
// is ATen's (at::native::getCudnnHandle: per thread and device, set to the current
// stream), so autograd's backward thread gets its own.
#ifdef FUSEDRES_WITH_CUDNN_GRAPH

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cudnn_frontend.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace fusedres {
namespace cudnn_graph {

namespace fe = cudnn_frontend;
using TensorAttr = std::shared_ptr<fe::graph::Tensor_attributes>;

enum Uid : int64_t { kX = 1, kW, kScale, kShift, kY, kSum, kSqSum };

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;  // null when unsupported
  std::string problem;                      // why unsupported ("" when supported)
  int64_t workspace = 0;
};

std::vector<int64_t> out_sizes(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                               at::IntArrayRef padding) {
  const int64_t p = (x.size(2) + 2 * padding[0] - w.size(2)) / stride[0] + 1;
  const int64_t q = (x.size(3) + 2 * padding[1] - w.size(3)) / stride[1] + 1;
  return {x.size(0), w.size(0), p, q};
}

std::vector<int64_t> nhwc_strides(const std::vector<int64_t>& s) {
  return {s[1] * s[2] * s[3], 1, s[3] * s[1], s[1]};
}

fe::DataType_t io_type(at::ScalarType t) {
  return t == at::kHalf ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16;
}

std::string plan_key(const at::Tensor& x, const at::Tensor& w, bool prologue,
                     at::IntArrayRef stride, at::IntArrayRef padding) {
  std::ostringstream k;
  k << x.get_device() << '|' << static_cast<int>(x.scalar_type()) << '|' << (prologue ? "F1" : "F0");
  for (auto v : x.sizes()) k << ',' << v;  // strides: canonical NHWC (precheck)
  k << '|';
  for (auto v : w.sizes()) k << ',' << v;
  k << '|' << stride[0] << ',' << stride[1] << '|' << padding[0] << ',' << padding[1];
  return k.str();
}

// The first failing step's message, or "" when the graph was built and is supported.
std::string build(Plan& plan, const at::Tensor& x, const at::Tensor& w, bool prologue,
                  at::IntArrayRef stride, at::IntArrayRef padding) {
  const auto io = io_type(x.scalar_type());
  const auto f32 = fe::DataType_t::FLOAT;
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(io).set_intermediate_data_type(f32).set_compute_data_type(f32);
  // Canonical NHWC strides (precheck: both are channels_last in memory): a size-1 dim's
  // stride is arbitrary in torch (a 1x1 NCHW weight counts as channels_last).
  auto X = g->tensor(fe::graph::Tensor_attributes().set_name("x").set_uid(kX)
                         .set_dim(x.sizes().vec()).set_stride(nhwc_strides(x.sizes().vec()))
                         .set_data_type(io));
  auto W = g->tensor(fe::graph::Tensor_attributes().set_name("w").set_uid(kW)
                         .set_dim(w.sizes().vec()).set_stride(nhwc_strides(w.sizes().vec()))
                         .set_data_type(io));
  TensorAttr conv_in = X;
  if (prologue) {
    const int64_t c = x.size(1);
    auto per_channel = [&](const char* name, int64_t uid) {
      return g->tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid)
                           .set_dim({1, c, 1, 1}).set_stride({c, 1, c, c}).set_data_type(f32));
    };
    auto S = per_channel("scale", kScale);
    auto B = per_channel("shift", kShift);
    auto pw = [&](fe::PointwiseMode_t mode) {
      return fe::graph::Pointwise_attributes().set_mode(mode).set_compute_data_type(f32);
    };
    auto scaled = g->pointwise(X, S, pw(fe::PointwiseMode_t::MUL));
    auto shifted = g->pointwise(scaled, B, pw(fe::PointwiseMode_t::ADD));
    conv_in = g->pointwise(shifted, pw(fe::PointwiseMode_t::RELU_FWD));
  }
  auto conv = fe::graph::Conv_fprop_attributes()
                  .set_padding({padding[0], padding[1]})
                  .set_stride({stride[0], stride[1]})
                  .set_dilation({1, 1})
                  .set_compute_data_type(f32);
  auto Y = g->conv_fprop(conv_in, W, conv);
  const auto ysz = out_sizes(x, w, stride, padding);
  Y->set_output(true).set_uid(kY).set_data_type(io).set_dim(ysz).set_stride(nhwc_strides(ysz));
  auto stats = g->genstats(Y, fe::graph::Genstats_attributes().set_compute_data_type(f32));
  const int64_t k = w.size(0);
  stats[0]->set_output(true).set_uid(kSum).set_data_type(f32).set_dim({1, k, 1, 1})
      .set_stride({k, 1, k, k});
  stats[1]->set_output(true).set_uid(kSqSum).set_data_type(f32).set_dim({1, k, 1, 1})
      .set_stride({k, 1, k, k});

  cudnnHandle_t handle = at::native::getCudnnHandle();
  auto step = [](const char* what, fe::error_t e) -> std::string {
    return e.is_good() ? std::string() : std::string(what) + ": " + e.get_message();
  };
  std::string why = step("validate", g->validate());
  if (why.empty()) why = step("build_operation_graph", g->build_operation_graph(handle));
  if (why.empty())
    why = step("create_execution_plans",
               g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}));
  if (why.empty()) why = step("check_support", g->check_support(handle));
  if (why.empty()) why = step("build_plans", g->build_plans(handle));
  int64_t ws = 0;
  if (why.empty()) why = step("get_workspace_size", g->get_workspace_size(ws));
  if (why.empty()) {
    plan.graph = g;
    plan.workspace = ws;
  }
  return why;
}

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<std::string, Plan>& cache() {
  static std::unordered_map<std::string, Plan> c;
  return c;
}

// What the graph supports at all, before asking cuDNN ("" when worth asking).
std::string precheck(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                     at::IntArrayRef padding) {
  if (!x.is_cuda() || !w.is_cuda() || x.get_device() != w.get_device())
    return "input and weight must be CUDA tensors on one device";
  if (x.dim() != 4 || w.dim() != 4) return "4-D input and weight only";
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)
    return "the graphs take float16 or bfloat16 input";
  if (w.scalar_type() != x.scalar_type()) return "weight dtype differs from the input's";
  if (w.size(1) != x.size(1)) return "channel mismatch (grouped convs are not planned)";
  if (stride.size() != 2 || padding.size() != 2) return "stride and padding need 2 values";
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      !w.is_contiguous(at::MemoryFormat::ChannelsLast))
    return "input and weight must be channels_last (NHWC / KRSC)";
  for (const auto* t : {&x, &w}) {  // the runtime-fusion engines load 16-byte vectors
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0)
      return "input or weight not 16-byte aligned (a view with an offset)";
  }
  const auto ysz = out_sizes(x, w, stride, padding);
  if (ysz[2] <= 0 || ysz[3] <= 0 || x.numel() == 0) return "empty input or output";
  return "";
}

const Plan& get_plan(const at::Tensor& x, const at::Tensor& w, bool prologue,
                     at::IntArrayRef stride, at::IntArrayRef padding) {
  const auto key = plan_key(x, w, prologue, stride, padding);
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto it = cache().find(key);
  if (it != cache().end()) return it->second;
  Plan plan;
  try {
    plan.problem = build(plan, x, w, prologue, stride, padding);
  } catch (const std::exception& e) {  // a frontend that throws instead of returning
    plan.problem = std::string("cudnn-frontend: ") + e.what();
  }
  return cache().emplace(key, std::move(plan)).first->second;
}

std::string plan_graph(const at::Tensor& x, const at::Tensor& w, bool prologue,
                       at::IntArrayRef stride, at::IntArrayRef padding) {
  auto why = precheck(x, w, stride, padding);
  if (!why.empty()) return why;
  c10::cuda::CUDAGuard guard(x.device());
  return get_plan(x, w, prologue, stride, padding).problem;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_stats(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, at::IntArrayRef stride, at::IntArrayRef padding) {
  const auto pre = precheck(x, w, stride, padding);
  TORCH_CHECK(pre.empty(), "fusedres cudnn_graph_conv_stats: ", pre);
  TORCH_CHECK(scale.has_value() == shift.has_value(), "scale and shift come together");
  for (const auto* t : {&scale, &shift}) {
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == at::kFloat &&
                                    (*t)->numel() == x.size(1) && (*t)->is_contiguous() &&
                                    (*t)->device() == x.device()),
                "scale and shift must be contiguous float32 (C,) tensors on the input's device");
  }
  c10::cuda::CUDAGuard guard(x.device());
  const Plan& plan = get_plan(x, w, scale.has_value(), stride, padding);
  TORCH_CHECK(plan.graph, "fusedres cudnn_graph_conv_stats: cuDNN does not run this graph: ",
              plan.problem);
  const auto ysz = out_sizes(x, w, stride, padding);
  auto y = at::empty(ysz, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  // genstats accumulates into its outputs on some engines: start them at 0.
  auto sum = at::zeros({w.size(0)}, x.options().dtype(at::kFloat));
  auto sq_sum = at::zeros({w.size(0)}, x.options().dtype(at::kFloat));
  auto workspace = at::empty({plan.workspace}, x.options().dtype(at::kByte));
  std::unordered_map<int64_t, void*> pack = {
      {kX, x.data_ptr()}, {kW, w.data_ptr()}, {kY, y.data_ptr()},
      {kSum, sum.data_ptr()}, {kSqSum, sq_sum.data_ptr()}};
  if (scale.has_value()) {
    pack[kScale] = scale->data_ptr();
    pack[kShift] = shift->data_ptr();
  }
  cudnnHandle_t handle = at::native::getCudnnHandle();
  auto status = plan.graph->execute(handle, pack, plan.workspace ? workspace.data_ptr() : nullptr);
  TORCH_CHECK(status.is_good(), "fusedres cudnn_graph_conv_stats: execute failed: ",
              status.get_message());
  return {y, sum, sq_sum};
}

int64_t version() { return static_cast<int64_t>(cudnnGetVersion()); }

}  // namespace cudnn_graph
}  // namespace fusedres

TORCH_LIBRARY_FRAGMENT(fusedres, m) {
  m.def(
      "cudnn_graph_plan(Tensor x, Tensor w, bool prologue, int[2] stride, int[2] padding) "
      "-> str");
  m.def(
      "cudnn_graph_conv_stats(Tensor x, Tensor w, Tensor? scale, Tensor? shift, int[2] stride, "
      "int[2] padding) -> (Tensor y, Tensor sum, Tensor sq_sum)");
  m.def("cudnn_graph_version() -> int", &fusedres::cudnn_graph::version);
}

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("cudnn_graph_plan", &fusedres::cudnn_graph::plan_graph);
  m.impl("cudnn_graph_conv_stats", &fusedres::cudnn_graph::conv_stats);
}

#endif  // FUSEDRES_WITH_CUDNN_GRAPH
