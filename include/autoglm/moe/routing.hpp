// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <vector>

#include "autoglm/core/tensor.hpp"

namespace autoglm {

/// Load statistics of one routing call, on the host.
struct RoutingStats {
  std::vector<std::int32_t> tokens_per_expert;  ///< rows each expert computed (after capacity)
  std::int64_t assignments = 0;                 ///< (token, expert) pairs the gate chose
  std::int64_t dropped = 0;                     ///< pairs dropped by the capacity limit
  double max_load = 0.0;                        ///< largest tokens_per_expert
  double mean_load = 0.0;                       ///< mean of tokens_per_expert
  /// Switch-Transformer balance loss E * sum_e f_e * P_e: f_e the share of assignments to e,
  /// P_e the mean routing probability of e. 1.0 when perfectly balanced.
  double aux_loss = 0.0;
  double z_loss = 0.0;  ///< router z-loss: mean over tokens of logsumexp(logits)^2
  /// [T * slots] the expert of each (token, slot), -1 for none: the routing decisions.
  std::vector<std::int32_t> expert_ids;
};

/// Everything a routing call produces, on the backend: the gate fills ids, weights and
/// scores; MoELayer's dispatch planning fills the rest.
struct Routing {
  Tensor ids;        ///< [T, slots] i32 expert per slot, -1 for none
  Tensor weights;    ///< [T, slots] f32 routing weight per slot
  Tensor scores;     ///< [E + 1] f32 sum over tokens of each expert's probability, then sum lse^2
  Tensor counts;     ///< [E] i32 rows per expert after capacity
  Tensor offsets;    ///< [E + 1] i32 first row of each expert
  Tensor row_token;  ///< [T * slots] i32 token of each row (first `rows` are valid)
  Tensor slot_row;   ///< [T * slots] i32 row of each slot, -1 if dropped
  std::int64_t rows = 0;  ///< rows dispatched to experts
};

}  // namespace autoglm
