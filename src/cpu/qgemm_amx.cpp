// SPDX-License-Identifier: Apache-2.0
// AMX-INT8 variant of the W8A8 kernel, used inside the avx512_vnni path when the CPU has AMX
// and the shape suits tiles (see amx_applies). The packed layout is already what a B tile
// wants: 16 consecutive k-quads of a panel are 16 rows of 64 bytes (16 columns x 4 bytes), so
// weight tiles load straight from the packed matrix with a 64-byte stride.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstring>

#include "cpu/amx_tile.hpp"
#include "cpu/qgemm_isa.hpp"

namespace autoglm::detail::q8::impl {
namespace {

constexpr std::int64_t kTileRows = 16;  // rows of an A / C tile
constexpr std::int64_t kTileK = 64;     // k bytes per tile step
constexpr std::int64_t kKcSteps = 64;   // tile steps per k block (4 KB of k)

inline std::int64_t imin(std::int64_t a, std::int64_t b) {
  return a < b ? a : b;
}

inline __mmask16 col_mask(std::int64_t valid) {
  if (valid >= 16) return 0xffff;
  if (valid <= 0) return 0;
  return static_cast<__mmask16>((1u << valid) - 1u);
}

// Tiles (AmxTileConfig): tmm0-3 C (16 x 16 i32), tmm4-5 A (16 x 64 u8), tmm6-7 B (16 quads x
// 64 s8).

struct Block {
  const std::uint8_t* a0;  // A rows i0 ... i0 + 15 at column 0 (stride lda)
  const std::uint8_t* a1;  // A rows i0 + 16 ... (when two row tiles)
  std::int64_t lda;
  const std::int8_t* b0;   // panel p at quad 0
  const std::int8_t* b1;   // panel p + 1
  std::int64_t s0;         // first tile step of k of this k block
  std::int64_t seg, nseg;  // steps per segment (a group or a piece of one), segments
  std::int64_t g0;         // group of the first segment
  std::int64_t groups;     // groups in k
  bool from_carry;         // the first segment continues a group kept in carry
  bool to_carry;           // the last segment stops inside a group
  std::int32_t* carry;     // i32 partial sums, row i0, panel p (row stride ldc)
  std::int64_t ldc;
  const float* sc[2];  // transposed scales of both panels, group 0
  const std::int32_t* ns[2];
  float* out;  // row i0, panel p's first column
  std::int64_t ldo;
  const float* xs;    // activation scales of row i0, group 0 (row stride `groups`)
  std::int64_t rows;  // valid rows in this block (<= 32)
  __mmask16 mask[2];
};

// The scaling of a finished block (its C tiles stored in cbuf: tile (r, t) at 512 r + 256 t)
// into out. It runs a few rows at a time between the next block's tile steps, so the vector
// units convert and scale while the AMX unit multiplies.
struct Pending {
  const std::int32_t* cbuf = nullptr;
  float* out = nullptr;
  std::int64_t ldo = 0;
  const float* xs = nullptr;  // activation scales of the block's first row, its group
  std::int64_t xstride = 0;   // elements between rows in xs
  const std::int32_t* ns[2] = {};
  const float* sc[2] = {};
  __mmask16 mask[2] = {};
  int panels = 0;
  bool first = false;
  std::int64_t rows = 0, done = 0;
};

inline void drain(Pending& p, std::int64_t n) {
  const std::int64_t end = imin(p.rows, p.done + n);
  for (std::int64_t i = p.done; i < end; ++i) {
    const std::int32_t* c = p.cbuf + (i / 16) * 512 + (i % 16) * 16;
    for (int t = 0; t < p.panels; ++t) {
      float* o = p.out + i * p.ldo + 16 * t;
      const __m512 f = _mm512_cvtepi32_ps(
          _mm512_add_epi32(_mm512_loadu_si512(c + 256 * t), _mm512_loadu_si512(p.ns[t])));
      // The weight scales times this row's activation scale of the group.
      const __m512 st =
          _mm512_mul_ps(_mm512_loadu_ps(p.sc[t]), _mm512_set1_ps(p.xs[i * p.xstride]));
      const __m512 v = p.first ? _mm512_mul_ps(f, st)
                               : _mm512_fmadd_ps(f, st, _mm512_maskz_loadu_ps(p.mask[t], o));
      _mm512_mask_storeu_ps(o, p.mask[t], v);
    }
  }
  p.done = end;
}

template <bool TwoA, bool TwoB>
void amx_block(const Block& b, std::int32_t* cbufs, Pending& pend, int& parity) {
  const std::int64_t ldc_bytes = b.ldc * 4;
  std::int32_t* c1 = b.carry + 16 * b.ldc;  // second row tile's carry
  // Rows of the pending scaling per tile step: all of it within one segment where possible.
  const std::int64_t per_step = (2 * kTileRows + b.seg - 1) / b.seg;
  for (std::int64_t s = 0; s < b.nseg; ++s) {
    if (s == 0 && b.from_carry) {
      _tile_loadd(0, b.carry, ldc_bytes);
      if (TwoB) _tile_loadd(1, b.carry + 16, ldc_bytes);
      if (TwoA) _tile_loadd(2, c1, ldc_bytes);
      if (TwoA && TwoB) _tile_loadd(3, c1 + 16, ldc_bytes);
    } else {
      _tile_zero(0);
      if (TwoB) _tile_zero(1);
      if (TwoA) _tile_zero(2);
      if (TwoA && TwoB) _tile_zero(3);
    }
    const std::int64_t st = b.s0 + s * b.seg;
    for (std::int64_t k = st; k < st + b.seg; ++k) {
      _tile_loadd(4, b.a0 + k * kTileK, b.lda);
      _tile_loadd(6, b.b0 + k * 16 * 64, 64);
      if (TwoB) _tile_loadd(7, b.b1 + k * 16 * 64, 64);
      _tile_dpbusd(0, 4, 6);
      if (TwoB) _tile_dpbusd(1, 4, 7);
      if (TwoA) {
        _tile_loadd(5, b.a1 + k * kTileK, b.lda);
        _tile_dpbusd(2, 5, 6);
        if (TwoB) _tile_dpbusd(3, 5, 7);
      }
      if (pend.done < pend.rows) drain(pend, per_step);
    }
    if (s == b.nseg - 1 && b.to_carry) {
      _tile_stored(0, b.carry, ldc_bytes);
      if (TwoB) _tile_stored(1, b.carry + 16, ldc_bytes);
      if (TwoA) _tile_stored(2, c1, ldc_bytes);
      if (TwoA && TwoB) _tile_stored(3, c1 + 16, ldc_bytes);
      continue;
    }
    drain(pend, pend.rows);
    std::int32_t* cb = cbufs + parity * 1024;
    parity ^= 1;
    _tile_stored(0, cb, 64);
    if (TwoB) _tile_stored(1, cb + 256, 64);
    if (TwoA) _tile_stored(2, cb + 512, 64);
    if (TwoA && TwoB) _tile_stored(3, cb + 768, 64);
    const std::int64_t g = b.g0 + s;
    pend.cbuf = cb;
    pend.out = b.out;
    pend.ldo = b.ldo;
    pend.xs = b.xs + g;
    pend.xstride = b.groups;
    pend.panels = TwoB ? 2 : 1;
    for (int t = 0; t < 2; ++t) {
      pend.ns[t] = b.ns[t] + g * 16;
      pend.sc[t] = b.sc[t] + g * 16;
      pend.mask[t] = b.mask[t];
    }
    pend.first = g == 0;
    pend.rows = b.rows;
    pend.done = 0;
  }
}

}  // namespace

void gemm_w8a8_amx(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
                   const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
                   std::int64_t ldo) {
  const std::int64_t kq = padded_depth(w.k) / 4, ng = w.k / w.group;
  const std::int64_t panels = (cols + kPanel - 1) / kPanel;
  const std::int64_t pstride = kq * 64;
  const std::int64_t kp = kq * 4;
  const std::int64_t ns_elems = panels * ng * kPanel;
  const std::int64_t tail = m % kTileRows;  // rows of the last, partial A tile
  const std::int64_t ldc = panels * kPanel;
  const std::int64_t carry_elems = (m + 2 * kTileRows) * ldc;  // whole tiles of rows
  auto* base = static_cast<char*>(scratch(
      static_cast<std::size_t>(8192 + 2 * ns_elems * 4 + carry_elems * 4 + kTileRows * kp + 64)));
  auto* cbuf = reinterpret_cast<std::int32_t*>(base);
  auto* sct = reinterpret_cast<float*>(base + 8192);
  auto* nst = reinterpret_cast<std::int32_t*>(base + 8192 + ns_elems * 4);
  auto* carry = reinterpret_cast<std::int32_t*>(base + 8192 + 2 * ns_elems * 4);
  auto* apad = reinterpret_cast<std::uint8_t*>(base + 8192 + 2 * ns_elems * 4 + carry_elems * 4);
  transpose_scales(w, col0, panels, sct, nst);
  // A tile loads read 16 rows: the last partial tile reads a copy padded with zero activations.
  if (tail != 0) {
    const std::int64_t t0 = m - tail;
    for (std::int64_t i = 0; i < kTileRows; ++i) {
      if (i < tail)
        std::memcpy(apad + i * kp, xq + (t0 + i) * ldq, static_cast<std::size_t>(kp));
      else
        std::memset(apad + i * kp, 128, static_cast<std::size_t>(kp));
    }
  }
  struct Rows {
    const std::uint8_t* p;
    std::int64_t ld;
  };
  auto a_rows = [&](std::int64_t i) {
    if (tail != 0 && i >= m - tail) return Rows{apad + (i - (m - tail)) * kp, kp};
    return Rows{xq + i * ldq, ldq};
  };

  AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  Pending pend;
  int parity = 0;
  const std::int8_t* wbase = w.data + (col0 / kPanel) * pstride;
  const std::int64_t steps = kp / kTileK, gs = w.group / kTileK;
  // k blocks keep the tile's weights for the block (cols x kc bytes) and a row block's
  // activations (32 x kc) in L2 while every row block and panel pair uses them; a group longer
  // than a block carries its i32 sums to the next block through `carry`.
  const bool split = gs > kKcSteps;
  const std::int64_t blk = split ? kKcSteps : kKcSteps / gs * gs;
  for (std::int64_t s0 = 0; s0 < steps;) {
    Block b{};
    std::int64_t s1;
    if (split) {
      const std::int64_t gend = (s0 / gs + 1) * gs;
      s1 = imin(s0 + blk, gend);
      b.seg = s1 - s0;
      b.nseg = 1;
      b.from_carry = s0 % gs != 0;
      b.to_carry = s1 != gend;
    } else {
      s1 = imin(s0 + blk, steps);
      b.seg = gs;
      b.nseg = (s1 - s0) / gs;
    }
    b.s0 = s0;
    b.g0 = s0 / gs;
    b.groups = ng;
    b.ldc = ldc;
    b.ldo = ldo;
    for (std::int64_t i0 = 0; i0 < m; i0 += 2 * kTileRows) {
      const std::int64_t rows = imin(2 * kTileRows, m - i0);
      const Rows r0 = a_rows(i0), r1 = a_rows(i0 + kTileRows);
      b.a0 = r0.p;
      b.lda = r0.ld;
      b.a1 = r1.p;
      // The two row tiles share one stride unless the second is the padded copy.
      const bool same_stride = rows > kTileRows && r1.ld == r0.ld;
      b.xs = xs + i0 * ng;
      b.rows = rows;
      for (std::int64_t p = 0; p < panels; p += 2) {
        const bool two_b = p + 1 < panels;
        b.b0 = wbase + p * pstride;
        b.b1 = two_b ? b.b0 + pstride : nullptr;
        b.sc[0] = sct + p * ng * kPanel;
        b.ns[0] = nst + p * ng * kPanel;
        b.sc[1] = b.sc[0] + ng * kPanel;
        b.ns[1] = b.ns[0] + ng * kPanel;
        b.out = out + i0 * ldo + p * kPanel;
        b.carry = carry + i0 * ldc + p * kPanel;
        b.mask[0] = col_mask(cols - p * kPanel);
        b.mask[1] = col_mask(cols - (p + 1) * kPanel);
        if (same_stride) {
          if (two_b)
            amx_block<true, true>(b, cbuf, pend, parity);
          else
            amx_block<true, false>(b, cbuf, pend, parity);
          continue;
        }
        // One row tile, or two with different strides: run them one at a time.
        for (std::int64_t r = 0; r < rows; r += kTileRows) {
          Block bt = b;
          const Rows rr = r == 0 ? r0 : r1;
          bt.a0 = rr.p;
          bt.lda = rr.ld;
          bt.rows = imin(kTileRows, rows - r);
          bt.out = b.out + r * ldo;
          bt.xs = b.xs + r * ng;
          bt.carry = b.carry + r * ldc;
          if (two_b)
            amx_block<false, true>(bt, cbuf, pend, parity);
          else
            amx_block<false, false>(bt, cbuf, pend, parity);
        }
      }
    }
    s0 = s1;
  }
  drain(pend, pend.rows);
  _tile_release();
}

}  // namespace autoglm::detail::q8::impl

#endif  // x86-64
