// SPDX-License-Identifier: Apache-2.0
// Helpers of the int8 tests (test_quant.cpp, test_gptq.cpp): shared backends, weights drawn like
// trained ones, error measures, fixture access.
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "support.hpp"

namespace agt {

using namespace autoglm;

/// Shared CPU backends with one and two threads.
inline CpuBackend& cpu1() {
  static CpuBackend b(CpuBackendOptions{1});
  return b;
}
inline CpuBackend& cpu2() {
  static CpuBackend b(CpuBackendOptions{2});
  return b;
}

/// Weights drawn like trained ones: normal(0, std) with ~1 % of input columns 4x larger (per-row
/// maxima near 12 sigma, the heavy tails of trained matrices).
inline std::vector<float> trained_like(std::int64_t rows, std::int64_t cols, std::uint64_t seed,
                                       float std_dev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, std_dev);
  std::vector<float> w(static_cast<std::size_t>(rows * cols));
  for (float& v : w) v = nd(rng);
  for (std::int64_t c = 0; c < cols; c += 97)  // ~1 % outlier columns
    for (std::int64_t r = 0; r < rows; ++r) w[static_cast<std::size_t>(r * cols + c)] *= 4.0f;
  return w;
}

/// ||got - want|| / ||want||.
inline double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

/// The fixture model directory `name`.
inline std::filesystem::path fixture(const std::string& name) {
  return std::filesystem::path(AUTOGLM_FIXTURES_DIR) / name;
}

/// An id list of a fixture's expected.json.
inline std::vector<std::int32_t> read_ids(const std::filesystem::path& dir, const char* key) {
  std::ifstream f(dir / "expected.json");
  return nlohmann::json::parse(f).at(key).get<std::vector<std::int32_t>>();
}

/// Mean over positions of KL(p_f32 || p_int8) of the next-token distributions.
inline double mean_kl(const std::vector<float>& a, const std::vector<float>& b, std::int64_t V) {
  const std::int64_t T = static_cast<std::int64_t>(a.size()) / V;
  double total = 0.0;
  for (std::int64_t t = 0; t < T; ++t) {
    auto lse = [&](const std::vector<float>& l) {
      double mx = -1e300, s = 0.0;
      for (std::int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(l[t * V + v]));
      for (std::int64_t v = 0; v < V; ++v) s += std::exp(l[t * V + v] - mx);
      return mx + std::log(s);
    };
    const double la = lse(a), lb = lse(b);
    double kl = 0.0;
    for (std::int64_t v = 0; v < V; ++v) {
      const double lp = a[t * V + v] - la, lq = b[t * V + v] - lb;
      kl += std::exp(lp) * (lp - lq);
    }
    total += kl;
  }
  return total / static_cast<double>(T);
}

/// Bytes of the repository's LICENSE as token ids (the corpus the fixtures were trained on).
inline std::vector<std::int32_t> license_ids() {
  std::ifstream f(fixture("..") / ".." / "LICENSE", std::ios::binary);
  std::vector<std::int32_t> ids;
  for (char c; f.get(c);) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

/// `count` windows of `len` ids from ids[begin, end), evenly spaced.
inline std::vector<std::vector<std::int32_t>> windows(const std::vector<std::int32_t>& ids,
                                                      std::size_t begin, std::size_t end, int count,
                                                      std::size_t len) {
  std::vector<std::vector<std::int32_t>> out;
  const std::size_t step = (end - begin - len) / static_cast<std::size_t>(count);
  for (int i = 0; i < count; ++i) {
    const auto first = ids.begin() + static_cast<std::ptrdiff_t>(begin + i * step);
    out.emplace_back(first, first + static_cast<std::ptrdiff_t>(len));
  }
  return out;
}

/// Equal top-k sets per token of two routings [T * k].
inline std::int64_t same_sets(const std::vector<std::int32_t>& x,
                              const std::vector<std::int32_t>& y, std::int64_t T, int k) {
  std::int64_t same = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<std::int32_t> a(x.begin() + t * k, x.begin() + (t + 1) * k);
    std::vector<std::int32_t> c(y.begin() + t * k, y.begin() + (t + 1) * k);
    std::sort(a.begin(), a.end());
    std::sort(c.begin(), c.end());
    same += a == c;
  }
  return same;
}

/// "a / b / ..." of shares, in per cent with `decimals` digits.
inline std::string percent_list(const std::vector<double>& v, int decimals) {
  std::string out;
  for (double x : v) out += fmt::format("{}{:.{}f}", out.empty() ? "" : " / ", 100.0 * x, decimals);
  return out;
}

}  // namespace agt
