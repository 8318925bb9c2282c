// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <utility>

#include "autoglm/backend/backend.hpp"
#include "autoglm/quant/quantize.hpp"

namespace autoglm {

/// A stacked bank of E experts. forward() runs rows grouped by expert: rows
/// [offsets[e], offsets[e+1]) of x belong to expert e.
template <typename X, typename B = Backend>
concept ExpertBank = BackendLike<B> && requires(const X& bank, B& b, TensorView v) {
  { bank.num_experts() } -> std::convertible_to<std::int64_t>;
  { bank.hidden() } -> std::convertible_to<std::int64_t>;
  bank.forward(b, v, v, v);  // (backend, x [R, d], offsets [E + 1] i32, out [R, d])
};

namespace detail {

inline void check_bank_io(std::string_view fn, std::int64_t E, std::int64_t d, const TensorView& x,
                          const TensorView& offsets, const TensorView& out) {
  AUTOGLM_CHECK(x.rank() == 2 && x.dim(1) == d, shape_mismatch, fn, "x must be [rows, {}], got {}",
                d, x.shape.str());
  AUTOGLM_CHECK(out.shape == x.shape, shape_mismatch, fn, "out {} must match x {}", out.shape.str(),
                x.shape.str());
  AUTOGLM_CHECK(offsets.numel() == E + 1 && offsets.dtype == DType::i32, shape_mismatch, fn,
                "offsets must be {} i32 values, got {} {}", E + 1, dtype_name(offsets.dtype),
                offsets.shape.str());
}

}  // namespace detail

/// SwiGLU experts: out = down(silu(gate(x)) * up(x)). Gate and up are stored fused as
/// [E, 2F, d] (gate rows first, the transformers 5.x gate_up_proj layout) so one grouped GEMM
/// reads each routed row once for both.
class SwiGluExperts {
 public:
  // gate_up: [E, 2F, d]; down: [E, d, F]; each f32 or int8 (QuantizedTensor).
  /// Validates the shapes.
  /// The weights are moved into their backend's preferred layout (prepared: f32 re-laid-out,
  /// int8 packed for the kernels).
  SwiGluExperts(Weight gate_up, Weight down)
      : gate_up_(std::move(gate_up)), down_(std::move(down)) {
    constexpr std::string_view fn = "SwiGluExperts";
    AUTOGLM_CHECK(gate_up_.shape().rank() == 3 && down_.shape().rank() == 3 &&
                      detail::is_float_or_int8(gate_up_) && detail::is_float_or_int8(down_),
                  shape_mismatch, fn,
                  "gate_up and down must be float (f32, bf16, f16) or int8 rank 3, got {} and {}",
                  gate_up_.shape().str(), down_.shape().str());
    const std::int64_t E = gate_up_.dim(0), F2 = gate_up_.dim(1), d = gate_up_.dim(2);
    AUTOGLM_CHECK(E >= 1 && F2 >= 2 && F2 % 2 == 0 && d >= 1, shape_mismatch, fn,
                  "gate_up must be [E, 2F, d] with E, F, d >= 1, got {}", gate_up_.shape().str());
    AUTOGLM_CHECK(down_.dim(0) == E && down_.dim(1) == d && down_.dim(2) == F2 / 2, shape_mismatch,
                  fn, "down must be [{}, {}, {}], got {}", E, d, F2 / 2, down_.shape().str());
    gate_up_ = detail::prepared(std::move(gate_up_));
    down_ = detail::prepared(std::move(down_));
  }

  /// E.
  std::int64_t num_experts() const noexcept { return gate_up_.dim(0); }
  /// d.
  std::int64_t hidden() const noexcept { return gate_up_.dim(2); }
  /// F, the width of one expert.
  std::int64_t ffn() const noexcept { return down_.dim(2); }
  /// Fused gate/up weights [E, 2F, d] (float: read them with Backend::copy_to_host, which
  /// writes elements of the tensor's dtype, f32 / bf16 / f16, in the logical order).
  const Weight& gate_up() const noexcept { return gate_up_; }
  /// Down weights [E, d, F].
  const Weight& down() const noexcept { return down_; }
  /// The same bank with both weights quantized with `spec` (int8 weights stay as they are).
  SwiGluExperts quantized(Backend& backend, const QuantSpec& spec) const;

  // x: [R, d] rows grouped by expert; offsets: [E + 1] i32; out: [R, d].
  /// Runs every expert on its rows: two grouped GEMMs around a fused SiLU-mul.
  template <BackendLike B>
  void forward(B& backend, TensorView x, TensorView offsets, TensorView out) const {
    detail::check_bank_io("SwiGluExperts::forward", num_experts(), hidden(), x, offsets, out);
    const std::int64_t R = x.dim(0);
    if (R == 0) return;
    Tensor h(backend, DType::f32, Shape{R, 2 * ffn()});
    grouped_linear(backend, x, gate_up_, offsets, h);
    Tensor a(backend, DType::f32, Shape{R, ffn()});
    backend.silu_mul(h, a);
    grouped_linear(backend, a, down_, offsets, out);
  }

