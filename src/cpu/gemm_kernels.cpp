// SPDX-License-Identifier: Apache-2.0
#include "cpu/gemm_kernels.hpp"

#include "autoglm/core/tensor.hpp"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace autoglm::detail {
namespace {

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMap = Eigen::Map<const RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;
using MutMap = Eigen::Map<RowMajor, Eigen::Unaligned, Eigen::OuterStride<>>;

void eigen_tile(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, float* out,
                std::int64_t ldo, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                float beta) {
  ConstMap X(x, m, k, Eigen::OuterStride<>(ldx));
  ConstMap W(w, n, k, Eigen::OuterStride<>(ldw));
  MutMap O(out, m, n, Eigen::OuterStride<>(ldo));
  if (beta == 0.0f) {
    O.noalias() = alpha * (X * W.transpose());
  } else {
    O *= beta;
    O.noalias() += alpha * (X * W.transpose());
  }
}

constexpr std::int64_t kSmallRows = 6;      // up to this many rows pack as one block
constexpr std::int64_t kMaxBlockRows = 12;  // the most rows per packed block above that
// k steps of software prefetch when streaming (6 KiB of f32 panel, 3 KiB of 16-bit panel).
constexpr std::int64_t kStreamAhead = 48;

inline float finish(float acc, float alpha, float beta, const float* old) {
  return beta == 0.0f ? alpha * acc : alpha * acc + beta * *old;
}

#if defined(__AVX512F__)

// Dot-product kernel for few rows: vectors run along k over x and w rows as stored, so weights
// stream straight from memory with no packing (the bandwidth-bound decode case).
template <int MR, int NR>
void dot_kernel(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, float* out,
                std::int64_t ldo, std::int64_t k, float alpha, float beta) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  std::int64_t p = 0;
  for (; p + 16 <= k; p += 16) {
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + p);
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = _mm512_loadu_ps(w + j * ldw + p);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (p < k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - p)) - 1u);
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_ps(mask, x + i * ldx + p);
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + j * ldw + p);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float* o = out + i * ldo + j;
      *o = finish(_mm512_reduce_add_ps(acc[i][j]), alpha, beta, o);
    }
}

template <int MR>
void dot_rows(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, float* out,
              std::int64_t ldo, std::int64_t n, std::int64_t k, float alpha, float beta) {
  constexpr int NR = MR == 1 ? 8 : (MR == 2 ? 8 : 6);
  std::int64_t j = 0;
  for (; j + NR <= n; j += NR)
    dot_kernel<MR, NR>(x, ldx, w + j * ldw, ldw, out + j, ldo, k, alpha, beta);
  for (; j < n; ++j) dot_kernel<MR, 1>(x, ldx, w + j * ldw, ldw, out + j, ldo, k, alpha, beta);
}

void dot_tile(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, float* out,
              std::int64_t ldo, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
              float beta) {
  std::int64_t i = 0;
  for (; i + 4 <= m; i += 4)
    dot_rows<4>(x + i * ldx, ldx, w, ldw, out + i * ldo, ldo, n, k, alpha, beta);
  switch (m - i) {
    case 3:
      dot_rows<3>(x + i * ldx, ldx, w, ldw, out + i * ldo, ldo, n, k, alpha, beta);
      break;
    case 2:
      dot_rows<2>(x + i * ldx, ldx, w, ldw, out + i * ldo, ldo, n, k, alpha, beta);
      break;
    case 1:
      dot_rows<1>(x + i * ldx, ldx, w, ldw, out + i * ldo, ldo, n, k, alpha, beta);
      break;
    default:
      break;
  }
}

// Widening loads of one panel step (32 weights) into two f32 vectors, columns 0-15 and 16-31.
// Both 16-bit forms widen exactly, so a product reads the same f32 values as from f32 panels.
struct F32Panel {
  using Elem = float;
  static void load(const Elem* w, __m512& lo, __m512& hi) {
    lo = _mm512_loadu_ps(w);
    hi = _mm512_loadu_ps(w + 16);
  }
};
#if defined(__AVX512BW__)
// bf16 is the top half of an f32: interleaving zero words below the weights is the whole
// conversion, one shuffle per 16 weights (bf16_panel_slot stores the words in the order that
// vpunpck[lh]wd's per-lane interleave needs; the word shuffle is AVX512BW).
struct Bf16Panel {
  using Elem = std::uint16_t;
  static void load(const Elem* w, __m512& lo, __m512& hi) {
    const __m512i v = _mm512_loadu_si512(w);
    const __m512i z = _mm512_setzero_si512();
    lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, v));
    hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, v));
  }
};
#endif  // __AVX512BW__
struct F16Panel {
  using Elem = std::uint16_t;
  static void load(const Elem* w, __m512& lo, __m512& hi) {
    lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16)));
  }
};

