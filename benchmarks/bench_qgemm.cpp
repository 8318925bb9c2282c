// SPDX-License-Identifier: Apache-2.0
// INT8 GEMM kernels (src/cpu/qgemm_kernels.hpp) on one expert's weight matrix at real MoE
// shapes, against oneDNN's u8 x s8 matmul on the same shapes when oneDNN is found.
//
//   bench_qgemm [--threads=N] [Google Benchmark flags]
//
// Shapes: M in {1, 8, 12, 16, 32, 128, 512} rows x (N, K) in {(2816, 4096) GLM-4.5-Air gate_up,
// (4096, 1408) GLM-4.5-Air down, (1536, 2048) Qwen3 gate_up, (4096, 14336) Mixtral down}.
// Ours: tbb::parallel_for over column tiles of 128 on N threads (default 2), each tile one
// single-threaded kernel call with all M rows, as the CPU backend calls them; the activations
// are quantized outside the timed loop (oneDNN gets u8 activations too). oneDNN: matmul with
// src u8 [M, K], weights s8 [K, N] in the layout it prefers, dst f32 with per-column output
// scales, on N OpenMP threads (Debian's libdnnl uses OpenMP).
//
// Cold weights: each iteration uses the next of several copies of the weights, AUTOGLM_BENCH_
// ROTATE_MB (default 1024) in all, so that the weights come from memory, not from the
// last-level cache, as they do when a real model reaches a layer.
//
// backend_wonly / backend_wonly_colscale: CpuBackend::qgemm, weight-only, on the same weights
// without and with column scales (all ones, so the arithmetic is the same): the cost of the
// extra pass over the activations that column equalisation adds (docs/quantization.md).
//
// Counters: GOPS (2*M*N*K per second), GB/s (bytes of int8 weights per second).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>
#include <tbb/task_arena.h>

#include "autoglm/backend/cpu_backend.hpp"
#include "autoglm/core/quant.hpp"
#include "cpu/qgemm_kernels.hpp"

#if AUTOGLM_BENCH_HAVE_DNNL
#include <omp.h>

#include <dnnl.hpp>
#endif

namespace {

namespace q8 = autoglm::detail::q8;

int g_threads = 2;

struct Shape {
  std::int64_t n, k;
  const char* what;
};

const Shape kShapes[] = {{2816, 4096, "GLM-Air-gate_up"},
                         {4096, 1408, "GLM-Air-down"},
                         {1536, 2048, "Qwen3-gate_up"},
                         {4096, 14336, "Mixtral-down"}};
const std::int64_t kRows[] = {1, 8, 12, 16, 32, 128, 512};
constexpr std::int64_t kTile = 128;

std::size_t rotate_bytes() {
  const char* env = std::getenv("AUTOGLM_BENCH_ROTATE_MB");
  const long mb = env != nullptr ? std::atol(env) : 1024;
  return static_cast<std::size_t>(std::max(0L, mb)) << 20;
}

// Copies of the weights so that cycling through them misses the last-level cache.
std::int64_t copies_for(std::size_t bytes) {
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(rotate_bytes() / bytes));
}

