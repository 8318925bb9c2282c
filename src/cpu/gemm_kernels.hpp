// SPDX-License-Identifier: Apache-2.0
// FP32 "NT" GEMM kernels of the CPU backend: out[m, n] = alpha * x[m, k] * w[n, k]^T + beta * out,
// with w in the Hugging Face [out, in] layout, used in place (never repacked).
#pragma once

#include <cstdint>
#include <vector>

namespace autoglm::detail {

/// x^T packed for the broadcast kernel: blocks of at most kPackRows rows, each stored [k][rows
/// padded to 16] so one zmm load reads one k for 16 rows.
struct PackedRows {
  static constexpr std::int64_t kPackRows = 64;  ///< rows per block (4 zmm)
  const float* data = nullptr;  ///< block b of rows [64b, ...) starts at data + b * k * 64
  std::int64_t rows = 0;        ///< m
  std::int64_t k = 0;           ///< depth
};

/// Floats needed to pack m rows of depth k.
std::int64_t packed_rows_size(std::int64_t m, std::int64_t k);
/// Packs x [m, k] (row stride ldx) into dst (packed_rows_size floats).
void pack_rows(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k, float* dst);
/// True when this build has the AVX-512 kernels (else Eigen computes every tile).
bool have_simd_kernels();

/// One output tile: rows [0, m) of x, weight rows [0, n). `packed` may be null; when given it
/// holds x packed by pack_rows and is used for m >= 5.
void gemm_nt_tile(const float* x, std::int64_t ldx, const PackedRows* packed, const float* w,
                  std::int64_t ldw, float* out, std::int64_t ldo, std::int64_t m, std::int64_t n,
                  std::int64_t k, float alpha, float beta);

}  // namespace autoglm::detail
