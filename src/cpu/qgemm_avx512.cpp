// SPDX-License-Identifier: Apache-2.0
// AVX-512 VNNI path of the INT8 GEMM (compiled with AVX-512 flags; called only after the
// dispatcher has seen the CPU run them). See qgemm_isa.hpp for why no std templates here.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstring>

#include "cpu/qgemm_isa.hpp"

namespace autoglm::detail::q8::impl {
namespace {

constexpr int kMR = 6;                             // rows of x per W8A8 micro-tile
constexpr int kNP = 4;                             // panels (16 columns each) per micro-tile
constexpr std::int64_t kKcQuads = 64;              // W8A8 k block when row blocks reuse the weights
constexpr std::int64_t kPrefetchQuads = 16;        // software prefetch distance (1 KB per panel)
constexpr std::int64_t kStreamPrefetchQuads = 32;  // the same, streaming one panel (2 KB)
constexpr int kStreamMR = 12;           // W8A8: up to this many rows stream the weights once
constexpr int kStreamRows = 4;          // wonly: rows per streaming row block
constexpr int kStreamMaxRows = 64;      // wonly: up to this many rows stream the weights
constexpr std::int64_t kDeqQuads = 32;  // wonly: k block dequantized to f32 (32 KB)

inline std::int64_t imin(std::int64_t a, std::int64_t b) {
  return a < b ? a : b;
}

inline __mmask16 col_mask(std::int64_t valid) {
  if (valid >= 16) return 0xffff;
  if (valid <= 0) return 0;
  return static_cast<__mmask16>((1u << valid) - 1u);
}

inline std::int32_t load_i32(const void* p) {
  std::int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// ---------------------------------------------------------------------------------------------
// W8A8: vpdpbusd of 4 activation bytes (u8, broadcast) against one k-quad of a panel (16 rows
// x 4 s8 = one zmm). The accumulator starts at -128 * (group sum of w), which removes the +128
// offset of the activations exactly, so each group's int32 sum is exact before it is scaled.

struct W8A8Args {
  const std::uint8_t* x;  // row i0, column 4 * q0
  std::int64_t ldq;
  const std::int8_t* w;    // first panel, quad q0
  std::int64_t pstride;    // bytes between panels
  std::int64_t seg, nseg;  // quads per segment (a group or a piece of one), segments
  const float* sc;         // first panel, first group of the block
  const std::int32_t* ns;  // same layout as sc
  std::int64_t sstride;    // elements between panels in sc / ns
  std::int32_t* carry;     // partial int32 sums of a group split across k blocks
  std::int64_t ldc;
  float* out;  // row i0, first panel's column
  std::int64_t ldo;
  const float* xs;        // activation scales of row i0, first group of the block
  std::int64_t xstride;   // elements between rows in xs
  bool from_carry;        // the first segment continues a group
  bool to_carry;          // the last segment stops inside a group
  bool first;             // the first segment is group 0: out holds nothing yet
  std::int64_t pf_quads;  // software prefetch distance
  __mmask16 mask[kNP];
};

template <int MR, int NP>
void w8a8_micro(const W8A8Args& a) {
  __m512i acc[MR][NP];
  for (std::int64_t s = 0; s < a.nseg; ++s) {
    if (s == 0 && a.from_carry) {
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
        for (int t = 0; t < NP; ++t) acc[i][t] = _mm512_loadu_si512(a.carry + i * a.ldc + 16 * t);
    } else {
#pragma GCC unroll 16
      for (int t = 0; t < NP; ++t) {
        const __m512i v = _mm512_loadu_si512(a.ns + t * a.sstride + s * 16);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) acc[i][t] = v;
      }
    }
    const std::uint8_t* xp = a.x + s * a.seg * 4;
    const std::int8_t* wp = a.w + s * a.seg * 64;
    std::int64_t q = 0;
    if constexpr (NP == 1 && MR <= 3) {
      // One panel and few rows: a single chain of dependent vpdpbusd per row would wait on its
      // latency; even and odd quads go to separate accumulators (int32 sums: exact, so the
      // result is the same).
      __m512i odd[MR];
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) odd[i] = _mm512_setzero_si512();
      for (; q + 2 <= a.seg; q += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(wp + (q + a.pf_quads) * 64), _MM_HINT_T0);
        const __m512i w0 = _mm512_loadu_si512(wp + q * 64);
        const __m512i w1 = _mm512_loadu_si512(wp + (q + 1) * 64);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
          acc[i][0] = _mm512_dpbusd_epi32(acc[i][0],
                                          _mm512_set1_epi32(load_i32(xp + i * a.ldq + q * 4)), w0);
          odd[i] = _mm512_dpbusd_epi32(odd[i],
                                       _mm512_set1_epi32(load_i32(xp + i * a.ldq + q * 4 + 4)), w1);
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) acc[i][0] = _mm512_add_epi32(acc[i][0], odd[i]);
    }
    for (; q < a.seg; ++q) {
      __m512i wv[NP];
#pragma GCC unroll 16
      for (int t = 0; t < NP; ++t) {
        // Short panels (k of a few thousand) leave the hardware prefetcher little time to ramp
        // up on each of the NP streams; a line pf_quads ahead keeps memory busy.
        _mm_prefetch(reinterpret_cast<const char*>(wp + t * a.pstride + (q + a.pf_quads) * 64),
                     _MM_HINT_T0);
        wv[t] = _mm512_loadu_si512(wp + t * a.pstride + q * 64);
      }
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m512i xb = _mm512_set1_epi32(load_i32(xp + i * a.ldq + q * 4));
#pragma GCC unroll 16
        for (int t = 0; t < NP; ++t) acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], xb, wv[t]);
      }
    }
    const bool end = s == a.nseg - 1;
    if (end && a.to_carry) {
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
        for (int t = 0; t < NP; ++t) _mm512_storeu_si512(a.carry + i * a.ldc + 16 * t, acc[i][t]);
      continue;
    }
