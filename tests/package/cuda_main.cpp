// SPDX-License-Identifier: Apache-2.0
// Uses the installed CUDA backend: links autoglm::cuda and, when a GPU is present, checks a
// small GEMM against the host; without one it only reports the device count.
#include <cmath>
#include <cstdio>
#include <vector>

#include <autoglm/backend/cuda_backend.hpp>
#include <autoglm/version.hpp>

static_assert(AUTOGLM_HAS_CUDA == 1, "the package says it has no CUDA backend");

int main() {
  using namespace autoglm;
  const int n = CudaBackend::device_count();
  std::printf("autoglm %s CUDA consumer: %d device(s)\n", AUTOGLM_VERSION_STRING, n);
  if (n == 0) return 0;
  CudaBackend b;
  const std::int64_t M = 3, N = 4, K = 5;
  std::vector<float> a(M * K), w(N * K), c(M * N);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = 0.1f * static_cast<float>(i);
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = 1.0f - 0.05f * static_cast<float>(i);
  Tensor ta(b, DType::f32, Shape{M, K}), tw(b, DType::f32, Shape{N, K}),
      tc(b, DType::f32, Shape{M, N});
  b.copy_from_host(ta, a.data());
  b.copy_from_host(tw, w.data());
  b.gemm(ta, tw, tc);
  b.copy_to_host(c.data(), tc);
  double err = 0;
  for (std::int64_t i = 0; i < M; ++i)
    for (std::int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (std::int64_t k = 0; k < K; ++k) s += a[i * K + k] * w[j * K + k];
      err = std::max(err, std::fabs(s - c[i * N + j]));
    }
  std::printf("max |error| %.3g\n", err);
  return err < 1e-4 ? 0 : 1;
}
