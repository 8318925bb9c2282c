// SPDX-License-Identifier: Apache-2.0
// The CUDA backend's host-side logic (cuda/host_plan.cpp), compiled without CUDA into the
// CPU test suite so that it is checked on every machine: launch shapes, the grouped-GEMM plan
// and its errors (the same as the CPU backend's), the int8 GEMM plans, kernel limits and CUDA
// error messages.
#include <limits>

#include "host_plan.hpp"
#include "support.hpp"

using namespace autoglm;
using namespace autoglm::cuda_detail;

TEST_CASE("cuda host: grid-stride launch shapes", "[cuda_host]") {
  CHECK(elementwise_launch(0).grid == 0);
  CHECK(elementwise_launch(-5).grid == 0);
  LaunchConfig lc = elementwise_launch(1);
  CHECK(lc.grid == 1);
  CHECK(lc.block == 256);
  CHECK(elementwise_launch(256).grid == 1);
  CHECK(elementwise_launch(257).grid == 2);
  CHECK(elementwise_launch(1000, 64).grid == 16);
  CHECK(elementwise_launch(1000, 64).block == 64);
  // Huge tensors: the grid is capped, the kernels loop (grid * block * iterations >= n).
  const std::int64_t huge = std::int64_t{1} << 40;
  lc = elementwise_launch(huge);
  CHECK(lc.grid == kMaxGridStrideBlocks);
  CHECK(lc.block == 256);
}

TEST_CASE("cuda host: row reduction block sizes", "[cuda_host]") {
  CHECK(row_block(0) == 32);
  CHECK(row_block(1) == 32);
  CHECK(row_block(32) == 32);
  CHECK(row_block(33) == 64);
  CHECK(row_block(200) == 224);
  CHECK(row_block(4096) == 256);
  CHECK(row_block(4096, 128) == 128);
  for (std::int64_t c : {1, 7, 31, 64, 65, 100, 1000}) {
    const std::uint32_t b = row_block(c);
    CHECK(b % 32 == 0);
    CHECK(b >= 32);
    CHECK(b <= 256);
  }
}

TEST_CASE("cuda host: grouped GEMM plan lists active experts and their rows", "[cuda_host]") {
  const std::vector<std::int32_t> off{0, 0, 4, 4, 9, 12};  // experts 0 and 2 empty
  const auto plan = plan_grouped_gemm(off.data(), 5, 14, "CudaBackend::grouped_gemm");
  REQUIRE(plan.size() == 3);
  CHECK(plan[0].expert == 1);
  CHECK(plan[0].row0 == 0);
  CHECK(plan[0].rows == 4);
  CHECK(plan[1].expert == 3);
  CHECK(plan[1].row0 == 4);
  CHECK(plan[1].rows == 5);
  CHECK(plan[2].expert == 4);
  CHECK(plan[2].row0 == 9);
  CHECK(plan[2].rows == 3);
  const std::vector<std::int32_t> none(6, 0);
  CHECK(plan_grouped_gemm(none.data(), 5, 14, "f").empty());
  const std::vector<std::int32_t> one{0};
  CHECK(plan_grouped_gemm(one.data(), 0, 0, "f").empty());

  // The CPU backend's errors, word for word (tests/test_backend.cpp checks these texts).
  const std::string fn = "CudaBackend::grouped_gemm";
  const std::vector<std::int32_t> dec{0, 5, 3, 4, 9, 12}, past{0, 0, 4, 4, 9, 15},
      start{1, 2, 4, 4, 9, 12};
  REQUIRE_ERROR(plan_grouped_gemm(dec.data(), 5, 14, fn), invalid_argument, "grouped_gemm]",
                "offsets decrease at expert 1: 5 > 3");
  REQUIRE_ERROR(plan_grouped_gemm(past.data(), 5, 14, fn), invalid_argument, "grouped_gemm]",
                "within 14 rows", "[0, 15]");
  REQUIRE_ERROR(plan_grouped_gemm(start.data(), 5, 14, fn), invalid_argument, "grouped_gemm]",
                "start at 0");
}

