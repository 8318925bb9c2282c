// SPDX-License-Identifier: Apache-2.0
// Kernel launchers of the CUDA backend, compiled by nvcc (kernels_*.cu) and called from the
// host-compiled backend (cuda_backend*.cpp). Plain types only: the host side validates every
// argument first, so launchers assume valid shapes, and each kernel still bounds-checks every
// index it reads from device memory so that an unchecked bad id cannot fault. Every launcher
// enqueues on `stream` and returns at once; the caller checks cudaGetLastError.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "host_plan.hpp"

namespace autoglm::cuda_kernels {

using i64 = std::int64_t;

/// Element type codes, equal to autoglm::DType's f32, f16, bf16.
enum FloatCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---------------------------------------------------------------- memory (kernels_core.cu)
void convert(const void* src, int src_code, void* dst, int dst_code, i64 n, cudaStream_t s);
void fill(float* p, i64 n, float value, cudaStream_t s);
/// p[i] = scale * uniform_pm1(seed, i): the CPU's counter-based generator, bit for bit.
void fill_uniform(float* p, i64 n, std::uint64_t seed, float scale, cudaStream_t s);
/// p *= beta (beta == 0: p = 0, ignoring NaN in p).
void scale(float* p, i64 n, float beta, cudaStream_t s);

// first: one u64 preset to all ones; atomically lowered to the smallest failing index.
/// Smallest index i with a non-finite p[i].
void find_nonfinite(const float* p, i64 n, unsigned long long* first, cudaStream_t s);
/// Smallest index i with p[i] outside [lo, hi] (both inclusive).
void find_out_of_range(const std::int32_t* p, i64 n, std::int32_t lo, std::int32_t hi,
                       unsigned long long* first, cudaStream_t s);

// ---------------------------------------------------------------- routing (kernels_core.cu)
/// RouteParams in plain types.
struct RouteArgs {
  int sigmoid;  ///< 0: softmax scores, 1: sigmoid scores
  int top_k;
  int renormalize;
  float renorm_epsilon;
  float routed_scaling;
  int n_group;
  int topk_group;
  int mask_neg_inf;  ///< 1: discarded groups -inf, 0: 0.0
  float noise_std;
  std::uint64_t seed;
};
// partial: [T, E + 1] per-token statistics, reduced by reduce_columns.
/// Token-choice routing, one block per token (shared bytes from route_topk_shared_bytes).
void route_topk(const float* logits, const float* bias, i64 T, i64 E, const RouteArgs& a,
                std::int32_t* ids, float* weights, float* partial, std::size_t shared_bytes,
                cudaStream_t s);
/// partial[t, 0..E) = softmax(logits[t]), partial[t, E] = logsumexp(logits[t])^2.
void softmax_stats(const float* logits, i64 T, i64 E, float* partial, cudaStream_t s);
/// Expert choice from the probabilities in partial (row stride E + 1): expert e takes the C
/// tokens ranked highest (ties: lower token); ids/weights [T, E] list each token's experts in
/// expert order, then -1 / 0.
void expert_choice_select(const float* partial, i64 T, i64 E, i64 C, std::int32_t* ids,
                          float* weights, cudaStream_t s);
/// out[c] = sum over rows r of partial[r, c], c < cols, in a fixed (deterministic) order.
void reduce_columns(const float* partial, i64 rows, i64 cols, float* out, cudaStream_t s);

// ---------------------------------------------------------------- dispatch (kernels_core.cu)
/// counts[e] = min(pairs of e, cap); slot_row[i] = rank of pair i among e's pairs in
/// slot-major order if kept, else -1 (ids == -1 too). E + 1 blocks.
void dispatch_rank(const std::int32_t* ids, i64 T, i64 k, i64 E, i64 cap, std::int32_t* counts,
                   std::int32_t* slot_row, cudaStream_t s);
/// offsets = exclusive prefix sum of counts (E + 1 values).
void dispatch_offsets(const std::int32_t* counts, i64 E, std::int32_t* offsets, cudaStream_t s);
/// slot_row[i] += offsets[ids[i]] for kept pairs; row_token[slot_row[i]] = i / k.
void dispatch_place(const std::int32_t* ids, i64 n, i64 k, const std::int32_t* offsets,
                    std::int32_t* slot_row, std::int32_t* row_token, cudaStream_t s);
/// out[r] = x[row_token[r]] (rows of d floats; x has T rows).
void gather_rows(const float* x, i64 T, const std::int32_t* row_token, i64 R, i64 d, float* out,
                 cudaStream_t s);
/// out[t] (+)= sum_j w[t, j] * y[slot_row[t, j]] in slot order.
void combine(const float* y, i64 R, const std::int32_t* slot_row, const float* w, i64 T, i64 k,
             i64 d, float* out, bool accumulate, cudaStream_t s);

// ---------------------------------------------------------------- elementwise (kernels_ops.cu)
void silu_mul(const float* in, i64 R, i64 F, float* out, cudaStream_t s);
void gelu(const float* in, float* out, i64 n, cudaStream_t s);
void softmax_rows(float* x, i64 rows, i64 n, cudaStream_t s);
void rms_norm(const float* x, const float* w, i64 T, i64 d, float eps, float* out, cudaStream_t s);
void add(const float* a, const float* b, float* out, i64 n, cudaStream_t s);
void add_scaled_rows(const float* x, const float* scale, bool sigmoid, i64 T, i64 d, float* out,
                     cudaStream_t s);
void embedding(const float* table, i64 V, const std::int32_t* ids, i64 T, i64 d, float* out,
               cudaStream_t s);
void add_bias(const float* x, const float* bias, i64 R, i64 N, float* out, cudaStream_t s);
void clamp(float* x, i64 n, float lo, float hi, cudaStream_t s);
/// dst[r, dst_col + j] = src[r / g, src_col + j], elements of `elem` bytes (1, 2 or 4).
void copy_columns(const void* src, i64 Cs, i64 src_col, void* dst, i64 Rd, i64 Cd, i64 dst_col,
                  i64 width, i64 g, int elem, cudaStream_t s);
/// Rotary embedding in place on x [T, H, D], dimensions [offset, offset + r) of each head.
void rope(float* x, const std::int32_t* pos, const float* inv_freq, i64 T, i64 H, i64 D, i64 offset,
          i64 r, bool interleaved, float attention_factor, cudaStream_t s);
/// Grouped-query attention, one block of `warps` warps per (query, head), online softmax.
void attention(const float* q, const float* k, const float* v, const std::int32_t* pos, i64 T,
               i64 Hq, i64 S, i64 Hkv, i64 D, i64 Dv, float scale, bool causal, i64 window,
               float* out, std::uint32_t warps, std::size_t shared_bytes, cudaStream_t s);

// ---------------------------------------------------------------- int8 (kernels_ops.cu)
/// One row-major int8 matrix [n, k] with its f32 scales [n, groups], `group` columns per
/// scale (k per channel).
struct QMatrix {
  const std::int8_t* data;
  const float* scales;
  i64 n, k, group, groups;
};
/// W8A8 activations, one block per (row, group of `group` columns) of x [m, k], G = k / group:
/// xs[i * G + g] = max|x[i, g's columns]| / 127 and xq[i, c] = clamp(round_half_even(x[i, c] /
/// xs[i * G + g]), -127, 127) (0 when the scale is 0), columns k ... ldq zero -- the CPU's
/// quantize_activations less its +128 offset.
void quantize_activations(const float* x, i64 m, i64 k, i64 group, std::int8_t* xq, i64 ldq,
                          float* xs, cudaStream_t s);
// out: [m, w.n] row-major (row stride w.n); x: [m, w.k]; plan from cuda_detail::plan_qgemm.
/// Weight-only: out[i, j] = sum_g scale[j, g] * sum_{c in g} x[i, c] * w[j, c], f32 sums.
void qgemm_weight_only(const float* x, i64 m, const QMatrix& w, float* out,
                       const cuda_detail::QGemmPlan& plan, cudaStream_t s);
/// W8A8 on quantize_activations' output (row stride ldq; xs [m, w.groups]): out[i, j] =
/// sum_g (scale[j, g] * xs[i, g]) * (exact int32 sum over g of xq[i, c] * w[j, c]).
void qgemm_w8a8(const std::int8_t* xq, i64 ldq, const float* xs, i64 m, const QMatrix& w,
                float* out, const cuda_detail::QGemmPlan& plan, cudaStream_t s);
/// out[r, c] = x[r, c] * col_scale[c] for r < rows: the activations of an equalised int8 matrix.
void scale_columns(const float* x, i64 rows, i64 k, const float* col_scale, float* out,
                   cudaStream_t s);
/// out[t, c] = float(table[ids[t], c]) * scale[ids[t], c / group] (0 for an id outside [0, V)).
void qembedding(const QMatrix& table, const std::int32_t* ids, i64 T, float* out, cudaStream_t s);

}  // namespace autoglm::cuda_kernels
