// SPDX-License-Identifier: Apache-2.0
// MoE layer forward at real model shapes (Mixtral-8x7B, Qwen3-30B-A3B, GLM-4.5-Air) and
// 1 / 16 / 128 / 512 tokens, on the CPU backend: FP32 (MoELayer/...) and with int8 experts
// (router f32), per-channel scales, in both activation modes (MoELayerInt8W8A8/... and
// MoELayerInt8WOnly/...), quantized from the same FP32 layer, and with BF16 expert weights
// (MoELayerBF16/...: the FP32 layer's experts rounded to bf16, kept 16-bit and widened exactly in
// the kernels; f32 compute, half the bytes).
//
//   bench_moe_layer [--threads=N] [--tiny] [Google Benchmark flags]
//
// Threads: --threads=N, else AUTOGLM_THREADS, else 2. A layer holds several GB of weights
// (Mixtral 5.6 GB, GLM-4.5-Air 9 GB), so it is built lazily by the first benchmark that needs it
// and freed before the next model's is built; benchmarks are registered model by model, and
// --benchmark_filter=Qwen3 builds only that model.
//
// Cold caches: a layer's weights are not in cache when a real model reaches it (the other layers
// evicted them), but a loop over one layer would keep the experts it hits in the last-level
// cache (Qwen3's 8 experts at T=1 are 152 MB; this machine's L3 is 480 MB). So before every
// timed call the benchmark reads a buffer of AUTOGLM_BENCH_FLUSH_MB (default 1024 MiB; 0 with
// --tiny) with the same threads, outside the timed region (PauseTiming). AUTOGLM_BENCH_FLUSH_MB=0
// measures warm caches instead. Google Benchmark sizes the iteration count on the timed part
// only, so a flush costs about 0.5 s * (flush time / call time) of extra wall time.
//
// Counters (per call; the "/s" ones are rates over real time):
//   tokens/s, GFLOP/s (active expert math: 2*T*k*3*d*F routed + 2*T*3*d*Fs shared + 2*T*d*E
//   router), GB/s (bytes of the distinct experts the routing hits, plus shared expert and
//   router), active_flops, weight_bytes, experts_hit, tokens, and checksum / abs_sum of the
//   output (sum and sum of |.|) so tools/bench/compare.py can check its PyTorch layer computes
//   the same thing.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include "autoglm/autoglm.hpp"
#include "bench_layer.hpp"

