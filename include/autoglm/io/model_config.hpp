// SPDX-License-Identifier: Apache-2.0
// Hugging Face config.json of the supported MoE families, parsed into one validated struct.
// Semantics per key, class defaults and the choices where implementations disagree:
// docs/model-semantics.md.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "autoglm/backend/backend.hpp"
#include "autoglm/moe/gate.hpp"

namespace autoglm {

/// The model families parse_model_config understands, by their config.json `model_type`.
enum class ModelFamily : std::uint8_t {
  mixtral,      ///< "mixtral": softmax top-k, always renormalised, every layer MoE
  qwen2_moe,    ///< "qwen2_moe": softmax top-k + sigmoid-gated shared expert, q/k/v bias
  qwen3_moe,    ///< "qwen3_moe": softmax top-k, per-head q/k RMSNorm
  olmoe,        ///< "olmoe": softmax top-k, whole-width q/k RMSNorm, optional clip_qkv
  deepseek_v3,  ///< "deepseek_v3": sigmoid group-limited routing, shared experts, MLA attention
  glm4_moe,     ///< "glm4_moe": DeepSeek-V3 routing, GQA with partial rotary
};

/// The config.json `model_type` of a family, e.g. "qwen3_moe".
constexpr std::string_view model_family_name(ModelFamily f) noexcept {
  switch (f) {
    case ModelFamily::mixtral:
      return "mixtral";
    case ModelFamily::qwen2_moe:
      return "qwen2_moe";
    case ModelFamily::qwen3_moe:
      return "qwen3_moe";
    case ModelFamily::olmoe:
      return "olmoe";
    case ModelFamily::deepseek_v3:
      return "deepseek_v3";
    case ModelFamily::glm4_moe:
      return "glm4_moe";
  }
  return "?";
}

/// RoPE frequency scaling variants (transformers' `rope_type`).
enum class RopeType : std::uint8_t {
  none,     ///< "default" (or no rope_scaling): plain RoPE
  linear,   ///< "linear": positions divided by factor
  dynamic,  ///< "dynamic": NTK-aware base growth past max_position_embeddings
  yarn,     ///< "yarn": YaRN ramp between interpolation and extrapolation (DeepSeek-V3)
  llama3,   ///< "llama3": Llama-3.1 wavelength-banded scaling
};

/// The transformers name of a RopeType ("default" for none).
constexpr std::string_view rope_type_name(RopeType t) noexcept {
  switch (t) {
    case RopeType::none:
      return "default";
    case RopeType::linear:
      return "linear";
    case RopeType::dynamic:
      return "dynamic";
    case RopeType::yarn:
      return "yarn";
    case RopeType::llama3:
      return "llama3";
  }
  return "?";
}

/// `rope_scaling` (4.x) or the scaling part of `rope_parameters` (5.x). Fields a type does not
/// use keep their defaults.
struct RopeScaling {
  RopeType type = RopeType::none;  ///< the variant; none: every other field is unused
  double factor = 1.0;             ///< context extension factor (>= 1)
  /// Pre-training context length (yarn, dynamic, llama3); defaults to max_position_embeddings.
  std::int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0;      ///< yarn: extrapolation boundary in rotations (0 in JSON: 32)
  double beta_slow = 1.0;       ///< yarn: interpolation boundary in rotations (0 in JSON: 1)
  double mscale = 0.0;          ///< yarn (DeepSeek): cos/sin magnitude exponent; 0 = absent
  double mscale_all_dim = 0.0;  ///< yarn (DeepSeek): attention-score exponent; 0 = absent
  std::optional<double> attention_factor;  ///< yarn: explicit cos/sin multiplier
  bool truncate = true;           ///< yarn: floor/ceil the correction range (transformers 5.x)
  double low_freq_factor = 1.0;   ///< llama3
  double high_freq_factor = 4.0;  ///< llama3
};

/// Which q/k normalisation the attention applies before RoPE.
enum class QkNorm : std::uint8_t {
  none,      ///< Mixtral, Qwen2-MoE, DeepSeek-V3 (MLA has its own latent norms), GLM without it
  per_head,  ///< RMSNorm over head_dim of each head (Qwen3-MoE; GLM with use_qk_norm)
  whole,     ///< RMSNorm over the whole q (heads * head_dim) and k (kv_heads * head_dim) (OLMoE)
};

/// `quantization_config` of a pre-quantised checkpoint. The loader decides what it can read.
struct QuantizationConfig {
  std::string method;  ///< `quant_method` ("fp8" for DeepSeek-V3); empty: not quantised
  std::string format;  ///< `fmt` ("e4m3"); may be empty
  /// `weight_block_size` [rows, cols] of one scale (DeepSeek-V3: 128 x 128); {0, 0}: absent.
  std::array<std::int64_t, 2> weight_block_size{0, 0};
};

/// Choices where transformers, the model authors' reference code and llama.cpp compute
/// different numbers (docs/model-semantics.md). The defaults follow transformers.
struct FidelityOptions {
  /// Value of experts in discarded groups of group-limited routing: transformers 5.x, DeepSeek
  /// reference, llama.cpp and vLLM -inf; transformers 4.x 0.0. Differs when surviving scores
  /// are negative.
  GroupMask group_mask = GroupMask::neg_inf;
  /// Added to the sum of the k sigmoid weights before renormalising (DeepSeek-V3, GLM):
  /// transformers 1e-20; DeepSeek reference 0. Softmax routers never add one.
  float renorm_epsilon = 1e-20f;
  /// Replaces the config's norm_topk_prob for Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3 and GLM when
  /// set (llama.cpp forces true for Qwen3-MoE). Mixtral always renormalises.
  std::optional<bool> norm_topk_prob;

