// SPDX-License-Identifier: Apache-2.0
// moe_demo: builds an embedded MoE pipeline (fixed seed, no files), runs a batch of tokens and
// prints each token's routing, the load statistics of every layer and the timing.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "autoglm/autoglm.hpp"

namespace {

struct Args {
  int tokens = 8;
  int experts = 8;
  int top_k = 2;
  std::string gate = "softmax_topk";
  int hidden = 256;
  int ffn = 512;
  int layers = 2;
  int vocab = 1000;
  int threads = 0;
  int seed = 42;
  double capacity_factor = 0.0;
  int n_group = 1;
  int topk_group = 1;
  std::string json_file;
  int show = 16;
};

void usage() {
  std::puts(
      "usage: moe_demo [--tokens N] [--experts E] [--top-k K] [--gate POLICY] [--hidden D]\n"
      "                [--ffn F] [--layers L] [--vocab V] [--threads T] [--seed S]\n"
      "                [--capacity-factor C] [--n-group G --topk-group G2] [--show N]\n"
      "                [--json FILE]\n"
      "POLICY: argmax | softmax_topk | sigmoid_group | noisy_topk | expert_choice\n"
      "--json FILE builds the pipeline from a JSON description instead of the flags.");
}

int to_int(std::string_view flag, const char* v) {
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (end == v || *end != '\0') throw autoglm::Error(autoglm::ErrorCode::invalid_argument,
                                                     "moe_demo", fmt::format("{} {} is not an integer", flag, v));
  return static_cast<int>(x);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string_view f = argv[i];
    if (f == "--help" || f == "-h") {
      usage();
      std::exit(0);
    }
    if (i + 1 >= argc)
      throw autoglm::Error(autoglm::ErrorCode::invalid_argument, "moe_demo",
                           fmt::format("{} needs a value (or is unknown); see --help", f));
    const char* v = argv[++i];
    if (f == "--tokens") a.tokens = to_int(f, v);
    else if (f == "--experts") a.experts = to_int(f, v);
    else if (f == "--top-k") a.top_k = to_int(f, v);
    else if (f == "--gate") a.gate = v;
    else if (f == "--hidden") a.hidden = to_int(f, v);
    else if (f == "--ffn") a.ffn = to_int(f, v);
    else if (f == "--layers") a.layers = to_int(f, v);
    else if (f == "--vocab") a.vocab = to_int(f, v);
    else if (f == "--threads") a.threads = to_int(f, v);
    else if (f == "--seed") a.seed = to_int(f, v);
    else if (f == "--capacity-factor") a.capacity_factor = std::atof(v);
    else if (f == "--n-group") a.n_group = to_int(f, v);
    else if (f == "--topk-group") a.topk_group = to_int(f, v);
    else if (f == "--show") a.show = to_int(f, v);
    else if (f == "--json") a.json_file = v;
    else
      throw autoglm::Error(autoglm::ErrorCode::invalid_argument, "moe_demo",
                           fmt::format("unknown flag {}; see --help", f));
  }
  if (a.tokens < 0)
    throw autoglm::Error(autoglm::ErrorCode::invalid_argument, "moe_demo",
                         fmt::format("--tokens {} must be >= 0", a.tokens));
  return a;
}

std::string description(const Args& a) {
  if (!a.json_file.empty()) {
    std::ifstream in(a.json_file);
    if (!in)
      throw autoglm::Error(autoglm::ErrorCode::io, "moe_demo",
                           fmt::format("cannot read {}", a.json_file));
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  std::string gate = fmt::format(R"({{"type": "{}", "num_experts": {}, "top_k": {})", a.gate,
                                 a.experts, a.top_k);
  if (a.capacity_factor > 0) gate += fmt::format(R"(, "capacity_factor": {})", a.capacity_factor);
  if (a.n_group > 1)
    gate += fmt::format(R"(, "n_group": {}, "topk_group": {})", a.n_group, a.topk_group);
  gate += "}";
  return fmt::format(
      R"({{"seed": {}, "vocab": {}, "hidden": {}, "num_layers": {}, "gate": {},)"
      R"( "experts": {{"type": "swiglu", "ffn": {}}}}})",
      a.seed, a.vocab, a.hidden, a.layers, gate, a.ffn);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    autoglm::CpuBackend backend(autoglm::CpuBackendOptions{a.threads});
    const std::string desc = description(a);
    const auto t0 = std::chrono::steady_clock::now();
    const autoglm::DynamicPipeline pipe = autoglm::build_pipeline(backend, desc);
    const auto t1 = std::chrono::steady_clock::now();

    std::vector<std::int32_t> tokens(static_cast<std::size_t>(a.tokens));
    for (int t = 0; t < a.tokens; ++t)
      tokens[t] = static_cast<std::int32_t>((t * 7919 + a.seed) % pipe.vocab_size());

    pipe.forward(backend, tokens);  // warm-up: first-touch of buffers
    const auto t2 = std::chrono::steady_clock::now();
    const autoglm::PipelineResult res = pipe.forward(backend, tokens, /*trace=*/true);
    const auto t3 = std::chrono::steady_clock::now();

    fmt::print("autoglm {} moe_demo: {} tokens, {} layers, d={}, vocab={}, backend={} ({} threads)\n",
               AUTOGLM_VERSION_STRING, a.tokens, pipe.layers().size(), pipe.hidden(),
               pipe.vocab_size(), backend.name(), backend.num_threads());
    fmt::print("description: {}\n\n", desc);
    for (std::size_t l = 0; l < res.layers.size(); ++l) {
      const autoglm::LayerTrace& lt = res.layers[l];
      fmt::print("layer {} routing (token: expert:weight ...)\n", l);
      for (int t = 0; t < std::min(a.tokens, a.show); ++t) {
        std::string line;
        for (std::int64_t j = 0; j < lt.slots; ++j) {
          const std::int32_t e = lt.ids[t * lt.slots + j];
          if (e >= 0) line += fmt::format(" {:>3}:{:.3f}", e, lt.weights[t * lt.slots + j]);
        }
        fmt::print("  token {:>4} (id {:>5}):{}\n", t, tokens[t], line.empty() ? " (dropped)" : line);
      }
      if (a.tokens > a.show) fmt::print("  ... {} more tokens\n", a.tokens - a.show);
      const autoglm::RoutingStats& s = lt.stats;
      fmt::print("  load: tokens/expert [{}]\n", fmt::join(s.tokens_per_expert, " "));
      fmt::print("  max {:.0f}  mean {:.2f}  assignments {}  dropped {}  aux_loss {:.4f}  z_loss {:.4f}\n\n",
                 s.max_load, s.mean_load, s.assignments, s.dropped, s.aux_loss, s.z_loss);
    }
    std::vector<float> logits(static_cast<std::size_t>(res.logits.numel()));
    backend.copy_to_host(logits.data(), res.logits);
    std::string next;
    for (int t = 0; t < std::min(a.tokens, a.show); ++t) {
      const float* row = logits.data() + static_cast<std::size_t>(t) * pipe.vocab_size();
      next += fmt::format(" {}", std::max_element(row, row + pipe.vocab_size()) - row);
    }
    fmt::print("greedy next token per position:{}\n", next);
    const double build_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    const double fwd_ms = std::chrono::duration<double, std::milli>(t3 - t2).count();
    fmt::print("timing: build {:.2f} ms, forward {:.3f} ms ({:.1f} tokens/s)\n", build_ms, fwd_ms,
               fwd_ms > 0 ? a.tokens / (fwd_ms / 1e3) : 0.0);
    return 0;
  } catch (const autoglm::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 2;
  }
}
