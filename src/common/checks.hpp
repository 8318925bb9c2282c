// SPDX-License-Identifier: Apache-2.0
// Argument validation shared by every backend: one place says what a primitive accepts.
#pragma once

#include <cmath>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "autoglm/backend/backend.hpp"

namespace autoglm::detail {

/// Throws unless t has rank `rank`.
inline void expect_rank(std::string_view fn, std::string_view arg, const TensorView& t, int rank) {
  AUTOGLM_CHECK(t.rank() == rank, shape_mismatch, fn, "{} must have rank {}, got shape {}", arg,
                rank, t.shape.str());
}

/// Throws unless t has dtype `dt`.
inline void expect_dtype(std::string_view fn, std::string_view arg, const TensorView& t, DType dt) {
  AUTOGLM_CHECK(t.dtype == dt, dtype_mismatch, fn, "{} must be {}, got {}", arg, dtype_name(dt),
                dtype_name(t.dtype));
}

/// Throws unless t is a float weight (f32, bf16 or f16) that `backend` computes with directly;
/// the message lists the dtypes it takes.
inline void expect_weight_dtype(std::string_view fn, std::string_view arg, const TensorView& t,
                                const Backend& backend) {
  if (is_float_dtype(t.dtype) && backend.supports_weight_dtype(t.dtype)) return;
  std::vector<std::string_view> ok{"f32"};
  for (DType dt : {DType::bf16, DType::f16})
    if (backend.supports_weight_dtype(dt)) ok.push_back(dtype_name(dt));
  std::string accepted(ok[0]);
  for (std::size_t i = 1; i < ok.size(); ++i)
    accepted += fmt::format("{}{}", i + 1 == ok.size() ? " or " : ", ", ok[i]);
  detail::fail(ErrorCode::dtype_mismatch, fn, "{} must be {}, got {}", arg, accepted,
               dtype_name(t.dtype));
}

/// Throws unless t lives on device d, has a buffer when non-empty and is row-major (unless
/// `any_layout`: only weight operands and copies take other layouts).
inline void expect_device(std::string_view fn, std::string_view arg, const TensorView& t, Device d,
                          bool any_layout = false) {
  AUTOGLM_CHECK(t.device == d, device, fn, "{} is on another device", arg);
  AUTOGLM_CHECK(any_layout || t.layout == Layout::row_major, invalid_argument, fn,
                "{} must be row-major", arg);
  AUTOGLM_CHECK(t.data != nullptr || t.numel() == 0, invalid_argument, fn, "{} has no buffer", arg);
}

/// Throws unless dimension i of t equals n.
inline void expect_dim(std::string_view fn, std::string_view arg, const TensorView& t, int i,
                       std::int64_t n) {
  AUTOGLM_CHECK(t.rank() > i && t.dim(i) == n, shape_mismatch, fn,
                "{} dimension {} must be {}, got shape {}", arg, i, n, t.shape.str());
}

/// Throws unless a and b have the same shape.
inline void expect_same_shape(std::string_view fn, std::string_view an, const TensorView& a,
                              std::string_view bn, const TensorView& b) {
  AUTOGLM_CHECK(a.shape == b.shape, shape_mismatch, fn, "{} {} and {} {} must match", an,
                a.shape.str(), bn, b.shape.str());
}

/// Rank-2 f32 on device d.
inline void expect_matrix(std::string_view fn, std::string_view arg, const TensorView& t, Device d,
                          DType dt = DType::f32, bool any_layout = false) {
  expect_device(fn, arg, t, d, any_layout);
  expect_rank(fn, arg, t, 2);
  expect_dtype(fn, arg, t, dt);
}

/// The operands of a grouped GEMM around weights [E, n, k]: x [R, k] and out [R, n] matrices,
/// offsets [E + 1] i32 on device d.
inline void expect_grouped_io(std::string_view fn, const TensorView& x, std::int64_t E,
                              std::int64_t n, std::int64_t k, const TensorView& offsets,
                              const TensorView& out, Device d) {
  expect_matrix(fn, "x", x, d);
  expect_matrix(fn, "out", out, d);
  expect_device(fn, "offsets", offsets, d);
  expect_dtype(fn, "offsets", offsets, DType::i32);
  expect_rank(fn, "offsets", offsets, 1);
  expect_dim(fn, "offsets", offsets, 0, E + 1);
  expect_dim(fn, "x", x, 1, k);
  expect_dim(fn, "out", out, 1, n);
  expect_dim(fn, "out", out, 0, x.dim(0));
}

/// Host offsets [E + 1] of a grouped GEMM over `rows` rows: start at 0, never decrease, end
/// within the rows.
inline void check_offsets(std::string_view fn, const std::int32_t* off, std::int64_t E,
                          std::int64_t rows) {
  AUTOGLM_CHECK(off[0] == 0 && off[E] <= rows, invalid_argument, fn,
                "offsets must start at 0 and end within {} rows, got [{}, {}]", rows, off[0],
                off[E]);
  for (std::int64_t e = 0; e < E; ++e)
    AUTOGLM_CHECK(off[e] <= off[e + 1], invalid_argument, fn,
                  "offsets decrease at expert {}: {} > {}", e, off[e], off[e + 1]);
}

/// The operands of Backend::embedding on `backend`: table [V, d] f32 (or a 16-bit dtype the
/// backend supports as weights), ids i32 [T], out f32 [T, d]. (The ids' values are checked by
/// check_token_ids, or on the device.)
inline void expect_embedding_io(std::string_view fn, const TensorView& table, const TensorView& ids,
                                const TensorView& out, const Backend& backend) {
  const Device d = backend.device();
  expect_device(fn, "table", table, d);
  expect_rank(fn, "table", table, 2);
  expect_weight_dtype(fn, "table", table, backend);
  expect_matrix(fn, "out", out, d);
  expect_device(fn, "ids", ids, d);
  expect_dtype(fn, "ids", ids, DType::i32);
  expect_dim(fn, "out", out, 0, ids.numel());
  expect_dim(fn, "out", out, 1, table.dim(1));
}

/// Host token ids [T]: each in [0, V), else an Error naming the first outside and its position.
inline void check_token_ids(std::string_view fn, const std::int32_t* ids, std::int64_t T,
                            std::int64_t V) {
  for (std::int64_t t = 0; t < T; ++t)
    AUTOGLM_CHECK(ids[t] >= 0 && ids[t] < V, out_of_range, fn,
                  "token id {} at position {} outside vocabulary [0, {})", ids[t], t, V);
}

/// The operands of Backend::rope on device d: x f32 [T, H, D], positions i32 with T values,
/// inv_freq f32 with rotary_dim / 2 values, an offset and rotary dim that fit D, a finite
/// attention factor. Returns the rotary dim. (The positions' values are the backend's to check.)
inline std::int64_t expect_rope_io(std::string_view fn, const TensorView& x,
                                   const TensorView& positions, const TensorView& inv_freq,
                                   const RopeParams& p, Device d) {
  expect_device(fn, "x", x, d);
  expect_rank(fn, "x", x, 3);
  expect_dtype(fn, "x", x, DType::f32);
  expect_device(fn, "positions", positions, d);
  expect_dtype(fn, "positions", positions, DType::i32);
  expect_device(fn, "inv_freq", inv_freq, d);
  expect_dtype(fn, "inv_freq", inv_freq, DType::f32);
  const std::int64_t T = x.dim(0), D = x.dim(2);
  AUTOGLM_CHECK(positions.numel() == T, shape_mismatch, fn,
                "positions must hold {} values (one per token), got shape {}", T,
                positions.shape.str());
  AUTOGLM_CHECK(p.offset >= 0 && p.offset <= D, out_of_range, fn, "offset={} outside head_dim={}",
                p.offset, D);
  const std::int64_t r = p.rotary_dim == 0 ? D - p.offset : p.rotary_dim;
  AUTOGLM_CHECK(r >= 2 && r % 2 == 0 && p.offset + r <= D, invalid_argument, fn,
                "rotary_dim={} must be even, >= 2 and fit head_dim={} after offset={}", r, D,
                p.offset);
  AUTOGLM_CHECK(inv_freq.numel() == r / 2, shape_mismatch, fn,
                "inv_freq must hold rotary_dim/2={} values, got shape {}", r / 2,
                inv_freq.shape.str());
  AUTOGLM_CHECK(std::isfinite(p.attention_factor), invalid_argument, fn,
                "attention_factor={} must be finite", p.attention_factor);
  return r;
}

/// The operands of Backend::route_expert_choice on device d: logits f32 [T, E], capacity >= 1,
/// ids i32 and weights f32 [T, E], stats f32 with E + 1 values. (The logits' values are the
/// backend's to check.)
inline void expect_expert_choice_io(std::string_view fn, const TensorView& logits,
                                    std::int64_t capacity, const TensorView& ids,
                                    const TensorView& weights, const TensorView& stats, Device d) {
  expect_matrix(fn, "logits", logits, d);
  const std::int64_t T = logits.dim(0), E = logits.dim(1);
  AUTOGLM_CHECK(capacity >= 1, invalid_argument, fn, "capacity={} must be >= 1", capacity);
  expect_matrix(fn, "ids", ids, d, DType::i32);
  expect_matrix(fn, "weights", weights, d);
  expect_dim(fn, "ids", ids, 0, T);
  expect_dim(fn, "ids", ids, 1, E);
  expect_same_shape(fn, "ids", ids, "weights", weights);
  AUTOGLM_CHECK(stats.numel() == E + 1 && stats.dtype == DType::f32, shape_mismatch, fn,
                "stats must be {} f32 values", E + 1);
  expect_device(fn, "stats", stats, d);
}

/// The operands of Backend::attention on device d: q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv]
/// and out [T, Hq, Dv] f32, positions i32 with T values, Hq a multiple of Hkv, a finite scale
/// and a window >= 0. (The positions' values are the backend's to check.)
inline void expect_attention_io(std::string_view fn, const TensorView& q, const TensorView& k,
                                const TensorView& v, const TensorView& positions,
                                const AttentionParams& p, const TensorView& out, Device d) {
  for (auto [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}}) {
    expect_device(fn, name, *t, d);
    expect_rank(fn, name, *t, 3);
    expect_dtype(fn, name, *t, DType::f32);
  }
  expect_device(fn, "positions", positions, d);
  expect_dtype(fn, "positions", positions, DType::i32);
  const std::int64_t T = q.dim(0), Hq = q.dim(1), D = q.dim(2);
  const std::int64_t S = k.dim(0), Hkv = k.dim(1), Dv = v.dim(2);
  expect_dim(fn, "k", k, 2, D);
  expect_dim(fn, "v", v, 0, S);
  expect_dim(fn, "v", v, 1, Hkv);
  expect_dim(fn, "out", out, 0, T);
  expect_dim(fn, "out", out, 1, Hq);
  expect_dim(fn, "out", out, 2, Dv);
  AUTOGLM_CHECK(Hkv >= 1 && Hq % Hkv == 0, shape_mismatch, fn,
                "query heads {} must be a multiple of kv heads {}", Hq, Hkv);
  AUTOGLM_CHECK(positions.numel() == T, shape_mismatch, fn,
                "positions must hold {} values (one per query), got shape {}", T,
                positions.shape.str());
  AUTOGLM_CHECK(std::isfinite(p.scale), invalid_argument, fn, "scale={} must be finite", p.scale);
  AUTOGLM_CHECK(p.window >= 0, invalid_argument, fn, "window={} must be >= 0", p.window);
}

