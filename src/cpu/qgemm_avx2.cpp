// SPDX-License-Identifier: Apache-2.0
// AVX2 + FMA path of the INT8 GEMM (compiled with those flags; called only after the dispatcher
// has seen the CPU run them). W8A8 stays exact without vpmaddubsw, whose i16 sums saturate:
// activations become i16 (xq - 128) and weights are sign-extended to i16 for vpmaddwd.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "cpu/qgemm_avx2_util.hpp"
#include "cpu/qgemm_isa.hpp"

namespace autoglm::detail::q8::impl {
namespace {

constexpr int kMR8 = 2;                      // W8A8 rows per micro-tile (4 accumulators per row)
constexpr int kMRF = 6;                      // wonly rows per f32 micro-tile
constexpr std::int64_t kDeqQuads = 64;       // wonly: k block of one panel dequantized (16 KB)
constexpr int kStreamRows = 4;               // wonly: up to this many rows stream the weights
constexpr std::int64_t kPrefetchQuads = 16;  // software prefetch distance (1 KB)

inline std::int64_t load_i64(const void* p) {
  std::int64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One panel x MR rows over all of k. x16: i16 activations [rows][kp]. acc[i][c] holds chunk c
// (rows 4c ... 4c + 3) of row i as pairs of partial sums, reduced at each group's end.
template <int MR>
void w8a8_micro(const std::int16_t* x16, std::int64_t kp, const std::int8_t* wp, std::int64_t kq,
                std::int64_t qpg, const float* sc, const float* xs, float* out, std::int64_t ldo,
                __m256i m0, __m256i m1) {
  const std::int64_t nseg = kq / qpg;
  for (std::int64_t s = 0; s < nseg; ++s) {
    __m256i acc[MR][4];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm256_setzero_si256();
    for (std::int64_t q = s * qpg; q < (s + 1) * qpg; ++q) {
      __m256i xb[MR];
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) xb[i] = _mm256_set1_epi64x(load_i64(x16 + i * kp + 4 * q));
#pragma GCC unroll 8
      for (int c = 0; c < 4; ++c) {
        const __m256i w16 = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + q * 64 + 16 * c)));
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i)
          acc[i][c] = _mm256_add_epi32(acc[i][c], _mm256_madd_epi16(w16, xb[i]));
      }
    }
    const __m256 sc0 = _mm256_loadu_ps(sc + s * 16), sc1 = _mm256_loadu_ps(sc + s * 16 + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      // hadd gives rows (0 1 4 5 | 2 3 6 7); the 64-bit permute puts them in order.
      const __m256i lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][0], acc[i][1]), 0xD8);
      const __m256i hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][2], acc[i][3]), 0xD8);
      float* o = out + i * ldo;
      const float xsv = xs[i * nseg + s];  // one segment per group: nseg groups per row
      finish8(o, m0, _mm256_cvtepi32_ps(lo), sc0, s == 0, xsv);
      finish8(o + 8, m1, _mm256_cvtepi32_ps(hi), sc1, s == 0, xsv);
    }
  }
}

