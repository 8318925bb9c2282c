// SPDX-License-Identifier: Apache-2.0
// custom_expert: a user-defined expert bank and gate, plain classes satisfying the
// autoglm::ExpertBank and autoglm::Gate concepts, plugged into MoELayer and into the registry
// without touching the library.
#include <cmath>
#include <cstdio>
#include <vector>

#include <fmt/format.h>

#include "autoglm/autoglm.hpp"

namespace {

/// Each expert scales its rows by a learned per-expert, per-channel vector: out = x * s[e].
/// Built only from backend primitives, so it runs on any backend.
class ScalingExperts {
 public:
  // scales: [E, d]
  explicit ScalingExperts(autoglm::Tensor scales) : scales_(std::move(scales)) {}
  std::int64_t num_experts() const { return scales_.dim(0); }
  std::int64_t hidden() const { return scales_.dim(1); }

  // x: [R, d]; offsets: [E + 1]; out: [R, d]
  void forward(autoglm::Backend& b, autoglm::TensorView x, autoglm::TensorView offsets,
               autoglm::TensorView out) const {
    // A diagonal matrix per expert turns "scale each row" into the grouped GEMM primitive.
    const std::int64_t E = num_experts(), d = hidden();
    std::vector<float> host(static_cast<std::size_t>(E * d)), diag(static_cast<std::size_t>(E * d * d), 0.f);
    b.copy_to_host(host.data(), scales_);
    for (std::int64_t e = 0; e < E; ++e)
      for (std::int64_t i = 0; i < d; ++i) diag[(e * d + i) * d + i] = host[e * d + i];
    autoglm::Tensor w(b, autoglm::DType::f32, autoglm::Shape{E, d, d});
    b.copy_from_host(w, diag.data());
    b.grouped_gemm(x, w, offsets, out);
  }

 private:
  autoglm::Tensor scales_;
};
static_assert(autoglm::ExpertBank<ScalingExperts>);

/// Routes token t to expert t % E with weight 1: a fixed round-robin gate.
class RoundRobinGate {
 public:
  RoundRobinGate(std::int64_t experts, std::int64_t hidden) : e_(experts), d_(hidden) {}
  std::int64_t num_experts() const { return e_; }
  std::int64_t hidden() const { return d_; }
  std::int64_t slots() const { return 1; }
  std::int64_t capacity(std::int64_t) const { return 0; }
  void route(autoglm::Backend& b, autoglm::TensorView x, autoglm::Routing& r) const {
    const std::int64_t T = x.dim(0);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(T));
    for (std::int64_t t = 0; t < T; ++t) ids[t] = static_cast<std::int32_t>(t % e_);
    std::vector<float> w(static_cast<std::size_t>(T), 1.0f), s(static_cast<std::size_t>(e_ + 1), 0.f);
    for (std::int64_t t = 0; t < T; ++t) s[t % e_] += 1.0f;
    r.ids = autoglm::Tensor(b, autoglm::DType::i32, autoglm::Shape{T, 1});
    r.weights = autoglm::Tensor(b, autoglm::DType::f32, autoglm::Shape{T, 1});
    r.scores = autoglm::Tensor(b, autoglm::DType::f32, autoglm::Shape{e_ + 1});
    b.copy_from_host(r.ids, ids.data());
    b.copy_from_host(r.weights, w.data());
    b.copy_from_host(r.scores, s.data());
  }

 private:
  std::int64_t e_, d_;
};
static_assert(autoglm::Gate<RoundRobinGate>);

}  // namespace

int main() {
  using namespace autoglm;
  CpuBackend backend;
  const std::int64_t E = 4, d = 8, T = 6;

  // 1. Compile-time composition: the custom expert behind the library's softmax top-2 gate.
  Tensor scales(backend, DType::f32, Shape{E, d});
  std::vector<float> s(static_cast<std::size_t>(E * d));
  for (std::int64_t i = 0; i < E * d; ++i) s[i] = 1.0f + static_cast<float>(i / d);  // expert e scales by e+1
  backend.copy_from_host(scales, s.data());
  MoELayer layer(GateNetwork::random(backend, E, d, GateOptions{}, 7), ScalingExperts(scales));
  Tensor x(backend, DType::f32, Shape{T, d});
  backend.fill_uniform(x, 3, 1.0f);
  Tensor y(backend, DType::f32, Shape{T, d});
  RoutingStats stats;
  layer.forward(backend, x, y, &stats);
  std::vector<float> xs(T * d), ys(T * d);
  backend.copy_to_host(xs.data(), x);
  backend.copy_to_host(ys.data(), y);
  fmt::print("custom ScalingExperts under GateNetwork (softmax top-2): y/x per token\n");
  for (std::int64_t t = 0; t < T; ++t) fmt::print("  token {}: {:.4f}\n", t, ys[t * d] / xs[t * d]);
  fmt::print("  tokens per expert: [{}]\n", fmt::join(stats.tokens_per_expert, " "));

  // 2. Both custom parts together: round-robin gate + scaling experts.
  MoELayer rr(RoundRobinGate(E, d), ScalingExperts(scales));
  rr.forward(backend, x, y);
  backend.copy_to_host(ys.data(), y);
  fmt::print("RoundRobinGate + ScalingExperts: y/x per token (expect t%4 + 1)\n");
  bool ok = true;
  for (std::int64_t t = 0; t < T; ++t) {
    const float ratio = ys[t * d] / xs[t * d];
    ok = ok && std::fabs(ratio - static_cast<float>(t % E + 1)) < 1e-4f;
    fmt::print("  token {}: {:.4f}\n", t, ratio);
  }

  // 3. Run-time composition: register the custom bank by name and build from JSON.
  Registry::global().add_experts("scaling", [](const BuildContext& ctx, const ComponentArgs& a) {
    Tensor sc(ctx.backend, DType::f32, Shape{ctx.num_experts, ctx.hidden});
    ctx.backend.fill(sc, static_cast<float>(a.get_float("scale", 2.0)));
    return AnyExpertBank(ScalingExperts(std::move(sc)));
  });
  const auto pipe = build_pipeline(backend, R"({"vocab": 50, "hidden": 8, "num_layers": 1,
      "gate": {"type": "softmax_topk", "num_experts": 4, "top_k": 2},
      "experts": {"type": "scaling", "scale": 0.5}})");
  const std::vector<std::int32_t> ids{1, 2, 3};
  const PipelineResult res = pipe.forward(backend, ids, true);
  fmt::print("registry-built pipeline with 'scaling' experts: logits {}, layer-0 tokens/expert [{}]\n",
             res.logits.shape().str(), fmt::join(res.layers[0].stats.tokens_per_expert, " "));
  return ok ? 0 : 1;
}
