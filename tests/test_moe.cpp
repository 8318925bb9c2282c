// SPDX-License-Identifier: Apache-2.0
// MoE components: GateNetwork (every policy) against the naive router; SwiGLU / GELU expert
// banks and the shared expert against naive MLPs; MoELayer against a dense reference (every
// expert on every token, masked by routing weights) for every policy, with capacity dropping,
// RoutingStats, edge cases, bad input, and 1 vs 2 threads.
#include <limits>
#include <optional>

#include "moe_reference.hpp"
#include "support.hpp"

using namespace autoglm;
using namespace agt;

namespace {

constexpr std::int64_t kD = 32;  // hidden width
constexpr std::int64_t kF = 24;  // expert width
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

/// One layer configuration of the dense-reference sweep.
struct LayerCase {
  std::string name;
  GateOptions o;
  std::int64_t E = 8;
  bool bias = false;
  bool gelu = false;
  int shared = 0;  // 0 none, 1 ungated, 2 sigmoid-gated
};

std::vector<LayerCase> layer_cases() {
  std::vector<LayerCase> cs;
  auto add = [&](std::string name, std::int64_t E, auto setup) {
    LayerCase c;
    c.name = std::move(name);
    c.E = E;
    setup(c);
    cs.push_back(c);
  };
  add("argmax", 8, [](LayerCase& c) { c.o.policy = GatePolicy::argmax; });
  add("softmax_topk k=2", 8, [](LayerCase&) {});
  add("softmax_topk k=3 no renorm", 8, [](LayerCase& c) {
    c.o.top_k = 3;
    c.o.renormalize = false;
  });
  add("sigmoid_group zero mask", 16, [](LayerCase& c) {
    c.o.policy = GatePolicy::sigmoid_group;
    c.o.top_k = 4;
    c.o.n_group = 4;
    c.o.topk_group = 2;
    c.o.renorm_epsilon = 1e-20f;
    c.o.routed_scaling = 2.5f;
    c.bias = true;
  });
  add("sigmoid_group -inf mask + gated shared", 16, [](LayerCase& c) {
    c.o.policy = GatePolicy::sigmoid_group;
    c.o.top_k = 4;
    c.o.n_group = 4;
    c.o.topk_group = 2;
    c.o.group_mask = GroupMask::neg_inf;
    c.o.renorm_epsilon = 1e-20f;
    c.o.routed_scaling = 2.5f;
    c.bias = true;
    c.shared = 2;
  });
  add("sigmoid no groups (GLM-4.5) + shared", 8, [](LayerCase& c) {
    c.o.policy = GatePolicy::sigmoid_group;
    c.o.top_k = 2;
    c.o.renorm_epsilon = 1e-20f;
    c.bias = true;
    c.shared = 1;
  });
  add("noisy_topk", 8, [](LayerCase& c) {
    c.o.policy = GatePolicy::noisy_topk;
    c.o.noise_std = 0.5f;
    c.o.seed = 99;
  });
  add("expert_choice", 8, [](LayerCase& c) { c.o.policy = GatePolicy::expert_choice; });
  add("expert_choice factor 0.5", 8, [](LayerCase& c) {
    c.o.policy = GatePolicy::expert_choice;
    c.o.capacity_factor = 0.5f;
  });
  add("softmax_topk gelu experts", 8, [](LayerCase& c) { c.gelu = true; });
  add("softmax_topk gelu + gated shared", 4, [](LayerCase& c) {
    c.gelu = true;
    c.shared = 2;
  });
  add("softmax_topk capacity 0.6", 8, [](LayerCase& c) { c.o.capacity_factor = 0.6f; });
  add("argmax capacity 0.5", 4, [](LayerCase& c) {
    c.o.policy = GatePolicy::argmax;
    c.o.capacity_factor = 0.5f;
  });
  add("sigmoid_group capacity 1.0", 16, [](LayerCase& c) {
    c.o.policy = GatePolicy::sigmoid_group;
    c.o.top_k = 3;
    c.o.n_group = 8;
    c.o.topk_group = 3;
    c.o.capacity_factor = 1.0f;
    c.bias = true;
  });
  add("top_k = num_experts", 4, [](LayerCase& c) { c.o.top_k = 4; });
  add("E = 1 softmax", 1, [](LayerCase& c) { c.o.top_k = 1; });
  add("E = 1 argmax", 1, [](LayerCase& c) { c.o.policy = GatePolicy::argmax; });
  add("E = 1 sigmoid", 1, [](LayerCase& c) {
    c.o.policy = GatePolicy::sigmoid_group;
    c.o.top_k = 1;
    c.bias = true;
  });
  add("E = 1 noisy", 1, [](LayerCase& c) {
    c.o.policy = GatePolicy::noisy_topk;
    c.o.top_k = 1;
  });
  add("E = 1 expert_choice", 1, [](LayerCase& c) {
    c.o.policy = GatePolicy::expert_choice;
    c.o.top_k = 1;
  });
  return cs;
}

/// Builds the case's layer, runs it on x [T, d], and checks routing, output and statistics.
template <typename Bank>
void run_layer_case(Backend& b, const LayerCase& c, std::int64_t T, std::uint64_t seed) {
  const std::int64_t E = c.E, d = kD;
  GateNetwork gate = GateNetwork::random(b, E, d, c.o, seed, c.bias);
  Bank bank = Bank::random(b, E, d, kF, seed + 10);
  WeightedSumAggregator agg;
  HostShared hs;
  if (c.shared) {
    SwiGluExperts mlp = SwiGluExperts::random(b, 1, d, 16, seed + 20);
    hs.mlp = host_bank(b, mlp);
    Tensor g;
    if (c.shared == 2) {
      g = uniform(b, Shape{1, d}, seed + 30, 0.5f);
      hs.gate = host_f32(b, g);
    }
    agg = WeightedSumAggregator(SharedExpert(std::move(mlp), std::move(g)));
  }
  const std::vector<float> W = host_f32(b, gate.weight());
  const std::vector<float> bias = c.bias ? host_f32(b, gate.bias()) : std::vector<float>{};
  const auto hbank = host_bank(b, bank);
  MoELayer layer(std::move(gate), std::move(bank), std::move(agg));

  Tensor x = uniform(b, Shape{T, d}, seed + 40);
  const std::vector<float> hx = host_f32(b, x);
  Tensor out = tensor_f32(b, Shape{T, d}, std::vector<float>(T * d, kNaN));  // must be overwritten
  RoutingStats stats;
  layer.forward(b, x, out, &stats);

  const Routing r = layer.route(b, x);
  const auto ids = host_i32(b, r.ids);
  const auto wts = host_f32(b, r.weights);
  const RefRouting rr = reference_routing(c.o, W, bias, hx, T, E, d);
  REQUIRE(r.ids.dim(1) == rr.route.slots);
  const std::vector<double> M = check_routing(rr, ids, wts, T, E);
  check_close(host_f32(b, r.scores), rr.route.stats, 2e-5, 2e-5, "router scores");
  std::vector<double> want = ref::dense_moe(hbank, hx, M, T, E, d);
  if (c.shared) hs.add_to(want, hx, T, d);
  check_close(host_f32(b, out), want, 2e-5, 1e-4, "layer output");

  // RoutingStats against the reference.
  const ref::Dispatch plan = ref::plan(ids, T, rr.route.slots, E, rr.capacity);
  CHECK(stats.tokens_per_expert == plan.counts);
  CHECK(host_i32(b, r.counts) == plan.counts);
  CHECK(r.rows == plan.rows);
  std::int64_t assignments = 0;
  std::vector<double> assigned(static_cast<std::size_t>(E), 0.0);
  for (std::int32_t e : ids)
    if (e >= 0) ++assignments, ++assigned[e];
  CHECK(stats.assignments == assignments);
  CHECK(stats.dropped == assignments - plan.rows);
  CHECK(stats.max_load == *std::max_element(plan.counts.begin(), plan.counts.end()));
  CHECK(stats.mean_load == Approx(static_cast<double>(plan.rows) / E));
  double aux = 0.0;
  for (std::int64_t e = 0; e < E; ++e) aux += assigned[e] / assignments * (rr.route.stats[e] / T);
  CHECK(stats.aux_loss == Approx(E * aux).epsilon(1e-5));
  CHECK(stats.z_loss == Approx(rr.route.stats[E] / T).epsilon(1e-5));
  if (rr.capacity == 0 && !rr.expert_choice) CHECK(stats.dropped == 0);
}

Backend& test_backend() {
  static CpuBackend b;  // all hardware threads
  return b;
}

}  // namespace

