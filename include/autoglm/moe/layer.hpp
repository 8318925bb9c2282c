// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "autoglm/backend/backend.hpp"
#include "autoglm/moe/aggregator.hpp"
#include "autoglm/moe/expert.hpp"
#include "autoglm/moe/gate.hpp"
#include "autoglm/moe/routing.hpp"

namespace autoglm {

/// Computes the host-side RoutingStats of a planned routing (copies ids, counts and scores).
template <BackendLike B>
RoutingStats routing_stats(B& backend, const Routing& r) {
  RoutingStats s;
  const std::int64_t E = r.counts.numel();
  const std::int64_t T = r.ids.numel() == 0 ? 0 : r.ids.dim(0);
  s.tokens_per_expert.resize(static_cast<std::size_t>(E));
  backend.copy_to_host(s.tokens_per_expert.data(), r.counts);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(r.ids.numel()));
  backend.copy_to_host(ids.data(), r.ids);
  std::vector<float> scores(static_cast<std::size_t>(E + 1));
  backend.copy_to_host(scores.data(), r.scores);
  std::vector<std::int64_t> assigned(static_cast<std::size_t>(E), 0);
  for (std::int32_t e : ids)
    if (e >= 0) ++assigned[static_cast<std::size_t>(e)], ++s.assignments;
  s.expert_ids = std::move(ids);
  s.dropped = s.assignments - r.rows;
  if (E > 0) {
    s.max_load = *std::max_element(s.tokens_per_expert.begin(), s.tokens_per_expert.end());
    s.mean_load = static_cast<double>(r.rows) / static_cast<double>(E);
  }
  if (T > 0 && s.assignments > 0) {
    double aux = 0.0;
    for (std::int64_t e = 0; e < E; ++e)
      aux += static_cast<double>(assigned[static_cast<std::size_t>(e)]) /
             static_cast<double>(s.assignments) * (scores[static_cast<std::size_t>(e)] / T);
    s.aux_loss = static_cast<double>(E) * aux;
    s.z_loss = scores[static_cast<std::size_t>(E)] / static_cast<double>(T);
  }
  return s;
}

/// One MoE layer: route, group tokens by expert (counting sort, no per-token GEMM), run each
/// active expert's rows as one GEMM (all experts' tiles in one parallel loop), combine.
template <typename G, typename X, typename A = WeightedSumAggregator>
requires Gate<G> && ExpertBank<X> && Aggregator<A>
class MoELayer {
 public:
  /// Checks that gate and experts agree on E and d.
  MoELayer(G gate, X experts, A aggregator = A{})
      : gate_(std::move(gate)), experts_(std::move(experts)), aggregator_(std::move(aggregator)) {
    AUTOGLM_CHECK(
        gate_.num_experts() == experts_.num_experts() && gate_.hidden() == experts_.hidden(),
        shape_mismatch, "MoELayer",
        "gate has {} experts of width {}, expert bank has {} of width {}", gate_.num_experts(),
        gate_.hidden(), experts_.num_experts(), experts_.hidden());
  }

  /// The gate.
  const G& gate() const noexcept { return gate_; }
  /// The expert bank.
  const X& experts() const noexcept { return experts_; }
  /// The aggregator.
  const A& aggregator() const noexcept { return aggregator_; }
  /// d.
  std::int64_t hidden() const noexcept { return gate_.hidden(); }
  /// The same layer with int8 experts (and shared expert); the router too when quantize_router.
  /// Needs X and A to have quantized(backend, spec), as the library's banks and aggregator do.
  MoELayer quantized(Backend& backend, const QuantSpec& spec, bool quantize_router = false) const {
    return MoELayer(quantize_router ? gate_.quantized(backend, spec) : gate_,
                    experts_.quantized(backend, spec), aggregator_.quantized(backend, spec));
  }
  /// E.
  std::int64_t num_experts() const noexcept { return gate_.num_experts(); }

  // x: [T, d] -> routing: ids/weights [T, slots], planned dispatch.
  /// Routes and plans the dispatch (counts, offsets, permutation, capacity drops).
  template <BackendLike B>
  Routing route(B& backend, TensorView x) const {
    check_input("MoELayer::route", x);
    Routing r;
    gate_.route(backend, x, r);
    const std::int64_t T = x.dim(0), S = r.ids.numel() == 0 ? 0 : r.ids.dim(1);
    const std::int64_t E = num_experts();
    r.counts = Tensor(backend, DType::i32, Shape{E});
    r.offsets = Tensor(backend, DType::i32, Shape{E + 1});
    r.row_token = Tensor(backend, DType::i32, Shape{T * S});
    r.slot_row = Tensor(backend, DType::i32, Shape{T * S});
    backend.plan_dispatch(r.ids, gate_.capacity(T), r.counts, r.offsets, r.row_token, r.slot_row);
    std::int32_t rows = 0;
    backend.copy_to_host(&rows, TensorView(r.offsets).slice(E, E + 1));
    r.rows = rows;
    return r;
  }

  // x: [T, d]; out: [T, d] (may not alias x). An empty batch is a no-op.
  /// Runs the layer; fills *stats when given.
  template <BackendLike B>
  void forward(B& backend, TensorView x, TensorView out, RoutingStats* stats = nullptr) const {
    check_input("MoELayer::forward", x);
    AUTOGLM_CHECK(out.shape == x.shape, shape_mismatch, "MoELayer::forward",
                  "out must be f32 {}, got {} {}", x.shape.str(), dtype_name(out.dtype),
                  out.shape.str());
    AUTOGLM_CHECK(out.dtype == DType::f32, dtype_mismatch, "MoELayer::forward",
                  "out must be f32 {}, got {} {}", x.shape.str(), dtype_name(out.dtype),
                  out.shape.str());
    if (x.dim(0) == 0) {
      if (stats) {
        *stats = RoutingStats{};
        stats->tokens_per_expert.assign(static_cast<std::size_t>(num_experts()), 0);
      }
      return;
    }
    const Routing r = route(backend, x);
    apply(backend, x, r, out);
    if (stats) *stats = routing_stats(backend, r);
  }

  // x: [T, d]; r: from route(backend, x); out: [T, d].
  /// Runs the experts of a planned routing and combines their rows into out.
  template <BackendLike B>
  void apply(B& backend, TensorView x, const Routing& r, TensorView out) const {
    check_input("MoELayer::apply", x);
    Tensor xr(backend, DType::f32, Shape{r.rows, hidden()});
    backend.gather_rows(x, r.row_token, xr);
    Tensor yr(backend, DType::f32, Shape{r.rows, hidden()});
    experts_.forward(backend, xr, r.offsets, yr);
    aggregator_.combine(backend, x, yr, r, out);
  }

 private:
  void check_input(std::string_view fn, const TensorView& x) const {
    AUTOGLM_CHECK(x.rank() == 2 && x.dim(1) == hidden(), shape_mismatch, fn,
                  "x must be f32 [tokens, {}], got {} {}", hidden(), dtype_name(x.dtype),
                  x.shape.str());
    AUTOGLM_CHECK(x.dtype == DType::f32, dtype_mismatch, fn,
                  "x must be f32 [tokens, {}], got {} {}", hidden(), dtype_name(x.dtype),
                  x.shape.str());
  }

  G gate_;
  X experts_;
  A aggregator_;
};

}  // namespace autoglm
