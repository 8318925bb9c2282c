// SPDX-License-Identifier: Apache-2.0
// AMX-BF16 products against bf16 panel32 weights, for CpuBackendOptions::bf16_compute: the
// activations are rounded to bf16 (nearest even) and multiplied on AMX tiles with f32
// accumulation, as PyTorch's bf16 matmuls do. Built for baseline x86-64 plus the AMX / AVX-512
// flags of this file only, and used only when the CPU and Linux allow (amx_bf16_available, in
// the baseline-compiled qgemm_kernels.cpp). Like the int8 ISA files it instantiates no
// standard-library template (an out-of-line copy built with these flags could be the one the
// linker keeps for baseline callers): buffers come from the caller.
//
// The bf16 panel layout (gemm_kernels.hpp, bf16_panel_slot) stores each k step's 32 columns so
// that vpunpcklwd / vpunpckhwd of two consecutive steps give, in order, the (k, k+1) pairs of
// columns 0-15 and 16-31: exactly the rows of the two B tiles that TDPBF16PS wants. So a panel
// is re-packed for the tiles with one shuffle per 16 columns and 2 k.
#include "cpu/gemm_kernels.hpp"

#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstring>

#include "cpu/amx_tile.hpp"

namespace autoglm::detail {
namespace {

constexpr std::int64_t kTile = kAmxTileRows;  // rows of an A / C tile, columns of a B / C tile
constexpr std::int64_t kStepK = kAmxStepK;    // k per tile step (16 bf16 pairs = 64 bytes)
constexpr std::int64_t kPanel = 32;           // Layout::panel32 rows (kPanelRows)

inline std::int64_t imin(std::int64_t a, std::int64_t b) {
  return a < b ? a : b;
}
constexpr std::int64_t kAhead = 48;  // k steps (64-byte lines) of software prefetch

// tmm0-3 (C) and tmm4 (A) of `rows` rows (16, or m when one block holds all rows: no padding
// rows to zero and multiply); tmm5 (a second A tile with 16 rows, or with one block a third B
// tile) and tmm6-7 (B) of 16 rows; every tile row 64 bytes.
void configure(int rows) {
  AmxTileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = static_cast<std::uint8_t>(t >= 5 ? 16 : rows);
  }
  _tile_loadconfig(&c);
}

// x [m, k] f32 -> blocks of 16 rows, per tile step [16 rows][32 bf16], zero-padded in k and,
// in a last partial block of several, in rows.
void pack_a(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k, std::int64_t steps,
            std::uint16_t* dst) {
  const std::int64_t blocks = (m + kTile - 1) / kTile;
  if (blocks > 1 && m % kTile != 0) {
    std::uint16_t* last = dst + (blocks - 1) * steps * kTile * kStepK;
    for (std::int64_t s = 0; s < steps; ++s)
      std::memset(last + s * kTile * kStepK + (m % kTile) * kStepK, 0,
                  static_cast<std::size_t>((kTile - m % kTile) * kStepK) * 2);
  }
  for (std::int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    std::uint16_t* base = dst + (i / kTile) * steps * kTile * kStepK + (i % kTile) * kStepK;
    for (std::int64_t s = 0; s < steps; ++s) {
      const std::int64_t c0 = s * kStepK, n = imin(kStepK, k - c0);
      const __mmask16 lo = n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1u);
      const __mmask16 hi =
          n >= 32 ? 0xffff : (n <= 16 ? 0 : static_cast<__mmask16>((1u << (n - 16)) - 1u));
      const __m512 a = _mm512_maskz_loadu_ps(lo, xi + c0);
      const __m512 b = _mm512_maskz_loadu_ps(hi, xi + c0 + 16);
      // cvtne2ps2bf16(b, a): a's 16 values in the low half, b's in the high half.
      _mm512_storeu_si512(base + s * kTile * kStepK, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  }
}

// Steps [s0, s1) of one panel as B tiles: per step, 16 rows (pairs) x 16 columns for columns
// 0-15, then the same for 16-31 (2 KB per step), step s at dst + (s - s0) * 2 KB.
void pack_b(const std::uint16_t* panel, std::int64_t k, std::int64_t s0, std::int64_t s1,
            std::uint16_t* dst) {
  const __m512i zero = _mm512_setzero_si512();
  for (std::int64_t s = s0; s < s1; ++s) {
    std::uint16_t* t0 = dst + (s - s0) * 2 * kTile * kStepK;
    std::uint16_t* t1 = t0 + kTile * kStepK;
    for (std::int64_t r = 0; r < kTile; ++r) {
      const std::int64_t kk = s * kStepK + 2 * r;
      // The weights stream from memory once: fetch them kAhead steps ahead (past the end of
      // the panel is harmless: prefetches do not fault).
      _mm_prefetch(reinterpret_cast<const char*>(panel + (kk + kAhead) * kPanel), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(panel + (kk + kAhead + 1) * kPanel), _MM_HINT_T0);
      const __m512i w0 = kk < k ? _mm512_loadu_si512(panel + kk * kPanel) : zero;
      const __m512i w1 = kk + 1 < k ? _mm512_loadu_si512(panel + (kk + 1) * kPanel) : zero;
      _mm512_storeu_si512(t0 + r * kStepK, _mm512_unpacklo_epi16(w0, w1));
      _mm512_storeu_si512(t1 + r * kStepK, _mm512_unpackhi_epi16(w0, w1));
    }
  }
}

}  // namespace

void pack_a_bf16(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k,
                 std::uint16_t* dst) {
  pack_a(x, ldx, m, k, (k + kStepK - 1) / kStepK, dst);
}

void gemm_bf16_amx_tile(const std::uint16_t* ap, std::int64_t m, const std::uint16_t* wp,
                        std::int64_t k, std::int64_t panels, std::int64_t cols, float* out,
                        std::int64_t ldo, float alpha, float beta, std::uint16_t* bscratch,
                        float* cscratch) {
  if (m == 0 || cols == 0) return;
  const std::int64_t steps = (k + kStepK - 1) / kStepK;
  const std::int64_t blocks = (m + kTile - 1) / kTile;
  configure(blocks == 1 ? static_cast<int>(m) : static_cast<int>(kTile));
  const std::int64_t a_block = steps * kTile * kStepK;     // elements per 16-row block
  constexpr std::int64_t kStepElems = 2 * kTile * kStepK;  // one panel's B tiles of a step
  std::int64_t p = 0;
  // One row block: two panels at a time (four C tiles), so two weight streams are in flight,
  // as in the f32 kernels' few-rows path.
  for (; blocks == 1 && p + 1 < panels; p += 2) {
    const std::uint16_t* pa = wp + p * k * kPanel;
    const std::uint16_t* pb = pa + k * kPanel;
    auto pack = [&](std::int64_t st) {
      std::uint16_t* d = bscratch + (st & 1) * 2 * kStepElems;
      pack_b(pa, k, st, st + 1, d);
      pack_b(pb, k, st, st + 1, d + kStepElems);
    };
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    pack(0);
    for (std::int64_t st = 0; st < steps; ++st) {
      const std::uint16_t* b = bscratch + (st & 1) * 2 * kStepElems;
      _tile_loadd(4, ap + st * kTile * kStepK, 64);
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + kTile * kStepK, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, b + kStepElems, 64);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, b + kStepElems + kTile * kStepK, 64);
      _tile_dpbf16ps(3, 4, 6);
      if (st + 1 < steps) pack(st + 1);
    }
    // cbuf: m rows of 64 columns (panel p, then p + 1).
    _tile_stored(0, cscratch, 256);
    _tile_stored(1, cscratch + 16, 256);
    _tile_stored(2, cscratch + 32, 256);
    _tile_stored(3, cscratch + 48, 256);
    const std::int64_t c0 = p * kPanel, cn = imin(2 * kPanel, cols - c0);
    for (std::int64_t i = 0; i < m; ++i) {
      const float* c = cscratch + i * 64;
      float* o = out + i * ldo + c0;
      for (std::int64_t j = 0; j < cn; ++j)
        o[j] = beta == 0.0f ? alpha * c[j] : alpha * c[j] + beta * o[j];
    }
  }
  for (; p < panels; ++p) {
    const std::uint16_t* panel = wp + p * k * kPanel;
    const std::int64_t c0 = p * kPanel, cn = imin(kPanel, cols - c0);
    // Up to 32 rows, the panel's B tiles are built a step at a time into an L1-resident 2 KB
    // buffer right before they are used; with more rows the whole panel is built once and
    // every row pair reads it.
    const bool whole = blocks > 2;
    if (whole) pack_b(panel, k, 0, steps, bscratch);
    for (std::int64_t rb = 0; rb < blocks; rb += 2) {
      const bool two = rb + 1 < blocks;
      const std::uint16_t* a0 = ap + rb * a_block;
      const std::uint16_t* a1 = a0 + a_block;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      // Step by step, the next step's tiles are built (other half of the buffer) while the
      // tile unit multiplies this step's.
      if (!whole) pack_b(panel, k, 0, 1, bscratch);
      for (std::int64_t s = 0; s < steps; ++s) {
        const std::uint16_t* b = bscratch + (whole ? s : s & 1) * 2 * kTile * kStepK;
        _tile_loadd(6, b, 64);
        _tile_loadd(7, b + kTile * kStepK, 64);
        _tile_loadd(4, a0 + s * kTile * kStepK, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, a1 + s * kTile * kStepK, 64);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        if (!whole && s + 1 < steps)
          pack_b(panel, k, s + 1, s + 2, bscratch + ((s + 1) & 1) * 2 * kTile * kStepK);
      }
      // cbuf: rows 0-15 then 16-31 of this block pair, 32 columns each.
      _tile_stored(0, cscratch, 128);
      _tile_stored(1, cscratch + 16, 128);
      if (two) {
        _tile_stored(2, cscratch + 16 * 32, 128);
        _tile_stored(3, cscratch + 16 * 32 + 16, 128);
      }
      const std::int64_t r0 = rb * kTile, rn = imin(2 * kTile, m - r0);
      for (std::int64_t i = 0; i < rn; ++i) {
        const float* c = cscratch + i * 32;
        float* o = out + (r0 + i) * ldo + c0;
        for (std::int64_t j = 0; j < cn; ++j)
          o[j] = beta == 0.0f ? alpha * c[j] : alpha * c[j] + beta * o[j];
      }
    }
  }
  // No _tile_release(): it cost ~15 % at one token (the tile state would be set up again by
  // the next tile of the next call); every call loads its own configuration first, so a
  // thread's leftover state, ours or the int8 kernel's, does no harm.
}

