// SPDX-License-Identifier: Apache-2.0
// Incremental inference on a Model: a key/value cache per layer, prefill and token-by-token
// decode, prefix reuse across prompts, and a greedy / sampled generation loop with statistics.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "autoglm/models/model.hpp"
#include "autoglm/moe/decoder.hpp"

namespace autoglm {

/// The keys and values of every layer for one sequence, plus the tokens they were computed
/// from. Row s of every layer holds position s; rows [0, size()) are valid.
class KvCache {
 public:
  /// An empty cache for `model` holding at most `max_context` positions (>= 1).
  KvCache(const Model& model, std::int64_t max_context);
  // Copies would share the buffers; a cache is moved, never copied.
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  /// Takes over another cache's buffers.
  KvCache(KvCache&&) = default;
  /// Takes over another cache's buffers.
  KvCache& operator=(KvCache&&) = default;

  /// Positions held.
  std::int64_t size() const noexcept { return static_cast<std::int64_t>(tokens_.size()); }
  /// Positions allocated (grows by doubling up to max_context()).
  std::int64_t capacity() const noexcept { return capacity_; }
  /// Most positions the cache may hold.
  std::int64_t max_context() const noexcept { return max_context_; }
  /// The tokens whose keys and values are cached, in order.
  std::span<const std::int32_t> tokens() const noexcept { return tokens_; }
  /// Layer i's keys and values.
  KvLayer& layer(std::size_t i) { return layers_.at(i); }

  /// Makes room for n positions, keeping the cached ones; n > max_context() is an Error.
  void reserve(std::int64_t n);
  /// Forgets positions [n, size()); n > size() is an Error.
  void truncate(std::int64_t n);
  /// Records that rows [size(), size() + tokens.size()) now hold `tokens` (after a forward).
  void commit(std::span<const std::int32_t> tokens);

 private:
  Backend* backend_;
  std::vector<KvLayer> layers_;
  std::vector<std::int32_t> tokens_;
  std::int64_t capacity_ = 0;
  std::int64_t max_context_;
};

/// Options of a Session.
struct SessionOptions {
  /// Most positions the session may hold; 0 = the config's max_position_embeddings.
  std::int64_t max_context = 0;
};

/// Timing and cache statistics of one Session::generate call.
struct GenerationStats {
  std::int64_t prompt_tokens = 0;     ///< tokens in the prompt
  std::int64_t reused_tokens = 0;     ///< prompt tokens whose cached keys/values were reused
  std::int64_t prefill_tokens = 0;    ///< prompt tokens computed (prompt - reused)
  std::int64_t generated_tokens = 0;  ///< tokens generated
  double prefill_seconds = 0.0;       ///< wall time of the prefill forward
  double decode_seconds = 0.0;        ///< wall time of the decode steps
  /// prefill_tokens / prefill_seconds (0 when nothing was timed).
  double prefill_tokens_per_second() const noexcept {
    return prefill_seconds > 0.0 ? static_cast<double>(prefill_tokens) / prefill_seconds : 0.0;
  }
  /// Decode steps per second: the first generated token comes from the prefill, so
  /// (generated_tokens - 1) / decode_seconds.
  double decode_tokens_per_second() const noexcept {
    return decode_seconds > 0.0 && generated_tokens > 1
               ? static_cast<double>(generated_tokens - 1) / decode_seconds
               : 0.0;
  }
};

/// Options of Session::generate.
struct GenerateOptions {
  std::int64_t max_new_tokens = 16;       ///< tokens to generate at most (>= 0)
  SamplingOptions sampling;               ///< temperature 0 (default): greedy
  std::vector<std::int32_t> stop_tokens;  ///< generation stops after emitting one of these
  /// Called with every generated token; returning false stops generation.
  std::function<bool(std::int32_t)> on_token;
};

/// Called after every decoder layer of a forward with the residual stream x [T, d].
using LayerObserver = std::function<void(std::int64_t layer, TensorView hidden)>;
/// Called with each MoE layer's routing (RoutingStats::expert_ids holds the decisions).
using RoutingObserver = std::function<void(std::int64_t layer, const RoutingStats& routing)>;

/// One sequence being decoded: prefill a prompt, then feed tokens one at a time; the logits
/// equal a full recompute of the whole sequence. A new prompt that shares a prefix with the
/// cached sequence reuses those positions. The model must outlive the session.
class Session {
 public:
  /// A session with an empty cache.
  explicit Session(const Model& model, SessionOptions options = {});
  /// A session keeps a reference to its model: a temporary one would dangle.
  Session(const Model&& model, SessionOptions options = {}) = delete;
  // One cache per session: sessions are moved, never copied.
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  /// Takes over another session's cache.
  Session(Session&&) = default;
  /// Takes over another session's cache.
  Session& operator=(Session&&) = default;

  /// The model.
  const Model& model() const noexcept { return *model_; }
  /// The cached sequence.
  std::span<const std::int32_t> tokens() const noexcept { return cache_.tokens(); }
  /// Cached positions.
  std::int64_t size() const noexcept { return cache_.size(); }
  /// The key/value cache.
  const KvCache& cache() const noexcept { return cache_; }
  /// Prompt tokens the last prefill() reused from the cache.
  std::int64_t reused_tokens() const noexcept { return reused_; }

  /// Feeds `tokens` (>= 1) at the positions after the cached ones and caches them. Returns
  /// logits [n, V] for every fed token when `all_logits`, else [1, V] for the last one.
  Tensor append(std::span<const std::int32_t> tokens, bool all_logits = false);
  /// Starts a new prompt: keeps the longest common prefix of `prompt` and the cached tokens
  /// (at most prompt.size() - 1, so the last token is always computed), forgets the rest, and
  /// appends the remainder. Returns the logits of the computed tokens (all, or the last).
  Tensor prefill(std::span<const std::int32_t> prompt, bool all_logits = false);
  /// prefill(prompt), then up to max_new_tokens decode steps, each feeding the previous token.
  /// Returns the generated tokens; fills *stats when given.
  std::vector<std::int32_t> generate(std::span<const std::int32_t> prompt,
                                     const GenerateOptions& options = {},
                                     GenerationStats* stats = nullptr);
  /// Forgets positions [n, size()).
  void truncate(std::int64_t n) { cache_.truncate(n); }
  /// Forgets everything.
  void reset() { cache_.truncate(0); }
  /// Observes every layer's output of later forwards (empty function: none).
  void set_layer_observer(LayerObserver observer) { observer_ = std::move(observer); }
  /// Observes the routing of every MoE layer of later forwards (empty function: none).
  void set_routing_observer(RoutingObserver observer) { routing_observer_ = std::move(observer); }

 private:
  const Model* model_;
  KvCache cache_;
  std::int64_t reused_ = 0;
  LayerObserver observer_;
  RoutingObserver routing_observer_;
};

}  // namespace autoglm