// f32 micro-tile: out[MR, 16] (+)= x[MR, kc] * buf[kc, 16].
template <int MR>
void fma_micro(const float* x, std::int64_t ldx, const float* buf, std::int64_t kc, float* out,
               std::int64_t ldo, bool first, __m256i m0, __m256i m1) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (std::int64_t c = 0; c < kc; ++c) {
    const __m256 w0 = _mm256_load_ps(buf + c * 16), w1 = _mm256_load_ps(buf + c * 16 + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(x + i * ldx + c);
      acc[i][0] = _mm256_fmadd_ps(xb, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xb, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* o = out + i * ldo;
    __m256 r0 = acc[i][0], r1 = acc[i][1];
    if (!first) {
      r0 = _mm256_add_ps(r0, _mm256_maskload_ps(o, m0));
      r1 = _mm256_add_ps(r1, _mm256_maskload_ps(o + 8, m1));
    }
    _mm256_maskstore_ps(o, m0, r0);
    _mm256_maskstore_ps(o + 8, m1, r1);
  }
}

using FmaFn = void (*)(const float*, std::int64_t, const float*, std::int64_t, float*, std::int64_t,
                       bool, __m256i, __m256i);

FmaFn fma_kernel(int mr) {
  switch (mr) {
    case 1:
      return fma_micro<1>;
    case 2:
      return fma_micro<2>;
    case 3:
      return fma_micro<3>;
    case 4:
      return fma_micro<4>;
    case 5:
      return fma_micro<5>;
    default:
      return fma_micro<6>;
  }
}

inline __m256 widen_byte(__m256i v, int j) {
  switch (j) {
    case 0:
      return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
    case 1:
      return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
    case 2:
      return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
    default:
      return _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
  }
}

// Weight-only, few rows: one panel streamed once per row block, each quad's bytes widened in
// registers (16 rows as two halves of 8) and used by all MR rows; f32 sums per group, scaled
// into out at the group's end.
template <int MR>
void wonly_stream(const float* x, std::int64_t ldx, const std::int8_t* wp, std::int64_t kq,
                  std::int64_t qpg, const float* sc, float* out, std::int64_t ldo, __m256i m0,
                  __m256i m1) {
  for (std::int64_t q0 = 0, g = 0; q0 < kq; q0 += qpg, ++g) {
    __m256 acc[MR][2];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (std::int64_t q = q0; q < q0 + qpg; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(wp + (q + kPrefetchQuads) * 64), _MM_HINT_T0);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 64));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 64 + 32));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 w0 = widen_byte(v0, j), w1 = widen_byte(v1, j);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          const __m256 xb = _mm256_set1_ps(x[i * ldx + q * 4 + j]);
          acc[i][0] = _mm256_fmadd_ps(xb, w0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(xb, w1, acc[i][1]);
        }
      }
    }
    const __m256 s0 = _mm256_loadu_ps(sc + g * kPanel), s1 = _mm256_loadu_ps(sc + g * kPanel + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      float* o = out + i * ldo;
      const __m256 r0 = g == 0 ? _mm256_mul_ps(acc[i][0], s0)
                               : _mm256_fmadd_ps(acc[i][0], s0, _mm256_maskload_ps(o, m0));
      const __m256 r1 = g == 0 ? _mm256_mul_ps(acc[i][1], s1)
                               : _mm256_fmadd_ps(acc[i][1], s1, _mm256_maskload_ps(o + 8, m1));
      _mm256_maskstore_ps(o, m0, r0);
      _mm256_maskstore_ps(o + 8, m1, r1);
    }
  }
}

using StreamFn = void (*)(const float*, std::int64_t, const std::int8_t*, std::int64_t,
                          std::int64_t, const float*, float*, std::int64_t, __m256i, __m256i);

StreamFn stream_kernel(int mr) {
  switch (mr) {
    case 1:
      return wonly_stream<1>;
    case 2:
      return wonly_stream<2>;
    case 3:
      return wonly_stream<3>;
    default:
      return wonly_stream<4>;
  }
}

}  // namespace

void quantize_avx2(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k,
                   std::int64_t group, std::uint8_t* xq, std::int64_t ldq, float* xs) {
  const std::int64_t kp = padded_depth(k), ng = k / group;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i off = _mm256_set1_epi32(128);
  for (std::int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    std::uint8_t* qi = xq + i * ldq;
    for (std::int64_t g = 0; g < ng; ++g) {
      const std::int64_t c0 = g * group, c1 = c0 + group;
      __m256 vmax = _mm256_setzero_ps();
      std::int64_t c = c0;
      for (; c + 8 <= c1; c += 8)
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xi + c)));
      float lanes[8];
      _mm256_storeu_ps(lanes, vmax);
      float amax = 0.0f;
      for (float v : lanes) amax = amax < v ? v : amax;
      for (; c < c1; ++c) amax = amax < std::fabs(xi[c]) ? std::fabs(xi[c]) : amax;
      const float s = amax / 127.0f;
      xs[i * ng + g] = s;
      if (s == 0.0f) {
        std::memset(qi + c0, 128, static_cast<std::size_t>(group));
        continue;
      }
      const __m256 vs = _mm256_set1_ps(s);
      for (c = c0; c + 8 <= c1; c += 8) {
        // Division and round-half-even conversion, as the portable path's nearbyint(x / s).
        __m256i q = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xi + c), vs));
        q = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(q, lo), hi), off);
        const __m256i p = _mm256_packs_epi32(q, q);
        const __m256i b = _mm256_packus_epi16(p, p);  // columns in bytes 0-3 and 16-19
        const std::int32_t b0 = _mm256_cvtsi256_si32(b), b1 = _mm256_extract_epi32(b, 4);
        std::memcpy(qi + c, &b0, 4);
        std::memcpy(qi + c + 4, &b1, 4);
      }
      for (; c < c1; ++c) {
        float q = std::nearbyint(xi[c] / s);
        q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
        qi[c] = static_cast<std::uint8_t>(static_cast<int>(q) + 128);
      }
    }
    for (std::int64_t c = k; c < kp; ++c) qi[c] = 128;
  }
}

