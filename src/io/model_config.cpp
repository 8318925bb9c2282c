// SPDX-License-Identifier: Apache-2.0
// config.json -> ModelConfig. Key semantics and class defaults: docs/model-semantics.md.
#include "autoglm/io/model_config.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>
#include <system_error>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

namespace autoglm {
namespace {

using nlohmann::json;

constexpr std::string_view kParse = "parse_model_config";
constexpr std::string_view kLoad = "load_model_config";
/// Largest accepted size of any one dimension or count (and of derived projection widths).
constexpr std::int64_t kMaxDim = (std::int64_t{1} << 31) - 1;
/// Largest config file load_model_config reads.
constexpr std::uintmax_t kMaxFileBytes = std::uintmax_t{64} << 20;

constexpr std::array<ModelFamily, 6> kFamilies = {ModelFamily::glm4_moe,  ModelFamily::mixtral,
                                                  ModelFamily::qwen3_moe, ModelFamily::qwen2_moe,
                                                  ModelFamily::olmoe,     ModelFamily::deepseek_v3};

std::string supported_families() {
  std::vector<std::string_view> names;
  for (ModelFamily f : kFamilies) names.push_back(model_family_name(f));
  return fmt::format("{}", fmt::join(names, ", "));
}

/// A short, always-printable rendering of a JSON value for messages. Never recurses into
/// containers (a deeply nested value must not exhaust the stack) and truncates long strings.
std::string describe(const json& v) {
  switch (v.type()) {
    case json::value_t::object: return "an object";
    case json::value_t::array: return fmt::format("an array of {}", v.size());
    case json::value_t::string: {
      const auto& s = v.get_ref<const std::string&>();
      constexpr std::size_t kMax = 48;
      const json shown = s.size() > kMax ? json(s.substr(0, kMax) + "...") : v;
      return shown.dump(-1, ' ', false, json::error_handler_t::replace);
    }
    case json::value_t::discarded: return "a discarded value";
    default:
      return v.dump();  // null, bool, numbers
  }
}

/// The value of an integer JSON number that fits std::int64_t, else nullopt.
std::optional<std::int64_t> as_int(const json& v) {
  if (!v.is_number_integer()) return std::nullopt;
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      return std::nullopt;
    return static_cast<std::int64_t>(u);
  }
  return v.get<std::int64_t>();
}

/// Typed access to the keys of one JSON object, with messages naming `source`, the key (with
/// `prefix`, e.g. "rope_scaling.") and the offending value.
class Keys {
 public:
  Keys(const json& obj, std::string_view source, std::string prefix = {})
      : obj_(obj), source_(source), prefix_(std::move(prefix)) {}

  /// The full name of `key` for messages.
  std::string name(std::string_view key) const { return prefix_ + std::string(key); }

  /// The value of `key`, or nullptr when it is absent.
  const json* find(std::string_view key) const {
    auto it = obj_.find(std::string(key));
    return it == obj_.end() ? nullptr : &*it;
  }
  /// Whether `key` is present with a value other than null.
  bool has(std::string_view key) const {
    const json* v = find(key);
    return v && !v->is_null();
  }

  /// Throws Error(invalid_argument) "'key'=value must be <want>".
  [[noreturn]] void bad(std::string_view key, const json& v, std::string_view want) const {
    detail::fail(ErrorCode::invalid_argument, kParse, "{}: '{}'={} must be {}", source_, name(key),
                 describe(v), want);
  }
  /// Throws Error(code) "'key'=value <what>" unless `cond`.
  template <typename V>
  void check(bool cond, std::string_view key, const V& value, std::string_view what,
             ErrorCode code = ErrorCode::invalid_argument) const {
    if (!cond) detail::fail(code, kParse, "{}: '{}'={} {}", source_, name(key), value, what);
  }

  /// Integer `key` in [lo, hi]; nullopt when absent, or null and `null_ok`.
  std::optional<std::int64_t> opt_int(std::string_view key, std::int64_t lo, std::int64_t hi,
                                      bool null_ok = true) const {
    const json* v = find(key);
    if (!v || (v->is_null() && null_ok)) return std::nullopt;
    const std::optional<std::int64_t> x = as_int(*v);
    if (!x || *x < lo || *x > hi) bad(key, *v, fmt::format("an integer in [{}, {}]", lo, hi));
    return x;
  }
  /// Integer `key` in [lo, hi], `def` when absent (null is an error).
  std::int64_t integer(std::string_view key, std::int64_t def, std::int64_t lo = 1,
                       std::int64_t hi = kMaxDim) const {
    return opt_int(key, lo, hi, /*null_ok=*/false).value_or(def);
  }

