// SPDX-License-Identifier: Apache-2.0
// Turning f32 weights into int8 ones (see autoglm/core/quant.hpp for the scheme) and back.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "autoglm/backend/backend.hpp"
#include "autoglm/core/quant.hpp"

namespace autoglm {

// w: [..., N, K] f32 (any layout) on `backend`; K % group == 0.
/// Symmetric int8 quantization of w with spec, packed for backend's kernels (pack = false keeps
/// it row-major, as embedding tables need). With spec.equalize each matrix gets column scales
/// where they help (detail::column_scales). A NaN or Inf weight is an Error naming `name` and
/// the element; an all-zero group gets scale 0.
QuantizedTensor quantize(Backend& backend, TensorView w, QuantSpec spec,
                         std::string_view name = "weight", bool pack = true);

/// quantize() with the scheme as a type: quantize<Int8Grouped<64>>(backend, w).
template <QuantScheme S>
QuantizedTensor quantize(Backend& backend, TensorView w,
                         ActivationMode mode = ActivationMode::weight_only,
                         std::string_view name = "weight") {
  return quantize(backend, w, QuantSpec::of<S>(mode), name);
}

/// Which parts of a model quantize_model converts to int8, and how. Norms, biases and the
/// shared-expert gate always stay f32. The defaults quantize what holds ~97 % of a real MoE's
/// weights (file <= 27 % of f32) and keep f32 where an error goes straight into the routing or
/// the logits: router, embeddings, LM head (about 2 % of Qwen3-30B-A3B's weights).
struct QuantConfig {
  QuantSpec spec{};         ///< scheme and activation mode
  bool experts = true;      ///< routed and shared expert banks
  bool attention = true;    ///< attention projections
  bool dense_mlp = true;    ///< the dense MLPs of non-MoE layers
  bool lm_head = false;     ///< the output head
  bool embeddings = false;  ///< the token embedding table (dequantised row by row on lookup)
  bool router = false;      ///< MoE router weights: f32 by default, as llama.cpp keeps them

  /// Selects exactly the parts a comma list names (experts, attention, dense, head,
  /// embeddings, router), all others off: "experts,attention". An unknown part is an Error
  /// naming it and listing the valid ones; the config is then unchanged.
  void set_parts(std::string_view list);
};

namespace detail {
/// A tied model's head is its embedding table, stored once: an Error (naming fn) unless
/// lm_head and embeddings are both on or both off.
inline void check_tied_parts(std::string_view fn, bool tied, const QuantConfig& config) {
  AUTOGLM_CHECK(!tied || config.lm_head == config.embeddings, invalid_argument, fn,
                "the model ties its LM head to the embedding table, so QuantConfig::lm_head ({}) "
                "and embeddings ({}) must be equal",
                config.lm_head, config.embeddings);
}
}  // namespace detail

/// w in int8 with spec when it is a non-empty f32 matrix (or stack) whose K the group divides;
/// else w unchanged (int8 weights stay; so do f32 ones a group does not fit, as
/// quantize_checkpoint keeps them).
Weight quantize_weight(Backend& backend, const Weight& w, const QuantSpec& spec,
                       std::string_view name = "weight", bool pack = true);

/// The f32 weights [..., N, K] (row-major) that w stands for: q * scale (* col_scale).
Tensor dequantize(Backend& backend, const QuantizedTensor& w);

namespace detail {

/// How quantize_rows and gptq_rows set a group's scale.
struct ScaleRule {
  /// Least-squared-error search (QuantSpec::search_scales); false: max|w| / 127.
  bool search = true;
  /// [k]: an equalised matrix's column scales, or null (all 1). Column c's squared rounding
  /// error weighs col_scale[c]^2 in the search: its inputs are multiplied by col_scale[c].
  const float* col_scale = nullptr;
};

/// A group's scale and the factor that maps a weight to its code before rounding.
struct GroupScale {
  float scale = 0.0f;  ///< q * scale reads the weight back
  float inv = 0.0f;    ///< code = clamp(nearbyint(w * inv), -127, 127)
};

// v: [len] finite values; col_scale: [len] or null.
/// The scale of one group under the rule of autoglm/core/quant.hpp: {0, 0} when max|v| is
/// below 1e-30; else max|v| / 127 times the candidate factor (1 + 0.005 j, 0 <= j <= 40) with
/// the least squared rounding error (v[i]'s weighted by col_scale[i]^2), the smallest on ties,
/// 1 without search.
GroupScale group_scale(const float* v, std::int64_t len, const float* col_scale, bool search);

/// The int8 code of w at a group's scale.
inline std::int8_t round_code(float w, const GroupScale& s) {
  return static_cast<std::int8_t>(std::clamp(std::nearbyint(w * s.inv), -127.0f, 127.0f));
}

// w: [n, k] f32 row-major on the host; q: [n, k]; scales: [n, k / group].
/// Quantizes rows on the host; returns the index of the first non-finite weight, or -1.
std::int64_t quantize_rows(const float* w, std::int64_t n, std::int64_t k, std::int64_t group,
                           std::int8_t* q, float* scales, const ScaleRule& rule = {});

/// quantize_rows with the rows split over `threads` threads (0: the hardware's); the same
/// codes and scales, and the same first non-finite index, as one call.
std::int64_t quantize_rows_parallel(const float* w, std::int64_t n, std::int64_t k,
                                    std::int64_t group, std::int8_t* q, float* scales,
                                    const ScaleRule& rule, int threads);

// w: [n, k] f32 row-major on the host; col_scale: [k].
/// Column equalisation search (weight-only; W8A8 returns false): tries col_scale[c] =
/// (max_r |w[r, c]| / typical column max)^a for a in {0.25, 0.5, 0.75, 1} and keeps the one with
/// the smallest expected output error of int8 rounding under unit-variance activations, if that
/// is below 75 % of no equalisation's. Returns false (col_scale all 1) otherwise, and for a
/// non-finite or huge weight.
bool column_scales(const float* w, std::int64_t n, std::int64_t k, std::int64_t group,
                   ActivationMode mode, float* col_scale);

// w: [n, k] f32 row-major on the host, in place; col_scale: [k].
/// w[r, c] /= col_scale[c]: the matrix an equalised tensor quantizes.
void divide_columns(float* w, std::int64_t n, std::int64_t k, const float* col_scale);

}  // namespace detail

}  // namespace autoglm
