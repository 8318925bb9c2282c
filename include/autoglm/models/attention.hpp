// SPDX-License-Identifier: Apache-2.0
// Self-attention blocks of the decoder models: grouped-query attention (Mixtral, Qwen2/3-MoE,
// OLMoE, GLM-4.5) and DeepSeek-V3 multi-head latent attention, both writing their keys and
// values into a per-layer cache, plus the RoPE frequency table of a config.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "autoglm/backend/backend.hpp"
#include "autoglm/io/model_config.hpp"

namespace autoglm {

/// RoPE inverse frequencies [rotary_dim / 2] of a config, as transformers computes them:
/// base^(-2i / rotary_dim), then the rope_scaling variant (linear: / factor; yarn: the
/// interpolation / extrapolation ramp; llama3: wavelength bands). `dynamic` scaling depends on
/// the sequence length and is an Error(unsupported).
std::vector<float> rope_inv_freq(const ModelConfig& config);

/// Keys and values of one attention layer: row s holds position s.
struct KvLayer {
  Tensor k;  ///< [capacity, kv_heads, key_dim] f32
  Tensor v;  ///< [capacity, kv_heads, value_dim] f32
};

/// Where a forward call's tokens sit: positions start ... start + T - 1 of the sequence.
struct AttentionContext {
  TensorView positions;    ///< [T] i32 on the backend
  TensorView inv_freq;     ///< [rotary_dim / 2] f32 on the backend (rope_inv_freq)
  std::int64_t start = 0;  ///< cache rows [0, start) already hold earlier positions
};

/// Weights of a grouped-query attention layer (Hugging Face names in the comments). Optional
/// tensors are left empty.
struct GqaWeights {
  Weight q_proj;  ///< q_proj.weight [Hq * D, d]
  Weight k_proj;  ///< k_proj.weight [Hkv * D, d]
  Weight v_proj;  ///< v_proj.weight [Hkv * D, d]
  Weight o_proj;  ///< o_proj.weight [d, Hq * D]
  Tensor q_bias;  ///< q_proj.bias [Hq * D] or empty
  Tensor k_bias;  ///< k_proj.bias [Hkv * D] or empty
  Tensor v_bias;  ///< v_proj.bias [Hkv * D] or empty
  Tensor o_bias;  ///< o_proj.bias [d] or empty
  Tensor q_norm;  ///< q_norm.weight: [D] (per_head) or [Hq * D] (whole); empty with QkNorm::none
  Tensor k_norm;  ///< k_norm.weight: [D] (per_head) or [Hkv * D] (whole)
};

/// Shape and numerics of a GqaAttention.
struct GqaOptions {
  std::int64_t heads = 0;         ///< query heads Hq
  std::int64_t kv_heads = 0;      ///< key/value heads Hkv, dividing Hq
  std::int64_t head_dim = 0;      ///< D
  QkNorm qk_norm = QkNorm::none;  ///< q/k RMSNorm before RoPE
  float norm_eps = 1e-6f;         ///< eps of the q/k norms
  std::optional<float> clip_qkv;  ///< OLMoE: clamp q, k, v to [-c, c] after the norms
  RopeParams rope;                ///< rotated slice of each head (offset 0)
  AttentionParams attention;      ///< scale, causal, sliding window
};

/// Grouped-query attention: q/k/v projections (+ bias), optional q/k RMSNorm (per head or over
/// the whole projection), RoPE, attention over the cache, output projection.
class GqaAttention {
 public:
  /// Validates every weight against the options and moves the projections into the backend's
  /// weight layout.
  GqaAttention(GqaWeights weights, GqaOptions options);

  /// d.
  std::int64_t hidden() const noexcept { return w_.q_proj.dim(1); }
  /// Hkv: heads per cache row.
  std::int64_t kv_heads() const noexcept { return o_.kv_heads; }
  /// Width of one cached key head.
  std::int64_t key_dim() const noexcept { return o_.head_dim; }
  /// Width of one cached value head.
  std::int64_t value_dim() const noexcept { return o_.head_dim; }
  /// The options in force.
  const GqaOptions& options() const noexcept { return o_; }
  /// The weights.
  const GqaWeights& weights() const noexcept { return w_; }
  /// The same block with int8 q/k/v/o projections (biases and norms stay f32).
  GqaAttention quantized(Backend& backend, const QuantSpec& spec) const;

