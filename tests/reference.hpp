// SPDX-License-Identifier: Apache-2.0
// Naive scalar references in double precision, written from the documented semantics
// (include/autoglm/**, ../shared/research/moe-semantics.md §1), never calling the library.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "support.hpp"

namespace agt::ref {

inline double sigmoid(double v) {
  return 1.0 / (1.0 + std::exp(-v));
}
inline double silu(double v) {
  return v / (1.0 + std::exp(-v));
}
inline double gelu(double v) {
  return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
}

/// C[m, n] = sum_k A[m, k] * B[n, k] (weights stored [out, in]).
template <typename TA, typename TB>
std::vector<double> matmul_nt(const std::vector<TA>& A, const std::vector<TB>& B, std::int64_t M,
                              std::int64_t N, std::int64_t K) {
  std::vector<double> C(static_cast<std::size_t>(M * N), 0.0);
  for (std::int64_t m = 0; m < M; ++m)
    for (std::int64_t n = 0; n < N; ++n) {
      double s = 0.0;
      for (std::int64_t k = 0; k < K; ++k)
        s += static_cast<double>(A[m * K + k]) * static_cast<double>(B[n * K + k]);
      C[m * N + n] = s;
    }
  return C;
}

/// Grouped X [R, K] * W[e]^T for W [E, N, K]: rows off[e] ... off[e + 1] - 1 use expert e;
/// rows outside every group stay `fill`.
template <typename TX, typename TW>
std::vector<double> grouped_matmul_nt(const std::vector<TX>& X, const std::vector<TW>& W,
                                      const std::vector<std::int32_t>& off, std::int64_t R,
                                      std::int64_t N, std::int64_t K, double fill = 0.0) {
  std::vector<double> out(static_cast<std::size_t>(R * N), fill);
  const auto E = static_cast<std::int64_t>(off.size()) - 1;
  for (std::int64_t e = 0; e < E; ++e)
    for (std::int64_t r = off[e]; r < off[e + 1]; ++r)
      for (std::int64_t n = 0; n < N; ++n) {
        double s = 0.0;
        for (std::int64_t k = 0; k < K; ++k)
          s += static_cast<double>(X[r * K + k]) * static_cast<double>(W[(e * N + n) * K + k]);
        out[r * N + n] = s;
      }
  return out;
}

/// x * rsqrt(mean(x^2) + eps) * w (w may be null: unit weight).
template <typename TX>
std::vector<double> rms_norm_row(const TX* x, std::int64_t d, const float* w, double eps) {
  double ss = 0.0;
  for (std::int64_t c = 0; c < d; ++c) ss += static_cast<double>(x[c]) * static_cast<double>(x[c]);
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + eps);
  std::vector<double> o(static_cast<std::size_t>(d));
  for (std::int64_t c = 0; c < d; ++c) o[c] = static_cast<double>(x[c]) * inv * (w ? w[c] : 1.0);
  return o;
}

/// Indices sorted by value descending, ties to the lower index.
inline std::vector<std::int32_t> order_desc(const double* v, std::int64_t n) {
  std::vector<std::int32_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(),
                   [&](std::int32_t a, std::int32_t b) { return v[a] > v[b]; });
  return idx;
}

/// A reference routing.
struct Route {
  std::int64_t T = 0, E = 0, slots = 0;
  std::vector<double> score;      ///< [T, E] softmax probability or sigmoid score
  std::vector<double> sel;        ///< [T, E] selection value (score + bias, group-masked)
  std::vector<std::int32_t> ids;  ///< [T, slots]
  std::vector<double> weights;    ///< [T, slots]
  std::vector<double> stats;      ///< [E + 1]
};

