// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "autoglm/backend/backend.hpp"
#include "autoglm/moe/aggregator.hpp"
#include "autoglm/moe/decoder.hpp"
#include "autoglm/moe/encoder.hpp"
#include "autoglm/moe/expert.hpp"
#include "autoglm/moe/gate.hpp"
#include "autoglm/moe/layer.hpp"
#include "autoglm/moe/pipeline.hpp"

namespace autoglm {

/// Type-erased Gate: holds any class satisfying Gate, so pipelines can be assembled at run
/// time. Calls go through the Backend interface.
class AnyGate {
 public:
  /// Wraps a gate by value.
  template <typename G>
    requires Gate<G> && (!std::same_as<std::remove_cvref_t<G>, AnyGate>)
  AnyGate(G gate)  // NOLINT: implicit by design, like std::function
      : self_(std::make_shared<Model<G>>(std::move(gate))) {}

  /// E.
  std::int64_t num_experts() const { return self_->num_experts(); }
  /// d.
  std::int64_t hidden() const { return self_->hidden(); }
  /// Columns of Routing::ids.
  std::int64_t slots() const { return self_->slots(); }
  /// Rows per expert for T tokens (0: unbounded).
  std::int64_t capacity(std::int64_t tokens) const { return self_->capacity(tokens); }
  // x: [T, d].
  /// Routes through the wrapped gate.
  void route(Backend& b, TensorView x, Routing& r) const { self_->route(b, x, r); }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual std::int64_t num_experts() const = 0;
    virtual std::int64_t hidden() const = 0;
    virtual std::int64_t slots() const = 0;
    virtual std::int64_t capacity(std::int64_t) const = 0;
    virtual void route(Backend&, TensorView, Routing&) const = 0;
  };
  template <typename G>
  struct Model final : Concept {
    explicit Model(G g) : gate(std::move(g)) {}
    std::int64_t num_experts() const override { return gate.num_experts(); }
    std::int64_t hidden() const override { return gate.hidden(); }
    std::int64_t slots() const override { return gate.slots(); }
    std::int64_t capacity(std::int64_t t) const override { return gate.capacity(t); }
    void route(Backend& b, TensorView x, Routing& r) const override { gate.route(b, x, r); }
    G gate;
  };
  std::shared_ptr<const Concept> self_;
};

/// Type-erased ExpertBank.
class AnyExpertBank {
 public:
  /// Wraps a bank by value.
  template <typename X>
    requires ExpertBank<X> && (!std::same_as<std::remove_cvref_t<X>, AnyExpertBank>)
  AnyExpertBank(X bank)  // NOLINT: implicit by design
      : self_(std::make_shared<Model<X>>(std::move(bank))) {}

  /// E.
  std::int64_t num_experts() const { return self_->num_experts(); }
  /// d.
  std::int64_t hidden() const { return self_->hidden(); }
  // x: [R, d]; offsets: [E + 1]; out: [R, d].
  /// Runs the wrapped bank.
  void forward(Backend& b, TensorView x, TensorView offsets, TensorView out) const {
    self_->forward(b, x, offsets, out);
  }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual std::int64_t num_experts() const = 0;
    virtual std::int64_t hidden() const = 0;
    virtual void forward(Backend&, TensorView, TensorView, TensorView) const = 0;
  };
  template <typename X>
  struct Model final : Concept {
    explicit Model(X x) : bank(std::move(x)) {}
    std::int64_t num_experts() const override { return bank.num_experts(); }
    std::int64_t hidden() const override { return bank.hidden(); }
    void forward(Backend& b, TensorView x, TensorView o, TensorView out) const override {
      bank.forward(b, x, o, out);
    }
    X bank;
  };
  std::shared_ptr<const Concept> self_;
};

/// Flat key -> value arguments of one component in a JSON description. Getters parse and
/// range-check, throwing an Error that names "<where>.<key>" and the value.
class ComponentArgs {
 public:
  /// Empty arguments for component `where` (e.g. "layers[1].gate").
  explicit ComponentArgs(std::string where = {}) : where_(std::move(where)) {}
  /// Sets key to the textual value.
  void set(std::string key, std::string value) { values_[std::move(key)] = std::move(value); }
  /// True when key is present.
  bool has(std::string_view key) const { return values_.find(key) != values_.end(); }
  /// Integer value, or def when absent.
  std::int64_t get_int(std::string_view key, std::int64_t def) const;
  /// Floating value, or def when absent.
  double get_float(std::string_view key, double def) const;
  /// Boolean value, or def when absent.
  bool get_bool(std::string_view key, bool def) const;
  /// String value, or def when absent.
  std::string get_string(std::string_view key, std::string_view def) const;
  /// Component path used in error messages.
  const std::string& where() const noexcept { return where_; }
  /// All keys and values.
  const std::map<std::string, std::string, std::less<>>& values() const noexcept { return values_; }

 private:
  std::string where_;
  std::map<std::string, std::string, std::less<>> values_;
};

/// What a factory may need besides its own arguments.
struct BuildContext {
  Backend& backend;             ///< where the weights go
  std::int64_t hidden;          ///< model width d
  std::int64_t num_experts;     ///< E of the layer (from the gate's arguments)
  std::uint64_t seed;           ///< seed for this component's random weights
};

/// Builds a gate from its arguments.
using GateFactory = std::function<AnyGate(const BuildContext&, const ComponentArgs&)>;
/// Builds an expert bank from its arguments.
using ExpertFactory = std::function<AnyExpertBank(const BuildContext&, const ComponentArgs&)>;

/// Name -> factory maps for gates and expert banks (the design documents' plugin
/// registration). The global registry starts with the built-in components.
class Registry {
 public:
  /// An empty registry.
  Registry() = default;
  /// The process-wide registry, with built-ins: gates argmax, softmax_topk, sigmoid_group,
  /// noisy_topk, expert_choice; expert banks swiglu, gelu.
  static Registry& global();

  /// Adds or replaces a gate factory.
  void add_gate(std::string name, GateFactory f);
  /// Adds or replaces an expert-bank factory.
  void add_experts(std::string name, ExpertFactory f);
  /// Builds a gate; an unknown name is an Error listing the registered ones.
  AnyGate make_gate(std::string_view name, const BuildContext& ctx, const ComponentArgs& a) const;
  /// Builds an expert bank; an unknown name is an Error listing the registered ones.
  AnyExpertBank make_experts(std::string_view name, const BuildContext& ctx,
                             const ComponentArgs& a) const;
  /// Registered gate names, sorted.
  std::vector<std::string> gate_names() const;
  /// Registered expert-bank names, sorted.
  std::vector<std::string> expert_names() const;

 private:
  mutable std::mutex mutex_;
  std::map<std::string, GateFactory, std::less<>> gates_;
  std::map<std::string, ExpertFactory, std::less<>> experts_;
};

/// A layer assembled at run time.
using DynamicLayer = MoELayer<AnyGate, AnyExpertBank, WeightedSumAggregator>;
/// A pipeline assembled at run time.
using DynamicPipeline = Pipeline<EmbeddingEncoder, DynamicLayer, LmHeadDecoder>;

/// Builds a pipeline with random weights from a JSON description (see docs/extending.md):
/// {"seed", "vocab", "hidden", "num_layers", "gate": {"type", ...}, "experts": {"type", ...},
///  "shared_expert": {"ffn", "gated"}, "layers": [per-layer overrides]}.
/// Malformed JSON, a missing or bad key, or an unknown type is an Error naming it.
DynamicPipeline build_pipeline(Backend& backend, std::string_view json,
                               const Registry& registry = Registry::global());

}  // namespace autoglm
