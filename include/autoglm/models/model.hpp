// SPDX-License-Identifier: Apache-2.0
// A decoder-only MoE language model assembled from autoglm's components, and the loader that
// builds one from a Hugging Face checkpoint directory (config.json + safetensors).
//
//   ids ─EmbeddingEncoder─▶ x [T, d] ─▶ per layer: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x))
//       ─▶ LmHeadDecoder (final RMSNorm + head) ─▶ logits [T, V]
//
// FFN is a MoELayer<GateNetwork, SwiGluExperts, WeightedSumAggregator> (with a SharedExpert for
// Qwen2-MoE, DeepSeek-V3 and GLM) or, where the config says so, a dense SwiGLU MLP.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <span>
#include <string_view>
#include <variant>
#include <vector>

#include "autoglm/backend/backend.hpp"
#include "autoglm/io/model_config.hpp"
#include "autoglm/models/attention.hpp"
#include "autoglm/models/families.hpp"
#include "autoglm/moe/aggregator.hpp"
#include "autoglm/moe/decoder.hpp"
#include "autoglm/moe/encoder.hpp"
#include "autoglm/moe/expert.hpp"
#include "autoglm/moe/gate.hpp"
#include "autoglm/moe/layer.hpp"
#include "autoglm/quant/quantize.hpp"

namespace autoglm {

/// The routed MoE block of a decoder layer.
using MoEBlock = MoELayer<GateNetwork, SwiGluExperts, WeightedSumAggregator>;

/// A dense SwiGLU MLP: down(silu(gate(x)) * up(x)), for the layers that are not MoE.
class DenseMlp {
 public:
  /// mlp: a one-expert bank [1, 2F, d] / [1, d, F].
  explicit DenseMlp(SwiGluExperts mlp) : mlp_(std::move(mlp)) {}

  /// d.
  std::int64_t hidden() const noexcept { return mlp_.mlp().hidden(); }
  /// F.
  std::int64_t ffn() const noexcept { return mlp_.mlp().ffn(); }

  /// The same MLP in int8.
  DenseMlp quantized(Backend& backend, const QuantSpec& spec) const {
    return DenseMlp(mlp_.mlp().quantized(backend, spec));
  }
  /// The MLP as a one-expert bank.
  const SwiGluExperts& mlp() const noexcept { return mlp_.mlp(); }

  // x, out: [T, d].
  /// out += mlp(x).
  void accumulate(Backend& backend, TensorView x, TensorView out) const {
    mlp_.accumulate(backend, x, out);
  }

 private:
  SharedExpert mlp_;  // an ungated shared expert is exactly "out += mlp(x)"
};

/// Self-attention block of a layer.
using AttentionBlock = std::variant<GqaAttention, MlaAttention>;
/// Feed-forward block of a layer.
using FeedForward = std::variant<MoEBlock, DenseMlp>;

/// One pre-norm decoder layer: x += Attn(RMSNorm_in(x)); x += FFN(RMSNorm_post(x)).
class DecoderLayer {
 public:
  // input_norm, post_attention_norm: [d] f32.
  /// Validates that the norms, attention and FFN agree on d.
  DecoderLayer(Tensor input_norm, Tensor post_attention_norm, float eps, AttentionBlock attention,
               FeedForward ffn);

  /// d.
  std::int64_t hidden() const noexcept { return input_norm_.numel(); }
  /// True when the FFN is the routed MoE block.
  bool is_moe() const noexcept { return std::holds_alternative<MoEBlock>(ffn_); }
  /// The attention block.
  const AttentionBlock& attention() const noexcept { return attention_; }
  /// The feed-forward block.
  const FeedForward& ffn() const noexcept { return ffn_; }
  /// Heads per cache row.
  std::int64_t kv_heads() const noexcept;
  /// Width of one cached key head.
  std::int64_t key_dim() const noexcept;
  /// Width of one cached value head.
  std::int64_t value_dim() const noexcept;
  /// The same layer with the parts `config` selects in int8.
  DecoderLayer quantized(Backend& backend, const QuantConfig& config) const;

  // x: [T, d], the residual stream, updated in place.
  /// Runs the layer on T tokens at positions ctx.start ...; fills *stats for a MoE layer.
  void forward(Backend& backend, TensorView x, const AttentionContext& ctx, KvLayer& cache,
               RoutingStats* stats = nullptr) const;

 private:
  Tensor input_norm_;
  Tensor post_norm_;
  float eps_;
  AttentionBlock attention_;
  FeedForward ffn_;
};

/// A decoder-only MoE language model on one backend. Copies share the weights. The backend must
/// outlive the model; sessions (Session) hold the key/value caches.
class Model {
 public:
  /// Assembles a model; validates that the parts agree on d and V and computes the RoPE table.
  Model(Backend& backend, ModelConfig config, EmbeddingEncoder embeddings,
        std::vector<DecoderLayer> layers, LmHeadDecoder head);