#pragma GCC unroll 16
    for (int t = 0; t < NP; ++t) {
      const __m512 scv = _mm512_loadu_ps(a.sc + t * a.sstride + s * 16);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        float* o = a.out + i * a.ldo + 16 * t;
        const __m512 f = _mm512_cvtepi32_ps(acc[i][t]);
        // The weight scales times this row's activation scale of the group.
        const __m512 st = _mm512_mul_ps(scv, _mm512_set1_ps(a.xs[i * a.xstride + s]));
        const __m512 r = (a.first && s == 0)
                             ? _mm512_mul_ps(f, st)
                             : _mm512_fmadd_ps(f, st, _mm512_maskz_loadu_ps(a.mask[t], o));
        _mm512_mask_storeu_ps(o, a.mask[t], r);
      }
    }
  }
}

using W8A8Fn = void (*)(const W8A8Args&);

template <int MR>
constexpr W8A8Fn w8a8_pick(int np) {
  if constexpr (MR > kMR) {  // more than kMR rows only stream, one panel at a time
    (void)np;
    return w8a8_micro<MR, 1>;
  } else {
    return np == 1   ? w8a8_micro<MR, 1>
           : np == 2 ? w8a8_micro<MR, 2>
           : np == 3 ? w8a8_micro<MR, 3>
                     : w8a8_micro<MR, 4>;
  }
}

template <int MR = 1>
W8A8Fn w8a8_kernel(int mr, int np) {
  if constexpr (MR < kStreamMR) {
    if (mr > MR) return w8a8_kernel<MR + 1>(mr, np);
  }
  return w8a8_pick<MR>(np);
}

// ---------------------------------------------------------------------------------------------
// Weight-only. Few rows: stream the packed weights, widening each k-quad's bytes j = 0..3 to a
// vector of 16 rows by shifting byte j to the top of its dword and back (arithmetic, so signed).
// More rows: dequantize a k block of the panels to f32 once (scales folded in) and run an f32
// FMA micro-tile over it for every row block.

inline __m512 widen_byte(__m512i v, int j) {
  switch (j) {
    case 0:
      return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24));
    case 1:
      return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24));
    case 2:
      return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24));
    default:
      return _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
  }
}

struct StreamArgs {
  const float* x;  // row 0, column 0 (k padded to quads)
  std::int64_t ldx;
  const std::int8_t* w;  // first panel, quad 0
  std::int64_t pstride;
  std::int64_t seg, nseg;  // quads per group, groups
  const float* sc;         // first panel, group 0
  std::int64_t sstride;
  float* out;
  std::int64_t ldo;
  __mmask16 mask[kNP];
};