/// Weights of a top-k selection: the unbiased scores, divided by (their sum + eps) when
/// renormalising, times routed_scaling. Also applied to the library's selection where it
/// legitimately differs from the reference's at a near-tie.
inline std::vector<double> weights_for(const Route& r, const std::vector<std::int32_t>& ids,
                                       const RouteParams& p) {
  const std::int64_t k = r.slots;
  std::vector<double> w(ids.size(), 0.0);
  for (std::int64_t t = 0; t < r.T; ++t) {
    double wsum = 0.0;
    for (std::int64_t j = 0; j < k; ++j) wsum += r.score[t * r.E + ids[t * k + j]];
    for (std::int64_t j = 0; j < k; ++j) {
      double v = r.score[t * r.E + ids[t * k + j]];
      if (p.renormalize) v /= wsum + p.renorm_epsilon;
      w[t * k + j] = v * p.routed_scaling;
    }
  }
  return w;
}

/// Token-choice routing exactly as documented: noise on logits, softmax or sigmoid, the
/// selection bias used only for choice, group score = sum of the group's top two selection
/// values, discarded groups filled with 0 or -inf, top-k, weights from the unbiased scores,
/// renormalised by (sum + eps), times routed_scaling. stats: per-expert sum of the row-normalised
/// score, then sum of logsumexp(logits)^2.
inline Route route_topk(const std::vector<double>& logits, std::int64_t T, std::int64_t E,
                        const std::vector<float>& bias, const RouteParams& p,
                        const std::vector<double>& noise = {}) {
  Route r;
  r.T = T;
  r.E = E;
  r.slots = p.top_k;
  r.score.assign(static_cast<std::size_t>(T * E), 0.0);
  r.sel.assign(static_cast<std::size_t>(T * E), 0.0);
  r.ids.assign(static_cast<std::size_t>(T * p.top_k), -1);
  r.weights.assign(static_cast<std::size_t>(T * p.top_k), 0.0);
  r.stats.assign(static_cast<std::size_t>(E + 1), 0.0);
  const std::int64_t gsize = E / p.n_group;
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<double> l(static_cast<std::size_t>(E));
    for (std::int64_t e = 0; e < E; ++e)
      l[e] = logits[t * E + e] + (noise.empty() ? 0.0 : p.noise_std * noise[t * E + e]);
    const double mx = *std::max_element(l.begin(), l.end());
    double se = 0.0;
    for (double v : l) se += std::exp(v - mx);
    const double lse = mx + std::log(se);
    double* s = r.score.data() + t * E;
    double ssum = 0.0;
    for (std::int64_t e = 0; e < E; ++e) {
      s[e] = p.score == ScoreFunc::softmax ? std::exp(l[e] - lse) : sigmoid(l[e]);
      ssum += s[e];
    }
    for (std::int64_t e = 0; e < E; ++e) r.stats[e] += s[e] / ssum;
    r.stats[E] += lse * lse;
    double* sel = r.sel.data() + t * E;
    for (std::int64_t e = 0; e < E; ++e) sel[e] = s[e] + (bias.empty() ? 0.0 : bias[e]);
    if (p.n_group > 1) {
      std::vector<double> gs(static_cast<std::size_t>(p.n_group));
      for (int g = 0; g < p.n_group; ++g) {
        std::vector<double> v(sel + g * gsize, sel + (g + 1) * gsize);
        std::sort(v.begin(), v.end(), std::greater<>());
        gs[g] = v[0] + (gsize >= 2 ? v[1] : 0.0);
      }
      const auto gorder = order_desc(gs.data(), p.n_group);
      std::vector<bool> keep(static_cast<std::size_t>(p.n_group), false);
      for (int i = 0; i < p.topk_group; ++i) keep[gorder[i]] = true;
      const double fill =
          p.group_mask == GroupMask::zero ? 0.0 : -std::numeric_limits<double>::infinity();
      for (int g = 0; g < p.n_group; ++g)
        if (!keep[g])
          for (std::int64_t j = 0; j < gsize; ++j) sel[g * gsize + j] = fill;
    }
    const auto order = order_desc(sel, E);
    for (int j = 0; j < p.top_k; ++j) r.ids[t * p.top_k + j] = order[j];
  }
  r.weights = weights_for(r, r.ids, p);
  return r;
}

