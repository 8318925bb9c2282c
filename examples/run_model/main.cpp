// SPDX-License-Identifier: Apache-2.0
// run_model: loads a Hugging Face MoE checkpoint directory (config.json + safetensors), feeds a
// prompt of token ids and generates a continuation with the KV cache, printing the generated ids
// and the prefill / decode speed. A progress bar on stderr follows the load.
//
//   run_model --model tests/fixtures/deepseek_v3 --tokens 32,111,110,32,98,101 --max-new 16
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "autoglm/autoglm.hpp"

namespace {

struct Args {
  std::string model;
  std::vector<std::int32_t> tokens;
  long max_new = 16;
  int threads = 0;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  long seed = 0;
  std::string group_mask = "neg_inf";  // transformers 5.x; "zero": transformers 4.x
  int repeat = 1;        // run the prompt this many times (the later runs reuse the cache)
  std::string quantize;  // "" (as stored), int8, int8_g32, int8_g64, int8_g128
  std::string activations = "weight_only";        // or w8a8
  std::string save_quantized;                     // write the int8 checkpoint here, then run it
  std::string calibrate;                          // GPTQ calibration sequences (file)
  std::string parts = "experts,attention,dense";  // what --quantize converts
  std::string equalize = "on";                    // column equalisation of int8 weights
  std::string search_scales = "on";               // least-error scale search of int8 weights
  std::string weights = "stored";                 // float matrices: as stored, or f32
  bool bf16_compute = false;                      // bf16 weights on AMX-BF16 / AVX512_BF16
};

void usage() {
  std::puts(
      "usage: run_model --model DIR --tokens ID,ID,... [--max-new N] [--threads T]\n"
      "                 [--temperature X] [--top-k K] [--top-p P] [--seed S]\n"
      "                 [--group-mask neg_inf|zero|config] [--repeat R]\n"
      "                 [--quantize int8|int8_g32|int8_g64|int8_g128] [--activations "
      "weight_only|w8a8]\n"
      "                 [--save-quantized OUT_DIR] [--quantize-parts LIST] [--equalize on|off]\n"
      "                 [--search-scales on|off] [--weights stored|f32] [--bf16-compute]\n"
      "                 [--calibrate FILE]\n"
      "DIR holds config.json and model.safetensors (or a sharded index). Greedy by default.\n"
      "--group-mask: value of discarded expert groups (DeepSeek-V3 / GLM group-limited routing):\n"
      "  neg_inf (default: transformers 5.x, DeepSeek reference, llama.cpp, vLLM), zero\n"
      "  (transformers 4.x) or config (ModelConfig's FidelityOptions default).\n"
      "--repeat R runs the same prompt R times in one session: the later runs reuse its cache.\n"
      "--quantize: int8 experts, attention and dense MLPs after loading (per channel, or one "
      "scale\n"
      "  per 32/64/128 inputs); router, embeddings and LM head stay f32. --activations w8a8 also\n"
      "  quantizes activations per token and group (faster at long prompts, less accurate).\n"
      "--quantize-parts: comma list of experts, attention, dense, head, embeddings, router\n"
      "  (default experts,attention,dense).\n"
      "--equalize off: no column scales for weight-only int8 (on: where a few large input\n"
      "  columns dominate, see docs/quantization.md).\n"
      "--search-scales off: each int8 group's scale is max|w| / 127 (on: the candidate within\n"
      "  +-10 % with the least rounding error).\n"
      "--weights: float weight matrices as stored (default: a BF16 / F16 checkpoint stays 16-bit,\n"
      "  half the memory of f32, same logits) or f32 (widened at load).\n"
      "--bf16-compute: bf16 weights multiply bf16-rounded activations on AMX-BF16 tiles or with\n"
      "  AVX512_BF16 dot products (as PyTorch's bf16 matmuls do): faster prefill, logits within\n"
      "  bf16 rounding of exact.\n"
      "--save-quantized OUT_DIR: writes the int8 checkpoint (quantize_checkpoint, or\n"
      "  save_quantized with --calibrate) and runs it; an int8 directory loads directly with\n"
      "  --model, without re-quantizing.\n"
      "--calibrate FILE: with --quantize or --save-quantized, GPTQ rounding calibrated on FILE's\n"
      "  token sequences (one per line, ids separated by spaces or commas) instead of\n"
      "  round-to-nearest (the f32 model is loaded whole first).");
}

[[noreturn]] void bad(std::string_view msg) {
  throw autoglm::Error(autoglm::ErrorCode::invalid_argument, "run_model", msg);
}

long to_long(std::string_view flag, const std::string& v) {
  char* end = nullptr;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0') bad(fmt::format("{} {} is not an integer", flag, v));
  return x;
}

float to_float(std::string_view flag, const std::string& v) {
  char* end = nullptr;
  const float x = std::strtof(v.c_str(), &end);
  if (v.empty() || *end != '\0') bad(fmt::format("{} {} is not a number", flag, v));
  return x;
}

std::vector<std::int32_t> to_ids(const std::string& v) {
  std::vector<std::int32_t> ids;
  std::size_t pos = 0;
  while (pos <= v.size()) {
    const std::size_t comma = v.find(',', pos);
    const std::string item =
        v.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    const long id = to_long("--tokens", item);
    if (id < 0 || id > INT32_MAX) bad(fmt::format("--tokens: id {} out of range", id));
    ids.push_back(static_cast<std::int32_t>(id));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return ids;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string_view f = argv[i];
    if (f == "--help" || f == "-h") {
      usage();
      std::exit(0);
    }
    if (f == "--bf16-compute") {
      a.bf16_compute = true;
      continue;
    }
    if (i + 1 >= argc) bad(fmt::format("{} needs a value (or is unknown); see --help", f));
    const std::string v = argv[++i];
    if (f == "--model")
      a.model = v;
    else if (f == "--tokens")
      a.tokens = to_ids(v);
    else if (f == "--max-new")
      a.max_new = to_long(f, v);
    else if (f == "--threads")
      a.threads = static_cast<int>(to_long(f, v));
    else if (f == "--temperature")
      a.temperature = to_float(f, v);
    else if (f == "--top-k")
      a.top_k = static_cast<int>(to_long(f, v));
    else if (f == "--top-p")
      a.top_p = to_float(f, v);
    else if (f == "--seed")
      a.seed = to_long(f, v);
    else if (f == "--group-mask")
      a.group_mask = v;
    else if (f == "--repeat")
      a.repeat = static_cast<int>(to_long(f, v));
    else if (f == "--quantize")
      a.quantize = v;
    else if (f == "--activations")
      a.activations = v;
    else if (f == "--save-quantized")
      a.save_quantized = v;
    else if (f == "--quantize-parts")
      a.parts = v;
    else if (f == "--equalize")
      a.equalize = v;
    else if (f == "--search-scales")
      a.search_scales = v;
    else if (f == "--weights")
      a.weights = v;
    else if (f == "--calibrate")
      a.calibrate = v;
    else
      bad(fmt::format("unknown flag {}; see --help", f));
  }
  if (a.model.empty()) bad("--model DIR is required");
  if (a.tokens.empty()) bad("--tokens ID,ID,... is required");
  if (a.max_new < 0) bad(fmt::format("--max-new {} must be >= 0", a.max_new));
  if (a.repeat < 1) bad(fmt::format("--repeat {} must be >= 1", a.repeat));
  if (a.group_mask != "neg_inf" && a.group_mask != "zero" && a.group_mask != "config")
    bad(fmt::format("--group-mask {} must be neg_inf, zero or config", a.group_mask));
  if (a.equalize != "on" && a.equalize != "off")
    bad(fmt::format("--equalize {} must be on or off", a.equalize));
  if (a.search_scales != "on" && a.search_scales != "off")
    bad(fmt::format("--search-scales {} must be on or off", a.search_scales));
  if (a.weights != "stored" && a.weights != "f32")
    bad(fmt::format("--weights {} must be stored or f32", a.weights));
  if (!a.save_quantized.empty() && a.quantize.empty()) a.quantize = "int8";
  if (!a.calibrate.empty() && a.quantize.empty())
    bad("--calibrate needs --quantize or --save-quantized");
  if (!a.quantize.empty()) autoglm::QuantSpec::parse(a.quantize, a.activations);  // validates
  return a;
}

/// A one-line progress bar on stderr, redrawn in place whenever the percentage changes.
void draw_progress(const autoglm::LoadProgress& p) {
  constexpr int kWidth = 40;
  static int last = -1;
  const double frac = p.bytes_total ? static_cast<double>(p.bytes_done) / p.bytes_total : 0.0;
  const int percent = static_cast<int>(frac * 100.0);
  const bool done = p.tensors_done == p.tensors_total;
  if (percent == last && !done) return;
  last = percent;
  const int fill = static_cast<int>(frac * kWidth);
  std::fprintf(stderr, "\rloading [%s%s] %3d%%  %zu/%zu tensors  %.1f/%.1f MiB",
               std::string(static_cast<std::size_t>(fill), '#').c_str(),
               std::string(static_cast<std::size_t>(kWidth - fill), '.').c_str(), percent,
               p.tensors_done, p.tensors_total, static_cast<double>(p.bytes_done) / (1 << 20),
               static_cast<double>(p.bytes_total) / (1 << 20));
  if (done) std::fputc('\n', stderr);
  std::fflush(stderr);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    autoglm::CpuBackend backend(
        autoglm::CpuBackendOptions{.threads = a.threads, .bf16_compute = a.bf16_compute});
    if (a.bf16_compute && !backend.bf16_compute())
      std::fputs(
          "note: --bf16-compute ignored: this CPU / OS has neither AMX-BF16 nor AVX512_BF16\n",
          stderr);
    autoglm::LoadOptions lo;
    lo.progress = [](const autoglm::LoadProgress& p) {
      draw_progress(p);
      return true;
    };
    if (a.weights == "f32") lo.weights = autoglm::WeightStorage::f32;
    if (a.group_mask != "config") {
      autoglm::FidelityOptions f;
      f.group_mask =
          a.group_mask == "zero" ? autoglm::GroupMask::zero : autoglm::GroupMask::neg_inf;
      lo.fidelity = f;
    }
    const auto t0 = std::chrono::steady_clock::now();
    autoglm::QuantConfig qc;
    if (!a.quantize.empty()) {
      qc.spec = autoglm::QuantSpec::parse(a.quantize, a.activations);
      qc.spec.equalize = a.equalize == "on";
      qc.spec.search_scales = a.search_scales == "on";
      qc.set_parts(a.parts);
    }
    std::string dir = a.model;
    if (!a.save_quantized.empty()) {
      autoglm::QuantizeReport r;
      if (a.calibrate.empty()) {
        r = autoglm::quantize_checkpoint(a.model, a.save_quantized, qc);
      } else {  // GPTQ in memory, then the model's codes written out
        autoglm::Calibration cal;
        cal.sequences = autoglm::Calibration::read_sequences(a.calibrate);
        const autoglm::Model f32 = autoglm::load_model(backend, a.model, lo);
        r = autoglm::save_quantized(autoglm::quantize_model(f32, qc, cal), a.model,
                                    a.save_quantized, qc);
      }
      fmt::print(
          "quantized {} -> {}: {} int8 tensors, {} kept; {:.1f} MiB -> {:.1f} MiB ({:.1f} %)\n",
          a.model, a.save_quantized, r.quantized, r.kept,
          static_cast<double>(r.bytes_in) / (1 << 20), static_cast<double>(r.bytes_out) / (1 << 20),
          100.0 * static_cast<double>(r.bytes_out) / static_cast<double>(r.bytes_in));
      dir = a.save_quantized;
    }
    // Quantized while loading, a layer at a time: the f32 model is never whole in memory.
    if (!a.quantize.empty() && a.save_quantized.empty() && a.calibrate.empty()) lo.quantize = qc;
    autoglm::Model model = autoglm::load_model(backend, dir, lo);
    if (!a.calibrate.empty() && a.save_quantized.empty()) {  // GPTQ, a layer at a time
      autoglm::Calibration cal;
      cal.sequences = autoglm::Calibration::read_sequences(a.calibrate);
      model = autoglm::quantize_model(model, qc, cal);
    }
    const double load_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const autoglm::ModelConfig& c = model.config();
    fmt::print(
        "model: {} ({}), {} layers, hidden {}, {} experts (top-{}), vocab {}; loaded in "
        "{:.2f} s on {} threads\n",
        dir, autoglm::model_family_name(c.family), model.num_layers(), model.hidden(),
        c.num_experts, c.num_experts_per_tok, model.vocab_size(), load_s, backend.num_threads());

    if (!a.quantize.empty())
      fmt::print("weights: int8 ({}, {} activations)\n", qc.spec.scheme_name(),
                 qc.spec.mode_name());
    else if (!c.quantization.method.empty())
      fmt::print("weights: int8, as stored ({})\n", c.quantization.method);
    else
      fmt::print("weights: float matrices {} (LM head {}, embeddings {})\n",
                 a.weights == "f32" ? "widened to f32" : "as stored",
                 model.head().head().is_quantized()
                     ? "int8"
                     : autoglm::dtype_name(model.head().head().tensor().dtype()),
                 model.embeddings().table().is_quantized()
                     ? "int8"
                     : autoglm::dtype_name(model.embeddings().table().tensor().dtype()));
    if (backend.bf16_compute())
      fmt::print(
          "compute: bf16 weights times bf16-rounded activations (AMX-BF16 or AVX512_BF16)\n");
    autoglm::Session session(model);
    autoglm::GenerateOptions go;
    go.max_new_tokens = a.max_new;
    go.sampling.temperature = a.temperature;
    go.sampling.top_k = a.top_k;
    go.sampling.top_p = a.top_p;
    go.sampling.seed = static_cast<std::uint64_t>(a.seed);
    for (int r = 0; r < a.repeat; ++r) {
      autoglm::GenerationStats st;
      const std::vector<std::int32_t> out = session.generate(a.tokens, go, &st);
      fmt::print("prompt: {} tokens ({} reused from the cache, {} computed)\n", st.prompt_tokens,
                 st.reused_tokens, st.prefill_tokens);
      fmt::print("generated: {}\n", fmt::join(out, ","));
      fmt::print(
          "prefill: {:.1f} tokens/s ({:.2f} ms)   decode: {:.1f} tokens/s ({} steps, "
          "{:.2f} ms)\n",
          st.prefill_tokens_per_second(), st.prefill_seconds * 1e3, st.decode_tokens_per_second(),
          std::max<std::int64_t>(st.generated_tokens - 1, 0), st.decode_seconds * 1e3);
    }
    return 0;
  } catch (const autoglm::Error& e) {
    std::fprintf(stderr, "\nerror: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nerror: %s\n", e.what());
    return 2;
  }
}