TEST_CASE("cuda host: int8 GEMM plans", "[cuda_host]") {
  const std::string fn = "CudaBackend::qgemm";
  // Decode: a warp per output column, 8 per block, every row of x in one pass.
  for (auto [m, mr] :
       {std::pair<std::int64_t, int>{1, 1}, {2, 2}, {3, 4}, {4, 4}, {5, 8}, {8, 8}}) {
    const QGemmPlan p = plan_qgemm(m, 1000, 2048, 0, false, true, fn);
    CHECK(p.kernel == QKernel::rows);
    CHECK(p.rows_per_pass == mr);
    CHECK(p.rows_per_pass >= m);
    CHECK(p.grid_x == 125);
    CHECK(p.grid_y == 1);
    CHECK(p.block == 32 * kQRowsWarps);
    CHECK(p.vec == 16);
  }
  CHECK(plan_qgemm(1, 1001, 64, 32, true, false, fn).grid_x == 126);  // a partial last block
  CHECK(plan_qgemm(1, 1, 64, 32, true, false, fn).vec == 1);
  // Prefill: 64 x 64 tiles, ceil(n / 64) x ceil(m / 64) blocks of 256 threads.
  QGemmPlan t = plan_qgemm(kQRowsMax + 1, 1000, 96, 32, true, true, fn);
  CHECK(t.kernel == QKernel::tiled);
  CHECK(t.grid_x == 16);
  CHECK(t.grid_y == 1);
  CHECK(t.block == 256);
  t = plan_qgemm(130, 64, 4096, 128, false, true, fn);
  CHECK(t.grid_x == 1);
  CHECK(t.grid_y == 3);
  // Nothing to do: no launch.
  CHECK(plan_qgemm(0, 64, 64, 0, false, true, fn).grid_x == 0);
  CHECK(plan_qgemm(4, 0, 64, 0, false, true, fn).grid_x == 0);
  CHECK(plan_qgemm(4, 64, 0, 0, false, true, fn).grid_x == 0);
  // Limits: the W8A8 int32 group sums, the 32-bit row index, the grid.
  CHECK(plan_qgemm(1, 8, kMaxInt32DotLength, kMaxInt32DotLength, true, false, fn).grid_x == 1);
  REQUIRE_ERROR(plan_qgemm(1, 8, kMaxInt32DotLength + 1, kMaxInt32DotLength + 1, true, false, fn),
                unsupported, "[CudaBackend::qgemm]", "W8A8 sums in int32");
  CHECK(plan_qgemm(1, 8, kMaxInt32DotLength + 1, kMaxInt32DotLength + 1, false, false, fn).grid_x ==
        1);  // weight-only sums in f32: no such limit
  REQUIRE_ERROR(plan_qgemm(1, 8, kMaxQGemmDepth + 32, 32, false, false, fn), unsupported,
                "K=1073741856");
  REQUIRE_ERROR(plan_qgemm(65535 * kQTile + 1, 8, 64, 0, false, true, fn), unsupported, "grid");
  CHECK(plan_qgemm(65535 * kQTile, 8, 64, 0, false, true, fn).grid_y == 65535);
}

TEST_CASE("cuda host: int8 vector loads and activation rows", "[cuda_host]") {
  CHECK(qgemm_vec16(2048, 0x10000, 0x20000));
  CHECK(qgemm_vec16(48, 0x10000, 0));              // W8A8: no f32 rows read
  CHECK_FALSE(qgemm_vec16(40, 0x10000, 0x20000));  // rows of 40 bytes lose the alignment
  CHECK_FALSE(qgemm_vec16(64, 0x10001, 0x20000));
  CHECK_FALSE(qgemm_vec16(64, 0x10000, 0x20004));
  CHECK(quantized_row_stride(0) == 0);
  CHECK(quantized_row_stride(1) == kQTileK);
  CHECK(quantized_row_stride(32) == 32);
  CHECK(quantized_row_stride(33) == 64);
  CHECK(quantized_row_stride(2048) == 2048);
  // A depth tile never straddles two scale groups, and a 16-byte chunk never does either.
  for (std::int64_t g : {32, 64, 128}) {
    CHECK(g % kQTileK == 0);
    CHECK(g % 16 == 0);
  }
}

TEST_CASE("cuda host: cuBLAS int extents", "[cuda_host]") {
  CHECK(checked_int(0, "f", "K") == 0);
  CHECK(checked_int(std::numeric_limits<int>::max(), "f", "K") == std::numeric_limits<int>::max());
  REQUIRE_ERROR(checked_int(std::int64_t{1} << 31, "CudaBackend::gemm", "K"), unsupported,
                "[CudaBackend::gemm]", "K=2147483648");
  REQUIRE_ERROR(checked_int(-1, "f", "rows"), unsupported, "rows=-1");
}

TEST_CASE("cuda host: kernel shared-memory budgets", "[cuda_host]") {
  // route_topk: 3 floats/ints per expert, 2 per group, 1 per pick.
  CHECK(route_topk_shared_bytes(256, 8, 8) == (3 * 256 + 16 + 8) * 4);
  CHECK(route_topk_shared_bytes(256, 8, 8) <= kDefaultSharedBytes);
  CHECK(route_topk_shared_bytes(4096, 1, 8) > kDefaultSharedBytes);
  // attention: the query row plus, per warp, max, sum and Dv accumulators.
  CHECK(attention_shared_bytes(192, 128, 4) == (192 + 4 * 130) * 4);
  CHECK(attention_shared_bytes(576, kMaxAttentionValueDim, 4) <= kDefaultSharedBytes);
}

TEST_CASE("cuda host: CUDA failures become device Errors naming the call", "[cuda_host]") {
  CHECK(format_cuda_error("cudaMalloc", 2, "cudaErrorMemoryAllocation", "out of memory") ==
        "cudaMalloc failed: cudaErrorMemoryAllocation (2): out of memory");
  REQUIRE_ERROR(throw_cuda_error("cublasSgemm", 13, "CUBLAS_STATUS_EXECUTION_FAILED",
                                 "the GPU program failed to execute"),
                device, "[CudaBackend]", "cublasSgemm failed",
                "CUBLAS_STATUS_EXECUTION_FAILED (13)", "failed to execute");
}