template <int MR, int NP>
void wonly_stream(const StreamArgs& a) {
  for (std::int64_t s = 0; s < a.nseg; ++s) {
    __m512 acc[MR][NP];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int t = 0; t < NP; ++t) acc[i][t] = _mm512_setzero_ps();
    const std::int8_t* wp = a.w + s * a.seg * 64;
    const float* xp = a.x + s * a.seg * 4;
    for (std::int64_t q = 0; q < a.seg; ++q) {
      __m512i v[NP];
#pragma GCC unroll 8
      for (int t = 0; t < NP; ++t) {
        _mm_prefetch(reinterpret_cast<const char*>(wp + t * a.pstride + (q + kPrefetchQuads) * 64),
                     _MM_HINT_T0);
        v[t] = _mm512_loadu_si512(wp + t * a.pstride + q * 64);
      }
#pragma GCC unroll 8
      for (int j = 0; j < 4; ++j)
#pragma GCC unroll 8
        for (int t = 0; t < NP; ++t) {
          const __m512 wf = widen_byte(v[t], j);
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i)
            acc[i][t] = _mm512_fmadd_ps(_mm512_set1_ps(xp[i * a.ldx + q * 4 + j]), wf, acc[i][t]);
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NP; ++t) {
      const __m512 scv = _mm512_loadu_ps(a.sc + t * a.sstride + s * 16);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        float* o = a.out + i * a.ldo + 16 * t;
        const __m512 r = s == 0
                             ? _mm512_mul_ps(acc[i][t], scv)
                             : _mm512_fmadd_ps(acc[i][t], scv, _mm512_maskz_loadu_ps(a.mask[t], o));
        _mm512_mask_storeu_ps(o, a.mask[t], r);
      }
    }
  }
}

using StreamFn = void (*)(const StreamArgs&);

template <int MR>
constexpr StreamFn stream_pick(int np) {
  return np == 1   ? wonly_stream<MR, 1>
         : np == 2 ? wonly_stream<MR, 2>
         : np == 3 ? wonly_stream<MR, 3>
                   : wonly_stream<MR, 4>;
}

StreamFn stream_kernel(int mr, int np) {
  switch (mr) {
    case 1:
      return stream_pick<1>(np);
    case 2:
      return stream_pick<2>(np);
    case 3:
      return stream_pick<3>(np);
    default:
      return stream_pick<4>(np);
  }
}

// f32 micro-tile: out[MR, 16 * NP] (+)= x[MR, kc] * buf[kc, 64] (buf row stride 64 floats).
template <int MR, int NP>
void fma_micro(const float* x, std::int64_t ldx, const float* buf, std::int64_t kc, float* out,
               std::int64_t ldo, bool first, const __mmask16* mask) {
  __m512 acc[MR][NP];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < NP; ++t) acc[i][t] = _mm512_setzero_ps();
  for (std::int64_t c = 0; c < kc; ++c) {
    __m512 wv[NP];
#pragma GCC unroll 8
    for (int t = 0; t < NP; ++t) wv[t] = _mm512_load_ps(buf + c * 64 + 16 * t);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i * ldx + c]);
#pragma GCC unroll 8
      for (int t = 0; t < NP; ++t) acc[i][t] = _mm512_fmadd_ps(xb, wv[t], acc[i][t]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < NP; ++t) {
      float* o = out + i * ldo + 16 * t;
      const __m512 r =
          first ? acc[i][t] : _mm512_add_ps(acc[i][t], _mm512_maskz_loadu_ps(mask[t], o));
      _mm512_mask_storeu_ps(o, mask[t], r);
    }
}

using FmaFn = void (*)(const float*, std::int64_t, const float*, std::int64_t, float*, std::int64_t,
                       bool, const __mmask16*);

template <int MR>
constexpr FmaFn fma_pick(int np) {
  return np == 1   ? fma_micro<MR, 1>
         : np == 2 ? fma_micro<MR, 2>
         : np == 3 ? fma_micro<MR, 3>
                   : fma_micro<MR, 4>;
}

FmaFn fma_kernel(int mr, int np) {
  switch (mr) {
    case 1:
      return fma_pick<1>(np);
    case 2:
      return fma_pick<2>(np);
    case 3:
      return fma_pick<3>(np);
    case 4:
      return fma_pick<4>(np);
    case 5:
      return fma_pick<5>(np);
    default:
      return fma_pick<6>(np);
  }
}

inline float* align64(void* p) {
  return static_cast<float*>(p);
}

}  // namespace