/// The operands of Backend::plan_dispatch on device d: ids i32 [T, k]; counts [E], offsets
/// [E + 1], row_token (>= T k values) and slot_row (T k values) i32. (The ids' values are the
/// backend's to check.)
inline void expect_dispatch_io(std::string_view fn, const TensorView& ids, const TensorView& counts,
                               const TensorView& offsets, const TensorView& row_token,
                               const TensorView& slot_row, Device d) {
  expect_matrix(fn, "ids", ids, d, DType::i32);
  const std::int64_t pairs = ids.dim(0) * ids.dim(1);
  for (auto [name, v] : {std::pair{"counts", &counts},
                         {"offsets", &offsets},
                         {"row_token", &row_token},
                         {"slot_row", &slot_row}}) {
    expect_device(fn, name, *v, d);
    expect_dtype(fn, name, *v, DType::i32);
  }
  const std::int64_t E = counts.numel();
  AUTOGLM_CHECK(offsets.numel() == E + 1, shape_mismatch, fn, "offsets must hold {} values, got {}",
                E + 1, offsets.numel());
  AUTOGLM_CHECK(row_token.numel() >= pairs && slot_row.numel() == pairs, shape_mismatch, fn,
                "row_token and slot_row must hold {} values", pairs);
}

/// The operands of Backend::rms_norm on device d: x and out f32 [T, d] matrices of one shape,
/// weight f32 with d values, eps > 0.
inline void expect_rms_norm_io(std::string_view fn, const TensorView& x, const TensorView& weight,
                               float eps, const TensorView& out, Device d) {
  expect_matrix(fn, "x", x, d);
  expect_matrix(fn, "out", out, d);
  expect_same_shape(fn, "x", x, "out", out);
  expect_device(fn, "weight", weight, d);
  expect_dtype(fn, "weight", weight, DType::f32);
  AUTOGLM_CHECK(weight.numel() == x.dim(1), shape_mismatch, fn,
                "weight must hold {} values, got {}", x.dim(1), weight.numel());
  AUTOGLM_CHECK(eps > 0.0f, invalid_argument, fn, "eps={} must be > 0", eps);
}

