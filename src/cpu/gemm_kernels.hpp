// SPDX-License-Identifier: Apache-2.0
// FP32 GEMM kernels of the CPU backend: out[m, n] = alpha * x[m, k] * w[n, k]^T + beta * out,
// with w either row-major (the Hugging Face [out, in] layout) or in Layout::panel32.
#pragma once

#include <cstdint>

namespace autoglm::detail {

/// Rows per packed block of x for m rows: m itself up to 6, else 12.
std::int64_t pack_block_rows(std::int64_t m);
/// Floats pack_x writes for m rows of depth k.
std::int64_t packed_x_size(std::int64_t m, std::int64_t k);
/// Packs x [m, k] (row stride ldx) into blocks of pack_block_rows(m) rows stored [k][rows],
/// zero-padded; block b starts at dst + b * pack_block_rows(m) * k.
void pack_x(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k, float* dst);

/// Output tile against panel32 weights: xp from pack_x (m rows, starting on a block), wp the
/// first of `panels` panels of depth k, `cols` valid output columns (<= 32 * panels).
void gemm_panel_tile(const float* xp, std::int64_t m, const float* wp, std::int64_t k,
                     std::int64_t panels, std::int64_t cols, float* out, std::int64_t ldo,
                     float alpha, float beta);

/// Output tile against row-major weights w [n, k] (row stride ldw).
void gemm_nt_tile(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, float* out,
                  std::int64_t ldo, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                  float beta);

/// Row-major [n, k] -> panel32 (rows past n zero).
void to_panels(const float* src, std::int64_t n, std::int64_t k, float* dst);
/// panel32 -> row-major [n, k].
void from_panels(const float* src, std::int64_t n, std::int64_t k, float* dst);

}  // namespace autoglm::detail