TEST_CASE("MoELayer matches the dense reference for every gate policy", "[moe]") {
  Backend& b = test_backend();
  std::uint64_t seed = 1000;
  for (const LayerCase& c : layer_cases()) {
    for (std::int64_t T : {1, 37}) {
      seed += 100;
      DYNAMIC_SECTION(c.name << ", T=" << T) {
        if (c.gelu)
          run_layer_case<GeluExperts>(b, c, T, seed);
        else
          run_layer_case<SwiGluExperts>(b, c, T, seed);
      }
    }
  }
}

TEST_CASE("GateNetwork: argmax weights are exactly 1, capacity formula", "[moe]") {
  Backend& b = test_backend();
  GateOptions o;
  o.policy = GatePolicy::argmax;
  o.top_k = 5;  // ignored by argmax
  const GateNetwork g = GateNetwork::random(b, 8, kD, o, 5);
  CHECK(g.slots() == 1);
  Routing r;
  g.route(b, uniform(b, Shape{64, kD}, 6), r);
  CHECK(host_f32(b, r.weights) == std::vector<float>(64, 1.0f));

  for (auto [cf, T, k, E] : {std::tuple{1.0f, 64, 2, 8}, std::tuple{1.25f, 10, 2, 8},
                             std::tuple{0.01f, 3, 1, 16}, std::tuple{2.0f, 7, 3, 4}}) {
    GateOptions q;
    q.top_k = k;
    q.capacity_factor = cf;
    const GateNetwork gq = GateNetwork::random(b, E, kD, q, 1);
    const auto want = std::max<std::int64_t>(
        1, static_cast<std::int64_t>(std::ceil(static_cast<double>(cf) * T * k / E)));
    CHECK(gq.capacity(T) == want);
  }
  GateOptions unlimited;
  CHECK(GateNetwork::random(b, 8, kD, unlimited, 1).capacity(1000) == 0);
  GateOptions ec;
  ec.policy = GatePolicy::expert_choice;
  CHECK(GateNetwork::random(b, 8, kD, ec, 1).slots() == 8);
}

