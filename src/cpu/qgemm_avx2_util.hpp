// SPDX-License-Identifier: Apache-2.0
// Vector helpers of the 256-bit INT8 kernel units (qgemm_avx2.cpp, qgemm_avxvnni.cpp), included
// only by units compiled with AVX2 and FMA. They live in an anonymous namespace so that each
// unit keeps its own copy, built with its own flags (see qgemm_isa.hpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace autoglm::detail::q8::impl {
namespace {

inline std::int64_t imin(std::int64_t a, std::int64_t b) {
  return a < b ? a : b;
}

// Lanes [0, valid) set, for _mm256_maskload_ps / maskstore_ps.
inline __m256i lane_mask(std::int64_t valid) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int v = static_cast<int>(valid < 0 ? 0 : (valid > 8 ? 8 : valid));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(v), iota);
}

// Stores f times the weight scales scv times the activation scale xsv (8 columns) to o, only
// lanes of m, adding o's old value unless first: the W8A8 epilogue of every path, in the same
// order.
inline void finish8(float* o, __m256i m, __m256 f, __m256 scv, bool first, float xsv) {
  const __m256 st = _mm256_mul_ps(scv, _mm256_set1_ps(xsv));
  const __m256 r = first ? _mm256_mul_ps(f, st) : _mm256_fmadd_ps(f, st, _mm256_maskload_ps(o, m));
  _mm256_maskstore_ps(o, m, r);
}

}  // namespace
}  // namespace autoglm::detail::q8::impl
