// SPDX-License-Identifier: Apache-2.0
// FP32 GEMM kernels of the CPU backend: out[m, n] = alpha * x[m, k] * w[n, k]^T + beta * out,
// with w either row-major f32 (the Hugging Face [out, in] layout) or in Layout::panel32 as f32,
// bf16 or f16 (16-bit weights are widened exactly inside the kernel; compute is f32).
#pragma once

#include <cstdint>

#include "autoglm/core/dtype.hpp"

namespace autoglm::detail {

/// Rows per packed block of x for m rows: m itself up to 6, else at most 12, as even as the
/// 12-row block count allows.
std::int64_t pack_block_rows(std::int64_t m);
/// Floats pack_x writes for m rows of depth k.
std::int64_t packed_x_size(std::int64_t m, std::int64_t k);
/// Packs x [m, k] (row stride ldx) into blocks of pack_block_rows(m) rows stored [k][rows],
/// zero-padded; block b starts at dst + b * pack_block_rows(m) * k.
void pack_x(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k, float* dst);

/// True when gemm_panel_tile has a vector kernel for panels of dtype dt (f32 always with
/// AVX-512; bf16 needs AVX512BW's word shuffles, f16 AVX-512F's vcvtph2ps).
bool panel_kernel_reads(DType dt) noexcept;

/// Output tile against panel32 weights: xp from pack_x of a matrix whose blocks have mr rows
/// (pack_block_rows of its whole row count, which a tile of fewer rows may not share), m rows of
/// it starting on a block; wp the first of `panels` panels of depth k with elements of wdt (f32,
/// bf16 or f16), `cols` valid output columns (<= 32 * panels).
void gemm_panel_tile(const float* xp, std::int64_t m, std::int64_t mr, const void* wp, DType wdt,
                     std::int64_t k, std::int64_t panels, std::int64_t cols, float* out,
                     std::int64_t ldo, float alpha, float beta);

/// Output tile against row-major weights w [n, k] (row stride ldw).
void gemm_nt_tile(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, float* out,
                  std::int64_t ldo, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                  float beta);

/// Where panel row r (0..31) sits within one k step of a bf16 panel: the kernel widens a 64-byte
/// step with vpunpcklwd / vpunpckhwd, which take words 0-3 and 4-7 of each 128-bit lane, so
/// rows 0-15 go to those low words and rows 16-31 to the high ones. f32 and f16 panels keep
/// rows in order.
constexpr int bf16_panel_slot(int r) noexcept {
  return (r % 16) / 4 * 8 + r % 4 + (r >= 16 ? 4 : 0);
}

/// Whether this CPU and OS run the AMX-BF16 kernels below (AVX-512 with VNNI, AVX512_BF16,
/// AMX-TILE, AMX-BF16, Linux's tile grant); decided once, in baseline code.
bool amx_bf16_available() noexcept;
/// Whether this CPU and OS run gemm_bf16_dp_tile (AVX-512 with VNNI, and AVX512_BF16).
bool avx512_bf16_available() noexcept;
/// Rows of an AMX tile, and k per tile step.
inline constexpr std::int64_t kAmxTileRows = 16, kAmxStepK = 32;
/// Elements pack_a_bf16 writes for m rows of depth k (16-row blocks, k padded to 32).
constexpr std::int64_t amx_packed_a_size(std::int64_t m, std::int64_t k) {
  return (m + kAmxTileRows - 1) / kAmxTileRows * kAmxTileRows * ((k + kAmxStepK - 1) / kAmxStepK) *
         kAmxStepK;
}
/// Per-thread scratch of gemm_bf16_amx_tile: B tiles (elements) and C tiles (floats).
constexpr std::int64_t amx_b_scratch_size(std::int64_t m, std::int64_t k) {
  return ((m + kAmxTileRows - 1) / kAmxTileRows > 2 ? (k + kAmxStepK - 1) / kAmxStepK : 4) * 2 *
         kAmxTileRows * kAmxStepK;
}
inline constexpr std::int64_t kAmxCScratch = 4 * kAmxTileRows * kAmxTileRows;
/// x [m, k] f32 (row stride ldx) rounded to bf16 (nearest even) into AMX A-tile blocks:
/// per 16 rows, per 32-deep step, [16 rows][32], zero-padded in rows and k.
void pack_a_bf16(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k,
                 std::uint16_t* dst);
/// Output tile against bf16 panel32 weights on AMX tiles: ap from pack_a_bf16 (m rows starting
/// on a 16-row block), wp the first of `panels` bf16 panels of depth k, `cols` valid output
/// columns; scratch of amx_b_scratch_size(m, k) and kAmxCScratch. Each output row depends on
/// its own x row only, in a fixed order.
void gemm_bf16_amx_tile(const std::uint16_t* ap, std::int64_t m, const std::uint16_t* wp,
                        std::int64_t k, std::int64_t panels, std::int64_t cols, float* out,
                        std::int64_t ldo, float alpha, float beta, std::uint16_t* bscratch,
                        float* cscratch);

/// gemm_bf16_amx_tile's product with AVX512_BF16 dot products instead of AMX tiles (CPUs
/// without AMX): same operands, same rounding of x, f32 accumulation in pairs of k.
void gemm_bf16_dp_tile(const std::uint16_t* ap, std::int64_t m, const std::uint16_t* wp,
                       std::int64_t k, std::int64_t panels, std::int64_t cols, float* out,
                       std::int64_t ldo, float alpha, float beta);

/// Row-major [n, k] -> panel32 of the same dtype dt (f32, bf16 or f16; rows past n zero).
void to_panels(const void* src, DType dt, std::int64_t n, std::int64_t k, void* dst);
/// panel32 -> row-major [n, k], same dtype.
void from_panels(const void* src, DType dt, std::int64_t n, std::int64_t k, void* dst);
/// panel32 of dtype dt -> row-major f32 [n, k] (exact).
void panels_to_f32(const void* src, DType dt, std::int64_t n, std::int64_t k, float* dst);

}  // namespace autoglm::detail
