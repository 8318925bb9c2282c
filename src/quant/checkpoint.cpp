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

#include "autoglm/models/model.hpp"
#include "models/weight_sources.hpp"

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

std::string col_scale_name(std::string_view weight) {
  return std::string(weight) + "_colscale";
}

namespace {

// Matrix e of a 2-D or 3-D float tensor as f32 rows: in place for F32, else converted into buf.
const float* matrix_f32(const HostTensor& h, DType dtype, std::int64_t e, std::int64_t n,
                        std::int64_t k, std::vector<float>& buf) {
  const std::size_t off = static_cast<std::size_t>(e * n * k);
  if (dtype == DType::f32) return h.view.as<const float>() + off;
  buf.resize(static_cast<std::size_t>(n * k));
  const auto* bits = h.view.as<const std::uint16_t>() + off;
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = half_to_float(bits[i], dtype);
  return buf.data();
}

// The partner of a 2-D projection that loaders fuse with it into one matrix (gate_proj with
// up_proj; Mixtral's w1 with w3), or "".
std::string fused_partner(const SafeTensorsModel& st, const std::string& name) {
  constexpr std::pair<std::string_view, std::string_view> kPairs[] = {
      {"gate_proj.weight", "up_proj.weight"}, {".w1.weight", ".w3.weight"}};
  std::string partner;
  for (const auto& [a, b] : kPairs) {
    if (ends_with(name, a))
      partner = name.substr(0, name.size() - a.size()) + std::string(b);
    else if (ends_with(name, b))
      partner = name.substr(0, name.size() - b.size()) + std::string(a);
  }
  const TensorInfo* p = partner.empty() ? nullptr : st.find(partner);
  return p && p->shape && p->shape->rank() == 2 ? partner : std::string();
}

/// The key of a fused pair: the name of its first member.
std::string pair_key(const std::string& name, const std::string& partner) {
  return ends_with(name, "up_proj.weight") || ends_with(name, ".w3.weight") ? partner : name;
}

}  // namespace

namespace {

/// Checks that the model weight `src` points at can supply checkpoint tensor `name` (shape s)
/// in `spec`: int8 in that scheme, and the tensor's rows fit.
void check_model_rows(std::string_view fn, const detail::WeightRows& src, const std::string& name,
                      const Shape& s, const QuantSpec& spec) {
  const Weight& w = *src.weight;
  AUTOGLM_CHECK(w.is_quantized(), invalid_argument, fn,
                "tensor '{}' is f32 in the model, but the config quantizes it", name);
  const QuantizedTensor& qt = w.quantized();
  AUTOGLM_CHECK(qt.spec().same_format(spec), invalid_argument, fn,
                "tensor '{}' is {} {} in the model, the config says {} {}", name,
                qt.spec().scheme_name(), qt.spec().mode_name(), spec.scheme_name(),
                spec.mode_name());
  const Shape& ws = qt.shape();
  const std::int64_t k = s[s.rank() - 1], n = s[s.rank() - 2];
  AUTOGLM_CHECK(src.matrix < 0 ? ws == s
                               : (ws.rank() == 3 && s.rank() == 2 && src.matrix < ws[0] &&
                                  ws[2] == k && n == src.rows && src.row0 + n <= ws[1]),
                shape_mismatch, fn, "tensor '{}' {} does not fit the model's weight {}", name,
                s.str(), ws.str());
}

/// Host copies of the model weights save_quantized reads rows from. Per-expert tensors come
/// bank by bank in name order (gate, up and down of each expert), so a layer's few banks stay.
class ModelRows {
 public:
  struct Host {
    std::vector<std::int8_t> data;
    std::vector<float> scales, col_scales;
  };
  const Host& of(const Weight& w) {
    if (auto it = cache_.find(&w); it != cache_.end()) return it->second;
    if (cache_.size() >= 4) cache_.clear();
    const QuantizedTensor& qt = w.quantized();
    Backend& b = *qt.backend();
    Host& h = cache_[&w];
    const Shape& ws = qt.shape();
    h.data.resize(static_cast<std::size_t>(ws.numel()));
    h.scales.resize(static_cast<std::size_t>(ws.numel() / ws[ws.rank() - 1] * qt.groups()));
    b.quantized_to_host(qt, h.data.data(), h.scales.data());
    if (qt.has_col_scales()) {
      h.col_scales.resize(static_cast<std::size_t>(qt.col_scales().numel()));
      b.copy_to_host(h.col_scales.data(), qt.col_scales());
    }
    return h;
  }