namespace {

using autoglm_bench::ModelSpec;
using autoglm_bench::Seeds;
using Layer = autoglm::MoELayer<autoglm::GateNetwork, autoglm::SwiGluExperts>;

autoglm::CpuBackend* g_backend = nullptr;

// Evicts the caches by reading a buffer larger than the last-level cache with `threads` threads.
class CacheFlusher {
 public:
  CacheFlusher(std::size_t mib, int threads)
      : n_(mib * (std::size_t{1} << 20) / sizeof(float)), threads_(threads) {
    if (n_ == 0) return;
    const std::size_t bytes = (n_ * sizeof(float) + 4095) / 4096 * 4096;
    buf_.reset(static_cast<float*>(std::aligned_alloc(4096, bytes)));
    if (!buf_) {
      std::fprintf(stderr, "cannot allocate the %zu MiB cache-flush buffer\n", mib);
      std::exit(1);
    }
    for (std::size_t i = 0; i < n_; ++i) buf_.get()[i] = static_cast<float>(i & 1023);
  }
  std::size_t mib() const { return n_ * sizeof(float) >> 20; }
  void operator()() {
    if (n_ == 0) return;
    std::vector<std::thread> pool;
    std::vector<float> part(static_cast<std::size_t>(threads_));
    const std::size_t chunk = (n_ + threads_ - 1) / threads_;
    auto work = [&](int t) {
      const float* p = buf_.get() + std::min(n_, t * chunk);
      const std::size_t len = std::min(n_, (t + 1) * chunk) - std::min(n_, t * chunk);
      float acc[16] = {};
      for (std::size_t i = 0; i + 16 <= len; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
      float s = 0.0f;
      for (float v : acc) s += v;
      part[static_cast<std::size_t>(t)] = s;
    };
    for (int t = 1; t < threads_; ++t) pool.emplace_back(work, t);
    work(0);
    for (auto& th : pool) th.join();
    benchmark::DoNotOptimize(part.data());
  }

 private:
  struct Free {
    void operator()(float* p) const noexcept { std::free(p); }
  };
  std::size_t n_;
  int threads_;
  std::unique_ptr<float[], Free> buf_;
};
CacheFlusher* g_flush = nullptr;

// How a benchmark runs the layer's experts.
enum class Precision { fp32, int8_w8a8, int8_wonly, bf16 };

// The one model alive at a time, and its int8 forms (built on first use).
struct LiveModel {
  std::string name;
  std::optional<Layer> layer;
  std::optional<Layer> w8a8, wonly, bf16;
};
LiveModel g_live;

Layer build_layer(autoglm::CpuBackend& be, const ModelSpec& m) {
  const autoglm::GateOptions go = autoglm_bench::gate_options(m);
  auto gate = autoglm::GateNetwork::random(be, m.experts, m.d, go, Seeds::router, m.selection_bias);
  auto experts = autoglm::SwiGluExperts::random(be, m.experts, m.d, m.ffn, Seeds::experts);
  autoglm::WeightedSumAggregator agg;
  if (m.shared_ffn > 0)
    agg = autoglm::WeightedSumAggregator(autoglm::SharedExpert(
        autoglm::SwiGluExperts::random(be, 1, m.d, m.shared_ffn, Seeds::shared)));
  return Layer(std::move(gate), std::move(experts), std::move(agg));
}

// A bank's weight [E, N, K] rounded to bf16 (nearest even), in the backend's weight layout;
// one expert matrix at a time, so the copy costs half the bank and no more.
autoglm::Weight to_bf16(autoglm::CpuBackend& be, const autoglm::Weight& w) {
  const autoglm::Shape& s = w.shape();
  autoglm::Tensor out(be, autoglm::DType::bf16, s, be.weight_layout());
  std::vector<float> host(static_cast<std::size_t>(s[1] * s[2]));
  std::vector<std::uint16_t> bits(host.size());
  for (std::int64_t e = 0; e < s[0]; ++e) {
    be.copy_to_host(host.data(), w.tensor().view()[e]);
    for (std::size_t i = 0; i < host.size(); ++i) bits[i] = autoglm::float_to_bf16(host[i]);
    be.copy_from_host(autoglm::TensorView(out)[e], bits.data());
  }
  return out;
}
autoglm::SwiGluExperts to_bf16(autoglm::CpuBackend& be, const autoglm::SwiGluExperts& x) {
  return autoglm::SwiGluExperts(to_bf16(be, x.gate_up()), to_bf16(be, x.down()));
}
Layer bf16_layer(autoglm::CpuBackend& be, const Layer& l) {
  autoglm::WeightedSumAggregator agg;
  if (const auto& sh = l.aggregator().shared())
    agg = autoglm::WeightedSumAggregator(autoglm::SharedExpert(to_bf16(be, sh->mlp()), sh->gate()));
  return Layer(l.gate(), to_bf16(be, l.experts()), std::move(agg));
}

const Layer& acquire(const ModelSpec& m, Precision p = Precision::fp32) {
  if (g_live.name != m.name || !g_live.layer) {
    g_live.layer.reset();  // free the previous model before allocating the next
    g_live.w8a8.reset();
    g_live.wonly.reset();
    g_live.bf16.reset();
    g_live.name.clear();
    g_live.layer.emplace(build_layer(*g_backend, m));
    g_live.name = m.name;
  }
  if (p == Precision::fp32) return *g_live.layer;
  if (p == Precision::bf16) {
    if (!g_live.bf16) g_live.bf16.emplace(bf16_layer(*g_backend, *g_live.layer));
    return *g_live.bf16;
  }
  std::optional<Layer>& q = p == Precision::int8_w8a8 ? g_live.w8a8 : g_live.wonly;
  if (!q) {
    const autoglm::QuantSpec spec{0, p == Precision::int8_w8a8
                                         ? autoglm::ActivationMode::w8a8
                                         : autoglm::ActivationMode::weight_only};
    q.emplace(g_live.layer->quantized(*g_backend, spec));
  }
  return *q;
}

// Bytes the kernels stream, from the tensors themselves (a backend layout such as panel32 may
// pad them): one routed expert, and what every call reads (router, selection bias, shared expert).
double expert_bytes(const Layer& l) {
  return static_cast<double>(l.experts().gate_up().nbytes() + l.experts().down().nbytes()) /
         static_cast<double>(l.num_experts());
}
double fixed_bytes(const Layer& l) {
  double b = static_cast<double>(l.gate().weight().nbytes() + l.gate().bias().nbytes());
  if (const auto& sh = l.aggregator().shared())
    b += static_cast<double>(sh->mlp().gate_up().nbytes() + sh->mlp().down().nbytes() +
                             sh->gate().nbytes());
  return b;
}

void BM_MoELayer(benchmark::State& state, const ModelSpec* m, std::int64_t T, Precision p) {
  autoglm::CpuBackend& be = *g_backend;
  const Layer& layer = acquire(*m, p);
  autoglm::Tensor x(be, autoglm::DType::f32, autoglm::Shape{T, m->d});
  autoglm::Tensor out(be, autoglm::DType::f32, autoglm::Shape{T, m->d});
  be.fill_uniform(x, Seeds::input, 1.0f);

  // Distinct experts this input hits (the routing is a function of x, so every timed call hits
  // the same ones).
  const autoglm::Routing r = layer.route(be, x);
  std::vector<std::int32_t> counts(static_cast<std::size_t>(m->experts));
  be.copy_to_host(counts.data(), r.counts);
  std::int64_t hit = 0;
  for (std::int32_t c : counts) hit += c > 0;

  layer.forward(be, x, out);  // warm-up: first-touch of the temporaries, caches, TBB workers

  CacheFlusher& flush = *g_flush;
  for (auto _ : state) {
    state.PauseTiming();
    flush();
    state.ResumeTiming();
    layer.forward(be, x, out);
    benchmark::DoNotOptimize(out.data<float>());
    benchmark::ClobberMemory();
  }

  std::vector<float> host(static_cast<std::size_t>(out.numel()));
  be.copy_to_host(host.data(), out);
  double sum = 0.0, abs_sum = 0.0;
  for (float v : host) sum += v, abs_sum += std::fabs(v);

  const double flops = m->active_flops(T);
  const double bytes = static_cast<double>(hit) * expert_bytes(layer) + fixed_bytes(layer);
  using C = benchmark::Counter;
  state.SetLabel(m->name);
  state.counters["tokens/s"] = C(static_cast<double>(T), C::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = C(flops * 1e-9, C::kIsIterationInvariantRate);
  state.counters["GB/s"] = C(bytes * 1e-9, C::kIsIterationInvariantRate);
  state.counters["active_flops"] = C(flops);
  state.counters["weight_bytes"] = C(bytes);
  state.counters["experts_hit"] = C(static_cast<double>(hit));
  state.counters["tokens"] = C(static_cast<double>(T));
  state.counters["checksum"] = C(sum);
  state.counters["abs_sum"] = C(abs_sum);
}

}  // namespace

int main(int argc, char** argv) {
  const autoglm_bench::Options opt = autoglm_bench::parse_options(argc, argv);
  const std::vector<ModelSpec>& models =
      opt.tiny ? autoglm_bench::tiny_models() : autoglm_bench::real_models();

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  // Tiny shapes run ~10k calls per benchmark: flushing 1 GiB before each would take minutes.
  std::size_t flush_mib = opt.tiny ? 0 : 1024;
  if (const char* e = std::getenv("AUTOGLM_BENCH_FLUSH_MB"); e && *e)
    flush_mib = static_cast<std::size_t>(std::max(0LL, std::atoll(e)));
  CacheFlusher flusher(flush_mib, opt.threads);
  g_flush = &flusher;
  autoglm::CpuBackend backend(autoglm::CpuBackendOptions{
      .threads = opt.threads, .bf16_compute = opt.bf16_compute, .huge_pages = opt.huge_pages});
  g_backend = &backend;
  benchmark::AddCustomContext("autoglm_flush_MiB", std::to_string(flusher.mib()));
  benchmark::AddCustomContext("autoglm_version", AUTOGLM_VERSION_STRING);
  benchmark::AddCustomContext("autoglm_threads", std::to_string(backend.num_threads()));
  benchmark::AddCustomContext("autoglm_models", autoglm_bench::specs_json(models));
  benchmark::AddCustomContext("autoglm_seeds",
                              "{\"router\":" + std::to_string(Seeds::router) +
                                  ",\"experts\":" + std::to_string(Seeds::experts) +
                                  ",\"shared\":" + std::to_string(Seeds::shared) +
                                  ",\"input\":" + std::to_string(Seeds::input) + "}");

  // Model-major order: each model is built once and freed before the next.
  const std::pair<const char*, Precision> precisions[] = {
      {"MoELayer/", Precision::fp32},
      {"MoELayerInt8W8A8/", Precision::int8_w8a8},
      {"MoELayerInt8WOnly/", Precision::int8_wonly},
      {"MoELayerBF16/", Precision::bf16}};
  for (const ModelSpec& m : models)
    for (const auto& [prefix, p] : precisions)
      for (std::int64_t T : autoglm_bench::token_counts()) {
        // Without the 16-bit kernels the bank would be widened back to f32: not a BF16 layer.
        if (p == Precision::bf16 && !backend.supports_weight_dtype(autoglm::DType::bf16)) continue;
        benchmark::RegisterBenchmark(
            (prefix + std::string(m.name) + "/tokens:" + std::to_string(T)).c_str(), BM_MoELayer,
            &m, T, p)
            ->UseRealTime()
            ->MinTime(0.5)
            ->Unit(benchmark::kMillisecond);
      }

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_live.w8a8.reset();  // before the backend that owns the buffers
  g_live.wonly.reset();
  g_live.bf16.reset();
  g_live.layer.reset();
  g_backend = nullptr;
  return 0;
}