/// Expert choice: expert e takes the min(capacity, T) tokens of highest softmax probability
/// (ties to the earlier token); token t's slots list the experts that took it in expert order,
/// then -1 with weight 0; the weight is the softmax probability.
inline Route expert_choice(const std::vector<double>& logits, std::int64_t T, std::int64_t E,
                           std::int64_t capacity) {
  RouteParams sp;
  sp.top_k = 1;
  Route r = route_topk(logits, T, E, {}, sp);  // for score (softmax) and stats
  r.slots = E;
  r.ids.assign(static_cast<std::size_t>(T * E), -1);
  r.weights.assign(static_cast<std::size_t>(T * E), 0.0);
  const std::int64_t C = std::min(capacity, T);
  std::vector<std::int64_t> fill(static_cast<std::size_t>(T), 0);
  for (std::int64_t e = 0; e < E; ++e) {
    std::vector<double> col(static_cast<std::size_t>(T));
    for (std::int64_t t = 0; t < T; ++t) col[t] = r.score[t * E + e];
    const auto order = order_desc(col.data(), T);
    for (std::int64_t c = 0; c < C; ++c) {
      const std::int32_t t = order[c];
      r.ids[t * E + fill[t]] = static_cast<std::int32_t>(e);
      r.weights[t * E + fill[t]] = r.score[t * E + e];
      ++fill[t];
    }
  }
  return r;
}

/// Capacity planning: slot-major priority (every first choice before any second choice),
/// earlier tokens first within a slot; capacity <= 0 means unlimited.
struct Dispatch {
  std::vector<std::int32_t> counts;  ///< [E]
  std::vector<char> kept;            ///< [T * k] 1 when the slot got a row
  std::int64_t rows = 0;
};

inline Dispatch plan(const std::vector<std::int32_t>& ids, std::int64_t T, std::int64_t k,
                     std::int64_t E, std::int64_t capacity) {
  Dispatch d;
  d.counts.assign(static_cast<std::size_t>(E), 0);
  d.kept.assign(static_cast<std::size_t>(T * k), 0);
  for (std::int64_t j = 0; j < k; ++j)
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int32_t e = ids[t * k + j];
      if (e < 0) continue;
      if (capacity > 0 && d.counts[e] >= capacity) continue;
      ++d.counts[e];
      d.kept[t * k + j] = 1;
      ++d.rows;
    }
  return d;
}

/// Host copy of a SwiGLU bank: gate_up [E, 2F, d] (gate rows first), down [E, d, F].
struct SwiGlu {
  std::int64_t E = 0, F = 0, d = 0;
  std::vector<float> gate_up, down;
  template <typename TX>
  std::vector<double> operator()(std::int64_t e, const TX* x) const {
    const float* gu = gate_up.data() + e * 2 * F * d;
    const float* dn = down.data() + e * d * F;
    std::vector<double> a(static_cast<std::size_t>(F));
    for (std::int64_t f = 0; f < F; ++f) {
      double g = 0.0, u = 0.0;
      for (std::int64_t c = 0; c < d; ++c) {
        g += static_cast<double>(gu[f * d + c]) * static_cast<double>(x[c]);
        u += static_cast<double>(gu[(F + f) * d + c]) * static_cast<double>(x[c]);
      }
      a[f] = silu(g) * u;
    }
    std::vector<double> y(static_cast<std::size_t>(d), 0.0);
    for (std::int64_t c = 0; c < d; ++c)
      for (std::int64_t f = 0; f < F; ++f) y[c] += static_cast<double>(dn[c * F + f]) * a[f];
    return y;
  }
};

/// Host copy of a GELU bank: w1 [E, F, d], w2 [E, d, F].
struct GeluMlp {
  std::int64_t E = 0, F = 0, d = 0;
  std::vector<float> w1, w2;
  template <typename TX>
  std::vector<double> operator()(std::int64_t e, const TX* x) const {
    const float* a1 = w1.data() + e * F * d;
    const float* a2 = w2.data() + e * d * F;
    std::vector<double> h(static_cast<std::size_t>(F));
    for (std::int64_t f = 0; f < F; ++f) {
      double s = 0.0;
      for (std::int64_t c = 0; c < d; ++c)
        s += static_cast<double>(a1[f * d + c]) * static_cast<double>(x[c]);
      h[f] = gelu(s);
    }
    std::vector<double> y(static_cast<std::size_t>(d), 0.0);
    for (std::int64_t c = 0; c < d; ++c)
      for (std::int64_t f = 0; f < F; ++f) y[c] += static_cast<double>(a2[c * F + f]) * h[f];
    return y;
  }
};