  /// Finite number `key`; nullopt when absent, or null and `null_ok`.
  std::optional<double> opt_number(std::string_view key, bool null_ok = true) const {
    const json* v = find(key);
    if (!v || (v->is_null() && null_ok)) return std::nullopt;
    if (!v->is_number()) bad(key, *v, "a number");
    const auto x = v->get<double>();
    if (!std::isfinite(x)) bad(key, *v, "a finite number");
    return x;
  }
  /// Finite number `key`, `def` when absent (null is an error).
  double number(std::string_view key, double def) const {
    return opt_number(key, /*null_ok=*/false).value_or(def);
  }

  /// Boolean `key`, `def` when absent (null is an error).
  bool boolean(std::string_view key, bool def) const {
    const json* v = find(key);
    if (!v) return def;
    if (!v->is_boolean()) bad(key, *v, "true or false");
    return v->get<bool>();
  }

  /// String `key`; nullopt when absent or null.
  std::optional<std::string> opt_string(std::string_view key) const {
    const json* v = find(key);
    if (!v || v->is_null()) return std::nullopt;
    if (!v->is_string()) bad(key, *v, "a string");
    return v->get<std::string>();
  }

  /// Object `key`; nullptr when absent or null.
  const json* opt_object(std::string_view key) const {
    const json* v = find(key);
    if (!v || v->is_null()) return nullptr;
    if (!v->is_object()) bad(key, *v, "an object or null");
    return v;
  }

  std::string_view source() const { return source_; }

