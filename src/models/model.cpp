// SPDX-License-Identifier: Apache-2.0
// DecoderLayer, Model, KvCache and Session.
#include "autoglm/models/model.hpp"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "autoglm/models/session.hpp"
#include "common/checks.hpp"

namespace autoglm {

// ------------------------------------------------------------------------------------ layer

DecoderLayer::DecoderLayer(Tensor input_norm, Tensor post_attention_norm, float eps,
                           AttentionBlock attention, FeedForward ffn)
    : input_norm_(std::move(input_norm)),
      post_norm_(std::move(post_attention_norm)),
      eps_(eps),
      attention_(std::move(attention)),
      ffn_(std::move(ffn)) {
  constexpr std::string_view fn = "DecoderLayer";
  const std::int64_t d = std::visit([](const auto& a) { return a.hidden(); }, attention_);
  AUTOGLM_CHECK(
      input_norm_.defined() && input_norm_.dtype() == DType::f32 && input_norm_.numel() == d,
      shape_mismatch, fn, "input_layernorm must be f32 with {} values, got {}", d,
      input_norm_.shape().str());
  AUTOGLM_CHECK(post_norm_.defined() && post_norm_.dtype() == DType::f32 && post_norm_.numel() == d,
                shape_mismatch, fn, "post_attention_layernorm must be f32 with {} values, got {}",
                d, post_norm_.shape().str());
  const std::int64_t fd = std::visit([](const auto& f) { return f.hidden(); }, ffn_);
  AUTOGLM_CHECK(fd == d, shape_mismatch, fn, "attention width {} and feed-forward width {} differ",
                d, fd);
  AUTOGLM_CHECK(eps_ > 0.0f, invalid_argument, fn, "eps={} must be > 0", eps_);
}

std::int64_t DecoderLayer::kv_heads() const noexcept {
  return std::visit([](const auto& a) { return a.kv_heads(); }, attention_);
}
std::int64_t DecoderLayer::key_dim() const noexcept {
  return std::visit([](const auto& a) { return a.key_dim(); }, attention_);
}
std::int64_t DecoderLayer::value_dim() const noexcept {
  return std::visit([](const auto& a) { return a.value_dim(); }, attention_);
}

void DecoderLayer::forward(Backend& b, TensorView x, const AttentionContext& ctx, KvLayer& cache,
                           RoutingStats* stats) const {
  AUTOGLM_CHECK(x.rank() == 2 && x.dim(1) == hidden() && x.dtype == DType::f32, shape_mismatch,
                "DecoderLayer::forward", "x must be f32 [tokens, {}], got {} {}", hidden(),
                dtype_name(x.dtype), x.shape.str());
  const std::int64_t T = x.dim(0);
  if (T == 0) return;
  // h: [T, d] normalised input of each block; y: [T, d] the block's output.
  Tensor h(b, DType::f32, x.shape);
  Tensor y(b, DType::f32, x.shape);
  b.rms_norm(x, input_norm_, eps_, h);
  std::visit([&](const auto& a) { a.forward(b, h, ctx, cache, y); }, attention_);
  b.add(x, y, x);
  b.rms_norm(x, post_norm_, eps_, h);
  if (const auto* moe = std::get_if<MoEBlock>(&ffn_)) {
    moe->forward(b, h, y, stats);
    b.add(x, y, x);
  } else {
    std::get<DenseMlp>(ffn_).accumulate(b, h, x);  // x += mlp(h)
  }
}

// ------------------------------------------------------------------------------------ model

Model::Model(Backend& backend, ModelConfig config, EmbeddingEncoder embeddings,
             std::vector<DecoderLayer> layers, LmHeadDecoder head)
    : backend_(&backend),
      config_(std::move(config)),
      embeddings_(std::move(embeddings)),
      layers_(std::move(layers)),
      head_(std::move(head)) {
  constexpr std::string_view fn = "Model";
  const std::int64_t d = embeddings_.hidden();
  AUTOGLM_CHECK(head_.hidden() == d, shape_mismatch, fn,
                "embedding width {} and LM head width {} differ", d, head_.hidden());
  for (std::size_t i = 0; i < layers_.size(); ++i)
    AUTOGLM_CHECK(layers_[i].hidden() == d, shape_mismatch, fn, "layer {} has width {}, not {}", i,
                  layers_[i].hidden(), d);
  const std::vector<float> inv = rope_inv_freq(config_);
  inv_freq_ = Tensor(backend, DType::f32, Shape{static_cast<std::int64_t>(inv.size())});
  backend.copy_from_host(inv_freq_, inv.data());
}

Tensor Model::forward(std::span<const std::int32_t> tokens) const {
  AUTOGLM_CHECK(!tokens.empty(), invalid_argument, "Model::forward", "no tokens");
  Session s(*this, SessionOptions{static_cast<std::int64_t>(tokens.size())});
  return s.append(tokens, /*all_logits=*/true);
}

// ---------------------------------------------------------------------------------- KvCache

KvCache::KvCache(const Model& model, std::int64_t max_context)
    : backend_(&model.backend()), layers_(model.layers().size()), max_context_(max_context) {
  AUTOGLM_CHECK(max_context >= 1, invalid_argument, "KvCache", "max_context={} must be >= 1",
                max_context);
  // Empty caches with the right head shapes, so a layer knows its widths before any reserve.
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const DecoderLayer& l = model.layers()[i];
    layers_[i].k = Tensor(*backend_, DType::f32, Shape{0, l.kv_heads(), l.key_dim()});
    layers_[i].v = Tensor(*backend_, DType::f32, Shape{0, l.kv_heads(), l.value_dim()});
  }
}