TEST_CASE("GateNetwork rejects bad options and inputs", "[moe][errors]") {
  Backend& b = test_backend();
  Tensor w = uniform(b, Shape{8, kD}, 1);
  auto opts = [](auto f) {
    GateOptions o;
    f(o);
    return o;
  };
  REQUIRE_ERROR(GateNetwork(w, Tensor(), opts([](GateOptions& o) { o.top_k = 0; })),
                invalid_argument, "[GateNetwork]", "top_k=0 outside [1, num_experts=8]");
  REQUIRE_ERROR(GateNetwork(w, Tensor(), opts([](GateOptions& o) { o.top_k = 9; })),
                invalid_argument, "[GateNetwork]", "top_k=9 outside [1, num_experts=8]");
  for (float cf : {0.0f, -1.0f}) {
    REQUIRE_ERROR(GateNetwork(w, Tensor(), opts([cf](GateOptions& o) { o.capacity_factor = cf; })),
                  invalid_argument, "[GateNetwork]",
                  fmt::format("capacity_factor={} must be > 0", cf));
  }
  REQUIRE_ERROR(GateNetwork(w, Tensor(), opts([](GateOptions& o) { o.capacity_factor = kNaN; })),
                invalid_argument, "[GateNetwork]", "capacity_factor=nan");
  REQUIRE_ERROR(GateNetwork(w, Tensor(), opts([](GateOptions& o) { o.capacity_factor = kInf; })),
                invalid_argument, "[GateNetwork]", "capacity_factor=inf");
  REQUIRE_ERROR(GateNetwork(w, Tensor(), opts([](GateOptions& o) {
                              o.policy = GatePolicy::noisy_topk;
                              o.noise_std = -0.5f;
                            })),
                invalid_argument, "[GateNetwork]", "noise_std=-0.5");
  REQUIRE_ERROR(GateNetwork(w, uniform(b, Shape{7}, 2), GateOptions{}), shape_mismatch,
                "[GateNetwork]", "selection bias must hold 8 values, got 7");
  REQUIRE_ERROR(GateNetwork(uniform(b, Shape{8 * kD}, 1), Tensor(), GateOptions{}), shape_mismatch,
                "[GateNetwork]", "router weight must be float (f32, bf16, f16) or int8 [E, d]",
                "[256]");
  REQUIRE_ERROR(GateNetwork(Tensor(b, DType::f32, Shape{0, kD}), Tensor(), GateOptions{}),
                invalid_argument, "[GateNetwork]", "num_experts=0");
  REQUIRE_ERROR(GateNetwork::random(b, 0, kD, GateOptions{}, 1), invalid_argument,
                "[GateNetwork::random]", "num_experts=0");

  const GateNetwork g(w, Tensor(), GateOptions{});
  Routing r;
  REQUIRE_ERROR(g.route(b, uniform(b, Shape{3, kD + 1}, 3), r), shape_mismatch,
                "[GateNetwork::route]", "x must be [tokens, 32], got [3, 33]");
  // Group parameters are validated where they are used, by the backend's router.
  const GateNetwork bad_groups(w, Tensor(), opts([](GateOptions& o) {
                                 o.policy = GatePolicy::sigmoid_group;
                                 o.n_group = 3;
                               }));
  REQUIRE_ERROR(bad_groups.route(b, uniform(b, Shape{3, kD}, 3), r), invalid_argument,
                "route_topk]", "n_group=3 does not divide num_experts=8");
}

