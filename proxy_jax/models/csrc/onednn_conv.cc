// 2-D convolution (four FFI handlers) and matrix products (one, PjOnednnMatmul, at the end:
// dense layers and their gradients) on the CPU through oneDNN, exposed to XLA (registered by
// proxy_jax/models/onednn_conv.py as proxy_jax_onednn_conv_<kind>).
//
// Layouts are JAX's: activations NHWC, weights HWIO, float32. Each handler takes the
// stride and the explicit (top, bottom, left, right) zero padding as attributes; output
// shapes come from the result buffers, so the Python side decides them.
//
//   PjOnednnConvForward          (x [N,H,W,C], w [KH,KW,C,O]
//                                 [, b [O]] [, r [N,OH,OW,O]])    -> y  [N,OH,OW,O]
//   PjOnednnConvBackwardData     (dy [N,OH,OW,O], w [KH,KW,C,O])   -> dx [N,H,W,C]
//   PjOnednnConvBackwardWeights  (x [N,H,W,C], dy [N,OH,OW,O])     -> dw [KH,KW,C,O]
//   PjOnednnConvBackward         (x, w, dy)                        -> (dx, dw)
//
// The forward handler adds the bias b (attribute bias) and the residual r (when passed) and,
// with the attribute relu, applies max(0, .) inside the convolution's own loop (oneDNN
// post-ops): a frozen BatchNorm folded into w and b, its ReLU and a ResNet block's residual
// add cost no extra pass over the activations.
//
// The weights are handed to oneDNN in the blocked layout its kernel prefers (a reorder per
// call; weights are small next to activations): with plain HWIO weights the backward pass
// of 3x3 layers ran 1.5-2x slower. Primitives (and their weight reorders) are created once
// per shape and kept in a process-wide cache (creation costs far more than a small
// convolution).
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include <oneapi/dnnl/dnnl.hpp>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using F32Buffer = ffi::Buffer<ffi::F32>;

enum Kind : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// N, H, W, C, KH, KW, O, OH, OW, stride h/w, padding top/bottom/left/right, kind, and for
// the forward kind: bias, residual add, relu.
using Key = std::array<int64_t, 19>;

struct Geometry {
  Key key;
  memory::dims src() const { return {key[0], key[3], key[1], key[2]}; }
  memory::dims weights() const { return {key[6], key[3], key[4], key[5]}; }
  memory::dims dst() const { return {key[0], key[6], key[7], key[8]}; }
  memory::dims strides() const { return {key[9], key[10]}; }
  memory::dims pad_l() const { return {key[11], key[13]}; }
  memory::dims pad_r() const { return {key[12], key[14]}; }
  Kind kind() const { return static_cast<Kind>(key[15]); }
  bool bias() const { return key[16] != 0; }
  bool add() const { return key[17] != 0; }
  bool relu() const { return key[18] != 0; }
  Geometry As(Kind k) const {  // the same convolution, another of its three computations
    Geometry g = *this;
    g.key[15] = k;
    return g;
  }
  Geometry WithEpilogue(bool bias, bool add, bool relu) const {
    Geometry g = *this;
    g.key[16] = bias;
    g.key[17] = add;
    g.key[18] = relu;
    return g;
  }
};

// One primitive and what it needs beyond the caller's plain buffers.
struct Plan {
  dnnl::primitive conv;
  memory::desc weights;            // the primitive's weights layout (maybe blocked)
  memory::desc weights_plain;      // HWIO
  bool reorder_weights = false;    // weights != weights_plain
  dnnl::reorder reorder;           // HWIO -> weights (forward, backward data) or back
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One oneDNN call at a time: each already uses every core through its OpenMP team, and
// XLA's thread pool would otherwise start independent ones (parallel Inception branches,
// a ViT's q/k/v products) together, oversubscribing the cores.
std::mutex& Running() {
  static std::mutex running;
  return running;
}

// A oneDNN exception as XLA's error, naming the operation and oneDNN's status.
ffi::Error Failure(const char* operation, const dnnl::error& e) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("onednn ") + operation + ": " + e.what() + " (status " +
                        std::to_string(static_cast<int>(e.status)) + ")");
}

