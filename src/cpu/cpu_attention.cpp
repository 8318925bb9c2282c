// SPDX-License-Identifier: Apache-2.0
// CpuBackend's attention primitives: bias add, clamp, column moves, RoPE, and grouped-query
// attention with an f32 softmax. Every loop is split into tasks whose results do not depend on
// the thread count (one task = one token or one (token, head) pair), so results stay
// bit-identical for any number of threads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "autoglm/backend/cpu_backend.hpp"
#include "common/checks.hpp"
#include "cpu/cpu_backend_impl.hpp"

namespace autoglm {
namespace {

using detail::expect_dim;
using detail::expect_dtype;
using detail::expect_matrix;
using detail::expect_rank;
using detail::expect_same_shape;

using VecMap = Eigen::Map<Eigen::VectorXf>;
using ConstVecMap = Eigen::Map<const Eigen::VectorXf>;

}  // namespace

void CpuBackend::add_bias(TensorView x, TensorView bias, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::add_bias";
  expect_matrix(fn, "x", x, device());
  expect_matrix(fn, "out", out, device());
  expect_same_shape(fn, "x", x, "out", out);
  detail::expect_device(fn, "bias", bias, device());
  expect_dtype(fn, "bias", bias, DType::f32);
  const std::int64_t R = x.dim(0), N = x.dim(1);
  AUTOGLM_CHECK(bias.numel() == N, shape_mismatch, fn, "bias must hold {} values, got shape {}", N,
                bias.shape.str());
  const float* b = bias.as<float>();
  impl_->parallel(R, 16, [&](std::int64_t r) {
    const float* xi = x.as<float>() + r * N;
    float* o = out.as<float>() + r * N;
    for (std::int64_t c = 0; c < N; ++c) o[c] = xi[c] + b[c];
  });
}

void CpuBackend::clamp(TensorView x, float lo, float hi) {
  constexpr std::string_view fn = "CpuBackend::clamp";
  detail::expect_device(fn, "x", x, device());
  expect_dtype(fn, "x", x, DType::f32);
  AUTOGLM_CHECK(lo <= hi, invalid_argument, fn, "lo={} must be <= hi={}", lo, hi);
  const std::int64_t n = x.numel();
  constexpr std::int64_t block = 1 << 14;
  impl_->parallel((n + block - 1) / block, 1, [&](std::int64_t b) {
    float* v = x.as<float>();
    for (std::int64_t i = b * block; i < std::min(n, (b + 1) * block); ++i)
      v[i] = std::min(std::max(v[i], lo), hi);
  });
}

void CpuBackend::copy_columns(TensorView src, std::int64_t src_col, TensorView dst,
                              std::int64_t dst_col, std::int64_t width) {
  constexpr std::string_view fn = "CpuBackend::copy_columns";
  detail::expect_device(fn, "src", src, device());
  detail::expect_device(fn, "dst", dst, device());
  expect_rank(fn, "src", src, 2);
  expect_rank(fn, "dst", dst, 2);
  AUTOGLM_CHECK(src.dtype == dst.dtype, dtype_mismatch, fn, "src is {} but dst is {}",
                dtype_name(src.dtype), dtype_name(dst.dtype));
  const std::int64_t R = src.dim(0), Cs = src.dim(1), Rd = dst.dim(0), Cd = dst.dim(1);
  AUTOGLM_CHECK(
      width >= 0 && src_col >= 0 && dst_col >= 0 && src_col + width <= Cs && dst_col + width <= Cd,
      out_of_range, fn, "columns [{}, {}) of src {} or [{}, {}) of dst {} are outside the matrix",
      src_col, src_col + width, src.shape.str(), dst_col, dst_col + width, dst.shape.str());
  AUTOGLM_CHECK((R == 0 && Rd == 0) || (R > 0 && Rd % R == 0 && Rd >= R), shape_mismatch, fn,
                "dst rows {} must be a positive multiple of src rows {}", Rd, R);
  if (Rd == 0 || width == 0) return;
  const std::int64_t g = Rd / R;
  const std::size_t es = dtype_size(src.dtype);
  const auto* S = static_cast<const char*>(src.data);
  auto* D = static_cast<char*>(dst.data);
  impl_->parallel(Rd, 64, [&](std::int64_t r) {
    std::memmove(D + (r * Cd + dst_col) * es, S + ((r / g) * Cs + src_col) * es, width * es);
  });
}

void CpuBackend::rope(TensorView x, TensorView positions, TensorView inv_freq,
                      const RopeParams& p) {
  constexpr std::string_view fn = "CpuBackend::rope";
  const std::int64_t r = detail::expect_rope_io(fn, x, positions, inv_freq, p, device());
  const std::int64_t T = x.dim(0), H = x.dim(1), D = x.dim(2);
  const std::int32_t* pos = positions.as<std::int32_t>();
  for (std::int64_t t = 0; t < T; ++t)
    AUTOGLM_CHECK(pos[t] >= 0, out_of_range, fn, "position {} of token {} is negative", pos[t], t);
  const float* f = inv_freq.as<float>();
  const std::int64_t half = r / 2;
  impl_->parallel(T, 4, [&](std::int64_t t) {
    std::vector<float> cs(static_cast<std::size_t>(r)), tmp(static_cast<std::size_t>(r));
    const float fp = static_cast<float>(pos[t]);
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = fp * f[i];  // f32 product, as transformers forms freqs
      cs[i] = std::cos(angle) * p.attention_factor;
      cs[half + i] = std::sin(angle) * p.attention_factor;
    }
    for (std::int64_t h = 0; h < H; ++h) {
      float* v = x.as<float>() + (t * H + h) * D + p.offset;
      if (p.interleaved) {
        std::copy_n(v, r, tmp.data());
        for (std::int64_t i = 0; i < half; ++i) {
          const float e = tmp[2 * i], o = tmp[2 * i + 1], c = cs[i], s = cs[half + i];
          v[i] = e * c - o * s;
          v[half + i] = o * c + e * s;
        }
      } else {
        for (std::int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[half + i], c = cs[i], s = cs[half + i];
          v[i] = a * c - b * s;
          v[half + i] = b * c + a * s;
        }
      }
    }
  });
}

