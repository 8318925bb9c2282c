// SPDX-License-Identifier: Apache-2.0
// Whole-model prefill and decode speed of a Hugging Face checkpoint directory, plus the memory
// load_model takes, on the CPU backend in FP32.
//
//   bench_model --model=DIR [--threads=N] [--prompt=128] [--decode=32] [--greedy=16]
//               [--tokens=ID,ID,...] [--dump-logits=FILE] [--memory-only]
//               [Google Benchmark flags]
//
// The model is loaded once (fidelity: transformers 5.x numerics), then:
//   Model/prefill   Session::prefill of the prompt into an empty cache: prompt tokens/s.
//   Model/decode    after an untimed prefill of the prompt, `decode` single-token Session::append
//                   steps, each feeding the argmax of the previous logits (greedy, as
//                   transformers' generate does): decode steps/s.
// The prompt is --tokens, else `prompt` ids (7 + 1009 i) mod vocab.
//
// Context (in the JSON's "context", and on stderr): load time, the greedy continuation
// (--greedy tokens from Session::generate), the checkpoint's size in bytes, and the process's
// memory before the load, after it and after one prefill: peak resident set (VmHWM, and
// getrusage ru_maxrss) and the current RSS split into anonymous and file-backed (mmap) pages
// (/proc/self/status RssAnon / RssFile). The peak reported is VmHWM: Linux carries ru_maxrss
// over fork + exec, so under a parent that was larger (compare_model.py after transformers)
// ru_maxrss is the parent's peak, not this process's. --memory-only stops after that (no
// benchmarks), so the peak is the load's and one prefill's alone. --dump-logits writes the
// prefill's last-position logits as raw little-endian float32 (tools/bench/compare_model.py
// compares them with transformers').
//
// Threads: --threads=N, else AUTOGLM_THREADS, else 2. tools/bench/compare_model.py runs this
// against transformers eager on the same checkpoint.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <sys/resource.h>

#include <benchmark/benchmark.h>

#include "autoglm/autoglm.hpp"
#include "bench_common.hpp"

namespace {

namespace fs = std::filesystem;

struct ModelArgs {
  std::string model;
  long prompt = 128;
  long decode = 32;
  long greedy = 16;
  std::vector<std::int32_t> tokens;
  std::string dump_logits;
  bool memory_only = false;
};

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "bench_model: %s\n", msg.c_str());
  std::exit(2);
}

long to_long(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0') die(flag + " " + v + " is not an integer");
  return x;
}

/// Parses and removes this binary's flags (after bench_common's --threads / --tiny).
ModelArgs parse_model_args(int& argc, char** argv) {
  ModelArgs a;
  if (const char* e = std::getenv("AUTOGLM_BENCH_MODEL"); e && *e) a.model = e;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto value = [&](const char* flag) -> std::optional<std::string> {
      const std::string f = std::string(flag) + "=";
      if (s.rfind(f, 0) == 0) return s.substr(f.size());
      return std::nullopt;
    };
    if (auto v = value("--model"))
      a.model = *v;
    else if (auto v = value("--prompt"))
      a.prompt = to_long("--prompt", *v);
    else if (auto v = value("--decode"))
      a.decode = to_long("--decode", *v);
    else if (auto v = value("--greedy"))
      a.greedy = to_long("--greedy", *v);
    else if (auto v = value("--dump-logits"))
      a.dump_logits = *v;
    else if (auto v = value("--tokens")) {
      std::stringstream ss(*v);
      std::string item;
      while (std::getline(ss, item, ','))
        a.tokens.push_back(static_cast<std::int32_t>(to_long("--tokens", item)));
    } else if (s == "--memory-only")
      a.memory_only = true;
    else
      argv[out++] = argv[i];
  }
  argc = out;
  if (a.model.empty()) die("--model=DIR (or AUTOGLM_BENCH_MODEL) is required");
  if (!a.tokens.empty()) a.prompt = static_cast<long>(a.tokens.size());
  if (a.prompt < 1 || a.decode < 1 || a.greedy < 1)
    die("--prompt, --decode and --greedy must be >= 1");
  return a;
}

/// Memory of this process at one point.
struct Memory {
  long max_rss_kib = 0;  // getrusage ru_maxrss (peak so far; may be a parent's, see the top)
  long hwm_kib = 0;      // VmHWM: this process's own peak
  long rss_kib = 0;      // VmRSS
  long anon_kib = 0;     // RssAnon
  long file_kib = 0;     // RssFile
};