// ---------------------------------------------------------------------------------------------
// Without AMX (e.g. AMD Zen 4): the same products with AVX512_BF16's VDPBF16PS, which takes a
// (k, k+1) pair of bf16 per 32-bit lane, exactly what vpunpck[lh]wd of two panel steps gives.
// The A operand is pack_a_bf16's, read a 32-bit pair at a time.

namespace {

inline std::uint32_t load_pair(const std::uint16_t* p) {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Rows [r0, r0 + MR) of the tile against one panel (cn <= 32 columns), over all of k.
template <int MR>
void dp_rows(const std::uint16_t* ap, std::int64_t a_block, std::int64_t r0,
             const std::uint16_t* panel, std::int64_t k, std::int64_t cn, float* out,
             std::int64_t ldo, float alpha, float beta) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const std::uint16_t* rows[MR];
  for (int i = 0; i < MR; ++i) {
    const std::int64_t r = r0 + i;
    rows[i] = ap + (r / kTile) * a_block + (r % kTile) * kStepK;
  }
  const __m512i zero = _mm512_setzero_si512();
  for (std::int64_t kk = 0; kk < k; kk += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + (kk + kAhead) * kPanel), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(panel + (kk + kAhead + 1) * kPanel), _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(panel + kk * kPanel);
    const __m512i w1 = kk + 1 < k ? _mm512_loadu_si512(panel + (kk + 1) * kPanel) : zero;
    const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(w0, w1);
    const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(w0, w1);
    // Pair kk of a row: step kk / 32, offset kk % 32 within the step's 32 values.
    const std::int64_t at = kk / kStepK * kTile * kStepK + kk % kStepK;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(rows[i] + at)));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, lo);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, hi);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int h = 0; h < 2; ++h) {
    const std::int64_t c0 = 16 * h;
    if (c0 >= cn) break;
    const std::int64_t cnt = imin(16, cn - c0);
    const __mmask16 mask = static_cast<__mmask16>(cnt == 16 ? 0xffffu : (1u << cnt) - 1u);
    for (int i = 0; i < MR; ++i) {
      float* o = out + (r0 + i) * ldo + c0;
      __m512 r = _mm512_mul_ps(va, acc[i][h]);
      if (beta != 0.0f) r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask, o), r);
      _mm512_mask_storeu_ps(o, mask, r);
    }
  }
}

