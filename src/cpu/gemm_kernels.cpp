// SPDX-License-Identifier: Apache-2.0
#include "cpu/gemm_kernels.hpp"

#include <algorithm>
#include <cstring>

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
  for (; i + 4 <= m; i += 4) dot_rows<4>(x + i * ldx, ldx, w, ldw, out + i * ldo, ldo, n, k, alpha, beta);
  switch (m - i) {
    case 3: dot_rows<3>(x + i * ldx, ldx, w, ldw, out + i * ldo, ldo, n, k, alpha, beta); break;
    case 2: dot_rows<2>(x + i * ldx, ldx, w, ldw, out + i * ldo, ldo, n, k, alpha, beta); break;
    case 1: dot_rows<1>(x + i * ldx, ldx, w, ldw, out + i * ldo, ldo, n, k, alpha, beta); break;
    default: break;
  }
}

// Broadcast kernel: vectors run along the (packed, transposed) token rows; each weight element is
// broadcast once and multiplies up to 64 rows, so weights are read from memory exactly once per
// 64 rows. xp: [k][16 * MV]; acc[j][v] holds weight row j against rows 16v..16v+15.
template <int MV, int NR>
void bcast_kernel(const float* xp, const float* w, std::int64_t ldw, float* out, std::int64_t ldo,
                  std::int64_t rows, std::int64_t k, float alpha, float beta) {
  __m512 acc[NR][MV];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_setzero_ps();
  constexpr std::int64_t stride = 16 * MV;
  for (std::int64_t p = 0; p < k; ++p) {
    __m512 xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = _mm512_loadu_ps(xp + p * stride + 16 * v);
    if ((p & 15) == 0)
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + p + 256), _MM_HINT_T0);
    for (int j = 0; j < NR; ++j) {
      const __m512 wb = _mm512_set1_ps(w[j * ldw + p]);
      for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_fmadd_ps(xv[v], wb, acc[j][v]);
    }
  }
  alignas(64) float buf[16];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v) {
      _mm512_store_ps(buf, acc[j][v]);
      const std::int64_t r0 = 16 * v;
      const std::int64_t cnt = std::min<std::int64_t>(16, rows - r0);
      for (std::int64_t r = 0; r < cnt; ++r) {
        float* o = out + (r0 + r) * ldo + j;
        *o = finish(buf[r], alpha, beta, o);
      }
    }
}

template <int MV>
constexpr int bcast_nr() {
  return MV == 1 ? 16 : (MV == 2 ? 12 : (MV == 3 ? 8 : 6));
}

// Runs bcast_kernel<MV, nr> for a weight-group width nr chosen by the widest row block.
template <int MV>
void bcast_width(int nr, const float* xp, const float* w, std::int64_t ldw, float* out,
                 std::int64_t ldo, std::int64_t rows, std::int64_t kc, float alpha, float beta) {
  switch (nr) {
    case 16: bcast_kernel<MV, 16>(xp, w, ldw, out, ldo, rows, kc, alpha, beta); break;
    case 12: bcast_kernel<MV, 12>(xp, w, ldw, out, ldo, rows, kc, alpha, beta); break;
    case 8: bcast_kernel<MV, 8>(xp, w, ldw, out, ldo, rows, kc, alpha, beta); break;
    default: bcast_kernel<MV, 6>(xp, w, ldw, out, ldo, rows, kc, alpha, beta); break;
  }
}

#endif  // __AVX512F__

}  // namespace

bool have_simd_kernels() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

std::int64_t packed_rows_size(std::int64_t m, std::int64_t k) {
  const std::int64_t full = m / PackedRows::kPackRows, rest = m % PackedRows::kPackRows;
  return full * k * PackedRows::kPackRows + (rest ? k * ((rest + 15) / 16 * 16) : 0);
}

void pack_rows(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k, float* dst) {
  for (std::int64_t b0 = 0; b0 < m; b0 += PackedRows::kPackRows) {
    const std::int64_t rows = std::min(PackedRows::kPackRows, m - b0);
    const std::int64_t stride = (rows + 15) / 16 * 16;
    float* d = dst + b0 * k;  // earlier blocks are full: 64 * k floats each
    for (std::int64_t p = 0; p < k; ++p) {
      float* dp = d + p * stride;
      for (std::int64_t r = 0; r < rows; ++r) dp[r] = x[(b0 + r) * ldx + p];
      for (std::int64_t r = rows; r < stride; ++r) dp[r] = 0.0f;
    }
  }
}

void gemm_nt_tile(const float* x, std::int64_t ldx, const PackedRows* packed, const float* w,
                  std::int64_t ldw, float* out, std::int64_t ldo, std::int64_t m, std::int64_t n,
                  std::int64_t k, float alpha, float beta) {
  if (m == 0 || n == 0) return;
#if defined(__AVX512F__)
  if (m < 5 || packed == nullptr || packed->rows != m || packed->k != k) {
    if (m <= 8) {
      dot_tile(x, ldx, w, ldw, out, ldo, m, n, k, alpha, beta);
      return;
    }
    eigen_tile(x, ldx, w, ldw, out, ldo, m, n, k, alpha, beta);
    return;
  }
  // All row blocks share one register-tile width so each weight group is loaded into L1 once
  // per depth block and reused by every row block; depth blocks keep a packed row block in L2.
  const int mv_max = static_cast<int>((std::min(m, PackedRows::kPackRows) + 15) / 16);
  const int nr = mv_max == 1 ? bcast_nr<1>() : mv_max == 2 ? bcast_nr<2>() : mv_max == 3 ? bcast_nr<3>() : bcast_nr<4>();
  const std::int64_t n_full = n / nr * nr;
  constexpr std::int64_t kc_max = 256;
  for (std::int64_t k0 = 0; k0 < k; k0 += kc_max) {
    const std::int64_t kc = std::min(kc_max, k - k0);
    const float b = k0 == 0 ? beta : 1.0f;
    for (std::int64_t j = 0; j < n_full; j += nr) {
      for (std::int64_t b0 = 0; b0 < m; b0 += PackedRows::kPackRows) {
        const std::int64_t rows = std::min(PackedRows::kPackRows, m - b0);
        const std::int64_t stride = (rows + 15) / 16 * 16;
        const float* xp = packed->data + b0 * k + k0 * stride;
        const float* wj = w + j * ldw + k0;
        float* o = out + b0 * ldo + j;
        const int mv = static_cast<int>(stride / 16);
        // A narrower last row block keeps the weight-group width and uses fewer vectors.
        switch (mv) {
          case 1: bcast_width<1>(nr, xp, wj, ldw, o, ldo, rows, kc, alpha, b); break;
          case 2: bcast_width<2>(nr, xp, wj, ldw, o, ldo, rows, kc, alpha, b); break;
          case 3: bcast_width<3>(nr, xp, wj, ldw, o, ldo, rows, kc, alpha, b); break;
          default: bcast_width<4>(nr, xp, wj, ldw, o, ldo, rows, kc, alpha, b); break;
        }
      }
    }
  }
  if (n_full < n)
    dot_tile(x, ldx, w + n_full * ldw, ldw, out + n_full, ldo, m, n - n_full, k, alpha, beta);
#else
  (void)packed;
  eigen_tile(x, ldx, w, ldw, out, ldo, m, n, k, alpha, beta);
#endif
}

}  // namespace autoglm::detail
