// SPDX-License-Identifier: Apache-2.0
// quantize_checkpoint: a Hugging Face checkpoint directory -> an int8 one that load_model reads
// without re-quantizing. Shard by shard, tensor by tensor, so memory stays near one shard's
// int8 output.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autoglm/io/model_config.hpp"
#include "autoglm/io/safetensors.hpp"
#include "autoglm/quant/checkpoint.hpp"

namespace autoglm {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kFn = "quantize_checkpoint";

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}
bool contains(std::string_view s, std::string_view part) {
  return s.find(part) != std::string_view::npos;
}

}  // namespace

WeightRole weight_role(std::string_view name) {
  if (name == "lm_head.weight") return WeightRole::lm_head;
  if (name == "model.embed_tokens.weight") return WeightRole::embeddings;
  if (contains(name, "shared_expert_gate.")) return WeightRole::other;  // a router-like vector
  if (ends_with(name, "mlp.gate.weight") || ends_with(name, "block_sparse_moe.gate.weight"))
    return WeightRole::router;
  if (contains(name, ".experts.") || contains(name, ".shared_expert.") ||
      contains(name, ".shared_experts.")) {
    if (ends_with(name, ".weight") || ends_with(name, "gate_up_proj") ||
        ends_with(name, "down_proj"))
      return WeightRole::experts;
    return WeightRole::other;  // biases of fused layouts
  }
  if (contains(name, ".self_attn.") && ends_with(name, "proj.weight")) return WeightRole::attention;
  if (contains(name, "kv_a_proj_with_mqa.weight")) return WeightRole::attention;
  if (contains(name, ".mlp.") &&
      (ends_with(name, "gate_proj.weight") || ends_with(name, "up_proj.weight") ||
       ends_with(name, "down_proj.weight")))
    return WeightRole::dense_mlp;
  return WeightRole::other;
}

bool quantizes(const QuantConfig& config, WeightRole role) {
  switch (role) {
    case WeightRole::experts:
      return config.experts;
    case WeightRole::attention:
      return config.attention;
    case WeightRole::dense_mlp:
      return config.dense_mlp;
    case WeightRole::lm_head:
      return config.lm_head;
    case WeightRole::embeddings:
      return config.embeddings;
    case WeightRole::router:
      return config.router;
    case WeightRole::other:
      return false;
  }
  return false;
}

std::string scale_name(std::string_view weight) {
  return std::string(weight) + "_scale";
}

