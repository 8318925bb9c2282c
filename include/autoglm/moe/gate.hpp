// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>

#include "autoglm/backend/backend.hpp"
#include "autoglm/moe/routing.hpp"
#include "autoglm/quant/quantize.hpp"

namespace autoglm {

/// A router: fills Routing::ids / weights [T, slots()] and Routing::scores [E + 1] for the
/// tokens x [T, d]. capacity(T) bounds the rows an expert takes (<= 0: unbounded).
template <typename G, typename B = Backend>
concept Gate = BackendLike<B> &&
    requires(const G& g, B& b, TensorView x, Routing& r, std::int64_t tokens) {
  { g.num_experts() } -> std::convertible_to<std::int64_t>;
  { g.hidden() } -> std::convertible_to<std::int64_t>;
  { g.slots() } -> std::convertible_to<std::int64_t>;
  { g.capacity(tokens) } -> std::convertible_to<std::int64_t>;
  g.route(b, x, r);
};

/// Routing policies of GateNetwork.
enum class GatePolicy : std::uint8_t {
  argmax,         ///< top-1 by logit, weight 1 (the design documents' route_to_experts)
  softmax_topk,   ///< softmax -> top-k, optional renormalisation (Mixtral, Qwen, OLMoE)
  sigmoid_group,  ///< sigmoid + selection bias + group-limited top-k + scaling (DeepSeek-V3, GLM)
  noisy_topk,     ///< softmax top-k over logits plus seeded Gaussian noise
  expert_choice,  ///< each expert takes its top-C tokens
};

/// Name of a policy as used in JSON descriptions ("softmax_topk").
constexpr std::string_view gate_policy_name(GatePolicy p) noexcept {
  switch (p) {
    case GatePolicy::argmax:
      return "argmax";
    case GatePolicy::softmax_topk:
      return "softmax_topk";
    case GatePolicy::sigmoid_group:
      return "sigmoid_group";
    case GatePolicy::noisy_topk:
      return "noisy_topk";
    case GatePolicy::expert_choice:
      return "expert_choice";
  }
  return "?";
}

/// Options of GateNetwork. Defaults are Mixtral's.
struct GateOptions {
  GatePolicy policy = GatePolicy::softmax_topk;  ///< how experts are chosen
  int top_k = 2;                                 ///< experts per token, in [1, E]
  bool renormalize = true;                       ///< divide the k weights by their sum
  float renorm_epsilon = 0.0f;                ///< added to that sum (transformers sigmoid: 1e-20)
  float routed_scaling = 1.0f;                ///< weights *= this (DeepSeek-V3: 2.5)
  int n_group = 1;                            ///< expert groups for group-limited routing
  int topk_group = 1;                         ///< groups kept per token
  GroupMask group_mask = GroupMask::neg_inf;  ///< value of discarded groups (transformers 5.x)
  float noise_std = 1.0f;                     ///< noisy_topk: std of the logit noise
  std::uint64_t seed = 0;                     ///< noisy_topk: noise seed
  /// Rows per expert = ceil(capacity_factor * T * k / E); tokens past it are dropped (they keep
  /// only the residual). nullopt: no limit. For expert_choice, C = ceil(factor * T / E) with
  /// factor defaulting to top_k. Must be > 0 when set.
  std::optional<float> capacity_factor;
};

/// The default gate: a linear router weight [E, d] plus optional selection bias [E], under one
/// of the GatePolicy policies.
class GateNetwork {
 public:
  // weight: [E, d] f32 (or int8 when the router is quantized); bias: [E] f32 or empty.
  /// Validates the options against the weight; bad values are an Error naming them.
  GateNetwork(Weight weight, Tensor bias, GateOptions options)
      : weight_(std::move(weight)), bias_(std::move(bias)), options_(options) {
    constexpr std::string_view fn = "GateNetwork";
    AUTOGLM_CHECK(weight_.shape().rank() == 2 && detail::is_float_or_int8(weight_), shape_mismatch,
                  fn, "router weight must be float (f32, bf16, f16) or int8 [E, d], got {}",
                  weight_.shape().str());
    const std::int64_t E = weight_.dim(0);
    AUTOGLM_CHECK(E >= 1, invalid_argument, fn, "num_experts={} must be >= 1", E);
    if (options_.policy == GatePolicy::argmax) options_.top_k = 1;  // before top_k is checked
    AUTOGLM_CHECK(options_.top_k >= 1 && options_.top_k <= E, invalid_argument, fn,
                  "top_k={} outside [1, num_experts={}]", options_.top_k, E);
    AUTOGLM_CHECK(bias_.numel() == 0 || bias_.numel() == E, shape_mismatch, fn,
                  "selection bias must hold {} values, got {}", E, bias_.numel());
    if (options_.capacity_factor) {
      const float cf = *options_.capacity_factor;
      AUTOGLM_CHECK(cf > 0.0f && std::isfinite(cf), invalid_argument, fn,
                    "capacity_factor={} must be > 0", cf);
    }
    weight_ = detail::prepared(std::move(weight_));
    AUTOGLM_CHECK(options_.policy != GatePolicy::noisy_topk || options_.noise_std >= 0.0f,
                  invalid_argument, fn, "noise_std={} must be >= 0", options_.noise_std);
  }

