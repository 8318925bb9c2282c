// SPDX-License-Identifier: Apache-2.0
// Shapes, seeds and command-line handling shared by bench_moe_layer and bench_reference.
// Header-only and free of autoglm types, so bench_reference does not link the library.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace autoglm_bench {

/// One MoE layer shape, as published in the model's config.json.
struct ModelSpec {
  const char* name;         ///< benchmark name component, e.g. "Qwen3-30B-A3B"
  std::int64_t d;           ///< hidden_size
  std::int64_t ffn;         ///< moe_intermediate_size (Mixtral: intermediate_size)
  std::int64_t experts;     ///< routed experts E
  int top_k;                ///< experts per token k
  bool sigmoid;             ///< false: softmax_topk; true: sigmoid_group
  bool renormalize;         ///< norm_topk_prob
  float renorm_epsilon;     ///< added to the renormalisation sum
  float routed_scaling;     ///< routed_scaling_factor
  int n_group;              ///< expert groups (sigmoid_group)
  int topk_group;           ///< groups kept per token
  bool selection_bias;      ///< e_score_correction_bias
  std::int64_t shared_ffn;  ///< width of the shared expert; 0 = none

  /// Active FLOPs of one call on T tokens: routed SwiGLU + shared SwiGLU + router.
  double active_flops(std::int64_t T) const {
    return 2.0 * T * top_k * 3.0 * d * ffn + 2.0 * T * 3.0 * d * shared_ffn + 2.0 * T * d * experts;
  }
};

// Mixtral-8x7B: hidden 4096, intermediate 14336, 8 experts, top-2, softmax, renormalised.
// Qwen3-30B-A3B: hidden 2048, moe_intermediate 768, 128 experts, top-8, norm_topk_prob.
// GLM-4.5-Air: hidden 4096, moe_intermediate 1408, 128 experts, top-8, 1 shared expert,
//   sigmoid scores + e_score_correction_bias, n_group 1, topk_group 1, norm_topk_prob with
//   transformers' 1e-20 epsilon, routed_scaling_factor 1.0.
inline const std::vector<ModelSpec>& real_models() {
  static const std::vector<ModelSpec> m = {
      {"Mixtral-8x7B", 4096, 14336, 8, 2, false, true, 0.0f, 1.0f, 1, 1, false, 0},
      {"Qwen3-30B-A3B", 2048, 768, 128, 8, false, true, 0.0f, 1.0f, 1, 1, false, 0},
      {"GLM-4.5-Air", 4096, 1408, 128, 8, true, true, 1e-20f, 1.0f, 1, 1, true, 1408},
  };
  return m;
}

/// Small shapes for smoke tests (--tiny or AUTOGLM_BENCH_TINY=1): one of each policy.
inline const std::vector<ModelSpec>& tiny_models() {
  static const std::vector<ModelSpec> m = {
      {"Tiny-softmax", 256, 512, 8, 2, false, true, 0.0f, 1.0f, 1, 1, false, 0},
      {"Tiny-sigmoid", 256, 128, 16, 4, true, true, 1e-20f, 1.0f, 1, 1, true, 128},
  };
  return m;
}

/// Token counts of every benchmark.
inline const std::vector<std::int64_t>& token_counts() {
  static const std::vector<std::int64_t> t = {1, 16, 128, 512};
  return t;
}

/// Seeds of autoglm's counter-based fill_uniform (value = scale * u(seed, flat index)).
/// tools/bench/compare.py reproduces the same tensors in PyTorch from these.
struct Seeds {
  static constexpr std::uint64_t router = 1000;   ///< router weight [E, d]; bias uses router + 1
  static constexpr std::uint64_t experts = 2000;  ///< gate_up [E, 2F, d]; down uses experts + 1
  static constexpr std::uint64_t shared = 3000;   ///< shared gate_up [1, 2Fs, d]; down: shared + 1
  static constexpr std::uint64_t input = 7;       ///< x [T, d], scale 1
};

/// The specs as a JSON array (published in the benchmark context for compare.py).
inline std::string specs_json(const std::vector<ModelSpec>& models) {
  std::string s = "[";
  char buf[512];
  for (std::size_t i = 0; i < models.size(); ++i) {
    const ModelSpec& m = models[i];
    std::snprintf(buf, sizeof buf,
                  "%s{\"name\":\"%s\",\"d\":%lld,\"ffn\":%lld,\"experts\":%lld,\"top_k\":%d,"
                  "\"score\":\"%s\",\"renormalize\":%s,\"renorm_epsilon\":%g,"
                  "\"routed_scaling\":%g,\"n_group\":%d,\"topk_group\":%d,"
                  "\"selection_bias\":%s,\"shared_ffn\":%lld}",
                  i ? "," : "", m.name, static_cast<long long>(m.d), static_cast<long long>(m.ffn),
                  static_cast<long long>(m.experts), m.top_k, m.sigmoid ? "sigmoid" : "softmax",
                  m.renormalize ? "true" : "false", static_cast<double>(m.renorm_epsilon),
                  static_cast<double>(m.routed_scaling), m.n_group, m.topk_group,
                  m.selection_bias ? "true" : "false", static_cast<long long>(m.shared_ffn));
    s += buf;
  }
  return s + "]";
}

/// Options the benchmark binaries take besides Google Benchmark's own flags.
struct Options {
  int threads = 2;    ///< --threads=N, else AUTOGLM_THREADS, else 2
  bool tiny = false;  ///< --tiny or AUTOGLM_BENCH_TINY=1: smoke-test shapes instead of real ones
  /// --bf16-compute: CpuBackendOptions::bf16_compute (bf16 weights on AMX-BF16 tiles).
  bool bf16_compute = false;
  /// --no-huge-pages: CpuBackendOptions::huge_pages off (4 KiB pages for the weights).
  bool huge_pages = true;
};

/// Parses and removes --threads=N / --threads N / --tiny / --bf16-compute / --no-huge-pages from
/// argv (before benchmark::Initialize).
inline Options parse_options(int& argc, char** argv) {
  Options o;
  if (const char* e = std::getenv("AUTOGLM_THREADS"); e && *e) o.threads = std::atoi(e);
  if (const char* e = std::getenv("AUTOGLM_BENCH_TINY"); e && *e && std::strcmp(e, "0") != 0)
    o.tiny = true;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a.rfind("--threads=", 0) == 0) {
      o.threads = std::atoi(argv[i] + 10);
    } else if (a == "--threads" && i + 1 < argc) {
      o.threads = std::atoi(argv[++i]);
    } else if (a == "--tiny") {
      o.tiny = true;
    } else if (a == "--bf16-compute") {
      o.bf16_compute = true;
    } else if (a == "--no-huge-pages") {
      o.huge_pages = false;
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
  argv[argc] = nullptr;
  if (o.threads < 1) {
    std::fprintf(stderr, "threads must be >= 1 (got %d)\n", o.threads);
    std::exit(2);
  }
  return o;
}

}  // namespace autoglm_bench
