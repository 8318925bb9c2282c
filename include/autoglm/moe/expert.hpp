// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <utility>

#include "autoglm/backend/backend.hpp"

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
  AUTOGLM_CHECK(out.shape == x.shape, shape_mismatch, fn, "out {} must match x {}",
                out.shape.str(), x.shape.str());
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
  // gate_up: [E, 2F, d]; down: [E, d, F]; both f32.
  /// Validates the shapes.
  /// The weights are moved into their backend's preferred layout (prepare_weights).
  SwiGluExperts(Tensor gate_up, Tensor down) : gate_up_(std::move(gate_up)), down_(std::move(down)) {
    constexpr std::string_view fn = "SwiGluExperts";
    AUTOGLM_CHECK(gate_up_.shape().rank() == 3 && down_.shape().rank() == 3 &&
                      gate_up_.dtype() == DType::f32 && down_.dtype() == DType::f32,
                  shape_mismatch, fn, "gate_up and down must be f32 rank 3, got {} and {}",
                  gate_up_.shape().str(), down_.shape().str());
    const std::int64_t E = gate_up_.dim(0), F2 = gate_up_.dim(1), d = gate_up_.dim(2);
    AUTOGLM_CHECK(E >= 1 && F2 >= 2 && F2 % 2 == 0 && d >= 1, shape_mismatch, fn,
                  "gate_up must be [E, 2F, d] with E, F, d >= 1, got {}", gate_up_.shape().str());
    AUTOGLM_CHECK(down_.dim(0) == E && down_.dim(1) == d && down_.dim(2) == F2 / 2,
                  shape_mismatch, fn, "down must be [{}, {}, {}], got {}", E, d, F2 / 2,
                  down_.shape().str());
    gate_up_ = detail::prepared(std::move(gate_up_));
    down_ = detail::prepared(std::move(down_));
  }

  /// E.
  std::int64_t num_experts() const noexcept { return gate_up_.dim(0); }
  /// d.
  std::int64_t hidden() const noexcept { return gate_up_.dim(2); }
  /// F, the width of one expert.
  std::int64_t ffn() const noexcept { return down_.dim(2); }
  /// Fused gate/up weights [E, 2F, d] (read them with Backend::copy_to_host).
  const Tensor& gate_up() const noexcept { return gate_up_; }
  /// Down weights [E, d, F].
  const Tensor& down() const noexcept { return down_; }

  // x: [R, d] rows grouped by expert; offsets: [E + 1] i32; out: [R, d].
  /// Runs every expert on its rows: two grouped GEMMs around a fused SiLU-mul.
  template <BackendLike B>
  void forward(B& backend, TensorView x, TensorView offsets, TensorView out) const {
    detail::check_bank_io("SwiGluExperts::forward", num_experts(), hidden(), x, offsets, out);
    const std::int64_t R = x.dim(0);
    if (R == 0) return;
    Tensor h(backend, DType::f32, Shape{R, 2 * ffn()});
    backend.grouped_gemm(x, gate_up_, offsets, h);
    Tensor a(backend, DType::f32, Shape{R, ffn()});
    backend.silu_mul(h, a);
    backend.grouped_gemm(a, down_, offsets, out);
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
  Tensor gate_up_;
  Tensor down_;
};

/// GELU MLP experts: out = w2(gelu(w1(x))) (erf GELU, no biases).
class GeluExperts {
 public:
  // w1: [E, F, d]; w2: [E, d, F]; both f32.
  /// Validates the shapes.
  /// The weights are moved into their backend's preferred layout (prepare_weights).
  GeluExperts(Tensor w1, Tensor w2) : w1_(std::move(w1)), w2_(std::move(w2)) {
    constexpr std::string_view fn = "GeluExperts";
    AUTOGLM_CHECK(w1_.shape().rank() == 3 && w2_.shape().rank() == 3 &&
                      w1_.dtype() == DType::f32 && w2_.dtype() == DType::f32,
                  shape_mismatch, fn, "w1 and w2 must be f32 rank 3, got {} and {}",
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
  const Tensor& w1() const noexcept { return w1_; }
  /// Down weights [E, d, F].
  const Tensor& w2() const noexcept { return w2_; }

  // x: [R, d]; offsets: [E + 1] i32; out: [R, d].
  /// Runs every expert on its rows.
  template <BackendLike B>
  void forward(B& backend, TensorView x, TensorView offsets, TensorView out) const {
    detail::check_bank_io("GeluExperts::forward", num_experts(), hidden(), x, offsets, out);
    const std::int64_t R = x.dim(0);
    if (R == 0) return;
    Tensor h(backend, DType::f32, Shape{R, ffn()});
    backend.grouped_gemm(x, w1_, offsets, h);
    backend.gelu(h, h);
    backend.grouped_gemm(h, w2_, offsets, out);
  }

  /// A bank with weights uniform in +-1/sqrt(fan_in), drawn from `seed`.
  template <BackendLike B>
  static GeluExperts random(B& backend, std::int64_t experts, std::int64_t hidden,
                            std::int64_t ffn, std::uint64_t seed) {
    AUTOGLM_CHECK(experts >= 1 && hidden >= 1 && ffn >= 1, invalid_argument,
                  "GeluExperts::random", "experts={}, hidden={}, ffn={} must be >= 1", experts,
                  hidden, ffn);
    Tensor w1(backend, DType::f32, Shape{experts, ffn, hidden}, backend.weight_layout());
    Tensor w2(backend, DType::f32, Shape{experts, hidden, ffn}, backend.weight_layout());
    backend.fill_uniform(w1, seed, 1.0f / std::sqrt(static_cast<float>(hidden)));
    backend.fill_uniform(w2, seed + 1, 1.0f / std::sqrt(static_cast<float>(ffn)));
    return GeluExperts(std::move(w1), std::move(w2));
  }

 private:
  Tensor w1_;
  Tensor w2_;
};

static_assert(ExpertBank<SwiGluExperts>);
static_assert(ExpertBank<GeluExperts>);

}  // namespace autoglm