struct Aligned {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
std::unique_ptr<T[], Aligned> aligned_array(std::size_t n) {
  const std::size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
  return std::unique_ptr<T[], Aligned>(static_cast<T*>(std::aligned_alloc(64, bytes)));
}

void set_counters(benchmark::State& state, std::int64_t m, std::int64_t n, std::int64_t k) {
  const double it = static_cast<double>(state.iterations());
  state.counters["GOPS"] =
      benchmark::Counter(2.0 * m * n * k * it * 1e-9, benchmark::Counter::kIsRate);
  state.counters["GB/s"] =
      benchmark::Counter(static_cast<double>(n) * k * it * 1e-9, benchmark::Counter::kIsRate);
}

enum class Mode { w8a8, wonly };

void bench_ours(benchmark::State& state, Mode mode, std::int64_t m, Shape s, std::int64_t group) {
  std::mt19937 rng(42);
  std::uniform_int_distribution<int> byte(-127, 127);
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  const std::int64_t n = s.n, k = s.k;
  std::vector<std::int8_t> w(static_cast<std::size_t>(n * k));
  for (auto& v : w) v = static_cast<std::int8_t>(byte(rng));
  const std::size_t pbytes = static_cast<std::size_t>(q8::packed_bytes(n, k));
  const std::int64_t copies = copies_for(pbytes);
  auto packed = aligned_array<std::int8_t>(pbytes * copies);
  q8::pack(w.data(), n, k, packed.get());
  for (std::int64_t c = 1; c < copies; ++c)
    std::memcpy(packed.get() + c * pbytes, packed.get(), pbytes);
  const std::int64_t ng = k / group, rows = q8::padded_rows(n);
  std::vector<float> scales(static_cast<std::size_t>(rows * ng), 0.01f);
  std::vector<std::int32_t> sums(static_cast<std::size_t>(rows * ng));
  q8::group_sums(w.data(), n, k, group, sums.data());

  std::vector<float> x(static_cast<std::size_t>(m * k));
  for (auto& v : x) v = val(rng);
  const std::int64_t ldq = q8::padded_depth(k);
  std::vector<std::uint8_t> xq(static_cast<std::size_t>(m * ldq));
  std::vector<float> xs(static_cast<std::size_t>(m * ng));
  const q8::Isa isa = q8::best_isa();
  q8::quantize_activations(isa, x.data(), k, m, k, group, xq.data(), ldq, xs.data());
  auto out = aligned_array<float>(static_cast<std::size_t>(m * n));

  tbb::task_arena arena(g_threads);
  const std::int64_t tiles = (n + kTile - 1) / kTile;
  std::int64_t c = 0;
  for (auto _ : state) {
    const q8::QWeights qw{packed.get() + c * pbytes, scales.data(), sums.data(), n, k, group};
    c = (c + 1) % copies;
    arena.execute([&] {
      tbb::parallel_for(
          tbb::blocked_range<std::int64_t>(0, tiles, 1),
          [&](const tbb::blocked_range<std::int64_t>& r) {
            for (std::int64_t t = r.begin(); t != r.end(); ++t) {
              const std::int64_t col0 = t * kTile, cols = std::min(kTile, n - col0);
              if (mode == Mode::w8a8)
                q8::gemm_w8a8(isa, xq.data(), ldq, xs.data(), m, qw, col0, cols, out.get() + col0,
                              n);
              else
                q8::gemm_wonly(isa, x.data(), k, m, qw, col0, cols, out.get() + col0, n);
            }
          },
          tbb::static_partitioner());
    });
    benchmark::DoNotOptimize(out.get());
    benchmark::ClobberMemory();
  }
  set_counters(state, m, n, k);
  state.SetLabel(std::string(q8::isa_name(isa)) + " " + s.what);
}

void bench_backend(benchmark::State& state, std::int64_t m, Shape s, bool col_scales) {
  static autoglm::CpuBackend backend(autoglm::CpuBackendOptions{g_threads});
  const std::int64_t n = s.n, k = s.k;
  std::mt19937 rng(42);
  std::uniform_int_distribution<int> byte(-127, 127);
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  std::vector<std::int8_t> w(static_cast<std::size_t>(n * k));
  for (auto& v : w) v = static_cast<std::int8_t>(byte(rng));
  const std::vector<float> sc(static_cast<std::size_t>(n), 0.01f), ones(k, 1.0f);
  std::vector<autoglm::QuantizedTensor> ws;
  for (std::int64_t c = 0; c < copies_for(static_cast<std::size_t>(n * k)); ++c) {
    autoglm::Tensor data(backend, autoglm::DType::i8, autoglm::Shape{n, k});
    autoglm::Tensor scales(backend, autoglm::DType::f32, autoglm::Shape{n, 1});
    backend.copy_from_host(data, w.data());
    backend.copy_from_host(scales, sc.data());
    autoglm::Tensor cs;
    if (col_scales) {
      cs = autoglm::Tensor(backend, autoglm::DType::f32, autoglm::Shape{k});
      backend.copy_from_host(cs, ones.data());
    }
    ws.push_back(backend.pack_quantized(
        autoglm::QuantizedTensor(data, scales, autoglm::QuantSpec{}, std::move(cs))));
  }
  std::vector<float> xh(static_cast<std::size_t>(m * k));
  for (auto& v : xh) v = val(rng);
  autoglm::Tensor x(backend, autoglm::DType::f32, autoglm::Shape{m, k});
  autoglm::Tensor out(backend, autoglm::DType::f32, autoglm::Shape{m, n});
  backend.copy_from_host(x, xh.data());
  std::size_t c = 0;
  for (auto _ : state) {
    backend.qgemm(x, ws[c], out);
    c = (c + 1) % ws.size();
  }
  set_counters(state, m, n, k);
  state.SetLabel(s.what);
}

#if AUTOGLM_BENCH_HAVE_DNNL
void bench_onednn(benchmark::State& state, std::int64_t m, Shape s) {
  using namespace dnnl;
  using tag = memory::format_tag;
  using dt = memory::data_type;
  omp_set_num_threads(g_threads);
  const std::int64_t n = s.n, k = s.k;
  engine eng(engine::kind::cpu, 0);
  stream strm(eng);
  const memory::desc src_md({m, k}, dt::u8, tag::ab);
  const memory::desc w_any({k, n}, dt::s8, tag::any);
  const memory::desc w_plain({k, n}, dt::s8, tag::ab);
  const memory::desc dst_md({m, n}, dt::f32, tag::ab);
  primitive_attr attr;
  attr.set_output_scales(1 << 1, std::vector<float>(static_cast<std::size_t>(n), 0.01f));
  const matmul::primitive_desc pd(matmul::desc(src_md, w_any, dst_md), attr, eng);
  const matmul prim(pd);

  std::mt19937 rng(42);
  std::uniform_int_distribution<int> sbyte(-127, 127), ubyte(0, 255);
  memory src(src_md, eng), dst(dst_md, eng), plain(w_plain, eng);
  auto* sp = static_cast<std::uint8_t*>(src.get_data_handle());
  for (std::int64_t e = 0; e < m * k; ++e) sp[e] = static_cast<std::uint8_t>(ubyte(rng));
  auto* wp = static_cast<std::int8_t*>(plain.get_data_handle());
  for (std::int64_t e = 0; e < n * k; ++e) wp[e] = static_cast<std::int8_t>(sbyte(rng));
  const std::int64_t copies = copies_for(pd.weights_desc().get_size());
  std::vector<memory> weights;
  for (std::int64_t c = 0; c < copies; ++c) {
    weights.emplace_back(pd.weights_desc(), eng);
    reorder(plain, weights.back()).execute(strm, plain, weights.back());
  }
  strm.wait();
  std::int64_t c = 0;
  for (auto _ : state) {
    prim.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights[c]}, {DNNL_ARG_DST, dst}});
    strm.wait();
    c = (c + 1) % copies;
  }
  set_counters(state, m, n, k);
  state.SetLabel(std::string(pd.impl_info_str()) + " " + s.what);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      g_threads = std::max(1, std::atoi(argv[i] + 10));
      for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
      --argc;
      --i;
    }
  for (const Shape& s : kShapes)
    for (std::int64_t m : kRows) {
      const std::string dims =
          "/M=" + std::to_string(m) + "/N=" + std::to_string(s.n) + "/K=" + std::to_string(s.k);
      benchmark::RegisterBenchmark(("ours_w8a8" + dims).c_str(), bench_ours, Mode::w8a8, m, s, s.k)
          ->UseRealTime();
      benchmark::RegisterBenchmark(("ours_w8a8_g128" + dims).c_str(), bench_ours, Mode::w8a8, m, s,
                                   std::int64_t{128})
          ->UseRealTime();
      benchmark::RegisterBenchmark(("ours_wonly" + dims).c_str(), bench_ours, Mode::wonly, m, s,
                                   s.k)
          ->UseRealTime();
      if (std::string(s.what) == "Qwen3-gate_up")
        for (bool cs : {false, true})
          benchmark::RegisterBenchmark(
              ((cs ? "backend_wonly_colscale" : "backend_wonly") + dims).c_str(), bench_backend, m,
              s, cs)
              ->UseRealTime();
#if AUTOGLM_BENCH_HAVE_DNNL
      benchmark::RegisterBenchmark(("onednn_u8s8" + dims).c_str(), bench_onednn, m, s)
          ->UseRealTime();
#endif
    }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("threads", std::to_string(g_threads));
  benchmark::AddCustomContext("q8_isa", std::string(q8::isa_name(q8::best_isa())));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
