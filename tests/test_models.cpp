// SPDX-License-Identifier: Apache-2.0
// Real checkpoints: the tiny transformers 5.24 fixtures of tests/fixtures (six MoE families,
// both expert layouts, sharded and tied checkpoints) loaded with load_model and run on the CPU.
// Per fixture: prefill logits at every position and every layer's output, the 8 cached decode
// steps, the 16-token greedy continuation; KV-cache decode against a full recompute; prefix
// reuse against no reuse. Plus the loader's error paths and the attention primitives against a
// naive reference.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "support.hpp"

using namespace autoglm;
using namespace agt;

namespace {

namespace fs = std::filesystem;

fs::path fixtures_dir() {
  return fs::path(AUTOGLM_FIXTURES_DIR);
}

/// transformers 5.x numerics: -inf group mask (4.x used 0.0), 1e-20 renormalisation epsilon.
FidelityOptions transformers5() {
  FidelityOptions f;
  f.group_mask = GroupMask::neg_inf;
  f.renorm_epsilon = 1e-20f;
  return f;
}

/// expected.json plus the arrays of expected.bin.
struct Expected {
  std::vector<std::int32_t> prompt, greedy, decode_inputs;
  std::int64_t vocab = 0, hidden = 0, layers = 0;
  std::map<std::string, std::vector<float>> arrays;
};

Expected read_expected(const fs::path& dir) {
  std::ifstream jf(dir / "expected.json");
  REQUIRE(jf.good());
  const nlohmann::json j = nlohmann::json::parse(jf);
  Expected e;
  e.prompt = j.at("prompt").get<std::vector<std::int32_t>>();
  e.greedy = j.at("greedy").get<std::vector<std::int32_t>>();
  e.decode_inputs = j.at("decode_inputs").get<std::vector<std::int32_t>>();
  e.vocab = j.at("vocab_size").get<std::int64_t>();
  e.hidden = j.at("hidden_size").get<std::int64_t>();
  e.layers = j.at("num_hidden_layers").get<std::int64_t>();
  const auto& bin = j.at("binary");
  std::ifstream bf(dir / bin.at("file").get<std::string>(), std::ios::binary);
  REQUIRE(bf.good());
  for (const auto& [name, a] : bin.at("arrays").items()) {
    std::vector<float> v(a.at("count").get<std::size_t>());
    bf.seekg(a.at("offset").get<std::streamoff>());
    bf.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * 4));
    REQUIRE(bf.good());
    e.arrays[name] = std::move(v);
  }
  return e;
}

/// max|got - want| / max(1, max|want|) over the arrays.
double rel_error(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  double diff = 0.0, scale = 1.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  }
  return diff / scale;
}

std::vector<float> slice(const std::vector<float>& v, std::size_t row0, std::size_t rows,
                         std::size_t width) {
  return {v.begin() + static_cast<std::ptrdiff_t>(row0 * width),
          v.begin() + static_cast<std::ptrdiff_t>((row0 + rows) * width)};
}

std::int32_t argmax(const std::vector<float>& v, std::size_t row, std::size_t width) {
  const auto* p = v.data() + row * width;
  return static_cast<std::int32_t>(std::max_element(p, p + width) - p);
}

constexpr double kTol = 1e-4;  // the fixtures' suggested float32 tolerance

