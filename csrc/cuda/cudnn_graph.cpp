// cuDNN graph-API convolutions fused with the BatchNorm around them, through the
// header-only cudnn-frontend C++ API and the libcudnn torch already loads.
//
// Graph kinds (NHWC activations, KRSC weights, fp16/bf16 I/O, fp32 math and sums; the
// references are in fusedres/reference.py):
//   F0             conv_fprop(x, w) -> y, genstats(y) -> (sum, sq_sum)            graph_f0
//   F1             relu(x*scale + shift) -> conv_fprop(., w) -> y, genstats(y)     graph_f1
//                  the conv's zero padding is of the prologue's output (the prologue
//                  is a virtual tensor the conv reads), so padded taps are 0.
//   DgradDreluDBN  conv_dgrad(dy, w) -> dReLU with the mask ((x-mean)*invstd)*gamma + beta
//                  > 0 -> g (stored), dbn_weight(g, x, mean, invstd, gamma) -> dgamma =
//                  sum(g*xhat), dbeta = sum(g) (centred; the previous BN's weight terms)
//                                                                  graph_dgrad_drelu_dbn
//   ConvBNwgrad    conv_wgrad(dy, relu(x*scale + shift)) -> dw: the prologue recomputed,
//                  the normalised activation never stored                  graph_wgrad
// The node order of the last two is cuDNN's samples' (dgrads.cpp "Dgrad Drelu DBNweight",
// wgrads.cpp "scale-bias-relu-wgrad"), the patterns of its pre-compiled fp16 engines.
//
// Ops (namespace fusedres; fake kernels and autograd in fusedres/cudnn_graph.py):
//   cudnn_graph_plan(kind, x, w, stride, padding) -> str
//       builds (once) and caches the plan of graph `kind` for a conv of input x and weight
//       w: "" when cuDNN runs it, else why not (the first failing step per variant).
//       Never throws for an unsupported graph: it is remembered, as supported ones are.
//   cudnn_graph_engine(kind, x, w, stride, padding) -> str
//       the planned graph's engine (cuDNN's plan name) and per-channel dtype; "" if none.
//   cudnn_graph_conv_stats(x, w, scale?, shift?, stride, padding) -> (y, sum, sq_sum)
//   cudnn_graph_dgrad_drelu_dbn(dy, w, x, mean, invstd, gamma, beta, stride, padding)
//       -> (g, dgamma, dbeta)
//   cudnn_graph_wgrad(dy, x, scale, shift, w, stride, padding) -> dw   (w: shape only)
//       run the cached plan; an unsupported graph raises here (the Python side asks
//       cudnn_graph_plan first and falls back).
//   cudnn_graph_version() -> int   cudnnGetVersion() of the loaded libcudnn.
//
// Plans: validate, heuristics modes A then FALLBACK, check_support, build_plans with
// cuDNN's own choice of engine config (HEURISTICS_CHOICE). Each kind with a per-channel
// prologue is tried in variants: for fp16 I/O first with fp16 scale/shift (the
// pre-compiled MLPerf engines' configuration in cuDNN's samples), then fp32; bf16 only
// fp32 (bf16 scale/shift would round to 8 bits). The first variant cuDNN plans is kept.
// Cached per (graph kind, device, dtype, sizes, stride, padding; tensors are
// channels_last, described with canonical NHWC strides) in a process-wide map under a
// mutex (`cached_plan`: the plan is built outside it); a plan is built on first use, so
// build them before CUDA-graph capture (the first call NVRTC-compiles runtime-fusion
// engines). The handle is ATen's
// (at::native::getCudnnHandle: per thread and device, set to the current stream), so
// autograd's backward thread gets its own.
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
using Graph = fe::graph::Graph;

enum class Kind { F0, F1, DgradDreluDBN, ConvBNwgrad };

Kind parse_kind(const std::string& s) {
  if (s == "F0") return Kind::F0;
  if (s == "F1") return Kind::F1;
  if (s == "DgradDreluDBN") return Kind::DgradDreluDBN;
  if (s == "ConvBNwgrad") return Kind::ConvBNwgrad;
  TORCH_CHECK(false, "fusedres cudnn_graph: unknown graph kind '", s,
              "' (F0, F1, DgradDreluDBN, ConvBNwgrad)");
}

enum Uid : int64_t {
  kX = 1, kW, kScale, kShift, kY, kSum, kSqSum,           // F0, F1 (scale/shift: wgrad too)
  kDy, kMean, kInvstd, kGamma, kBeta, kG,                 // DgradDreluDBN inputs, g
  kDgamma, kDbeta, kEqScaleDy, kEqScaleX, kEqBias, kDw    // ... its outputs; wgrad's dw
};

// The data types a graph is built with: the per-channel prologue vectors' and the
// virtual tensors' (cuDNN's "intermediate" type). I/O and compute types are fixed.
struct Variant {
  fe::DataType_t per_channel;
  fe::DataType_t intermediate;
};

struct Plan {
  std::shared_ptr<Graph> graph;  // null when unsupported
  std::string problem;           // why unsupported ("" when supported)
  std::string engine;            // cuDNN's plan name and the variant
  at::ScalarType per_channel = at::kFloat;
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

const char* type_name(fe::DataType_t t) {
  return t == fe::DataType_t::FLOAT ? "fp32" : t == fe::DataType_t::HALF ? "fp16" : "bf16";
}

bool has_prologue(Kind kind) { return kind == Kind::F1 || kind == Kind::ConvBNwgrad; }

std::vector<Variant> variants(Kind kind, at::ScalarType io) {
  const auto f32 = fe::DataType_t::FLOAT, f16 = fe::DataType_t::HALF;
  if (has_prologue(kind) && io == at::kHalf) return {{f16, f32}, {f16, f16}, {f32, f32}};
  return {{f32, f32}};
}

std::string plan_key(Kind kind, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                     at::IntArrayRef padding) {
  std::ostringstream k;
  k << static_cast<int>(kind) << '|' << x.get_device() << '|'
    << static_cast<int>(x.scalar_type());
  for (auto v : x.sizes()) k << ',' << v;  // strides: canonical NHWC (precheck)
  k << '|';
  for (auto v : w.sizes()) k << ',' << v;
  k << '|' << stride[0] << ',' << stride[1] << '|' << padding[0] << ',' << padding[1];
  return k.str();
}

// --------------------------------------------------------------------------------------
// The graphs
// --------------------------------------------------------------------------------------

// A tensor of `sizes` described NHWC (activations) / KRSC (weights).
TensorAttr nhwc(Graph& g, const char* name, int64_t uid, const std::vector<int64_t>& sizes,
                fe::DataType_t type) {
  return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(sizes)
                      .set_stride(nhwc_strides(sizes)).set_data_type(type));
}