// dp_rows for 1 ... 8 rows, indexed by rows - 1.
using DpRowsFn = void (*)(const std::uint16_t*, std::int64_t, std::int64_t, const std::uint16_t*,
                          std::int64_t, std::int64_t, float*, std::int64_t, float, float);
constexpr DpRowsFn kDpRows[] = {dp_rows<1>, dp_rows<2>, dp_rows<3>, dp_rows<4>,
                                dp_rows<5>, dp_rows<6>, dp_rows<7>, dp_rows<8>};

}  // namespace

void gemm_bf16_dp_tile(const std::uint16_t* ap, std::int64_t m, const std::uint16_t* wp,
                       std::int64_t k, std::int64_t panels, std::int64_t cols, float* out,
                       std::int64_t ldo, float alpha, float beta) {
  if (m == 0 || cols == 0) return;
  const std::int64_t a_block = (k + kStepK - 1) / kStepK * kTile * kStepK;
  constexpr std::int64_t kRows = 8;  // 16 accumulators, 2 weight vectors, a broadcast
  for (std::int64_t p = 0; p < panels; ++p) {
    const std::uint16_t* panel = wp + p * k * kPanel;
    const std::int64_t c0 = p * kPanel, cn = imin(kPanel, cols - c0);
    for (std::int64_t r0 = 0; r0 < m; r0 += kRows) {
      kDpRows[imin(kRows, m - r0) - 1](ap, a_block, r0, panel, k, cn, out + c0, ldo, alpha, beta);
    }
  }
}

}  // namespace autoglm::detail

#else  // not x86-64: amx_bf16_available() is false, so these are never called

namespace autoglm::detail {
void pack_a_bf16(const float*, std::int64_t, std::int64_t, std::int64_t, std::uint16_t*) {}
void gemm_bf16_amx_tile(const std::uint16_t*, std::int64_t, const std::uint16_t*, std::int64_t,
                        std::int64_t, std::int64_t, float*, std::int64_t, float, float,
                        std::uint16_t*, float*) {}
void gemm_bf16_dp_tile(const std::uint16_t*, std::int64_t, const std::uint16_t*, std::int64_t,
                       std::int64_t, std::int64_t, float*, std::int64_t, float, float) {}
}  // namespace autoglm::detail

#endif