// Panel kernel: w is Layout::panel32, so one k step reads 32 consecutive weights of a panel and
// each weight element is loaded once per row block. xp holds the block's rows packed [k][xs],
// broadcast one at a time. acc[i][v]: row i against panel columns 16v..16v+15.
// pf/pf_lines: cache lines of weights needed next, fetched into L2 spread over this call's k steps
// so that memory keeps streaming while row blocks after the first compute from L1.
template <int MR, int NP, typename P>
void panel_kernel(const float* xp, std::int64_t xs, const typename P::Elem* wp,
                  std::int64_t pstride, float* out, std::int64_t ldo, std::int64_t kc,
                  std::int64_t cols, float alpha, float beta, const char* pf,
                  std::int64_t pf_lines) {
  constexpr std::int64_t step_bytes = kPanelRows * sizeof(typename P::Elem);
  const std::int64_t pf_step = pf_lines <= 0 ? 0 : (pf_lines + kc - 1) / kc;
  std::int64_t pf_done = 0;
  constexpr int NV = 2 * NP;
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (std::int64_t p = 0; p < kc; ++p) {
    __m512 wv[NV];
    for (int q = 0; q < NP; ++q)
      P::load(wp + q * pstride + p * kPanelRows, wv[2 * q], wv[2 * q + 1]);
    for (std::int64_t q = 0; q < pf_step && pf_done < pf_lines; ++q, ++pf_done)
      _mm_prefetch(pf + 64 * pf_done, _MM_HINT_T1);
    // Streaming: fetch each panel kStreamAhead steps ahead (also for 16-bit panels: twice the
    // distance in bytes measured 3-6 % slower at 1 and 16 rows).
    if (pf_lines < 0)
      for (int q = 0; q < NP; ++q) {
        const char* a =
            reinterpret_cast<const char*>(wp + q * pstride + (p + kStreamAhead) * kPanelRows);
        for (std::int64_t b = 0; b < step_bytes; b += 64) _mm_prefetch(a + b, _MM_HINT_T0);
      }
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(xp[p * xs + i]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xb, wv[v], acc[i][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int v = 0; v < NV; ++v) {
    const std::int64_t c0 = 16 * v;
    if (c0 >= cols) break;
    const std::int64_t cnt = std::min<std::int64_t>(16, cols - c0);
    const __mmask16 mask = static_cast<__mmask16>(cnt == 16 ? 0xffffu : (1u << cnt) - 1u);
    for (int i = 0; i < MR; ++i) {
      float* o = out + i * ldo + c0;
      __m512 r = _mm512_mul_ps(va, acc[i][v]);
      if (beta != 0.0f) r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask, o), r);
      _mm512_mask_storeu_ps(o, mask, r);
    }
  }
}

// Compile-time dispatch of panel_kernel<R, NP, P> for a run-time row count r in [1, MaxR].
template <int NP, typename P, int R = 1, int MaxR = kMaxBlockRows>
void panel_rows(int r, const float* xp, std::int64_t xs, const typename P::Elem* wp,
                std::int64_t pstride, float* out, std::int64_t ldo, std::int64_t kc,
                std::int64_t cols, float alpha, float beta, const char* pf = nullptr,
                std::int64_t pf_lines = 0) {
  if constexpr (R <= MaxR) {
    if (r == R) {
      panel_kernel<R, NP, P>(xp, xs, wp, pstride, out, ldo, kc, cols, alpha, beta, pf, pf_lines);
      return;
    }
    panel_rows<NP, P, R + 1, MaxR>(r, xp, xs, wp, pstride, out, ldo, kc, cols, alpha, beta, pf,
                                   pf_lines);
  }
}