  // x: [T, d]; cache rows [ctx.start, ctx.start + T) are written; out: [T, d].
  /// Attends the T tokens to every cached position up to their own.
  void forward(Backend& backend, TensorView x, const AttentionContext& ctx, KvLayer& cache,
               TensorView out) const;

 private:
  GqaWeights w_;
  GqaOptions o_;
};

/// Weights of a DeepSeek-V3 multi-head latent attention layer. Either q_a_proj + q_a_norm +
/// q_b_proj (q-LoRA) or q_proj is set.
struct MlaWeights {
  Weight q_proj;     ///< q_proj.weight [H * (nope + rope), d] (no q-LoRA) or empty
  Weight q_a_proj;   ///< q_a_proj.weight [q_lora, d]
  Tensor q_a_bias;   ///< q_a_proj.bias [q_lora] or empty (attention_bias)
  Tensor q_a_norm;   ///< q_a_layernorm.weight [q_lora]
  Weight q_b_proj;   ///< q_b_proj.weight [H * (nope + rope), q_lora]
  Weight kv_a_proj;  ///< kv_a_proj_with_mqa.weight [kv_lora + rope, d]
  Tensor kv_a_bias;  ///< kv_a_proj_with_mqa.bias [kv_lora + rope] or empty
  Tensor kv_a_norm;  ///< kv_a_layernorm.weight [kv_lora]
  Weight kv_b_proj;  ///< kv_b_proj.weight [H * (nope + v), kv_lora]
  Weight o_proj;     ///< o_proj.weight [d, H * v]
  Tensor o_bias;     ///< o_proj.bias [d] or empty
};

/// Shape and numerics of an MlaAttention.
struct MlaOptions {
  std::int64_t heads = 0;         ///< H
  std::int64_t q_lora_rank = 0;   ///< 0: q_proj without LoRA
  std::int64_t kv_lora_rank = 0;  ///< width of the compressed latent c_kv
  std::int64_t nope_dim = 0;      ///< qk_nope_head_dim
  std::int64_t rope_dim = 0;      ///< qk_rope_head_dim
  std::int64_t v_dim = 0;         ///< v_head_dim
  /// eps of q_a_layernorm and kv_a_layernorm: transformers builds them with its class default
  /// 1e-6 whatever rms_norm_eps says.
  float latent_eps = 1e-6f;
  bool interleaved = true;             ///< rope_interleave
  float rope_attention_factor = 1.0f;  ///< yarn mscale on cos/sin
  AttentionParams attention;           ///< scale (with the yarn mscale^2), causal
};

/// DeepSeek-V3 MLA: q = q_b(norm(q_a(x))) (or q_proj(x)) split into nope | rope per head;
/// kv_a(x) = [c_kv | k_rope]; k_nope | v = kv_b(norm(c_kv)) per head; k_rope is one RoPE head
/// shared by all heads. The cache holds the expanded keys [nope | rope] and values per head.
class MlaAttention {
 public:
  /// Validates every weight against the options; moves the projections into the backend's
  /// weight layout.
  MlaAttention(MlaWeights weights, MlaOptions options);

  /// d.
  std::int64_t hidden() const noexcept { return w_.kv_a_proj.dim(1); }
  /// Heads per cache row (every query head has its own key).
  std::int64_t kv_heads() const noexcept { return o_.heads; }
  /// nope + rope.
  std::int64_t key_dim() const noexcept { return o_.nope_dim + o_.rope_dim; }
  /// v_head_dim.
  std::int64_t value_dim() const noexcept { return o_.v_dim; }
  /// The options in force.
  const MlaOptions& options() const noexcept { return o_; }
  /// The weights.
  const MlaWeights& weights() const noexcept { return w_; }
  /// The same block with every projection int8 (biases and norms stay f32).
  MlaAttention quantized(Backend& backend, const QuantSpec& spec) const;

  // x: [T, d]; cache rows [ctx.start, ctx.start + T) are written; out: [T, d].
  /// Attends the T tokens to every cached position up to their own.
  void forward(Backend& backend, TensorView x, const AttentionContext& ctx, KvLayer& cache,
               TensorView out) const;

 private:
  MlaWeights w_;
  MlaOptions o_;
};

}  // namespace autoglm