TensorAttr per_channel(Graph& g, const char* name, int64_t uid, int64_t c, fe::DataType_t type) {
  return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim({1, c, 1, 1})
                      .set_stride({c, 1, c, c}).set_data_type(type));
}

void as_per_channel_output(const TensorAttr& t, int64_t uid, int64_t c) {
  t->set_output(true).set_uid(uid).set_data_type(fe::DataType_t::FLOAT).set_dim({1, c, 1, 1})
      .set_stride({c, 1, c, c});
}

TensorAttr pointwise(Graph& g, fe::PointwiseMode_t mode, const TensorAttr& a,
                     const TensorAttr& b = nullptr) {
  auto attrs = fe::graph::Pointwise_attributes().set_mode(mode)
                   .set_compute_data_type(fe::DataType_t::FLOAT);
  return b ? g.pointwise(a, b, attrs) : g.pointwise(a, attrs);
}

// relu(x*scale + shift), per input channel: F1's and ConvBNwgrad's prologue.
TensorAttr bn_relu_prologue(Graph& g, const TensorAttr& x, int64_t c, fe::DataType_t type) {
  auto scale = per_channel(g, "scale", kScale, c, type);
  auto shift = per_channel(g, "shift", kShift, c, type);
  auto scaled = pointwise(g, fe::PointwiseMode_t::MUL, x, scale);
  auto shifted = pointwise(g, fe::PointwiseMode_t::ADD, scaled, shift);
  return pointwise(g, fe::PointwiseMode_t::RELU_FWD, shifted);
}

// Declares graph `kind`'s tensors and nodes on `g` (conv input x, weight w, output y).
void define(Graph& g, Kind kind, const Variant& v, const std::vector<int64_t>& xs,
            const std::vector<int64_t>& ws, const std::vector<int64_t>& ys,
            at::IntArrayRef stride, at::IntArrayRef padding, fe::DataType_t io) {
  const auto f32 = fe::DataType_t::FLOAT;
  const std::vector<int64_t> pad = {padding[0], padding[1]}, str = {stride[0], stride[1]},
                             dil = {1, 1};
  const int64_t c = xs[1], k = ws[0];
  auto X = nhwc(g, "x", kX, xs, io);
  switch (kind) {
    case Kind::F0:
    case Kind::F1: {
      auto W = nhwc(g, "w", kW, ws, io);
      auto in = kind == Kind::F1 ? bn_relu_prologue(g, X, c, v.per_channel) : X;
      auto Y = g.conv_fprop(in, W, fe::graph::Conv_fprop_attributes().set_padding(pad)
                                       .set_stride(str).set_dilation(dil)
                                       .set_compute_data_type(f32));
      Y->set_output(true).set_uid(kY).set_data_type(io).set_dim(ys).set_stride(nhwc_strides(ys));
      auto stats = g.genstats(Y, fe::graph::Genstats_attributes().set_compute_data_type(f32));
      as_per_channel_output(stats[0], kSum, k);
      as_per_channel_output(stats[1], kSqSum, k);
      return;
    }
    case Kind::DgradDreluDBN: {
      auto W = nhwc(g, "w", kW, ws, io);
      auto DY = nhwc(g, "dy", kDy, ys, io);
      auto dh = g.conv_dgrad(DY, W, fe::graph::Conv_dgrad_attributes().set_padding(pad)
                                        .set_stride(str).set_dilation(dil)
                                        .set_compute_data_type(f32));
      dh->set_dim(xs).set_stride(nhwc_strides(xs));
      auto mean = per_channel(g, "mean", kMean, c, f32);
      auto invstd = per_channel(g, "invstd", kInvstd, c, f32);
      auto gamma = per_channel(g, "gamma", kGamma, c, f32);
      auto beta = per_channel(g, "beta", kBeta, c, f32);
      // the previous BN's output, centred as cuDNN's DgradDreluBNBwdWeight pattern has it
      auto xc = pointwise(g, fe::PointwiseMode_t::SUB, X, mean);
      auto xhat = pointwise(g, fe::PointwiseMode_t::MUL, xc, invstd);
      auto bn = pointwise(g, fe::PointwiseMode_t::ADD,
                          pointwise(g, fe::PointwiseMode_t::MUL, xhat, gamma), beta);
      auto G = pointwise(g, fe::PointwiseMode_t::RELU_BWD, dh, bn);
      G->set_output(true).set_uid(kG).set_data_type(io).set_dim(xs).set_stride(nhwc_strides(xs));
      // {DSCALE, DBIAS, EQ_SCALE_DY, EQ_SCALE_X, EQ_BIAS}
      auto dbn = g.dbn_weight(G, X, mean, invstd, gamma,
                              fe::graph::DBN_weight_attributes().set_compute_data_type(f32));
      const int64_t uids[] = {kDgamma, kDbeta, kEqScaleDy, kEqScaleX, kEqBias};
      for (int i = 0; i < 5; ++i) as_per_channel_output(dbn[i], uids[i], c);
      return;
    }
    case Kind::ConvBNwgrad: {
      auto DY = nhwc(g, "dy", kDy, ys, io);
      auto in = bn_relu_prologue(g, X, c, v.per_channel);
      auto DW = g.conv_wgrad(DY, in, fe::graph::Conv_wgrad_attributes().set_padding(pad)
                                         .set_stride(str).set_dilation(dil)
                                         .set_compute_data_type(f32));
      DW->set_output(true).set_uid(kDw).set_data_type(io).set_dim(ws).set_stride(nhwc_strides(ws));
      return;
    }
  }
}