void KvCache::reserve(std::int64_t n) {
  AUTOGLM_CHECK(n >= 0 && n <= max_context_, out_of_range, "KvCache::reserve",
                "{} positions exceed the session's max_context={}", n, max_context_);
  if (n <= capacity_) return;
  const std::int64_t cap = std::min(max_context_, std::max({n, 2 * capacity_, std::int64_t{64}}));
  std::vector<KvLayer> grown(layers_.size());
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const TensorView k = layers_[i].k, v = layers_[i].v;
    grown[i].k = Tensor(*backend_, DType::f32, Shape{cap, k.dim(1), k.dim(2)});
    grown[i].v = Tensor(*backend_, DType::f32, Shape{cap, v.dim(1), v.dim(2)});
    if (size() > 0) {
      backend_->convert(k.slice(0, size()), TensorView(grown[i].k).slice(0, size()));
      backend_->convert(v.slice(0, size()), TensorView(grown[i].v).slice(0, size()));
    }
  }
  layers_ = std::move(grown);
  capacity_ = cap;
}

void KvCache::truncate(std::int64_t n) {
  AUTOGLM_CHECK(n >= 0 && n <= size(), out_of_range, "KvCache::truncate",
                "cannot keep {} of {} positions", n, size());
  tokens_.resize(static_cast<std::size_t>(n));
}

void KvCache::commit(std::span<const std::int32_t> tokens) {
  AUTOGLM_CHECK(size() + static_cast<std::int64_t>(tokens.size()) <= capacity_, out_of_range,
                "KvCache::commit", "{} + {} positions exceed the capacity {}", size(),
                tokens.size(), capacity_);
  tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
}

// ---------------------------------------------------------------------------------- Session

namespace {
std::int64_t session_context(const Model& m, const SessionOptions& o) {
  AUTOGLM_CHECK(o.max_context >= 0, invalid_argument, "Session", "max_context={} must be >= 0",
                o.max_context);
  return o.max_context > 0 ? o.max_context
                           : std::max<std::int64_t>(1, m.config().max_position_embeddings);
}
}  // namespace

Session::Session(const Model& model, SessionOptions options)
    : model_(&model), cache_(model, session_context(model, options)) {}

Tensor Session::append(std::span<const std::int32_t> tokens, bool all_logits) {
  constexpr std::string_view fn = "Session::append";
  AUTOGLM_CHECK(!tokens.empty(), invalid_argument, fn, "no tokens to append");
  const Model& m = *model_;
  Backend& b = m.backend();
  const auto T = static_cast<std::int64_t>(tokens.size());
  const std::int64_t start = cache_.size();
  AUTOGLM_CHECK(start + T <= cache_.max_context(), out_of_range, fn,
                "{} cached + {} new positions exceed max_context={}", start, T,
                cache_.max_context());
  for (std::int64_t t = 0; t < T; ++t)
    AUTOGLM_CHECK(tokens[t] >= 0 && tokens[t] < m.embeddings().vocab_size(), out_of_range, fn,
                  "token id {} at position {} outside vocabulary [0, {})", tokens[t], start + t,
                  m.embeddings().vocab_size());
  cache_.reserve(start + T);
  Tensor ids(b, DType::i32, Shape{T});
  b.copy_from_host(ids, tokens.data());
  std::vector<std::int32_t> pos(static_cast<std::size_t>(T));
  std::iota(pos.begin(), pos.end(), static_cast<std::int32_t>(start));
  Tensor positions(b, DType::i32, Shape{T});
  b.copy_from_host(positions, pos.data());
  // x: [T, d], the residual stream.
  Tensor x(b, DType::f32, Shape{T, m.hidden()});
  m.embeddings().encode(b, ids, x);
  const AttentionContext ctx{positions, m.inv_freq(), start};
  for (std::size_t i = 0; i < m.layers().size(); ++i) {
    const bool watch = routing_observer_ && m.layers()[i].is_moe();
    RoutingStats stats;
    m.layers()[i].forward(b, x, ctx, cache_.layer(i), watch ? &stats : nullptr);
    if (watch) routing_observer_(static_cast<std::int64_t>(i), stats);
    if (observer_) observer_(static_cast<std::int64_t>(i), x);
  }
  cache_.commit(tokens);  // only once every layer has written its rows
  const TensorView rows = all_logits ? TensorView(x) : TensorView(x).slice(T - 1, T);
  Tensor logits(b, DType::f32, Shape{rows.dim(0), m.vocab_size()});
  m.head().decode(b, rows, logits);
  return logits;
}

