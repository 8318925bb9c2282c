// SPDX-License-Identifier: Apache-2.0
// Encoder, decoder, sampler, classifier head, Pipeline against a naive pipeline built from host
// copies of the weights, build_pipeline / Registry, and user-defined Gate / ExpertBank classes.
#include <map>
#include <memory>
#include <numeric>
#include <set>

#include "moe_reference.hpp"
#include "reference.hpp"
#include "support.hpp"

using namespace autoglm;
using namespace agt;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

Backend& test_backend() {
  static CpuBackend b;
  return b;
}

std::vector<double> ref_encode(const std::vector<float>& table, const std::vector<float>& norm,
                               const std::vector<std::int32_t>& ids, std::int64_t d, double eps) {
  std::vector<double> x;
  for (std::int32_t id : ids) {
    const float* row = table.data() + id * d;
    if (norm.empty()) {
      x.insert(x.end(), row, row + d);
    } else {
      const auto r = ref::rms_norm_row(row, d, norm.data(), eps);
      x.insert(x.end(), r.begin(), r.end());
    }
  }
  return x;
}

template <typename TX>
std::vector<double> ref_decode(const std::vector<TX>& h, const std::vector<float>& norm,
                               const std::vector<float>& head, std::int64_t T, std::int64_t V,
                               std::int64_t d, double eps) {
  std::vector<double> n;
  for (std::int64_t t = 0; t < T; ++t) {
    if (norm.empty()) {
      n.insert(n.end(), h.begin() + t * d, h.begin() + (t + 1) * d);
    } else {
      const auto r = ref::rms_norm_row(h.data() + t * d, d, norm.data(), eps);
      n.insert(n.end(), r.begin(), r.end());
    }
  }
  return ref::matmul_nt(n, head, T, V, d);
}

}  // namespace

TEST_CASE("EmbeddingEncoder: lookup, optional RMSNorm, ids outside the vocabulary", "[pipeline]") {
  Backend& b = test_backend();
  const std::int64_t V = 50, d = 16;
  Tensor table = uniform(b, Shape{V, d}, 1);
  const auto ht = host_f32(b, table);
  const std::vector<std::int32_t> ids{0, 49, 7, 7, 13};
  Tensor tid = tensor_i32(b, Shape{5}, ids);
  Tensor out(b, DType::f32, Shape{5, d});

  const EmbeddingEncoder plain(table);
  CHECK(plain.vocab_size() == V);
  CHECK(plain.hidden() == d);
  plain.encode(b, tid, out);
  check_close(host_f32(b, out), ref_encode(ht, {}, ids, d, 0.0), 0.0, 0.0, "embedding");

  Tensor norm = uniform(b, Shape{d}, 2, 2.0f);
  const EmbeddingEncoder normed(table, norm, 1e-5f);
  normed.encode(b, tid, out);
  check_close(host_f32(b, out), ref_encode(ht, host_f32(b, norm), ids, d, 1e-5), 1e-6, 1e-5,
              "embedding + norm");

  REQUIRE_ERROR(plain.encode(b, tensor_i32(b, Shape{5}, {0, 1, 50, 2, 3}), out), out_of_range,
                "embedding]", "token id 50 at position 2 outside vocabulary [0, 50)");
  REQUIRE_ERROR(plain.encode(b, tensor_i32(b, Shape{5}, {0, 1, 2, 3, -4}), out), out_of_range,
                "embedding]", "token id -4 at position 4");
  REQUIRE_ERROR(EmbeddingEncoder(uniform(b, Shape{V}, 1)), shape_mismatch, "[EmbeddingEncoder]",
                "table must be float (f32, bf16, f16) or int8, row-major [V >= 1, d], got [50]");
  REQUIRE_ERROR(EmbeddingEncoder(table, uniform(b, Shape{d - 1}, 1)), shape_mismatch,
                "[EmbeddingEncoder]", "norm must hold 16 values, got 15");
  REQUIRE_ERROR(EmbeddingEncoder(table, norm, 0.0f), invalid_argument, "[EmbeddingEncoder]",
                "eps=0 must be > 0");
}

TEST_CASE("LmHeadDecoder: logits = head(norm(h))", "[pipeline]") {
  Backend& b = test_backend();
  const std::int64_t V = 37, d = 16, T = 6;
  Tensor head = uniform(b, Shape{V, d}, 3, 0.25f), norm = uniform(b, Shape{d}, 4, 1.5f);
  const auto hh = host_f32(b, head), hn = host_f32(b, norm);
  Tensor h = uniform(b, Shape{T, d}, 5, 3.0f);
  const auto hx = host_f32(b, h);
  Tensor logits(b, DType::f32, Shape{T, V});

  const LmHeadDecoder dec(norm, head, 1e-5f);
  CHECK(dec.vocab_size() == V);
  CHECK(dec.hidden() == d);
  dec.decode(b, h, logits);
  check_close(host_f32(b, logits), ref_decode(hx, hn, hh, T, V, d, 1e-5), 1e-5, 1e-5, "decode");
  const LmHeadDecoder raw(Tensor(), head);
  raw.decode(b, h, logits);
  check_close(host_f32(b, logits), ref_decode(hx, {}, hh, T, V, d, 0.0), 1e-5, 1e-5, "decode raw");

  REQUIRE_ERROR(dec.decode(b, uniform(b, Shape{T, d + 1}, 1), logits), shape_mismatch,
                "[LmHeadDecoder::decode]", "h must be [tokens, 16], got [6, 17]");
  REQUIRE_ERROR(LmHeadDecoder(uniform(b, Shape{d + 1}, 1), head), shape_mismatch, "[LmHeadDecoder]",
                "norm must hold 16 values, got 17");
  REQUIRE_ERROR(LmHeadDecoder(norm, head, -1.0f), invalid_argument, "[LmHeadDecoder]", "eps=-1");
  REQUIRE_ERROR(LmHeadDecoder(norm, Tensor(b, DType::f32, Shape{0, d})), shape_mismatch,
                "[LmHeadDecoder]",
                "head must be float (f32, bf16, f16) or int8 [V >= 1, d], got [0, 16]");
}