/// Everything one fixture checks; prints the relative errors seen.
void check_fixture(const std::string& name) {
  const fs::path dir = fixtures_dir() / name;
  const Expected ex = read_expected(dir);
  CpuBackend backend(CpuBackendOptions{.threads = 2});
  LoadOptions lo;
  lo.fidelity = transformers5();
  const Model model = load_model(backend, dir, lo);
  REQUIRE(model.vocab_size() == ex.vocab);
  REQUIRE(model.hidden() == ex.hidden);
  REQUIRE(model.num_layers() == ex.layers);
  const auto V = static_cast<std::size_t>(ex.vocab), L = ex.prompt.size();
  const auto d = static_cast<std::size_t>(ex.hidden);

  // Prefill: logits at every position and every layer's residual stream.
  Session s(model);
  std::vector<float> layer_out(static_cast<std::size_t>(ex.layers) * L * d);
  s.set_layer_observer([&](std::int64_t l, TensorView h) {
    const std::vector<float> v = host_f32(backend, h);
    std::copy(v.begin(), v.end(), layer_out.begin() + static_cast<std::ptrdiff_t>(l * L * d));
  });
  const std::vector<float> prefill = host_f32(backend, s.prefill(ex.prompt, true));
  s.set_layer_observer({});
  const double e_layers = rel_error(layer_out, ex.arrays.at("prefill_layer_outputs"));
  const double e_prefill = rel_error(prefill, ex.arrays.at("prefill_logits"));
  CHECK(e_layers <= kTol);
  CHECK(e_prefill <= kTol);
  CHECK(argmax(prefill, L - 1, V) == ex.greedy[0]);

  // Decode with the KV cache, one token at a time.
  std::vector<float> decode;
  for (std::int32_t t : ex.decode_inputs) {
    const std::vector<float> row = host_f32(backend, s.append(std::span(&t, 1)));
    decode.insert(decode.end(), row.begin(), row.end());
  }
  const double e_decode = rel_error(decode, ex.arrays.at("decode_logits"));
  CHECK(e_decode <= kTol);

  // KV-cache decode equals a full recompute of prompt + decode inputs.
  std::vector<std::int32_t> seq = ex.prompt;
  seq.insert(seq.end(), ex.decode_inputs.begin(), ex.decode_inputs.end());
  const std::vector<float> full = host_f32(backend, model.forward(seq));
  const double e_recompute = rel_error(decode, slice(full, L, ex.decode_inputs.size(), V));
  CHECK(e_recompute <= 1e-5);
  CHECK(rel_error(slice(full, 0, L, V), prefill) <= 1e-5);

  // Greedy continuation of 16, in a session that already holds another sequence.
  Session g(model);
  (void)g.prefill(std::vector<std::int32_t>{
      ex.prompt[0], static_cast<std::int32_t>((ex.prompt[1] + 1) % ex.vocab), ex.greedy[1]});
  GenerationStats stats;
  GenerateOptions go;
  go.max_new_tokens = 16;
  const std::vector<std::int32_t> greedy = g.generate(ex.prompt, go, &stats);
  CHECK(greedy == ex.greedy);
  CHECK(stats.prompt_tokens == static_cast<std::int64_t>(L));
  CHECK(stats.reused_tokens == 1);
  CHECK(stats.generated_tokens == 16);

  // Prefix reuse: a prompt sharing all but its last two tokens with the cached sequence.
  std::vector<std::int32_t> p2(ex.prompt.begin(), ex.prompt.end() - 2);
  p2.push_back(static_cast<std::int32_t>((ex.prompt[L - 2] + 1) % ex.vocab));  // diverges here
  p2.push_back(ex.greedy[2]);
  p2.push_back(ex.greedy[7]);
  const std::vector<float> reused = host_f32(backend, g.prefill(p2, true));
  CHECK(g.reused_tokens() == static_cast<std::int64_t>(L - 2));
  REQUIRE(reused.size() == 3 * V);
  Session fresh(model);
  const std::vector<float> plain = host_f32(backend, fresh.prefill(p2, true));
  CHECK(fresh.reused_tokens() == 0);
  const double e_reuse = rel_error(reused, slice(plain, p2.size() - 3, 3, V));
  CHECK(e_reuse <= 1e-5);
  // The same prompt again reuses everything but its last token.
  const std::vector<float> again = host_f32(backend, g.prefill(p2));
  CHECK(g.reused_tokens() == static_cast<std::int64_t>(p2.size() - 1));
  CHECK(rel_error(again, slice(plain, p2.size() - 1, 1, V)) <= 1e-5);

  // Shown with -s (or on a failure): the errors of this fixture.
  INFO(name << ": max relative error prefill " << e_prefill << ", layers " << e_layers
            << ", decode " << e_decode << ", cache vs recompute " << e_recompute
            << ", reuse vs none " << e_reuse);
  SUCCEED();
}

}  // namespace

TEST_CASE("fixture mixtral_hub_sharded", "[models][fixtures]") {
  check_fixture("mixtral_hub_sharded");
}
TEST_CASE("fixture mixtral_fused_tied", "[models][fixtures]") {
  check_fixture("mixtral_fused_tied");
}
TEST_CASE("fixture qwen2_moe", "[models][fixtures]") {
  check_fixture("qwen2_moe");
}
TEST_CASE("fixture qwen3_moe", "[models][fixtures]") {
  check_fixture("qwen3_moe");
}
TEST_CASE("fixture olmoe", "[models][fixtures]") {
  check_fixture("olmoe");
}
TEST_CASE("fixture deepseek_v3", "[models][fixtures]") {
  check_fixture("deepseek_v3");
}
TEST_CASE("fixture deepseek_v3_fused_noqlora", "[models][fixtures]") {
  check_fixture("deepseek_v3_fused_noqlora");
}
TEST_CASE("fixture glm4_moe_qknorm", "[models][fixtures]") {
  check_fixture("glm4_moe_qknorm");
}
TEST_CASE("fixture glm4_moe_hub_tied", "[models][fixtures]") {
  check_fixture("glm4_moe_hub_tied");
}

// ------------------------------------------------------------------------------ fidelity

TEST_CASE("group mask 0.0 (transformers 4.x) routes the deepseek_v3 fixture differently",
          "[models][fixtures]") {
  const fs::path dir = fixtures_dir() / "deepseek_v3";
  const Expected ex = read_expected(dir);
  CpuBackend backend(CpuBackendOptions{.threads = 2});
  LoadOptions lo;
  lo.fidelity = transformers5();
  lo.fidelity->group_mask = GroupMask::zero;
  const Model model = load_model(backend, dir, lo);
  CHECK(model.config().gate_options().group_mask == GroupMask::zero);
  const std::vector<float> logits = host_f32(backend, model.forward(ex.prompt));
  CHECK(rel_error(logits, ex.arrays.at("prefill_logits")) > 1e-3);
}

TEST_CASE("model logits are bit-identical for 1 and 2 threads", "[models]") {
  const fs::path dir = fixtures_dir() / "deepseek_v3";
  const Expected ex = read_expected(dir);
  CpuBackend b1(CpuBackendOptions{.threads = 1}), b2(CpuBackendOptions{.threads = 2});
  LoadOptions lo;
  lo.fidelity = transformers5();
  const Model m1 = load_model(b1, dir, lo), m2 = load_model(b2, dir, lo);
  CHECK(host_f32(b1, m1.forward(ex.prompt)) == host_f32(b2, m2.forward(ex.prompt)));
}