// gemm_panel_tile for one weight element type.
template <typename P>
void panel_tile(const float* xp, std::int64_t m, std::int64_t mr, const typename P::Elem* wp,
                std::int64_t k, std::int64_t panels, std::int64_t cols, float* out,
                std::int64_t ldo, float alpha, float beta) {
  using Elem = typename P::Elem;
  const std::int64_t pstride = k * kPanelRows;
  // Depth blocks keep a slice of a panel in L1 while every row block of the tile uses it.
  constexpr std::int64_t kc_max = 256;
  for (std::int64_t k0 = 0; k0 < k && mr <= kSmallRows; k0 += kc_max) {
    const std::int64_t kc = std::min(kc_max, k - k0);
    const float b = k0 == 0 ? beta : 1.0f;
    // Few rows: two panels per step give 4 independent weight streams per row.
    for (std::int64_t p = 0; p < panels; p += 2) {
      const std::int64_t c = std::min(cols - p * kPanelRows, 2 * kPanelRows);
      const Elem* w = wp + p * pstride + k0 * kPanelRows;
      const float* x = xp + k0 * mr;
      if (p + 1 < panels)
        panel_rows<2, P, 1, kSmallRows>(static_cast<int>(m), x, mr, w, pstride,
                                        out + p * kPanelRows, ldo, kc, c, alpha, b, nullptr, -1);
      else
        panel_rows<1, P, 1, kSmallRows>(static_cast<int>(m), x, mr, w, pstride,
                                        out + p * kPanelRows, ldo, kc, c, alpha, b, nullptr, -1);
    }
  }
  if (mr <= kSmallRows) return;
  // Many rows: the depth blocks accumulate in a contiguous scratch tile, copied out once. Written
  // in place after every depth block, output rows a page or more apart (an expert's rows of a
  // [tokens, 2F] product) each look like a new stream to the L2 prefetcher and displace its
  // tracking of the weight stream: 12-15 % slower at 32 rows x 192 columns, rows 6 KiB apart.
  const std::int64_t lds = panels * kPanelRows;
  float* acc = out;
  std::int64_t ld = ldo;
  thread_local std::vector<float> scratch;
  if (ldo > lds) {
    scratch.resize(static_cast<std::size_t>(m * lds));
    acc = scratch.data();
    ld = lds;
    if (beta != 0.0f)
      for (std::int64_t i = 0; i < m; ++i)
        std::memcpy(acc + i * ld, out + i * ldo, static_cast<std::size_t>(cols) * sizeof(float));
  }
  // A panel's depth blocks in order, so the tile's weights are one sequential stream; the next
  // block is prefetched while the row blocks compute on the current one.
  const std::int64_t blocks = (m + mr - 1) / mr;
  const std::int64_t end_elems = panels * pstride;
  for (std::int64_t p = 0; p < panels; ++p) {
    const std::int64_t c = std::min(cols - p * kPanelRows, kPanelRows);
    for (std::int64_t k0 = 0; k0 < k; k0 += kc_max) {
      const std::int64_t kc = std::min(kc_max, k - k0);
      const float b = k0 == 0 ? beta : 1.0f;
      const std::int64_t here = p * pstride + k0 * kPanelRows;
      const std::int64_t next = std::min(here + kc * kPanelRows, end_elems);
      const std::int64_t next_lines = (std::min(next + kc * kPanelRows, end_elems) - next) *
                                      static_cast<std::int64_t>(sizeof(Elem)) / 64;
      const std::int64_t per_block = (next_lines + blocks - 1) / blocks;
      for (std::int64_t r0 = 0, rb = 0; r0 < m; r0 += mr, ++rb) {
        const int rows = static_cast<int>(std::min(mr, m - r0));
        const std::int64_t first = std::min(rb * per_block, next_lines);
        panel_rows<1, P>(rows, xp + r0 * k + k0 * mr, mr, wp + here, pstride,
                         acc + r0 * ld + p * kPanelRows, ld, kc, c, alpha, b,
                         reinterpret_cast<const char*>(wp + next) + 64 * first,
                         std::min(per_block, next_lines - first));
      }
    }
  }
  if (acc != out)
    for (std::int64_t i = 0; i < m; ++i)
      std::memcpy(out + i * ldo, acc + i * ld, static_cast<std::size_t>(cols) * sizeof(float));
}

