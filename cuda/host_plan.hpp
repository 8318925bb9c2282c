// SPDX-License-Identifier: Apache-2.0
// Host-side logic of the CUDA backend that needs no GPU: launch shapes, the grouped-GEMM plan
// (which experts have rows, and where), limits of the kernels, and the text of CUDA failures.
// Plain C++ (no CUDA headers), so the CPU-only test suite checks all of it on any machine.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace autoglm::cuda_detail {

/// A one-dimensional kernel launch: blocks of `block` threads, `grid` blocks.
struct LaunchConfig {
  std::uint32_t grid = 0;   ///< blocks; 0 = nothing to launch
  std::uint32_t block = 0;  ///< threads per block
};

/// Most blocks a grid-stride launch uses: enough to fill any current GPU several times over;
/// the kernels loop over the rest.
inline constexpr std::uint32_t kMaxGridStrideBlocks = 65535;

/// Launch of a grid-stride loop over n elements with `block` threads per block (a multiple of
/// 32): ceil(n / block) blocks, at most kMaxGridStrideBlocks; grid 0 when n <= 0.
LaunchConfig elementwise_launch(std::int64_t n, std::uint32_t block = 256);

/// Threads per block of a kernel that reduces one row of `cols` values per block: the
/// smallest multiple of 32 covering cols, within [32, max_block] (max_block a multiple of 32).
std::uint32_t row_block(std::int64_t cols, std::uint32_t max_block = 256);

/// One active expert of a grouped GEMM: rows [row0, row0 + rows) of x and out.
struct ExpertRows {
  std::int64_t expert = 0;  ///< expert index e
  std::int64_t row0 = 0;    ///< offsets[e]
  std::int64_t rows = 0;    ///< offsets[e + 1] - offsets[e], > 0
};

/// Validates grouped-GEMM offsets[0 .. experts] against x's `total_rows` exactly as the CPU
/// backend does (same autoglm::Error codes and messages, under the name `fn`) and returns the
/// experts with at least one row, in expert order.
std::vector<ExpertRows> plan_grouped_gemm(const std::int32_t* offsets, std::int64_t experts,
                                          std::int64_t total_rows, std::string_view fn);

/// Throws autoglm::Error(unsupported) naming `fn` and `what` unless 0 <= v <= INT32_MAX
/// (cuBLAS takes int extents and leading dimensions); returns v as int.
int checked_int(std::int64_t v, std::string_view fn, std::string_view what);

/// Dynamic shared memory bytes of the route_topk kernel: scores, selection scores, taken
/// flags and chosen ids per expert, group scores and flags per group.
std::size_t route_topk_shared_bytes(std::int64_t experts, std::int64_t n_group, std::int64_t top_k);

/// Dynamic shared memory a kernel may use without opting in (48 KiB on every CUDA GPU).
inline constexpr std::size_t kDefaultSharedBytes = 48 * 1024;

/// Largest value head dimension the attention kernel holds in registers (32 lanes x 16).
inline constexpr std::int64_t kMaxAttentionValueDim = 32 * 16;

/// Dynamic shared memory bytes of the attention kernel: the query row, and per warp its
/// running max, sum and value accumulator.
std::size_t attention_shared_bytes(std::int64_t head_dim, std::int64_t value_dim, std::uint32_t warps);

/// "<call> failed: <name> (<code>): <text>", e.g. "cudaMalloc failed: cudaErrorMemoryAllocation
/// (2): out of memory".
std::string format_cuda_error(std::string_view call, int code, std::string_view name,
                              std::string_view text);

/// Throws autoglm::Error(ErrorCode::device, "CudaBackend", format_cuda_error(...)).
[[noreturn]] void throw_cuda_error(std::string_view call, int code, std::string_view name,
                                   std::string_view text);

/// "no value fails" marker of the device-side first-failure scans.
inline constexpr std::uint64_t kNoFailure = ~std::uint64_t{0};

}  // namespace autoglm::cuda_detail