TEST_CASE("a 256-token prompt at once equals its last 8 tokens appended to a cached prefix",
          "[models]") {
  // 256 rows are one 252-row GEMM tile and a 4-row one; the appended chunk is a single tile.
  for (const char* name : {"glm4_moe_qknorm", "deepseek_v3", "qwen2_moe"}) {
    DYNAMIC_SECTION(name) {
      const fs::path dir = fixtures_dir() / name;
      CpuBackend backend(CpuBackendOptions{.threads = 2});
      LoadOptions lo;
      lo.fidelity = transformers5();
      const Model model = load_model(backend, dir, lo);
      std::vector<std::int32_t> seq(256);
      for (std::size_t i = 0; i < seq.size(); ++i)
        seq[i] = static_cast<std::int32_t>((i * 7919 + 13) % model.vocab_size());
      const auto V = static_cast<std::size_t>(model.vocab_size());
      const std::vector<float> full = host_f32(backend, model.forward(seq));
      Session s(model);
      (void)s.prefill(std::span(seq).first(248));
      const std::vector<float> tail =
          host_f32(backend, s.append(std::span(seq).subspan(248), true));
      REQUIRE(tail.size() == 8 * V);
      CHECK(rel_error(tail, slice(full, 248, 8, V)) <= 1e-5);
    }
  }
}

// ------------------------------------------------------------------------------ sessions

TEST_CASE("Session: context limit, truncate, stop tokens, bad ids", "[models]") {
  const fs::path dir = fixtures_dir() / "qwen3_moe";
  const Expected ex = read_expected(dir);
  CpuBackend backend(CpuBackendOptions{.threads = 2});
  const Model model = load_model(backend, dir);
  const auto L = static_cast<std::int64_t>(ex.prompt.size());

  Session small(model, SessionOptions{L + 2});
  GenerateOptions go;
  go.max_new_tokens = 16;
  GenerationStats st;
  // The context holds L + 2 positions: the prefill plus 2 decode steps, so 3 tokens come out.
  const auto out = small.generate(ex.prompt, go, &st);
  CHECK(out == std::vector<std::int32_t>(ex.greedy.begin(), ex.greedy.begin() + 3));
  CHECK(small.size() == L + 2);
  CHECK_ERROR(small.append(std::vector<std::int32_t>{1}), out_of_range, "Session::append",
              "max_context");

  Session s(model);
  go.stop_tokens = {ex.greedy[4]};
  CHECK(s.generate(ex.prompt, go) ==
        std::vector<std::int32_t>(ex.greedy.begin(), ex.greedy.begin() + 5));
  go.stop_tokens.clear();
  int calls = 0;
  go.on_token = [&](std::int32_t) { return ++calls < 2; };
  CHECK(s.generate(ex.prompt, go).size() == 2);
  CHECK(s.reused_tokens() == L - 1);

  s.truncate(3);
  CHECK(s.size() == 3);
  CHECK_ERROR(s.truncate(4), out_of_range, "KvCache::truncate");
  const std::vector<std::int32_t> bad_id{static_cast<std::int32_t>(ex.vocab)};
  const std::string bad_str = std::to_string(ex.vocab);
  CHECK_ERROR(s.append(bad_id), out_of_range, "Session::append", bad_str);
  CHECK(s.size() == 3);  // a failed append leaves the cache as it was
  CHECK_ERROR(s.append(std::vector<std::int32_t>{}), invalid_argument, "Session::append");
  CHECK_ERROR(s.prefill(std::vector<std::int32_t>{}), invalid_argument, "Session::prefill");
  s.reset();
  CHECK(s.size() == 0);
  CHECK_ERROR(model.forward(std::vector<std::int32_t>{}), invalid_argument, "Model::forward");
}

// ------------------------------------------------------------------------------ loader errors

namespace {

/// LoadOptions that widen every float matrix to f32.
LoadOptions f32_weights() {
  LoadOptions o;
  o.weights = WeightStorage::f32;
  return o;
}

/// A scratch copy of a fixture whose tensors and config.json a test edits.
struct ScratchCheckpoint {
  fs::path dir;
  nlohmann::json config;
  std::vector<std::string> names;
  std::vector<std::string> dtypes;
  std::vector<std::vector<std::int64_t>> shapes;
  std::vector<std::vector<std::byte>> data;