TEST_CASE("Sampler: greedy, seeded sampling, temperature, top-k, top-p", "[pipeline][sampler]") {
  const std::vector<double> p{0.5, 0.3, 0.15, 0.05};
  std::vector<float> logits;
  for (double v : p) logits.push_back(static_cast<float>(std::log(v)) + 3.0f);  // shift-invariant

  auto freq = [&](SamplingOptions o, int n = 4000) {
    Sampler s(o);
    std::vector<double> f(p.size(), 0.0);
    for (int i = 0; i < n; ++i) {
      const std::int32_t t = s.sample(logits);
      REQUIRE(t >= 0);
      REQUIRE(t < static_cast<std::int32_t>(p.size()));
      f[t] += 1.0 / n;
    }
    return f;
  };
  auto expect_freq = [](const std::vector<double>& got, const std::vector<double>& want) {
    for (std::size_t i = 0; i < want.size(); ++i) {
      INFO("token " << i << ": frequency " << got[i] << ", probability " << want[i]);
      if (want[i] == 0.0)
        CHECK(got[i] == 0.0);
      else
        CHECK(std::abs(got[i] - want[i]) < 0.03);
    }
  };

  SECTION("greedy: temperature 0 is argmax, first of equal maxima") {
    Sampler g;
    CHECK(g.sample(logits) == 0);
    const std::vector<float> tie{1.0f, 5.0f, 5.0f, 2.0f};
    CHECK(g.sample(tie) == 1);
    const std::vector<float> masked{-kInf, 0.0f, -kInf};
    CHECK(g.sample(masked) == 1);
  }
  SECTION("temperature 1 follows softmax(logits)") {
    SamplingOptions o;
    o.temperature = 1.0f;
    o.seed = 11;
    expect_freq(freq(o), p);
  }
  SECTION("temperature 0.5 sharpens: probabilities proportional to p^2") {
    SamplingOptions o;
    o.temperature = 0.5f;
    o.seed = 12;
    double z = 0.0;
    for (double v : p) z += v * v;
    std::vector<double> q;
    for (double v : p) q.push_back(v * v / z);
    expect_freq(freq(o), q);
  }
  SECTION("top-k keeps the k most likely, renormalised") {
    SamplingOptions o;
    o.temperature = 1.0f;
    o.top_k = 2;
    o.seed = 13;
    expect_freq(freq(o), {0.625, 0.375, 0.0, 0.0});
  }
  SECTION("top-p keeps the smallest set reaching p and filters the rest") {
    SamplingOptions o;
    o.temperature = 1.0f;
    o.top_p = 0.75f;  // 0.5 < 0.75 <= 0.8
    o.seed = 14;
    expect_freq(freq(o), {0.625, 0.375, 0.0, 0.0});
    o.top_p = 0.4f;  // the top token alone
    expect_freq(freq(o, 500), {1.0, 0.0, 0.0, 0.0});
    o.top_p = 0.9f;  // 0.8 < 0.9 <= 0.95
    expect_freq(freq(o), {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0});
  }
  SECTION("top-k = 1 equals greedy on random logits") {
    SamplingOptions o;
    o.temperature = 1.3f;
    o.top_k = 1;
    o.seed = 15;
    Sampler s(o), g;
    for (int i = 0; i < 200; ++i) {
      const auto l = random_floats(50, 100 + i, -4.0f, 4.0f);
      CHECK(s.sample(l) == g.sample(l));
    }
  }
  SECTION("the same seed reproduces the same tokens, another seed does not") {
    SamplingOptions o;
    o.temperature = 1.0f;
    o.seed = 42;
    Sampler a(o), c(o);
    o.seed = 43;
    Sampler other(o);
    const auto flat = random_floats(64, 7, -0.5f, 0.5f);
    std::vector<std::int32_t> sa, sc, so;
    for (int i = 0; i < 100; ++i) {
      sa.push_back(a.sample(flat));
      sc.push_back(c.sample(flat));
      so.push_back(other.sample(flat));
    }
    CHECK(sa == sc);
    CHECK(sa != so);
    CHECK(std::set<std::int32_t>(sa.begin(), sa.end()).size() > 20);  // it really samples
  }
  SECTION("bad options and logits") {
    auto opt = [](auto f) {
      SamplingOptions o;
      f(o);
      return o;
    };
    REQUIRE_ERROR(Sampler(opt([](SamplingOptions& o) { o.temperature = -1.0f; })), invalid_argument,
                  "[Sampler]", "temperature=-1 must be >= 0");
    REQUIRE_ERROR(Sampler(opt([](SamplingOptions& o) { o.temperature = kNaN; })), invalid_argument,
                  "[Sampler]", "temperature=nan");
    REQUIRE_ERROR(Sampler(opt([](SamplingOptions& o) { o.top_k = -1; })), invalid_argument,
                  "[Sampler]", "top_k=-1 must be >= 0");
    REQUIRE_ERROR(Sampler(opt([](SamplingOptions& o) { o.top_p = 0.0f; })), invalid_argument,
                  "[Sampler]", "top_p=0 must be in (0, 1]");
    REQUIRE_ERROR(Sampler(opt([](SamplingOptions& o) { o.top_p = 1.5f; })), invalid_argument,
                  "[Sampler]", "top_p=1.5");
    Sampler s(opt([](SamplingOptions& o) { o.temperature = 1.0f; }));
    REQUIRE_ERROR(s.sample(std::vector<float>{0.0f, 1.0f, kNaN}), numeric, "[Sampler::sample]",
                  "logit 2 is NaN");
    REQUIRE_ERROR(s.sample(std::vector<float>{}), invalid_argument, "[Sampler::sample]",
                  "empty logits");
  }
  SECTION("an infinite logit is taken (its probability is 1) or rejected, never skipped") {
    SamplingOptions o;
    o.temperature = 1.0f;
    o.seed = 3;
    Sampler s(o);
    const std::vector<float> l{0.0f, kInf, 1.0f, -kInf};
    for (int i = 0; i < 20; ++i) {
      try {
        CHECK(s.sample(l) == 1);
      } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::numeric);
      }
    }
  }
}