// Builds graph `kind` in each variant until cuDNN plans one: "" (plan filled) or why not.
std::string build(Plan& plan, Kind kind, const at::Tensor& x, const at::Tensor& w,
                  at::IntArrayRef stride, at::IntArrayRef padding) {
  const auto io = io_type(x.scalar_type());
  cudnnHandle_t handle = at::native::getCudnnHandle();
  auto step = [](const char* what, fe::error_t e) -> std::string {
    return e.is_good() ? std::string() : std::string(what) + ": " + e.get_message();
  };
  std::string problems;
  for (const auto& v : variants(kind, x.scalar_type())) {
    auto g = std::make_shared<Graph>();
    g->set_io_data_type(io).set_intermediate_data_type(v.intermediate)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    define(*g, kind, v, x.sizes().vec(), w.sizes().vec(), out_sizes(x, w, stride, padding),
           stride, padding, io);
    std::string why = step("validate", g->validate());
    if (why.empty()) why = step("build_operation_graph", g->build_operation_graph(handle));
    if (why.empty())
      why = step("create_execution_plans",
                 g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}));
    if (why.empty()) why = step("check_support", g->check_support());
    if (why.empty()) why = step("build_plans", g->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE));
    int64_t ws = 0;
    if (why.empty()) why = step("get_workspace_size", g->get_workspace_size(ws));
    std::ostringstream tag;
    if (has_prologue(kind)) tag << "scale/shift " << type_name(v.per_channel) << ", ";
    tag << "intermediate " << type_name(v.intermediate);
    if (why.empty()) {
      std::string name;
      if (!g->get_plan_name(name).is_good() || name.empty()) name = "engine unnamed";
      plan.graph = g;
      plan.workspace = ws;
      plan.engine = name + " (" + tag.str() + ")";
      plan.per_channel = v.per_channel == fe::DataType_t::FLOAT ? at::kFloat : x.scalar_type();
      return "";
    }
    problems += (problems.empty() ? "" : "; ") + tag.str() + ": " + why;
  }
  return problems;
}

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<std::string, Plan>& cache() {
  static std::unordered_map<std::string, Plan> c;
  return c;
}

// The plan cached under `key`; on first use `make(plan)` builds it ("" or why not; an
// exception becomes the reason). Built outside the lock: a build can NVRTC-compile for
// seconds, and other threads' graph calls must not wait on it. Two threads racing on one
// key both build, and the first plan inserted is kept (emplace does not replace it);
// references into the map stay valid across inserts.
template <typename Make>
const Plan& cached_plan(const std::string& key, Make make) {
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    auto it = cache().find(key);
    if (it != cache().end()) return it->second;
  }
  Plan plan;
  try {
    plan.problem = make(plan);
  } catch (const std::exception& e) {  // a frontend that throws instead of returning
    plan.problem = std::string("cudnn-frontend: ") + e.what();
  }
  std::lock_guard<std::mutex> lock(cache_mutex());
  return cache().emplace(key, std::move(plan)).first->second;
}

bool nhwc_aligned(const at::Tensor& t) {  // the runtime-fusion engines load 16-byte vectors
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// What the graphs support at all, before asking cuDNN ("" when worth asking).
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
  if (!nhwc_aligned(x) || !nhwc_aligned(w))
    return "input or weight not 16-byte aligned (a view with an offset)";
  const auto ysz = out_sizes(x, w, stride, padding);
  if (ysz[2] <= 0 || ysz[3] <= 0 || x.numel() == 0) return "empty input or output";
  return "";
}

const Plan& get_plan(Kind kind, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                     at::IntArrayRef padding) {
  return cached_plan(plan_key(kind, x, w, stride, padding),
                     [&](Plan& plan) { return build(plan, kind, x, w, stride, padding); });
}

std::string plan_graph(const std::string& kind, const at::Tensor& x, const at::Tensor& w,
                       at::IntArrayRef stride, at::IntArrayRef padding) {
  const Kind k = parse_kind(kind);
  auto why = precheck(x, w, stride, padding);
  if (!why.empty()) return why;
  c10::cuda::CUDAGuard guard(x.device());
  return get_plan(k, x, w, stride, padding).problem;
}

std::string engine(const std::string& kind, const at::Tensor& x, const at::Tensor& w,
                   at::IntArrayRef stride, at::IntArrayRef padding) {
  const Kind k = parse_kind(kind);
  if (!precheck(x, w, stride, padding).empty()) return "";
  c10::cuda::CUDAGuard guard(x.device());
  return get_plan(k, x, w, stride, padding).engine;
}

// --------------------------------------------------------------------------------------
// Running a plan
// --------------------------------------------------------------------------------------

// The plan of `kind` for this conv, checked to exist (the op's name in the errors).
const Plan& planned(const char* op, Kind kind, const at::Tensor& x, const at::Tensor& w,
                    at::IntArrayRef stride, at::IntArrayRef padding) {
  const auto pre = precheck(x, w, stride, padding);
  TORCH_CHECK(pre.empty(), "fusedres ", op, ": ", pre);
  const Plan& plan = get_plan(kind, x, w, stride, padding);
  TORCH_CHECK(plan.graph, "fusedres ", op, ": cuDNN does not run this graph: ", plan.problem);
  return plan;
}

void check_per_channel(const char* op, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == x.size(1) && t.is_contiguous() &&
                  t.device() == x.device(),
              "fusedres ", op, ": per-channel vectors must be contiguous float32 (C,) tensors "
              "on the input's device");
}

// dy of the backward graphs: the conv output's shape and dtype, channels_last, aligned.
void check_output_gradient(const char* op, const at::Tensor& dy, const at::Tensor& x,
                           const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(out_sizes(x, w, stride, padding)) &&
                  dy.scalar_type() == x.scalar_type() && dy.device() == x.device() &&
                  nhwc_aligned(dy),
              "fusedres ", op, ": dy must be the conv output's shape and dtype, channels_last "
              "and 16-byte aligned");
}

