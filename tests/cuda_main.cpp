// SPDX-License-Identifier: Apache-2.0
// Entry point of autoglm_cuda_tests: without a CUDA device the whole executable reports
// "skipped" to ctest (exit code 77, the test's SKIP_RETURN_CODE) instead of passing.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include "autoglm/backend/cuda_backend.hpp"

int main(int argc, char** argv) {
  if (autoglm::CudaBackend::device_count() == 0) {
    std::printf("autoglm_cuda_tests: no CUDA device (or no driver); skipped\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