TEST_CASE("SwiGluExperts and GeluExperts match naive per-expert MLPs", "[moe]") {
  Backend& b = test_backend();
  const std::int64_t E = 4, R = 23, d = kD;
  const std::vector<std::int32_t> off{0, 5, 5, 12, 23};  // expert 1 has no rows
  Tensor x = uniform(b, Shape{R, d}, 7);
  const auto hx = host_f32(b, x);
  Tensor offsets = tensor_i32(b, Shape{E + 1}, off);
  auto check_bank = [&](const auto& bank, const auto& hb, const char* what) {
    Tensor out(b, DType::f32, Shape{R, d});
    bank.forward(b, x, offsets, out);
    std::vector<double> want(static_cast<std::size_t>(R * d));
    for (std::int64_t e = 0; e < E; ++e)
      for (std::int64_t r = off[e]; r < off[e + 1]; ++r) {
        const auto y = hb(e, hx.data() + r * d);
        std::copy(y.begin(), y.end(), want.begin() + r * d);
      }
    check_close(host_f32(b, out), want, 1e-5, 1e-4, what);
  };
  const SwiGluExperts sw = SwiGluExperts::random(b, E, d, kF, 8);
  CHECK(sw.num_experts() == E);
  CHECK(sw.hidden() == d);
  CHECK(sw.ffn() == kF);
  check_bank(sw, host_bank(b, sw), "swiglu");
  const GeluExperts ge = GeluExperts::random(b, E, d, kF, 9);
  CHECK(ge.ffn() == kF);
  check_bank(ge, host_bank(b, ge), "gelu");

  SECTION("SwiGLU takes gate rows first (transformers gate_up_proj layout)") {
    // One expert, F = 1, d = 1: gate weight 2, up weight 3, down weight 1: y = silu(2x) * 3x.
    SwiGluExperts one(tensor_f32(b, Shape{1, 2, 1}, {2.0f, 3.0f}),
                      tensor_f32(b, Shape{1, 1, 1}, {1.0f}));
    Tensor xo = tensor_f32(b, Shape{1, 1}, {0.5f}), o(b, DType::f32, Shape{1, 1});
    one.forward(b, xo, tensor_i32(b, Shape{2}, {0, 1}), o);
    CHECK(host_f32(b, o)[0] == Approx(ref::silu(1.0) * 1.5).epsilon(1e-6));
  }
  SECTION("an empty batch is a no-op") {
    Tensor e0(b, DType::f32, Shape{0, d});
    sw.forward(b, e0, tensor_i32(b, Shape{E + 1}, {0, 0, 0, 0, 0}), e0);
    ge.forward(b, e0, tensor_i32(b, Shape{E + 1}, {0, 0, 0, 0, 0}), e0);
  }
  SECTION("bad shapes") {
    REQUIRE_ERROR(SwiGluExperts(uniform(b, Shape{4, 7, d}, 1), uniform(b, Shape{4, d, 3}, 2)),
                  shape_mismatch, "[SwiGluExperts]", "[E, 2F, d]", "[4, 7, 32]");
    REQUIRE_ERROR(SwiGluExperts(uniform(b, Shape{4, 8, d}, 1), uniform(b, Shape{4, d, 5}, 2)),
                  shape_mismatch, "[SwiGluExperts]", "down must be [4, 32, 4], got [4, 32, 5]");
    REQUIRE_ERROR(SwiGluExperts(uniform(b, Shape{4, 8}, 1), uniform(b, Shape{4, d, 4}, 2)),
                  shape_mismatch, "[SwiGluExperts]", "rank 3");
    REQUIRE_ERROR(GeluExperts(uniform(b, Shape{4, 8, d}, 1), uniform(b, Shape{3, d, 8}, 2)),
                  shape_mismatch, "[GeluExperts]", "w2 must be [4, 32, 8], got [3, 32, 8]");
    REQUIRE_ERROR(SwiGluExperts::random(b, 0, d, 4, 1), invalid_argument, "[SwiGluExperts::random]",
                  "experts=0");
    Tensor out(b, DType::f32, Shape{R, d});
    REQUIRE_ERROR(sw.forward(b, x, tensor_i32(b, Shape{E}, {0, 5, 5, 12}), out), shape_mismatch,
                  "[SwiGluExperts::forward]", "offsets must be 5 i32 values");
    REQUIRE_ERROR(sw.forward(b, uniform(b, Shape{R, d - 1}, 1), offsets, out), shape_mismatch,
                  "[SwiGluExperts::forward]", "x must be [rows, 32], got [23, 31]");
    REQUIRE_ERROR(ge.forward(b, x, offsets, Tensor(b, DType::f32, Shape{R - 1, d})), shape_mismatch,
                  "[GeluExperts::forward]", "out [22, 32] must match x [23, 32]");
  }
}

