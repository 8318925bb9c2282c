// SPDX-License-Identifier: Apache-2.0
// What the MoE-layer benchmarks share beyond bench_common.hpp: the gate a ModelSpec describes.
// (Separate so that bench_reference, which does not link autoglm, need not see autoglm headers.)
#pragma once

#include <autoglm/moe/gate.hpp>

#include "bench_common.hpp"

namespace autoglm_bench {

/// The gate options of model m's router (policy, top-k, renormalisation, grouping, scaling).
inline autoglm::GateOptions gate_options(const ModelSpec& m) {
  autoglm::GateOptions go;
  go.policy = m.sigmoid ? autoglm::GatePolicy::sigmoid_group : autoglm::GatePolicy::softmax_topk;
  go.top_k = m.top_k;
  go.renormalize = m.renormalize;
  go.renorm_epsilon = m.renorm_epsilon;
  go.routed_scaling = m.routed_scaling;
  go.n_group = m.n_group;
  go.topk_group = m.topk_group;
  return go;
}

}  // namespace autoglm_bench