 private:
  std::map<const Weight*, Host> cache_;
};

// q: [mats * n * k], sc: [mats * n * groups], cs: [mats * k] (filled when equalised).
/// The int8 rows of checkpoint tensor `name` (shape s, checked by check_model_rows) from the
/// model weight `src` points at. Returns whether the weight has column scales.
bool rows_from_model(const detail::WeightRows& src, const Shape& s, ModelRows& cache,
                     std::vector<std::int8_t>& q, std::vector<float>& sc, std::vector<float>& cs) {
  const QuantizedTensor& qt = src.weight->quantized();
  const ModelRows::Host& h = cache.of(*src.weight);
  const std::int64_t k = s[s.rank() - 1], n = s[s.rank() - 2], mats = s.rank() == 3 ? s[0] : 1;
  const std::int64_t wn = qt.shape()[qt.shape().rank() - 2], groups = qt.groups();
  const bool whole = src.matrix < 0;
  const std::int64_t m = whole ? 0 : src.matrix;
  const std::int64_t first = whole ? 0 : m * wn + src.row0, rows = mats * n;
  std::copy_n(h.data.begin() + first * k, rows * k, q.begin());
  std::copy_n(h.scales.begin() + first * groups, rows * groups, sc.begin());
  if (h.col_scales.empty()) return false;
  cs.assign(h.col_scales.begin() + m * k, h.col_scales.begin() + m * k + mats * k);
  return true;
}

/// Whether the writer stores tensor `name` as int8: a float matrix (or stack) of a part the
/// config selects whose K the group divides.
bool converts(const QuantConfig& config, const std::string& name, const TensorInfo& info) {
  const bool rank_ok = info.shape && (info.shape->rank() == 2 || info.shape->rank() == 3);
  const std::int64_t k = rank_ok ? (*info.shape)[info.shape->rank() - 1] : 0;
  return quantizes(config, weight_role(name)) && rank_ok && info.dtype &&
         is_float_dtype(*info.dtype) && k > 0 && k % config.spec.group_of(k) == 0;
}

/// save_quantized's checks, before anything is written: every decoder-layer tensor the config
/// converts is int8 in `spec` in the model, no other one is, and the head and embedding table
/// are int8 exactly where the config converts them (their codes are re-rounded from the file,
/// as quantize_model rounds them).
void check_model_matches(std::string_view fn, const Model& model, const SafeTensorsModel& st,
                         const std::map<std::string, detail::WeightRows>& sources,
                         const QuantConfig& config) {
  for (const SafeTensorsFile& shard : st.shards())
    for (const std::string& name : shard.names()) {
      const TensorInfo& info = shard.at(name);
      const bool convert = converts(config, name, info);
      if (const auto it = sources.find(name); it != sources.end()) {
        if (convert)
          check_model_rows(fn, it->second, name, *info.shape, config.spec);
        else
          AUTOGLM_CHECK(!it->second.weight->is_quantized(), invalid_argument, fn,
                        "tensor '{}' is int8 in the model, but the config keeps it as stored",
                        name);
      }
    }
  const std::int64_t d = model.hidden();
  const bool fits = d % config.spec.group_of(d) == 0;
  AUTOGLM_CHECK(model.head().head().is_quantized() == (config.lm_head && fits), invalid_argument,
                fn, "the model's LM head is {}, the config's lm_head is {}",
                model.head().head().is_quantized() ? "int8" : "float", config.lm_head);
  AUTOGLM_CHECK(model.embeddings().table().is_quantized() == (config.embeddings && fits),
                invalid_argument, fn,
                "the model's embedding table is {}, the config's embeddings is {}",
                model.embeddings().table().is_quantized() ? "int8" : "float", config.embeddings);
}

QuantizeReport write_checkpoint(std::string_view fn, const fs::path& src, const fs::path& dst,
                                const QuantConfig& config, const Model* model) {
  const ModelConfig mc = load_model_config(src);  // validates the family and the sizes
  detail::check_tied_parts(fn, mc.tie_word_embeddings, config);
  AUTOGLM_CHECK(mc.quantization.method.empty(), unsupported, fn,
                "{}: the checkpoint is already quantized (quant_method '{}')", mc.source,
                mc.quantization.method);
  AUTOGLM_CHECK(config.spec.group == 0 || config.spec.group == 32 || config.spec.group == 64 ||
                    config.spec.group == 128,
                invalid_argument, fn, "group {} must be 0 (per channel), 32, 64 or 128",
                config.spec.group);
  std::error_code ec;
  AUTOGLM_CHECK(fs::weakly_canonical(src, ec) != fs::weakly_canonical(dst, ec), invalid_argument,
                fn, "source and destination are the same directory {}", src.string());
  const SafeTensorsModel st = SafeTensorsModel::open(src);
  // save_quantized: the int8 rows of decoder-layer tensors come from the model, checked first.
  const std::map<std::string, detail::WeightRows> sources =
      model ? detail::decoder_weight_sources(*model, src)
            : std::map<std::string, detail::WeightRows>();
  if (model) check_model_matches(fn, *model, st, sources, config);
  fs::create_directories(dst, ec);
  AUTOGLM_CHECK(!ec, io, fn, "cannot create {}: {}", dst.string(), ec.message());

  QuantizeReport report;
  std::map<std::string, std::string> metadata{
      {"format", "pt"},
      {"autoglm.quant", config.spec.scheme_name()},
      {"autoglm.activations", std::string(config.spec.mode_name())}};
  const auto& shards = st.shards();
  // Column scales chosen for a gate/up pair whose partner is still to come (keyed by the gate's
  // name): chosen?, scales [k].
  std::map<std::string, std::pair<bool, std::vector<float>>> pair_scales;
  ModelRows model_rows;
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
    std::vector<std::vector<float>> scales, col_scales;
    std::vector<HostTensor> kept;
    std::vector<SafeTensorsEntry> entries;
    std::vector<std::string> names = shard.names();
    codes.reserve(names.size());
    scales.reserve(names.size());
    col_scales.reserve(names.size());  // entries point into these vectors: no reallocation
    // Entries of an int8 tensor: codes, scales and (when equalised) column scales.
    const auto write_int8 = [&](const std::string& name, const Shape& s,
                                const std::vector<std::int8_t>& q, const std::vector<float>& sc,
                                std::vector<float>* cs) {
      std::vector<std::int64_t> shape, sshape;
      for (int i = 0; i < s.rank(); ++i) shape.push_back(s[i]);
      sshape = shape;
      const std::int64_t k = s[s.rank() - 1], mats = s.rank() == 3 ? s[0] : 1;
      sshape.back() = k / config.spec.group_of(k);
      entries.push_back(SafeTensorsEntry{name, "I8", shape, q.data(), q.size()});
      entries.push_back(
          SafeTensorsEntry{scale_name(name), "F32", sshape, sc.data(), sc.size() * sizeof(float)});
      weight_map[name] = out_name;
      weight_map[scale_name(name)] = out_name;
      if (cs) {
        std::vector<float>& kept_cs = col_scales.emplace_back(std::move(*cs));
        std::vector<std::int64_t> cshape{k};
        if (mats > 1 || s.rank() == 3) cshape = {mats, k};
        entries.push_back(SafeTensorsEntry{col_scale_name(name), "F32", cshape, kept_cs.data(),
                                           kept_cs.size() * sizeof(float)});
        weight_map[col_scale_name(name)] = out_name;
      }
      ++report.quantized;
    };
    for (const std::string& name : names) {
      const TensorInfo& info = shard.at(name);
      const WeightRole role = weight_role(name);
      const bool quantize_it = converts(config, name, info);
      const std::int64_t k = quantize_it ? (*info.shape)[info.shape->rank() - 1] : 0;
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
      if (const auto it = sources.find(name); it != sources.end()) {
        std::vector<float> cs;
        const bool equalised = rows_from_model(it->second, s, model_rows, q, sc, cs);
        write_int8(name, s, q, sc, equalised ? &cs : nullptr);
        continue;
      }
      const HostTensor h = shard.host_view(name);
      // Column scales [mats, k]: searched per matrix, or once over a fused gate/up pair (kept
      // until the partner takes them); embedding tables are looked up, never equalised, and
      // W8A8 never equalises (detail::column_scales).
      const bool equalize = config.spec.equalize &&
                            config.spec.mode == ActivationMode::weight_only &&
                            role != WeightRole::embeddings;
      std::vector<float> cs(equalize ? static_cast<std::size_t>(mats * k) : 0, 1.0f);
      bool equalised = false;
      const std::string partner = equalize && mats == 1 ? fused_partner(st, name) : std::string();
      if (!partner.empty()) {
        const std::string key = pair_key(name, partner);
        if (auto it = pair_scales.find(key); it != pair_scales.end()) {
          if (it->second.first) {
            cs = std::move(it->second.second);
            equalised = true;
          }
          pair_scales.erase(it);
        } else {
          // Rows of both in the fused matrix's order, gate (the key) first, as quantize_model
          // sees them; the partner's K must match for the pair to be fused at all.
          const TensorInfo& pi = st.at(partner);
          if ((*pi.shape)[1] == k && pi.dtype && is_float_dtype(*pi.dtype)) {
            const bool gate_first = key == name;
            const HostTensor ph = st.host_view(partner);
            const std::int64_t pn = (*pi.shape)[0];
            std::vector<float> rows, buf;
            rows.reserve(static_cast<std::size_t>((n + pn) * k));
            const float* a = gate_first ? matrix_f32(h, *info.dtype, 0, n, k, buf)
                                        : matrix_f32(ph, *pi.dtype, 0, pn, k, buf);
            rows.insert(rows.end(), a, a + (gate_first ? n : pn) * k);
            const float* b = gate_first ? matrix_f32(ph, *pi.dtype, 0, pn, k, buf)
                                        : matrix_f32(h, *info.dtype, 0, n, k, buf);
            rows.insert(rows.end(), b, b + (gate_first ? pn : n) * k);
            const bool chosen =
                detail::column_scales(rows.data(), n + pn, k, group, config.spec.mode, cs.data());
            equalised = chosen;
            pair_scales.emplace(key, std::make_pair(chosen, chosen ? cs : std::vector<float>()));
          } else {
            pair_scales.emplace(key, std::make_pair(false, std::vector<float>()));
          }
        }
      }
      std::vector<float> f32;
      for (std::int64_t e = 0; e < mats; ++e) {
        const std::size_t off = static_cast<std::size_t>(e * n * k);
        const float* src_rows = matrix_f32(h, *info.dtype, e, n, k, f32);
        float* ce = equalize ? cs.data() + e * k : nullptr;
        const bool scaled =
            equalize &&
            (partner.empty() ? detail::column_scales(src_rows, n, k, group, config.spec.mode, ce)
                             : equalised);
        if (scaled) {
          if (src_rows != f32.data()) f32.assign(src_rows, src_rows + n * k);
          detail::divide_columns(f32.data(), n, k, ce);
          src_rows = f32.data();
          equalised = true;
        }
        const detail::ScaleRule rule{config.spec.search_scales, scaled ? ce : nullptr};
        const std::int64_t bad = detail::quantize_rows_parallel(
            src_rows, n, k, group, q.data() + off, sc.data() + e * n * groups, rule, 0);
        if (bad >= 0)
          detail::fail(ErrorCode::numeric, fn, "{}: tensor '{}' has a non-finite weight {}",
                       shard.source(), name, src_rows[bad]);
      }
      shard.release(name);
      write_int8(name, s, q, sc, equalised ? &cs : nullptr);
    }
    save_safetensors(dst / out_name, entries, metadata);
    report.bytes_out += fs::file_size(dst / out_name, ec);
  }
  if (shards.size() > 1) {
    nlohmann::json index = {{"metadata", {{"total_size", report.bytes_out}}},
                            {"weight_map", weight_map}};
    std::ofstream f(dst / "model.safetensors.index.json");
    f << index.dump(2) << "\n";
    AUTOGLM_CHECK(f.good(), io, fn, "cannot write {}",
                  (dst / "model.safetensors.index.json").string());
  }
  // config.json with the scheme, so load_model knows the int8 tensors are meant.
  std::ifstream cf(src / "config.json");
  nlohmann::json cfg = nlohmann::json::parse(cf, nullptr, /*allow_exceptions=*/false);
  AUTOGLM_CHECK(!cfg.is_discarded(), io, fn, "cannot re-read {}", (src / "config.json").string());
  cfg["quantization_config"] = {{"quant_method", kAutoglmQuantMethod},
                                {"scheme", config.spec.scheme_name()},
                                {"activations", config.spec.mode_name()},
                                {"group_size", config.spec.group}};
  std::ofstream out(dst / "config.json");
  out << cfg.dump(2) << "\n";
  AUTOGLM_CHECK(out.good(), io, fn, "cannot write {}", (dst / "config.json").string());
  for (const char* extra : {"generation_config.json", "tokenizer.json", "tokenizer_config.json"})
    if (fs::exists(src / extra))
      fs::copy_file(src / extra, dst / extra, fs::copy_options::overwrite_existing, ec);
  return report;
}

}  // namespace

QuantizeReport quantize_checkpoint(const fs::path& src, const fs::path& dst,
                                   const QuantConfig& config) {
  return write_checkpoint(kFn, src, dst, config, nullptr);
}

QuantizeReport save_quantized(const Model& model, const fs::path& src, const fs::path& dst,
                              const QuantConfig& config) {
  return write_checkpoint("save_quantized", src, dst, config, &model);
}

}  // namespace autoglm