  /// The backend holding the weights.
  Backend& backend() const noexcept { return *backend_; }
  /// The config the model was built from.
  const ModelConfig& config() const noexcept { return config_; }
  /// Token embeddings.
  const EmbeddingEncoder& embeddings() const noexcept { return embeddings_; }
  /// Decoder layers.
  const std::vector<DecoderLayer>& layers() const noexcept { return layers_; }
  /// Final norm + LM head.
  const LmHeadDecoder& head() const noexcept { return head_; }
  /// RoPE inverse frequencies [rotary_dim / 2] on the backend.
  const Tensor& inv_freq() const noexcept { return inv_freq_; }
  /// V.
  std::int64_t vocab_size() const noexcept { return head_.vocab_size(); }
  /// d.
  std::int64_t hidden() const noexcept { return embeddings_.hidden(); }
  /// Number of decoder layers.
  std::int64_t num_layers() const noexcept { return static_cast<std::int64_t>(layers_.size()); }

  /// Logits [T, V] of a cache-less forward over `tokens` at positions 0 ... T-1 (T >= 1).
  Tensor forward(std::span<const std::int32_t> tokens) const;

 private:
  Backend* backend_;
  ModelConfig config_;
  EmbeddingEncoder embeddings_;
  std::vector<DecoderLayer> layers_;
  LmHeadDecoder head_;
  Tensor inv_freq_;
};

/// The same model with the parts `config` selects in int8 (see QuantConfig); the original is
/// left as it was. An Error (naming the tensor) for a NaN or Inf weight.
Model quantize_model(const Model& model, const QuantConfig& config);

/// Where load_model stands, reported to LoadOptions::progress.
struct LoadProgress {
  std::size_t tensors_done = 0;   ///< tensors loaded so far
  std::size_t tensors_total = 0;  ///< tensors to load
  std::uint64_t bytes_done = 0;   ///< checkpoint bytes loaded so far
  std::uint64_t bytes_total = 0;  ///< checkpoint bytes to load
  std::string_view tensor;        ///< the tensor just loaded (empty in the first report)
};

/// How load_model keeps float weight matrices (attention, experts, dense MLPs, router, head) and
/// the embedding table.
enum class WeightStorage : std::uint8_t {
  /// bf16 / f16 matrices stay 16-bit where the backend computes with them
  /// (Backend::supports_weight_dtype; the CPU backend's AVX-512 kernels do): half the memory and
  /// half the bytes a decode step reads, and the same logits as f32, since the kernels widen each
  /// weight exactly before the f32 multiply-add. f32 matrices stay f32.
  as_stored,
  /// Every matrix widened to f32 at load.
  f32,
};

/// Options of load_model.
struct LoadOptions {
  /// Called once before the first tensor and after every tensor; returning false cancels the
  /// load, which then throws Error(cancelled) and leaves nothing behind.
  std::function<bool(const LoadProgress&)> progress;
  /// Replaces the config's numeric choices (group mask, renormalisation epsilon, norm_topk_prob)
  /// when set; see FidelityOptions and docs/models.md.
  std::optional<FidelityOptions> fidelity;
  /// When set, the model is quantized while it loads, one decoder layer at a time: the result
  /// is quantize_model(load_model(dir), *quantize) bit for bit, but the decoder layers are
  /// never all f32 at once (peak: the int8 layers plus one f32 layer, plus the f32 embedding
  /// table and head, which also exist in f32 while lm_head / embeddings are quantized). An int8
  /// checkpoint with this set is an Error.
  std::optional<QuantConfig> quantize;
  /// Storage of float weight matrices and the embedding table. Norms and biases are f32
  /// either way.
  WeightStorage weights = WeightStorage::as_stored;
};

/// Loads a Hugging Face checkpoint directory (config.json plus model.safetensors or a sharded
/// model.safetensors.index.json) onto `backend`. Accepts both expert layouts (per-expert Hub
/// names, including Mixtral's block_sparse_moe.experts.e.w1/w3/w2, and fused
/// experts.gate_up_proj / experts.down_proj), tied or separate LM heads, f32 / f16 / bf16
/// weights (computed in f32), and ignores multi-token-prediction layers. Every tensor's presence,
/// dtype and shape is checked against the config before any weight is read; a missing tensor,
/// wrong shape or dtype, a quantised checkpoint or a config the tensors contradict is an Error
/// naming the file and the tensor. A failed or cancelled load leaves nothing half-built.
Model load_model(Backend& backend, const std::filesystem::path& dir,
                 const LoadOptions& options = {});

}  // namespace autoglm