  /// transformers 5.x (the default).
  static FidelityOptions transformers() noexcept { return {}; }
  /// transformers 4.x: discarded groups filled with 0.0.
  static FidelityOptions transformers_4x() noexcept {
    return {GroupMask::zero, 1e-20f, std::nullopt};
  }
  /// DeepSeek's reference inference code (and, for the group mask, llama.cpp and vLLM).
  static FidelityOptions deepseek_reference() noexcept {
    return {GroupMask::neg_inf, 0.0f, std::nullopt};
  }
};

/// Everything in a config.json that changes the numbers a supported MoE model computes, with the
/// family's transformers class default wherever the file omits a key. Sizes are validated
/// (positive, below 2^31, consistent with each other) by parse_model_config; a ModelConfig built
/// by hand is the caller's responsibility.
struct ModelConfig {
  ModelFamily family = ModelFamily::mixtral;  ///< from `model_type`
  std::string source;                         ///< file or name the config came from

  // -- sizes --
  std::int64_t vocab_size = 0;           ///< `vocab_size`
  std::int64_t hidden_size = 0;          ///< `hidden_size` (d)
  std::int64_t num_hidden_layers = 0;    ///< `num_hidden_layers` (MTP layers excluded)
  std::int64_t num_attention_heads = 0;  ///< `num_attention_heads`
  /// `num_key_value_heads` (null: = heads). DeepSeek-V3: always = heads (MLA expands k/v per head).
  std::int64_t num_key_value_heads = 0;
  /// Width of one q/k head: `head_dim` (null/absent: hidden_size / heads, which must divide).
  /// DeepSeek-V3: qk_nope_head_dim + qk_rope_head_dim (transformers' attribute `head_dim` holds
  /// the rotary width there; see rotary_dim()).
  std::int64_t head_dim = 0;
  std::int64_t v_head_dim = 0;  ///< width of one v head: head_dim, or `v_head_dim` (DeepSeek-V3)
  std::int64_t max_position_embeddings = 0;  ///< `max_position_embeddings`
  /// Width of the dense MLP (`intermediate_size`) of non-MoE layers.
  std::int64_t intermediate_size = 0;
  /// Width of one routed expert: `moe_intermediate_size`; Mixtral and OLMoE: `intermediate_size`.
  std::int64_t moe_intermediate_size = 0;

  // -- routing --
  /// Routed experts E: `num_local_experts` (Mixtral), `num_experts` (Qwen, OLMoE) or
  /// `n_routed_experts` (DeepSeek-V3, GLM).
  std::int64_t num_experts = 0;
  std::int64_t num_experts_per_tok = 0;  ///< `num_experts_per_tok` (k), in [1, E]
  /// `norm_topk_prob`: divide the k weights by their sum. Mixtral: always true.
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;         ///< `routed_scaling_factor` (DeepSeek-V3, GLM)
  std::int64_t n_group = 1;                   ///< `n_group` (sigmoid families; 1 elsewhere)
  std::int64_t topk_group = 1;                ///< `topk_group` (sigmoid families; 1 elsewhere)
  ScoreFunc score_func = ScoreFunc::softmax;  ///< softmax (Mixtral, Qwen, OLMoE) or sigmoid
  /// `topk_method` as written (DeepSeek-V3: "noaux_tc"); empty when absent.
  std::string topk_method;

  // -- shared experts --
  /// `n_shared_experts` (DeepSeek-V3, GLM); Qwen2-MoE: 1; others 0.
  std::int64_t n_shared_experts = 0;
  /// Width of the one shared MLP: moe_intermediate_size * n_shared_experts (DeepSeek-V3, GLM),
  /// `shared_expert_intermediate_size` (Qwen2-MoE); 0: no shared expert.
  std::int64_t shared_expert_intermediate_size = 0;
  /// Qwen2-MoE: the shared output is scaled by sigmoid(shared_expert_gate(x)) (a [1, d] weight).
  bool shared_expert_gate = false;

  // -- which layers are MoE --
  std::int64_t first_k_dense_replace = 0;     ///< DeepSeek-V3, GLM: layers [0, k) are dense
  std::int64_t decoder_sparse_step = 1;       ///< Qwen: MoE iff (idx + 1) % step == 0
  std::vector<std::int64_t> mlp_only_layers;  ///< Qwen: layers forced dense (sorted, unique)
  /// Multi-token-prediction layers after the last decoder layer (`num_nextn_predict_layers`,
  /// DeepSeek-V3 and GLM); their tensors are ignored for next-token inference.
  std::int64_t num_nextn_predict_layers = 0;

