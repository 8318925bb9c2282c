// SPDX-License-Identifier: Apache-2.0
// CudaBackend's private state and error checking, shared by its host-compiled translation
// units (cuda_backend.cpp, cuda_ops.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "autoglm/backend/cuda_backend.hpp"
#include "host_plan.hpp"
#include "kernels.hpp"

namespace autoglm::cuda_detail {

/// Throws autoglm::Error(device) naming `call` unless st is cudaSuccess.
inline void check(cudaError_t st, std::string_view call) {
  if (st == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so that it is not reported twice
  throw_cuda_error(call, static_cast<int>(st), cudaGetErrorName(st), cudaGetErrorString(st));
}

/// Throws autoglm::Error(device) naming `call` unless st is CUBLAS_STATUS_SUCCESS.
inline void check(cublasStatus_t st, std::string_view call) {
  if (st == CUBLAS_STATUS_SUCCESS) return;
  throw_cuda_error(call, static_cast<int>(st), cublasGetStatusName(st), cublasGetStatusString(st));
}

}  // namespace autoglm::cuda_detail

/// Calls fn(args...) -- a CUDA runtime or cuBLAS function -- and turns a failure into an
/// autoglm::Error naming fn and the status.
#define AUTOGLM_CUDA(fn, ...) ::autoglm::cuda_detail::check(fn(__VA_ARGS__), #fn)

namespace autoglm {

struct CudaBackend::Impl {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  bool check_values = true;

  // Caching pool: sizes rounded up, a freed block serves a later request of up to twice its
  // size. Blocks are reused in stream order, so a block still read by queued kernels can be
  // handed out again at once; only cudaFree waits for the stream.
  std::mutex pool_mutex;
  std::unordered_map<void*, std::size_t> live;    // allocated blocks and their sizes
  std::multimap<std::size_t, void*> free_blocks;  // cached, by size
  std::size_t cached = 0;
  std::size_t cache_limit = 0;

  unsigned long long* flag = nullptr;  // device word of the first-failure scans

  /// Makes `device` current for this thread (a process may drive several devices).
  void activate() const {
    int current = -1;
    AUTOGLM_CUDA(cudaGetDevice, &current);
    if (current != device) AUTOGLM_CUDA(cudaSetDevice, device);
  }
  /// Waits for the stream.
  void sync() const { AUTOGLM_CUDA(cudaStreamSynchronize, stream); }
  /// Throws if the last kernel launch failed.
  static void launched(std::string_view kernel) {
    const cudaError_t st = cudaGetLastError();
    if (st != cudaSuccess)
      cuda_detail::throw_cuda_error(std::string("launch of kernel ") + std::string(kernel),
                                    static_cast<int>(st), cudaGetErrorName(st),
                                    cudaGetErrorString(st));
  }

  void* take(std::size_t bytes);
  void give(void* p) noexcept;
  void release_cache() noexcept;

  /// Runs launch(flag) -- a first-failure scan -- and returns the smallest failing index, or
  /// cuda_detail::kNoFailure. Synchronises.
  template <typename Launch>
  std::uint64_t first_failure(Launch&& launch) {
    AUTOGLM_CUDA(cudaMemsetAsync, flag, 0xff, sizeof(unsigned long long), stream);
    launch(flag);
    launched("value check");
    unsigned long long h = 0;
    AUTOGLM_CUDA(cudaMemcpyAsync, &h, flag, sizeof h, cudaMemcpyDeviceToHost, stream);
    sync();
    return h;
  }
  /// Smallest index of the i32 values v[0, n) outside [lo, hi], or kNoFailure; no check (and
  /// no synchronisation) when value checks are off.
  std::uint64_t first_out_of_range(const TensorView& v, std::int64_t n, std::int64_t lo,
                                   std::int64_t hi) {
    if (!check_values || n <= 0) return cuda_detail::kNoFailure;
    const auto clamp32 = [](std::int64_t x) {
      return static_cast<std::int32_t>(std::clamp<std::int64_t>(
          x, std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()));
    };
    return first_failure([&](unsigned long long* f) {
      cuda_kernels::find_out_of_range(v.as<std::int32_t>(), n, clamp32(lo), clamp32(hi), f, stream);
    });
  }
  /// Element i of a device array (synchronises).
  template <typename T>
  T element(const void* base, std::uint64_t i) {
    T v{};
    AUTOGLM_CUDA(cudaMemcpyAsync, &v, static_cast<const T*>(base) + i, sizeof(T),
                 cudaMemcpyDeviceToHost, stream);
    sync();
    return v;
  }
};

}  // namespace autoglm
