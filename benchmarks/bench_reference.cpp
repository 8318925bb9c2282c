// SPDX-License-Identifier: Apache-2.0
// This machine's references for the MoE layer benchmarks, measured in the same run:
//
//   StreamTriad   a[i] = b[i] + s * c[i] over three arrays far larger than the last-level cache,
//                 GB/s counting 3 arrays (2 reads + 1 write, the STREAM convention).
//   StreamRead    sum of b[i] + c[i]: read-only bandwidth (expert weights are only read).
//   BlasGemm/peak C = A B^T, 2048^3, through OpenBLAS: the machine's FP32 GEMM rate.
//   BlasGemm/<model>/tokens:T
//                 one GEMM with the active FLOPs of the routed experts of the MoE layer at T
//                 tokens: [T*k, d] x [d, 3*F] (weights stored [3F, d], as the layer's). At small
//                 T this dense GEMM with M = T*k is the fair compute reference.
//
//   bench_reference [--threads=N] [--tiny] [Google Benchmark flags]
//
// Threads: --threads=N, else AUTOGLM_THREADS, else 2 (OpenBLAS via openblas_set_num_threads,
// STREAM via std::thread). Array size: AUTOGLM_STREAM_MB per array (default 1024 MiB, i.e.
// 3 GiB in all; this machine reports a 480 MiB L3; 64 MiB with --tiny).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#if AUTOGLM_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

#include "bench_common.hpp"

namespace {

using autoglm_bench::ModelSpec;

int g_threads = 2;

struct FreeDeleter {
  void operator()(float* p) const noexcept { std::free(p); }
};
using Buffer = std::unique_ptr<float[], FreeDeleter>;

Buffer alloc_floats(std::size_t n) {
  const std::size_t bytes = (n * sizeof(float) + 4095) / 4096 * 4096;
  auto* p = static_cast<float*>(std::aligned_alloc(4096, bytes));
  if (!p) {
    std::fprintf(stderr, "out of memory allocating %zu bytes\n", bytes);
    std::exit(1);
  }
  return Buffer(p);
}

// Runs f(thread, begin, end) over [0, n) split into `threads` 64-byte aligned chunks.
template <typename F>
void parallel_chunks(std::size_t n, F&& f) {
  const int t = g_threads;
  std::vector<std::thread> pool;
  const std::size_t chunk = (n / t + 15) / 16 * 16;
  for (int i = 1; i < t; ++i)
    pool.emplace_back([&, i] {
      const std::size_t b = std::min(n, i * chunk), e = std::min(n, (i + 1) * chunk);
      f(i, b, e);
    });
  f(0, 0, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

// ---- STREAM ----

struct StreamArrays {
  std::size_t n = 0;
  Buffer a, b, c;
};
std::unique_ptr<StreamArrays> g_stream;
std::size_t g_stream_mb = 1024;

StreamArrays& stream_arrays() {
  if (!g_stream) {
    std::size_t mb = g_stream_mb;
    if (const char* e = std::getenv("AUTOGLM_STREAM_MB"); e && std::atoll(e) > 0)
      mb = static_cast<std::size_t>(std::atoll(e));
    g_stream = std::make_unique<StreamArrays>();
    StreamArrays& s = *g_stream;
    s.n = mb * (1u << 20) / sizeof(float);
    s.a = alloc_floats(s.n);
    s.b = alloc_floats(s.n);
    s.c = alloc_floats(s.n);
    // First touch by the threads that later stream each chunk.
    parallel_chunks(s.n, [&](int, std::size_t lo, std::size_t hi) {
      for (std::size_t i = lo; i < hi; ++i) {
        s.a[i] = 0.0f;
        s.b[i] = 1.0f;
        s.c[i] = 2.0f;
      }
    });
  }
  return *g_stream;
}

void triad(float* __restrict a, const float* __restrict b, const float* __restrict c,
           std::size_t n, float s) {
  for (std::size_t i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
}

float read_sum(const float* __restrict b, const float* __restrict c, std::size_t n) {
  // 64 independent accumulators: the loop is bound by loads, not by the add latency chain.
  constexpr std::size_t W = 64;
  float acc[W] = {};
  std::size_t i = 0;
  for (; i + W <= n; i += W)
    for (std::size_t j = 0; j < W; ++j) acc[j] += b[i + j] + c[i + j];
  float s = 0.0f;
  for (; i < n; ++i) s += b[i] + c[i];
  for (float v : acc) s += v;
  return s;
}

void BM_StreamTriad(benchmark::State& state) {
  StreamArrays& s = stream_arrays();
  const float scalar = 3.0f;
  for (auto _ : state) {
    parallel_chunks(s.n, [&](int, std::size_t lo, std::size_t hi) {
      triad(s.a.get() + lo, s.b.get() + lo, s.c.get() + lo, hi - lo, scalar);
    });
    benchmark::DoNotOptimize(s.a.get());
    benchmark::ClobberMemory();
  }
  using C = benchmark::Counter;
  const double bytes = 3.0 * static_cast<double>(s.n) * sizeof(float);
  state.counters["GB/s"] = C(bytes * 1e-9, C::kIsIterationInvariantRate);
  state.counters["array_MiB"] = C(static_cast<double>(s.n) * sizeof(float) / (1 << 20));
}

void BM_StreamRead(benchmark::State& state) {
  StreamArrays& s = stream_arrays();
  std::vector<float> partial(static_cast<std::size_t>(g_threads));
  for (auto _ : state) {
    parallel_chunks(s.n, [&](int t, std::size_t lo, std::size_t hi) {
      partial[static_cast<std::size_t>(t)] = read_sum(s.b.get() + lo, s.c.get() + lo, hi - lo);
    });
    benchmark::DoNotOptimize(partial.data());
    benchmark::ClobberMemory();
  }
  using C = benchmark::Counter;
  const double bytes = 2.0 * static_cast<double>(s.n) * sizeof(float);
  state.counters["GB/s"] = C(bytes * 1e-9, C::kIsIterationInvariantRate);
  state.counters["array_MiB"] = C(static_cast<double>(s.n) * sizeof(float) / (1 << 20));
}

// ---- BLAS ----

#if AUTOGLM_BENCH_HAVE_OPENBLAS

void fill_pattern(float* p, std::size_t n, std::uint32_t seed, float scale) {
  parallel_chunks(n, [&](int, std::size_t lo, std::size_t hi) {
    for (std::size_t i = lo; i < hi; ++i) {
      const std::uint32_t h = (static_cast<std::uint32_t>(i) ^ seed) * 2654435761u;
      p[i] = scale * (static_cast<float>(h >> 8) * (1.0f / 8388608.0f) - 1.0f);
    }
  });
}

// The weight matrix of the current model, [3F, d]; one alive at a time.
struct GemmWeights {
  std::string name;
  std::size_t n = 0;
  Buffer w;
};
GemmWeights g_weights;

const float* acquire_weights(const std::string& name, std::int64_t N, std::int64_t K) {
  g_stream.reset();  // the STREAM arrays are done with by now
  if (g_weights.name != name) {
    g_weights.w.reset();
    g_weights.n = static_cast<std::size_t>(N * K);
    g_weights.w = alloc_floats(g_weights.n);
    fill_pattern(g_weights.w.get(), g_weights.n, 2u, 1.0f / 64.0f);
    g_weights.name = name;
  }
  return g_weights.w.get();
}

void run_gemm(benchmark::State& state, const std::string& key, std::int64_t M, std::int64_t N,
              std::int64_t K) {
  const float* B = acquire_weights(key, N, K);
  Buffer A = alloc_floats(static_cast<std::size_t>(M * K));
  Buffer Cm = alloc_floats(static_cast<std::size_t>(M * N));
  fill_pattern(A.get(), static_cast<std::size_t>(M * K), 1u, 1.0f);
  auto call = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
                static_cast<int>(K), 1.0f, A.get(), static_cast<int>(K), B, static_cast<int>(K),
                0.0f, Cm.get(), static_cast<int>(N));
  };
  call();  // warm-up
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(Cm.get());
    benchmark::ClobberMemory();
  }
  using C = benchmark::Counter;
  const double flops =
      2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  state.counters["GFLOP/s"] = C(flops * 1e-9, C::kIsIterationInvariantRate);
  state.counters["flops"] = C(flops);
  state.counters["M"] = C(static_cast<double>(M));
  state.counters["N"] = C(static_cast<double>(N));
  state.counters["K"] = C(static_cast<double>(K));
}

void BM_BlasPeak(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  run_gemm(state, "peak", n, n, n);
  state.SetLabel("peak");
}

void BM_BlasMoE(benchmark::State& state, const ModelSpec* m, std::int64_t T) {
  run_gemm(state, m->name, T * m->top_k, 3 * m->ffn, m->d);
  state.SetLabel(m->name);
  state.counters["tokens"] = benchmark::Counter(static_cast<double>(T));
}

#endif

}  // namespace

