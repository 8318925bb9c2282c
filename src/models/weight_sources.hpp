// SPDX-License-Identifier: Apache-2.0
// Where the checkpoint tensors of a decoder layer live in a loaded model (save_quantized).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>

#include "autoglm/models/model.hpp"

namespace autoglm::detail {

/// The rows of one checkpoint tensor in a model's weight.
struct WeightRows {
  const Weight* weight = nullptr;  ///< the model's weight, [N, K] or [E, N, K]
  std::int64_t matrix = -1;        ///< expert of a stack; -1: the whole weight (same shape)
  std::int64_t row0 = 0;           ///< first row inside that matrix
  std::int64_t rows = 0;           ///< rows the tensor must have (with matrix >= 0)
};

/// Every decoder-layer matrix of the checkpoint directory `dir` (attention projections, router,
/// routed and shared experts, dense MLPs), by name, resolved as load_model resolves them, mapped
/// to where `model` (loaded from dir, or quantized from such a model) holds its rows. An Error
/// when the model's config or layers do not have the checkpoint's sizes and structure.
std::map<std::string, WeightRows> decoder_weight_sources(const Model& model,
                                                         const std::filesystem::path& dir);

}  // namespace autoglm::detail