void execute(const char* op, const Plan& plan, std::unordered_map<int64_t, void*>& pack,
             const at::Tensor& like) {
  auto workspace = at::empty({plan.workspace}, like.options().dtype(at::kByte));
  cudnnHandle_t handle = at::native::getCudnnHandle();
  auto status = plan.graph->execute(handle, pack, plan.workspace ? workspace.data_ptr() : nullptr);
  TORCH_CHECK(status.is_good(), "fusedres ", op, ": execute failed: ", status.get_message());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_stats(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "cudnn_graph_conv_stats";
  TORCH_CHECK(scale.has_value() == shift.has_value(), "scale and shift come together");
  c10::cuda::CUDAGuard guard(x.device());
  const Kind kind = scale.has_value() ? Kind::F1 : Kind::F0;
  const Plan& plan = planned(op, kind, x, w, stride, padding);
  const auto ysz = out_sizes(x, w, stride, padding);
  auto y = at::empty(ysz, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  // genstats accumulates into its outputs on some engines: start them at 0.
  auto sum = at::zeros({w.size(0)}, x.options().dtype(at::kFloat));
  auto sq_sum = at::zeros({w.size(0)}, x.options().dtype(at::kFloat));
  std::unordered_map<int64_t, void*> pack = {
      {kX, x.data_ptr()}, {kW, w.data_ptr()}, {kY, y.data_ptr()},
      {kSum, sum.data_ptr()}, {kSqSum, sq_sum.data_ptr()}};
  at::Tensor s, t;  // in the plan's per-channel dtype, alive until executed
  if (scale.has_value()) {
    check_per_channel(op, *scale, x);
    check_per_channel(op, *shift, x);
    s = scale->to(plan.per_channel);
    t = shift->to(plan.per_channel);
    pack[kScale] = s.data_ptr();
    pack[kShift] = t.data_ptr();
  }
  execute(op, plan, pack, x);
  return {y, sum, sq_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dgrad_drelu_dbn(
    const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
    at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "cudnn_graph_dgrad_drelu_dbn";
  c10::cuda::CUDAGuard guard(x.device());
  const Plan& plan = planned(op, Kind::DgradDreluDBN, x, w, stride, padding);
  check_output_gradient(op, dy, x, w, stride, padding);
  for (const auto* t : {&mean, &invstd, &gamma, &beta}) check_per_channel(op, *t, x);
  auto g = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto channel = [&] { return at::empty({x.size(1)}, x.options().dtype(at::kFloat)); };
  auto dgamma = channel(), dbeta = channel();
  auto eq_scale_dy = channel(), eq_scale_x = channel(), eq_bias = channel();  // unused:
  // dBNApply is the project's centred kernel (fusedres/cudnn_graph.py says why)
  std::unordered_map<int64_t, void*> pack = {
      {kDy, dy.data_ptr()}, {kW, w.data_ptr()}, {kX, x.data_ptr()},
      {kMean, mean.data_ptr()}, {kInvstd, invstd.data_ptr()}, {kGamma, gamma.data_ptr()},
      {kBeta, beta.data_ptr()}, {kG, g.data_ptr()}, {kDgamma, dgamma.data_ptr()},
      {kDbeta, dbeta.data_ptr()}, {kEqScaleDy, eq_scale_dy.data_ptr()},
      {kEqScaleX, eq_scale_x.data_ptr()}, {kEqBias, eq_bias.data_ptr()}};
  execute(op, plan, pack, x);
  return {g, dgamma, dbeta};
}

at::Tensor wgrad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                 const at::Tensor& shift, const at::Tensor& w, at::IntArrayRef stride,
                 at::IntArrayRef padding) {
  const char* op = "cudnn_graph_wgrad";
  c10::cuda::CUDAGuard guard(x.device());
  const Plan& plan = planned(op, Kind::ConvBNwgrad, x, w, stride, padding);
  check_output_gradient(op, dy, x, w, stride, padding);
  check_per_channel(op, scale, x);
  check_per_channel(op, shift, x);
  auto s = scale.to(plan.per_channel), t = shift.to(plan.per_channel);
  auto dw = at::empty_like(w, at::MemoryFormat::ChannelsLast);
  std::unordered_map<int64_t, void*> pack = {
      {kDy, dy.data_ptr()}, {kX, x.data_ptr()}, {kScale, s.data_ptr()},
      {kShift, t.data_ptr()}, {kDw, dw.data_ptr()}};
  execute(op, plan, pack, x);
  return dw;
}

int64_t version() { return static_cast<int64_t>(cudnnGetVersion()); }

}  // namespace cudnn_graph
}  // namespace fusedres

#endif  // FUSEDRES_WITH_CUDNN_GRAPH

// ======================================================================================
// BN finalize (cuDNN's bn_finalize after genstats) and deviceless support checks.
//
//   BNFinalize     bn_finalize(sum, sq_sum, gamma, beta, eps, count, running mean/var,
//                  momentum) -> eq_scale = gamma*invstd, eq_bias = beta - mean*eq_scale,
//                  mean, invstd, next running mean/var (cuDNN's EXP_AVERAGE_FACTOR is
//                  torch's momentum: the weight of the batch value)  graph_bn_finalize
//
// Ops (fp32 per-channel (C,) tensors; the Python side, fusedres/cudnn_graph.py, picks
// this or the project's finalize and falls back):
//   cudnn_graph_bn_finalize_plan(sum) -> str     "" when cuDNN runs it, else why not
//   cudnn_graph_bn_finalize_engine(sum) -> str   the planned engine ("" if none)
//   cudnn_graph_bn_finalize(sum, sq_sum, gamma, beta, running_mean, running_var, eps,
//       momentum, count) -> (scale, shift, mean, invstd, next_running_mean,
//       next_running_var)   eps, momentum, count: by value (no replanning per call)
//   cudnn_graph_check_deviceless(properties, kind, dtype, input, weight, stride, padding,
//       sm_version) -> str
//       builds graph `kind` (F0, F1, DgradDreluDBN, ConvBNwgrad, BNFinalize: input is
//       (C,) there; BNAddReLU, DualBNAddReLU: the block tail's, with its mask, no weight)
//       as the planner does, against device properties captured on a GPU
//       (cuDNN's JSON, cudnn_deviceless.capture) instead of a handle: validate, lower,
//       heuristics, check_support -- no GPU. "" when supported, else the failing step
//       per variant. A blob cuDNN cannot read raises (ValueError).
// ======================================================================================
#ifdef FUSEDRES_WITH_CUDNN_GRAPH

namespace fusedres {
namespace cudnn_graph {

enum FinalizeUid : int64_t {
  kFinSum = 101, kFinSqSum, kFinGamma, kFinBeta, kFinEps, kFinCount, kFinRunMean, kFinRunVar,
  kFinMomentum, kFinScale, kFinShift, kFinMean, kFinInvstd, kFinNextMean, kFinNextVar
};

void define_bn_finalize(Graph& g, int64_t c) {
  const auto f32 = fe::DataType_t::FLOAT;
  auto vec = [&](const char* name, int64_t uid) { return per_channel(g, name, uid, c, f32); };
  auto by_value = [&](const char* name, int64_t uid, fe::DataType_t type) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid)
                        .set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1})
                        .set_is_pass_by_value(true).set_data_type(type));
  };
  auto sum = vec("sum", kFinSum), sq_sum = vec("sq_sum", kFinSqSum);
  auto gamma = vec("gamma", kFinGamma), beta = vec("beta", kFinBeta);
  auto run_mean = vec("running_mean", kFinRunMean), run_var = vec("running_var", kFinRunVar);
  auto eps = by_value("epsilon", kFinEps, f32);
  auto count = by_value("accum_count", kFinCount, fe::DataType_t::INT64);
  auto momentum = by_value("momentum", kFinMomentum, f32);
  auto outs = g.bn_finalize(sum, sq_sum, gamma, beta, eps, count,
                            fe::graph::BN_finalize_attributes()
                                .set_previous_running_stats(run_mean, run_var, momentum)
                                .set_compute_data_type(f32));
  const int64_t uids[] = {kFinScale, kFinShift, kFinMean, kFinInvstd, kFinNextMean, kFinNextVar};
  for (int i = 0; i < 6; ++i) as_per_channel_output(outs[i], uids[i], c);
}