// In-register transpose of a 16 x 16 f32 block: r[i][j] -> r[j][i]. Pairs of rows interleave
// (ps, then pd), which leaves each 128-bit lane holding 4 rows of one column; two 128-bit lane
// shuffles gather a column's 4 lanes.
inline void transpose16(__m512 r[16]) {
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    const __m512 lo01 = _mm512_unpacklo_ps(r[4 * g], r[4 * g + 1]);
    const __m512 hi01 = _mm512_unpackhi_ps(r[4 * g], r[4 * g + 1]);
    const __m512 lo23 = _mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]);
    const __m512 hi23 = _mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
    const auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
    // u[4g + j], lane L: rows 4g..4g+3 at column 4L + j.
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(lo01), pd(lo23)));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(lo01), pd(lo23)));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(hi01), pd(hi23)));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(hi01), pd(hi23)));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);  // lanes 0, 2 of each
    const __m512 w = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);  // lanes 1, 3
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_f32x4(v, v2, 0x88);       // column j
    r[8 + j] = _mm512_shuffle_f32x4(v, v2, 0xdd);   // column 8 + j
    r[4 + j] = _mm512_shuffle_f32x4(w, w2, 0x88);   // column 4 + j
    r[12 + j] = _mm512_shuffle_f32x4(w, w2, 0xdd);  // column 12 + j
  }
}

#endif  // __AVX512F__

}  // namespace

std::int64_t pack_block_rows(std::int64_t m) {
  if (m <= kSmallRows) return std::max<std::int64_t>(m, 1);
  // As many blocks as 12-row blocks would take, filled evenly: 32 rows are 11 + 11 + 10, not
  // 12 + 12 + 8, so no block is a short one that loads weights for few multiply-adds.
  const std::int64_t blocks = (m + kMaxBlockRows - 1) / kMaxBlockRows;
  return (m + blocks - 1) / blocks;
}

std::int64_t packed_x_size(std::int64_t m, std::int64_t k) {
  const std::int64_t mr = pack_block_rows(m);
  return (m + mr - 1) / mr * mr * k;
}

void pack_x(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k, float* dst) {
  const std::int64_t mr = pack_block_rows(m);
  for (std::int64_t r0 = 0; r0 < m; r0 += mr) {
    const std::int64_t rows = std::min(mr, m - r0);
    float* d = dst + r0 * k;
#if defined(__AVX512F__)
    // 16 depths at a time: the block's rows (zeros past the last) as the rows of a 16 x 16
    // transpose, whose columns are the [k][rows] groups to store.
    const auto keep = static_cast<__mmask16>((1u << mr) - 1u);
    for (std::int64_t p0 = 0; p0 < k; p0 += 16) {
      const int kk = static_cast<int>(std::min<std::int64_t>(16, k - p0));
      const auto lm = static_cast<__mmask16>(kk == 16 ? 0xffffu : (1u << kk) - 1u);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_ps(lm, x + (r0 + i) * ldx + p0) : _mm512_setzero_ps();
      transpose16(r);
      for (int c = 0; c < kk; ++c) _mm512_mask_storeu_ps(d + (p0 + c) * mr, keep, r[c]);
    }
#else
    for (std::int64_t i = 0; i < rows; ++i) {
      const float* xi = x + (r0 + i) * ldx;
      for (std::int64_t p = 0; p < k; ++p) d[p * mr + i] = xi[p];
    }
    for (std::int64_t i = rows; i < mr; ++i)
      for (std::int64_t p = 0; p < k; ++p) d[p * mr + i] = 0.0f;
#endif
  }
}

bool panel_kernel_reads(DType dt) noexcept {
#if defined(__AVX512F__)
#if defined(__AVX512BW__)
  if (dt == DType::bf16) return true;
#endif
  return dt == DType::f32 || dt == DType::f16;
#else
  return dt == DType::f32;
#endif
}