Memory memory_now() {
  Memory m;
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  m.max_rss_kib = ru.ru_maxrss;
  std::ifstream f("/proc/self/status");
  std::string line;
  auto field = [&](const char* key, long& dst) {
    if (line.rfind(key, 0) == 0) dst = std::strtol(line.c_str() + std::strlen(key), nullptr, 10);
  };
  while (std::getline(f, line)) {
    field("VmHWM:", m.hwm_kib);
    field("VmRSS:", m.rss_kib);
    field("RssAnon:", m.anon_kib);
    field("RssFile:", m.file_kib);
  }
  return m;
}

std::string memory_json(const Memory& m) {
  std::ostringstream o;
  o << "{\"max_rss_kib\":" << m.max_rss_kib << ",\"hwm_kib\":" << m.hwm_kib
    << ",\"rss_kib\":" << m.rss_kib << ",\"rss_anon_kib\":" << m.anon_kib
    << ",\"rss_file_kib\":" << m.file_kib << "}";
  return o.str();
}

std::uint64_t checkpoint_bytes(const fs::path& dir) {
  std::uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors") n += e.file_size();
  return n;
}

std::string ids_json(std::span<const std::int32_t> ids) {
  std::string s = "[";
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ids[i]);
  }
  s += ']';
  return s;
}

/// Everything the benchmarks share.
struct Live {
  autoglm::CpuBackend* backend = nullptr;
  const autoglm::Model* model = nullptr;
  std::vector<std::int32_t> prompt;
  long decode = 32;
  std::vector<float> host;  // last logits row on the host
};
Live g;

/// Argmax of the last row of logits [n, V].
std::int32_t last_argmax(const autoglm::Tensor& logits) {
  const std::int64_t V = logits.dim(1);
  g.host.resize(static_cast<std::size_t>(logits.numel()));
  g.backend->copy_to_host(g.host.data(), logits);
  const float* row = g.host.data() + (logits.dim(0) - 1) * V;
  return static_cast<std::int32_t>(std::max_element(row, row + V) - row);
}

autoglm::SessionOptions session_options() {
  autoglm::SessionOptions so;
  so.max_context = static_cast<std::int64_t>(g.prompt.size()) + g.decode + 8;
  return so;
}

