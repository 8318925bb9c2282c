// SPDX-License-Identifier: Apache-2.0
// parse_model_config / load_model_config: the real config.json of one checkpoint per family
// (values from docs/model-semantics.md), class defaults for absent keys, the transformers 5.x
// rope_parameters layout, derived helpers (is_moe_layer, rotary_dim, attention scale,
// gate_options, fidelity options), and every error path.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "support.hpp"

using namespace autoglm;
using namespace agt;

namespace {

// ---- real config.json files (non-math keys trimmed only where noted) ----

constexpr std::string_view kMixtral8x7B = R"json({
  "architectures": ["MixtralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mixtral",
  "num_attention_heads": 32,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "num_local_experts": 8,
  "output_router_logits": false,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.02,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
})json";

constexpr std::string_view kQwen15MoE = R"json({
  "architectures": ["Qwen2MoeForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5632,
  "max_position_embeddings": 8192,
  "max_window_layers": 21,
  "model_type": "qwen2_moe",
  "num_attention_heads": 16,
  "num_hidden_layers": 24,
  "num_key_value_heads": 16,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.39.0.dev0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936,
  "decoder_sparse_step": 1,
  "moe_intermediate_size": 1408,
  "shared_expert_intermediate_size": 5632,
  "num_experts_per_tok": 4,
  "num_experts": 60,
  "norm_topk_prob": false,
  "output_router_logits": false,
  "router_aux_loss_coef": 0.001
})json";

constexpr std::string_view kQwen3_30B_A3B = R"json({
  "architectures": ["Qwen3MoeForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 6144,
  "max_position_embeddings": 40960,
  "max_window_layers": 48,
  "mlp_only_layers": [],
  "model_type": "qwen3_moe",
  "moe_intermediate_size": 768,
  "norm_topk_prob": true,
  "num_attention_heads": 32,
  "num_experts": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 48,
  "num_key_value_heads": 4,
  "output_router_logits": false,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.001,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})json";

constexpr std::string_view kOlmoe1B7B = R"json({
  "architectures": ["OlmoeForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "clip_qkv": null,
  "eos_token_id": 50279,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 1024,
  "max_position_embeddings": 4096,
  "model_type": "olmoe",
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts": 64,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 16,
  "num_key_value_heads": 16,
  "output_router_logits": false,
  "pad_token_id": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "router_aux_loss_coef": 0.01,
  "tie_word_embeddings": false,
  "torch_dtype": "float32",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 50304
})json";

// auto_map trimmed.
constexpr std::string_view kDeepSeekV3 = R"json({
  "architectures": ["DeepseekV3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "ep_size": 1,
  "first_k_dense_replace": 3,
  "hidden_act": "silu",
  "hidden_size": 7168,
  "initializer_range": 0.02,
  "intermediate_size": 18432,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 8,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 61,
  "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1,
  "pretraining_tp": 1,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128]
  },
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 129280
})json";

constexpr std::string_view kGlm45Air = R"json({
  "architectures": ["Glm4MoeForCausalLM"],
  "attention_bias": true,
  "attention_dropout": 0.0,
  "pad_token_id": 151329,
  "eos_token_id": [151329, 151336, 151338],
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "partial_rotary_factor": 0.5,
  "initializer_range": 0.02,
  "intermediate_size": 10944,
  "max_position_embeddings": 131072,
  "model_type": "glm4_moe",
  "moe_intermediate_size": 1408,
  "norm_topk_prob": true,
  "num_attention_heads": 96,
  "n_group": 1,
  "topk_group": 1,
  "n_routed_experts": 128,
  "n_shared_experts": 1,
  "routed_scaling_factor": 1.0,
  "num_experts_per_tok": 8,
  "first_k_dense_replace": 1,
  "num_hidden_layers": 46,
  "num_key_value_heads": 8,
  "num_nextn_predict_layers": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.54.0",
  "use_cache": true,
  "use_qk_norm": false,
  "vocab_size": 151552
})json";

constexpr std::string_view kGlm45 = R"json({
  "architectures": ["Glm4MoeForCausalLM"],
  "attention_bias": true,
  "first_k_dense_replace": 3,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 5120,
  "intermediate_size": 12288,
  "max_position_embeddings": 131072,
  "model_type": "glm4_moe",
  "moe_intermediate_size": 1536,
  "n_group": 1,
  "n_routed_experts": 160,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 96,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 92,
  "num_key_value_heads": 8,
  "num_nextn_predict_layers": 1,
  "partial_rotary_factor": 0.5,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "routed_scaling_factor": 2.5,
  "tie_word_embeddings": false,
  "topk_group": 1,
  "torch_dtype": "bfloat16",
  "use_qk_norm": true,
  "vocab_size": 151552
})json";

/// `{"model_type": "<type>", <extra>}`.
std::string cfg(std::string_view type, std::string_view extra = "") {
  std::string s = "{\"model_type\": \"" + std::string(type) + "\"";
  if (!extra.empty()) s += ", " + std::string(extra);
  return s + "}";
}

ModelConfig parse(std::string_view text) {
  return parse_model_config(text, "test.json");
}

/// MoE / dense pattern of layers [0, n) as a string of 'M' and 'd'.
std::string layer_pattern(const ModelConfig& c, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += c.is_moe_layer(i) ? 'M' : 'd';
  return s;
}

/// The gate options must build a real GateNetwork over E experts.
void gate_builds(const ModelConfig& c) {
  CpuBackend b(CpuBackendOptions{1});
  const GateOptions o = c.gate_options();
  const bool bias = o.policy == GatePolicy::sigmoid_group;
  CHECK_NOTHROW(GateNetwork::random(b, c.num_experts, 8, o, 1, bias));
}

}  // namespace

