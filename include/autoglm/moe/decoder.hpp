// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "autoglm/backend/backend.hpp"
#include "autoglm/quant/quantize.hpp"

namespace autoglm {

/// Turns hidden states into logits: decode(backend, h [T, d], logits [T, V]).
template <typename Dec, typename B = Backend>
concept Decoder = BackendLike<B> && requires(const Dec& dec, B& b, TensorView v) {
  { dec.hidden() } -> std::convertible_to<std::int64_t>;
  { dec.vocab_size() } -> std::convertible_to<std::int64_t>;
  dec.decode(b, v, v);
};

/// Final RMSNorm followed by the output head.
class LmHeadDecoder {
 public:
  // norm: [d] f32 (empty: no norm); head: [V, d] f32 or int8.
  /// Validates shapes.
  LmHeadDecoder(Tensor norm, Weight head, float eps = 1e-6f)
      : norm_(std::move(norm)), head_(std::move(head)), eps_(eps) {
    AUTOGLM_CHECK(head_.shape().rank() == 2 && detail::is_float_or_int8(head_) && head_.dim(0) >= 1,
                  shape_mismatch, "LmHeadDecoder",
                  "head must be float (f32, bf16, f16) or int8 [V >= 1, d], got {}",
                  head_.shape().str());
    AUTOGLM_CHECK(norm_.numel() == 0 || norm_.numel() == head_.dim(1), shape_mismatch,
                  "LmHeadDecoder", "norm must hold {} values, got {}", head_.dim(1), norm_.numel());
    AUTOGLM_CHECK(eps_ > 0.0f, invalid_argument, "LmHeadDecoder", "eps={} must be > 0", eps_);
    head_ = detail::prepared(std::move(head_));
  }

  /// d.
  std::int64_t hidden() const noexcept { return head_.dim(1); }
  /// V.
  std::int64_t vocab_size() const noexcept { return head_.dim(0); }
  /// The head weight [V, d].
  const Weight& head() const noexcept { return head_; }
  /// The final norm [d] (may be empty).
  const Tensor& norm() const noexcept { return norm_; }
  /// The same decoder with an int8 head.
  LmHeadDecoder quantized(Backend& backend, const QuantSpec& spec) const {
    return LmHeadDecoder(norm_, quantize_weight(backend, head_, spec, "lm_head"), eps_);
  }

  // h: [T, d]; logits: [T, V].
  /// logits = head(norm(h)).
  template <BackendLike B>
  void decode(B& backend, TensorView h, TensorView logits) const {
    AUTOGLM_CHECK(h.rank() == 2 && h.dim(1) == hidden(), shape_mismatch, "LmHeadDecoder::decode",
                  "h must be [tokens, {}], got {}", hidden(), h.shape.str());
    if (norm_.numel() == 0) {
      linear(backend, h, head_, logits);
      return;
    }
    Tensor n(backend, DType::f32, h.shape);
    backend.rms_norm(h, norm_, eps_, n);
    linear(backend, n, head_, logits);
  }

  /// Unit norm and a head uniform in +-1/sqrt(d) drawn from `seed`.
  template <BackendLike B>
  static LmHeadDecoder random(B& backend, std::int64_t vocab, std::int64_t hidden,
                              std::uint64_t seed) {
    AUTOGLM_CHECK(vocab >= 1 && hidden >= 1, invalid_argument, "LmHeadDecoder::random",
                  "vocab={} and hidden={} must be >= 1", vocab, hidden);
    Tensor n(backend, DType::f32, Shape{hidden});
    backend.fill(n, 1.0f);
    Tensor h(backend, DType::f32, Shape{vocab, hidden}, backend.weight_layout());
    backend.fill_uniform(h, seed, 1.0f / std::sqrt(static_cast<float>(hidden)));
    return LmHeadDecoder(std::move(n), std::move(h));
  }

 private:
  Tensor norm_;
  Weight head_;
  float eps_;
};

static_assert(Decoder<LmHeadDecoder>);

/// Sampling settings. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
struct SamplingOptions {
  float temperature = 0.0f;  ///< >= 0; 0 = argmax
  int top_k = 0;             ///< keep the k most likely tokens (0 = all)
  float top_p = 1.0f;        ///< keep the smallest set with probability >= top_p, in (0, 1]
  std::uint64_t seed = 0;    ///< RNG seed; the same seed gives the same tokens
};

/// Picks next tokens from logits on the host with a seeded RNG.
class Sampler {
 public:
  /// Validates the options.
  explicit Sampler(SamplingOptions options = {});
  // logits: [V] on the host.
  /// One token id; NaN logits are an Error.
  std::int32_t sample(std::span<const float> logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
};

/// Pooling of a classification head.
enum class Pooling : std::uint8_t { last, mean };

/// A classification result.
struct Classification {
  std::int32_t label = -1;   ///< argmax class
  std::vector<float> probs;  ///< softmax probabilities per class
};

/// Classification head: pool the hidden states, project to C classes, softmax.
class ClassifierHead {
 public:
  // weight: [C, d] f32.
  /// Validates the weight.
  explicit ClassifierHead(Tensor weight, Pooling pooling = Pooling::last)
      : weight_(std::move(weight)), pooling_(pooling) {
    AUTOGLM_CHECK(
        weight_.shape().rank() == 2 && weight_.dtype() == DType::f32 && weight_.dim(0) >= 1,
        shape_mismatch, "ClassifierHead", "weight must be f32 [C >= 1, d], got {}",
        weight_.shape().str());
    weight_ = detail::prepared(std::move(weight_));
  }
  /// Number of classes.
  std::int64_t num_classes() const noexcept { return weight_.dim(0); }

  // h: [T >= 1, d].
  /// Label and probabilities of the pooled sequence.
  template <BackendLike B>
  Classification classify(B& backend, TensorView h) const {
    AUTOGLM_CHECK(h.rank() == 2 && h.dim(0) >= 1 && h.dim(1) == weight_.dim(1), shape_mismatch,
                  "ClassifierHead::classify", "h must be [tokens >= 1, {}], got {}", weight_.dim(1),
                  h.shape.str());
    const std::int64_t T = h.dim(0), C = num_classes();
    // The head is linear, so pooling its per-token logits equals the logits of the pooled state.
    Tensor logits(backend, DType::f32, Shape{T, C});
    backend.gemm(h, weight_, logits);
    std::vector<float> all(static_cast<std::size_t>(T * C));
    backend.copy_to_host(all.data(), logits);
    std::vector<double> pooled(static_cast<std::size_t>(C), 0.0);
    const std::int64_t first = pooling_ == Pooling::last ? T - 1 : 0;
    for (std::int64_t t = first; t < T; ++t)
      for (std::int64_t c = 0; c < C; ++c) pooled[c] += all[t * C + c];
    for (double& v : pooled) v /= static_cast<double>(T - first);
    Classification out;
    out.probs.resize(static_cast<std::size_t>(C));
    const double mx = *std::max_element(pooled.begin(), pooled.end());
    double sum = 0.0;
    for (std::int64_t c = 0; c < C; ++c) sum += std::exp(pooled[c] - mx);
    out.label = 0;
    for (std::int64_t c = 0; c < C; ++c) {
      out.probs[c] = static_cast<float>(std::exp(pooled[c] - mx) / sum);
      if (pooled[c] > pooled[out.label]) out.label = static_cast<std::int32_t>(c);
    }
    return out;
  }

 private:
  Tensor weight_;
  Pooling pooling_;
};

}  // namespace autoglm