memory::desc Plain(const memory::dims& dims, Tag tag) {
  return memory::desc(dims, memory::data_type::f32, tag);
}

std::shared_ptr<Plan> MakePlan(const Geometry& g) {
  const memory::dims dilation = {0, 0};
  auto src = Plain(g.src(), Tag::nhwc), dst = Plain(g.dst(), Tag::nhwc);
  auto weights_any = Plain(g.weights(), Tag::any);
  auto bias = g.bias() ? Plain({g.dst()[1]}, Tag::a) : memory::desc();
  dnnl::post_ops post_ops;
  if (g.add()) post_ops.append_binary(dnnl::algorithm::binary_add, dst);
  if (g.relu()) post_ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(post_ops);
  auto forward = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src,
      weights_any, bias, dst, g.strides(), dilation, g.pad_l(), g.pad_r(), attr);
  auto plan = std::make_shared<Plan>();
  plan->weights_plain = Plain(g.weights(), Tag::hwio);
  switch (g.kind()) {
    case kForward:
      plan->conv = dnnl::convolution_forward(forward);
      plan->weights = forward.weights_desc();
      break;
    case kBackwardData: {
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, src, weights_any, dst, g.strides(),
          dilation, g.pad_l(), g.pad_r(), forward);
      plan->conv = dnnl::convolution_backward_data(pd);
      plan->weights = pd.weights_desc();
      break;
    }
    case kBackwardWeights: {
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, src, weights_any, dst, g.strides(),
          dilation, g.pad_l(), g.pad_r(), forward);
      plan->conv = dnnl::convolution_backward_weights(pd);
      plan->weights = pd.diff_weights_desc();
      break;
    }
  }
  plan->reorder_weights = plan->weights != plan->weights_plain;
  if (plan->reorder_weights) {
    auto& from = g.kind() == kBackwardWeights ? plan->weights : plan->weights_plain;
    auto& to = g.kind() == kBackwardWeights ? plan->weights_plain : plan->weights;
    plan->reorder = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(const Geometry& g) {
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(g.key);
  if (it != plans.end()) return it->second;
  return plans[g.key] = MakePlan(g);
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, Kind kind) {
  return Geometry{{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, pt, pb, pl,
                   pr, kind, 0, 0, 0}};
}

ffi::Error CheckRanks(const F32Buffer& a, const F32Buffer& b, const F32Buffer& c) {
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || c.dimensions().size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn conv: every operand must have rank 4");
  return ffi::Error::Success();
}

// The caller's HWIO weights as the plan's primitive wants them (reordered when it differs).
memory WeightsIn(const Plan& plan, void* hwio, dnnl::stream& stream) {
  memory plain(plan.weights_plain, Engine(), hwio);
  if (!plan.reorder_weights) return plain;
  memory blocked(plan.weights, Engine());
  plan.reorder.execute(stream, plain, blocked);
  return blocked;
}

// Runs the plan on the caller's plain buffers: (a, b) -> out is (x, w) -> y, (dy, w) -> dx or
// (x, dy) -> dw by the kind, activations NHWC and weights HWIO; the forward kind also takes
// the bias [O] when g.bias() and the residual [N,OH,OW,O] when g.add().
ffi::Error Execute(const Geometry& g, void* a, void* b, void* out, void* bias = nullptr,
                   void* residual = nullptr) {
  std::lock_guard<std::mutex> lock(Running());
  try {
    auto plan = GetPlan(g);
    dnnl::engine& engine = Engine();
    dnnl::stream stream(engine);
    auto src = Plain(g.src(), Tag::nhwc), dst = Plain(g.dst(), Tag::nhwc);
    switch (g.kind()) {
      case kForward: {
        memory x(src, engine, a), y(dst, engine, out);
        memory w = WeightsIn(*plan, b, stream);
        std::unordered_map<int, memory> args = {
            {DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, y}};
        if (g.bias()) args[DNNL_ARG_BIAS] = memory(Plain({g.dst()[1]}, Tag::a), engine, bias);
        if (g.add())  // the binary post-op is post-op 0
          args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
              memory(dst, engine, residual);
        plan->conv.execute(stream, args);
        break;
      }
      case kBackwardData: {
        memory dy(dst, engine, a), dx(src, engine, out);
        memory w = WeightsIn(*plan, b, stream);
        plan->conv.execute(
            stream, {{DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_SRC, dx}});
        break;
      }
      case kBackwardWeights: {
        memory x(src, engine, a), dy(dst, engine, b), dw_plain(plan->weights_plain, engine, out);
        memory dw = plan->reorder_weights ? memory(plan->weights, engine) : dw_plain;
        plan->conv.execute(
            stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, dy}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
        if (plan->reorder_weights) plan->reorder.execute(stream, dw, dw_plain);
        break;
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return Failure("conv", e);
  }
  return ffi::Error::Success();
}


// `rest` holds the bias b if the attribute bias is set, then the residual r if any.
ffi::Error Forward(F32Buffer x, F32Buffer w, ffi::RemainingArgs rest,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, bool bias, bool relu) {
  if (auto e = CheckRanks(x, w, *y); e.failure()) return e;
  if (rest.size() < static_cast<size_t>(bias) || rest.size() > 1 + static_cast<size_t>(bias))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn conv: expected the bias (if set) and at most one residual");
  void* extra[2] = {nullptr, nullptr};
  for (size_t i = 0; i < rest.size(); ++i) {
    auto operand = rest.get<F32Buffer>(i);
    if (operand.has_error()) return operand.error();
    extra[i] = operand->untyped_data();
  }
  const bool add = rest.size() > static_cast<size_t>(bias);
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr,
                        kForward);
  return Execute(g.WithEpilogue(bias, add, relu), x.untyped_data(), w.untyped_data(),
                 y->untyped_data(), bias ? extra[0] : nullptr, extra[bias ? 1 : 0]);
}

ffi::Error BackwardData(F32Buffer dy, F32Buffer w, ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                        int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = CheckRanks(dy, w, *dx); e.failure()) return e;
  auto g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl,
                        pr, kBackwardData);
  return Execute(g, dy.untyped_data(), w.untyped_data(), dx->untyped_data());
}