TEST_CASE("model config: Mixtral-8x7B", "[model_config]") {
  const ModelConfig c = parse(kMixtral8x7B);
  CHECK(c.family == ModelFamily::mixtral);
  CHECK(c.source == "test.json");
  CHECK(c.vocab_size == 32000);
  CHECK(c.hidden_size == 4096);
  CHECK(c.num_hidden_layers == 32);
  CHECK(c.num_attention_heads == 32);
  CHECK(c.num_key_value_heads == 8);
  CHECK(c.head_dim == 128);
  CHECK(c.v_head_dim == 128);
  CHECK(c.intermediate_size == 14336);
  CHECK(c.moe_intermediate_size == 14336);  // Mixtral experts use intermediate_size
  CHECK(c.num_experts == 8);
  CHECK(c.num_experts_per_tok == 2);
  CHECK(c.norm_topk_prob);
  CHECK(c.score_func == ScoreFunc::softmax);
  CHECK(c.n_shared_experts == 0);
  CHECK(c.shared_expert_intermediate_size == 0);
  CHECK(c.rms_norm_eps == 1e-5);
  CHECK(c.rope_theta == 1e6);
  CHECK(c.rope_scaling.type == RopeType::none);
  CHECK(c.rotary_dim() == 128);
  CHECK_FALSE(c.rope_interleave);
  CHECK_FALSE(c.qkv_bias);
  CHECK_FALSE(c.o_proj_bias);
  CHECK(c.qk_norm == QkNorm::none);
  CHECK(c.sliding_window == 0);
  CHECK(c.max_position_embeddings == 32768);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK(c.torch_dtype == "bfloat16");
  CHECK(c.quantization.method.empty());
  CHECK(layer_pattern(c, 32) == std::string(32, 'M'));
  CHECK(c.attention_scale() == Approx(1.0 / std::sqrt(128.0)));
  CHECK(c.rope_attention_factor() == 1.0);

  const GateOptions g = c.gate_options();
  CHECK(g.policy == GatePolicy::softmax_topk);
  CHECK(g.top_k == 2);
  CHECK(g.renormalize);
  CHECK(g.renorm_epsilon == 0.0f);
  CHECK(g.routed_scaling == 1.0f);
  CHECK(g.n_group == 1);
  gate_builds(c);

  // Mixtral always renormalises: neither the key nor the fidelity override changes that.
  ModelConfig n = parse(cfg("mixtral", "\"norm_topk_prob\": false, \"sliding_window\": 4096"));
  CHECK(n.norm_topk_prob);
  n.fidelity.norm_topk_prob = false;
  CHECK(n.gate_options().renormalize);
  CHECK(n.sliding_window == 4096);
}

TEST_CASE("model config: Qwen1.5-MoE-A2.7B (qwen2_moe)", "[model_config]") {
  const ModelConfig c = parse(kQwen15MoE);
  CHECK(c.family == ModelFamily::qwen2_moe);
  CHECK(c.vocab_size == 151936);
  CHECK(c.hidden_size == 2048);
  CHECK(c.num_hidden_layers == 24);
  CHECK(c.num_attention_heads == 16);
  CHECK(c.num_key_value_heads == 16);
  CHECK(c.head_dim == 128);
  CHECK(c.intermediate_size == 5632);
  CHECK(c.moe_intermediate_size == 1408);
  CHECK(c.num_experts == 60);
  CHECK(c.num_experts_per_tok == 4);
  CHECK_FALSE(c.norm_topk_prob);
  CHECK(c.n_shared_experts == 1);
  CHECK(c.shared_expert_intermediate_size == 5632);
  CHECK(c.shared_expert_gate);
  CHECK(c.qkv_bias);  // qkv_bias defaults to true
  CHECK_FALSE(c.o_proj_bias);
  CHECK(c.qk_norm == QkNorm::none);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.rope_theta == 1e6);
  CHECK(c.max_position_embeddings == 8192);
  CHECK(c.sliding_window == 0);  // use_sliding_window is false
  CHECK(layer_pattern(c, 24) == std::string(24, 'M'));
  const GateOptions g = c.gate_options();
  CHECK(g.policy == GatePolicy::softmax_topk);
  CHECK(g.top_k == 4);
  CHECK_FALSE(g.renormalize);
  gate_builds(c);
}

TEST_CASE("model config: Qwen3-30B-A3B (qwen3_moe)", "[model_config]") {
  const ModelConfig c = parse(kQwen3_30B_A3B);
  CHECK(c.family == ModelFamily::qwen3_moe);
  CHECK(c.hidden_size == 2048);
  CHECK(c.num_hidden_layers == 48);
  CHECK(c.num_attention_heads == 32);
  CHECK(c.num_key_value_heads == 4);
  CHECK(c.head_dim == 128);  // explicit: not hidden / heads = 64
  CHECK(c.rotary_dim() == 128);
  CHECK(c.intermediate_size == 6144);
  CHECK(c.moe_intermediate_size == 768);
  CHECK(c.num_experts == 128);
  CHECK(c.num_experts_per_tok == 8);
  CHECK(c.norm_topk_prob);  // the checkpoint says true; the class default is false
  CHECK(c.n_shared_experts == 0);
  CHECK_FALSE(c.shared_expert_gate);
  CHECK_FALSE(c.qkv_bias);
  CHECK_FALSE(c.o_proj_bias);
  CHECK(c.qk_norm == QkNorm::per_head);
  CHECK(c.rope_theta == 1e6);
  CHECK(c.rope_scaling.type == RopeType::none);
  CHECK(c.max_position_embeddings == 40960);
  CHECK(c.mlp_only_layers.empty());
  CHECK(layer_pattern(c, 48) == std::string(48, 'M'));
  CHECK(c.attention_scale() == Approx(1.0 / std::sqrt(128.0)));
  const GateOptions g = c.gate_options();
  CHECK(g.policy == GatePolicy::softmax_topk);
  CHECK(g.top_k == 8);
  CHECK(g.renormalize);
  CHECK(g.renorm_epsilon == 0.0f);
  gate_builds(c);
}

