// SPDX-License-Identifier: Apache-2.0
#include "autoglm/moe/registry.hpp"

#include <charconv>
#include <cmath>
#include <limits>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

namespace autoglm {
namespace {

std::string key_path(const ComponentArgs& a, std::string_view key) {
  return a.where().empty() ? std::string(key) : fmt::format("{}.{}", a.where(), key);
}

GateFactory builtin_gate(GatePolicy policy) {
  return [policy](const BuildContext& ctx, const ComponentArgs& a) -> AnyGate {
    GateOptions o;
    o.policy = policy;
    o.top_k = static_cast<int>(a.get_int("top_k", policy == GatePolicy::argmax ? 1 : 2));
    o.renormalize = a.get_bool("renormalize", policy != GatePolicy::noisy_topk);
    o.renorm_epsilon = static_cast<float>(
        a.get_float("renorm_epsilon", policy == GatePolicy::sigmoid_group ? 1e-20 : 0.0));
    o.routed_scaling = static_cast<float>(a.get_float("routed_scaling", 1.0));
    o.n_group = static_cast<int>(a.get_int("n_group", 1));
    o.topk_group = static_cast<int>(a.get_int("topk_group", 1));
    const std::string mask = a.get_string("group_mask", "neg_inf");
    AUTOGLM_CHECK(mask == "zero" || mask == "neg_inf", invalid_argument, "Registry",
                  "{}='{}' must be zero or neg_inf", key_path(a, "group_mask"), mask);
    o.group_mask = mask == "zero" ? GroupMask::zero : GroupMask::neg_inf;
    o.noise_std = static_cast<float>(a.get_float("noise_std", 1.0));
    o.seed =
        static_cast<std::uint64_t>(a.get_int("noise_seed", static_cast<std::int64_t>(ctx.seed)));
    if (a.has("capacity_factor"))
      o.capacity_factor = static_cast<float>(a.get_float("capacity_factor", 1.0));
    const bool bias = a.get_bool("selection_bias", policy == GatePolicy::sigmoid_group);
    return GateNetwork::random(ctx.backend, ctx.num_experts, ctx.hidden, o, ctx.seed, bias);
  };
}

}  // namespace

std::int64_t ComponentArgs::get_int(std::string_view key, std::int64_t def) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  std::int64_t v = 0;
  const std::string& s = it->second;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  AUTOGLM_CHECK(ec == std::errc() && p == s.data() + s.size(), invalid_argument, "ComponentArgs",
                "{}='{}' is not an integer", key_path(*this, key), s);
  return v;
}

double ComponentArgs::get_float(std::string_view key, double def) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  const std::string& s = it->second;
  double v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  AUTOGLM_CHECK(ec == std::errc() && p == s.data() + s.size() && std::isfinite(v), invalid_argument,
                "ComponentArgs", "{}='{}' is not a finite number", key_path(*this, key), s);
  return v;
}

bool ComponentArgs::get_bool(std::string_view key, bool def) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  AUTOGLM_CHECK(it->second == "true" || it->second == "false", invalid_argument, "ComponentArgs",
                "{}='{}' is not true or false", key_path(*this, key), it->second);
  return it->second == "true";
}

std::string ComponentArgs::get_string(std::string_view key, std::string_view def) const {
  auto it = values_.find(key);
  return it == values_.end() ? std::string(def) : it->second;
}

Registry& Registry::global() {
  static Registry* r = [] {
    auto* reg = new Registry();
    for (GatePolicy p : {GatePolicy::argmax, GatePolicy::softmax_topk, GatePolicy::sigmoid_group,
                         GatePolicy::noisy_topk, GatePolicy::expert_choice})
      reg->add_gate(std::string(gate_policy_name(p)), builtin_gate(p));
    reg->add_experts("swiglu", [](const BuildContext& ctx, const ComponentArgs& a) {
      return AnyExpertBank(SwiGluExperts::random(ctx.backend, ctx.num_experts, ctx.hidden,
                                                 a.get_int("ffn", 4 * ctx.hidden), ctx.seed));
    });
    reg->add_experts("gelu", [](const BuildContext& ctx, const ComponentArgs& a) {
      return AnyExpertBank(GeluExperts::random(ctx.backend, ctx.num_experts, ctx.hidden,
                                               a.get_int("ffn", 4 * ctx.hidden), ctx.seed));
    });
    return reg;
  }();
  return *r;
}

void Registry::add_gate(std::string name, GateFactory f) {
  AUTOGLM_CHECK(static_cast<bool>(f), invalid_argument, "Registry::add_gate",
                "empty factory for '{}'", name);
  std::lock_guard lock(mutex_);
  gates_[std::move(name)] = std::move(f);
}

void Registry::add_experts(std::string name, ExpertFactory f) {
  AUTOGLM_CHECK(static_cast<bool>(f), invalid_argument, "Registry::add_experts",
                "empty factory for '{}'", name);
  std::lock_guard lock(mutex_);
  experts_[std::move(name)] = std::move(f);
}

std::vector<std::string> Registry::gate_names() const {
  std::lock_guard lock(mutex_);
  std::vector<std::string> n;
  for (const auto& [k, v] : gates_) n.push_back(k);
  return n;
}

std::vector<std::string> Registry::expert_names() const {
  std::lock_guard lock(mutex_);
  std::vector<std::string> n;
  for (const auto& [k, v] : experts_) n.push_back(k);
  return n;
}

AnyGate Registry::make_gate(std::string_view name, const BuildContext& ctx,
                            const ComponentArgs& a) const {
  GateFactory f;
  {
    std::lock_guard lock(mutex_);
    auto it = gates_.find(name);
    if (it != gates_.end()) f = it->second;
  }
  if (!f)
    detail::fail(ErrorCode::not_found, "Registry::make_gate", "unknown gate '{}'; registered: {}",
                 name, fmt::join(gate_names(), ", "));
  return f(ctx, a);
}