QuantizeReport quantize_checkpoint(const fs::path& src, const fs::path& dst,
                                   const QuantConfig& config) {
  const ModelConfig mc = load_model_config(src);  // validates the family and the sizes
  AUTOGLM_CHECK(mc.quantization.method.empty(), unsupported, kFn,
                "{}: the checkpoint is already quantized (quant_method '{}')", mc.source,
                mc.quantization.method);
  AUTOGLM_CHECK(config.spec.group == 0 || config.spec.group == 32 || config.spec.group == 64 ||
                    config.spec.group == 128,
                invalid_argument, kFn, "group {} must be 0 (per channel), 32, 64 or 128",
                config.spec.group);
  std::error_code ec;
  AUTOGLM_CHECK(fs::weakly_canonical(src, ec) != fs::weakly_canonical(dst, ec), invalid_argument,
                kFn, "source and destination are the same directory {}", src.string());
  const SafeTensorsModel st = SafeTensorsModel::open(src);
  fs::create_directories(dst, ec);
  AUTOGLM_CHECK(!ec, io, kFn, "cannot create {}: {}", dst.string(), ec.message());

  QuantizeReport report;
  std::map<std::string, std::string> metadata{
      {"format", "pt"},
      {"autoglm.quant", config.spec.scheme_name()},
      {"autoglm.activations", std::string(config.spec.mode_name())}};
  const auto& shards = st.shards();
  nlohmann::json weight_map = nlohmann::json::object();
  for (std::size_t si = 0; si < shards.size(); ++si) {
    const SafeTensorsFile& shard = shards[si];
    report.bytes_in += fs::file_size(shard.source(), ec);
    const std::string out_name =
        shards.size() == 1
            ? std::string("model.safetensors")
            : fmt::format("model-{:05d}-of-{:05d}.safetensors", si + 1, shards.size());
    // The int8 codes and scales of this shard, alive until it is written.
    std::vector<std::vector<std::int8_t>> codes;
    std::vector<std::vector<float>> scales;
    std::vector<HostTensor> kept;
    std::vector<SafeTensorsEntry> entries;
    std::vector<std::string> names = shard.names();
    codes.reserve(names.size());
    scales.reserve(names.size());
    for (const std::string& name : names) {
      const TensorInfo& info = shard.at(name);
      const WeightRole role = weight_role(name);
      const bool rank_ok = info.shape && (info.shape->rank() == 2 || info.shape->rank() == 3);
      const std::int64_t k = rank_ok ? (*info.shape)[info.shape->rank() - 1] : 0;
      const bool quantize_it =
          quantizes(config, role) && rank_ok && info.dtype &&
          (*info.dtype == DType::f32 || *info.dtype == DType::f16 || *info.dtype == DType::bf16) &&
          k > 0 && k % config.spec.group_of(k) == 0;
      if (!quantize_it) {
        HostTensor h = shard.host_view(name);
        SafeTensorsEntry e;
        e.name = name;
        e.dtype = info.dtype_tag;
        for (std::uint64_t x : info.extents) e.shape.push_back(static_cast<std::int64_t>(x));
        e.data = h.view.data;
        e.nbytes = info.nbytes;
        entries.push_back(std::move(e));
        kept.push_back(std::move(h));
        weight_map[name] = out_name;
        ++report.kept;
        continue;
      }
      const Shape& s = *info.shape;
      const std::int64_t n = s[s.rank() - 2], mats = s.rank() == 3 ? s[0] : 1;
      const std::int64_t group = config.spec.group_of(k), groups = k / group;
      std::vector<std::int8_t>& q = codes.emplace_back(static_cast<std::size_t>(mats * n * k));
      std::vector<float>& sc = scales.emplace_back(static_cast<std::size_t>(mats * n * groups));
      const HostTensor h = shard.host_view(name);
      std::vector<float> f32(static_cast<std::size_t>(n * k));
      for (std::int64_t e = 0; e < mats; ++e) {
        const std::size_t off = static_cast<std::size_t>(e * n * k);
        const float* src_rows = nullptr;
        if (*info.dtype == DType::f32) {
          src_rows = h.view.as<const float>() + off;
        } else {
          const auto* bits = h.view.as<const std::uint16_t>() + off;
          for (std::size_t i = 0; i < f32.size(); ++i)
            f32[i] = *info.dtype == DType::f16 ? f16_to_float(bits[i]) : bf16_to_float(bits[i]);
          src_rows = f32.data();
        }
        const std::int64_t bad = detail::quantize_rows(src_rows, n, k, group, q.data() + off,
                                                       sc.data() + e * n * groups);
        if (bad >= 0)
          detail::fail(ErrorCode::numeric, kFn, "{}: tensor '{}' has a non-finite weight {}",
                       shard.source(), name, src_rows[bad]);
      }
      shard.release(name);
      std::vector<std::int64_t> shape, sshape;
      for (int i = 0; i < s.rank(); ++i) shape.push_back(s[i]);
      sshape = shape;
      sshape.back() = groups;
      entries.push_back(SafeTensorsEntry{name, "I8", shape, q.data(), q.size()});
      entries.push_back(
          SafeTensorsEntry{scale_name(name), "F32", sshape, sc.data(), sc.size() * sizeof(float)});
      weight_map[name] = out_name;
      weight_map[scale_name(name)] = out_name;
      ++report.quantized;
    }
    save_safetensors(dst / out_name, entries, metadata);
    report.bytes_out += fs::file_size(dst / out_name, ec);
  }
  if (shards.size() > 1) {
    nlohmann::json index = {{"metadata", {{"total_size", report.bytes_out}}},
                            {"weight_map", weight_map}};
    std::ofstream f(dst / "model.safetensors.index.json");
    f << index.dump(2) << "\n";
    AUTOGLM_CHECK(f.good(), io, kFn, "cannot write {}",
                  (dst / "model.safetensors.index.json").string());
  }
  // config.json with the scheme, so load_model knows the int8 tensors are meant.
  std::ifstream cf(src / "config.json");
  nlohmann::json cfg = nlohmann::json::parse(cf, nullptr, /*allow_exceptions=*/false);
  AUTOGLM_CHECK(!cfg.is_discarded(), io, kFn, "cannot re-read {}", (src / "config.json").string());
  cfg["quantization_config"] = {{"quant_method", kAutoglmQuantMethod},
                                {"scheme", config.spec.scheme_name()},
                                {"activations", config.spec.mode_name()},
                                {"group_size", config.spec.group}};
  std::ofstream out(dst / "config.json");
  out << cfg.dump(2) << "\n";
  AUTOGLM_CHECK(out.good(), io, kFn, "cannot write {}", (dst / "config.json").string());
  for (const char* extra : {"generation_config.json", "tokenizer.json", "tokenizer_config.json"})
    if (fs::exists(src / extra))
      fs::copy_file(src / extra, dst / extra, fs::copy_options::overwrite_existing, ec);
  return report;
}

}  // namespace autoglm