TEST_CASE("model config: OLMoE-1B-7B", "[model_config]") {
  const ModelConfig c = parse(kOlmoe1B7B);
  CHECK(c.family == ModelFamily::olmoe);
  CHECK(c.vocab_size == 50304);
  CHECK(c.num_hidden_layers == 16);
  CHECK(c.num_key_value_heads == 16);
  CHECK(c.head_dim == 128);
  CHECK(c.intermediate_size == 1024);
  CHECK(c.moe_intermediate_size == 1024);  // OLMoE experts use intermediate_size
  CHECK(c.num_experts == 64);
  CHECK(c.num_experts_per_tok == 8);
  CHECK_FALSE(c.norm_topk_prob);
  CHECK(c.qk_norm == QkNorm::whole);
  CHECK_FALSE(c.clip_qkv.has_value());
  CHECK(c.rms_norm_eps == 1e-5);
  CHECK(c.rope_theta == 1e4);
  CHECK(c.torch_dtype == "float32");
  CHECK(layer_pattern(c, 16) == std::string(16, 'M'));
  const GateOptions g = c.gate_options();
  CHECK(g.policy == GatePolicy::softmax_topk);
  CHECK_FALSE(g.renormalize);
  gate_builds(c);

  const ModelConfig clip = parse(cfg("olmoe", "\"clip_qkv\": 8, \"attention_bias\": true"));
  REQUIRE(clip.clip_qkv.has_value());
  CHECK(*clip.clip_qkv == 8.0);
  CHECK(clip.qkv_bias);
  CHECK(clip.o_proj_bias);
}

TEST_CASE("model config: DeepSeek-V3", "[model_config]") {
  const ModelConfig c = parse(kDeepSeekV3);
  CHECK(c.family == ModelFamily::deepseek_v3);
  CHECK(c.vocab_size == 129280);
  CHECK(c.hidden_size == 7168);
  CHECK(c.num_hidden_layers == 61);
  CHECK(c.num_nextn_predict_layers == 1);
  CHECK(c.num_attention_heads == 128);
  CHECK(c.num_key_value_heads == 128);
  CHECK(c.q_lora_rank == 1536);
  CHECK(c.kv_lora_rank == 512);
  CHECK(c.qk_nope_head_dim == 128);
  CHECK(c.qk_rope_head_dim == 64);
  CHECK(c.head_dim == 192);
  CHECK(c.v_head_dim == 128);
  CHECK(c.rotary_dim() == 64);
  CHECK(c.rope_interleave);
  CHECK(c.intermediate_size == 18432);
  CHECK(c.moe_intermediate_size == 2048);
  CHECK(c.num_experts == 256);
  CHECK(c.num_experts_per_tok == 8);
  CHECK(c.norm_topk_prob);
  CHECK(c.routed_scaling_factor == 2.5);
  CHECK(c.n_group == 8);
  CHECK(c.topk_group == 4);
  CHECK(c.score_func == ScoreFunc::sigmoid);
  CHECK(c.topk_method == "noaux_tc");
  CHECK(c.n_shared_experts == 1);
  CHECK(c.shared_expert_intermediate_size == 2048);
  CHECK_FALSE(c.shared_expert_gate);
  CHECK(c.first_k_dense_replace == 3);
  CHECK(c.max_position_embeddings == 163840);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.rope_theta == 1e4);
  CHECK(c.rope_scaling.type == RopeType::yarn);
  CHECK(c.rope_scaling.factor == 40.0);
  CHECK(c.rope_scaling.original_max_position_embeddings == 4096);
  CHECK(c.rope_scaling.beta_fast == 32.0);
  CHECK(c.rope_scaling.beta_slow == 1.0);
  CHECK(c.rope_scaling.mscale == 1.0);
  CHECK(c.rope_scaling.mscale_all_dim == 1.0);
  CHECK(c.quantization.method == "fp8");
  CHECK(c.quantization.format == "e4m3");
  CHECK(c.quantization.weight_block_size == std::array<std::int64_t, 2>{128, 128});
  // Layers 0-2 dense, then MoE; the MTP layer 61 follows the same rule; 62 does not exist.
  CHECK(layer_pattern(c, 62) == "ddd" + std::string(59, 'M'));
  CHECK_ERROR(c.is_moe_layer(62), out_of_range, "is_moe_layer", "62");
  CHECK_ERROR(c.is_moe_layer(-1), out_of_range, "is_moe_layer", "-1");
  // Score scale (128 + 64)^-0.5 * mscale^2, mscale = 0.1 * ln 40 + 1 (about x1.874).
  const double m = 0.1 * std::log(40.0) + 1.0;
  CHECK(c.attention_scale() == Approx(m * m / std::sqrt(192.0)));
  CHECK(m * m == Approx(1.874).epsilon(1e-3));
  CHECK(c.rope_attention_factor() == Approx(1.0));  // mscale / mscale_all_dim = 1

  const GateOptions g = c.gate_options();
  CHECK(g.policy == GatePolicy::sigmoid_group);
  CHECK(g.top_k == 8);
  CHECK(g.renormalize);
  CHECK(g.renorm_epsilon == 1e-20f);
  CHECK(g.routed_scaling == 2.5f);
  CHECK(g.n_group == 8);
  CHECK(g.topk_group == 4);
  CHECK(g.group_mask == GroupMask::neg_inf);
  gate_builds(c);
}

