// SPDX-License-Identifier: Apache-2.0
// oneDNN's u8 x s8 matmul on the active shapes of the MoE layers of bench_moe_layer: the
// reference for the INT8 layer (MoELayerInt8W8A8/...) measured in the same run by
// tools/bench/compare_int8.py.
//
//   bench_dnnl_moe [--threads=N] [--tiny] [Google Benchmark flags]
//
// For each model and token count the routing of bench_moe_layer's input (same router seed,
// same input seed, computed with autoglm's GateNetwork) gives each expert's row count m_e; a
// timed call then runs, for every expert with rows, oneDNN matmul [m_e, d] u8 x [d, 2F] s8 ->
// f32 (gate and up fused, per-column output scales) and [m_e, F] u8 x [F, d] s8 -> f32, plus
// the shared expert on all T rows, each expert with its own weights in oneDNN's preferred
// layout. Only the GEMMs are timed (no activation quantization, routing, SiLU or combine), so
// the comparison favours oneDNN. Cold caches as in bench_moe_layer: a 1 GiB buffer is read
// before every timed call (AUTOGLM_BENCH_FLUSH_MB). oneDNN threads: OpenMP, --threads (2).
//
// Counters: GOPS (2 * active MACs / s), tokens/s, tokens, experts_hit, active_macs.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <omp.h>

#include <dnnl.hpp>

#include "autoglm/autoglm.hpp"
#include "bench_layer.hpp"

namespace {

using autoglm_bench::ModelSpec;
using autoglm_bench::Seeds;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

int g_threads = 2;
std::size_t g_flush_mib = 1024;

// Reads a buffer larger than the last-level cache (single pass, OpenMP threads like oneDNN).
void flush_caches() {
  static std::vector<float> buf;
  const std::size_t n = g_flush_mib * (std::size_t{1} << 20) / sizeof(float);
  if (n == 0) return;
  if (buf.size() != n) buf.assign(n, 1.0f);
  double s = 0.0;
#pragma omp parallel for reduction(+ : s) num_threads(g_threads)
  for (std::size_t i = 0; i < n; i += 16) s += buf[i];
  benchmark::DoNotOptimize(s);
}

// One matmul of a fixed shape with its own weights.
struct Gemm {
  dnnl::matmul prim;
  dnnl::memory src, weights, dst;
};

Gemm make_gemm(const dnnl::engine& eng, dnnl::stream& strm, std::int64_t m, std::int64_t k,
               std::int64_t n, std::mt19937& rng) {
  const dnnl::memory::desc src_md({m, k}, dt::u8, tag::ab);
  const dnnl::memory::desc w_any({k, n}, dt::s8, tag::any);
  const dnnl::memory::desc w_plain({k, n}, dt::s8, tag::ab);
  const dnnl::memory::desc dst_md({m, n}, dt::f32, tag::ab);
  dnnl::primitive_attr attr;
  attr.set_output_scales(1 << 1, std::vector<float>(static_cast<std::size_t>(n), 0.01f));
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, w_any, dst_md), attr, eng);
  Gemm g{dnnl::matmul(pd), dnnl::memory(src_md, eng), dnnl::memory(pd.weights_desc(), eng),
         dnnl::memory(dst_md, eng)};
  // Cheap pseudo-random bytes: GBs of weights are filled per benchmark.
  std::uint64_t state = rng();
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  auto* sp = static_cast<std::uint8_t*>(g.src.get_data_handle());
  for (std::int64_t i = 0; i < m * k; ++i) sp[i] = static_cast<std::uint8_t>(next());
  dnnl::memory plain(w_plain, eng);
  auto* wp = static_cast<std::int8_t*>(plain.get_data_handle());
  for (std::int64_t i = 0; i < k * n; ++i)
    wp[i] = static_cast<std::int8_t>(static_cast<int>(next() % 255) - 127);
  dnnl::reorder(plain, g.weights).execute(strm, plain, g.weights);
  strm.wait();
  return g;
}