TEST_CASE("SharedExpert adds its (sigmoid-gated) MLP to every token", "[moe]") {
  Backend& b = test_backend();
  const std::int64_t T = 19, d = kD;
  Tensor x = uniform(b, Shape{T, d}, 11);
  const auto hx = host_f32(b, x);
  const auto prev = random_floats(T * d, 12);
  for (bool gated : {false, true}) {
    DYNAMIC_SECTION((gated ? "gated" : "ungated")) {
      SwiGluExperts mlp = SwiGluExperts::random(b, 1, d, 20, 13);
      HostShared hs{host_bank(b, mlp), {}};
      Tensor g;
      if (gated) {
        g = uniform(b, Shape{1, d}, 14, 0.7f);
        hs.gate = host_f32(b, g);
      }
      const SharedExpert se(std::move(mlp), std::move(g));
      Tensor out = tensor_f32(b, Shape{T, d}, prev);
      se.accumulate(b, x, out);  // out += shared(x)
      std::vector<double> want(prev.begin(), prev.end());
      hs.add_to(want, hx, T, d);
      check_close(host_f32(b, out), want, 1e-5, 1e-4, "shared expert");
    }
  }
  REQUIRE_ERROR(SharedExpert(SwiGluExperts::random(b, 2, d, 8, 1)), shape_mismatch,
                "[SharedExpert]", "one-expert bank, got 2 experts");
  REQUIRE_ERROR(SharedExpert(SwiGluExperts::random(b, 1, d, 8, 1), uniform(b, Shape{1, d + 1}, 2)),
                shape_mismatch, "[SharedExpert]", "gate must be f32 [1, 32], got [1, 33]");
}