void quantize_avx512(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k,
                     std::int64_t group, std::uint8_t* xq, std::int64_t ldq, float* xs) {
  const std::int64_t kp = padded_depth(k), ng = k / group;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m512i off = _mm512_set1_epi32(128);
  for (std::int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    std::uint8_t* qi = xq + i * ldq;
    for (std::int64_t g = 0; g < ng; ++g) {
      const std::int64_t c0 = g * group, c1 = c0 + group;
      __m512 vmax = _mm512_setzero_ps();
      for (std::int64_t c = c0; c < c1; c += 16) {
        const __mmask16 mk = col_mask(c1 - c);
        vmax = _mm512_max_ps(vmax, _mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(mk, xi + c)));
      }
      const float s = _mm512_reduce_max_ps(vmax) / 127.0f;
      xs[i * ng + g] = s;
      if (s == 0.0f) {
        std::memset(qi + c0, 128, static_cast<std::size_t>(group));
        continue;
      }
      const __m512 vs = _mm512_set1_ps(s);
      for (std::int64_t c = c0; c < c1; c += 16) {
        const __mmask16 mk = col_mask(c1 - c);
        // Division, not a reciprocal multiply, so every path rounds x / s the same way; the
        // conversion rounds half to even (the default MXCSR mode).
        const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, xi + c), vs);
        __m512i q = _mm512_cvtps_epi32(v);
        q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), off);
        _mm_mask_storeu_epi8(qi + c, mk, _mm512_cvtepi32_epi8(q));
      }
    }
    for (std::int64_t c = k; c < kp; ++c) qi[c] = 128;
  }
}

void gemm_w8a8_avx512(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
                      const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
                      std::int64_t ldo) {
  const std::int64_t kq = padded_depth(w.k) / 4, ng = w.k / w.group;
  const std::int64_t qpg = quads_per_group(w.k, w.group);
  const std::int64_t panels = (cols + kPanel - 1) / kPanel;
  const std::int64_t pstride = kq * 64;
  // Up to kStreamMR rows stream the weights once, as one row block, one panel at a time: the
  // tile's weights are then one sequential stream, which memory served faster than 2 or 4
  // panels side by side (docs/quantization.md, "Kernels"), though reading the activations once
  // per panel instead of once per 2-4 panels costs compute when the weights are in cache. More
  // rows reuse a k block from L1 across row blocks of 4-panel micro-tiles.
  const bool stream = m <= kStreamMR;
  const std::int64_t mr_max = stream ? m : kMR, np_max = stream ? 1 : kNP;
  const std::int64_t kc = stream ? kq : kKcQuads;
  const bool split = qpg > kc;
  const std::int64_t blk = split ? kc : kc / qpg * qpg;

  const std::int64_t ns_elems = panels * ng * kPanel;
  const std::int64_t carry_elems = split ? m * panels * kPanel : 0;
  auto* base =
      static_cast<char*>(scratch(static_cast<std::size_t>((2 * ns_elems + carry_elems) * 4 + 64)));
  auto* sct = reinterpret_cast<float*>(base);
  auto* nst = reinterpret_cast<std::int32_t*>(base + ns_elems * 4);
  auto* carry = reinterpret_cast<std::int32_t*>(base + 2 * ns_elems * 4);
  transpose_scales(w, col0, panels, sct, nst);
  const std::int64_t ldc = panels * kPanel;

  const std::int8_t* wbase = w.data + (col0 / kPanel) * pstride;
  for (std::int64_t pp = 0; pp < panels; pp += np_max) {
    const int np = static_cast<int>(imin(np_max, panels - pp));
    W8A8Args a{};
    a.pf_quads = stream ? kStreamPrefetchQuads : kPrefetchQuads;
    a.ldq = ldq;
    a.pstride = pstride;
    a.sstride = ng * kPanel;
    a.ldc = ldc;
    a.ldo = ldo;
    a.xstride = ng;
#pragma GCC unroll 8
    for (int t = 0; t < kNP; ++t) a.mask[t] = col_mask(cols - (pp + t) * kPanel);
    for (std::int64_t q0 = 0; q0 < kq;) {
      std::int64_t q1;
      if (split) {
        const std::int64_t gend = (q0 / qpg + 1) * qpg;
        q1 = imin(q0 + blk, gend);
        a.seg = q1 - q0;
        a.nseg = 1;
        a.from_carry = q0 % qpg != 0;
        a.to_carry = q1 != gend;
      } else {
        q1 = imin(q0 + blk, kq);
        a.seg = qpg;
        a.nseg = (q1 - q0) / qpg;
        a.from_carry = a.to_carry = false;
      }
      const std::int64_t g0 = q0 / qpg;
      a.first = g0 == 0;
      a.w = wbase + pp * pstride + q0 * 64;
      a.sc = sct + (pp * ng + g0) * kPanel;
      a.ns = nst + (pp * ng + g0) * kPanel;
      for (std::int64_t i0 = 0; i0 < m; i0 += mr_max) {
        const int mr = static_cast<int>(imin(mr_max, m - i0));
        a.x = xq + i0 * ldq + q0 * 4;
        a.carry = carry + i0 * ldc + pp * kPanel;
        a.out = out + i0 * ldo + pp * kPanel;
        a.xs = xs + i0 * ng + g0;
        w8a8_kernel(mr, np)(a);
      }
      q0 = q1;
    }
  }
}

