// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <array>
#include <concepts>
#include <cstdint>
#include <optional>
#include <utility>

#include "autoglm/backend/backend.hpp"
#include "autoglm/moe/expert.hpp"
#include "autoglm/moe/routing.hpp"

namespace autoglm {

/// Combines expert rows back into tokens: combine(backend, x [T, d], y [rows, d], routing,
/// out [T, d]) overwrites out.
template <typename A, typename B = Backend>
concept Aggregator = BackendLike<B> && requires(const A& a, B& b, TensorView v, const Routing& r) {
  a.combine(b, v, v, r, v);
};

/// A shared expert run on every token: a SwiGLU MLP, optionally scaled per token by
/// sigmoid(x · gate) (Qwen2-MoE's shared_expert_gate).
class SharedExpert {
 public:
  // mlp: a one-expert bank [1, 2F, d] / [1, d, F]; gate: [1, d] f32 or empty.
  /// Validates that the gate matches the MLP's width.
  SharedExpert(SwiGluExperts mlp, Tensor gate = {}) : mlp_(std::move(mlp)), gate_(std::move(gate)) {
    AUTOGLM_CHECK(mlp_.num_experts() == 1, shape_mismatch, "SharedExpert",
                  "the shared MLP must be a one-expert bank, got {} experts", mlp_.num_experts());
    AUTOGLM_CHECK(
        gate_.numel() == 0 || (gate_.numel() == mlp_.hidden() && gate_.dtype() == DType::f32),
        shape_mismatch, "SharedExpert", "gate must be f32 [1, {}], got {}", mlp_.hidden(),
        gate_.shape().str());
  }

  /// The MLP.
  const SwiGluExperts& mlp() const noexcept { return mlp_; }
  /// The sigmoid gate weight [1, d], or empty.
  const Tensor& gate() const noexcept { return gate_; }
  /// The same shared expert with its MLP quantized (the gate, a router, stays f32).
  SharedExpert quantized(Backend& backend, const QuantSpec& spec) const {
    return SharedExpert(mlp_.quantized(backend, spec), gate_);
  }

  // x, out: [T, d].
  /// out += (gated) shared MLP of x.
  template <BackendLike B>
  void accumulate(B& backend, TensorView x, TensorView out) const {
    const std::int64_t T = x.dim(0), d = x.dim(1);
    if (T == 0) return;
    Tensor offsets(backend, DType::i32, Shape{2});
    const std::array<std::int32_t, 2> host{0, static_cast<std::int32_t>(T)};
    backend.copy_from_host(offsets, host.data());
    Tensor y(backend, DType::f32, Shape{T, d});
    mlp_.forward(backend, x, offsets, y);
    if (gate_.numel() == 0) {
      backend.add(out, y, out);
      return;
    }
    Tensor g(backend, DType::f32, Shape{T, 1});
    backend.gemm(x, TensorView(gate_).reshaped(Shape{1, d}), g);
    backend.add_scaled_rows(y, g, RowScale::sigmoid, out);
  }

 private:
  SwiGluExperts mlp_;
  Tensor gate_;
};

/// The default aggregator: out[t] = sum over t's slots of weight * expert row, plus the shared
/// expert's output when there is one.
class WeightedSumAggregator {
 public:
  WeightedSumAggregator() = default;
  /// With a shared expert added to every token.
  explicit WeightedSumAggregator(SharedExpert shared) : shared_(std::move(shared)) {}

  /// The shared expert, if any.
  const std::optional<SharedExpert>& shared() const noexcept { return shared_; }
  /// The same aggregator with the shared expert quantized.
  WeightedSumAggregator quantized(Backend& backend, const QuantSpec& spec) const {
    return shared_ ? WeightedSumAggregator(shared_->quantized(backend, spec)) : *this;
  }

  // x: [T, d] layer input; y: [rows, d] expert outputs; out: [T, d].
  /// Writes the combined output.
  template <BackendLike B>
  void combine(B& backend, TensorView x, TensorView y, const Routing& r, TensorView out) const {
    AUTOGLM_CHECK(out.shape == x.shape, shape_mismatch, "WeightedSumAggregator::combine",
                  "out {} must match x {}", out.shape.str(), x.shape.str());
    backend.combine(y, r.slot_row, r.weights, out, /*accumulate=*/false);
    if (shared_) shared_->accumulate(backend, x, out);
  }

 private:
  std::optional<SharedExpert> shared_;
};

static_assert(Aggregator<WeightedSumAggregator>);

}  // namespace autoglm