TEST_CASE("MoELayer capacity: dropped slots contribute nothing, weights are not renormalised",
          "[moe]") {
  Backend& b = test_backend();
  const std::int64_t E = 4, T = 20, d = kD;
  // Every token prefers expert 2: router row 2 is positive, the rest zero, and x > 0.
  std::vector<float> W(static_cast<std::size_t>(E * d), 0.0f);
  for (std::int64_t c = 0; c < d; ++c) W[2 * d + c] = 0.05f;
  auto hx = random_floats(T * d, 21, 0.1f, 1.0f);
  Tensor x = tensor_f32(b, Shape{T, d}, hx);
  const SwiGluExperts bank = SwiGluExperts::random(b, E, d, kF, 22);
  const ref::SwiGlu hb = host_bank(b, bank);

  SECTION("top-1, capacity 5: the five earliest tokens keep expert 2, the rest output zero") {
    GateOptions o;
    o.top_k = 1;
    o.capacity_factor = 1.0f;  // ceil(1 * 20 * 1 / 4) = 5 rows per expert
    MoELayer layer(GateNetwork(tensor_f32(b, Shape{E, d}, W), Tensor(), o), bank);
    Tensor out(b, DType::f32, Shape{T, d});
    RoutingStats s;
    layer.forward(b, x, out, &s);
    CHECK(s.tokens_per_expert == std::vector<std::int32_t>{0, 0, 5, 0});
    CHECK(s.assignments == T);
    CHECK(s.dropped == 15);
    CHECK(s.max_load == 5.0);
    CHECK(s.mean_load == Approx(5.0 / 4.0));
    const auto h = host_f32(b, out);
    std::vector<double> want(static_cast<std::size_t>(T * d), 0.0);
    for (std::int64_t t = 0; t < 5; ++t) {
      const auto y = hb(2, hx.data() + t * d);
      std::copy(y.begin(), y.end(), want.begin() + t * d);
    }
    check_close(h, want, 1e-5, 1e-4, "capacity output");
    CHECK(std::all_of(h.begin() + 5 * d, h.end(), [](float v) { return v == 0.0f; }));
  }
  SECTION("no capacity: all tokens to one expert") {
    GateOptions o;
    o.top_k = 1;
    MoELayer layer(GateNetwork(tensor_f32(b, Shape{E, d}, W), Tensor(), o), bank);
    Tensor out(b, DType::f32, Shape{T, d});
    RoutingStats s;
    layer.forward(b, x, out, &s);
    CHECK(s.tokens_per_expert == std::vector<std::int32_t>{0, 0, T, 0});
    CHECK(s.dropped == 0);
    std::vector<double> M(static_cast<std::size_t>(T * E), 0.0);
    for (std::int64_t t = 0; t < T; ++t) M[t * E + 2] = 1.0;
    check_close(host_f32(b, out), ref::dense_moe(hb, hx, M, T, E, d), 1e-5, 1e-4, "one expert");
  }
  SECTION("top-2 without renormalisation keeps each slot's own weight when its partner drops") {
    GateOptions o;
    o.top_k = 2;
    o.renormalize = false;
    o.capacity_factor = 0.5f;  // ceil(0.5 * 20 * 2 / 4) = 5
    MoELayer layer(GateNetwork(tensor_f32(b, Shape{E, d}, W), Tensor(), o), bank);
    Tensor out(b, DType::f32, Shape{T, d});
    layer.forward(b, x, out);
    const Routing r = layer.route(b, x);
    const auto ids = host_i32(b, r.ids), sr = host_i32(b, r.slot_row);
    const auto wts = host_f32(b, r.weights);
    const std::vector<double> logits = ref::matmul_nt(hx, W, T, E, d);
    RouteParams p;
    p.top_k = 2;
    p.renormalize = false;
    const ref::Route rr = ref::route_topk(logits, T, E, {}, p);
    const auto w = ref::check_topk(rr, ids, wts, p);
    // Slot 0: expert 2 for tokens 0..4; slot 1: expert 0 (tie of zero logits -> lowest index)
    // for tokens 0..4 as well; everything else dropped.
    const ref::Dispatch plan = ref::plan(ids, T, 2, E, 5);
    CHECK(plan.counts == std::vector<std::int32_t>{5, 0, 5, 0});
    for (std::int64_t i = 0; i < T * 2; ++i) CHECK((sr[i] >= 0) == static_cast<bool>(plan.kept[i]));
    check_close(host_f32(b, out),
                ref::dense_moe(hb, hx, ref::dense_mask(ids, w, plan.kept, T, 2, E), T, E, d), 1e-5,
                1e-4, "top-2 capacity");
  }
}

