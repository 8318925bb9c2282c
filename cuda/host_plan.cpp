// SPDX-License-Identifier: Apache-2.0
#include "host_plan.hpp"

#include <algorithm>
#include <limits>

#include "autoglm/core/error.hpp"

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
  // Same checks, order and wording as CpuBackend::grouped_gemm.
  AUTOGLM_CHECK(off[0] == 0 && off[E] <= total_rows, invalid_argument, fn,
                "offsets must start at 0 and end within {} rows, got [{}, {}]", total_rows, off[0],
                off[E]);
  for (std::int64_t e = 0; e < E; ++e)
    AUTOGLM_CHECK(off[e] <= off[e + 1], invalid_argument, fn,
                  "offsets decrease at expert {}: {} > {}", e, off[e], off[e + 1]);
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

std::string format_cuda_error(std::string_view call, int code, std::string_view name,
                              std::string_view text) {
  return fmt::format("{} failed: {} ({}): {}", call, name, code, text);
}

void throw_cuda_error(std::string_view call, int code, std::string_view name,
                      std::string_view text) {
  throw Error(ErrorCode::device, "CudaBackend", format_cuda_error(call, code, name, text));
}

}  // namespace autoglm::cuda_detail