void gemm_wonly_avx512(const float* x, std::int64_t ldx, std::int64_t m, const QWeights& w,
                       std::int64_t col0, std::int64_t cols, float* out, std::int64_t ldo) {
  const std::int64_t k = w.k, kp = padded_depth(k), kq = kp / 4, ng = k / w.group;
  const std::int64_t qpg = quads_per_group(k, w.group);
  const std::int64_t panels = (cols + kPanel - 1) / kPanel;
  const std::int64_t pstride = kq * 64;
  // Up to kStreamMaxRows rows widen the weights in registers as they stream, in row blocks of
  // at most kStreamRows: the first block reads the panels from memory, the others from cache.
  // On Zen 5 that runs at the FMA peak from 4 to 64 rows where widening a k block to f32 once
  // and reusing it (below) reached 60-85 % of it; above 64 rows the two measured equal.
  const bool stream = m <= kStreamMaxRows;
  const std::int64_t row_blocks = (m + kStreamRows - 1) / kStreamRows;
  const std::int64_t block_rows = (m + row_blocks - 1) / row_blocks;  // balanced: 8 = 4 + 4

  const std::int64_t sc_elems = panels * ng * kPanel;
  const std::int64_t xpad_elems = k == kp ? 0 : m * kp;
  const std::int64_t buf_elems = stream ? 0 : kDeqQuads * 4 * 64;
  auto* base = static_cast<char*>(
      scratch(static_cast<std::size_t>((buf_elems + sc_elems + xpad_elems) * 4 + 64)));
  float* buf = align64(base);  // first: 64-byte aligned for the aligned loads
  float* sct = buf + buf_elems;
  float* xpad = sct + sc_elems;
  transpose_scales(w, col0, panels, sct, nullptr);
  if (xpad_elems != 0) {  // k not a multiple of 4: give the last quad zero activations
    for (std::int64_t i = 0; i < m; ++i) {
      std::memcpy(xpad + i * kp, x + i * ldx, static_cast<std::size_t>(k) * 4);
      for (std::int64_t c = k; c < kp; ++c) xpad[i * kp + c] = 0.0f;
    }
    x = xpad;
    ldx = kp;
  }

  const std::int8_t* wbase = w.data + (col0 / kPanel) * pstride;
  for (std::int64_t pp = 0; pp < panels; pp += kNP) {
    const int np = static_cast<int>(imin(kNP, panels - pp));
    __mmask16 mask[kNP];
#pragma GCC unroll 8
    for (int t = 0; t < kNP; ++t) mask[t] = col_mask(cols - (pp + t) * kPanel);
    if (stream) {
      StreamArgs a{};
      a.ldx = ldx;
      a.w = wbase + pp * pstride;
      a.pstride = pstride;
      a.seg = qpg;
      a.nseg = kq / qpg;
      a.sc = sct + pp * ng * kPanel;
      a.sstride = ng * kPanel;
      a.ldo = ldo;
#pragma GCC unroll 8
      for (int t = 0; t < kNP; ++t) a.mask[t] = mask[t];
      for (std::int64_t i0 = 0; i0 < m; i0 += block_rows) {
        a.x = x + i0 * ldx;
        a.out = out + i0 * ldo + pp * kPanel;
        stream_kernel(static_cast<int>(imin(block_rows, m - i0)), np)(a);
      }
      continue;
    }
    for (std::int64_t q0 = 0; q0 < kq; q0 += kDeqQuads) {
      const std::int64_t nq = imin(kDeqQuads, kq - q0);
      for (int t = 0; t < np; ++t) {
        const std::int8_t* wp = wbase + (pp + t) * pstride;
        const float* sp = sct + (pp + t) * ng * kPanel;
        for (std::int64_t q = 0; q < nq; ++q) {
          const __m512i v = _mm512_loadu_si512(wp + (q0 + q) * 64);
          const __m512 scv = _mm512_loadu_ps(sp + (q0 + q) / qpg * kPanel);
#pragma GCC unroll 8
          for (int j = 0; j < 4; ++j)
            _mm512_store_ps(buf + (4 * q + j) * 64 + 16 * t, _mm512_mul_ps(widen_byte(v, j), scv));
        }
      }
      for (std::int64_t i0 = 0; i0 < m; i0 += kMR) {
        const int mr = static_cast<int>(imin(kMR, m - i0));
        fma_kernel(mr, np)(x + i0 * ldx + q0 * 4, ldx, buf, nq * 4, out + i0 * ldo + pp * kPanel,
                           ldo, q0 == 0, mask);
      }
    }
  }
}

}  // namespace autoglm::detail::q8::impl

#endif  // x86-64