std::shared_ptr<Graph> finalize_graph() {
  auto g = std::make_shared<Graph>();
  g->set_io_data_type(fe::DataType_t::FLOAT).set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return g;
}

// Lowers `g` up to check_support (and build_plans when there is a handle): "" or the
// failing step with cuDNN's message. Without a handle: the deviceless path (the graph
// carries device properties and the target sm).
std::string lower(Graph& g, cudnnHandle_t handle) {
  auto step = [](const char* what, fe::error_t e) -> std::string {
    return e.is_good() ? std::string() : std::string(what) + ": " + e.get_message();
  };
  std::string why = step("validate", g.validate());
  if (why.empty())
    why = step("build_operation_graph",
               handle ? g.build_operation_graph(handle) : g.build_operation_graph());
  if (why.empty())
    why = step("create_execution_plans",
               g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}));
  if (why.empty()) why = step("check_support", g.check_support());
  if (why.empty() && handle)
    why = step("build_plans", g.build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE));
  return why;
}

bool per_channel_ok(const at::Tensor& t, const at::Tensor& like) {
  return t.is_cuda() && t.device() == like.device() && t.scalar_type() == at::kFloat &&
         t.dim() == 1 && t.numel() == like.numel() && t.is_contiguous();
}

const Plan& finalize_plan(const at::Tensor& sum) {
  std::ostringstream key;
  key << "BNFinalize|" << sum.get_device() << '|' << sum.numel();
  return cached_plan(key.str(), [&](Plan& plan) {
    auto g = finalize_graph();
    define_bn_finalize(*g, sum.numel());
    auto why = lower(*g, at::native::getCudnnHandle());
    if (why.empty()) {
      int64_t ws = 0;
      auto e = g->get_workspace_size(ws);
      if (!e.is_good()) return std::string("get_workspace_size: ") + e.get_message();
      std::string name;
      if (!g->get_plan_name(name).is_good() || name.empty()) name = "engine unnamed";
      plan.graph = g, plan.workspace = ws, plan.engine = name;
    }
    return why;
  });
}

std::string finalize_precheck(const at::Tensor& sum) {
  if (!sum.is_cuda() || sum.scalar_type() != at::kFloat || sum.dim() != 1 || sum.numel() == 0)
    return "the sums must be non-empty float32 (C,) CUDA tensors";
  return "";
}

std::string bn_finalize_plan(const at::Tensor& sum) {
  auto why = finalize_precheck(sum);
  if (!why.empty()) return why;
  c10::cuda::CUDAGuard guard(sum.device());
  return finalize_plan(sum).problem;
}