 private:
  const json& obj_;
  std::string_view source_;
  std::string prefix_;
};

/// transformers class defaults of one family (configuration_<family>.py).
struct FamilyDefaults {
  std::int64_t vocab, hidden, intermediate, layers, heads;
  std::int64_t kv_heads;  ///< 0: = heads
  std::int64_t max_positions;
  double rms_eps, rope_theta;
  std::string_view experts_key, experts_alias;
  std::int64_t experts, top_k;
  std::int64_t moe_intermediate;  ///< 0: experts use intermediate_size
  bool norm_topk_prob;
  double partial_rotary;
};

FamilyDefaults defaults_of(ModelFamily f) {
  switch (f) {
    case ModelFamily::mixtral:
      return {.vocab = 32000, .hidden = 4096, .intermediate = 14336, .layers = 32, .heads = 32,
              .kv_heads = 8, .max_positions = 4096 * 32, .rms_eps = 1e-5, .rope_theta = 1e6,
              .experts_key = "num_local_experts", .experts_alias = "num_experts", .experts = 8,
              .top_k = 2, .moe_intermediate = 0, .norm_topk_prob = true, .partial_rotary = 1.0};
    case ModelFamily::qwen2_moe:
      return {.vocab = 151936, .hidden = 2048, .intermediate = 5632, .layers = 24, .heads = 16,
              .kv_heads = 16, .max_positions = 32768, .rms_eps = 1e-6, .rope_theta = 1e4,
              .experts_key = "num_experts", .experts_alias = "num_local_experts", .experts = 60,
              .top_k = 4, .moe_intermediate = 1408, .norm_topk_prob = false,
              .partial_rotary = 1.0};
    case ModelFamily::qwen3_moe:
      return {.vocab = 151936, .hidden = 2048, .intermediate = 6144, .layers = 24, .heads = 32,
              .kv_heads = 4, .max_positions = 32768, .rms_eps = 1e-6, .rope_theta = 1e4,
              .experts_key = "num_experts", .experts_alias = "num_local_experts", .experts = 128,
              .top_k = 8, .moe_intermediate = 768, .norm_topk_prob = false,
              .partial_rotary = 1.0};
    case ModelFamily::olmoe:
      return {.vocab = 50304, .hidden = 2048, .intermediate = 2048, .layers = 16, .heads = 16,
              .kv_heads = 0, .max_positions = 4096, .rms_eps = 1e-5, .rope_theta = 1e4,
              .experts_key = "num_experts", .experts_alias = "num_local_experts", .experts = 64,
              .top_k = 8, .moe_intermediate = 0, .norm_topk_prob = false, .partial_rotary = 1.0};
    case ModelFamily::deepseek_v3:
      return {.vocab = 129280, .hidden = 7168, .intermediate = 18432, .layers = 61, .heads = 128,
              .kv_heads = 128, .max_positions = 4096, .rms_eps = 1e-6, .rope_theta = 1e4,
              .experts_key = "n_routed_experts", .experts_alias = "num_local_experts",
              .experts = 256, .top_k = 8, .moe_intermediate = 2048, .norm_topk_prob = true,
              .partial_rotary = 1.0};
    case ModelFamily::glm4_moe:
      return {.vocab = 151552, .hidden = 4096, .intermediate = 10944, .layers = 46, .heads = 96,
              .kv_heads = 8, .max_positions = 131072, .rms_eps = 1e-5, .rope_theta = 1e4,
              .experts_key = "n_routed_experts", .experts_alias = "num_local_experts",
              .experts = 128, .top_k = 8, .moe_intermediate = 1408, .norm_topk_prob = true,
              .partial_rotary = 0.5};
  }
  return {};
}

bool sigmoid_family(ModelFamily f) {
  return f == ModelFamily::deepseek_v3 || f == ModelFamily::glm4_moe;
}
bool qwen_family(ModelFamily f) {
  return f == ModelFamily::qwen2_moe || f == ModelFamily::qwen3_moe;
}

/// yarn's magnitude correction: 1 for scale <= 1, else 0.1 * m * ln(scale) + 1.
double yarn_mscale(double scale, double m) {
  return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0;
}

/// Reads the RoPE keys: transformers 5.x semantics, which reduce to 4.x's for flat keys. The
/// scaling parameters come from `rope_scaling` when it is a non-empty object, else from
/// `rope_parameters`; rope_theta and partial_rotary_factor from that object first, then the flat
/// keys, then the family default.
void parse_rope(const Keys& top, const FamilyDefaults& d, ModelConfig& c) {
  const json* scaling = top.opt_object("rope_scaling");
  const json* params = top.opt_object("rope_parameters");
  const json* chosen = scaling && !scaling->empty() ? scaling : params;
  const std::string prefix = chosen == scaling ? "rope_scaling." : "rope_parameters.";
  static const json kEmpty = json::object();
  const Keys r(chosen ? *chosen : kEmpty, top.source(), prefix);

  for (std::string_view layer_type : {"full_attention", "sliding_attention"})
    if (const json* v = r.find(layer_type))
      r.check(false, layer_type, describe(*v),
              "is a per-layer-type RoPE table, which none of the supported families uses",
              ErrorCode::unsupported);

  // The object's value wins over the flat key (transformers 5.x `setdefault`).
  const Keys& theta_keys = r.has("rope_theta") ? r : top;
  c.rope_theta = theta_keys.number("rope_theta", d.rope_theta);
  theta_keys.check(c.rope_theta > 1.0, "rope_theta", c.rope_theta, "must be > 1");
  const Keys& prf_keys = r.has("partial_rotary_factor") ? r : top;
  c.partial_rotary_factor = prf_keys.number("partial_rotary_factor", d.partial_rotary);
  prf_keys.check(c.partial_rotary_factor > 0.0 && c.partial_rotary_factor <= 1.0,
                 "partial_rotary_factor", c.partial_rotary_factor, "must be in (0, 1]");

  std::optional<std::string> type = r.opt_string("rope_type");
  std::string_view type_key = "rope_type";
  if (!type) {
    type = r.opt_string("type");  // transformers' backward-compatible spelling
    type_key = "type";
  }
  RopeScaling& s = c.rope_scaling;
  const std::string t = type.value_or("default");
  if (t == "default") {
    s.type = RopeType::none;
    return;
  }
  if (t == "linear") {
    s.type = RopeType::linear;
  } else if (t == "dynamic") {
    s.type = RopeType::dynamic;
  } else if (t == "yarn") {
    s.type = RopeType::yarn;
  } else if (t == "llama3") {
    s.type = RopeType::llama3;
  } else if (t == "longrope") {
    r.check(false, type_key, describe(json(t)),
            "is not supported (supported: default, linear, dynamic, yarn, llama3)",
            ErrorCode::unsupported);
  } else {
    r.check(false, type_key, describe(json(t)),
            "is not a known RoPE type (supported: default, linear, dynamic, yarn, llama3)");
  }

  s.original_max_position_embeddings =
      r.opt_int("original_max_position_embeddings", 1, kMaxDim).value_or(c.max_position_embeddings);
  const std::optional<double> factor = r.opt_number("factor");
  if (factor) {
    s.factor = *factor;
  } else {
    // transformers 5.x derives a missing yarn factor from the context ratio; every other type
    // requires it.
    r.check(s.type == RopeType::yarn && r.has("original_max_position_embeddings"), "factor", "null",
            fmt::format("is required for rope type {}", t));
    s.factor = static_cast<double>(c.max_position_embeddings) /
               static_cast<double>(s.original_max_position_embeddings);
  }
  r.check(s.factor >= 1.0 && s.factor <= 1e6, "factor", s.factor, "must be in [1, 1e6]");

  if (s.type == RopeType::yarn) {
    // `or 32` / `or 1` in transformers: 0 means the default.
    s.beta_fast = r.opt_number("beta_fast").value_or(0.0);
    s.beta_slow = r.opt_number("beta_slow").value_or(0.0);
    if (s.beta_fast == 0.0) s.beta_fast = 32.0;
    if (s.beta_slow == 0.0) s.beta_slow = 1.0;
    r.check(s.beta_fast > 0.0, "beta_fast", s.beta_fast, "must be > 0");
    r.check(s.beta_slow > 0.0, "beta_slow", s.beta_slow, "must be > 0");
    s.mscale = r.opt_number("mscale").value_or(0.0);
    s.mscale_all_dim = r.opt_number("mscale_all_dim").value_or(0.0);
    r.check(s.mscale >= 0.0, "mscale", s.mscale, "must be >= 0");
    r.check(s.mscale_all_dim >= 0.0, "mscale_all_dim", s.mscale_all_dim, "must be >= 0");
    s.attention_factor = r.opt_number("attention_factor");
    if (s.attention_factor)
      r.check(*s.attention_factor > 0.0, "attention_factor", *s.attention_factor, "must be > 0");
    if (const json* v = r.find("truncate"); v && !v->is_null())
      s.truncate = r.boolean("truncate", true);
  } else if (s.type == RopeType::llama3) {
    const auto low = r.opt_number("low_freq_factor");
    const auto high = r.opt_number("high_freq_factor");
    r.check(low.has_value(), "low_freq_factor", "null", "is required for rope type llama3");
    r.check(high.has_value(), "high_freq_factor", "null", "is required for rope type llama3");
    r.check(r.has("original_max_position_embeddings"), "original_max_position_embeddings", "null",
            "is required for rope type llama3");
    s.low_freq_factor = *low;
    s.high_freq_factor = *high;
    r.check(s.low_freq_factor > 0.0, "low_freq_factor", s.low_freq_factor, "must be > 0");
    r.check(s.high_freq_factor > s.low_freq_factor, "high_freq_factor", s.high_freq_factor,
            fmt::format("must be > low_freq_factor={}", s.low_freq_factor));
  }
}

ModelFamily parse_family(const Keys& top) {
  const json* v = top.find("model_type");
  if (!v || !v->is_string())
    detail::fail(ErrorCode::not_found, kParse,
                 "{}: 'model_type'={} must name a supported family: {}", top.source(),
                 v ? describe(*v) : std::string("(missing)"), supported_families());
  const auto& name = v->get_ref<const std::string&>();
  for (ModelFamily f : kFamilies)
    if (name == model_family_name(f)) return f;
  detail::fail(ErrorCode::not_found, kParse, "{}: 'model_type'={} is not supported; supported: {}",
               top.source(), describe(*v), supported_families());
}

ModelConfig parse(const json& root, std::string_view source) {
  if (!root.is_object())
    detail::fail(ErrorCode::invalid_argument, kParse,
                 "{}: the config must be a JSON object, got {}", source, describe(root));
  const Keys k(root, source);
  ModelConfig c;
  c.source = std::string(source);
  c.family = parse_family(k);
  const ModelFamily f = c.family;
  const FamilyDefaults d = defaults_of(f);
  const bool sigmoid = sigmoid_family(f);
  const bool deepseek = f == ModelFamily::deepseek_v3;

  // -- activation --
  if (const auto act = k.opt_string("hidden_act"))
    k.check(*act == "silu" || *act == "swish", "hidden_act", describe(json(*act)),
            "is not supported: every supported family uses silu", ErrorCode::unsupported);
  else
    k.check(!k.find("hidden_act"), "hidden_act", "null", "must be \"silu\"");

  // -- sizes --
  c.vocab_size = k.integer("vocab_size", d.vocab);
  c.hidden_size = k.integer("hidden_size", d.hidden);
  c.num_hidden_layers = k.integer("num_hidden_layers", d.layers);
  c.num_attention_heads = k.integer("num_attention_heads", d.heads);
  c.max_position_embeddings = k.integer("max_position_embeddings", d.max_positions);
  c.intermediate_size = k.integer("intermediate_size", d.intermediate);
  c.moe_intermediate_size = d.moe_intermediate == 0
                                ? c.intermediate_size
                                : k.integer("moe_intermediate_size", d.moe_intermediate);
  c.num_nextn_predict_layers = k.opt_int("num_nextn_predict_layers", 0, kMaxDim).value_or(0);
  k.check(c.num_hidden_layers + c.num_nextn_predict_layers <= kMaxDim, "num_nextn_predict_layers",
          c.num_nextn_predict_layers,
          fmt::format("plus num_hidden_layers={} exceeds {}", c.num_hidden_layers, kMaxDim));
  if (deepseek) {
    c.num_key_value_heads = c.num_attention_heads;
  } else {
    const std::int64_t kv_default = d.kv_heads == 0 ? c.num_attention_heads : d.kv_heads;
    c.num_key_value_heads = k.opt_int("num_key_value_heads", 1, kMaxDim).value_or(kv_default);
    k.check(c.num_attention_heads % c.num_key_value_heads == 0, "num_key_value_heads",
            c.num_key_value_heads,
            fmt::format("must divide num_attention_heads={}", c.num_attention_heads));
  }

  // -- attention shape --
  if (deepseek) {
    // null: q_proj without the low-rank factorisation (DeepSeek-V2-Lite style).
    const json* ql = k.find("q_lora_rank");
    c.q_lora_rank = ql && ql->is_null() ? 0 : k.integer("q_lora_rank", 1536);
    c.kv_lora_rank = k.integer("kv_lora_rank", 512);
    c.qk_nope_head_dim = k.integer("qk_nope_head_dim", 128);
    c.qk_rope_head_dim = k.integer("qk_rope_head_dim", 64);
    c.v_head_dim = k.integer("v_head_dim", 128);
    c.head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim;
    k.check(c.head_dim <= kMaxDim, "qk_nope_head_dim", c.qk_nope_head_dim,
            fmt::format("plus qk_rope_head_dim={} exceeds {}", c.qk_rope_head_dim, kMaxDim));
    k.check(c.kv_lora_rank + c.qk_rope_head_dim <= kMaxDim, "kv_lora_rank", c.kv_lora_rank,
            fmt::format("plus qk_rope_head_dim={} exceeds {}", c.qk_rope_head_dim, kMaxDim));
    k.check(c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) <= kMaxDim,
            "num_attention_heads", c.num_attention_heads,
            fmt::format("times (qk_nope_head_dim + v_head_dim)={} exceeds {}",
                        c.qk_nope_head_dim + c.v_head_dim, kMaxDim));
    c.rope_interleave = k.boolean("rope_interleave", true);
  } else {
    if (const auto hd = k.opt_int("head_dim", 1, kMaxDim)) {
      c.head_dim = *hd;
    } else {
      k.check(c.hidden_size % c.num_attention_heads == 0, "hidden_size", c.hidden_size,
              fmt::format("is not divisible by num_attention_heads={} and 'head_dim' is absent",
                          c.num_attention_heads));
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    c.v_head_dim = c.head_dim;
  }
  k.check(c.num_attention_heads * c.head_dim <= kMaxDim, "num_attention_heads",
          c.num_attention_heads, fmt::format("times head_dim={} exceeds {}", c.head_dim, kMaxDim));

  // -- attention options --
  switch (f) {
    case ModelFamily::mixtral:
      c.sliding_window = k.opt_int("sliding_window", 1, kMaxDim).value_or(0);
      break;
    case ModelFamily::qwen2_moe:
      c.qkv_bias = k.boolean("qkv_bias", true);
      break;
    case ModelFamily::qwen3_moe:
      c.qkv_bias = c.o_proj_bias = k.boolean("attention_bias", false);
      c.qk_norm = QkNorm::per_head;
      break;
    case ModelFamily::olmoe:
      c.qkv_bias = c.o_proj_bias = k.boolean("attention_bias", false);
      c.qk_norm = QkNorm::whole;
      c.clip_qkv = k.opt_number("clip_qkv");
      if (c.clip_qkv) k.check(*c.clip_qkv > 0.0, "clip_qkv", *c.clip_qkv, "must be > 0 or null");
      break;
    case ModelFamily::deepseek_v3:
      c.qkv_bias = c.o_proj_bias = k.boolean("attention_bias", false);
      break;
    case ModelFamily::glm4_moe:
      c.qkv_bias = k.boolean("attention_bias", false);
      c.qk_norm = k.boolean("use_qk_norm", false) ? QkNorm::per_head : QkNorm::none;
      break;
  }
  if (qwen_family(f))
    k.check(!k.boolean("use_sliding_window", false), "use_sliding_window", "true",
            "is not supported (per-layer sliding-window attention)", ErrorCode::unsupported);
  c.tie_word_embeddings = k.boolean("tie_word_embeddings", false);
  c.rms_norm_eps = k.number("rms_norm_eps", d.rms_eps);
  k.check(c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1.0, "rms_norm_eps", c.rms_norm_eps,
          "must be in (0, 1)");

  // -- RoPE --
  parse_rope(k, d, c);
  {
    const std::int64_t base = deepseek ? c.qk_rope_head_dim : c.head_dim;
    const auto rot = static_cast<std::int64_t>(static_cast<double>(base) * c.partial_rotary_factor);
    k.check(rot >= 2 && rot % 2 == 0, deepseek ? "qk_rope_head_dim" : "partial_rotary_factor",
            deepseek ? fmt::format("{}", c.qk_rope_head_dim)
                     : fmt::format("{}", c.partial_rotary_factor),
            fmt::format("gives rotary dim {} (of {}), which must be even and >= 2", rot, base));
  }

  // -- routed experts --
  const json* primary = k.find(d.experts_key);
  const json* alias = k.find(d.experts_alias);
  std::string_view experts_key = d.experts_key;
  if ((!primary || primary->is_null()) && alias && !alias->is_null()) experts_key = d.experts_alias;
  c.num_experts = k.integer(experts_key, d.experts);
  if (experts_key == d.experts_key && alias && !alias->is_null()) {
    const std::int64_t other = k.integer(d.experts_alias, d.experts);
    k.check(other == c.num_experts, d.experts_alias, other,
            fmt::format("contradicts '{}'={}", d.experts_key, c.num_experts));
  }
  c.num_experts_per_tok = k.integer("num_experts_per_tok", d.top_k);
  k.check(c.num_experts_per_tok <= c.num_experts, "num_experts_per_tok", c.num_experts_per_tok,
          fmt::format("exceeds the number of experts '{}'={}", experts_key, c.num_experts));
  c.norm_topk_prob =
      f == ModelFamily::mixtral ? true : k.boolean("norm_topk_prob", d.norm_topk_prob);

  if (sigmoid) {
    c.score_func = ScoreFunc::sigmoid;
    c.routed_scaling_factor = k.number("routed_scaling_factor", deepseek ? 2.5 : 1.0);
    k.check(c.routed_scaling_factor > 0.0, "routed_scaling_factor", c.routed_scaling_factor,
            "must be > 0");
    c.n_group = k.integer("n_group", deepseek ? 8 : 1);
    c.topk_group = k.integer("topk_group", deepseek ? 4 : 1);
    k.check(c.num_experts % c.n_group == 0, "n_group", c.n_group,
            fmt::format("must divide the number of experts '{}'={}", experts_key, c.num_experts));
    k.check(c.topk_group <= c.n_group, "topk_group", c.topk_group,
            fmt::format("exceeds n_group={}", c.n_group));
    const std::int64_t kept = c.topk_group * (c.num_experts / c.n_group);
    k.check(c.num_experts_per_tok <= kept, "num_experts_per_tok", c.num_experts_per_tok,
            fmt::format("exceeds the {} experts of topk_group={} groups of {}", kept, c.topk_group,
                        c.num_experts / c.n_group));
    if (const auto sf = k.opt_string("scoring_func"))
      k.check(*sf == "sigmoid", "scoring_func", describe(json(*sf)),
              "is not supported: this family routes with sigmoid", ErrorCode::unsupported);
    if (const auto tm = k.opt_string("topk_method")) {
      k.check(*tm == "noaux_tc", "topk_method", describe(json(*tm)),
              "is not supported: this family selects with noaux_tc", ErrorCode::unsupported);
      c.topk_method = *tm;
    }
    if (const auto freq = k.opt_int("moe_layer_freq", 1, kMaxDim))
      k.check(*freq == 1, "moe_layer_freq", *freq, "is not supported (transformers uses 1)",
              ErrorCode::unsupported);
    c.first_k_dense_replace =
        k.integer("first_k_dense_replace", deepseek ? 3 : 1, 0, c.num_hidden_layers);
    // null (DeepSeek-V2 remote code): no shared expert.
    const json* ns = k.find("n_shared_experts");
    c.n_shared_experts = ns && ns->is_null() ? 0 : k.integer("n_shared_experts", 1, 0, kMaxDim);
    c.shared_expert_intermediate_size = c.moe_intermediate_size * c.n_shared_experts;
    k.check(
        c.shared_expert_intermediate_size <= kMaxDim, "n_shared_experts", c.n_shared_experts,
        fmt::format("times moe_intermediate_size={} exceeds {}", c.moe_intermediate_size, kMaxDim));
  }
  if (qwen_family(f)) {
    c.decoder_sparse_step = k.integer("decoder_sparse_step", 1);
    if (const json* v = k.find("mlp_only_layers"); v && !v->is_null()) {
      if (!v->is_array()) k.bad("mlp_only_layers", *v, "an array of layer indices or null");
      for (std::size_t i = 0; i < v->size(); ++i) {
        const json& e = (*v)[i];
        const std::optional<std::int64_t> idx = as_int(e);
        if (!idx || *idx < 0 || *idx >= c.num_hidden_layers)
          k.bad(fmt::format("mlp_only_layers[{}]", i), e,
                fmt::format("a layer index in [0, num_hidden_layers={})", c.num_hidden_layers));
        c.mlp_only_layers.push_back(*idx);
      }
      std::sort(c.mlp_only_layers.begin(), c.mlp_only_layers.end());
      c.mlp_only_layers.erase(std::unique(c.mlp_only_layers.begin(), c.mlp_only_layers.end()),
                              c.mlp_only_layers.end());
    }
  }
  if (f == ModelFamily::qwen2_moe) {
    c.n_shared_experts = 1;
    c.shared_expert_gate = true;
    c.shared_expert_intermediate_size = k.integer("shared_expert_intermediate_size", 5632);
  }

  // -- weights --
  if (auto dt = k.opt_string("torch_dtype"))
    c.torch_dtype = std::move(*dt);
  else if (auto dt5 = k.opt_string("dtype"))
    c.torch_dtype = std::move(*dt5);
  if (const json* q = k.opt_object("quantization_config")) {
    const Keys qk(*q, source, "quantization_config.");
    c.quantization.method = qk.opt_string("quant_method").value_or("");
    qk.check(!c.quantization.method.empty(), "quant_method", "null", "is required");
    c.quantization.format = qk.opt_string("fmt").value_or("");
    if (const json* b = qk.find("weight_block_size"); b && !b->is_null()) {
      if (!b->is_array() || b->size() != 2) qk.bad("weight_block_size", *b, "[rows, cols]");
      for (std::size_t i = 0; i < 2; ++i) {
        const json& e = (*b)[i];
        const std::optional<std::int64_t> n = as_int(e);
        if (!n || *n < 1 || *n > kMaxDim)
          qk.bad(fmt::format("weight_block_size[{}]", i), e,
                 fmt::format("an integer in [1, {}]", kMaxDim));
        c.quantization.weight_block_size[i] = *n;
      }
    }
  }
  return c;
}

}  // namespace

