// SPDX-License-Identifier: Apache-2.0
// quant_eval: how close an int8 model stays to its f32 original on token sequences you give it,
// round-to-nearest against GPTQ calibrated on other sequences.
//
//   quant_eval --model DIR --eval EVAL.txt [--calibrate CAL.txt] [--scheme int8_g32]
//
// Each file holds one token-id sequence per line (ids separated by spaces or commas). Reported
// per variant: the share of (MoE layer, token) whose top-k expert set equals f32's, per layer
// and overall; the mean KL divergence of next-token distributions f32 || int8; the relative L2
// error of each decoder layer's output (the residual stream).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "autoglm/autoglm.hpp"

namespace {

struct Args {
  std::string model, eval, calibrate;
  std::string scheme = "int8";
  std::string activations = "weight_only";
  std::string parts = "experts,attention,dense";
  std::string search_scales = "on";
  int threads = 0;
  double damping = 0.01;
};

[[noreturn]] void bad(const std::string& msg) {
  throw autoglm::Error(autoglm::ErrorCode::invalid_argument, "quant_eval", msg);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--help" || f == "-h") {
      std::puts(
          "usage: quant_eval --model DIR --eval FILE [--calibrate FILE] [--scheme "
          "int8|int8_g32|int8_g64|int8_g128]\n"
          "                  [--activations weight_only|w8a8] [--parts LIST] [--threads T] "
          "[--damping X]\n"
          "                  [--search-scales on|off]\n"
          "FILE: one sequence of token ids per line. --calibrate adds a GPTQ variant calibrated\n"
          "on that file's sequences. --parts: comma list of experts, attention, dense, head,\n"
          "embeddings, router. --search-scales off: each group's scale is max|w| / 127 (on: the\n"
          "candidate within +-10 % with the least rounding error).");
      std::exit(0);
    }
    if (i + 1 >= argc) bad(f + " needs a value (or is unknown); see --help");
    const std::string v = argv[++i];
    if (f == "--model")
      a.model = v;
    else if (f == "--eval")
      a.eval = v;
    else if (f == "--calibrate")
      a.calibrate = v;
    else if (f == "--scheme")
      a.scheme = v;
    else if (f == "--activations")
      a.activations = v;
    else if (f == "--parts")
      a.parts = v;
    else if (f == "--threads")
      a.threads = std::stoi(v);
    else if (f == "--search-scales")
      a.search_scales = v;
    else if (f == "--damping")
      a.damping = std::stod(v);
    else
      bad("unknown flag " + f + "; see --help");
  }
  if (a.model.empty() || a.eval.empty()) bad("--model DIR and --eval FILE are required");
  if (a.search_scales != "on" && a.search_scales != "off")
    bad("--search-scales " + a.search_scales + " must be on or off");
  return a;
}

/// What one model gives over the evaluation sequences.
struct Run {
  std::vector<std::vector<float>> logits;                       // per sequence [T, V]
  std::vector<std::vector<std::vector<std::int32_t>>> routing;  // per sequence, MoE layer
  std::vector<std::vector<std::vector<float>>> hidden;          // per sequence, layer
};

Run run(const autoglm::Model& m, const std::vector<std::vector<std::int32_t>>& seqs) {
  Run r;
  for (const auto& seq : seqs) {
    autoglm::Session s(m, autoglm::SessionOptions{static_cast<std::int64_t>(seq.size())});
    std::vector<std::vector<std::int32_t>> routes;
    std::vector<std::vector<float>> hidden;
    s.set_routing_observer(
        [&](std::int64_t, const autoglm::RoutingStats& st) { routes.push_back(st.expert_ids); });
    s.set_layer_observer([&](std::int64_t, autoglm::TensorView x) {
      std::vector<float> h(static_cast<std::size_t>(x.numel()));
      m.backend().copy_to_host(h.data(), x);
      hidden.push_back(std::move(h));
    });
    const autoglm::Tensor logits = s.prefill(seq, /*all_logits=*/true);
    std::vector<float> l(static_cast<std::size_t>(logits.numel()));
    m.backend().copy_to_host(l.data(), logits);
    r.logits.push_back(std::move(l));
    r.routing.push_back(std::move(routes));
    r.hidden.push_back(std::move(hidden));
  }
  return r;
}