std::string bn_finalize_engine(const at::Tensor& sum) {
  if (!finalize_precheck(sum).empty()) return "";
  c10::cuda::CUDAGuard guard(sum.device());
  return finalize_plan(sum).engine;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize(
    const at::Tensor& sum, const at::Tensor& sq_sum, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& running_mean, const at::Tensor& running_var,
    double eps, double momentum, int64_t count) {
  const char* op = "cudnn_graph_bn_finalize";
  auto pre = finalize_precheck(sum);
  TORCH_CHECK(pre.empty(), "fusedres ", op, ": ", pre);
  for (const auto* t : {&sq_sum, &gamma, &beta, &running_mean, &running_var})
    TORCH_CHECK(per_channel_ok(*t, sum), "fusedres ", op, ": every per-channel vector must be "
                "a contiguous float32 (C,) tensor on the sums' device");
  TORCH_CHECK(count > 0, "fusedres ", op, ": count must be positive");
  c10::cuda::CUDAGuard guard(sum.device());
  const Plan& plan = finalize_plan(sum);
  TORCH_CHECK(plan.graph, "fusedres ", op, ": cuDNN does not run this graph: ", plan.problem);
  auto channel = [&] { return at::empty_like(sum); };
  auto scale = channel(), shift = channel(), mean = channel(), invstd = channel();
  auto next_mean = channel(), next_var = channel();
  float eps_f = static_cast<float>(eps), momentum_f = static_cast<float>(momentum);
  int64_t count_v = count;  // by value: host pointers, read when the graph is launched
  std::unordered_map<int64_t, void*> pack = {
      {kFinSum, sum.data_ptr()}, {kFinSqSum, sq_sum.data_ptr()},
      {kFinGamma, gamma.data_ptr()}, {kFinBeta, beta.data_ptr()},
      {kFinRunMean, running_mean.data_ptr()}, {kFinRunVar, running_var.data_ptr()},
      {kFinEps, &eps_f}, {kFinCount, &count_v}, {kFinMomentum, &momentum_f},
      {kFinScale, scale.data_ptr()}, {kFinShift, shift.data_ptr()},
      {kFinMean, mean.data_ptr()}, {kFinInvstd, invstd.data_ptr()},
      {kFinNextMean, next_mean.data_ptr()}, {kFinNextVar, next_var.data_ptr()}};
  execute(op, plan, pack, sum);
  return {scale, shift, mean, invstd, next_mean, next_var};
}

// --------------------------------------------------------------------------------------
// Deviceless support checks
// --------------------------------------------------------------------------------------

std::shared_ptr<const fe::DeviceProperties> read_properties(const std::string& properties) {
  const char* op = "cudnn_graph_check_deviceless";
  TORCH_CHECK_VALUE(nlohmann::json::accept(properties),
                    "fusedres ", op, ": the device properties are not JSON (expected the text "
                    "`python -m fusedres.cudnn_deviceless capture` records on a GPU)");
  auto props = std::make_shared<fe::DeviceProperties>();
  auto e = props->deserialize(std::vector<uint8_t>(properties.begin(), properties.end()));
  TORCH_CHECK_VALUE(e.is_good(), "fusedres ", op, ": cuDNN cannot read these device "
                    "properties: ", e.get_message(), " (cuDNN ", cudnnGetVersion(),
                    "; its JSON needs cuDNN >= 9.8, deviceless checks >= 9.11)");
  return props;
}

// The block tail's graphs (defined in the last section of this file).
bool is_tail_kind(const std::string& kind);
bool parse_tail_kind(const std::string& s);
void define_tail(Graph& g, bool dual, bool save_mask, const std::vector<int64_t>& xs,
                 fe::DataType_t io);

std::string check_deviceless(const std::string& properties, const std::string& kind,
                             const std::string& dtype, at::IntArrayRef input,
                             at::IntArrayRef weight, at::IntArrayRef stride,
                             at::IntArrayRef padding, int64_t sm_version) {
  const char* op = "cudnn_graph_check_deviceless";
  // the arguments first (cheap, and the caller's mistakes), then cuDNN reads the blob
  const bool finalize = kind == "BNFinalize", tail = is_tail_kind(kind);
  const Kind k = finalize || tail ? Kind::F0 : parse_kind(kind);  // (unused for those)
  if (tail) {  // BNAddReLU / DualBNAddReLU: input (N, C, H, W), no weight; with the mask
    TORCH_CHECK_VALUE((dtype == "float16" || dtype == "bfloat16") && input.size() == 4,
                      "fusedres ", op, ": ", kind, " takes a float16/bfloat16 4-D input");
  } else if (finalize) {
    TORCH_CHECK_VALUE(input.size() == 1 && input[0] > 0, "fusedres ", op,
                      ": BNFinalize takes input (C,)");
  } else {
    TORCH_CHECK_VALUE(dtype == "float16" || dtype == "bfloat16", "fusedres ", op,
                      ": dtype must be float16 or bfloat16, not ", dtype);
    TORCH_CHECK_VALUE(input.size() == 4 && weight.size() == 4 && stride.size() == 2 &&
                          padding.size() == 2 && input[1] == weight[1],
                      "fusedres ", op, ": a 4-D input and weight (N, C, H, W) / (K, C, R, S)");
  }
  auto props = read_properties(properties);
  auto target = [&](Graph& g) {
    g.set_device_properties(props).set_sm_version(static_cast<int32_t>(sm_version));
  };
  try {
    if (tail) {
      Graph g;
      target(g);
      const auto io = io_type(dtype == "float16" ? at::kHalf : at::kBFloat16);
      g.set_io_data_type(io).set_intermediate_data_type(fe::DataType_t::FLOAT)
          .set_compute_data_type(fe::DataType_t::FLOAT);
      define_tail(g, parse_tail_kind(kind), true, input.vec(), io);
      return lower(g, nullptr);
    }
    if (finalize) {
      auto g = finalize_graph();
      target(*g);
      define_bn_finalize(*g, input[0]);
      return lower(*g, nullptr);
    }
    const auto st = dtype == "float16" ? at::kHalf : at::kBFloat16;
    const auto io = io_type(st);
    const std::vector<int64_t> xs = input.vec(), ws = weight.vec();
    const std::vector<int64_t> ys = {xs[0], ws[0], (xs[2] + 2 * padding[0] - ws[2]) / stride[0] + 1,
                                     (xs[3] + 2 * padding[1] - ws[3]) / stride[1] + 1};
    std::string problems;
    for (const auto& v : variants(k, st)) {
      Graph g;
      target(g);
      g.set_io_data_type(io).set_intermediate_data_type(v.intermediate)
          .set_compute_data_type(fe::DataType_t::FLOAT);
      define(g, k, v, xs, ws, ys, stride, padding, io);
      auto why = lower(g, nullptr);
      if (why.empty()) return "";
      std::ostringstream tag;
      if (has_prologue(k)) tag << "scale/shift " << type_name(v.per_channel) << ", ";
      tag << "intermediate " << type_name(v.intermediate);
      problems += (problems.empty() ? "" : "; ") + tag.str() + ": " + why;
    }
    return problems;
  } catch (const c10::Error&) {
    throw;  // our own checks
  } catch (const std::exception& e) {  // a frontend that throws instead of returning
    return std::string("cudnn-frontend: ") + e.what();
  }
}

}  // namespace cudnn_graph
}  // namespace fusedres

#endif  // FUSEDRES_WITH_CUDNN_GRAPH

// ======================================================================================
// The block tail: (dual) BN-add-ReLU as a cuDNN pointwise graph (no conv)
// ======================================================================================
//
// Graph kinds (NHWC fp16/bf16 I/O, fp32 per-channel vectors and math; the reference is
// fusedres.reference.graph_bn_add_relu):
//   BNAddReLU      out = relu((x - mean)*scale + shift + residual)
//   DualBNAddReLU  out = relu((x - mean)*scale + shift + (x2 - mean2)*scale2 + shift2)
// with `save_mask` also the ReLU mask `pre > 0` as a BOOLEAN output: cuDNN packs it 1 bit
// per element in the tensor's (NHWC) memory order, which is the BN kernels' mask of a
// channels_last output (fusedres/reference.py: byte o >> 3, bit o & 7). So the graph is
// a drop-in for the BN kernels' apply (`bn_apply`: the centred form, never x*scale +
// (beta - mean*scale), which cancels for |mean| >> std), and their backward reads its
// mask unchanged. Only the forward: the backward stays the BN kernels'.
//
// Ops (fake kernel and the caller in fusedres/cudnn_graph.py):
//   cudnn_graph_tail_plan(kind, x, save_mask) -> str     "" or why cuDNN refuses it
//   cudnn_graph_tail_engine(kind, x, save_mask) -> str   cuDNN's plan name; "" if none
//   cudnn_graph_bn_add_relu(x, mean, scale, shift, residual?, x2?, mean2?, scale2?,
//                           shift2?, save_mask) -> (out, mask)
//       exactly one of residual and x2; mask: uint8 of ceil(numel/8) bytes, or empty.
// Plans share the conv graphs' cache (keys prefixed "tail"), built on first use by the
// same steps (`lower`).
#ifdef FUSEDRES_WITH_CUDNN_GRAPH

