// SPDX-License-Identifier: Apache-2.0
// GQA and MLA attention blocks, and RoPE frequency tables (transformers' rope_init_fn).
#include "autoglm/models/attention.hpp"
#include "autoglm/quant/quantize.hpp"

#include <cmath>
#include <numbers>

#include "common/checks.hpp"

namespace autoglm {
namespace {

/// Throws unless t is an f32 tensor of shape `want` (or, when `optional`, empty).
void check_weight(std::string_view fn, std::string_view name, const Weight& w, const Shape& want,
                  bool optional = false) {
  if (optional && !w.defined()) return;
  if (w.is_quantized()) {
    AUTOGLM_CHECK(w.shape() == want, shape_mismatch, fn, "{} must be {}, got int8 {}", name,
                  want.str(), w.shape().str());
    return;
  }
  const Tensor& t = w.tensor();
  AUTOGLM_CHECK(t.defined(), invalid_argument, fn, "{} is missing (expected a float or int8 {})",
                name, want.str());
  AUTOGLM_CHECK(detail::is_float_or_int8(w), dtype_mismatch, fn,
                "{} must be float (f32, bf16, f16) or int8, got {}", name, dtype_name(t.dtype()));
  AUTOGLM_CHECK(t.shape() == want, shape_mismatch, fn, "{} must be {}, got {}", name, want.str(),
                t.shape().str());
}

/// Throws unless a vector weight (norm, bias) holds n values (any rank), or is absent when
/// `optional`.
void check_vector(std::string_view fn, std::string_view name, const Tensor& t, std::int64_t n,
                  bool optional = false) {
  if (optional && !t.defined()) return;
  AUTOGLM_CHECK(t.defined() && t.dtype() == DType::f32 && t.numel() == n, shape_mismatch, fn,
                "{} must be f32 with {} values, got {} {}", name, n,
                t.defined() ? dtype_name(t.dtype()) : "nothing", t.shape().str());
}

/// Throws unless the cache of a layer can take rows [start, start + T).
void check_cache(std::string_view fn, const KvLayer& cache, std::int64_t start, std::int64_t T,
                 std::int64_t heads, std::int64_t kdim, std::int64_t vdim) {
  const TensorView k = cache.k, v = cache.v;
  AUTOGLM_CHECK(k.rank() == 3 && k.dtype == DType::f32 && k.dim(1) == heads && k.dim(2) == kdim,
                shape_mismatch, fn, "key cache must be f32 [capacity, {}, {}], got {}", heads, kdim,
                k.shape.str());
  AUTOGLM_CHECK(v.rank() == 3 && v.dtype == DType::f32 && v.dim(0) == k.dim(0) &&
                    v.dim(1) == heads && v.dim(2) == vdim,
                shape_mismatch, fn, "value cache must be f32 [{}, {}, {}], got {}", k.dim(0), heads,
                vdim, v.shape.str());
  AUTOGLM_CHECK(start >= 0 && start + T <= k.dim(0), out_of_range, fn,
                "positions [{}, {}) exceed the cache capacity {}", start, start + T, k.dim(0));
}

void check_io(std::string_view fn, const TensorView& x, const TensorView& out, std::int64_t d,
              const AttentionContext& ctx) {
  AUTOGLM_CHECK(x.rank() == 2 && x.dim(1) == d && x.dtype == DType::f32, shape_mismatch, fn,
                "x must be f32 [tokens, {}], got {} {}", d, dtype_name(x.dtype), x.shape.str());
  AUTOGLM_CHECK(out.shape == x.shape && out.dtype == DType::f32, shape_mismatch, fn,
                "out must be f32 {}, got {} {}", x.shape.str(), dtype_name(out.dtype),
                out.shape.str());
  AUTOGLM_CHECK(ctx.positions.numel() == x.dim(0), shape_mismatch, fn,
                "positions hold {} values for {} tokens", ctx.positions.numel(), x.dim(0));
}

}  // namespace

std::vector<float> rope_inv_freq(const ModelConfig& c) {
  constexpr std::string_view fn = "rope_inv_freq";
  const int r = c.rotary_dim();
  AUTOGLM_CHECK(
      r >= 2 && r % 2 == 0, invalid_argument, fn,
      "rotary dimension {} (head_dim={} x partial_rotary_factor={}) must be even and >= 2", r,
      c.head_dim, c.partial_rotary_factor);
  const double base = c.rope_theta;
  AUTOGLM_CHECK(base > 1.0 && std::isfinite(base), invalid_argument, fn,
                "rope_theta={} must be finite and > 1", base);
  const RopeScaling& s = c.rope_scaling;
  const int half = r / 2;
  std::vector<double> pos_freq(static_cast<std::size_t>(half)), inv(static_cast<std::size_t>(half));
  for (int i = 0; i < half; ++i) {
    pos_freq[i] = std::pow(base, static_cast<double>(2 * i) / r);
    inv[i] = 1.0 / pos_freq[i];
  }
  if (s.type != RopeType::none) {
    AUTOGLM_CHECK(s.factor > 0.0 && std::isfinite(s.factor), invalid_argument, fn,
                  "rope_scaling.factor={} must be finite and > 0", s.factor);
  }
  const double orig = static_cast<double>(s.original_max_position_embeddings > 0
                                              ? s.original_max_position_embeddings
                                              : c.max_position_embeddings);
  switch (s.type) {
    case RopeType::none:
      break;
    case RopeType::linear:
      for (double& f : inv) f /= s.factor;
      break;
    case RopeType::dynamic:
      detail::fail(ErrorCode::unsupported, fn,
                   "rope_scaling type 'dynamic' changes the frequencies with the sequence length "
                   "and is not supported");
    case RopeType::yarn: {
      auto corr_dim = [&](double rotations) {
        return (r * std::log(orig / (rotations * 2.0 * std::numbers::pi))) / (2.0 * std::log(base));
      };
      double low = corr_dim(s.beta_fast), high = corr_dim(s.beta_slow);
      if (s.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(r - 1));
      if (low == high) high += 0.001;
      for (int i = 0; i < half; ++i) {
        const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
        const double extrap = 1.0 - ramp;  // share of the original frequency
        inv[i] = (1.0 / (s.factor * pos_freq[i])) * (1.0 - extrap) + (1.0 / pos_freq[i]) * extrap;
      }
      break;
    }
    case RopeType::llama3: {
      const double low_wl = orig / s.low_freq_factor, high_wl = orig / s.high_freq_factor;
      for (double& f : inv) {
        const double wl = 2.0 * std::numbers::pi / f;
        if (wl > low_wl) {
          f /= s.factor;
        } else if (wl >= high_wl) {  // medium band: smooth blend
          const double smooth =
              (orig / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
          f = (1.0 - smooth) * f / s.factor + smooth * f;
        }
      }
      break;
    }
  }
  return {inv.begin(), inv.end()};
}

// ------------------------------------------------------------------------------------------ GQA

GqaAttention::GqaAttention(GqaWeights weights, GqaOptions options)
    : w_(std::move(weights)), o_(options) {
  constexpr std::string_view fn = "GqaAttention";
  const std::int64_t Hq = o_.heads, Hkv = o_.kv_heads, D = o_.head_dim;
  AUTOGLM_CHECK(Hq >= 1 && Hkv >= 1 && D >= 1 && Hq % Hkv == 0, invalid_argument, fn,
                "heads={} must be a multiple of kv_heads={} and head_dim={} >= 1", Hq, Hkv, D);
  AUTOGLM_CHECK(w_.q_proj.defined() && w_.q_proj.shape().rank() == 2, shape_mismatch, fn,
                "q_proj must be [{}, hidden], got {}", Hq * D, w_.q_proj.shape().str());
  const std::int64_t d = w_.q_proj.dim(1);
  check_weight(fn, "q_proj", w_.q_proj, Shape{Hq * D, d});
  check_weight(fn, "k_proj", w_.k_proj, Shape{Hkv * D, d});
  check_weight(fn, "v_proj", w_.v_proj, Shape{Hkv * D, d});
  check_weight(fn, "o_proj", w_.o_proj, Shape{d, Hq * D});
  check_vector(fn, "q_bias", w_.q_bias, Hq * D, true);
  check_vector(fn, "k_bias", w_.k_bias, Hkv * D, true);
  check_vector(fn, "v_bias", w_.v_bias, Hkv * D, true);
  check_vector(fn, "o_bias", w_.o_bias, d, true);
  switch (o_.qk_norm) {
    case QkNorm::none:
      AUTOGLM_CHECK(!w_.q_norm.defined() && !w_.k_norm.defined(), invalid_argument, fn,
                    "q_norm / k_norm given but qk_norm is none");
      break;
    case QkNorm::per_head:
      check_vector(fn, "q_norm", w_.q_norm, D);
      check_vector(fn, "k_norm", w_.k_norm, D);
      break;
    case QkNorm::whole:
      check_vector(fn, "q_norm", w_.q_norm, Hq * D);
      check_vector(fn, "k_norm", w_.k_norm, Hkv * D);
      break;
  }
  AUTOGLM_CHECK(o_.qk_norm == QkNorm::none || o_.norm_eps > 0.0f, invalid_argument, fn,
                "norm_eps={} must be > 0", o_.norm_eps);
  AUTOGLM_CHECK(!o_.clip_qkv || *o_.clip_qkv > 0.0f, invalid_argument, fn,
                "clip_qkv={} must be > 0", o_.clip_qkv.value_or(0.0f));
  const std::int64_t r = o_.rope.rotary_dim == 0 ? D - o_.rope.offset : o_.rope.rotary_dim;
  AUTOGLM_CHECK(o_.rope.offset >= 0 && r >= 2 && r % 2 == 0 && o_.rope.offset + r <= D,
                invalid_argument, fn, "rotary_dim={} at offset {} must be even and fit head_dim={}",
                r, o_.rope.offset, D);
  w_.q_proj = detail::prepared(std::move(w_.q_proj));
  w_.k_proj = detail::prepared(std::move(w_.k_proj));
  w_.v_proj = detail::prepared(std::move(w_.v_proj));
  w_.o_proj = detail::prepared(std::move(w_.o_proj));
}

void GqaAttention::forward(Backend& b, TensorView x, const AttentionContext& ctx, KvLayer& cache,
                           TensorView out) const {
  constexpr std::string_view fn = "GqaAttention::forward";
  const std::int64_t Hq = o_.heads, Hkv = o_.kv_heads, D = o_.head_dim;
  check_io(fn, x, out, hidden(), ctx);
  const std::int64_t T = x.dim(0), start = ctx.start;
  if (T == 0) return;
  check_cache(fn, cache, start, T, Hkv, D, D);
  // q: [T, Hq * D]; the keys and values go straight into their cache rows.
  Tensor q(b, DType::f32, Shape{T, Hq * D});
  const TensorView kr = TensorView(cache.k).slice(start, start + T).reshaped(Shape{T, Hkv * D});
  const TensorView vr = TensorView(cache.v).slice(start, start + T).reshaped(Shape{T, Hkv * D});
  linear(b, x, w_.q_proj, q);
  linear(b, x, w_.k_proj, kr);
  linear(b, x, w_.v_proj, vr);
  if (w_.q_bias.defined()) b.add_bias(q, w_.q_bias, q);
  if (w_.k_bias.defined()) b.add_bias(kr, w_.k_bias, kr);
  if (w_.v_bias.defined()) b.add_bias(vr, w_.v_bias, vr);
  if (o_.qk_norm == QkNorm::whole) {  // OLMoE: over the whole projection, before the head split
    b.rms_norm(q, w_.q_norm, o_.norm_eps, q);
    b.rms_norm(kr, w_.k_norm, o_.norm_eps, kr);
  }
  if (o_.clip_qkv) {
    const float c = *o_.clip_qkv;
    b.clamp(q, -c, c);
    b.clamp(kr, -c, c);
    b.clamp(vr, -c, c);
  }
  const TensorView q3 = TensorView(q).reshaped(Shape{T, Hq, D});
  const TensorView k3 = kr.reshaped(Shape{T, Hkv, D});
  if (o_.qk_norm == QkNorm::per_head) {  // Qwen3-MoE, GLM use_qk_norm: over each head
    const TensorView qh = TensorView(q).reshaped(Shape{T * Hq, D});
    const TensorView kh = kr.reshaped(Shape{T * Hkv, D});
    b.rms_norm(qh, w_.q_norm, o_.norm_eps, qh);
    b.rms_norm(kh, w_.k_norm, o_.norm_eps, kh);
  }
  b.rope(q3, ctx.positions, ctx.inv_freq, o_.rope);
  b.rope(k3, ctx.positions, ctx.inv_freq, o_.rope);
  // attn: [T, Hq, D] over cache rows [0, start + T).
  Tensor attn(b, DType::f32, Shape{T, Hq, D});
  b.attention(q3, TensorView(cache.k).slice(0, start + T), TensorView(cache.v).slice(0, start + T),
              ctx.positions, o_.attention, attn);
  linear(b, TensorView(attn).reshaped(Shape{T, Hq * D}), w_.o_proj, out);
  if (w_.o_bias.defined()) b.add_bias(out, w_.o_bias, out);
}

// ------------------------------------------------------------------------------------------ MLA

MlaAttention::MlaAttention(MlaWeights weights, MlaOptions options)
    : w_(std::move(weights)), o_(options) {
  constexpr std::string_view fn = "MlaAttention";
  const std::int64_t H = o_.heads, nope = o_.nope_dim, rope = o_.rope_dim, vd = o_.v_dim;
  const std::int64_t kvr = o_.kv_lora_rank, qr = o_.q_lora_rank;
  AUTOGLM_CHECK(H >= 1 && nope >= 0 && rope >= 2 && rope % 2 == 0 && vd >= 1 && kvr >= 1 && qr >= 0,
                invalid_argument, fn,
                "heads={}, qk_nope_head_dim={}, qk_rope_head_dim={} (even), v_head_dim={}, "
                "kv_lora_rank={}, q_lora_rank={} out of range",
                H, nope, rope, vd, kvr, qr);
  AUTOGLM_CHECK(w_.kv_a_proj.defined() && w_.kv_a_proj.shape().rank() == 2, shape_mismatch, fn,
                "kv_a_proj_with_mqa must be [{}, hidden], got {}", kvr + rope,
                w_.kv_a_proj.shape().str());
  const std::int64_t d = w_.kv_a_proj.dim(1), qk = nope + rope;
  if (qr > 0) {
    AUTOGLM_CHECK(!w_.q_proj.defined(), invalid_argument, fn,
                  "q_proj given together with q_lora_rank={}", qr);
    check_weight(fn, "q_a_proj", w_.q_a_proj, Shape{qr, d});
    check_vector(fn, "q_a_proj bias", w_.q_a_bias, qr, true);
    check_vector(fn, "q_a_layernorm", w_.q_a_norm, qr);
    check_weight(fn, "q_b_proj", w_.q_b_proj, Shape{H * qk, qr});
  } else {
    check_weight(fn, "q_proj", w_.q_proj, Shape{H * qk, d});
    AUTOGLM_CHECK(!w_.q_a_proj.defined() && !w_.q_b_proj.defined(), invalid_argument, fn,
                  "q_a_proj / q_b_proj given but q_lora_rank is 0");
  }
  check_weight(fn, "kv_a_proj_with_mqa", w_.kv_a_proj, Shape{kvr + rope, d});
  check_vector(fn, "kv_a_proj_with_mqa bias", w_.kv_a_bias, kvr + rope, true);
  check_vector(fn, "kv_a_layernorm", w_.kv_a_norm, kvr);
  check_weight(fn, "kv_b_proj", w_.kv_b_proj, Shape{H * (nope + vd), kvr});
  check_weight(fn, "o_proj", w_.o_proj, Shape{d, H * vd});
  check_vector(fn, "o_proj bias", w_.o_bias, d, true);
  AUTOGLM_CHECK(o_.latent_eps > 0.0f, invalid_argument, fn, "latent_eps={} must be > 0",
                o_.latent_eps);
  for (Weight* t :
       {&w_.q_proj, &w_.q_a_proj, &w_.q_b_proj, &w_.kv_a_proj, &w_.kv_b_proj, &w_.o_proj})
    if (t->defined()) *t = detail::prepared(std::move(*t));
}

void MlaAttention::forward(Backend& b, TensorView x, const AttentionContext& ctx, KvLayer& cache,
                           TensorView out) const {
  constexpr std::string_view fn = "MlaAttention::forward";
  const std::int64_t H = o_.heads, nope = o_.nope_dim, rope = o_.rope_dim, vd = o_.v_dim;
  const std::int64_t kvr = o_.kv_lora_rank, qk = nope + rope;
  check_io(fn, x, out, hidden(), ctx);
  const std::int64_t T = x.dim(0), start = ctx.start;
  if (T == 0) return;
  check_cache(fn, cache, start, T, H, qk, vd);
  // q: [T, H, nope | rope].
  Tensor q(b, DType::f32, Shape{T, H * qk});
  if (o_.q_lora_rank > 0) {
    Tensor qa(b, DType::f32, Shape{T, o_.q_lora_rank});
    linear(b, x, w_.q_a_proj, qa);
    if (w_.q_a_bias.defined()) b.add_bias(qa, w_.q_a_bias, qa);
    b.rms_norm(qa, w_.q_a_norm, o_.latent_eps, qa);
    linear(b, qa, w_.q_b_proj, q);
  } else {
    linear(b, x, w_.q_proj, q);
  }
  // kva: [T, c_kv | k_rope]; c_kv normalised -> kv: [T, H, k_nope | v].
  Tensor kva(b, DType::f32, Shape{T, kvr + rope});
  linear(b, x, w_.kv_a_proj, kva);
  if (w_.kv_a_bias.defined()) b.add_bias(kva, w_.kv_a_bias, kva);
  Tensor ckv(b, DType::f32, Shape{T, kvr});
  b.copy_columns(kva, 0, ckv, 0, kvr);
  b.rms_norm(ckv, w_.kv_a_norm, o_.latent_eps, ckv);
  Tensor kv(b, DType::f32, Shape{T, H * (nope + vd)});
  linear(b, ckv, w_.kv_b_proj, kv);
  RopeParams rp{nope, rope, o_.interleaved, o_.rope_attention_factor};
  b.rope(TensorView(q).reshaped(Shape{T, H, qk}), ctx.positions, ctx.inv_freq, rp);
  rp.offset = kvr;
  b.rope(TensorView(kva).reshaped(Shape{T, 1, kvr + rope}), ctx.positions, ctx.inv_freq, rp);
  // Cache rows: keys [k_nope | k_rope shared by every head], values per head.
  const TensorView kr = TensorView(cache.k).slice(start, start + T).reshaped(Shape{T * H, qk});
  const TensorView vr = TensorView(cache.v).slice(start, start + T).reshaped(Shape{T * H, vd});
  const TensorView kvh = TensorView(kv).reshaped(Shape{T * H, nope + vd});
  if (nope > 0) b.copy_columns(kvh, 0, kr, 0, nope);
  b.copy_columns(kva, kvr, kr, nope, rope);
  b.copy_columns(kvh, nope, vr, 0, vd);
  Tensor attn(b, DType::f32, Shape{T, H, vd});
  b.attention(TensorView(q).reshaped(Shape{T, H, qk}), TensorView(cache.k).slice(0, start + T),
              TensorView(cache.v).slice(0, start + T), ctx.positions, o_.attention, attn);
  linear(b, TensorView(attn).reshaped(Shape{T, H * vd}), w_.o_proj, out);
  if (w_.o_bias.defined()) b.add_bias(out, w_.o_bias, out);
}

// ------------------------------------------------------------------------------- quantization

namespace {
void quantize_in_place(Backend& b, Weight& w, const QuantSpec& spec, std::string_view name) {
  w = quantize_weight(b, w, spec, name);
}
}  // namespace

GqaAttention GqaAttention::quantized(Backend& backend, const QuantSpec& spec) const {
  GqaWeights w = w_;
  quantize_in_place(backend, w.q_proj, spec, "q_proj");
  quantize_in_place(backend, w.k_proj, spec, "k_proj");
  quantize_in_place(backend, w.v_proj, spec, "v_proj");
  quantize_in_place(backend, w.o_proj, spec, "o_proj");
  return GqaAttention(std::move(w), o_);
}

MlaAttention MlaAttention::quantized(Backend& backend, const QuantSpec& spec) const {
  MlaWeights w = w_;
  quantize_in_place(backend, w.q_proj, spec, "q_proj");
  quantize_in_place(backend, w.q_a_proj, spec, "q_a_proj");
  quantize_in_place(backend, w.q_b_proj, spec, "q_b_proj");
  quantize_in_place(backend, w.kv_a_proj, spec, "kv_a_proj_with_mqa");
  quantize_in_place(backend, w.kv_b_proj, spec, "kv_b_proj");
  quantize_in_place(backend, w.o_proj, spec, "o_proj");
  return MlaAttention(std::move(w), o_);
}

}  // namespace autoglm