TEST_CASE("RoutingStats: uniform router gives aux_loss 1 and z_loss (ln E)^2", "[moe]") {
  Backend& b = test_backend();
  const std::int64_t E = 8, T = 16;
  Tensor W(b, DType::f32, Shape{E, kD});
  b.fill(W, 0.0f);  // all logits 0: P_e = 1/E, every token picks experts 0 and 1 (ties)
  MoELayer layer(GateNetwork(W, Tensor(), GateOptions{}), SwiGluExperts::random(b, E, kD, 8, 1));
  Tensor x = uniform(b, Shape{T, kD}, 2), out(b, DType::f32, Shape{T, kD});
  RoutingStats s;
  layer.forward(b, x, out, &s);
  CHECK(s.tokens_per_expert == std::vector<std::int32_t>{T, T, 0, 0, 0, 0, 0, 0});
  CHECK(s.assignments == 2 * T);
  CHECK(s.max_load == T);
  CHECK(s.mean_load == Approx(2.0 * T / E));
  CHECK(s.aux_loss == Approx(1.0).epsilon(1e-6));
  CHECK(s.z_loss == Approx(std::log(8.0) * std::log(8.0)).epsilon(1e-6));
}

TEST_CASE("MoELayer: empty batch, bad input", "[moe][errors]") {
  Backend& b = test_backend();
  const std::int64_t E = 4, d = kD;
  MoELayer layer(GateNetwork::random(b, E, d, GateOptions{}, 1),
                 SwiGluExperts::random(b, E, d, 8, 2));
  CHECK(layer.num_experts() == E);
  CHECK(layer.hidden() == d);

  SECTION("an empty batch is a no-op with zero statistics") {
    Tensor x(b, DType::f32, Shape{0, d}), out(b, DType::f32, Shape{0, d});
    RoutingStats s;
    s.assignments = 7;
    layer.forward(b, x, out, &s);
    CHECK(s.tokens_per_expert == std::vector<std::int32_t>(E, 0));
    CHECK(s.assignments == 0);
    CHECK(s.aux_loss == 0.0);
    const Routing r = layer.route(b, x);
    CHECK(r.rows == 0);
    CHECK(host_i32(b, r.offsets) == std::vector<std::int32_t>(E + 1, 0));
  }
  SECTION("mismatched parts") {
    REQUIRE_ERROR(MoELayer(GateNetwork::random(b, E, d, GateOptions{}, 1),
                           SwiGluExperts::random(b, E + 1, d, 8, 2)),
                  shape_mismatch, "[MoELayer]",
                  "gate has 4 experts of width 32, expert bank has 5 of width 32");
    REQUIRE_ERROR(MoELayer(GateNetwork::random(b, E, d, GateOptions{}, 1),
                           GeluExperts::random(b, E, d + 8, 8, 2)),
                  shape_mismatch, "[MoELayer]", "expert bank has 4 of width 40");
  }
  SECTION("shape and dtype of x and out") {
    Tensor out(b, DType::f32, Shape{3, d});
    REQUIRE_ERROR(layer.forward(b, uniform(b, Shape{3, d - 16}, 1), out), shape_mismatch,
                  "[MoELayer::forward]", "x must be f32 [tokens, 32], got f32 [3, 16]");
    REQUIRE_ERROR(layer.forward(b, uniform(b, Shape{3, d, 1}, 1), out), shape_mismatch,
                  "[MoELayer::forward]", "[3, 32, 1]");
    REQUIRE_ERROR(layer.forward(b, Tensor(b, DType::f16, Shape{3, d}), out), dtype_mismatch,
                  "[MoELayer::forward]", "got f16 [3, 32]");
    REQUIRE_ERROR(
        layer.forward(b, uniform(b, Shape{3, d}, 1), Tensor(b, DType::f32, Shape{3, d - 1})),
        shape_mismatch, "[MoELayer::forward]", "out must be f32 [3, 32], got f32 [3, 31]");
    REQUIRE_ERROR(layer.forward(b, uniform(b, Shape{3, d}, 1), Tensor(b, DType::bf16, Shape{3, d})),
                  dtype_mismatch, "[MoELayer::forward]", "got bf16 [3, 32]");
    REQUIRE_ERROR(layer.route(b, uniform(b, Shape{3, d + 1}, 1)), shape_mismatch,
                  "[MoELayer::route]");
  }
  SECTION("NaN / Inf input reaches the router as non-finite logits") {
    for (float bad : {kNaN, kInf}) {
      auto h = random_floats(3 * d, 5);
      h[1 * d + 4] = bad;
      Tensor out(b, DType::f32, Shape{3, d});
      REQUIRE_ERROR(layer.forward(b, tensor_f32(b, Shape{3, d}, h), out), numeric, "route_topk]",
                    "router logit [1, ");
      GateOptions ec;
      ec.policy = GatePolicy::expert_choice;
      MoELayer ecl(GateNetwork::random(b, E, d, ec, 1), SwiGluExperts::random(b, E, d, 8, 2));
      REQUIRE_ERROR(ecl.forward(b, tensor_f32(b, Shape{3, d}, h), out), numeric,
                    "route_expert_choice]", "router logit [1, ");
    }
  }
}