TEST_CASE("model config: GLM-4.5-Air and GLM-4.5", "[model_config]") {
  const ModelConfig air = parse(kGlm45Air);
  CHECK(air.family == ModelFamily::glm4_moe);
  CHECK(air.hidden_size == 4096);
  CHECK(air.num_hidden_layers == 46);
  CHECK(air.num_nextn_predict_layers == 1);
  CHECK(air.num_attention_heads == 96);
  CHECK(air.num_key_value_heads == 8);
  CHECK(air.head_dim == 128);
  CHECK(air.partial_rotary_factor == 0.5);
  CHECK(air.rotary_dim() == 64);
  CHECK_FALSE(air.rope_interleave);
  CHECK(air.qkv_bias);
  CHECK_FALSE(air.o_proj_bias);
  CHECK(air.qk_norm == QkNorm::none);
  CHECK(air.intermediate_size == 10944);
  CHECK(air.moe_intermediate_size == 1408);
  CHECK(air.num_experts == 128);
  CHECK(air.num_experts_per_tok == 8);
  CHECK(air.routed_scaling_factor == 1.0);
  CHECK(air.n_group == 1);
  CHECK(air.topk_group == 1);
  CHECK(air.n_shared_experts == 1);
  CHECK(air.shared_expert_intermediate_size == 1408);
  CHECK(air.first_k_dense_replace == 1);
  CHECK(air.rope_theta == 1e6);
  CHECK(air.rms_norm_eps == 1e-5);
  CHECK(air.score_func == ScoreFunc::sigmoid);
  CHECK(layer_pattern(air, 47) == "d" + std::string(46, 'M'));
  CHECK(air.attention_scale() == Approx(1.0 / std::sqrt(128.0)));
  const GateOptions ga = air.gate_options();
  CHECK(ga.policy == GatePolicy::sigmoid_group);
  CHECK(ga.routed_scaling == 1.0f);
  CHECK(ga.n_group == 1);
  CHECK(ga.renorm_epsilon == 1e-20f);
  gate_builds(air);

  const ModelConfig big = parse(kGlm45);
  CHECK(big.hidden_size == 5120);
  CHECK(big.num_hidden_layers == 92);
  CHECK(big.num_experts == 160);
  CHECK(big.moe_intermediate_size == 1536);
  CHECK(big.intermediate_size == 12288);
  CHECK(big.routed_scaling_factor == 2.5);
  CHECK(big.qk_norm == QkNorm::per_head);
  CHECK(big.first_k_dense_replace == 3);
  CHECK(layer_pattern(big, 93) == "ddd" + std::string(90, 'M'));
  CHECK(big.gate_options().routed_scaling == 2.5f);
  gate_builds(big);
}

TEST_CASE("model config: class defaults when keys are absent", "[model_config]") {
  SECTION("mixtral") {
    const ModelConfig c = parse(cfg("mixtral"));
    CHECK(c.vocab_size == 32000);
    CHECK(c.hidden_size == 4096);
    CHECK(c.num_hidden_layers == 32);
    CHECK(c.num_key_value_heads == 8);
    CHECK(c.head_dim == 128);
    CHECK(c.num_experts == 8);
    CHECK(c.num_experts_per_tok == 2);
    CHECK(c.moe_intermediate_size == 14336);
    CHECK(c.max_position_embeddings == 131072);
    CHECK(c.rms_norm_eps == 1e-5);
    CHECK(c.rope_theta == 1e6);
  }
  SECTION("qwen2_moe") {
    const ModelConfig c = parse(cfg("qwen2_moe"));
    CHECK(c.num_experts == 60);
    CHECK(c.num_experts_per_tok == 4);
    CHECK(c.moe_intermediate_size == 1408);
    CHECK(c.shared_expert_intermediate_size == 5632);
    CHECK(c.num_key_value_heads == 16);
    CHECK(c.head_dim == 128);
    CHECK_FALSE(c.norm_topk_prob);
    CHECK(c.qkv_bias);
    CHECK(c.rope_theta == 1e4);
    CHECK(c.decoder_sparse_step == 1);
  }
  SECTION("qwen3_moe") {
    const ModelConfig c = parse(cfg("qwen3_moe"));
    CHECK(c.num_experts == 128);
    CHECK(c.num_experts_per_tok == 8);
    CHECK(c.moe_intermediate_size == 768);
    CHECK(c.intermediate_size == 6144);
    CHECK(c.num_attention_heads == 32);
    CHECK(c.num_key_value_heads == 4);
    CHECK(c.head_dim == 64);  // hidden 2048 / 32 heads without head_dim
    CHECK_FALSE(c.norm_topk_prob);
    CHECK(c.rope_theta == 1e4);
    CHECK(c.rms_norm_eps == 1e-6);
  }
  SECTION("olmoe") {
    const ModelConfig c = parse(cfg("olmoe"));
    CHECK(c.num_experts == 64);
    CHECK(c.moe_intermediate_size == 2048);
    CHECK(c.num_key_value_heads == 16);  // null: = heads
    CHECK(c.vocab_size == 50304);
    CHECK(c.max_position_embeddings == 4096);
  }
  SECTION("deepseek_v3") {
    const ModelConfig c = parse(cfg("deepseek_v3"));
    CHECK(c.num_experts == 256);
    CHECK(c.routed_scaling_factor == 2.5);
    CHECK(c.n_group == 8);
    CHECK(c.topk_group == 4);
    CHECK(c.first_k_dense_replace == 3);
    CHECK(c.q_lora_rank == 1536);
    CHECK(c.kv_lora_rank == 512);
    CHECK(c.head_dim == 192);
    CHECK(c.rope_interleave);
    CHECK(c.n_shared_experts == 1);
    CHECK(c.max_position_embeddings == 4096);
    CHECK(c.rope_scaling.type == RopeType::none);
    CHECK(c.attention_scale() == Approx(1.0 / std::sqrt(192.0)));  // no mscale without scaling
    CHECK(c.num_nextn_predict_layers == 0);
  }
  SECTION("glm4_moe (head_dim given: 4096 is not divisible by the 96 default heads)") {
    const ModelConfig c = parse(cfg("glm4_moe", "\"head_dim\": 128"));
    CHECK(c.num_experts == 128);
    CHECK(c.moe_intermediate_size == 1408);
    CHECK(c.routed_scaling_factor == 1.0);
    CHECK(c.n_group == 1);
    CHECK(c.first_k_dense_replace == 1);
    CHECK(c.partial_rotary_factor == 0.5);
    CHECK(c.rotary_dim() == 64);
    CHECK(c.num_key_value_heads == 8);
    CHECK(c.max_position_embeddings == 131072);
    CHECK(c.norm_topk_prob);
    CHECK(c.qk_norm == QkNorm::none);
    CHECK(c.rope_theta == 1e4);
    CHECK_ERROR(parse(cfg("glm4_moe")), invalid_argument, "'hidden_size'=4096",
                "num_attention_heads=96", "head_dim");
  }
  SECTION("null where transformers reads None") {
    const ModelConfig o = parse(cfg("olmoe", "\"num_key_value_heads\": null, \"head_dim\": null"));
    CHECK(o.num_key_value_heads == 16);
    CHECK(o.head_dim == 128);
    const ModelConfig d =
        parse(cfg("deepseek_v3", "\"q_lora_rank\": null, \"n_shared_experts\": null"));
    CHECK(d.q_lora_rank == 0);
    CHECK(d.n_shared_experts == 0);
    CHECK(d.shared_expert_intermediate_size == 0);
    const ModelConfig q = parse(cfg("qwen3_moe", "\"mlp_only_layers\": null"));
    CHECK(q.mlp_only_layers.empty());
  }
}