ffi::Error BackwardWeights(F32Buffer x, F32Buffer dy, ffi::ResultBuffer<ffi::F32> dw,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr) {
  if (auto e = CheckRanks(x, dy, *dw); e.failure()) return e;
  auto g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl,
                        pr, kBackwardWeights);
  return Execute(g, x.untyped_data(), dy.untyped_data(), dw->untyped_data());
}

// Both gradients in one call, so that XLA cannot schedule the weight gradient beside the
// rest of the backward pass (on ResNet-50 this measured the same speed as two calls).
ffi::Error Backward(F32Buffer x, F32Buffer w, F32Buffer dy, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                    int64_t pb, int64_t pl, int64_t pr) {
  if (auto e = CheckRanks(x, w, dy); e.failure()) return e;
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr,
                        kBackwardData);
  if (auto e = Execute(g, dy.untyped_data(), w.untyped_data(), dx->untyped_data()); e.failure())
    return e;
  return Execute(g.As(kBackwardWeights), x.untyped_data(), dy.untyped_data(), dw->untyped_data());
}

// ---------------------------------------------------------------------------- matmul
//
//   PjOnednnMatmul (a, b [, bias [N]]) -> c [M, N]
//
// c = op(a) · op(b) (+ bias), op(a) = a [M, K] or, with trans_a, the transpose of a [K, M];
// likewise b [K, N] or [N, K] with trans_b. A transposed operand is read in place through
// its strides (no copy); oneDNN's matmul picks the kernel (brgemm on AVX-512).

// M, K, N, trans_a, trans_b, bias
using MatmulKey = std::array<int64_t, 6>;

memory::desc Strided(int64_t rows, int64_t cols, bool trans) {
  // The logical [rows, cols] matrix of an array stored as [cols, rows] when trans.
  return memory::desc({rows, cols}, memory::data_type::f32,
                      trans ? memory::dims{1, rows} : memory::dims{cols, 1});
}