void gemm_panel_tile(const float* xp, std::int64_t m, std::int64_t mr, const void* wp, DType wdt,
                     std::int64_t k, std::int64_t panels, std::int64_t cols, float* out,
                     std::int64_t ldo, float alpha, float beta) {
  if (m == 0 || cols == 0) return;
#if defined(__AVX512F__)
  switch (wdt) {
#if defined(__AVX512BW__)
    case DType::bf16:
      panel_tile<Bf16Panel>(xp, m, mr, static_cast<const std::uint16_t*>(wp), k, panels, cols, out,
                            ldo, alpha, beta);
      return;
#endif
    case DType::f16:
      panel_tile<F16Panel>(xp, m, mr, static_cast<const std::uint16_t*>(wp), k, panels, cols, out,
                           ldo, alpha, beta);
      return;
    case DType::f32:
      panel_tile<F32Panel>(xp, m, mr, static_cast<const float*>(wp), k, panels, cols, out, ldo,
                           alpha, beta);
      return;
    default:
      break;
  }
#endif
  // Portable path: unpack the tile's panels and let Eigen compute.
  std::vector<float> w(static_cast<std::size_t>(cols * k)), x(static_cast<std::size_t>(m * k));
  panels_to_f32(wp, wdt, cols, k, w.data());
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t p = 0; p < k; ++p) x[i * k + p] = xp[(i / mr) * mr * k + p * mr + i % mr];
  eigen_tile(x.data(), k, w.data(), k, out, ldo, m, cols, k, alpha, beta);
  (void)panels;
}

void gemm_nt_tile(const float* x, std::int64_t ldx, const float* w, std::int64_t ldw, float* out,
                  std::int64_t ldo, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                  float beta) {
  if (m == 0 || n == 0) return;
#if defined(__AVX512F__)
  if (m <= 8) {
    dot_tile(x, ldx, w, ldw, out, ldo, m, n, k, alpha, beta);
    return;
  }
#endif
  eigen_tile(x, ldx, w, ldw, out, ldo, m, n, k, alpha, beta);
}

namespace {

// Element e's value as f32.
template <typename T>
float widen(T v, DType dt) {
  if constexpr (std::is_same_v<T, float>) {
    (void)dt;
    return v;
  } else {
    return half_to_float(v, dt);
  }
}

// Slot of panel row r within one step of a panel of dtype dt.
int panel_slot(int r, DType dt) {
  return dt == DType::bf16 ? bf16_panel_slot(r) : r;
}

template <typename T>
void to_panels_t(const T* src, DType dt, std::int64_t n, std::int64_t k, T* dst) {
  const std::int64_t panels = (n + kPanelRows - 1) / kPanelRows;
  for (std::int64_t p = 0; p < panels; ++p)
    for (int r = 0; r < kPanelRows; ++r) {
      const std::int64_t row = p * kPanelRows + r;
      T* d = dst + p * k * kPanelRows + panel_slot(r, dt);
      if (row < n) {
        const T* s = src + row * k;
        for (std::int64_t c = 0; c < k; ++c) d[c * kPanelRows] = s[c];
      } else {
        for (std::int64_t c = 0; c < k; ++c) d[c * kPanelRows] = T{};
      }
    }
}

template <typename T, typename U>
void from_panels_t(const T* src, DType dt, std::int64_t n, std::int64_t k, U* dst) {
  for (std::int64_t row = 0; row < n; ++row) {
    const T* s = src + (row / kPanelRows) * k * kPanelRows +
                 panel_slot(static_cast<int>(row % kPanelRows), dt);
    U* d = dst + row * k;
    for (std::int64_t c = 0; c < k; ++c) {
      if constexpr (std::is_same_v<T, U>)
        d[c] = s[c * kPanelRows];
      else
        d[c] = widen(s[c * kPanelRows], dt);
    }
  }
}

}  // namespace

void to_panels(const void* src, DType dt, std::int64_t n, std::int64_t k, void* dst) {
  if (dtype_size(dt) == 2)
    to_panels_t(static_cast<const std::uint16_t*>(src), dt, n, k, static_cast<std::uint16_t*>(dst));
  else
    to_panels_t(static_cast<const float*>(src), dt, n, k, static_cast<float*>(dst));
}

void from_panels(const void* src, DType dt, std::int64_t n, std::int64_t k, void* dst) {
  if (dtype_size(dt) == 2)
    from_panels_t(static_cast<const std::uint16_t*>(src), dt, n, k,
                  static_cast<std::uint16_t*>(dst));
  else
    from_panels_t(static_cast<const float*>(src), dt, n, k, static_cast<float*>(dst));
}

void panels_to_f32(const void* src, DType dt, std::int64_t n, std::int64_t k, float* dst) {
  if (dtype_size(dt) == 2)
    from_panels_t(static_cast<const std::uint16_t*>(src), dt, n, k, dst);
  else
    from_panels_t(static_cast<const float*>(src), dt, n, k, dst);
}

}  // namespace autoglm::detail