TEST_CASE("model config: which layers are MoE", "[model_config]") {
  const ModelConfig step2 =
      parse(cfg("qwen2_moe", "\"num_hidden_layers\": 8, \"decoder_sparse_step\": 2"));
  CHECK(layer_pattern(step2, 8) == "dMdMdMdM");
  const ModelConfig only = parse(
      cfg("qwen3_moe",
          "\"num_hidden_layers\": 6, \"mlp_only_layers\": [4, 0, 4], \"decoder_sparse_step\": 1"));
  CHECK(only.mlp_only_layers == std::vector<std::int64_t>{0, 4});
  CHECK(layer_pattern(only, 6) == "dMMMdM");
  const ModelConfig both =
      parse(cfg("qwen3_moe",
                "\"num_hidden_layers\": 9, \"mlp_only_layers\": [5], \"decoder_sparse_step\": 3"));
  CHECK(layer_pattern(both, 9) ==
        "ddMddddd"
        "M");
  const ModelConfig dense0 =
      parse(cfg("deepseek_v3", "\"num_hidden_layers\": 4, \"first_k_dense_replace\": 0"));
  CHECK(layer_pattern(dense0, 4) == "MMMM");
  const ModelConfig all_dense = parse(
      cfg("glm4_moe", "\"head_dim\": 128, \"num_hidden_layers\": 2, \"first_k_dense_replace\": 2"));
  CHECK(layer_pattern(all_dense, 2) == "dd");
  const ModelConfig olmoe = parse(cfg("olmoe", "\"num_hidden_layers\": 3"));
  CHECK(layer_pattern(olmoe, 3) == "MMM");
  CHECK_ERROR(olmoe.is_moe_layer(3), out_of_range, "[ModelConfig::is_moe_layer]", "layer 3");
}