struct MatmulDescs {
  memory::desc a, b, bias, c;
};

MatmulDescs Descs(const MatmulKey& k) {
  const int64_t m = k[0], kk = k[1], n = k[2];
  MatmulDescs d;
  d.a = Strided(m, kk, k[3] != 0);
  d.b = Strided(kk, n, k[4] != 0);
  d.c = Strided(m, n, false);
  if (k[5] != 0) d.bias = Plain({1, n}, Tag::ab);
  return d;
}

std::shared_ptr<dnnl::matmul> GetMatmul(const MatmulKey& key) {
  static std::mutex mutex;
  static std::map<MatmulKey, std::shared_ptr<dnnl::matmul>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it != plans.end()) return it->second;
  auto d = Descs(key);
  auto pd = dnnl::matmul::primitive_desc(Engine(), d.a, d.b, d.bias, d.c);
  return plans[key] = std::make_shared<dnnl::matmul>(pd);
}

ffi::Error Matmul(F32Buffer a, F32Buffer b, ffi::RemainingArgs rest,
                  ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b, bool bias) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn matmul: every operand must have rank 2");
  if (rest.size() != static_cast<size_t>(bias))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn matmul: a bias operand exactly when the attribute bias is set");
  const int64_t m = cd[0], n = cd[1], k = trans_a ? ad[0] : ad[1];
  MatmulKey key = {m, k, n, trans_a, trans_b, bias};
  std::lock_guard<std::mutex> lock(Running());
  try {
    auto matmul = GetMatmul(key);
    auto d = Descs(key);
    dnnl::engine& engine = Engine();
    dnnl::stream stream(engine);
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(d.a, engine, a.untyped_data())},
        {DNNL_ARG_WEIGHTS, memory(d.b, engine, b.untyped_data())},
        {DNNL_ARG_DST, memory(d.c, engine, c->untyped_data())}};
    if (bias) {
      auto operand = rest.get<F32Buffer>(0);
      if (operand.has_error()) return operand.error();
      args[DNNL_ARG_BIAS] = memory(d.bias, engine, operand->untyped_data());
    }
    matmul->execute(stream, args);
    stream.wait();
  } catch (const dnnl::error& e) {
    return Failure("matmul", e);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<F32Buffer>()
                                  .Arg<F32Buffer>()
                                  .RemainingArgs()
                                  .Ret<F32Buffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<bool>("bias"));

#define PJ_CONV_ATTRIBUTES(binding)                                                          \
  binding.Attr<int64_t>("stride_h")                                                          \
      .Attr<int64_t>("stride_w")                                                             \
      .Attr<int64_t>("pad_top")                                                              \
      .Attr<int64_t>("pad_bottom")                                                           \
      .Attr<int64_t>("pad_left")                                                             \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjOnednnConvBackward, Backward,
                              PJ_CONV_ATTRIBUTES(ffi::Ffi::Bind()
                                                     .Arg<F32Buffer>()
                                                     .Arg<F32Buffer>()
                                                     .Arg<F32Buffer>()
                                                     .Ret<F32Buffer>()
                                                     .Ret<F32Buffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjOnednnConvForward, Forward,
                              PJ_CONV_ATTRIBUTES(ffi::Ffi::Bind()
                                                     .Arg<F32Buffer>()
                                                     .Arg<F32Buffer>()
                                                     .RemainingArgs()
                                                     .Ret<F32Buffer>())
                                  .Attr<bool>("bias")
                                  .Attr<bool>("relu"));

#define PJ_CONV_BINDING \
  PJ_CONV_ATTRIBUTES(ffi::Ffi::Bind().Arg<F32Buffer>().Arg<F32Buffer>().Ret<F32Buffer>())

XLA_FFI_DEFINE_HANDLER_SYMBOL(PjOnednnConvBackwardData, BackwardData, PJ_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PjOnednnConvBackwardWeights, BackwardWeights, PJ_CONV_BINDING);
