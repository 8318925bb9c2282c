// SPDX-License-Identifier: Apache-2.0
// INT8 GEMM kernels of the CPU backend: out[m, n] = x[m, :] . dequant(w[n, :]) for int8 weights
// with one f32 scale per (output row, group of `group` input columns); per-channel is
// group == k. Three paths, chosen at run time from the CPU's features (AVX-512 VNNI, with AMX
// tiles for W8A8 of >= 16 rows where the CPU and the OS allow them, AUTOGLM_Q8_AMX=0 to disable;
// AVX2, with 256-bit vpdpbusd for W8A8 where the CPU has AVX-VNNI, AUTOGLM_Q8_AVXVNNI=0 to
// disable; portable); every path reads the same packed weight layout, so weights are packed once.
#pragma once

#include <cstdint>
#include <string_view>

namespace autoglm::detail::q8 {

/// Instruction set of a kernel path.
enum class Isa : std::uint8_t { portable, avx2, avx512_vnni };

/// The best path this CPU runs (cpuid, cached); AUTOGLM_Q8_ISA=portable|avx2|avx512_vnni
/// lowers it.
Isa best_isa() noexcept;
/// Whether this CPU can run `isa`.
bool isa_supported(Isa isa) noexcept;
/// "portable", "avx2" or "avx512_vnni".
std::string_view isa_name(Isa isa) noexcept;

/// Output rows per packed panel.
inline constexpr std::int64_t kPanel = 16;
/// k rounded up to a multiple of 4 (the packed depth).
constexpr std::int64_t padded_depth(std::int64_t k) {
  return (k + 3) / 4 * 4;
}
/// n rounded up to whole panels.
constexpr std::int64_t padded_rows(std::int64_t n) {
  return (n + kPanel - 1) / kPanel * kPanel;
}

/// Bytes of one packed [n, k] matrix: padded_rows(n) * padded_depth(k).
std::int64_t packed_bytes(std::int64_t n, std::int64_t k);
/// Row-major int8 w [n, k] -> packed: panel p (rows 16p ... 16p+15), then k-quad q, then row r,
/// then 4 bytes: w[16p + r][4q + j] lands at ((p * kq + q) * 16 + r) * 4 + j, kq =
/// padded_depth(k) / 4. Rows past n and columns past k are zero.
void pack(const std::int8_t* w, std::int64_t n, std::int64_t k, std::int8_t* dst);
/// Inverse of pack: packed -> row-major [n, k].
void unpack(const std::int8_t* src, std::int64_t n, std::int64_t k, std::int8_t* w);

/// One packed matrix and its scales; `group` divides k (group == k: per-channel).
struct QWeights {
  const std::int8_t* data = nullptr;   ///< packed, packed_bytes(n, k)
  const float* scales = nullptr;       ///< [padded_rows(n), k / group], padding rows 0
  const std::int32_t* sums = nullptr;  ///< [padded_rows(n), k / group]: sum of w over the group
  std::int64_t n = 0;                  ///< output rows
  std::int64_t k = 0;                  ///< input columns
  std::int64_t group = 0;              ///< input columns per scale
};

/// sums[r, g] = sum of w[r, g*group ... (g+1)*group) for row-major w [n, k]; rows past n (up to
/// padded_rows(n)) get 0.
void group_sums(const std::int8_t* w, std::int64_t n, std::int64_t k, std::int64_t group,
                std::int32_t* sums);

/// W8A8 dynamic activations, one scale per (row, group of `group` columns; group divides k,
/// group == k: one per row): for each row i of x [m, k] (row stride ldx) and group g,
/// s = max|x[i, g's columns]| / 127, q = clamp(round_half_even(x / s), -127, 127) (all 0 when
/// s == 0), stored as q + 128 in xq[i * ldq ...] (ldq >= padded_depth(k); columns k ...
/// padded_depth(k) set to 128), and xs[i * (k / group) + g] = s. Per-group scales keep one
/// large activation from coarsening the rest of its row (as Q8_0's per-block activations do).
void quantize_activations(Isa isa, const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k,
                          std::int64_t group, std::uint8_t* xq, std::int64_t ldq, float* xs);

/// W8A8 tile, single-threaded, on activations quantized with w's group (xs [m, k / group]): for
/// i < m and columns j in [col0, col0 + cols) (col0 a multiple of kPanel, col0 + cols <= n):
///   out[i * ldo + (j - col0)] = sum_g f_g * (scales[j, g] * xs[i, g]),
///   f_g = float(sum_{c in g} (xq[i, c] - 128) * w[j, c])
/// with exact int32 sums per group (u8 x s8 products; the -128 through w's group sums), the
/// groups added in order with fused multiply-adds (bit-identical on every path).
void gemm_w8a8(Isa isa, const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
               const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
               std::int64_t ldo);

/// Weight-only tile, single-threaded, f32 activations x [m, k] (row stride ldx):
///   out[i * ldo + (j - col0)] = sum_g scales[j, g] * sum_{c in g} x[i, c] * float(w[j, c])
/// (f32 accumulation; the order of additions may differ between paths).
void gemm_wonly(Isa isa, const float* x, std::int64_t ldx, std::int64_t m, const QWeights& w,
                std::int64_t col0, std::int64_t cols, float* out, std::int64_t ldo);

}  // namespace autoglm::detail::q8