TEST_CASE("MoELayer output is bit-identical with 1 and 2 oneTBB threads", "[moe][threads]") {
  CpuBackend b1(CpuBackendOptions{1}), b2(CpuBackendOptions{2});
  const std::int64_t T = 160, d = kD;  // several router statistic blocks and GEMM tiles
  std::uint64_t seed = 5000;
  for (const LayerCase& c : layer_cases()) {
    seed += 100;
    DYNAMIC_SECTION(c.name) {
      auto run = [&](CpuBackend& b) {
        GateNetwork gate = GateNetwork::random(b, c.E, d, c.o, seed, c.bias);
        WeightedSumAggregator agg;
        if (c.shared)
          agg = WeightedSumAggregator(
              SharedExpert(SwiGluExperts::random(b, 1, d, 16, seed + 20),
                           c.shared == 2 ? uniform(b, Shape{1, d}, seed + 30) : Tensor()));
        Tensor x = uniform(b, Shape{T, d}, seed + 40), out(b, DType::f32, Shape{T, d});
        RoutingStats s;
        std::vector<float> scores;
        if (c.gelu) {
          MoELayer l(std::move(gate), GeluExperts::random(b, c.E, d, kF, seed + 10),
                     std::move(agg));
          l.forward(b, x, out, &s);
          scores = host_f32(b, l.route(b, x).scores);
        } else {
          MoELayer l(std::move(gate), SwiGluExperts::random(b, c.E, d, kF, seed + 10),
                     std::move(agg));
          l.forward(b, x, out, &s);
          scores = host_f32(b, l.route(b, x).scores);
        }
        return std::tuple{host_f32(b, out), s, scores};
      };
      const auto [o1, s1, sc1] = run(b1);
      const auto [o2, s2, sc2] = run(b2);
      check_bitwise(o1, o2, "output");
      check_bitwise(sc1, sc2, "router scores");
      CHECK(s1.tokens_per_expert == s2.tokens_per_expert);
      CHECK(s1.aux_loss == s2.aux_loss);
      CHECK(s1.z_loss == s2.z_loss);
    }
  }
}
