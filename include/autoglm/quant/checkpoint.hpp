// SPDX-License-Identifier: Apache-2.0
// Int8 checkpoints on disk: quantize_checkpoint converts a Hugging Face checkpoint directory
// into one that load_model reads without re-quantizing.
//
// File format: the same tensor names as the source; each quantized weight `W` is stored as I8
// with the same shape plus `W_scale`, F32 [..., N, K / group]; every other tensor is copied as
// it was. The safetensors metadata holds autoglm.quant (scheme) and autoglm.activations, and
// config.json gains quantization_config {quant_method: "autoglm_int8", scheme, activations,
// group_size}.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "autoglm/quant/quantize.hpp"

namespace autoglm {

class Model;

/// quant_method of config.json for an autoglm int8 checkpoint.
inline constexpr std::string_view kAutoglmQuantMethod = "autoglm_int8";

/// What a checkpoint tensor is, by its Hugging Face name.
enum class WeightRole : std::uint8_t {
  experts,     ///< routed or shared expert matrices (per expert or fused)
  attention,   ///< attention projections
  dense_mlp,   ///< MLP of a dense layer
  lm_head,     ///< lm_head.weight
  embeddings,  ///< model.embed_tokens.weight
  router,      ///< MoE router (mlp.gate / block_sparse_moe.gate)
  other,       ///< norms, biases, selection biases, shared-expert gates: never quantized
};

/// The role of the tensor called `name`.
WeightRole weight_role(std::string_view name);
/// Whether `config` quantizes tensors of `role`.
bool quantizes(const QuantConfig& config, WeightRole role);
/// Name of the scale tensor of the int8 weight `weight`.
std::string scale_name(std::string_view weight);
/// Name of the column-scale tensor of the int8 weight `weight` (present when equalised; the
/// gate and up projections that a loader fuses into one matrix share theirs).
std::string col_scale_name(std::string_view weight);

/// What quantize_checkpoint did.
struct QuantizeReport {
  std::uint64_t bytes_in = 0;   ///< bytes of the source safetensors files
  std::uint64_t bytes_out = 0;  ///< bytes of the written safetensors files
  std::size_t quantized = 0;    ///< tensors written as int8
  std::size_t kept = 0;         ///< tensors copied unchanged
};

/// Writes the int8 form of the checkpoint directory `src` into `dst` (created if needed; may
/// not be `src`): one output shard per input shard, an index when sharded, config.json with
/// quantization_config. With config.spec.equalize, matrices get column scales where they help;
/// a gate_proj and its up_proj get one set chosen over both. Error naming the file and tensor for a
/// NaN / Inf weight, an unknown model_type, an already quantized source or an unwritable
/// destination.
QuantizeReport quantize_checkpoint(const std::filesystem::path& src,
                                   const std::filesystem::path& dst, const QuantConfig& config);

/// Writes `model` -- quantized with `config` from a model loaded from the checkpoint directory
/// `src`, by quantize_model with or without calibration (GPTQ) -- as an int8 checkpoint in
/// `dst`, in quantize_checkpoint's format: the decoder layers' int8 codes, scales and column
/// scales are the model's, bit for bit; the embedding table and LM head, when `config`
/// quantizes them, are rounded to nearest as quantize_model does. load_model(dst) gives the same
/// model. An Error naming the tensor when the model does not hold `src`'s layers, or holds f32 or
/// another scheme where `config` asks for int8; quantize_checkpoint's Errors otherwise.
QuantizeReport save_quantized(const Model& model, const std::filesystem::path& src,
                              const std::filesystem::path& dst, const QuantConfig& config);

}  // namespace autoglm