/// Checks a library token-choice routing against the reference. A slot may name another expert
/// than the reference only when both have selection values within `tie` (a float/double
/// near-tie). Returns the reference weights of the library's selection.
inline std::vector<double> check_topk(const Route& r, const std::vector<std::int32_t>& ids,
                                      const std::vector<float>& weights, const RouteParams& p,
                                      double wtol = 2e-5, double tie = 2e-5) {
  REQUIRE(ids.size() == r.ids.size());
  REQUIRE(weights.size() == r.ids.size());
  const std::int64_t k = r.slots;
  std::size_t bad = 0;
  std::string first;
  for (std::int64_t t = 0; t < r.T; ++t) {
    std::vector<bool> seen(static_cast<std::size_t>(r.E), false);
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t e = ids[t * k + j], re = r.ids[t * k + j];
      std::string why;
      if (e < 0 || e >= r.E) {
        why = "id out of range";
      } else if (seen[e]) {
        why = "expert chosen twice";
      } else if (e != re && !(std::abs(r.sel[t * r.E + e] - r.sel[t * r.E + re]) <= tie)) {
        why = "expert differs from reference " + std::to_string(re);
      }
      if (e >= 0 && e < r.E) seen[e] = true;
      if (!why.empty() && bad++ == 0)
        first = "token " + std::to_string(t) + " slot " + std::to_string(j) + " expert " +
                std::to_string(e) + ": " + why;
    }
  }
  INFO("routing: " << bad << " bad slots; first: " << first);
  CHECK(bad == 0);
  const auto w = weights_for(r, ids, p);
  check_close(weights, w, wtol, wtol, "routing weights");
  return w;
}

/// Checks a library expert-choice routing: slots in expert order then -1 / 0; each expert's
/// token set equals the reference's up to near-ties of probability; weights are probabilities.
inline void check_expert_choice(const Route& r, const std::vector<std::int32_t>& ids,
                                const std::vector<float>& weights, double tie = 1e-6) {
  REQUIRE(ids.size() == r.ids.size());
  const std::int64_t T = r.T, E = r.E;
  std::vector<std::vector<char>> lib(static_cast<std::size_t>(E),
                                     std::vector<char>(static_cast<std::size_t>(T), 0));
  std::vector<std::vector<char>> want = lib;
  std::size_t bad_layout = 0;
  std::vector<double> wref(ids.size(), 0.0);
  for (std::int64_t t = 0; t < T; ++t) {
    std::int32_t prev = -1;
    bool ended = false;
    for (std::int64_t j = 0; j < E; ++j) {
      const std::int32_t e = ids[t * E + j];
      if (e < 0) {
        ended = true;
        if (weights[t * E + j] != 0.0f) ++bad_layout;
        continue;
      }
      if (ended || e <= prev || e >= E) {
        ++bad_layout;
        continue;
      }
      prev = e;
      lib[e][t] = 1;
      wref[t * E + j] = r.score[t * E + e];
    }
    for (std::int64_t j = 0; j < E; ++j)
      if (r.ids[t * E + j] >= 0) want[r.ids[t * E + j]][t] = 1;
  }
  CHECK(bad_layout == 0);
  for (std::int64_t e = 0; e < E; ++e) {
    double min_in = std::numeric_limits<double>::infinity();
    double max_out = -min_in;
    std::int64_t n_lib = 0, n_ref = 0, diff = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      n_lib += lib[e][t];
      n_ref += want[e][t];
      if (lib[e][t])
        min_in = std::min(min_in, r.score[t * E + e]);
      else
        max_out = std::max(max_out, r.score[t * E + e]);
      if (lib[e][t] != want[e][t]) ++diff;
    }
    // The same count always; a differing set only at a probability near-tie.
    INFO("expert " << e << " takes " << n_lib << " tokens, reference " << n_ref << "; " << diff
                   << " differ");
    CHECK(n_lib == n_ref);
    CHECK((diff == 0 || max_out <= min_in + tie));
  }
  check_close(weights, wref, 2e-6, 2e-5, "expert-choice weights");
}

