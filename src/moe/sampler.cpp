// SPDX-License-Identifier: Apache-2.0
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "autoglm/moe/decoder.hpp"

namespace autoglm {

Sampler::Sampler(SamplingOptions options) : options_(options), rng_(options.seed) {
  constexpr std::string_view fn = "Sampler";
  AUTOGLM_CHECK(options_.temperature >= 0.0f && std::isfinite(options_.temperature),
                invalid_argument, fn, "temperature={} must be >= 0", options_.temperature);
  AUTOGLM_CHECK(options_.top_k >= 0, invalid_argument, fn, "top_k={} must be >= 0",
                options_.top_k);
  AUTOGLM_CHECK(options_.top_p > 0.0f && options_.top_p <= 1.0f, invalid_argument, fn,
                "top_p={} must be in (0, 1]", options_.top_p);
}

std::int32_t Sampler::sample(std::span<const float> logits) {
  constexpr std::string_view fn = "Sampler::sample";
  AUTOGLM_CHECK(!logits.empty(), invalid_argument, fn, "empty logits");
  for (std::size_t i = 0; i < logits.size(); ++i)
    AUTOGLM_CHECK(!std::isnan(logits[i]), numeric, fn, "logit {} is NaN", i);
  const auto n = static_cast<std::int32_t>(logits.size());
  if (options_.temperature == 0.0f)
    return static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) -
                                     logits.begin());
  // Candidates by descending logit (ties: lower id first), truncated by top-k then top-p.
  std::vector<std::int32_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int32_t a, std::int32_t b) { return logits[a] > logits[b]; });
  // An infinite logit takes all the probability (exp(inf - inf) would poison the sums below).
  if (logits[order[0]] == std::numeric_limits<float>::infinity()) return order[0];
  std::size_t keep = order.size();
  if (options_.top_k > 0) keep = std::min<std::size_t>(keep, static_cast<std::size_t>(options_.top_k));
  std::vector<double> p(keep);
  const double mx = logits[order[0]];
  double sum = 0.0;
  for (std::size_t i = 0; i < keep; ++i)
    sum += p[i] = std::exp((logits[order[i]] - mx) / options_.temperature);
  if (options_.top_p < 1.0f) {
    double acc = 0.0;
    std::size_t cut = keep;
    for (std::size_t i = 0; i < keep; ++i) {
      acc += p[i] / sum;
      if (acc >= options_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    p.resize(keep);
    sum = std::accumulate(p.begin(), p.end(), 0.0);
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  double r = u(rng_);
  for (std::size_t i = 0; i < keep; ++i) {
    r -= p[i];
    if (r < 0.0) return order[i];
  }
  return order[keep - 1];
}

}  // namespace autoglm
