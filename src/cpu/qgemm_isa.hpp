// SPDX-License-Identifier: Apache-2.0
// Internal interface between the INT8 GEMM dispatcher (qgemm_kernels.cpp, compiled for the
// baseline ISA) and the per-ISA kernel translation units (qgemm_avx2.cpp, qgemm_avxvnni.cpp,
// qgemm_avx512.cpp, qgemm_amx.cpp, each compiled with its own -m flags). The ISA units use no
// standard-library templates that could be emitted out of line: such a copy, built with
// AVX-512, might be the one the linker keeps for every unit, and the portable path would then
// fault on an older CPU. So they take their scratch memory from scratch(), and their scale
// layout from transpose_scales(), both defined in the baseline unit; their small vector helpers
// stay in each unit's anonymous namespace for the same reason.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/qgemm_kernels.hpp"

namespace autoglm::detail::q8::impl {

/// At least `bytes` of 64-byte aligned memory owned by the calling thread; valid until the next
/// call on the same thread (so one kernel call takes one block and carves it).
void* scratch(std::size_t bytes);

/// The scales of output columns [col0, col0 + 16 panels) of w as [panel][group][16], so a
/// micro-tile loads one vector per panel and group; with nst, -128 * the group sums likewise
/// (the W8A8 accumulators' start). Plain C++: every ISA unit shares it.
void transpose_scales(const QWeights& w, std::int64_t col0, std::int64_t panels, float* sct,
                      std::int32_t* nst);

/// Quadruples of k per group in the packed layout, or 0 when a quad would straddle two groups
/// (group not a multiple of 4 and more than one group): those shapes take the portable path.
constexpr std::int64_t quads_per_group(std::int64_t k, std::int64_t group) {
  if (group == k) return padded_depth(k) / 4;
  return group % 4 == 0 ? group / 4 : 0;
}

void quantize_avx2(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k,
                   std::int64_t group, std::uint8_t* xq, std::int64_t ldq, float* xs);
void gemm_w8a8_avx2(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
                    const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
                    std::int64_t ldo);
void gemm_wonly_avx2(const float* x, std::int64_t ldx, std::int64_t m, const QWeights& w,
                     std::int64_t col0, std::int64_t cols, float* out, std::int64_t ldo);
/// The avx2 W8A8 tile with 256-bit vpdpbusd (AVX-VNNI); the same results bit for bit.
void gemm_w8a8_avxvnni(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
                       const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
                       std::int64_t ldo);
/// Whether the avx2 W8A8 path uses AVX-VNNI: the CPU has it and AUTOGLM_Q8_AVXVNNI is not "0".
bool avxvnni_enabled() noexcept;
/// Turns AVX-VNNI use off, or back on where avxvnni_available (tests compare both).
void set_avxvnni_enabled(bool on) noexcept;
/// Whether this CPU and OS run AVX-VNNI (and AVX2 with FMA).
bool avxvnni_available() noexcept;

void quantize_avx512(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k,
                     std::int64_t group, std::uint8_t* xq, std::int64_t ldq, float* xs);
void gemm_w8a8_avx512(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
                      const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
                      std::int64_t ldo);
void gemm_wonly_avx512(const float* x, std::int64_t ldx, std::int64_t m, const QWeights& w,
                       std::int64_t col0, std::int64_t cols, float* out, std::int64_t ldo);

/// Rows from which the avx512_vnni W8A8 path hands a tile to AMX.
inline constexpr std::int64_t kAmxMinRows = 16;
/// Whether the avx512_vnni W8A8 path may use AMX-INT8 tiles: the CPU has them, Linux granted
/// the tile state, and AUTOGLM_Q8_AMX is not "0".
bool amx_enabled() noexcept;
/// Turns AMX use off, or back on where amx_available (tests compare both).
void set_amx_enabled(bool on) noexcept;
/// Whether this CPU and OS can run the AMX kernel at all.
bool amx_available() noexcept;
/// Shapes the AMX kernel takes: whole 64-byte tile steps per group.
constexpr bool amx_applies(std::int64_t m, std::int64_t group) {
  return m >= kAmxMinRows && group % 64 == 0;
}
void gemm_w8a8_amx(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
                   const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
                   std::int64_t ldo);

}  // namespace autoglm::detail::q8::impl