  /// E.
  std::int64_t num_experts() const noexcept { return weight_.dim(0); }
  /// d.
  std::int64_t hidden() const noexcept { return weight_.dim(1); }
  /// Columns of Routing::ids: k, or E for expert choice.
  std::int64_t slots() const noexcept {
    return options_.policy == GatePolicy::expert_choice ? num_experts() : options_.top_k;
  }
  /// Rows an expert may take for T tokens; 0 = unbounded.
  std::int64_t capacity(std::int64_t tokens) const noexcept {
    if (!options_.capacity_factor) return 0;
    const double per_expert = static_cast<double>(*options_.capacity_factor) *
                              static_cast<double>(tokens) * options_.top_k /
                              static_cast<double>(num_experts());
    return std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(per_expert)));
  }
  /// The options in force.
  const GateOptions& options() const noexcept { return options_; }
  /// Router weight [E, d], in the backend's weight layout.
  const Weight& weight() const noexcept { return weight_; }
  /// The same gate with an int8 router weight (llama.cpp keeps routers f32; so does QuantConfig
  /// unless asked).
  GateNetwork quantized(Backend& backend, const QuantSpec& spec) const {
    return GateNetwork(quantize_weight(backend, weight_, spec, "router"), bias_, options_);
  }
  /// Selection bias [E] (may be empty).
  const Tensor& bias() const noexcept { return bias_; }

  // x: [T, d] -> r.ids, r.weights: [T, slots()], r.scores: [E + 1].
  /// Routes the tokens; allocates the Routing tensors it fills.
  template <BackendLike B>
  void route(B& backend, TensorView x, Routing& r) const {
    AUTOGLM_CHECK(x.rank() == 2 && x.dim(1) == hidden(), shape_mismatch, "GateNetwork::route",
                  "x must be [tokens, {}], got {}", hidden(), x.shape.str());
    const std::int64_t T = x.dim(0), E = num_experts();
    Tensor logits(backend, DType::f32, Shape{T, E});
    linear(backend, x, weight_, logits);
    r.ids = Tensor(backend, DType::i32, Shape{T, slots()});
    r.weights = Tensor(backend, DType::f32, Shape{T, slots()});
    r.scores = Tensor(backend, DType::f32, Shape{E + 1});
    if (options_.policy == GatePolicy::expert_choice) {
      const double factor = options_.capacity_factor.value_or(static_cast<float>(options_.top_k));
      const auto c = static_cast<std::int64_t>(
          std::ceil(factor * static_cast<double>(T) / static_cast<double>(E)));
      backend.route_expert_choice(logits, std::max<std::int64_t>(c, 1), r.ids, r.weights, r.scores);
      return;
    }
    backend.route_topk(logits, bias_, route_params(), r.ids, r.weights, r.scores);
  }

  /// The backend parameters this gate's policy maps to.
  RouteParams route_params() const noexcept {
    RouteParams p;
    p.top_k = options_.top_k;
    p.renormalize = options_.renormalize;
    p.renorm_epsilon = options_.renorm_epsilon;
    p.routed_scaling = options_.routed_scaling;
    switch (options_.policy) {
      case GatePolicy::argmax:
        p.top_k = 1;
        p.renormalize = true;  // the single weight becomes exactly 1
        p.renorm_epsilon = 0.0f;
        p.routed_scaling = 1.0f;
        break;
      case GatePolicy::sigmoid_group:
        p.score = ScoreFunc::sigmoid;
        p.n_group = options_.n_group;
        p.topk_group = options_.topk_group;
        p.group_mask = options_.group_mask;
        break;
      case GatePolicy::noisy_topk:
        p.noise_std = options_.noise_std;
        p.seed = options_.seed;
        break;
      default:
        break;
    }
    return p;
  }

  /// A gate with weights uniform in +-1/sqrt(d) drawn from `seed` (bias zero when wanted).
  template <BackendLike B>
  static GateNetwork random(B& backend, std::int64_t experts, std::int64_t hidden,
                            GateOptions options, std::uint64_t seed, bool with_bias = false) {
    AUTOGLM_CHECK(experts >= 1 && hidden >= 1, invalid_argument, "GateNetwork::random",
                  "num_experts={} and hidden={} must be >= 1", experts, hidden);
    Tensor w(backend, DType::f32, Shape{experts, hidden}, backend.weight_layout());
    backend.fill_uniform(w, seed, 1.0f / std::sqrt(static_cast<float>(hidden)));
    Tensor b;
    if (with_bias) {
      b = Tensor(backend, DType::f32, Shape{experts});
      backend.fill_uniform(b, seed + 1, 0.1f);
    }
    return GateNetwork(std::move(w), std::move(b), options);
  }

 private:
  Weight weight_;
  Tensor bias_;
  GateOptions options_;
};

static_assert(Gate<GateNetwork>);

}  // namespace autoglm