/// Dense combination weights M[t, e] = sum of a token's kept slot weights for expert e.
inline std::vector<double> dense_mask(const std::vector<std::int32_t>& ids,
                                      const std::vector<double>& w, const std::vector<char>& kept,
                                      std::int64_t T, std::int64_t k, std::int64_t E) {
  std::vector<double> m(static_cast<std::size_t>(T * E), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t e = ids[t * k + j];
      if (e >= 0 && kept[t * k + j]) m[t * E + e] += w[t * k + j];
    }
  return m;
}

/// Dense MoE: every expert on every token, masked by M: out[t] = sum_e M[t, e] * expert_e(x_t).
template <typename Bank, typename TX>
std::vector<double> dense_moe(const Bank& bank, const std::vector<TX>& x,
                              const std::vector<double>& M, std::int64_t T, std::int64_t E,
                              std::int64_t d) {
  std::vector<double> out(static_cast<std::size_t>(T * d), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t e = 0; e < E; ++e) {
      const std::vector<double> y = bank(e, x.data() + t * d);  // every expert, even weight 0
      for (std::int64_t c = 0; c < d; ++c) out[t * d + c] += M[t * E + e] * y[c];
    }
  return out;
}

/// IEEE binary16 / bfloat16 reference rounding by search over the value table.
struct HalfFormat {
  int mbits;          ///< mantissa bits (10 for f16, 7 for bf16)
  int bias;           ///< exponent bias (15, 127)
  std::uint32_t inf;  ///< magnitude bits of +Inf (0x7c00, 0x7f80)
};
inline constexpr HalfFormat kF16{10, 15, 0x7c00u};
inline constexpr HalfFormat kBF16{7, 127, 0x7f80u};

/// Value of magnitude bits `mag`, treating the Inf exponent as an ordinary binade (so `inf`
/// maps to the first value past the largest finite one, the overflow rounding boundary).
inline double half_magnitude(std::uint32_t mag, const HalfFormat& f) {
  const std::uint32_t e = mag >> f.mbits, m = mag & ((1u << f.mbits) - 1u);
  if (e == 0) return std::ldexp(static_cast<double>(m), 1 - f.bias - f.mbits);
  return std::ldexp(static_cast<double>((1u << f.mbits) | m),
                    static_cast<int>(e) - f.bias - f.mbits);
}

/// Decoded value of a 16-bit pattern (NaN patterns give NaN).
inline double half_decode(std::uint16_t h, const HalfFormat& f) {
  const std::uint32_t mag = h & 0x7fffu;
  double v;
  if (mag > f.inf)
    v = std::numeric_limits<double>::quiet_NaN();
  else if (mag == f.inf)
    v = std::numeric_limits<double>::infinity();
  else
    v = half_magnitude(mag, f);
  return (h & 0x8000u) ? -v : v;
}

/// Nearest pattern to f, ties to even mantissa, overflow to Inf. NaN input -> 0xffff marker.
inline std::uint16_t half_round(float f, const HalfFormat& fmt) {
  if (std::isnan(f)) return 0xffffu;
  const std::uint32_t sign = std::signbit(f) ? 0x8000u : 0u;
  const double a = std::abs(static_cast<double>(f));
  if (a >= half_magnitude(fmt.inf, fmt)) return static_cast<std::uint16_t>(sign | fmt.inf);
  std::uint32_t lo = 0, hi = fmt.inf;  // invariant: value(lo) <= a < value(hi)
  while (hi - lo > 1) {
    const std::uint32_t mid = (lo + hi) / 2;
    if (half_magnitude(mid, fmt) <= a)
      lo = mid;
    else
      hi = mid;
  }
  const double dl = a - half_magnitude(lo, fmt), dh = half_magnitude(hi, fmt) - a;
  const std::uint32_t r = dl < dh ? lo : (dh < dl ? hi : ((lo & 1u) ? hi : lo));
  return static_cast<std::uint16_t>(sign | r);
}

}  // namespace agt::ref