void report(const std::string& name, const Run& ref, const Run& got,
            const std::vector<std::vector<std::int32_t>>& seqs, std::int64_t V, double seconds) {
  const std::size_t moe_layers = ref.routing.front().size(), layers = ref.hidden.front().size();
  std::vector<std::int64_t> same(moe_layers, 0), total(moe_layers, 0);
  std::vector<double> num(layers, 0.0), den(layers, 0.0);
  double kl = 0.0;
  std::int64_t positions = 0;
  for (std::size_t s = 0; s < seqs.size(); ++s) {
    const auto T = static_cast<std::int64_t>(seqs[s].size());
    for (std::size_t l = 0; l < moe_layers; ++l) {
      const std::int64_t k = static_cast<std::int64_t>(ref.routing[s][l].size()) / T;
      for (std::int64_t t = 0; t < T; ++t) {
        std::vector<std::int32_t> a(ref.routing[s][l].begin() + t * k,
                                    ref.routing[s][l].begin() + (t + 1) * k);
        std::vector<std::int32_t> b(got.routing[s][l].begin() + t * k,
                                    got.routing[s][l].begin() + (t + 1) * k);
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        same[l] += a == b;
        ++total[l];
      }
    }
    for (std::size_t l = 0; l < layers; ++l)
      for (std::size_t i = 0; i < ref.hidden[s][l].size(); ++i) {
        const double d = static_cast<double>(got.hidden[s][l][i]) - ref.hidden[s][l][i];
        num[l] += d * d;
        den[l] += static_cast<double>(ref.hidden[s][l][i]) * ref.hidden[s][l][i];
      }
    for (std::int64_t t = 0; t < T; ++t) {
      const float* p = ref.logits[s].data() + t * V;
      const float* q = got.logits[s].data() + t * V;
      const auto lse = [&](const float* x) {
        const double mx = *std::max_element(x, x + V);
        double sum = 0.0;
        for (std::int64_t v = 0; v < V; ++v) sum += std::exp(x[v] - mx);
        return mx + std::log(sum);
      };
      const double lp = lse(p), lq = lse(q);
      for (std::int64_t v = 0; v < V; ++v) kl += std::exp(p[v] - lp) * ((p[v] - lp) - (q[v] - lq));
      ++positions;
    }
  }
  std::int64_t all_same = 0, all = 0;
  std::string per_layer, errs;
  for (std::size_t l = 0; l < moe_layers; ++l) {
    all_same += same[l];
    all += total[l];
    per_layer += fmt::format("{}{:.2f}", l ? " / " : "",
                             100.0 * static_cast<double>(same[l]) / static_cast<double>(total[l]));
  }
  for (std::size_t l = 0; l < layers; ++l)
    errs += fmt::format("{}{:.3f}", l ? " / " : "",
                        den[l] > 0.0 ? 100.0 * std::sqrt(num[l] / den[l]) : 0.0);
  fmt::print(
      "{:<12} top-k sets equal {:.2f} % (per MoE layer {}); mean KL {:.3g}; layer outputs' "
      "relative L2 error {} %; quantized in {:.1f} s\n",
      name, all ? 100.0 * static_cast<double>(all_same) / static_cast<double>(all) : 100.0,
      moe_layers ? per_layer : std::string("no MoE layers"), kl / static_cast<double>(positions),
      errs, seconds);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    autoglm::CpuBackend backend(autoglm::CpuBackendOptions{.threads = a.threads});
    autoglm::LoadOptions lo;
    lo.weights = autoglm::WeightStorage::f32;
    const autoglm::Model f32 = autoglm::load_model(backend, a.model, lo);
    const auto eval = autoglm::Calibration::read_sequences(a.eval);
    autoglm::QuantConfig qc;
    qc.spec = autoglm::QuantSpec::parse(a.scheme, a.activations);
    qc.set_parts(a.parts);
    qc.spec.search_scales = a.search_scales == "on";
    fmt::print(
        "{}: {} layers, {} evaluation sequences ({} tokens); {} {}\n", a.model, f32.num_layers(),
        eval.size(),
        [&] {
          std::size_t n = 0;
          for (const auto& s : eval) n += s.size();
          return n;
        }(),
        qc.spec.scheme_name(), qc.spec.mode_name());
    const Run ref = run(f32, eval);
    using clock = std::chrono::steady_clock;
    auto t0 = clock::now();
    const autoglm::Model rtn = autoglm::quantize_model(f32, qc);
    const double rtn_s = std::chrono::duration<double>(clock::now() - t0).count();
    report("int8 RTN", ref, run(rtn, eval), eval, f32.vocab_size(), rtn_s);
    if (!a.calibrate.empty()) {
      autoglm::Calibration cal;
      cal.sequences = autoglm::Calibration::read_sequences(a.calibrate);
      cal.gptq.damping = a.damping;
      t0 = clock::now();
      const autoglm::Model gptq = autoglm::quantize_model(f32, qc, cal);
      const double gptq_s = std::chrono::duration<double>(clock::now() - t0).count();
      report("int8 GPTQ", ref, run(gptq, eval), eval, f32.vocab_size(), gptq_s);
    }
    return 0;
  } catch (const autoglm::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
