// SPDX-License-Identifier: Apache-2.0
// AVX-VNNI path of the W8A8 GEMM: 256-bit vpdpbusd (u8 x s8 -> s32, 4 bytes per lane), which CPUs
// with AVX2 but without AVX-512 may have (Intel client cores from Alder Lake on; AMD Zen 5 has it
// beside AVX-512). Compiled with those flags only; the avx2 W8A8 path calls it after the
// dispatcher has seen the CPU run it (AUTOGLM_Q8_AVXVNNI=0 keeps vpmaddwd).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstring>

#include "cpu/qgemm_avx2_util.hpp"
#include "cpu/qgemm_isa.hpp"

namespace autoglm::detail::q8::impl {
namespace {

constexpr int kMR = 6;  // rows per micro-tile: 12 accumulators of the 16 ymm registers

inline std::int32_t load_i32(const void* p) {
  std::int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One panel (16 output columns as two halves of 8) x MR rows over all of k. Each group's sums
// start at -128 * (its weight sum), which removes the +128 of the u8 activations exactly.
template <int MR>
void micro(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t ng,
           const std::int8_t* wp, std::int64_t kq, std::int64_t qpg, const float* sc,
           const std::int32_t* ns, float* out, std::int64_t ldo, __m256i m0, __m256i m1) {
  for (std::int64_t g = 0, q0 = 0; q0 < kq; q0 += qpg, ++g) {
    __m256i acc[MR][2];
    const __m256i n0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ns + g * kPanel));
    const __m256i n1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ns + g * kPanel + 8));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = n0;
      acc[i][1] = n1;
    }
    for (std::int64_t q = q0; q < q0 + qpg; ++q) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 64 + 32));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256i xb = _mm256_set1_epi32(load_i32(xq + i * ldq + q * 4));
        acc[i][0] = _mm256_dpbusd_avx_epi32(acc[i][0], xb, w0);
        acc[i][1] = _mm256_dpbusd_avx_epi32(acc[i][1], xb, w1);
      }
    }
    const __m256 s0 = _mm256_loadu_ps(sc + g * kPanel), s1 = _mm256_loadu_ps(sc + g * kPanel + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      float* o = out + i * ldo;
      const float xsv = xs[i * ng + g];
      finish8(o, m0, _mm256_cvtepi32_ps(acc[i][0]), s0, g == 0, xsv);
      finish8(o + 8, m1, _mm256_cvtepi32_ps(acc[i][1]), s1, g == 0, xsv);
    }
  }
}

using MicroFn = void (*)(const std::uint8_t*, std::int64_t, const float*, std::int64_t,
                         const std::int8_t*, std::int64_t, std::int64_t, const float*,
                         const std::int32_t*, float*, std::int64_t, __m256i, __m256i);

template <int MR = 1>
MicroFn micro_kernel(int mr) {
  if constexpr (MR < kMR) {
    if (mr > MR) return micro_kernel<MR + 1>(mr);
  }
  return micro<MR>;
}

}  // namespace

void gemm_w8a8_avxvnni(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
                       const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
                       std::int64_t ldo) {
  const std::int64_t kq = padded_depth(w.k) / 4, ng = w.k / w.group;
  const std::int64_t qpg = quads_per_group(w.k, w.group);
  const std::int64_t panels = (cols + kPanel - 1) / kPanel;
  const std::int64_t elems = panels * ng * kPanel;
  auto* base = static_cast<char*>(scratch(static_cast<std::size_t>(2 * elems * 4 + 64)));
  auto* sct = reinterpret_cast<float*>(base);
  auto* nst = reinterpret_cast<std::int32_t*>(base + elems * 4);
  transpose_scales(w, col0, panels, sct, nst);
  // Balanced row blocks of at most kMR: later blocks read the panel from cache.
  const std::int64_t blocks = (m + kMR - 1) / kMR, rows = (m + blocks - 1) / blocks;
  const std::int64_t pstride = kq * 64;
  for (std::int64_t p = 0; p < panels; ++p) {
    const __m256i m0 = lane_mask(cols - p * kPanel), m1 = lane_mask(cols - p * kPanel - 8);
    const std::int8_t* wp = w.data + (col0 / kPanel + p) * pstride;
    for (std::int64_t i0 = 0; i0 < m; i0 += rows)
      micro_kernel(static_cast<int>(imin(rows, m - i0)))(
          xq + i0 * ldq, ldq, xs + i0 * ng, ng, wp, kq, qpg, sct + p * ng * kPanel,
          nst + p * ng * kPanel, out + i0 * ldo + p * kPanel, ldo, m0, m1);
  }
}

}  // namespace autoglm::detail::q8::impl

#endif  // x86-64