  ScratchCheckpoint(const std::string& fixture, const std::string& tag) {
    const fs::path src = fixtures_dir() / fixture;
    dir = fs::temp_directory_path() / ("autoglm_models_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::ifstream cf(src / "config.json");
    config = nlohmann::json::parse(cf);
    const SafeTensorsModel st = SafeTensorsModel::open(src);
    for (const std::string& n : st.names()) {
      const TensorInfo& info = st.at(n);
      names.push_back(n);
      dtypes.push_back(info.dtype_tag);
      shapes.emplace_back(info.extents.begin(), info.extents.end());
      data.emplace_back(info.data, info.data + info.nbytes);
    }
  }
  ~ScratchCheckpoint() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::size_t index(const std::string& n) const {
    const auto it = std::find(names.begin(), names.end(), n);
    REQUIRE(it != names.end());
    return static_cast<std::size_t>(it - names.begin());
  }
  void erase(const std::string& n) {
    const std::size_t i = index(n);
    names.erase(names.begin() + i);
    dtypes.erase(dtypes.begin() + i);
    shapes.erase(shapes.begin() + i);
    data.erase(data.begin() + i);
  }
  /// Rounds every F32 tensor to bf16 (or f16); store16 stores BF16 (F16), else the rounded
  /// values as F32.
  void round_to_bf16(bool store16, DType half = DType::bf16) {
    for (std::size_t i = 0; i < names.size(); ++i) {
      const std::size_t n = data[i].size() / 4;
      std::vector<std::byte> out(store16 ? n * 2 : n * 4);
      for (std::size_t j = 0; j < n; ++j) {
        float f;
        std::memcpy(&f, data[i].data() + 4 * j, 4);
        const std::uint16_t h = half == DType::bf16 ? float_to_bf16(f) : float_to_f16(f);
        if (store16) {
          std::memcpy(out.data() + 2 * j, &h, 2);
        } else {
          const float r = half == DType::bf16 ? bf16_to_float(h) : f16_to_float(h);
          std::memcpy(out.data() + 4 * j, &r, 4);
        }
      }
      data[i] = std::move(out);
      dtypes[i] = store16 ? (half == DType::bf16 ? "BF16" : "F16") : "F32";
    }
  }
  void write() const {
    std::vector<SafeTensorsEntry> e;
    for (std::size_t i = 0; i < names.size(); ++i)
      e.push_back({names[i], dtypes[i], shapes[i], data[i].data(), data[i].size()});
    save_safetensors(dir / "model.safetensors", e);
    std::ofstream(dir / "config.json") << config.dump(1);
  }
};

}  // namespace

TEST_CASE("load_model: missing, misshapen or unsupported tensors name the tensor",
          "[models][loader]") {
  CpuBackend backend(CpuBackendOptions{.threads = 2});
  SECTION("missing tensor") {
    ScratchCheckpoint ck("olmoe", "missing");
    ck.erase("model.layers.1.self_attn.k_norm.weight");
    ck.write();
    CHECK_ERROR(load_model(backend, ck.dir), not_found, "load_model",
                "model.layers.1.self_attn.k_norm.weight", "missing");
  }
  SECTION("wrong shape") {
    ScratchCheckpoint ck("olmoe", "shape");
    const std::size_t i = ck.index("model.layers.0.mlp.gate.weight");
    ck.shapes[i] = {4, 128};
    ck.write();
    CHECK_ERROR(load_model(backend, ck.dir), shape_mismatch, "load_model", "model.safetensors",
                "model.layers.0.mlp.gate.weight", "[4, 128]", "[8, 64]");
  }
  SECTION("unsupported dtype") {
    ScratchCheckpoint ck("olmoe", "dtype");
    ck.dtypes[ck.index("model.norm.weight")] = "I32";
    ck.write();
    CHECK_ERROR(load_model(backend, ck.dir), unsupported, "load_model", "model.norm.weight", "I32");
  }
  SECTION("config contradicts the tensors") {
    ScratchCheckpoint ck("olmoe", "config");
    ck.config["num_experts"] = 4;
    ck.write();
    CHECK_ERROR(load_model(backend, ck.dir), shape_mismatch, "load_model",
                "model.layers.0.mlp.gate.weight", "[8, 64]", "[4, 64]");
  }
  SECTION("more layers than the config") {
    ScratchCheckpoint ck("olmoe", "layers");
    ck.config["num_hidden_layers"] = 1;
    ck.write();
    CHECK_ERROR(load_model(backend, ck.dir), invalid_argument, "load_model", "model.layers.1.",
                "num_hidden_layers=1");
  }
  SECTION("more experts than the config") {
    ScratchCheckpoint ck("qwen3_moe", "experts");
    ck.config["num_experts"] = 7;
    ck.write();
    CHECK_ERROR(load_model(backend, ck.dir), invalid_argument, "load_model",
                "model.layers.0.mlp.experts.7.gate_proj.weight", "num_experts=7");
  }
  SECTION("dense layer where the config expects MoE") {
    ScratchCheckpoint ck("qwen2_moe", "dense");
    ck.config["mlp_only_layers"] = nlohmann::json::array();
    ck.write();
    CHECK_ERROR(load_model(backend, ck.dir), invalid_argument, "load_model", "layer 1",
                "dense MLP");
  }
  SECTION("untied model without lm_head") {
    ScratchCheckpoint ck("olmoe", "head");
    ck.erase("lm_head.weight");
    ck.write();
    CHECK_ERROR(load_model(backend, ck.dir), not_found, "load_model", "lm_head.weight",
                "tie_word_embeddings");
  }
  SECTION("quantised checkpoint") {
    ScratchCheckpoint ck("olmoe", "quant");
    ck.config["quantization_config"] = {
        {"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {128, 128}}};
    ck.write();
    CHECK_THROWS_AS(load_model(backend, ck.dir), Error);
  }
  SECTION("no checkpoint") {
    CHECK_THROWS_AS(load_model(backend, fixtures_dir() / "no_such_fixture"), Error);
  }
}

TEST_CASE("Sessions on several threads share one Model and its backend", "[models][threads]") {
  // A server keeps one Model and gives each request a Session on a thread of its own: the
  // backend's calls may overlap (its buffer pool, packing scratch and task arena are shared),
  // and every session must still get exactly the logits it gets alone.
  const fs::path dir = fixtures_dir() / "qwen3_moe";
  const Expected ex = read_expected(dir);
  CpuBackend backend(CpuBackendOptions{.threads = 2});
  const Model f32 = load_model(backend, dir);
  const Model int8 = quantize_model(f32, QuantConfig{});
  constexpr int kThreads = 4;
  // Thread i's prompt: the fixture prompt rotated by i and repeated to 40 tokens (past the
  // few-rows paths of the projections); then 6 cached decode steps, greedy.
  auto prompt_of = [&](int i) {
    std::vector<std::int32_t> p;
    for (std::size_t j = 0; p.size() < 40; ++j)
      p.push_back(ex.prompt[(j + static_cast<std::size_t>(i)) % ex.prompt.size()]);
    return p;
  };
  auto run = [&](const Model& model, int i) {
    Session s(model);
    std::vector<float> all = host_f32(backend, s.prefill(prompt_of(i), true));
    const auto V = static_cast<std::size_t>(model.vocab_size());
    for (int step = 0; step < 6; ++step) {
      const auto last = all.end() - static_cast<std::ptrdiff_t>(V);
      const auto next = static_cast<std::int32_t>(std::max_element(last, all.end()) - last);
      const std::vector<float> row = host_f32(backend, s.append(std::span(&next, 1)));
      all.insert(all.end(), row.begin(), row.end());
    }
    return all;
  };
  for (const Model* model : {&f32, &int8}) {
    std::vector<std::vector<float>> alone(kThreads), together(kThreads);
    for (int i = 0; i < kThreads; ++i) alone[i] = run(*model, i);
    std::vector<std::string> errors(kThreads);
    std::vector<std::thread> pool;
    for (int i = 0; i < kThreads; ++i)
      pool.emplace_back([&, i] {
        try {  // Catch's assertions are not thread-safe: results are checked after the join
          for (int rep = 0; rep < 3; ++rep) together[i] = run(*model, i);
        } catch (const std::exception& e) {
          errors[i] = e.what();
        }
      });
    for (std::thread& t : pool) t.join();
    for (int i = 0; i < kThreads; ++i) {
      CAPTURE(model == &f32 ? "f32" : "int8", i);
      CHECK(errors[i].empty());
      CHECK(together[i] == alone[i]);
    }
  }
}

TEST_CASE("load_model: progress reports every tensor and can cancel", "[models][loader]") {
  CpuBackend backend(CpuBackendOptions{.threads = 2});
  const fs::path dir = fixtures_dir() / "mixtral_hub_sharded";
  std::vector<LoadProgress> seen;
  LoadOptions lo;
  lo.progress = [&](const LoadProgress& p) {
    seen.push_back(p);
    return true;
  };
  const Model m = load_model(backend, dir, lo);
  REQUIRE(seen.size() >= 2);
  CHECK(seen.front().tensors_done == 0);
  CHECK(seen.back().tensors_done == seen.back().tensors_total);
  CHECK(seen.back().bytes_done == seen.back().bytes_total);
  std::uint64_t total = 0;
  const SafeTensorsModel st = SafeTensorsModel::open(dir);
  for (const std::string& n : st.names()) total += st.at(n).nbytes;
  CHECK(seen.back().bytes_total == total);  // every tensor of the checkpoint is used once
  for (std::size_t i = 1; i < seen.size(); ++i) CHECK(seen[i].bytes_done > seen[i - 1].bytes_done);

  int calls = 0;
  lo.progress = [&](const LoadProgress&) { return ++calls < 5; };
  CHECK_ERROR(load_model(backend, dir, lo), cancelled, "load_model", "cancelled", "4 of");
}

TEST_CASE("load_model: BF16 / F16 checkpoints stay 16-bit and compute like their F32 values",
          "[models][loader][half]") {
  CpuBackend backend(CpuBackendOptions{.threads = 2});
  // Per-expert and fused experts, tied and untied heads, GQA and MLA, dense first layers.
  for (const char* fixture :
       {"glm4_moe_qknorm", "glm4_moe_hub_tied", "mixtral_fused_tied", "qwen2_moe", "deepseek_v3"}) {
    for (DType half : {DType::bf16, DType::f16}) {
      DYNAMIC_SECTION(fixture << " " << dtype_name(half)) {
        const Expected ex = read_expected(fixtures_dir() / fixture);
        ScratchCheckpoint a(fixture, "half16"), b(fixture, "half32");
        a.round_to_bf16(true, half);
        b.round_to_bf16(false, half);
        a.write();
        b.write();
        const Model m16 = load_model(backend, a.dir);
        const Model m32 = load_model(backend, b.dir);
        const Model wide = load_model(backend, a.dir, f32_weights());
        // Kept 16-bit where the kernels read it (AVX-512 builds), f32 otherwise.
        const DType kept = backend.supports_weight_dtype(half) ? half : DType::f32;
        CHECK(m16.head().head().tensor().dtype() == kept);
        CHECK(m16.head().head().tensor().nbytes() * dtype_size(DType::f32) ==
              m32.head().head().tensor().nbytes() * dtype_size(kept));
        CHECK(wide.head().head().tensor().dtype() == DType::f32);
        CHECK(m16.embeddings().table().tensor().dtype() == kept);
        CHECK(wide.embeddings().table().tensor().dtype() == DType::f32);
        // Every float matrix of every layer (experts, router, shared / dense MLPs, attention).
        auto dtypes = [](const Model& m) {
          std::set<DType> seen;
          auto add = [&](const Weight& w) {
            if (w.defined()) seen.insert(w.tensor().dtype());
          };
          for (const DecoderLayer& l : m.layers()) {
            if (const auto* moe = std::get_if<MoEBlock>(&l.ffn())) {
              CHECK(moe->gate().weight().tensor().dtype() == DType::f32);  // the router: f32
              add(moe->experts().gate_up());
              add(moe->experts().down());
              if (const auto& sh = moe->aggregator().shared()) {
                add(sh->mlp().gate_up());
                add(sh->mlp().down());
              }
            } else {
              const auto& mlp = std::get<DenseMlp>(l.ffn()).mlp();
              add(mlp.gate_up());
              add(mlp.down());
            }
            std::visit(
                [&](const auto& a) {
                  const auto& w = a.weights();
                  if constexpr (requires { w.q_a_proj; }) {
                    for (const Weight* x : {&w.q_proj, &w.q_a_proj, &w.q_b_proj, &w.kv_a_proj,
                                            &w.kv_b_proj, &w.o_proj})
                      add(*x);
                  } else {
                    for (const Weight* x : {&w.q_proj, &w.k_proj, &w.v_proj, &w.o_proj}) add(*x);
                  }
                },
                l.attention());
          }
          return seen;
        };
        CHECK(dtypes(m16) == std::set<DType>{kept});
        CHECK(dtypes(wide) == std::set<DType>{DType::f32});
        // Exact widening: the logits are those of the rounded f32 checkpoint, bit for bit.
        const std::vector<float> l16 = host_f32(backend, m16.forward(ex.prompt));
        CHECK(std::all_of(l16.begin(), l16.end(), [](float v) { return std::isfinite(v); }));
        check_bitwise(l16, host_f32(backend, m32.forward(ex.prompt)), "16-bit vs f32 file");
        check_bitwise(l16, host_f32(backend, wide.forward(ex.prompt)), "16-bit vs widened");
        // Quantizing a 16-bit model gives the codes of its f32 values.
        const QuantConfig qc{};
        check_bitwise(host_f32(backend, quantize_model(m16, qc).forward(ex.prompt)),
                      host_f32(backend, quantize_model(m32, qc).forward(ex.prompt)),
                      "int8 from 16-bit vs from f32");
      }
    }
  }
}

TEST_CASE("load_model: mixed-dtype checkpoints keep 16-bit only where a matrix is all 16-bit",
          "[models][loader][half]") {
  CpuBackend backend(CpuBackendOptions{.threads = 2});
  if (!backend.supports_weight_dtype(DType::bf16) || !backend.supports_weight_dtype(DType::f16)) {
    WARN("this build's CPU kernels read no 16-bit weights: nothing to check");
    return;
  }
  const Expected ex = read_expected(fixtures_dir() / "qwen3_moe");
  ScratchCheckpoint a("qwen3_moe", "mixed");
  a.round_to_bf16(true);
  // One expert's up_proj of layer 1 as F16 (bf16 values fit f16 exactly in this range), and
  // the LM head back in F32.
  auto retag = [&](const std::string& name, DType to) {
    const std::size_t i = a.index(name);
    const std::size_t n = a.data[i].size() / 2;
    std::vector<std::byte> out(n * dtype_size(to));
    for (std::size_t j = 0; j < n; ++j) {
      std::uint16_t h;
      std::memcpy(&h, a.data[i].data() + 2 * j, 2);
      const float f = bf16_to_float(h);
      if (to == DType::f32) {
        std::memcpy(out.data() + 4 * j, &f, 4);
      } else {
        const std::uint16_t g = float_to_f16(f);
        REQUIRE(f16_to_float(g) == f);
        std::memcpy(out.data() + 2 * j, &g, 2);
      }
    }
    a.data[i] = std::move(out);
    a.dtypes[i] = to == DType::f32 ? "F32" : "F16";
  };
  retag("model.layers.1.mlp.experts.3.up_proj.weight", DType::f16);
  retag("lm_head.weight", DType::f32);
  a.write();
  const Model m = load_model(backend, a.dir);
  const Model wide = load_model(backend, a.dir, f32_weights());
  auto bank = [&](std::size_t layer) -> const SwiGluExperts& {
    return std::get<MoEBlock>(m.layers()[layer].ffn()).experts();
  };
  CHECK(bank(0).gate_up().tensor().dtype() == DType::bf16);
  CHECK(bank(0).down().tensor().dtype() == DType::bf16);
  CHECK(bank(1).gate_up().tensor().dtype() == DType::f32);  // bf16 and f16 parts: widened
  CHECK(bank(1).down().tensor().dtype() == DType::bf16);
  CHECK(m.head().head().tensor().dtype() == DType::f32);
  CHECK(m.embeddings().table().tensor().dtype() == DType::bf16);
  check_bitwise(host_f32(backend, m.forward(ex.prompt)), host_f32(backend, wide.forward(ex.prompt)),
                "mixed vs widened");
}

TEST_CASE(
    "load_model + bf16_compute: bf16-compute logits near the exact ones; cached decoding "
    "equals recomputation",
    "[models][half][amx]") {
  CpuBackendOptions o;
  o.threads = 2;
  o.bf16_compute = true;
  CpuBackend amx(o);
  if (!amx.bf16_compute()) {
    WARN("no AMX-BF16 or AVX512_BF16 here: bf16_compute is ignored, nothing to check");
    return;
  }
  CpuBackend exact(CpuBackendOptions{.threads = 2});
  for (const char* fixture : {"qwen3_moe", "glm4_moe_hub_tied", "deepseek_v3"}) {
    DYNAMIC_SECTION(fixture) {
      const Expected ex = read_expected(fixtures_dir() / fixture);
      ScratchCheckpoint a(fixture, "amx");
      a.round_to_bf16(true);
      a.write();
      const Model ma = load_model(amx, a.dir), me = load_model(exact, a.dir);
      const auto V = static_cast<std::size_t>(ex.vocab), L = ex.prompt.size();
      // Activations rounded to bf16 before every product: logits move by about that rounding.
      const std::vector<float> la = host_f32(amx, ma.forward(ex.prompt));
      const double e = rel_error(la, host_f32(exact, me.forward(ex.prompt)));
      INFO("relative logit difference, bf16_compute vs exact: " << e);
      CHECK(e > 0.0);  // the bf16 path did run
      CHECK(e <= 3e-2);
      // Each product row depends on its own activations only: a cached decode gives the bits
      // of a full recomputation.
      Session s(ma);
      const std::vector<float> prefill = host_f32(amx, s.prefill(ex.prompt, true));
      std::vector<float> decode;
      for (std::int32_t t : ex.decode_inputs) {
        const std::vector<float> row = host_f32(amx, s.append(std::span(&t, 1)));
        decode.insert(decode.end(), row.begin(), row.end());
      }
      std::vector<std::int32_t> seq = ex.prompt;
      seq.insert(seq.end(), ex.decode_inputs.begin(), ex.decode_inputs.end());
      const std::vector<float> full = host_f32(amx, ma.forward(seq));
      CHECK(rel_error(decode, slice(full, L, ex.decode_inputs.size(), V)) <= 1e-5);
      CHECK(rel_error(slice(full, 0, L, V), prefill) <= 1e-5);
    }
  }
}

// ------------------------------------------------------------------------------ primitives

namespace {

/// Naive RoPE on host data [T, H, D] (double), as transformers writes it.
std::vector<float> naive_rope(std::vector<float> x, std::int64_t T, std::int64_t H, std::int64_t D,
                              const std::vector<std::int32_t>& pos, const std::vector<float>& inv,
                              const RopeParams& p) {
  const std::int64_t r = p.rotary_dim, half = r / 2;
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      float* v = x.data() + (t * H + h) * D + p.offset;
      std::vector<double> src(v, v + r), dst(static_cast<std::size_t>(r));
      for (std::int64_t i = 0; i < half; ++i) {
        const double ang = static_cast<double>(pos[t]) * inv[i];
        const double c = std::cos(ang) * p.attention_factor, s = std::sin(ang) * p.attention_factor;
        const double a = p.interleaved ? src[2 * i] : src[i];
        const double b = p.interleaved ? src[2 * i + 1] : src[half + i];
        dst[i] = a * c - b * s;
        dst[half + i] = b * c + a * s;
      }
      for (std::int64_t i = 0; i < r; ++i) v[i] = static_cast<float>(dst[i]);
    }
  return x;
}

}  // namespace

TEST_CASE("CpuBackend::rope matches the transformers layouts", "[models][primitives]") {
  CpuBackend b(CpuBackendOptions{.threads = 2});
  const std::int64_t T = 3, H = 2, D = 12;
  const std::vector<std::int32_t> pos{0, 5, 17};
  const std::vector<float> xh = random_floats(T * H * D, 1);
  const std::vector<float> inv{1.0f, 0.3f, 0.05f};
  const Tensor positions = tensor_i32(b, Shape{T}, pos);
  const Tensor inv_freq = tensor_f32(b, Shape{3}, inv);
  for (bool interleaved : {false, true}) {
    const RopeParams p{4, 6, interleaved, 1.25f};
    Tensor x = tensor_f32(b, Shape{T, H, D}, xh);
    b.rope(x, positions, inv_freq, p);
    check_close(host_f32(b, x), naive_rope(xh, T, H, D, pos, inv, p), 1e-5, 1e-5,
                interleaved ? "interleaved" : "rotate_half");
  }
  // rotary_dim 0: everything after the offset.
  Tensor x = tensor_f32(b, Shape{T, H, D}, xh);
  const Tensor inv4 = tensor_f32(b, Shape{4}, {1.0f, 0.5f, 0.25f, 0.125f});
  b.rope(x, positions, inv4, RopeParams{4, 0, false, 1.0f});
  check_close(
      host_f32(b, x),
      naive_rope(xh, T, H, D, pos, {1.0f, 0.5f, 0.25f, 0.125f}, RopeParams{4, 8, false, 1.0f}),
      1e-5, 1e-5, "rotary_dim 0");
  CHECK_ERROR(b.rope(x, positions, inv_freq, RopeParams{8, 6, false, 1.0f}), invalid_argument,
              "CpuBackend::rope", "rotary_dim=6");
  CHECK_ERROR(b.rope(x, positions, inv_freq, RopeParams{0, 5, false, 1.0f}), invalid_argument,
              "CpuBackend::rope");
  CHECK_ERROR(b.rope(x, positions, inv_freq, RopeParams{0, 8, false, 1.0f}), shape_mismatch,
              "CpuBackend::rope", "inv_freq");
  CHECK_ERROR(b.rope(x, tensor_i32(b, Shape{2}, {0, 1}), inv_freq, RopeParams{0, 6, false, 1.0f}),
              shape_mismatch, "CpuBackend::rope", "positions");
  CHECK_ERROR(
      b.rope(x, tensor_i32(b, Shape{3}, {0, -1, 2}), inv_freq, RopeParams{0, 6, false, 1.0f}),
      out_of_range, "CpuBackend::rope", "-1");
}

TEST_CASE("CpuBackend::attention: GQA, causal, window, non-causal", "[models][primitives]") {
  CpuBackend b(CpuBackendOptions{.threads = 2});
  const std::int64_t T = 4, Hq = 4, Hkv = 2, D = 8, S = 6, Dv = 5;
  const std::vector<float> qh = random_floats(T * Hq * D, 2), kh = random_floats(S * Hkv * D, 3),
                           vh = random_floats(S * Hkv * Dv, 4);
  const std::vector<std::int32_t> pos{2, 3, 4, 5};
  const Tensor q = tensor_f32(b, Shape{T, Hq, D}, qh), k = tensor_f32(b, Shape{S, Hkv, D}, kh),
               v = tensor_f32(b, Shape{S, Hkv, Dv}, vh);
  const Tensor positions = tensor_i32(b, Shape{T}, pos);
  for (const AttentionParams p : {AttentionParams{0.4f, true, 0}, AttentionParams{0.4f, true, 2},
                                  AttentionParams{0.7f, false, 0}}) {
    std::vector<float> want(T * Hq * Dv, 0.0f);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < Hq; ++h) {
        const std::int64_t kvh = h / (Hq / Hkv);
        std::vector<double> sc;
        std::vector<std::int64_t> keys;
        for (std::int64_t s = 0; s < S; ++s) {
          if (p.causal && s > pos[t]) continue;
          if (p.window > 0 && pos[t] - s >= p.window) continue;
          double dot = 0.0;
          for (std::int64_t i = 0; i < D; ++i)
            dot += static_cast<double>(qh[(t * Hq + h) * D + i]) * kh[(s * Hkv + kvh) * D + i];
          sc.push_back(dot * p.scale);
          keys.push_back(s);
        }
        const double mx = *std::max_element(sc.begin(), sc.end());
        double sum = 0.0;
        for (double& x : sc) sum += (x = std::exp(x - mx));
        for (std::size_t j = 0; j < keys.size(); ++j)
          for (std::int64_t i = 0; i < Dv; ++i)
            want[(t * Hq + h) * Dv + i] +=
                static_cast<float>(sc[j] / sum * vh[(keys[j] * Hkv + kvh) * Dv + i]);
      }
    Tensor out(b, DType::f32, Shape{T, Hq, Dv});
    b.attention(q, k, v, positions, p, out);
    check_close(host_f32(b, out), want, 1e-5, 1e-5, "attention");
  }
  Tensor out(b, DType::f32, Shape{T, Hq, Dv});
  // A query that sees no key (position past the window of every key... here: window 1 and
  // position 9 beyond the 6 keys) gets zeros.
  b.attention(q, k, v, tensor_i32(b, Shape{T}, {9, 9, 9, 9}), AttentionParams{1.0f, true, 1}, out);
  const std::vector<float> zeros = host_f32(b, out);
  CHECK(std::all_of(zeros.begin(), zeros.end(), [](float x) { return x == 0.0f; }));
  CHECK_ERROR(
      b.attention(q, tensor_f32(b, Shape{S, 3, D}, random_floats(S * 3 * D, 5)),
                  tensor_f32(b, Shape{S, 3, Dv}, random_floats(S * 3 * Dv, 6)), positions, {}, out),
      shape_mismatch, "CpuBackend::attention", "multiple");
  CHECK_ERROR(b.attention(q, k, v, tensor_i32(b, Shape{2}, {0, 1}), {}, out), shape_mismatch,
              "CpuBackend::attention", "positions");
  CHECK_ERROR(b.attention(q, k, k, positions, {}, out), shape_mismatch, "CpuBackend::attention",
              "out");
}

TEST_CASE("CpuBackend::copy_columns, add_bias, clamp", "[models][primitives]") {
  CpuBackend b(CpuBackendOptions{.threads = 2});
  const Tensor src = tensor_f32(b, Shape{2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor dst = tensor_f32(b, Shape{4, 4}, std::vector<float>(16, 0.0f));
  b.copy_columns(src, 1, dst, 2, 2);  // each source row twice
  CHECK(host_f32(b, dst) == std::vector<float>{0, 0, 2, 3, 0, 0, 2, 3, 0, 0, 5, 6, 0, 0, 5, 6});
  CHECK_ERROR(b.copy_columns(src, 2, dst, 0, 2), out_of_range, "CpuBackend::copy_columns");
  CHECK_ERROR(b.copy_columns(src, 0, tensor_f32(b, Shape{3, 4}, std::vector<float>(12)), 0, 1),
              shape_mismatch, "CpuBackend::copy_columns", "multiple");

  Tensor x = tensor_f32(b, Shape{2, 3}, {1, 2, 3, 4, 5, 6});
  b.add_bias(x, tensor_f32(b, Shape{3}, {10, 20, 30}), x);
  CHECK(host_f32(b, x) == std::vector<float>{11, 22, 33, 14, 25, 36});
  CHECK_ERROR(b.add_bias(x, tensor_f32(b, Shape{2}, {1, 2}), x), shape_mismatch,
              "CpuBackend::add_bias", "bias");
  b.clamp(x, 12.0f, 30.0f);
  CHECK(host_f32(b, x) == std::vector<float>{12, 22, 30, 14, 25, 30});
  CHECK_ERROR(b.clamp(x, 1.0f, 0.0f), invalid_argument, "CpuBackend::clamp");
}

TEST_CASE("rope_inv_freq: default, partial, linear, yarn, llama3", "[models]") {
  ModelConfig c;
  c.family = ModelFamily::qwen3_moe;
  c.head_dim = 8;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 256;
  std::vector<float> f = rope_inv_freq(c);
  REQUIRE(f.size() == 4);
  for (int i = 0; i < 4; ++i) CHECK(f[i] == Approx(std::pow(10000.0, -2.0 * i / 8)).epsilon(1e-6));
  c.partial_rotary_factor = 0.5;
  CHECK(rope_inv_freq(c).size() == 2);
  c.partial_rotary_factor = 1.0;
  c.rope_scaling.type = RopeType::linear;
  c.rope_scaling.factor = 4.0;
  f = rope_inv_freq(c);
  CHECK(f[1] == Approx(std::pow(10000.0, -2.0 / 8) / 4).epsilon(1e-6));
  // yarn: high frequencies extrapolate (unchanged), low ones interpolate (/ factor).
  c.rope_scaling.type = RopeType::yarn;
  c.rope_scaling.original_max_position_embeddings = 64;
  c.head_dim = 64;
  f = rope_inv_freq(c);
  CHECK(f.front() == Approx(1.0).epsilon(1e-6));
  CHECK(f.back() == Approx(std::pow(10000.0, -62.0 / 64) / 4).epsilon(1e-6));
  c.rope_scaling.type = RopeType::llama3;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  f = rope_inv_freq(c);
  CHECK(f.front() == Approx(1.0).epsilon(1e-6));
  CHECK(f.back() == Approx(std::pow(10000.0, -62.0 / 64) / 4).epsilon(1e-6));
  c.rope_scaling.type = RopeType::dynamic;
  CHECK_ERROR(rope_inv_freq(c), unsupported, "rope_inv_freq", "dynamic");
  c.rope_scaling.type = RopeType::none;
  c.head_dim = 3;
  CHECK_ERROR(rope_inv_freq(c), invalid_argument, "rope_inv_freq");
}