void CpuBackend::attention(TensorView q, TensorView k, TensorView v, TensorView positions,
                           const AttentionParams& p, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::attention";
  detail::expect_attention_io(fn, q, k, v, positions, p, out, device());
  const std::int64_t T = q.dim(0), Hq = q.dim(1), D = q.dim(2);
  const std::int64_t S = k.dim(0), Hkv = k.dim(1), Dv = v.dim(2);
  const std::int32_t* pos = positions.as<std::int32_t>();
  for (std::int64_t t = 0; t < T; ++t)
    AUTOGLM_CHECK(pos[t] >= 0, out_of_range, fn, "position {} of query {} is negative", pos[t], t);
  const std::int64_t g = Hq / Hkv;
  const float* Q = q.as<float>();
  const float* K = k.as<float>();
  const float* V = v.as<float>();
  float* O = out.as<float>();
  impl_->parallel(T * Hq, 1, [&](std::int64_t i) {
    const std::int64_t t = i / Hq, h = i % Hq, kh = h / g;
    const std::int64_t p_t = pos[t];
    const std::int64_t end = p.causal ? std::min<std::int64_t>(S, p_t + 1) : S;
    const std::int64_t begin = p.window > 0 ? std::max<std::int64_t>(0, p_t - p.window + 1) : 0;
    VecMap o(O + (t * Hq + h) * Dv, Dv);
    o.setZero();
    if (begin >= end) return;
    thread_local std::vector<float> scores;
    scores.resize(static_cast<std::size_t>(end - begin));
    ConstVecMap qv(Q + (t * Hq + h) * D, D);
    float mx = -std::numeric_limits<float>::infinity();
    for (std::int64_t s = begin; s < end; ++s) {
      const float sc = qv.dot(ConstVecMap(K + (s * Hkv + kh) * D, D)) * p.scale;
      scores[s - begin] = sc;
      mx = std::max(mx, sc);
    }
    float sum = 0.0f;
    for (float& sc : scores) sum += (sc = std::exp(sc - mx));
    const float inv = 1.0f / sum;
    for (std::int64_t s = begin; s < end; ++s)
      o.noalias() += (scores[s - begin] * inv) * ConstVecMap(V + (s * Hkv + kh) * Dv, Dv);
  });
}

}  // namespace autoglm