namespace fusedres {
namespace cudnn_graph {

enum TailUid : int64_t {
  kTailX = 101, kTailMean, kTailScale, kTailShift, kTailResidual, kTailX2, kTailMean2,
  kTailScale2, kTailShift2, kTailOut, kTailMask, kTailZero
};

bool is_tail_kind(const std::string& kind) {
  return kind == "BNAddReLU" || kind == "DualBNAddReLU";
}

bool parse_tail_kind(const std::string& s) {  // true: dual
  if (s == "BNAddReLU") return false;
  if (s == "DualBNAddReLU") return true;
  TORCH_CHECK(false, "fusedres cudnn_graph: unknown tail graph kind '", s,
              "' (BNAddReLU, DualBNAddReLU)");
}

// (x - mean)*scale + shift: one BN's centred apply, fp32 per-channel vectors.
TensorAttr centred_bn(Graph& g, const TensorAttr& x, int64_t c, int64_t uid_mean) {
  const auto f32 = fe::DataType_t::FLOAT;
  auto mean = per_channel(g, "mean", uid_mean, c, f32);
  auto scale = per_channel(g, "scale", uid_mean + 1, c, f32);
  auto shift = per_channel(g, "shift", uid_mean + 2, c, f32);
  auto centred = pointwise(g, fe::PointwiseMode_t::SUB, x, mean);
  return pointwise(g, fe::PointwiseMode_t::ADD,
                   pointwise(g, fe::PointwiseMode_t::MUL, centred, scale), shift);
}

void define_tail(Graph& g, bool dual, bool save_mask, const std::vector<int64_t>& xs,
                 fe::DataType_t io) {
  const int64_t c = xs[1];
  auto pre = centred_bn(g, nhwc(g, "x", kTailX, xs, io), c, kTailMean);
  auto other = dual ? centred_bn(g, nhwc(g, "x2", kTailX2, xs, io), c, kTailMean2)
                    : nhwc(g, "residual", kTailResidual, xs, io);
  auto sum = pointwise(g, fe::PointwiseMode_t::ADD, pre, other);
  auto out = pointwise(g, fe::PointwiseMode_t::RELU_FWD, sum);
  out->set_output(true).set_uid(kTailOut).set_data_type(io).set_dim(xs)
      .set_stride(nhwc_strides(xs));
  if (save_mask) {
    auto zero = g.tensor(fe::graph::Tensor_attributes(0.0f).set_name("zero").set_uid(kTailZero));
    auto mask = pointwise(g, fe::PointwiseMode_t::CMP_GT, sum, zero);
    mask->set_output(true).set_uid(kTailMask).set_data_type(fe::DataType_t::BOOLEAN)
        .set_dim(xs).set_stride(nhwc_strides(xs));
  }
}

std::string build_tail(Plan& plan, bool dual, bool save_mask, const at::Tensor& x) {
  const auto io = io_type(x.scalar_type());
  cudnnHandle_t handle = at::native::getCudnnHandle();
  auto g = std::make_shared<Graph>();
  g->set_io_data_type(io).set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  define_tail(*g, dual, save_mask, x.sizes().vec(), io);
  std::string why = lower(*g, handle);
  int64_t ws = 0;
  if (why.empty()) {
    auto e = g->get_workspace_size(ws);
    if (!e.is_good()) why = std::string("get_workspace_size: ") + e.get_message();
  }
  if (!why.empty()) return why;
  std::string name;
  if (!g->get_plan_name(name).is_good() || name.empty()) name = "engine unnamed";
  plan.graph = g;
  plan.workspace = ws;
  plan.engine = name + (save_mask ? " (with the ReLU mask)" : "");
  return "";
}

// What the tail graphs support at all, before asking cuDNN ("" when worth asking).
std::string precheck_tail(const at::Tensor& x) {
  if (!x.is_cuda()) return "the tail graphs run on CUDA tensors";
  if (x.dim() != 4) return "4-D input only";
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)
    return "the tail graphs take float16 or bfloat16 input";
  if (x.size(1) % 8) return "channels not a multiple of 8 (16-byte aligned NHWC rows)";
  if (!nhwc_aligned(x)) return "input not channels_last and 16-byte aligned";
  if (x.numel() == 0) return "empty input";
  return "";
}

const Plan& get_tail_plan(bool dual, bool save_mask, const at::Tensor& x) {
  std::ostringstream k;
  k << "tail|" << dual << save_mask << '|' << x.get_device() << '|'
    << static_cast<int>(x.scalar_type());
  for (auto v : x.sizes()) k << ',' << v;
  return cached_plan(k.str(), [&](Plan& plan) { return build_tail(plan, dual, save_mask, x); });
}

std::string plan_tail(const std::string& kind, const at::Tensor& x, bool save_mask) {
  const bool dual = parse_tail_kind(kind);
  auto why = precheck_tail(x);
  if (!why.empty()) return why;
  c10::cuda::CUDAGuard guard(x.device());
  return get_tail_plan(dual, save_mask, x).problem;
}

std::string tail_engine(const std::string& kind, const at::Tensor& x, bool save_mask) {
  const bool dual = parse_tail_kind(kind);
  if (!precheck_tail(x).empty()) return "";
  c10::cuda::CUDAGuard guard(x.device());
  return get_tail_plan(dual, save_mask, x).engine;
}

std::tuple<at::Tensor, at::Tensor> bn_add_relu(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
    const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& x2,
    const c10::optional<at::Tensor>& mean2, const c10::optional<at::Tensor>& scale2,
    const c10::optional<at::Tensor>& shift2, bool save_mask) {
  const char* op = "cudnn_graph_bn_add_relu";
  const bool dual = x2.has_value();
  TORCH_CHECK(dual != residual.has_value(), "fusedres ", op, ": exactly one of residual and x2");
  TORCH_CHECK(!dual || (mean2.has_value() && scale2.has_value() && shift2.has_value()),
              "fusedres ", op, ": x2 comes with mean2, scale2 and shift2");
  const auto pre = precheck_tail(x);
  TORCH_CHECK(pre.empty(), "fusedres ", op, ": ", pre);
  const at::Tensor& other = dual ? *x2 : *residual;
  TORCH_CHECK(other.sizes() == x.sizes() && other.scalar_type() == x.scalar_type() &&
                  other.device() == x.device() && nhwc_aligned(other),
              "fusedres ", op, ": residual / x2 must be x's shape and dtype, channels_last "
              "and 16-byte aligned");
  c10::cuda::CUDAGuard guard(x.device());
  const Plan& plan = get_tail_plan(dual, save_mask, x);
  TORCH_CHECK(plan.graph, "fusedres ", op, ": cuDNN does not run this graph: ", plan.problem);
  for (const auto* t : {&mean, &scale, &shift}) check_per_channel(op, *t, x);
  auto out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  const int64_t bytes = (x.numel() + 7) / 8;  // the BN kernels' mask size
  auto mask = save_mask ? at::empty({(bytes + 15) / 16 * 16}, x.options().dtype(at::kByte))
                              .narrow(0, 0, bytes)
                        : at::empty({0}, x.options().dtype(at::kByte));
  std::unordered_map<int64_t, void*> pack = {
      {kTailX, x.data_ptr()}, {kTailMean, mean.data_ptr()}, {kTailScale, scale.data_ptr()},
      {kTailShift, shift.data_ptr()}, {kTailOut, out.data_ptr()}};
  if (dual) {
    for (const auto* t : {&*mean2, &*scale2, &*shift2}) check_per_channel(op, *t, x);
    pack[kTailX2] = x2->data_ptr();
    pack[kTailMean2] = mean2->data_ptr();
    pack[kTailScale2] = scale2->data_ptr();
    pack[kTailShift2] = shift2->data_ptr();
  } else {
    pack[kTailResidual] = residual->data_ptr();
  }
  if (save_mask) pack[kTailMask] = mask.data_ptr();
  execute(op, plan, pack, x);
  return {out, mask};
}

}  // namespace cudnn_graph
}  // namespace fusedres

