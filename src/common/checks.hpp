// SPDX-License-Identifier: Apache-2.0
// Argument validation shared by every backend: one place says what a primitive accepts.
#pragma once

#include <string_view>

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