/// The operands of Backend::add on device d: a, b and out f32 of one shape.
inline void expect_add_io(std::string_view fn, const TensorView& a, const TensorView& b,
                          const TensorView& out, Device d) {
  for (auto [name, v] : {std::pair{"a", &a}, {"b", &b}, {"out", &out}}) {
    expect_device(fn, name, *v, d);
    expect_dtype(fn, name, *v, DType::f32);
  }
  expect_same_shape(fn, "a", a, "b", b);
  expect_same_shape(fn, "a", a, "out", out);
}

/// The operands of Backend::add_scaled_rows on device d: x and out f32 [T, d] matrices of one
/// shape, scale f32 with T values.
inline void expect_add_scaled_rows_io(std::string_view fn, const TensorView& x,
                                      const TensorView& scale, const TensorView& out, Device d) {
  expect_matrix(fn, "x", x, d);
  expect_matrix(fn, "out", out, d);
  expect_same_shape(fn, "x", x, "out", out);
  expect_device(fn, "scale", scale, d);
  expect_dtype(fn, "scale", scale, DType::f32);
  AUTOGLM_CHECK(scale.numel() == x.dim(0), shape_mismatch, fn, "scale must hold {} values, got {}",
                x.dim(0), scale.numel());
}

/// The operands of Backend::qgemm on backend `self`: a [M, K] f32, w int8 [N, K], c [M, N].
inline void expect_qgemm_io(std::string_view fn, const TensorView& a, const QuantizedTensor& w,
                            const TensorView& c, const Backend* self, Device d) {
  expect_matrix(fn, "a", a, d);
  expect_matrix(fn, "c", c, d);
  AUTOGLM_CHECK(w.shape().rank() == 2, shape_mismatch, fn, "w must be [N, K], got {}",
                w.shape().str());
  AUTOGLM_CHECK(w.backend() == self || w.empty(), device, fn, "w is on another backend");
  AUTOGLM_CHECK(a.dim(1) == w.dim(1), shape_mismatch, fn, "a {} and w {} disagree on K",
                a.shape.str(), w.shape().str());
  expect_dim(fn, "c", c, 0, a.dim(0));
  expect_dim(fn, "c", c, 1, w.dim(0));
}