bool ModelConfig::is_moe_layer(int layer) const {
  AUTOGLM_CHECK(layer >= 0 && layer < num_hidden_layers + num_nextn_predict_layers, out_of_range,
                "ModelConfig::is_moe_layer",
                "layer {} outside [0, num_hidden_layers={} + num_nextn_predict_layers={})", layer,
                num_hidden_layers, num_nextn_predict_layers);
  switch (family) {
    case ModelFamily::mixtral:
    case ModelFamily::olmoe: return true;
    case ModelFamily::deepseek_v3:
    case ModelFamily::glm4_moe: return layer >= first_k_dense_replace;
    case ModelFamily::qwen2_moe:
    case ModelFamily::qwen3_moe:
      AUTOGLM_CHECK(decoder_sparse_step >= 1, invalid_argument, "ModelConfig::is_moe_layer",
                    "decoder_sparse_step={} must be >= 1", decoder_sparse_step);
      return num_experts > 0 &&
             !std::binary_search(mlp_only_layers.begin(), mlp_only_layers.end(),
                                 std::int64_t{layer}) &&
             (std::int64_t{layer} + 1) % decoder_sparse_step == 0;
  }
  return false;
}

int ModelConfig::rotary_dim() const {
  const std::int64_t base = family == ModelFamily::deepseek_v3 ? qk_rope_head_dim : head_dim;
  return static_cast<int>(
      std::clamp<double>(std::floor(static_cast<double>(base) * partial_rotary_factor), 0.0,
                         static_cast<double>(kMaxDim)));
}