TEST_CASE("model config: RoPE keys, rope_parameters (transformers 5.x)", "[model_config]") {
  SECTION("rope_parameters carries rope_theta and the scaling") {
    const ModelConfig c = parse(cfg("qwen3_moe", R"("rope_parameters": {"rope_type": "yarn",
        "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768})"));
    CHECK(c.rope_theta == 1e6);
    CHECK(c.rope_scaling.type == RopeType::yarn);
    CHECK(c.rope_scaling.factor == 4.0);
    CHECK(c.rope_scaling.original_max_position_embeddings == 32768);
    CHECK(c.rope_attention_factor() == Approx(0.1 * std::log(4.0) + 1.0));
  }
  SECTION("the object's rope_theta wins over the flat key; flat rope_theta fills a gap") {
    const ModelConfig c = parse(cfg(
        "mixtral",
        R"("rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 20000})"));
    CHECK(c.rope_theta == 20000.0);
    CHECK(c.rope_scaling.type == RopeType::none);
    const ModelConfig f = parse(
        cfg("mixtral", R"("rope_theta": 50000, "rope_parameters": {"rope_type": "default"})"));
    CHECK(f.rope_theta == 50000.0);
  }
  SECTION("partial_rotary_factor inside rope_parameters") {
    const ModelConfig c = parse(cfg("glm4_moe", R"("head_dim": 128, "partial_rotary_factor": 0.5,
        "rope_parameters": {"rope_theta": 1e6, "partial_rotary_factor": 0.25})"));
    CHECK(c.partial_rotary_factor == 0.25);
    CHECK(c.rotary_dim() == 32);
  }
  SECTION("a flat rope_scaling replaces rope_parameters' scaling") {
    const ModelConfig c = parse(cfg("qwen2_moe", R"("rope_scaling": {"type": "linear", "factor": 2},
        "rope_parameters": {"rope_type": "yarn", "factor": 8})"));
    CHECK(c.rope_scaling.type == RopeType::linear);
    CHECK(c.rope_scaling.factor == 2.0);
  }
  SECTION("yarn factor derived from the context ratio, defaults of beta_fast / beta_slow") {
    const ModelConfig c = parse(cfg("deepseek_v3", R"("max_position_embeddings": 163840,
        "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 4096,
                         "beta_fast": 0, "mscale": 0.707, "mscale_all_dim": 0.707})"));
    CHECK(c.rope_scaling.factor == 40.0);
    CHECK(c.rope_scaling.beta_fast == 32.0);
    CHECK(c.rope_scaling.beta_slow == 1.0);
    CHECK(c.rope_scaling.original_max_position_embeddings == 4096);
    const double m = 0.1 * 0.707 * std::log(40.0) + 1.0;
    CHECK(c.attention_scale() == Approx(m * m / std::sqrt(192.0)));
    const ModelConfig a = parse(cfg("deepseek_v3", R"("rope_scaling": {"type": "yarn",
        "factor": 4, "attention_factor": 0.5, "truncate": false})"));
    CHECK(a.rope_attention_factor() == 0.5);
    CHECK_FALSE(a.rope_scaling.truncate);
    CHECK(a.rope_scaling.original_max_position_embeddings == 4096);  // = max_position_embeddings
  }
  SECTION("linear, dynamic and llama3") {
    CHECK(parse(cfg("mixtral", R"("rope_scaling": {"rope_type": "dynamic", "factor": 2.0})"))
              .rope_scaling.type == RopeType::dynamic);
    const ModelConfig l = parse(cfg("mixtral", R"("rope_scaling": {"rope_type": "llama3",
        "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
        "original_max_position_embeddings": 8192})"));
    CHECK(l.rope_scaling.type == RopeType::llama3);
    CHECK(l.rope_scaling.high_freq_factor == 4.0);
    CHECK(l.rope_scaling.original_max_position_embeddings == 8192);
    CHECK(parse(cfg("mixtral", R"("rope_scaling": {"rope_type": "default"})")).rope_scaling.type ==
          RopeType::none);
    CHECK(parse(cfg("mixtral", R"("rope_scaling": {})")).rope_scaling.type == RopeType::none);
  }
}

TEST_CASE("model config: fidelity options pick the reference / llama.cpp numerics",
          "[model_config]") {
  ModelConfig c = parse(kDeepSeekV3);
  c.fidelity = FidelityOptions::deepseek_reference();
  GateOptions g = c.gate_options();
  CHECK(g.group_mask == GroupMask::neg_inf);
  CHECK(g.renorm_epsilon == 0.0f);
  c.fidelity.norm_topk_prob = false;
  CHECK_FALSE(c.gate_options().renormalize);
  c.fidelity = FidelityOptions::transformers();
  CHECK(c.gate_options().group_mask == GroupMask::neg_inf);
  c.fidelity = FidelityOptions::transformers_4x();
  CHECK(c.gate_options().group_mask == GroupMask::zero);
  c.fidelity.renorm_epsilon = -1.0f;
  CHECK_ERROR(c.gate_options(), invalid_argument, "gate_options", "renorm_epsilon=-1");

  ModelConfig q = parse(cfg("qwen3_moe"));  // class default norm_topk_prob = false
  CHECK_FALSE(q.gate_options().renormalize);
  q.fidelity.norm_topk_prob = true;  // llama.cpp's qwen3moe
  CHECK(q.gate_options().renormalize);
  CHECK(q.gate_options().renorm_epsilon == 0.0f);  // softmax routers never add an epsilon

  ModelConfig bad = parse(cfg("qwen3_moe"));
  bad.num_experts_per_tok = 0;
  CHECK_ERROR(bad.gate_options(), invalid_argument, "gate_options", "num_experts_per_tok=0");
}

TEST_CASE("model config: malformed and mistyped input", "[model_config][errors]") {
  CHECK_ERROR(parse(""), io, "[parse_model_config]", "test.json", "malformed JSON");
  CHECK_ERROR(parse("{\"model_type\": \"mixtral\""), io, "malformed JSON");
  CHECK_ERROR(parse("{\"model_type\": \"mixtral\"} trailing"), io, "malformed JSON");
  CHECK_ERROR(parse("[1, 2]"), invalid_argument, "must be a JSON object", "an array of 2");
  CHECK_ERROR(parse("42"), invalid_argument, "must be a JSON object", "42");
  CHECK_ERROR(parse("{}"), not_found, "'model_type'=(missing)", "glm4_moe", "mixtral", "qwen3_moe",
              "qwen2_moe", "olmoe", "deepseek_v3");
  CHECK_ERROR(parse(cfg("llama")), not_found, "'model_type'=\"llama\"", "not supported",
              "glm4_moe, mixtral, qwen3_moe, qwen2_moe, olmoe, deepseek_v3");
  CHECK_ERROR(parse("{\"model_type\": 7}"), not_found, "'model_type'=7");
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_size\": \"4096\"")), invalid_argument, "test.json",
              "'hidden_size'=\"4096\"", "must be an integer");
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_size\": 4096.0")), invalid_argument,
              "'hidden_size'=4096.0", "integer");
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_size\": true")), invalid_argument,
              "'hidden_size'=true");
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_size\": null")), invalid_argument,
              "'hidden_size'=null");
  CHECK_ERROR(parse(cfg("mixtral", "\"num_hidden_layers\": [32]")), invalid_argument,
              "'num_hidden_layers'=an array of 1");
  CHECK_ERROR(parse(cfg("mixtral", "\"vocab_size\": {\"a\": 1}")), invalid_argument,
              "'vocab_size'=an object");
  CHECK_ERROR(parse(cfg("mixtral", "\"rms_norm_eps\": \"1e-5\"")), invalid_argument,
              "'rms_norm_eps'=\"1e-5\"", "number");
  CHECK_ERROR(parse(cfg("mixtral", "\"rope_theta\": 1e400")), io, "number overflow", "1e400");
  CHECK_ERROR(parse(cfg("mixtral", "\"tie_word_embeddings\": 1")), invalid_argument,
              "'tie_word_embeddings'=1", "true or false");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"norm_topk_prob\": \"true\"")), invalid_argument,
              "'norm_topk_prob'=\"true\"");
  CHECK_ERROR(parse(cfg("mixtral", "\"rope_scaling\": \"yarn\"")), invalid_argument,
              "'rope_scaling'=\"yarn\"", "an object or null");
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_act\": 3")), invalid_argument, "'hidden_act'=3");
  // A long string is truncated in the message; a deeply nested value is not walked.
  const std::string long_value(5000, 'x');
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_size\": \"" + long_value + "\"")), invalid_argument,
              "'hidden_size'=\"" + std::string(48, 'x') + "...\"");
  const std::string deep = std::string(20000, '[') + std::string(20000, ']');
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_size\": " + deep)), invalid_argument,
              "'hidden_size'=an array of 1");
}