/// The operands of Backend::grouped_qgemm on backend `self`: w int8 [E, N, K], then as
/// expect_grouped_io.
inline void expect_grouped_qgemm_io(std::string_view fn, const TensorView& x,
                                    const QuantizedTensor& w, const TensorView& offsets,
                                    const TensorView& out, const Backend* self, Device d) {
  AUTOGLM_CHECK(w.shape().rank() == 3, shape_mismatch, fn, "w must be [E, N, K], got {}",
                w.shape().str());
  AUTOGLM_CHECK(w.backend() == self || w.empty(), device, fn, "w is on another backend");
  expect_grouped_io(fn, x, w.dim(0), w.dim(1), w.dim(2), offsets, out, d);
}

/// The operands of Backend::qembedding on backend `self`: table row-major int8 [V, d], ids i32
/// [T], out [T, d] (the ids' values are the backend's to check).
inline void expect_qembedding_io(std::string_view fn, const QuantizedTensor& table,
                                 const TensorView& ids, const TensorView& out, const Backend* self,
                                 Device d) {
  AUTOGLM_CHECK(table.shape().rank() == 2 && !table.is_packed(), invalid_argument, fn,
                "table must be a row-major int8 [V, d], got {}{}", table.shape().str(),
                table.is_packed() ? " (packed)" : "");
  AUTOGLM_CHECK(table.backend() == self, device, fn, "table is on another backend");
  AUTOGLM_CHECK(!table.has_col_scales(), unsupported, fn,
                "table {} has column scales; an int8 embedding table must have none",
                table.shape().str());
  expect_matrix(fn, "out", out, d);
  expect_device(fn, "ids", ids, d);
  expect_dtype(fn, "ids", ids, DType::i32);
  expect_dim(fn, "out", out, 0, ids.numel());
  expect_dim(fn, "out", out, 1, table.dim(1));
}