TEST_CASE("ClassifierHead: last and mean pooling against the naive head", "[pipeline]") {
  Backend& b = test_backend();
  const std::int64_t C = 5, d = 16, T = 7;
  Tensor w = uniform(b, Shape{C, d}, 20);
  Tensor h = uniform(b, Shape{T, d}, 21, 2.0f);
  const auto hw = host_f32(b, w), hh = host_f32(b, h);
  for (Pooling pool : {Pooling::last, Pooling::mean}) {
    DYNAMIC_SECTION((pool == Pooling::last ? "last" : "mean")) {
      std::vector<double> pooled(static_cast<std::size_t>(d), 0.0);
      const std::int64_t first = pool == Pooling::last ? T - 1 : 0;
      for (std::int64_t t = first; t < T; ++t)
        for (std::int64_t c = 0; c < d; ++c)
          pooled[c] += hh[t * d + c] / static_cast<double>(T - first);
      const auto logit = ref::matmul_nt(pooled, hw, 1, C, d);
      const double mx = *std::max_element(logit.begin(), logit.end());
      double z = 0.0;
      for (double v : logit) z += std::exp(v - mx);
      std::vector<double> want;
      for (double v : logit) want.push_back(std::exp(v - mx) / z);
      const ClassifierHead head(w, pool);
      CHECK(head.num_classes() == C);
      const Classification res = head.classify(b, h);
      check_close(res.probs, want, 1e-6, 1e-5, "class probabilities");
      CHECK(res.label == std::max_element(want.begin(), want.end()) - want.begin());
    }
  }
  const ClassifierHead head(w);
  REQUIRE_ERROR(head.classify(b, Tensor(b, DType::f32, Shape{0, d})), shape_mismatch,
                "[ClassifierHead::classify]", "h must be [tokens >= 1, 16], got [0, 16]");
  REQUIRE_ERROR(head.classify(b, uniform(b, Shape{T, d + 1}, 1)), shape_mismatch,
                "[ClassifierHead::classify]", "got [7, 17]");
  REQUIRE_ERROR(ClassifierHead(uniform(b, Shape{C}, 1)), shape_mismatch, "[ClassifierHead]",
                "got [5]");
}

namespace {

using StaticLayer = MoELayer<GateNetwork, SwiGluExperts>;
using StaticPipeline = Pipeline<EmbeddingEncoder, StaticLayer, LmHeadDecoder>;

/// Host copies of everything in a StaticPipeline.
struct HostPipeline {
  std::int64_t V = 0, d = 0;
  std::vector<float> table, enc_norm, dec_norm, head;
  struct Layer {
    GateOptions o;
    std::int64_t E = 0;
    std::vector<float> W, bias;
    ref::SwiGlu bank;
    std::optional<HostShared> shared;
  };
  std::vector<Layer> layers;
  PipelineOptions po;
};

/// A three-layer pipeline (softmax top-2 + gated shared expert, DeepSeek-style sigmoid with
/// groups, bias and scaling, expert choice) and its host copy.
std::pair<StaticPipeline, HostPipeline> make_pipeline(Backend& b, PipelineOptions po,
                                                      bool enc_norm) {
  HostPipeline hp;
  hp.V = 40;
  hp.d = 16;
  hp.po = po;
  const std::int64_t d = hp.d;
  Tensor table = uniform(b, Shape{hp.V, d}, 200);
  Tensor en;
  if (enc_norm) en = uniform(b, Shape{d}, 201, 1.5f);
  hp.table = host_f32(b, table);
  if (enc_norm) hp.enc_norm = host_f32(b, en);
  Tensor dn = uniform(b, Shape{d}, 202, 1.5f), head = uniform(b, Shape{hp.V, d}, 203, 0.3f);
  hp.dec_norm = host_f32(b, dn);
  hp.head = host_f32(b, head);

  std::vector<GateOptions> opts(3);
  opts[0].top_k = 2;
  opts[1].policy = GatePolicy::sigmoid_group;
  opts[1].top_k = 2;
  opts[1].n_group = 4;
  opts[1].topk_group = 2;
  opts[1].routed_scaling = 2.5f;
  opts[1].renorm_epsilon = 1e-20f;
  opts[2].policy = GatePolicy::expert_choice;
  const std::int64_t Es[3] = {8, 8, 4};
  std::vector<StaticLayer> layers;
  for (int l = 0; l < 3; ++l) {
    const std::uint64_t s = 300 + 10 * l;
    GateNetwork gate = GateNetwork::random(b, Es[l], d, opts[l], s, l == 1);
    SwiGluExperts bank = SwiGluExperts::random(b, Es[l], d, 12, s + 1);
    HostPipeline::Layer hl;
    hl.o = opts[l];
    hl.E = Es[l];
    hl.W = host_f32(b, gate.weight());
    if (l == 1) hl.bias = host_f32(b, gate.bias());
    hl.bank = host_bank(b, bank);
    WeightedSumAggregator agg;
    if (l == 0) {
      SwiGluExperts mlp = SwiGluExperts::random(b, 1, d, 10, s + 2);
      Tensor g = uniform(b, Shape{1, d}, s + 3);
      hl.shared = HostShared{host_bank(b, mlp), host_f32(b, g)};
      agg = WeightedSumAggregator(SharedExpert(std::move(mlp), std::move(g)));
    }
    layers.emplace_back(std::move(gate), std::move(bank), std::move(agg));
    hp.layers.push_back(std::move(hl));
  }
  StaticPipeline pipe(EmbeddingEncoder(table, en), std::move(layers), LmHeadDecoder(dn, head), po);
  return {std::move(pipe), std::move(hp)};
}

/// The naive pipeline in double precision. Routing is recomputed by the reference and checked
/// against the library's trace (which it follows only at float/double near-ties).
std::vector<double> naive_forward(const HostPipeline& hp, const std::vector<std::int32_t>& tokens,
                                  const PipelineResult& lib) {
  const auto T = static_cast<std::int64_t>(tokens.size());
  const std::int64_t d = hp.d;
  std::vector<double> x = ref_encode(hp.table, hp.enc_norm, tokens, d, 1e-6);
  REQUIRE(lib.layers.size() == hp.layers.size());
  for (std::size_t l = 0; l < hp.layers.size(); ++l) {
    const auto& L = hp.layers[l];
    std::vector<double> h = x;
    if (hp.po.pre_norm)
      for (std::int64_t t = 0; t < T; ++t) {
        const auto r = ref::rms_norm_row(x.data() + t * d, d, nullptr, hp.po.norm_eps);
        std::copy(r.begin(), r.end(), h.begin() + t * d);
      }
    const RefRouting rr = reference_routing(L.o, L.W, L.bias, h, T, L.E, d);
    INFO("layer " << l);
    REQUIRE(lib.layers[l].slots == rr.route.slots);
    const std::vector<double> M =
        check_routing(rr, lib.layers[l].ids, lib.layers[l].weights, T, L.E);
    std::vector<double> y = ref::dense_moe(L.bank, h, M, T, L.E, d);
    if (L.shared) L.shared->add_to(y, h, T, d);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += y[i];
  }
  return ref_decode(x, hp.dec_norm, hp.head, T, hp.V, d, 1e-6);
}

}  // namespace

