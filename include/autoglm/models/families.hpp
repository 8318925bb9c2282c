// SPDX-License-Identifier: Apache-2.0
// The architecture of each supported model family: which attention block it uses and where
// its MoE tensors live in a Hugging Face checkpoint. Everything that a config.json can switch
// (biases, q/k norms, partial rotary, shared-expert widths, dense layers) is in ModelConfig.
#pragma once

#include <cstdint>
#include <string_view>

#include "autoglm/io/model_config.hpp"

namespace autoglm {

/// The self-attention block of a family.
enum class AttentionKind : std::uint8_t {
  gqa,  ///< grouped-query attention (GqaAttention)
  mla,  ///< DeepSeek-V3 multi-head latent attention (MlaAttention)
};

/// The fixed architecture of one model family.
///
/// | family      | attention | MoE block (Hub / transformers 5)   | shared expert                    |
/// |-------------|-----------|------------------------------------|----------------------------------|
/// | mixtral     | GQA       | block_sparse_moe.experts.e.w1/w3/w2 / mlp.experts.gate_up_proj | – |
/// | qwen2_moe   | GQA+bias  | mlp.experts.e.{gate,up,down}_proj  | mlp.shared_expert + sigmoid gate |
/// | qwen3_moe   | GQA+qk norm per head | same                    | –                                |
/// | olmoe       | GQA+whole q/k norm   | same                    | –                                |
/// | deepseek_v3 | MLA       | same + gate.e_score_correction_bias | mlp.shared_experts (ungated)    |
/// | glm4_moe    | GQA+bias, partial rotary | same + selection bias | mlp.shared_experts (ungated)  |
struct FamilyTraits {
  AttentionKind attention = AttentionKind::gqa;  ///< attention block
  /// Prefix of the MoE block in a layer: "mlp" (transformers 5 and every Hub family but Mixtral).
  std::string_view moe_block = "mlp";
  /// Mixtral Hub checkpoints: "block_sparse_moe" with experts w1 (gate), w3 (up), w2 (down);
  /// empty for the other families.
  std::string_view hub_moe_block;
  /// Shared-expert block: "shared_expert" (Qwen2-MoE), "shared_experts" (DeepSeek-V3, GLM), or
  /// empty when the family has none.
  std::string_view shared_block;
  bool shared_gate = false;     ///< Qwen2-MoE: mlp.shared_expert_gate.weight [1, d]
  bool selection_bias = false;  ///< DeepSeek-V3, GLM: mlp.gate.e_score_correction_bias [E]
};

/// The architecture of `family`.
constexpr FamilyTraits family_traits(ModelFamily family) noexcept {
  switch (family) {
    case ModelFamily::mixtral: return {AttentionKind::gqa, "mlp", "block_sparse_moe", "", false, false};
    case ModelFamily::qwen2_moe: return {AttentionKind::gqa, "mlp", "", "shared_expert", true, false};
    case ModelFamily::qwen3_moe: return {AttentionKind::gqa, "mlp", "", "", false, false};
    case ModelFamily::olmoe: return {AttentionKind::gqa, "mlp", "", "", false, false};
    case ModelFamily::deepseek_v3: return {AttentionKind::mla, "mlp", "", "shared_experts", false, true};
    case ModelFamily::glm4_moe: return {AttentionKind::gqa, "mlp", "", "shared_experts", false, true};
  }
  return {};
}

}  // namespace autoglm
