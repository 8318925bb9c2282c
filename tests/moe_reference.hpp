// SPDX-License-Identifier: Apache-2.0
// Reference routing of a GateNetwork from its documented options, and host copies of expert
// banks, shared by the MoE layer and pipeline tests.
#pragma once

#include <optional>

#include "common/random.hpp"  // the documented counter-based noise (seed, token * E + expert)
#include "reference.hpp"
#include "support.hpp"

namespace agt {

/// The reference's view of a gate's options (written from the GatePolicy documentation, not
/// from GateNetwork::route_params).
struct RefRouting {
  ref::Route route;
  RouteParams p;
  bool expert_choice = false;
  std::int64_t capacity = 0;  ///< plan_dispatch capacity, 0 = unlimited
};

template <typename TX>
RefRouting reference_routing(const GateOptions& o, const std::vector<float>& W,
                             const std::vector<float>& bias, const std::vector<TX>& x,
                             std::int64_t T, std::int64_t E, std::int64_t d) {
  RefRouting r;
  const std::vector<double> logits = ref::matmul_nt(x, W, T, E, d);
  const int k = o.policy == GatePolicy::argmax ? 1 : o.top_k;
  if (o.capacity_factor)
    r.capacity = std::max<std::int64_t>(
        1, static_cast<std::int64_t>(std::ceil(static_cast<double>(*o.capacity_factor) * T * k / E)));
  if (o.policy == GatePolicy::expert_choice) {
    r.expert_choice = true;
    const double factor = o.capacity_factor ? *o.capacity_factor : static_cast<double>(o.top_k);
    const auto C = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(factor * T / E)));
    r.route = ref::expert_choice(logits, T, E, C);
    return r;
  }
  RouteParams& p = r.p;
  p.top_k = k;
  p.renormalize = o.renormalize;
  p.renorm_epsilon = o.renorm_epsilon;
  p.routed_scaling = o.routed_scaling;
  std::vector<double> noise;
  switch (o.policy) {
    case GatePolicy::argmax:  // top-1 by logit, weight 1
      p.renormalize = true;
      p.renorm_epsilon = 0.0f;
      p.routed_scaling = 1.0f;
      break;
    case GatePolicy::sigmoid_group:
      p.score = ScoreFunc::sigmoid;
      p.n_group = o.n_group;
      p.topk_group = o.topk_group;
      p.group_mask = o.group_mask;
      break;
    case GatePolicy::noisy_topk:
      p.noise_std = o.noise_std;
      noise.resize(static_cast<std::size_t>(T * E));
      for (std::int64_t i = 0; i < T * E; ++i) noise[i] = detail::normal(o.seed, static_cast<std::uint64_t>(i));
      break;
    default: break;
  }
  // The selection bias (documented for sigmoid_group) is applied by every token-choice policy.
  r.route = ref::route_topk(logits, T, E, bias, p, noise);
  return r;
}

/// Checks the library routing against the reference; returns the dense weights M [T, E] after
/// capacity planning of the library's ids.
inline std::vector<double> check_routing(const RefRouting& rr, const std::vector<std::int32_t>& ids,
                                  const std::vector<float>& weights, std::int64_t T, std::int64_t E) {
  std::vector<double> w;
  if (rr.expert_choice) {
    ref::check_expert_choice(rr.route, ids, weights);
    w.resize(ids.size(), 0.0);
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (ids[i] >= 0) w[i] = rr.route.score[(i / E) * E + ids[i]];
  } else {
    w = ref::check_topk(rr.route, ids, weights, rr.p);
  }
  const std::int64_t slots = rr.route.slots;
  const ref::Dispatch plan = ref::plan(ids, T, slots, E, rr.capacity);
  return ref::dense_mask(ids, w, plan.kept, T, slots, E);
}

/// Host copies of a shared expert.
struct HostShared {
  ref::SwiGlu mlp;
  std::vector<float> gate;  // [d] or empty
  template <typename TX>
  void add_to(std::vector<double>& out, const std::vector<TX>& x, std::int64_t T, std::int64_t d) const {
    for (std::int64_t t = 0; t < T; ++t) {
      const auto y = mlp(0, x.data() + t * d);
      double s = 1.0;
      if (!gate.empty()) {
        double g = 0.0;
        for (std::int64_t c = 0; c < d; ++c) g += static_cast<double>(gate[c]) * x[t * d + c];
        s = ref::sigmoid(g);
      }
      for (std::int64_t c = 0; c < d; ++c) out[t * d + c] += s * y[c];
    }
  }
};

inline ref::SwiGlu host_bank(Backend& b, const SwiGluExperts& x) {
  return {x.num_experts(), x.ffn(), x.hidden(), host_f32(b, x.gate_up()), host_f32(b, x.down())};
}
inline ref::GeluMlp host_bank(Backend& b, const GeluExperts& x) {
  return {x.num_experts(), x.ffn(), x.hidden(), host_f32(b, x.w1()), host_f32(b, x.w2())};
}

}  // namespace agt