// Rows per expert of bench_moe_layer's routing of T tokens (same seeds, same gate options).
std::vector<std::int32_t> routed_rows(const ModelSpec& m, std::int64_t T) {
  autoglm::CpuBackend be(autoglm::CpuBackendOptions{g_threads});
  const autoglm::GateOptions go = autoglm_bench::gate_options(m);
  const auto gate =
      autoglm::GateNetwork::random(be, m.experts, m.d, go, Seeds::router, m.selection_bias);
  autoglm::Tensor x(be, autoglm::DType::f32, autoglm::Shape{T, m.d});
  be.fill_uniform(x, Seeds::input, 1.0f);
  autoglm::Routing r;
  gate.route(be, x, r);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(r.ids.numel()));
  be.copy_to_host(ids.data(), r.ids);
  std::vector<std::int32_t> rows(static_cast<std::size_t>(m.experts), 0);
  for (std::int32_t e : ids)
    if (e >= 0) ++rows[static_cast<std::size_t>(e)];
  return rows;
}

void BM_DnnlMoE(benchmark::State& state, const ModelSpec* m, std::int64_t T) {
  omp_set_num_threads(g_threads);
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  std::mt19937 rng(7);
  const std::vector<std::int32_t> rows = routed_rows(*m, T);
  std::vector<Gemm> gemms;
  double macs = 0.0;
  std::int64_t hit = 0;
  for (std::int32_t r : rows) {
    if (r == 0) continue;
    ++hit;
    gemms.push_back(make_gemm(eng, strm, r, m->d, 2 * m->ffn, rng));
    gemms.push_back(make_gemm(eng, strm, r, m->ffn, m->d, rng));
    macs += 3.0 * static_cast<double>(r) * m->d * m->ffn;
  }
  if (m->shared_ffn > 0) {
    gemms.push_back(make_gemm(eng, strm, T, m->d, 2 * m->shared_ffn, rng));
    gemms.push_back(make_gemm(eng, strm, T, m->shared_ffn, m->d, rng));
    macs += 3.0 * static_cast<double>(T) * m->d * m->shared_ffn;
  }
  auto run = [&] {
    for (Gemm& g : gemms)
      g.prim.execute(strm,
                     {{DNNL_ARG_SRC, g.src}, {DNNL_ARG_WEIGHTS, g.weights}, {DNNL_ARG_DST, g.dst}});
    strm.wait();
  };
  run();  // warm-up: OpenMP threads, first touch
  for (auto _ : state) {
    state.PauseTiming();
    flush_caches();
    state.ResumeTiming();
    run();
  }
  using C = benchmark::Counter;
  state.SetLabel(m->name);
  state.counters["GOPS"] = C(2.0 * macs * 1e-9, C::kIsIterationInvariantRate);
  state.counters["tokens/s"] = C(static_cast<double>(T), C::kIsIterationInvariantRate);
  state.counters["tokens"] = C(static_cast<double>(T));
  state.counters["experts_hit"] = C(static_cast<double>(hit));
  state.counters["active_macs"] = C(macs);
}

}  // namespace

int main(int argc, char** argv) {
  const autoglm_bench::Options opt = autoglm_bench::parse_options(argc, argv);
  g_threads = opt.threads;
  if (opt.tiny) g_flush_mib = 0;
  if (const char* e = std::getenv("AUTOGLM_BENCH_FLUSH_MB"); e && *e)
    g_flush_mib = static_cast<std::size_t>(std::max(0LL, std::atoll(e)));
  const std::vector<ModelSpec>& models =
      opt.tiny ? autoglm_bench::tiny_models() : autoglm_bench::real_models();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("threads", std::to_string(g_threads));
  benchmark::AddCustomContext("flush_MiB", std::to_string(g_flush_mib));
  for (const ModelSpec& m : models)
    for (std::int64_t T : autoglm_bench::token_counts())
      benchmark::RegisterBenchmark(
          ("DnnlMoE/" + std::string(m.name) + "/tokens:" + std::to_string(T)).c_str(), BM_DnnlMoE,
          &m, T)
          ->UseRealTime()
          ->MinTime(0.5)
          ->Unit(benchmark::kMillisecond);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