AnyExpertBank Registry::make_experts(std::string_view name, const BuildContext& ctx,
                                     const ComponentArgs& a) const {
  ExpertFactory f;
  {
    std::lock_guard lock(mutex_);
    auto it = experts_.find(name);
    if (it != experts_.end()) f = it->second;
  }
  if (!f)
    detail::fail(ErrorCode::not_found, "Registry::make_experts",
                 "unknown expert bank '{}'; registered: {}", name, fmt::join(expert_names(), ", "));
  return f(ctx, a);
}

namespace {

using nlohmann::json;
constexpr std::string_view kBuild = "build_pipeline";

ComponentArgs to_args(const json& obj, const std::string& where) {
  AUTOGLM_CHECK(obj.is_object(), invalid_argument, kBuild, "{} must be an object", where);
  ComponentArgs a(where);
  for (const auto& [k, v] : obj.items()) {
    if (v.is_string()) {
      a.set(k, v.get<std::string>());
    } else if (v.is_boolean() || v.is_number()) {
      a.set(k, v.dump());
    } else {
      detail::fail(ErrorCode::invalid_argument, kBuild, "{}.{} must be a number, bool or string",
                   where, k);
    }
  }
  return a;
}

json merged(const json& base, const json* over) {
  json m = base.is_null() ? json::object() : base;
  if (over)
    for (const auto& [k, v] : over->items()) m[k] = v;
  return m;
}

std::int64_t positive(const json& j, const char* key, std::int64_t def) {
  if (!j.contains(key)) {
    AUTOGLM_CHECK(def > 0, invalid_argument, kBuild, "missing key '{}'", key);
    return def;
  }
  AUTOGLM_CHECK(j[key].is_number_integer() && j[key].get<std::int64_t>() > 0, invalid_argument,
                kBuild, "'{}'={} must be a positive integer", key, j[key].dump());
  return j[key].get<std::int64_t>();
}

}  // namespace

DynamicPipeline build_pipeline(Backend& backend, std::string_view text, const Registry& registry) {
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    detail::fail(ErrorCode::io, kBuild, "malformed JSON: {}", e.what());
  }
  AUTOGLM_CHECK(j.is_object(), invalid_argument, kBuild, "the description must be a JSON object");
  try {
    const std::int64_t vocab = positive(j, "vocab", 0);
    const std::int64_t hidden = positive(j, "hidden", 0);
    const auto seed = static_cast<std::uint64_t>(positive(j, "seed", 1));
    const json* per_layer = j.contains("layers") ? &j["layers"] : nullptr;
    AUTOGLM_CHECK(!per_layer || per_layer->is_array(), invalid_argument, kBuild,
                  "'layers' must be an array");
    const std::int64_t n_layers =
        per_layer ? static_cast<std::int64_t>(per_layer->size()) : positive(j, "num_layers", 1);
    PipelineOptions po;
    po.pre_norm = j.value("pre_norm", true);
    po.norm_eps = j.value("norm_eps", 1e-6f);
    std::vector<DynamicLayer> layers;
    for (std::int64_t l = 0; l < n_layers; ++l) {
      const json* over = per_layer ? &(*per_layer)[static_cast<std::size_t>(l)] : nullptr;
      auto sub = [&](const char* key) {
        const json base = j.value(key, json());
        const json* o = over && over->contains(key) ? &(*over)[key] : nullptr;
        return merged(base, o);
      };
      const json gate = sub("gate"), experts = sub("experts"), shared = sub("shared_expert");
      const std::string gw = fmt::format("layers[{}].gate", l);
      const std::string ew = fmt::format("layers[{}].experts", l);
      AUTOGLM_CHECK(gate.contains("type") && gate["type"].is_string(), invalid_argument, kBuild,
                    "{}.type is missing", gw);
      AUTOGLM_CHECK(experts.contains("type") && experts["type"].is_string(), invalid_argument,
                    kBuild, "{}.type is missing", ew);
      const std::int64_t E = positive(gate, "num_experts", 0);
      const std::uint64_t lseed = seed * 1000003ull + static_cast<std::uint64_t>(l) * 7919ull;
      BuildContext ctx{backend, hidden, E, lseed};
      AnyGate g = registry.make_gate(gate["type"].get<std::string>(), ctx, to_args(gate, gw));
      ctx.seed = lseed + 101;
      AnyExpertBank x =
          registry.make_experts(experts["type"].get<std::string>(), ctx, to_args(experts, ew));
      WeightedSumAggregator agg;
      if (!shared.empty()) {
        const std::int64_t f = positive(shared, "ffn", 0);
        SwiGluExperts mlp = SwiGluExperts::random(backend, 1, hidden, f, lseed + 202);
        Tensor gw_t;
        if (shared.value("gated", false)) {
          gw_t = Tensor(backend, DType::f32, Shape{1, hidden});
          backend.fill_uniform(gw_t, lseed + 303, 1.0f / std::sqrt(static_cast<float>(hidden)));
        }
        agg = WeightedSumAggregator(SharedExpert(std::move(mlp), std::move(gw_t)));
      }
      layers.emplace_back(std::move(g), std::move(x), std::move(agg));
    }
    return DynamicPipeline(EmbeddingEncoder::random(backend, vocab, hidden, seed + 11),
                           std::move(layers),
                           LmHeadDecoder::random(backend, vocab, hidden, seed + 13), po);
  } catch (const json::exception& e) {
    detail::fail(ErrorCode::invalid_argument, kBuild, "bad value: {}", e.what());
  }
}

}  // namespace autoglm