TEST_CASE("Pipeline forward matches a naive pipeline built from host copies", "[pipeline]") {
  Backend& b = test_backend();
  for (bool pre_norm : {true, false}) {
    DYNAMIC_SECTION("pre_norm=" << pre_norm) {
      PipelineOptions po;
      po.pre_norm = pre_norm;
      po.norm_eps = 1e-5f;
      auto [pipe, hp] = make_pipeline(b, po, /*enc_norm=*/!pre_norm);
      CHECK(pipe.hidden() == 16);
      CHECK(pipe.vocab_size() == 40);
      CHECK(pipe.layers().size() == 3);
      const std::vector<std::int32_t> tokens{3, 17, 39, 0, 3, 25, 8, 11, 30, 5, 5, 21};
      const PipelineResult res = pipe.forward(b, tokens, /*trace=*/true);
      REQUIRE(res.logits.shape() == Shape{12, 40});
      const auto want = naive_forward(hp, tokens, res);
      check_close(host_f32(b, res.logits), want, 1e-4, 1e-4, "pipeline logits");
      // Per-layer statistics in the trace.
      for (std::size_t l = 0; l < res.layers.size(); ++l) {
        const LayerTrace& lt = res.layers[l];
        CHECK(static_cast<std::int64_t>(lt.stats.tokens_per_expert.size()) == hp.layers[l].E);
        CHECK(std::accumulate(lt.stats.tokens_per_expert.begin(), lt.stats.tokens_per_expert.end(),
                              0) == lt.stats.assignments - lt.stats.dropped);
      }
      // Without tracing: same logits, no trace.
      const PipelineResult quiet = pipe.forward(b, tokens);
      CHECK(quiet.layers.empty());
      check_bitwise(host_f32(b, quiet.logits), host_f32(b, res.logits),
                    "trace does not change logits");
    }
  }
}

TEST_CASE("Pipeline: empty batch, token ids outside the vocabulary, generate", "[pipeline]") {
  Backend& b = test_backend();
  PipelineOptions po;
  auto [pipe, hp] = make_pipeline(b, po, false);

  const PipelineResult empty = pipe.forward(b, std::vector<std::int32_t>{}, true);
  CHECK(empty.logits.shape() == Shape{0, 40});
  CHECK(empty.layers.empty());

  REQUIRE_ERROR(pipe.forward(b, std::vector<std::int32_t>{1, 2, 40}), out_of_range, "embedding]",
                "token id 40 at position 2 outside vocabulary [0, 40)");
  REQUIRE_ERROR(pipe.forward(b, std::vector<std::int32_t>{-1}), out_of_range, "embedding]",
                "token id -1");

  SECTION("greedy generate feeds back the argmax of the newest token's logits") {
    Sampler greedy;
    const std::vector<std::int32_t> prompt{5, 9};
    const auto out = pipe.generate(b, prompt, 5, greedy);
    REQUIRE(out.size() == 5);
    std::int32_t last = prompt.back();
    for (std::int32_t tok : out) {
      const std::vector<std::int32_t> one{last};
      const auto logits = naive_forward(hp, one, pipe.forward(b, one, true));
      const auto best = std::max_element(logits.begin(), logits.end()) - logits.begin();
      INFO("after token " << last << ": generated " << tok << ", naive argmax " << best);
      CHECK((tok == best || std::abs(logits[tok] - logits[best]) < 1e-4));
      last = tok;
    }
    CHECK(pipe.generate(b, prompt, 0, greedy).empty());
  }
  SECTION("bad arguments") {
    Sampler s;
    REQUIRE_ERROR(pipe.generate(b, std::vector<std::int32_t>{}, 3, s), invalid_argument,
                  "[Pipeline::generate]", "empty prompt");
    REQUIRE_ERROR(pipe.generate(b, std::vector<std::int32_t>{1}, -1, s), invalid_argument,
                  "[Pipeline::generate]", "max_new=-1");
    Tensor t8 = uniform(b, Shape{40, 8}, 1);
    REQUIRE_ERROR(StaticPipeline(EmbeddingEncoder(t8), {},
                                 LmHeadDecoder(Tensor(), uniform(b, Shape{40, 16}, 2))),
                  shape_mismatch, "[Pipeline]", "decoder width 16 differs from encoder width 8");
    std::vector<StaticLayer> layers{pipe.layers()[0]};
    REQUIRE_ERROR(StaticPipeline(EmbeddingEncoder(t8), layers, LmHeadDecoder(Tensor(), t8)),
                  shape_mismatch, "[Pipeline]", "layer 0 has width 16, encoder 8");
    PipelineOptions bad;
    bad.norm_eps = 0.0f;
    REQUIRE_ERROR(StaticPipeline(EmbeddingEncoder(t8), {}, LmHeadDecoder(Tensor(), t8), bad),
                  invalid_argument, "[Pipeline]", "norm_eps=0 must be > 0");
  }
}