TEST_CASE("model config: sizes out of range", "[model_config][errors]") {
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_size\": 0")), invalid_argument, "'hidden_size'=0",
              "[1, 2147483647]");
  CHECK_ERROR(parse(cfg("mixtral", "\"num_attention_heads\": -8")), invalid_argument,
              "'num_attention_heads'=-8");
  CHECK_ERROR(parse(cfg("mixtral", "\"vocab_size\": 2147483648")), invalid_argument,
              "'vocab_size'=2147483648");
  CHECK_ERROR(parse(cfg("mixtral", "\"intermediate_size\": 18446744073709551615")),
              invalid_argument, "'intermediate_size'=18446744073709551615");
  CHECK_ERROR(parse(cfg("mixtral", "\"num_hidden_layers\": -9223372036854775808")),
              invalid_argument, "'num_hidden_layers'=-9223372036854775808");
  CHECK_ERROR(parse(cfg("mixtral", "\"max_position_embeddings\": 0")), invalid_argument,
              "'max_position_embeddings'=0");
  CHECK_ERROR(parse(cfg("mixtral", "\"head_dim\": 0")), invalid_argument, "'head_dim'=0");
  CHECK_ERROR(parse(cfg("mixtral",
                        "\"num_attention_heads\": 65536, \"num_key_value_heads\": 1, "
                        "\"head_dim\": 65536")),
              invalid_argument, "'num_attention_heads'=65536", "head_dim=65536", "exceeds");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"qk_nope_head_dim\": 2147483647")), invalid_argument,
              "'qk_nope_head_dim'=2147483647", "qk_rope_head_dim=64");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"kv_lora_rank\": 0")), invalid_argument,
              "'kv_lora_rank'=0");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"q_lora_rank\": 0")), invalid_argument, "'q_lora_rank'=0");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"n_shared_experts\": 2147483647")), invalid_argument,
              "'n_shared_experts'=2147483647", "moe_intermediate_size=2048");
  CHECK_ERROR(parse(cfg("deepseek_v3",
                        "\"num_hidden_layers\": 2147483647, "
                        "\"num_nextn_predict_layers\": 1")),
              invalid_argument, "'num_nextn_predict_layers'=1", "exceeds");
  CHECK_ERROR(parse(cfg("mixtral", "\"rms_norm_eps\": 0")), invalid_argument, "'rms_norm_eps'=0",
              "(0, 1)");
  CHECK_ERROR(parse(cfg("mixtral", "\"rms_norm_eps\": -1e-5")), invalid_argument,
              "'rms_norm_eps'=-1e-05");
  CHECK_ERROR(parse(cfg("mixtral", "\"rope_theta\": 0")), invalid_argument, "'rope_theta'=0",
              "> 1");
  CHECK_ERROR(parse(cfg("mixtral", "\"rope_parameters\": {\"rope_theta\": -1}")), invalid_argument,
              "'rope_parameters.rope_theta'=-1");
  CHECK_ERROR(parse(cfg("mixtral", "\"sliding_window\": 0")), invalid_argument,
              "'sliding_window'=0");
  CHECK_ERROR(parse(cfg("olmoe", "\"clip_qkv\": -1")), invalid_argument, "'clip_qkv'=-1");
  CHECK_ERROR(parse(cfg("qwen2_moe", "\"shared_expert_intermediate_size\": 0")), invalid_argument,
              "'shared_expert_intermediate_size'=0");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"routed_scaling_factor\": 0")), invalid_argument,
              "'routed_scaling_factor'=0");
}

TEST_CASE("model config: inconsistent values", "[model_config][errors]") {
  CHECK_ERROR(parse(cfg("mixtral", "\"num_key_value_heads\": 5")), invalid_argument,
              "'num_key_value_heads'=5", "must divide num_attention_heads=32");
  CHECK_ERROR(parse(cfg("mixtral", "\"num_experts_per_tok\": 9")), invalid_argument,
              "'num_experts_per_tok'=9", "'num_local_experts'=8");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"num_experts_per_tok\": 0")), invalid_argument,
              "'num_experts_per_tok'=0");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"num_experts\": 0")), invalid_argument, "'num_experts'=0");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"n_group\": 7")), invalid_argument, "'n_group'=7",
              "must divide", "'n_routed_experts'=256");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"topk_group\": 9")), invalid_argument, "'topk_group'=9",
              "n_group=8");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"topk_group\": 1, \"n_group\": 64")), invalid_argument,
              "'num_experts_per_tok'=8", "exceeds the 4 experts");
  CHECK_ERROR(parse(cfg("glm4_moe", "\"head_dim\": 128, \"first_k_dense_replace\": 47")),
              invalid_argument, "'first_k_dense_replace'=47", "[0, 46]");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"decoder_sparse_step\": 0")), invalid_argument,
              "'decoder_sparse_step'=0");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"mlp_only_layers\": [3, 24]")), invalid_argument,
              "'mlp_only_layers[1]'=24", "num_hidden_layers=24");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"mlp_only_layers\": [-1]")), invalid_argument,
              "'mlp_only_layers[0]'=-1");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"mlp_only_layers\": [\"1\"]")), invalid_argument,
              "'mlp_only_layers[0]'=\"1\"");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"mlp_only_layers\": 3")), invalid_argument,
              "'mlp_only_layers'=3", "array");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"num_experts\": 64, \"num_local_experts\": 32")),
              invalid_argument, "'num_local_experts'=32", "contradicts 'num_experts'=64");
  CHECK(parse(cfg("qwen3_moe", "\"num_local_experts\": 32")).num_experts == 32);
  CHECK(parse(cfg("deepseek_v3", "\"num_local_experts\": 64")).num_experts == 64);
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_size\": 4001")), invalid_argument,
              "'hidden_size'=4001", "not divisible by num_attention_heads=32");
}

