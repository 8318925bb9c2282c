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

#define AUTOGLM_TEST_BACKENDS ::agt::CpuOneThread, ::agt::CpuTwoThreads