void gemm_w8a8_avx2(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
                    const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
                    std::int64_t ldo) {
  const std::int64_t kp = padded_depth(w.k), kq = kp / 4, ng = w.k / w.group;
  const std::int64_t qpg = quads_per_group(w.k, w.group);
  const std::int64_t panels = (cols + kPanel - 1) / kPanel;
  const std::int64_t sc_elems = panels * ng * kPanel;
  auto* base =
      static_cast<char*>(scratch(static_cast<std::size_t>(sc_elems * 4 + m * kp * 2 + 64)));
  auto* sct = reinterpret_cast<float*>(base);
  auto* x16 = reinterpret_cast<std::int16_t*>(base + sc_elems * 4);
  transpose_scales(w, col0, panels, sct, nullptr);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t c = 0; c < kp; ++c)
      x16[i * kp + c] = static_cast<std::int16_t>(xq[i * ldq + c] - 128);

  const std::int64_t pstride = kq * 64;
  for (std::int64_t p = 0; p < panels; ++p) {
    const __m256i m0 = lane_mask(cols - p * kPanel), m1 = lane_mask(cols - p * kPanel - 8);
    const std::int8_t* wp = w.data + (col0 / kPanel + p) * pstride;
    const float* sc = sct + p * ng * kPanel;
    std::int64_t i0 = 0;
    for (; i0 + kMR8 <= m; i0 += kMR8)
      w8a8_micro<kMR8>(x16 + i0 * kp, kp, wp, kq, qpg, sc, xs + i0 * ng,
                       out + i0 * ldo + p * kPanel, ldo, m0, m1);
    if (i0 < m)
      w8a8_micro<1>(x16 + i0 * kp, kp, wp, kq, qpg, sc, xs + i0 * ng, out + i0 * ldo + p * kPanel,
                    ldo, m0, m1);
  }
}

void gemm_wonly_avx2(const float* x, std::int64_t ldx, std::int64_t m, const QWeights& w,
                     std::int64_t col0, std::int64_t cols, float* out, std::int64_t ldo) {
  const std::int64_t k = w.k, kp = padded_depth(k), kq = kp / 4, ng = k / w.group;
  const std::int64_t qpg = quads_per_group(k, w.group);
  const std::int64_t panels = (cols + kPanel - 1) / kPanel;
  const std::int64_t sc_elems = panels * ng * kPanel;
  const std::int64_t xpad_elems = k == kp ? 0 : m * kp;
  // Up to kStreamRows rows stream each panel once, widening in registers (1 row: 1.7x the
  // dequantizing path's rate on Zen 5 in AVX2 mode, 4 rows 1.25x); more rows dequantize a k
  // block once and reuse it across 6-row blocks (streaming 4-row blocks measured equal at 5-8
  // rows and slower from 16: each widen takes 3 of AVX2's vector ops per 8 weights).
  const bool stream = m <= kStreamRows;
  const std::int64_t buf_elems = stream ? 0 : kDeqQuads * 4 * kPanel;
  auto* buf = static_cast<float*>(
      scratch(static_cast<std::size_t>((buf_elems + sc_elems + xpad_elems) * 4 + 64)));
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
  const std::int64_t pstride = kq * 64;
  for (std::int64_t p = 0; p < panels; ++p) {
    const __m256i m0 = lane_mask(cols - p * kPanel), m1 = lane_mask(cols - p * kPanel - 8);
    const std::int8_t* wp = w.data + (col0 / kPanel + p) * pstride;
    const float* sp = sct + p * ng * kPanel;
    if (stream) {
      stream_kernel(static_cast<int>(m))(x, ldx, wp, kq, qpg, sp, out + p * kPanel, ldo, m0, m1);
      continue;
    }
    for (std::int64_t q0 = 0; q0 < kq; q0 += kDeqQuads) {
      const std::int64_t nq = imin(kDeqQuads, kq - q0);
      for (std::int64_t q = 0; q < nq; ++q)
        for (int h = 0; h < 2; ++h) {
          const __m256i v =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + (q0 + q) * 64 + 32 * h));
          const __m256 scv = _mm256_loadu_ps(sp + (q0 + q) / qpg * kPanel + 8 * h);
#pragma GCC unroll 8
          for (int j = 0; j < 4; ++j)
            _mm256_store_ps(buf + (4 * q + j) * kPanel + 8 * h,
                            _mm256_mul_ps(widen_byte(v, j), scv));
        }
      for (std::int64_t i0 = 0; i0 < m; i0 += kMRF) {
        const int mr = static_cast<int>(imin(kMRF, m - i0));
        fma_kernel(mr)(x + i0 * ldx + q0 * 4, ldx, buf, nq * 4, out + i0 * ldo + p * kPanel, ldo,
                       q0 == 0, m0, m1);
      }
    }
  }
}

}  // namespace autoglm::detail::q8::impl

#endif  // x86-64