TEST_CASE("model config: RoPE errors", "[model_config][errors]") {
  CHECK_ERROR(parse(cfg("glm4_moe", "\"head_dim\": 128, \"partial_rotary_factor\": 0")),
              invalid_argument, "'partial_rotary_factor'=0", "(0, 1]");
  CHECK_ERROR(parse(cfg("glm4_moe", "\"head_dim\": 128, \"partial_rotary_factor\": 1.5")),
              invalid_argument, "'partial_rotary_factor'=1.5");
  CHECK_ERROR(parse(cfg("glm4_moe",
                        "\"head_dim\": 128, \"rope_parameters\": {\"partial_rotary_factor\": 2}")),
              invalid_argument, "'rope_parameters.partial_rotary_factor'=2");
  CHECK_ERROR(parse(cfg("glm4_moe", "\"head_dim\": 10, \"partial_rotary_factor\": 0.5")),
              invalid_argument, "'partial_rotary_factor'=0.5", "rotary dim 5", "even");
  CHECK_ERROR(parse(cfg("glm4_moe", "\"head_dim\": 126")), invalid_argument,
              "'partial_rotary_factor'=0.5", "rotary dim 63");
  CHECK_ERROR(parse(cfg("mixtral", "\"head_dim\": 1")), invalid_argument, "rotary dim 1");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"qk_rope_head_dim\": 63")), invalid_argument,
              "'qk_rope_head_dim'=63", "rotary dim 63");
  CHECK_ERROR(
      parse(cfg("mixtral", "\"rope_scaling\": {\"type\": \"ntk-by-parts\", \"factor\": 2}")),
      invalid_argument, "'rope_scaling.type'=\"ntk-by-parts\"", "yarn");
  CHECK_ERROR(
      parse(cfg("mixtral", "\"rope_scaling\": {\"rope_type\": \"longrope\", \"factor\": 2}")),
      unsupported, "'rope_scaling.rope_type'=\"longrope\"");
  CHECK_ERROR(parse(cfg("mixtral", "\"rope_scaling\": {\"rope_type\": 3}")), invalid_argument,
              "'rope_scaling.rope_type'=3", "string");
  CHECK_ERROR(parse(cfg("mixtral", "\"rope_scaling\": {\"rope_type\": \"linear\"}")),
              invalid_argument, "'rope_scaling.factor'", "required");
  CHECK_ERROR(parse(cfg("mixtral", "\"rope_scaling\": {\"rope_type\": \"yarn\"}")),
              invalid_argument, "'rope_scaling.factor'", "required");
  CHECK_ERROR(
      parse(cfg("mixtral", "\"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 0.5}")),
      invalid_argument, "'rope_scaling.factor'=0.5", "[1, 1e6]");
  CHECK_ERROR(
      parse(cfg("mixtral", "\"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": \"2\"}")),
      invalid_argument, "'rope_scaling.factor'=\"2\"");
  CHECK_ERROR(
      parse(cfg("deepseek_v3",
                "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 40, \"beta_fast\": -1}")),
      invalid_argument, "'rope_scaling.beta_fast'=-1");
  CHECK_ERROR(
      parse(cfg("deepseek_v3",
                "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 40, \"mscale_all_dim\": -1}")),
      invalid_argument, "'rope_scaling.mscale_all_dim'=-1");
  CHECK_ERROR(parse(cfg("deepseek_v3",
                        "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 40, "
                        "\"original_max_position_embeddings\": 0}")),
              invalid_argument, "'rope_scaling.original_max_position_embeddings'=0");
  CHECK_ERROR(parse(cfg("mixtral", R"("max_position_embeddings": 2048,
        "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096})")),
              invalid_argument, "'rope_scaling.factor'=0.5");
  CHECK_ERROR(parse(cfg("mixtral", R"("rope_scaling": {"rope_type": "llama3", "factor": 8,
        "low_freq_factor": 1, "original_max_position_embeddings": 8192})")),
              invalid_argument, "'rope_scaling.high_freq_factor'", "required");
  CHECK_ERROR(parse(cfg("mixtral", R"("rope_scaling": {"rope_type": "llama3", "factor": 8,
        "low_freq_factor": 4, "high_freq_factor": 4, "original_max_position_embeddings": 8192})")),
              invalid_argument, "'rope_scaling.high_freq_factor'=4", "low_freq_factor=4");
  CHECK_ERROR(
      parse(cfg("mixtral", R"("rope_parameters": {"full_attention": {"rope_type": "default"}})")),
      unsupported, "'rope_parameters.full_attention'");
}

TEST_CASE("model config: unsupported semantics", "[model_config][errors]") {
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_act\": \"gelu\"")), unsupported,
              "'hidden_act'=\"gelu\"", "silu");
  CHECK_ERROR(parse(cfg("mixtral", "\"hidden_act\": null")), invalid_argument, "'hidden_act'=null");
  CHECK(parse(cfg("mixtral", "\"hidden_act\": \"swish\"")).family == ModelFamily::mixtral);
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"scoring_func\": \"softmax\"")), unsupported,
              "'scoring_func'=\"softmax\"", "sigmoid");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"topk_method\": \"group_limited_greedy\"")), unsupported,
              "'topk_method'=\"group_limited_greedy\"", "noaux_tc");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"moe_layer_freq\": 2")), unsupported,
              "'moe_layer_freq'=2");
  CHECK_ERROR(parse(cfg("qwen3_moe", "\"use_sliding_window\": true")), unsupported,
              "'use_sliding_window'=true");
  CHECK_ERROR(parse(cfg("deepseek_v3", "\"quantization_config\": {\"fmt\": \"e4m3\"}")),
              invalid_argument, "'quantization_config.quant_method'", "required");
  CHECK_ERROR(
      parse(cfg(
          "deepseek_v3",
          "\"quantization_config\": {\"quant_method\": \"fp8\", \"weight_block_size\": [128]}")),
      invalid_argument, "'quantization_config.weight_block_size'=an array of 1");
  CHECK_ERROR(
      parse(cfg(
          "deepseek_v3",
          "\"quantization_config\": {\"quant_method\": \"fp8\", \"weight_block_size\": [128, 0]}")),
      invalid_argument, "'quantization_config.weight_block_size[1]'=0");
  CHECK(parse(cfg("deepseek_v3", "\"dtype\": \"bfloat16\"")).torch_dtype == "bfloat16");
}

TEST_CASE("model config: load_model_config reads a directory or a file", "[model_config]") {
  const auto dir = std::filesystem::temp_directory_path() / "autoglm_test_model_config";
  std::filesystem::create_directories(dir);
  {
    std::ofstream out(dir / "config.json", std::ios::binary);
    out << kQwen3_30B_A3B;
  }
  const ModelConfig a = load_model_config(dir);
  CHECK(a.family == ModelFamily::qwen3_moe);
  CHECK(a.source == (dir / "config.json").string());
  CHECK(load_model_config(dir / "config.json").num_experts == 128);
  {
    std::ofstream out(dir / "broken.json", std::ios::binary);
    out << "{\"model_type\": \"qwen3_moe\", \"hidden_size\": -1}";
  }
  CHECK_ERROR(load_model_config(dir / "broken.json"), invalid_argument, "broken.json",
              "'hidden_size'=-1");
  CHECK_ERROR(load_model_config(dir / "missing.json"), io, "[load_model_config]", "missing.json");
  std::filesystem::remove_all(dir);
  CHECK_ERROR(load_model_config(dir), io, "autoglm_test_model_config");
}