// Every op of this file, registered once (the sections above define them).
TORCH_LIBRARY_FRAGMENT(fusedres, m) {
  m.def(
      "cudnn_graph_plan(str kind, Tensor x, Tensor w, int[2] stride, int[2] padding) -> str");
  m.def(
      "cudnn_graph_engine(str kind, Tensor x, Tensor w, int[2] stride, int[2] padding) -> str");
  m.def(
      "cudnn_graph_conv_stats(Tensor x, Tensor w, Tensor? scale, Tensor? shift, int[2] stride, "
      "int[2] padding) -> (Tensor y, Tensor sum, Tensor sq_sum)");
  m.def(
      "cudnn_graph_dgrad_drelu_dbn(Tensor dy, Tensor w, Tensor x, Tensor mean, Tensor invstd, "
      "Tensor gamma, Tensor beta, int[2] stride, int[2] padding) "
      "-> (Tensor g, Tensor dgamma, Tensor dbeta)");
  m.def(
      "cudnn_graph_wgrad(Tensor dy, Tensor x, Tensor scale, Tensor shift, Tensor w, "
      "int[2] stride, int[2] padding) -> Tensor");
  m.def("cudnn_graph_version() -> int", &fusedres::cudnn_graph::version);
  m.def("cudnn_graph_bn_finalize_plan(Tensor sum) -> str");
  m.def("cudnn_graph_bn_finalize_engine(Tensor sum) -> str");
  m.def(
      "cudnn_graph_bn_finalize(Tensor sum, Tensor sq_sum, Tensor gamma, Tensor beta, "
      "Tensor running_mean, Tensor running_var, float eps, float momentum, int count) "
      "-> (Tensor scale, Tensor shift, Tensor mean, Tensor invstd, Tensor next_running_mean, "
      "Tensor next_running_var)");
  // no tensors: a catch-all kernel, callable on a machine without a GPU
  m.def(
      "cudnn_graph_check_deviceless(str properties, str kind, str dtype, int[] input, "
      "int[] weight, int[] stride, int[] padding, int sm_version) -> str",
      &fusedres::cudnn_graph::check_deviceless);
  m.def("cudnn_graph_tail_plan(str kind, Tensor x, bool save_mask) -> str");
  m.def("cudnn_graph_tail_engine(str kind, Tensor x, bool save_mask) -> str");
  m.def(
      "cudnn_graph_bn_add_relu(Tensor x, Tensor mean, Tensor scale, Tensor shift, "
      "Tensor? residual, Tensor? x2, Tensor? mean2, Tensor? scale2, Tensor? shift2, "
      "bool save_mask) -> (Tensor out, Tensor mask)");
}

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("cudnn_graph_plan", &fusedres::cudnn_graph::plan_graph);
  m.impl("cudnn_graph_engine", &fusedres::cudnn_graph::engine);
  m.impl("cudnn_graph_conv_stats", &fusedres::cudnn_graph::conv_stats);
  m.impl("cudnn_graph_dgrad_drelu_dbn", &fusedres::cudnn_graph::dgrad_drelu_dbn);
  m.impl("cudnn_graph_wgrad", &fusedres::cudnn_graph::wgrad);
  m.impl("cudnn_graph_bn_finalize_plan", &fusedres::cudnn_graph::bn_finalize_plan);
  m.impl("cudnn_graph_bn_finalize_engine", &fusedres::cudnn_graph::bn_finalize_engine);
  m.impl("cudnn_graph_bn_finalize", &fusedres::cudnn_graph::bn_finalize);
  m.impl("cudnn_graph_tail_plan", &fusedres::cudnn_graph::plan_tail);
  m.impl("cudnn_graph_tail_engine", &fusedres::cudnn_graph::tail_engine);
  m.impl("cudnn_graph_bn_add_relu", &fusedres::cudnn_graph::bn_add_relu);
}

#endif  // FUSEDRES_WITH_CUDNN_GRAPH
