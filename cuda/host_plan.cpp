// SPDX-License-Identifier: Apache-2.0
#include "host_plan.hpp"

#include <algorithm>
#include <limits>

#include "autoglm/core/error.hpp"
#include "common/checks.hpp"

namespace autoglm::cuda_detail {

LaunchConfig elementwise_launch(std::int64_t n, std::uint32_t block) {
  if (n <= 0 || block == 0) return {};
  const std::int64_t blocks = (n + block - 1) / block;
  return {static_cast<std::uint32_t>(std::min<std::int64_t>(blocks, kMaxGridStrideBlocks)), block};
}

std::uint32_t row_block(std::int64_t cols, std::uint32_t max_block) {
  const std::int64_t covered = (std::max<std::int64_t>(cols, 1) + 31) / 32 * 32;
  return static_cast<std::uint32_t>(std::clamp<std::int64_t>(covered, 32, max_block));
}

std::vector<ExpertRows> plan_grouped_gemm(const std::int32_t* off, std::int64_t E,
                                          std::int64_t total_rows, std::string_view fn) {
  detail::check_offsets(fn, off, E, total_rows);  // as CpuBackend::grouped_gemm
  std::vector<ExpertRows> active;
  for (std::int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e]) active.push_back({e, off[e], off[e + 1] - off[e]});
  return active;
}

int checked_int(std::int64_t v, std::string_view fn, std::string_view what) {
  AUTOGLM_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), unsupported, fn,
                "{}={} exceeds the int range cuBLAS takes", what, v);
  return static_cast<int>(v);
}

std::size_t route_topk_shared_bytes(std::int64_t E, std::int64_t n_group, std::int64_t top_k) {
  // floats: scores[E], sel[E], gscore[n_group]; ints: taken[E], gkeep[n_group], idx[top_k].
  return static_cast<std::size_t>(3 * E + 2 * n_group + top_k) * 4;
}

std::size_t attention_shared_bytes(std::int64_t D, std::int64_t Dv, std::uint32_t warps) {
  // q[D], then per warp: max, sum, acc[Dv].
  return static_cast<std::size_t>(D + warps * (2 + Dv)) * 4;
}

QGemmPlan plan_qgemm(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t group, bool w8a8,
                     bool vec16, std::string_view fn) {
  AUTOGLM_CHECK(!w8a8 || group <= kMaxInt32DotLength, unsupported, fn,
                "{} columns per scale exceed the {} that W8A8 sums in int32", group,
                kMaxInt32DotLength);
  // The kernels index a weight row with 32-bit ints (a lane may step past k by one pass).
  AUTOGLM_CHECK(k <= kMaxQGemmDepth, unsupported, fn, "K={} exceeds the int8 kernels' {}", k,
                kMaxQGemmDepth);
  QGemmPlan p;
  p.vec = vec16 ? 16 : 1;
  if (m <= 0 || n <= 0 || k <= 0) return p;
  constexpr std::int64_t kMaxGridX = std::numeric_limits<std::int32_t>::max(), kMaxGridY = 65535;
  if (m <= kQRowsMax) {
    // Decode is bandwidth-bound: each weight row is read once, by one warp, for all m rows.
    p.kernel = QKernel::rows;
    p.rows_per_pass = m == 1 ? 1 : m == 2 ? 2 : m <= 4 ? 4 : 8;
    const std::int64_t blocks = (n + kQRowsWarps - 1) / kQRowsWarps;
    AUTOGLM_CHECK(blocks <= kMaxGridX, unsupported, fn, "N={} exceeds the int8 kernel's grid", n);
    p.grid_x = static_cast<std::uint32_t>(blocks);
    p.grid_y = 1;
    p.block = 32 * kQRowsWarps;
    return p;
  }
  p.kernel = QKernel::tiled;
  const std::int64_t bx = (n + kQTile - 1) / kQTile, by = (m + kQTile - 1) / kQTile;
  AUTOGLM_CHECK(bx <= kMaxGridX && by <= kMaxGridY, unsupported, fn,
                "M={} N={} exceed the int8 kernel's grid", m, n);
  p.grid_x = static_cast<std::uint32_t>(bx);
  p.grid_y = static_cast<std::uint32_t>(by);
  p.block = 256;
  return p;
}

bool qgemm_vec16(std::int64_t k, std::uintptr_t weights, std::uintptr_t activations) {
  return k % 16 == 0 && weights % 16 == 0 && activations % 16 == 0;
}

std::int64_t quantized_row_stride(std::int64_t k) {
  return (std::max<std::int64_t>(k, 0) + kQTileK - 1) / kQTileK * kQTileK;
}

std::string format_cuda_error(std::string_view call, int code, std::string_view name,
                              std::string_view text) {
  return fmt::format("{} failed: {} ({}): {}", call, name, code, text);
}

void throw_cuda_error(std::string_view call, int code, std::string_view name,
                      std::string_view text) {
  throw Error(ErrorCode::device, "CudaBackend", format_cuda_error(call, code, name, text));
}

}  // namespace autoglm::cuda_detail