TEST_CASE("Pipeline logits are bit-identical with 1 and 2 oneTBB threads", "[pipeline][threads]") {
  CpuBackend b1(CpuBackendOptions{1}), b2(CpuBackendOptions{2});
  std::vector<std::int32_t> tokens(150);
  for (std::size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = static_cast<std::int32_t>((i * 7919) % 40);
  auto run = [&](CpuBackend& b) {
    auto [pipe, hp] = make_pipeline(b, PipelineOptions{}, true);
    return host_f32(b, pipe.forward(b, tokens).logits);
  };
  check_bitwise(run(b1), run(b2), "logits");
}

namespace {

/// A user gate: token t goes to expert (t + shift) % E with weight 1 and, when E > 1, to
/// (t + shift + 1) % E with weight 0.25 (else the second slot is empty, -1).
class FixedGate {
 public:
  FixedGate(std::int64_t experts, std::int64_t hidden, std::int64_t shift = 0, std::int64_t cap = 0)
      : e_(experts), d_(hidden), shift_(shift), cap_(cap) {}
  std::int64_t num_experts() const { return e_; }
  std::int64_t hidden() const { return d_; }
  std::int64_t slots() const { return 2; }
  std::int64_t capacity(std::int64_t) const { return cap_; }
  void route(Backend& b, TensorView x, Routing& r) const {
    const std::int64_t T = x.dim(0);
    std::vector<std::int32_t> ids;
    std::vector<float> w;
    for (std::int64_t t = 0; t < T; ++t) {
      ids.push_back(static_cast<std::int32_t>((t + shift_) % e_));
      ids.push_back(e_ > 1 ? static_cast<std::int32_t>((t + shift_ + 1) % e_) : -1);
      w.push_back(1.0f);
      w.push_back(e_ > 1 ? 0.25f : 0.0f);
    }
    r.ids = tensor_i32(b, Shape{T, 2}, ids);
    r.weights = tensor_f32(b, Shape{T, 2}, w);
    r.scores = Tensor(b, DType::f32, Shape{e_ + 1});
    b.fill(r.scores, 0.0f);
  }
  /// The reference of this routing.
  std::vector<std::int32_t> ids(std::int64_t T) const {
    std::vector<std::int32_t> v;
    for (std::int64_t t = 0; t < T; ++t) {
      v.push_back(static_cast<std::int32_t>((t + shift_) % e_));
      v.push_back(e_ > 1 ? static_cast<std::int32_t>((t + shift_ + 1) % e_) : -1);
    }
    return v;
  }

 private:
  std::int64_t e_, d_, shift_, cap_;
};
static_assert(Gate<FixedGate>);

/// A user expert bank: expert e multiplies its rows by scale[e] (a host round trip: user code
/// may do anything the Backend interface allows).
class ScaleExperts {
 public:
  ScaleExperts(std::vector<float> scale, std::int64_t hidden)
      : scale_(std::move(scale)), d_(hidden) {}
  std::int64_t num_experts() const { return static_cast<std::int64_t>(scale_.size()); }
  std::int64_t hidden() const { return d_; }
  void forward(Backend& b, TensorView x, TensorView offsets, TensorView out) const {
    std::vector<float> h = host_f32(b, x);
    const std::vector<std::int32_t> off = host_i32(b, offsets);
    for (std::int64_t e = 0; e < num_experts(); ++e)
      for (std::int64_t r = off[e]; r < off[e + 1]; ++r)
        for (std::int64_t c = 0; c < d_; ++c) h[r * d_ + c] *= scale_[e];
    b.copy_from_host(out, h.data());
  }
  const std::vector<float>& scale() const { return scale_; }

 private:
  std::vector<float> scale_;
  std::int64_t d_;
};
static_assert(ExpertBank<ScaleExperts>);

/// out[t] = sum over kept slots of w * scale[e] * x[t].
std::vector<double> scale_reference(const std::vector<float>& x,
                                    const std::vector<std::int32_t>& ids,
                                    const std::vector<double>& w, const std::vector<char>& kept,
                                    const std::vector<float>& scale, std::int64_t T, std::int64_t k,
                                    std::int64_t d) {
  std::vector<double> out(static_cast<std::size_t>(T * d), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t j = 0; j < k; ++j)
      if (ids[t * k + j] >= 0 && kept[t * k + j])
        for (std::int64_t c = 0; c < d; ++c)
          out[t * d + c] += w[t * k + j] * scale[ids[t * k + j]] * x[t * d + c];
  return out;
}

}  // namespace

TEST_CASE("User-defined Gate and ExpertBank classes plug into MoELayer", "[pipeline][extend]") {
  Backend& b = test_backend();
  const std::int64_t E = 4, d = 8, T = 10;
  const std::vector<float> scale{1.0f, 2.0f, -3.0f, 0.5f};
  Tensor x = uniform(b, Shape{T, d}, 400);
  const auto hx = host_f32(b, x);

  SECTION("user gate + user bank, with and without capacity, static and type-erased") {
    for (std::int64_t cap : {0, 3}) {
      const FixedGate gate(E, d, 1, cap);
      const auto ids = gate.ids(T);
      std::vector<double> w;
      for (std::int64_t t = 0; t < T; ++t) w.insert(w.end(), {1.0, 0.25});
      const ref::Dispatch plan = ref::plan(ids, T, 2, E, cap);
      const auto want = scale_reference(hx, ids, w, plan.kept, scale, T, 2, d);
      INFO("capacity " << cap);
      MoELayer layer(gate, ScaleExperts(scale, d));
      Tensor out(b, DType::f32, Shape{T, d});
      RoutingStats s;
      layer.forward(b, x, out, &s);
      check_close(host_f32(b, out), want, 1e-6, 1e-6, "static user layer");
      CHECK(s.tokens_per_expert == plan.counts);
      const DynamicLayer dyn(AnyGate(gate), AnyExpertBank(ScaleExperts(scale, d)));
      CHECK(dyn.num_experts() == E);
      dyn.forward(b, x, out);
      check_close(host_f32(b, out), want, 1e-6, 1e-6, "type-erased user layer");
    }
  }
  SECTION("one expert: the user gate leaves its second slot empty (-1)") {
    MoELayer layer(FixedGate(1, d), ScaleExperts({3.0f}, d));
    Tensor out(b, DType::f32, Shape{T, d});
    layer.forward(b, x, out);
    std::vector<double> want(hx.begin(), hx.end());
    for (double& v : want) v *= 3.0;
    check_close(host_f32(b, out), want, 1e-6, 1e-6, "E=1 user layer");
  }
  SECTION("library gate + user bank") {
    GateOptions o;
    o.top_k = 2;
    GateNetwork gate = GateNetwork::random(b, E, d, o, 401);
    const auto W = host_f32(b, gate.weight());
    MoELayer layer(std::move(gate), ScaleExperts(scale, d));
    Tensor out(b, DType::f32, Shape{T, d});
    layer.forward(b, x, out);
    const Routing r = layer.route(b, x);
    const auto ids = host_i32(b, r.ids);
    const RefRouting rr = reference_routing(o, W, {}, hx, T, E, d);
    const auto w = ref::check_topk(rr.route, ids, host_f32(b, r.weights), rr.p);
    const auto want = scale_reference(hx, ids, w, std::vector<char>(ids.size(), 1), scale, T, 2, d);
    check_close(host_f32(b, out), want, 1e-5, 1e-5, "GateNetwork + user bank");
  }
  SECTION("library gate + library bank behind the type-erased wrappers") {
    GateOptions o;
    o.policy = GatePolicy::sigmoid_group;
    o.top_k = 2;
    o.n_group = 2;
    o.topk_group = 1;
    GateNetwork gate = GateNetwork::random(b, E, d, o, 402, true);
    SwiGluExperts bank = SwiGluExperts::random(b, E, d, 6, 403);
    const auto W = host_f32(b, gate.weight()), bias = host_f32(b, gate.bias());
    const ref::SwiGlu hb = host_bank(b, bank);
    const DynamicLayer dyn(AnyGate(std::move(gate)), AnyExpertBank(std::move(bank)));
    Tensor out(b, DType::f32, Shape{T, d});
    dyn.forward(b, x, out);
    const Routing r = dyn.route(b, x);
    const auto ids = host_i32(b, r.ids);
    const RefRouting rr = reference_routing(o, W, bias, hx, T, E, d);
    const auto M = check_routing(rr, ids, host_f32(b, r.weights), T, E);
    check_close(host_f32(b, out), ref::dense_moe(hb, hx, M, T, E, d), 1e-5, 1e-4, "dynamic layer");
  }
}

namespace {

const std::string kJson = R"({
  "seed": 7, "vocab": 40, "hidden": 16,
  "gate": {"type": "softmax_topk", "num_experts": 8, "top_k": 2},
  "experts": {"type": "swiglu", "ffn": 24},
  "layers": [
    {},
    {"gate": {"type": "expert_choice"}},
    {"gate": {"num_experts": 4, "top_k": 1}, "experts": {"type": "gelu"}},
    {"gate": {"type": "sigmoid_group", "n_group": 4, "topk_group": 2, "top_k": 3,
              "routed_scaling": 2.5, "group_mask": "neg_inf"},
     "shared_expert": {"ffn": 8, "gated": true}},
    {"gate": {"type": "argmax", "capacity_factor": 0.5}}
  ]
})";