  // -- norms, attention, RoPE --
  double rms_norm_eps = 1e-6;  ///< `rms_norm_eps`
  /// `rope_theta` (or `rope_parameters.rope_theta`, which wins).
  double rope_theta = 10000.0;
  /// Share of head_dim that RoPE rotates: `partial_rotary_factor` (GLM default 0.5; else 1).
  double partial_rotary_factor = 1.0;
  RopeScaling rope_scaling;  ///< `rope_scaling`, or the 5.x `rope_parameters`
  /// Rotary pairing: false = rotate_half (NEOX, element i with i + rotary_dim/2); true =
  /// adjacent pairs (DeepSeek-V3 `rope_interleave`, default true).
  bool rope_interleave = false;
  /// q/k/v projections carry a bias: Qwen2-MoE `qkv_bias` (default true); `attention_bias` for
  /// Qwen3-MoE, OLMoE, GLM; DeepSeek-V3 `attention_bias` on q_a_proj and kv_a_proj_with_mqa.
  bool qkv_bias = false;
  /// o_proj carries a bias: `attention_bias` for Qwen3-MoE, OLMoE and DeepSeek-V3; never for
  /// Mixtral, Qwen2-MoE or GLM.
  bool o_proj_bias = false;
  QkNorm qk_norm = QkNorm::none;   ///< q/k normalisation (GLM: `use_qk_norm`)
  std::optional<double> clip_qkv;  ///< OLMoE `clip_qkv`: clamp q, k, v to [-c, c] after the norm
  /// Sliding-window attention width (Mixtral `sliding_window`); 0 = full attention.
  std::int64_t sliding_window = 0;
  bool tie_word_embeddings = false;  ///< `tie_word_embeddings`: lm_head shares embed_tokens

  // -- DeepSeek-V3 multi-head latent attention (0 elsewhere) --
  std::int64_t q_lora_rank = 0;       ///< `q_lora_rank`; 0 (JSON null): q_proj without LoRA
  std::int64_t kv_lora_rank = 0;      ///< `kv_lora_rank` (512)
  std::int64_t qk_nope_head_dim = 0;  ///< `qk_nope_head_dim` (128)
  std::int64_t qk_rope_head_dim = 0;  ///< `qk_rope_head_dim` (64)

  // -- weights --
  /// `torch_dtype` (4.x) or `dtype` (5.x) as written ("bfloat16"); empty when absent.
  std::string torch_dtype;
  QuantizationConfig quantization;  ///< `quantization_config`

  /// Numeric choices where implementations disagree; never read from config.json.
  FidelityOptions fidelity;

  /// Whether decoder layer `layer` uses the routed MoE block (else a dense MLP of
  /// intermediate_size). Qwen2/Qwen3-MoE: layer not in mlp_only_layers and
  /// (layer + 1) % decoder_sparse_step == 0; DeepSeek-V3, GLM: layer >= first_k_dense_replace;
  /// Mixtral, OLMoE: every layer. MTP layers [num_hidden_layers, + num_nextn_predict_layers)
  /// follow the same rule; any other index is an Error.
  bool is_moe_layer(int layer) const;
  /// Number of leading dimensions of each q/k head that RoPE rotates: head_dim *
  /// partial_rotary_factor (floor), or qk_rope_head_dim for DeepSeek-V3.
  int rotary_dim() const;
  /// Softmax scale of the attention scores: 1/sqrt(q/k head width), times mscale(factor,
  /// mscale_all_dim)^2 for DeepSeek-V3 with a scaled RoPE (transformers DeepseekV3Attention).
  double attention_scale() const;
  /// Multiplier of RoPE cos/sin (transformers' attention_scaling): 1 except for yarn, where it is
  /// attention_factor, or mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are
  /// set, else 0.1 ln(factor) + 1.
  double rope_attention_factor() const;
  /// The routed-expert gate of MoE layers: softmax_topk (renormalize = norm_topk_prob) for
  /// Mixtral, Qwen and OLMoE; sigmoid_group with routed scaling, groups, and the fidelity
  /// options' group mask and renormalisation epsilon for DeepSeek-V3 and GLM.
  GateOptions gate_options() const;
};

/// Parses a config.json text. `source_name` (a file name) prefixes every error message.
/// Unknown keys are ignored; absent keys take the family's transformers class default; wrong
/// types, out-of-range or inconsistent values are an Error naming the key and the value; an
/// unsupported `model_type` is Error(not_found) listing the supported ones.
ModelConfig parse_model_config(std::string_view json, std::string_view source_name = "config.json");

/// Reads and parses `dir_or_file`, or `dir_or_file`/config.json when it is a directory.
/// A missing or unreadable file is Error(io).
ModelConfig load_model_config(const std::filesystem::path& dir_or_file);

}  // namespace autoglm