  /// A bank with weights uniform in +-1/sqrt(fan_in), drawn from `seed`.
  template <BackendLike B>
  static SwiGluExperts random(B& backend, std::int64_t experts, std::int64_t hidden,
                              std::int64_t ffn, std::uint64_t seed) {
    AUTOGLM_CHECK(experts >= 1 && hidden >= 1 && ffn >= 1, invalid_argument,
                  "SwiGluExperts::random", "experts={}, hidden={}, ffn={} must be >= 1", experts,
                  hidden, ffn);
    // Filled in place in the backend's weight layout: no row-major copy at build time.
    Tensor gu(backend, DType::f32, Shape{experts, 2 * ffn, hidden}, backend.weight_layout());
    Tensor dn(backend, DType::f32, Shape{experts, hidden, ffn}, backend.weight_layout());
    backend.fill_uniform(gu, seed, 1.0f / std::sqrt(static_cast<float>(hidden)));
    backend.fill_uniform(dn, seed + 1, 1.0f / std::sqrt(static_cast<float>(ffn)));
    return SwiGluExperts(std::move(gu), std::move(dn));
  }

 private:
  Weight gate_up_;
  Weight down_;
};

/// GELU MLP experts: out = w2(gelu(w1(x))) (erf GELU, no biases).
class GeluExperts {
 public:
  // w1: [E, F, d]; w2: [E, d, F]; each f32 or int8.
  /// Validates the shapes.
  /// The weights are moved into their backend's preferred layout (prepared).
  GeluExperts(Weight w1, Weight w2) : w1_(std::move(w1)), w2_(std::move(w2)) {
    constexpr std::string_view fn = "GeluExperts";
    AUTOGLM_CHECK(w1_.shape().rank() == 3 && w2_.shape().rank() == 3 &&
                      detail::is_float_or_int8(w1_) && detail::is_float_or_int8(w2_),
                  shape_mismatch, fn,
                  "w1 and w2 must be float (f32, bf16, f16) or int8 rank 3, got {} and {}",
                  w1_.shape().str(), w2_.shape().str());
    const std::int64_t E = w1_.dim(0), F = w1_.dim(1), d = w1_.dim(2);
    AUTOGLM_CHECK(E >= 1 && F >= 1 && d >= 1, shape_mismatch, fn, "w1 {} has an empty extent",
                  w1_.shape().str());
    AUTOGLM_CHECK(w2_.dim(0) == E && w2_.dim(1) == d && w2_.dim(2) == F, shape_mismatch, fn,
                  "w2 must be [{}, {}, {}], got {}", E, d, F, w2_.shape().str());
    w1_ = detail::prepared(std::move(w1_));
    w2_ = detail::prepared(std::move(w2_));
  }

  /// E.
  std::int64_t num_experts() const noexcept { return w1_.dim(0); }
  /// d.
  std::int64_t hidden() const noexcept { return w1_.dim(2); }
  /// F.
  std::int64_t ffn() const noexcept { return w1_.dim(1); }
  /// Up weights [E, F, d].
  const Weight& w1() const noexcept { return w1_; }
  /// Down weights [E, d, F].
  const Weight& w2() const noexcept { return w2_; }
  /// The same bank with both weights quantized with `spec`.
  GeluExperts quantized(Backend& backend, const QuantSpec& spec) const;

  // x: [R, d]; offsets: [E + 1] i32; out: [R, d].
  /// Runs every expert on its rows.
  template <BackendLike B>
  void forward(B& backend, TensorView x, TensorView offsets, TensorView out) const {
    detail::check_bank_io("GeluExperts::forward", num_experts(), hidden(), x, offsets, out);
    const std::int64_t R = x.dim(0);
    if (R == 0) return;
    Tensor h(backend, DType::f32, Shape{R, ffn()});
    grouped_linear(backend, x, w1_, offsets, h);
    backend.gelu(h, h);
    grouped_linear(backend, h, w2_, offsets, out);
  }

  /// A bank with weights uniform in +-1/sqrt(fan_in), drawn from `seed`.
  template <BackendLike B>
  static GeluExperts random(B& backend, std::int64_t experts, std::int64_t hidden, std::int64_t ffn,
                            std::uint64_t seed) {
    AUTOGLM_CHECK(experts >= 1 && hidden >= 1 && ffn >= 1, invalid_argument, "GeluExperts::random",
                  "experts={}, hidden={}, ffn={} must be >= 1", experts, hidden, ffn);
    Tensor w1(backend, DType::f32, Shape{experts, ffn, hidden}, backend.weight_layout());
    Tensor w2(backend, DType::f32, Shape{experts, hidden, ffn}, backend.weight_layout());
    backend.fill_uniform(w1, seed, 1.0f / std::sqrt(static_cast<float>(hidden)));
    backend.fill_uniform(w2, seed + 1, 1.0f / std::sqrt(static_cast<float>(ffn)));
    return GeluExperts(std::move(w1), std::move(w2));
  }

 private:
  Weight w1_;
  Weight w2_;
};

namespace detail {
/// w quantized with spec, unless it already is int8.
inline Weight quantized_weight(Backend& backend, const Weight& w, const QuantSpec& spec,
                               std::string_view name) {
  return quantize_weight(backend, w, spec, name);
}
}  // namespace detail

inline SwiGluExperts SwiGluExperts::quantized(Backend& backend, const QuantSpec& spec) const {
  return SwiGluExperts(detail::quantized_weight(backend, gate_up_, spec, "gate_up"),
                       detail::quantized_weight(backend, down_, spec, "down"));
}

inline GeluExperts GeluExperts::quantized(Backend& backend, const QuantSpec& spec) const {
  return GeluExperts(detail::quantized_weight(backend, w1_, spec, "w1"),
                     detail::quantized_weight(backend, w2_, spec, "w2"));
}

static_assert(ExpertBank<SwiGluExperts>);
static_assert(ExpertBank<GeluExperts>);

}  // namespace autoglm