int main(int argc, char** argv) {
  const autoglm_bench::Options opt = autoglm_bench::parse_options(argc, argv);
  g_threads = opt.threads;
  if (opt.tiny) g_stream_mb = 64;
  const std::vector<ModelSpec>& models =
      opt.tiny ? autoglm_bench::tiny_models() : autoglm_bench::real_models();

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("autoglm_threads", std::to_string(g_threads));
  benchmark::AddCustomContext("autoglm_models", autoglm_bench::specs_json(models));

  benchmark::RegisterBenchmark("StreamTriad", BM_StreamTriad)
      ->UseRealTime()->MinTime(0.5)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("StreamRead", BM_StreamRead)
      ->UseRealTime()->MinTime(0.5)->Unit(benchmark::kMillisecond);

#if AUTOGLM_BENCH_HAVE_OPENBLAS
  openblas_set_num_threads(g_threads);
  benchmark::AddCustomContext("openblas_config", openblas_get_config());
  benchmark::AddCustomContext("openblas_core", openblas_get_corename());
  benchmark::RegisterBenchmark("BlasGemm/peak", BM_BlasPeak)
      ->Arg(opt.tiny ? 256 : 2048)->UseRealTime()->MinTime(0.5)->Unit(benchmark::kMillisecond);
  for (const ModelSpec& m : models)
    for (std::int64_t T : autoglm_bench::token_counts())
      benchmark::RegisterBenchmark(
          ("BlasGemm/" + std::string(m.name) + "/tokens:" + std::to_string(T)).c_str(),
          BM_BlasMoE, &m, T)
          ->UseRealTime()
          ->MinTime(0.5)
          ->Unit(benchmark::kMillisecond);
#else
  benchmark::AddCustomContext("openblas", "not found at configure time: no BLAS references");
#endif

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_stream.reset();
  return 0;
}
