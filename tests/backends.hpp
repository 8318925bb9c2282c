// SPDX-License-Identifier: Apache-2.0
// Backends the conformance suite (test_backend.cpp) runs against. Each entry is a type with a
// static get() returning a long-lived autoglm::Backend&; the suite only talks to that
// interface and moves data with copy_from_host / copy_to_host, so a device backend joins by
// adding its type to AUTOGLM_TEST_BACKENDS.
#pragma once

#include "autoglm/backend/cpu_backend.hpp"

namespace agt {

/// CPU backend, one worker thread.
struct CpuOneThread {
  static autoglm::Backend& get() {
    static autoglm::CpuBackend b(autoglm::CpuBackendOptions{1});
    return b;
  }
};

/// CPU backend, two worker threads.
struct CpuTwoThreads {
  static autoglm::Backend& get() {
    static autoglm::CpuBackend b(autoglm::CpuBackendOptions{2});
    return b;
  }
};

}  // namespace agt

#if defined(AUTOGLM_TEST_CUDA)
// The CUDA test executable (autoglm_cuda_tests, which exits as skipped without a GPU) runs the
// suite against the CUDA backend only; autoglm_tests stays CPU-only so it passes anywhere.
#include "autoglm/backend/cuda_backend.hpp"

namespace agt {

/// CUDA backend on device 0, strict FP32 GEMMs.
struct Cuda {
  static autoglm::Backend& get() {
    static autoglm::CudaBackend b;
    return b;
  }
};

}  // namespace agt

#define AUTOGLM_TEST_BACKENDS ::agt::Cuda
#else
#define AUTOGLM_TEST_BACKENDS ::agt::CpuOneThread, ::agt::CpuTwoThreads
#endif