void BM_Prefill(benchmark::State& state) {
  autoglm::Session s(*g.model, session_options());
  for (auto _ : state) {
    s.reset();
    const autoglm::Tensor logits = s.prefill(g.prompt);
    benchmark::DoNotOptimize(last_argmax(logits));
  }
  const auto T = static_cast<double>(g.prompt.size());
  state.counters["tokens"] = T;
  state.counters["tokens/s"] =
      benchmark::Counter(T * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

void BM_Decode(benchmark::State& state) {
  autoglm::Session s(*g.model, session_options());
  std::int32_t checksum = 0;
  for (auto _ : state) {
    state.PauseTiming();
    s.reset();
    std::int32_t tok = last_argmax(s.prefill(g.prompt));
    state.ResumeTiming();
    for (long i = 0; i < g.decode; ++i) {
      tok = last_argmax(s.append(std::span(&tok, 1)));
      checksum += tok;
    }
  }
  benchmark::DoNotOptimize(checksum);
  const auto D = static_cast<double>(g.decode);
  state.counters["tokens"] = D;
  state.counters["context"] = static_cast<double>(g.prompt.size());
  state.counters["tokens/s"] =
      benchmark::Counter(D * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

}  // namespace

int main(int argc, char** argv) {
  const autoglm_bench::Options opt = autoglm_bench::parse_options(argc, argv);
  const ModelArgs a = parse_model_args(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  try {
    autoglm::CpuBackend backend(autoglm::CpuBackendOptions{
        .threads = opt.threads, .bf16_compute = opt.bf16_compute, .huge_pages = opt.huge_pages});
    g.backend = &backend;
    autoglm::LoadOptions lo;
    autoglm::FidelityOptions f;  // transformers 5.x numerics, as in tests/test_models.cpp
    f.group_mask = autoglm::GroupMask::neg_inf;
    f.renorm_epsilon = 1e-20f;
    lo.fidelity = f;

    const Memory before = memory_now();
    const auto t0 = std::chrono::steady_clock::now();
    const autoglm::Model model = autoglm::load_model(backend, a.model, lo);
    const double load_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const Memory loaded = memory_now();
    g.model = &model;
    g.decode = a.decode;
    const std::int64_t V = model.vocab_size();
    if (a.tokens.empty())
      for (long i = 0; i < a.prompt; ++i)
        g.prompt.push_back(static_cast<std::int32_t>((7 + 1009 * i) % V));
    else
      g.prompt = a.tokens;
    for (std::int32_t t : g.prompt)
      if (t < 0 || t >= V) die("--tokens: id " + std::to_string(t) + " is out of the vocabulary");

    // One prefill (its logits dumped on request), then the memory after it.
    std::vector<std::int32_t> greedy;
    {
      autoglm::Session s(model, session_options());
      const autoglm::Tensor logits = s.prefill(g.prompt);
      (void)last_argmax(logits);
      if (!a.dump_logits.empty()) {
        std::ofstream out(a.dump_logits, std::ios::binary);
        out.write(reinterpret_cast<const char*>(g.host.data() + (logits.dim(0) - 1) * V),
                  static_cast<std::streamsize>(V * sizeof(float)));
        if (!out) die("cannot write " + a.dump_logits);
      }
    }
    const Memory prefilled = memory_now();
    {
      autoglm::Session s(model, session_options());
      autoglm::GenerateOptions go;
      go.max_new_tokens = a.greedy;
      greedy = s.generate(g.prompt, go);
    }

    const std::uint64_t bytes = checkpoint_bytes(a.model);
    const autoglm::ModelConfig& c = model.config();
    std::ostringstream info;
    info << "{\"dir\":\"" << a.model << "\",\"family\":\"" << autoglm::model_family_name(c.family)
         << "\",\"layers\":" << model.num_layers() << ",\"hidden\":" << model.hidden()
         << ",\"experts\":" << c.num_experts << ",\"top_k\":" << c.num_experts_per_tok
         << ",\"vocab\":" << V << ",\"checkpoint_bytes\":" << bytes << ",\"load_s\":" << load_s
         << ",\"threads\":" << backend.num_threads() << ",\"prompt_tokens\":" << g.prompt.size()
         << ",\"decode_steps\":" << a.decode << ",\"greedy\":" << ids_json(greedy)
         << ",\"memory\":{\"before_load\":" << memory_json(before)
         << ",\"after_load\":" << memory_json(loaded)
         << ",\"after_prefill\":" << memory_json(prefilled) << "}}";
    benchmark::AddCustomContext("autoglm_version", AUTOGLM_VERSION_STRING);
    benchmark::AddCustomContext("autoglm_threads", std::to_string(backend.num_threads()));
    benchmark::AddCustomContext("autoglm_model", info.str());
    std::fprintf(
        stderr,
        "bench_model: %s: %lld layers, %.2f GiB checkpoint, loaded in %.2f s; peak RSS "
        "(VmHWM) after load %.2f GiB (%.2fx), after a prefill %.2f GiB (%.2fx); RSS now %.2f GiB "
        "(anon %.2f, file %.2f)\n",
        a.model.c_str(), static_cast<long long>(model.num_layers()),
        static_cast<double>(bytes) / (1 << 30), load_s,
        static_cast<double>(loaded.hwm_kib) / (1 << 20),
        static_cast<double>(loaded.hwm_kib) * 1024 / static_cast<double>(bytes),
        static_cast<double>(prefilled.hwm_kib) / (1 << 20),
        static_cast<double>(prefilled.hwm_kib) * 1024 / static_cast<double>(bytes),
        static_cast<double>(prefilled.rss_kib) / (1 << 20),
        static_cast<double>(prefilled.anon_kib) / (1 << 20),
        static_cast<double>(prefilled.file_kib) / (1 << 20));
    std::fprintf(stderr, "bench_model: greedy %s\n", ids_json(greedy).c_str());

    if (a.memory_only) {
      std::printf("%s\n", info.str().c_str());
      return 0;
    }
    benchmark::RegisterBenchmark("Model/prefill", BM_Prefill)
        ->UseRealTime()
        ->MinTime(1.0)
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("Model/decode", BM_Decode)
        ->UseRealTime()
        ->MinTime(1.0)
        ->Unit(benchmark::kMillisecond);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_model: error: %s\n", e.what());
    return 2;
  }
}
