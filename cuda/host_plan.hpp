// SPDX-License-Identifier: Apache-2.0
// Host-side logic of the CUDA backend that needs no GPU: launch shapes, the grouped-GEMM plan
// (which experts have rows, and where), the int8 GEMM plans, limits of the kernels, and the
// text of CUDA failures.
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
std::size_t attention_shared_bytes(std::int64_t head_dim, std::int64_t value_dim,
                                   std::uint32_t warps);

// ---------------------------------------------------------------- int8 GEMM (qgemm)

/// Most rows of x the warp-per-output kernel takes (decode); more run the tiled kernel.
inline constexpr std::int64_t kQRowsMax = 8;
/// Warps (= output columns) per block of the warp-per-output kernel.
inline constexpr std::uint32_t kQRowsWarps = 8;
/// Output tile of the tiled int8 kernels: kQTile x kQTile, 256 threads of 4 x 4 outputs.
inline constexpr std::int64_t kQTile = 64;
/// Depth of a tile: it divides every group size (32, 64, 128), so a depth tile never
/// straddles two scales.
inline constexpr std::int64_t kQTileK = 32;
/// Longest run of int8 x int8 products summed in int32 without overflow
/// (127 * 127 * n <= INT32_MAX): the W8A8 kernels sum one scale group in int32.
inline constexpr std::int64_t kMaxInt32DotLength = 2147483647 / (127 * 127);
/// Longest weight row (K) of the int8 kernels, which index rows with 32-bit ints.
inline constexpr std::int64_t kMaxQGemmDepth = std::int64_t{1} << 30;

/// Which kernel an int8 product runs.
enum class QKernel : std::uint8_t {
  rows,   ///< one warp per output column (weight row), all rows of x at once: decode
  tiled,  ///< kQTile x kQTile output tiles through shared memory: prefill
};

/// Launch of one int8 product out[m, n] = x[m, k] * dequant(w[n, k])^T.
struct QGemmPlan {
  QKernel kernel = QKernel::rows;  ///< decode or prefill kernel
  int rows_per_pass = 0;           ///< rows kernel: rows of x each warp holds (1, 2, 4 or 8 >= m)
  int vec = 1;                     ///< weight bytes per lane load: 16 (int4 loads) or 1
  std::uint32_t grid_x = 0;        ///< blocks along n; 0 = nothing to launch
  std::uint32_t grid_y = 0;        ///< blocks along m (tiled), else 1
  std::uint32_t block = 0;         ///< threads per block
};

/// The plan of an int8 product of m rows; `vec16`: 16-byte loads are safe (see qgemm_vec16).
/// `group` is the scale group (k per channel) and `w8a8` the activation mode. Errors
/// (unsupported, naming fn): k beyond kMaxQGemmDepth, a grid beyond CUDA's limits, or a W8A8
/// group longer than kMaxInt32DotLength.
QGemmPlan plan_qgemm(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t group, bool w8a8,
                     bool vec16, std::string_view fn);

/// Whether the 16-byte vector path applies to weight rows of k int8 (and f32 activation rows
/// of k floats): k % 16 == 0 and the weight and activation base addresses 16-byte aligned
/// (0 = not read, e.g. the W8A8 activations, always aligned).
bool qgemm_vec16(std::int64_t k, std::uintptr_t weights, std::uintptr_t activations);

/// Bytes per row of the quantised W8A8 activations: k rounded up to kQTileK (zero padding),
/// so rows start 16-byte aligned and a depth tile never reads past a row.
std::int64_t quantized_row_stride(std::int64_t k);

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