std::string replace(std::string s, const std::string& from, const std::string& to) {
  const auto pos = s.find(from);
  REQUIRE(pos != std::string::npos);
  return s.replace(pos, from.size(), to);
}

}  // namespace

TEST_CASE("build_pipeline: JSON description with per-layer overrides", "[pipeline][registry]") {
  Backend& b = test_backend();
  const DynamicPipeline pipe = build_pipeline(b, kJson);
  CHECK(pipe.vocab_size() == 40);
  CHECK(pipe.hidden() == 16);
  REQUIRE(pipe.layers().size() == 5);
  const std::int64_t want_E[5] = {8, 8, 4, 8, 8}, want_slots[5] = {2, 8, 1, 3, 1};
  std::vector<std::int32_t> tokens(24);
  for (std::size_t i = 0; i < tokens.size(); ++i)
    tokens[i] = static_cast<std::int32_t>((i * 13) % 40);
  const PipelineResult res = pipe.forward(b, tokens, true);
  REQUIRE(res.layers.size() == 5);
  for (int l = 0; l < 5; ++l) {
    INFO("layer " << l);
    CHECK(pipe.layers()[l].num_experts() == want_E[l]);
    CHECK(pipe.layers()[l].hidden() == 16);
    CHECK(res.layers[l].slots == want_slots[l]);
    for (std::int32_t e : res.layers[l].ids) CHECK((e >= -1 && e < want_E[l]));
  }
  // Layer 4: argmax, capacity ceil(0.5 * 24 * 1 / 8) = 2 rows per expert.
  for (std::int32_t n : res.layers[4].stats.tokens_per_expert) CHECK(n <= 2);
  CHECK(res.layers[4].stats.assignments == 24);
  CHECK(std::accumulate(res.layers[4].stats.tokens_per_expert.begin(),
                        res.layers[4].stats.tokens_per_expert.end(),
                        0) == 24 - res.layers[4].stats.dropped);
  CHECK(res.layers[4].stats.dropped >= 24 - 2 * 8);
  for (float w : res.layers[4].weights) CHECK(w == 1.0f);
  // Layer 3: sigmoid with routed scaling 2.5 and renormalisation: each token's weights sum to 2.5.
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const float* w = res.layers[3].weights.data() + t * 3;
    CHECK(w[0] + w[1] + w[2] == Approx(2.5).epsilon(1e-5));
  }
  const auto logits = host_f32(b, res.logits);
  CHECK(std::all_of(logits.begin(), logits.end(), [](float v) { return std::isfinite(v); }));

  SECTION("deterministic in the seed") {
    check_bitwise(host_f32(b, build_pipeline(b, kJson).forward(b, tokens).logits), logits,
                  "same seed");
    CHECK(host_f32(b, build_pipeline(b, replace(kJson, "\"seed\": 7", "\"seed\": 8"))
                          .forward(b, tokens)
                          .logits) != logits);
  }
  SECTION("num_layers without a layers array") {
    const DynamicPipeline p3 = build_pipeline(
        b,
        R"({"vocab": 10, "hidden": 8, "num_layers": 3, "gate": {"type": "noisy_topk", "num_experts": 4},
              "experts": {"type": "swiglu"}})");
    CHECK(p3.layers().size() == 3);
    CHECK(p3.forward(b, std::vector<std::int32_t>{1, 2, 3}).logits.shape() == Shape{3, 10});
  }
}