double ModelConfig::attention_scale() const {
  const double width = static_cast<double>(
      family == ModelFamily::deepseek_v3 ? qk_nope_head_dim + qk_rope_head_dim : head_dim);
  AUTOGLM_CHECK(width > 0.0, invalid_argument, "ModelConfig::attention_scale",
                "head width {} must be > 0", width);
  double scale = 1.0 / std::sqrt(width);
  if (family == ModelFamily::deepseek_v3 && rope_scaling.type != RopeType::none &&
      rope_scaling.mscale_all_dim != 0.0) {
    const double m = yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

double ModelConfig::rope_attention_factor() const {
  const RopeScaling& s = rope_scaling;
  if (s.type != RopeType::yarn) return 1.0;
  if (s.attention_factor) return *s.attention_factor;
  if (s.mscale != 0.0 && s.mscale_all_dim != 0.0)
    return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim);
  return yarn_mscale(s.factor, 1.0);
}

GateOptions ModelConfig::gate_options() const {
  constexpr std::string_view fn = "ModelConfig::gate_options";
  AUTOGLM_CHECK(num_experts >= 1 && num_experts <= kMaxDim, invalid_argument, fn,
                "num_experts={} outside [1, {}]", num_experts, kMaxDim);
  AUTOGLM_CHECK(num_experts_per_tok >= 1 && num_experts_per_tok <= num_experts, invalid_argument,
                fn, "num_experts_per_tok={} outside [1, num_experts={}]", num_experts_per_tok,
                num_experts);
  GateOptions g;
  g.top_k = static_cast<int>(num_experts_per_tok);
  const bool renorm =
      family == ModelFamily::mixtral ? true : fidelity.norm_topk_prob.value_or(norm_topk_prob);
  g.renormalize = renorm;
  if (family == ModelFamily::deepseek_v3 || family == ModelFamily::glm4_moe) {
    AUTOGLM_CHECK(n_group >= 1 && num_experts % n_group == 0, invalid_argument, fn,
                  "n_group={} does not divide num_experts={}", n_group, num_experts);
    AUTOGLM_CHECK(topk_group >= 1 && topk_group <= n_group, invalid_argument, fn,
                  "topk_group={} outside [1, n_group={}]", topk_group, n_group);
    AUTOGLM_CHECK(std::isfinite(fidelity.renorm_epsilon) && fidelity.renorm_epsilon >= 0.0f,
                  invalid_argument, fn, "fidelity.renorm_epsilon={} must be finite and >= 0",
                  fidelity.renorm_epsilon);
    AUTOGLM_CHECK(std::isfinite(routed_scaling_factor), invalid_argument, fn,
                  "routed_scaling_factor={} must be finite", routed_scaling_factor);
    g.policy = GatePolicy::sigmoid_group;
    g.renorm_epsilon = fidelity.renorm_epsilon;
    g.routed_scaling = static_cast<float>(routed_scaling_factor);
    g.n_group = static_cast<int>(n_group);
    g.topk_group = static_cast<int>(topk_group);
    g.group_mask = fidelity.group_mask;
  } else {
    g.policy = GatePolicy::softmax_topk;
    g.renorm_epsilon = 0.0f;  // transformers divides softmax weights by their plain sum
    g.routed_scaling = 1.0f;
    g.n_group = 1;
    g.topk_group = 1;
  }
  return g;
}

ModelConfig parse_model_config(std::string_view text, std::string_view source_name) {
  json root;
  try {
    root = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    detail::fail(ErrorCode::io, kParse, "{}: malformed JSON: {}", source_name, e.what());
  }
  try {
    return parse(root, source_name);
  } catch (const json::exception& e) {  // a safety net: every access above is type-checked
    detail::fail(ErrorCode::invalid_argument, kParse, "{}: bad value: {}", source_name, e.what());
  }
}

ModelConfig load_model_config(const std::filesystem::path& dir_or_file) {
  std::error_code ec;
  std::filesystem::path file = dir_or_file;
  if (std::filesystem::is_directory(file, ec)) file /= "config.json";
  const std::string name = file.string();
  AUTOGLM_CHECK(std::filesystem::is_regular_file(file, ec), io, kLoad,
                "'{}' is not a readable file", name);
  const std::uintmax_t size = std::filesystem::file_size(file, ec);
  AUTOGLM_CHECK(!ec, io, kLoad, "cannot read the size of '{}': {}", name, ec.message());
  AUTOGLM_CHECK(size <= kMaxFileBytes, io, kLoad, "'{}' has {} bytes, more than a config's {}",
                name, size, kMaxFileBytes);
  std::ifstream in(file, std::ios::binary);
  AUTOGLM_CHECK(in.good(), io, kLoad, "cannot open '{}'", name);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  AUTOGLM_CHECK(!in.bad(), io, kLoad, "cannot read '{}'", name);
  return parse_model_config(text, name);
}

}  // namespace autoglm
