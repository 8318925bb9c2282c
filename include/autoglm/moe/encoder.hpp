// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <utility>

#include "autoglm/backend/backend.hpp"
#include "autoglm/quant/quantize.hpp"

namespace autoglm {

/// Turns token ids into hidden states: encode(backend, ids [T] i32, out [T, d]).
template <typename Enc, typename B = Backend>
concept Encoder = BackendLike<B> && requires(const Enc& e, B& b, TensorView v) {
  { e.hidden() } -> std::convertible_to<std::int64_t>;
  { e.vocab_size() } -> std::convertible_to<std::int64_t>;
  e.encode(b, v, v);
};

/// Embedding lookup with an optional RMSNorm of the result.
class EmbeddingEncoder {
 public:
  // table: [V, d] float (f32, bf16, f16) or int8, row-major (int8 not packed); norm: [d] f32
  // or empty.
  /// Validates shapes; eps must be > 0 when a norm is given. A 16-bit table whose backend
  /// cannot look it up (Backend::supports_weight_dtype) is widened to f32.
  EmbeddingEncoder(Weight table, Tensor norm = {}, float eps = 1e-6f)
      : table_(std::move(table)), norm_(std::move(norm)), eps_(eps) {
    AUTOGLM_CHECK(table_.shape().rank() == 2 && detail::is_float_or_int8(table_) &&
                      (table_.is_quantized() ? !table_.quantized().is_packed()
                                             : table_.tensor().layout() == Layout::row_major) &&
                      table_.dim(0) >= 1,
                  shape_mismatch, "EmbeddingEncoder",
                  "table must be float (f32, bf16, f16) or int8, row-major [V >= 1, d], got {}",
                  table_.shape().str());
    if (!table_.is_quantized() && table_.tensor().dtype() != DType::f32) {
      const Tensor& t = table_.tensor();
      if (Backend* b = t.backend(); b && !b->supports_weight_dtype(t.dtype())) {
        Tensor wide(*b, DType::f32, t.shape());
        b->convert(t, wide);
        table_ = std::move(wide);
      }
    }
    AUTOGLM_CHECK(norm_.numel() == 0 || norm_.numel() == table_.dim(1), shape_mismatch,
                  "EmbeddingEncoder", "norm must hold {} values, got {}", table_.dim(1),
                  norm_.numel());
    AUTOGLM_CHECK(eps_ > 0.0f, invalid_argument, "EmbeddingEncoder", "eps={} must be > 0", eps_);
  }

  /// d.
  std::int64_t hidden() const noexcept { return table_.dim(1); }
  /// V.
  std::int64_t vocab_size() const noexcept { return table_.dim(0); }
  /// The embedding table [V, d].
  const Weight& table() const noexcept { return table_; }
  /// The norm [d] (may be empty).
  const Tensor& norm() const noexcept { return norm_; }
  /// The same encoder with an int8 table (one scale per token row, as the scheme gives; never
  /// column-equalised, since a lookup has no activations to carry the column scales).
  EmbeddingEncoder quantized(Backend& backend, QuantSpec spec) const {
    spec.equalize = false;
    return EmbeddingEncoder(quantize_weight(backend, table_, spec, "embed_tokens", /*pack=*/false),
                            norm_, eps_);
  }

  // ids: [T] i32 on the backend; out: [T, d].
  /// Looks the ids up; an id >= V is an Error naming it and its position.
  template <BackendLike B>
  void encode(B& backend, TensorView ids, TensorView out) const {
    if (table_.is_quantized())
      backend.qembedding(table_.quantized(), ids, out);
    else
      backend.embedding(table_.tensor(), ids, out);
    if (norm_.numel() > 0) backend.rms_norm(out, norm_, eps_, out);
  }

  /// A table uniform in +-1 drawn from `seed`, with a unit norm when `with_norm`.
  template <BackendLike B>
  static EmbeddingEncoder random(B& backend, std::int64_t vocab, std::int64_t hidden,
                                 std::uint64_t seed, bool with_norm = false) {
    AUTOGLM_CHECK(vocab >= 1 && hidden >= 1, invalid_argument, "EmbeddingEncoder::random",
                  "vocab={} and hidden={} must be >= 1", vocab, hidden);
    Tensor t(backend, DType::f32, Shape{vocab, hidden});
    backend.fill_uniform(t, seed, 1.0f);
    Tensor n;
    if (with_norm) {
      n = Tensor(backend, DType::f32, Shape{hidden});
      backend.fill(n, 1.0f);
    }
    return EmbeddingEncoder(std::move(t), std::move(n));
  }

 private:
  Weight table_;
  Tensor norm_;
  float eps_;
};

static_assert(Encoder<EmbeddingEncoder>);

}  // namespace autoglm