TEST_CASE("build_pipeline rejects malformed descriptions and unknown names",
          "[pipeline][registry][errors]") {
  Backend& b = test_backend();
  const std::string base =
      R"({"vocab": 40, "hidden": 16, "gate": {"type": "softmax_topk", "num_experts": 8}, "experts": {"type": "swiglu", "ffn": 8}})";
  REQUIRE_ERROR(build_pipeline(b, R"({"vocab": 40,)"), io, "[build_pipeline]", "malformed JSON");
  REQUIRE_ERROR(build_pipeline(b, "[1, 2]"), invalid_argument, "[build_pipeline]",
                "must be a JSON object");
  REQUIRE_ERROR(build_pipeline(b, replace(base, R"("vocab": 40, )", "")), invalid_argument,
                "[build_pipeline]", "missing key 'vocab'");
  REQUIRE_ERROR(build_pipeline(b, replace(base, R"("hidden": 16)", R"("hidden": -3)")),
                invalid_argument, "[build_pipeline]", "'hidden'=-3 must be a positive integer");
  REQUIRE_ERROR(build_pipeline(b, replace(base, R"("hidden": 16)", R"("hidden": "16")")),
                invalid_argument, "[build_pipeline]", "'hidden'=\"16\" must be a positive integer");
  REQUIRE_ERROR(build_pipeline(b, replace(base, R"("num_experts": 8)", R"("top_k": 2)")),
                invalid_argument, "[build_pipeline]", "missing key 'num_experts'");
  REQUIRE_ERROR(build_pipeline(b, replace(base, R"("type": "softmax_topk", )", "")),
                invalid_argument, "[build_pipeline]", "layers[0].gate.type is missing");
  REQUIRE_ERROR(build_pipeline(b, replace(base, "}}", R"(}, "layers": {}})")), invalid_argument,
                "[build_pipeline]", "'layers' must be an array");

  SECTION("unknown component names list the registered ones") {
    REQUIRE_ERROR(build_pipeline(b, replace(base, "softmax_topk", "bogus")), not_found,
                  "[Registry::make_gate]",
                  "unknown gate 'bogus'; registered: argmax, expert_choice, noisy_topk, "
                  "sigmoid_group, softmax_topk");
    REQUIRE_ERROR(build_pipeline(b, replace(base, "swiglu", "mlp")), not_found,
                  "[Registry::make_experts]",
                  "unknown expert bank 'mlp'; registered: gelu, swiglu");
  }
  SECTION("bad component arguments name the layer, key and value") {
    REQUIRE_ERROR(
        build_pipeline(b,
                       replace(base, R"("num_experts": 8)", R"("num_experts": 8, "top_k": "two")")),
        invalid_argument, "[ComponentArgs]", "layers[0].gate.top_k='two' is not an integer");
    REQUIRE_ERROR(
        build_pipeline(b, replace(base, R"("num_experts": 8)", R"("num_experts": 8, "top_k": 9)")),
        invalid_argument, "[GateNetwork]", "top_k=9 outside [1, num_experts=8]");
    REQUIRE_ERROR(build_pipeline(b, replace(base, R"("num_experts": 8)",
                                            R"("num_experts": 8, "capacity_factor": 0)")),
                  invalid_argument, "[GateNetwork]", "capacity_factor=0 must be > 0");
    REQUIRE_ERROR(build_pipeline(b, replace(base, R"("num_experts": 8)",
                                            R"("num_experts": 8, "capacity_factor": -0.5)")),
                  invalid_argument, "[GateNetwork]", "capacity_factor=-0.5 must be > 0");
    REQUIRE_ERROR(
        build_pipeline(
            b, replace(base, R"("num_experts": 8)", R"("num_experts": 8, "group_mask": "foo")")),
        invalid_argument, "[Registry]", "layers[0].gate.group_mask='foo' must be zero or neg_inf");
    REQUIRE_ERROR(build_pipeline(b, replace(base, R"("num_experts": 8)",
                                            R"("num_experts": 8, "renormalize": "yes")")),
                  invalid_argument, "[ComponentArgs]",
                  "layers[0].gate.renormalize='yes' is not true or false");
    REQUIRE_ERROR(build_pipeline(
                      b, replace(base, R"("num_experts": 8)", R"("num_experts": 8, "top_k": [1])")),
                  invalid_argument, "[build_pipeline]",
                  "layers[0].gate.top_k must be a number, bool or string");
    const std::string layered =
        replace(base, "}}", R"(}, "layers": [{}, {"gate": {"top_k": "x"}}]})");
    REQUIRE_ERROR(build_pipeline(b, layered), invalid_argument, "[ComponentArgs]",
                  "layers[1].gate.top_k='x'");
  }
}