/// Validates RouteParams against E experts.
inline void check_route_params(std::string_view fn, const RouteParams& p, std::int64_t experts) {
  AUTOGLM_CHECK(p.top_k >= 1 && p.top_k <= experts, invalid_argument, fn,
                "top_k={} outside [1, num_experts={}]", p.top_k, experts);
  AUTOGLM_CHECK(p.n_group >= 1 && experts % p.n_group == 0, invalid_argument, fn,
                "n_group={} does not divide num_experts={}", p.n_group, experts);
  AUTOGLM_CHECK(p.topk_group >= 1 && p.topk_group <= p.n_group, invalid_argument, fn,
                "topk_group={} outside [1, n_group={}]", p.topk_group, p.n_group);
  AUTOGLM_CHECK(p.n_group == 1 || p.top_k <= p.topk_group * (experts / p.n_group), invalid_argument,
                fn, "top_k={} exceeds the {} experts of topk_group={} groups", p.top_k,
                p.topk_group * (experts / p.n_group), p.topk_group);
  AUTOGLM_CHECK(p.noise_std >= 0.0f && p.noise_std == p.noise_std, invalid_argument, fn,
                "noise_std={} must be >= 0", p.noise_std);
  AUTOGLM_CHECK(p.routed_scaling == p.routed_scaling, invalid_argument, fn,
                "routed_scaling is NaN");
  AUTOGLM_CHECK(p.renorm_epsilon >= 0.0f, invalid_argument, fn, "renorm_epsilon={} must be >= 0",
                p.renorm_epsilon);
}

/// The operands of Backend::route_topk: logits [T, E] f32, ids / weights [T, top_k] i32 / f32,
/// stats [E + 1] f32, bias [E] f32 or empty; and p against E.
inline void expect_route_topk_io(std::string_view fn, const TensorView& logits,
                                 const TensorView& bias, const RouteParams& p,
                                 const TensorView& ids, const TensorView& weights,
                                 const TensorView& stats, Device d) {
  expect_matrix(fn, "logits", logits, d);
  const std::int64_t T = logits.dim(0), E = logits.dim(1);
  check_route_params(fn, p, E);
  expect_matrix(fn, "ids", ids, d, DType::i32);
  expect_matrix(fn, "weights", weights, d);
  expect_dim(fn, "ids", ids, 0, T);
  expect_dim(fn, "ids", ids, 1, p.top_k);
  expect_same_shape(fn, "ids", ids, "weights", weights);
  expect_device(fn, "stats", stats, d);
  expect_dtype(fn, "stats", stats, DType::f32);
  AUTOGLM_CHECK(stats.numel() == E + 1, shape_mismatch, fn, "stats must hold {} values, got {}",
                E + 1, stats.numel());
  if (bias.empty()) return;
  expect_device(fn, "bias", bias, d);
  expect_dtype(fn, "bias", bias, DType::f32);
  AUTOGLM_CHECK(bias.numel() == E, shape_mismatch, fn, "bias must hold {} values, got {}", E,
                bias.numel());
}

}  // namespace autoglm::detail