Tensor Session::prefill(std::span<const std::int32_t> prompt, bool all_logits) {
  AUTOGLM_CHECK(!prompt.empty(), invalid_argument, "Session::prefill", "empty prompt");
  const std::span<const std::int32_t> cached = cache_.tokens();
  const std::size_t limit = std::min(cached.size(), prompt.size() - 1);
  std::size_t keep = 0;
  while (keep < limit && cached[keep] == prompt[keep]) ++keep;
  cache_.truncate(static_cast<std::int64_t>(keep));
  reused_ = static_cast<std::int64_t>(keep);
  return append(prompt.subspan(keep), all_logits);
}

std::vector<std::int32_t> Session::generate(std::span<const std::int32_t> prompt,
                                            const GenerateOptions& options,
                                            GenerationStats* stats) {
  constexpr std::string_view fn = "Session::generate";
  AUTOGLM_CHECK(options.max_new_tokens >= 0, invalid_argument, fn, "max_new_tokens={} must be >= 0",
                options.max_new_tokens);
  using clock = std::chrono::steady_clock;
  Sampler sampler(options.sampling);
  Backend& b = model_->backend();
  const auto V = static_cast<std::size_t>(model_->vocab_size());
  std::vector<float> host(V);
  GenerationStats st;
  st.prompt_tokens = static_cast<std::int64_t>(prompt.size());
  std::vector<std::int32_t> out;
  auto t0 = clock::now();
  Tensor logits = prefill(prompt);
  b.synchronize();
  st.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  st.reused_tokens = reused_;
  st.prefill_tokens = st.prompt_tokens - reused_;
  t0 = clock::now();
  while (static_cast<std::int64_t>(out.size()) < options.max_new_tokens) {
    b.copy_to_host(host.data(), logits);
    const std::int32_t next = sampler.sample(host);
    out.push_back(next);
    const bool stop = std::find(options.stop_tokens.begin(), options.stop_tokens.end(), next) !=
                      options.stop_tokens.end();
    if (stop || (options.on_token && !options.on_token(next))) break;
    if (static_cast<std::int64_t>(out.size()) == options.max_new_tokens) break;
    if (cache_.size() >= cache_.max_context()) break;  // context full
    logits = append(std::span<const std::int32_t>(&next, 1));
  }
  b.synchronize();
  st.decode_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  st.generated_tokens = static_cast<std::int64_t>(out.size());
  if (stats) *stats = st;
  return out;
}

}  // namespace autoglm

namespace autoglm {

DecoderLayer DecoderLayer::quantized(Backend& backend, const QuantConfig& config) const {
  const QuantSpec& spec = config.spec;
  AttentionBlock attention = attention_;
  if (config.attention)
    attention = std::visit(
        [&](const auto& a) -> AttentionBlock { return a.quantized(backend, spec); }, attention_);
  FeedForward ffn = ffn_;
  if (const auto* moe = std::get_if<MoEBlock>(&ffn_)) {
    if (config.experts || config.router) {
      const MoEBlock& m = *moe;
      GateNetwork gate = config.router ? m.gate().quantized(backend, spec) : m.gate();
      SwiGluExperts experts = config.experts ? m.experts().quantized(backend, spec) : m.experts();
      WeightedSumAggregator agg =
          config.experts ? m.aggregator().quantized(backend, spec) : m.aggregator();
      ffn = MoEBlock(std::move(gate), std::move(experts), std::move(agg));
    }
  } else if (config.dense_mlp) {
    ffn = std::get<DenseMlp>(ffn_).quantized(backend, spec);
  }
  return DecoderLayer(input_norm_, post_norm_, eps_, std::move(attention), std::move(ffn));
}

Model quantize_model(const Model& model, const QuantConfig& config) {
  detail::check_tied_parts("quantize_model", model.config().tie_word_embeddings, config);
  Backend& b = model.backend();
  EmbeddingEncoder embeddings =
      config.embeddings ? model.embeddings().quantized(b, config.spec) : model.embeddings();
  std::vector<DecoderLayer> layers;
  layers.reserve(model.layers().size());
  for (const DecoderLayer& l : model.layers()) layers.push_back(l.quantized(b, config));
  // A tied head is the embedding table, which a file stores once and never equalises (a lookup
  // cannot carry column scales): quantized the same way, the head matches the file's.
  QuantSpec head_spec = config.spec;
  if (model.config().tie_word_embeddings) head_spec.equalize = false;
  LmHeadDecoder head = config.lm_head ? model.head().quantized(b, head_spec) : model.head();
  return Model(b, model.config(), std::move(embeddings), std::move(layers), std::move(head));
}

}  // namespace autoglm