namespace {

struct Recorded {
  std::string kind, where;
  std::int64_t hidden = 0, experts = 0;
  std::uint64_t seed = 0;
  std::map<std::string, std::string, std::less<>> args;
};

}  // namespace

TEST_CASE("Registry: user factories receive the merged arguments and context",
          "[pipeline][registry][extend]") {
  Backend& b = test_backend();
  auto log = std::make_shared<std::vector<Recorded>>();
  Registry reg;  // a private registry: the global one is left alone
  CHECK(reg.gate_names().empty());
  reg.add_gate("fixed", [log](const BuildContext& ctx, const ComponentArgs& a) -> AnyGate {
    log->push_back({"gate", a.where(), ctx.hidden, ctx.num_experts, ctx.seed, a.values()});
    return FixedGate(ctx.num_experts, ctx.hidden, a.get_int("shift", 0));
  });
  reg.add_experts("scale", [log](const BuildContext& ctx, const ComponentArgs& a) -> AnyExpertBank {
    log->push_back({"experts", a.where(), ctx.hidden, ctx.num_experts, ctx.seed, a.values()});
    return ScaleExperts(std::vector<float>(static_cast<std::size_t>(ctx.num_experts),
                                           static_cast<float>(a.get_float("scale", 1.0))),
                        ctx.hidden);
  });
  CHECK(reg.gate_names() == std::vector<std::string>{"fixed"});
  CHECK(reg.expert_names() == std::vector<std::string>{"scale"});

  const DynamicPipeline pipe = build_pipeline(b, R"({
    "seed": 5, "vocab": 30, "hidden": 8,
    "gate": {"type": "fixed", "num_experts": 4, "shift": 1},
    "experts": {"type": "scale", "scale": 0.5},
    "layers": [{}, {"gate": {"num_experts": 2, "extra": "x"}}, {"experts": {"scale": 2}}]})",
                                              reg);
  REQUIRE(log->size() == 6);
  const auto& r = *log;
  CHECK(r[0].kind == "gate");
  CHECK(r[0].where == "layers[0].gate");
  CHECK(r[0].hidden == 8);
  CHECK(r[0].experts == 4);
  CHECK(r[0].args.at("type") == "fixed");
  CHECK(r[0].args.at("shift") == "1");
  CHECK(r[1].kind == "experts");
  CHECK(r[1].where == "layers[0].experts");
  CHECK(r[1].args.at("scale") == "0.5");
  CHECK(r[2].where == "layers[1].gate");
  CHECK(r[2].experts == 2);             // override
  CHECK(r[2].args.at("extra") == "x");  // override key
  CHECK(r[2].args.at("shift") == "1");  // inherited key
  CHECK(r[3].experts == 2);             // the bank follows the layer's gate
  CHECK(r[5].where == "layers[2].experts");
  CHECK(r[5].args.at("scale") == "2");
  std::set<std::uint64_t> seeds;
  for (const auto& x : r) seeds.insert(x.seed);
  CHECK(seeds.size() == 6);  // every component draws from its own seed

  const std::vector<std::int32_t> tokens{1, 2, 3, 4, 5};
  const PipelineResult res = pipe.forward(b, tokens, true);
  REQUIRE(res.layers.size() == 3);
  CHECK(res.layers[0].ids == FixedGate(4, 8, 1).ids(5));
  CHECK(res.layers[1].ids == FixedGate(2, 8, 1).ids(5));

  REQUIRE_ERROR(reg.add_gate("empty", GateFactory{}), invalid_argument, "[Registry::add_gate]",
                "empty factory for 'empty'");
  REQUIRE_ERROR(reg.add_experts("empty", ExpertFactory{}), invalid_argument,
                "[Registry::add_experts]");
  const BuildContext ctx{b, 8, 4, 1};
  REQUIRE_ERROR(reg.make_gate("softmax_topk", ctx, ComponentArgs("g")), not_found,
                "[Registry::make_gate]", "unknown gate 'softmax_topk'; registered: fixed");
}

TEST_CASE("Registry::global lists the built-in components", "[pipeline][registry]") {
  const auto gates = Registry::global().gate_names();
  for (const char* g : {"argmax", "softmax_topk", "sigmoid_group", "noisy_topk", "expert_choice"})
    CHECK(std::find(gates.begin(), gates.end(), g) != gates.end());
  CHECK(std::is_sorted(gates.begin(), gates.end()));
  const auto experts = Registry::global().expert_names();
  for (const char* e : {"swiglu", "gelu"})
    CHECK(std::find(experts.begin(), experts.end(), e) != experts.end());
}
