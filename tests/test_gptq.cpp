// SPDX-License-Identifier: Apache-2.0
// GPTQ: gptq_rows against round-to-nearest (diagonal Gram matrix) and against a column-by-column
// reference written here (explicit inverse, Schur-complement updates); the output error it buys
// on held-out correlated inputs; InputRecorder's Gram matrices against naive sums;
// quantize_model with calibration on the fixture models against round-to-nearest; bad input.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "quant_support.hpp"

using namespace autoglm;
using namespace agt;

namespace {

/// Rows [rows, k] with correlated columns: z M with z standard normal and M = I + a dense random
/// mix, the way hidden features of a trained model share directions.
std::vector<float> correlated_rows(std::int64_t rows, std::int64_t k, std::uint64_t mix_seed,
                                   std::uint64_t seed) {
  std::mt19937_64 mix_rng(mix_seed), rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> m(static_cast<std::size_t>(k * k));
  for (std::int64_t i = 0; i < k; ++i)
    for (std::int64_t j = 0; j < k; ++j)
      m[i * k + j] = (i == j ? 1.0 : 0.0) + 2.0 * nd(mix_rng) / std::sqrt(static_cast<double>(k));
  std::vector<float> x(static_cast<std::size_t>(rows * k));
  std::vector<double> z(static_cast<std::size_t>(k));
  for (std::int64_t r = 0; r < rows; ++r) {
    for (double& v : z) v = nd(rng);
    for (std::int64_t j = 0; j < k; ++j) {
      double s = 0.0;
      for (std::int64_t i = 0; i < k; ++i) s += z[i] * m[i * k + j];
      x[r * k + j] = static_cast<float>(s);
    }
  }
  return x;
}

/// x^T x of rows [rows, k], in double then f32, as InputRecorder keeps it.
std::vector<float> gram_of(const std::vector<float>& x, std::int64_t rows, std::int64_t k) {
  std::vector<float> g(static_cast<std::size_t>(k * k));
  for (std::int64_t i = 0; i < k; ++i)
    for (std::int64_t j = 0; j < k; ++j) {
      double s = 0.0;
      for (std::int64_t r = 0; r < rows; ++r) s += static_cast<double>(x[r * k + i]) * x[r * k + j];
      g[i * k + j] = static_cast<float>(s);
    }
  return g;
}

/// Inverse of a symmetric positive definite matrix by Gauss-Jordan elimination.
std::vector<double> inverse(std::vector<double> a, std::int64_t k) {
  std::vector<double> inv(static_cast<std::size_t>(k * k), 0.0);
  for (std::int64_t i = 0; i < k; ++i) inv[i * k + i] = 1.0;
  for (std::int64_t c = 0; c < k; ++c) {
    const double p = a[c * k + c];
    for (std::int64_t j = 0; j < k; ++j) {
      a[c * k + j] /= p;
      inv[c * k + j] /= p;
    }
    for (std::int64_t r = 0; r < k; ++r) {
      if (r == c) continue;
      const double f = a[r * k + c];
      for (std::int64_t j = 0; j < k; ++j) {
        a[r * k + j] -= f * a[c * k + j];
        inv[r * k + j] -= f * inv[c * k + j];
      }
    }
  }
  return inv;
}

/// GPTQ one column at a time (the optimal-brain-quantizer form): round column c, move its error
/// over the later columns with row c of the current inverse, then drop c from the inverse by a
/// Schur complement. The same scale rule as the library: amax / 127 of a group's columns when
/// the group is reached.
void reference_gptq(std::vector<float> w, std::int64_t n, std::int64_t k, std::int64_t group,
                    const std::vector<float>& gram, double damping, std::vector<std::int8_t>& q,
                    std::vector<float>& scales) {
  std::vector<double> h(gram.begin(), gram.end());
  double mean = 0.0;
  for (std::int64_t c = 0; c < k; ++c) mean += h[c * k + c] / static_cast<double>(k);
  for (std::int64_t c = 0; c < k; ++c) h[c * k + c] += damping * mean;
  std::vector<double> hinv = inverse(h, k);
  std::vector<double> wd(w.begin(), w.end());
  const std::int64_t groups = k / group;
  q.assign(static_cast<std::size_t>(n * k), 0);
  scales.assign(static_cast<std::size_t>(n * groups), 0.0f);
  std::vector<float> amax(static_cast<std::size_t>(n));
  for (std::int64_t c = 0; c < k; ++c) {
    for (std::int64_t r = 0; r < n; ++r) {
      if (c % group == 0) {
        amax[r] = 0.0f;
        for (std::int64_t j = c; j < c + group; ++j)
          amax[r] = std::max(amax[r], std::fabs(static_cast<float>(wd[r * k + j])));
        scales[r * groups + c / group] = amax[r] / 127.0f;
      }
      const float inv = amax[r] > 0.0f ? 127.0f / amax[r] : 0.0f;
      const float code =
          std::clamp(std::nearbyint(static_cast<float>(wd[r * k + c]) * inv), -127.0f, 127.0f);
      q[r * k + c] = static_cast<std::int8_t>(code);
      const double s = scales[r * groups + c / group];
      const double err = (wd[r * k + c] - code * s) / hinv[c * k + c];
      for (std::int64_t j = c + 1; j < k; ++j) wd[r * k + j] -= err * hinv[c * k + j];
    }
    const double p = hinv[c * k + c];
    for (std::int64_t i = c + 1; i < k; ++i)
      for (std::int64_t j = c + 1; j < k; ++j)
        hinv[i * k + j] -= hinv[i * k + c] * hinv[c * k + j] / p;
  }
}

/// ||(W - Wq) x^T||^2 over rows x [rows, k]: the output error a weight's rounding causes.
double output_error(const std::vector<float>& w, const std::vector<float>& wq,
                    const std::vector<float>& x, std::int64_t n, std::int64_t k,
                    std::int64_t rows) {
  double total = 0.0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t o = 0; o < n; ++o) {
      double s = 0.0;
      for (std::int64_t c = 0; c < k; ++c)
        s += (static_cast<double>(w[o * k + c]) - wq[o * k + c]) * x[r * k + c];
      total += s * s;
    }
  return total;
}

}  // namespace

TEST_CASE("gptq_rows with a diagonal Gram matrix is round-to-nearest, bit for bit", "[gptq]") {
  const std::int64_t n = 24, k = 256;
  const std::vector<float> w = trained_like(n, k, 11, 0.05f);
  std::mt19937_64 rng(12);
  std::uniform_real_distribution<float> ud(0.5f, 3.0f);
  std::vector<float> gram(static_cast<std::size_t>(k * k), 0.0f);
  for (std::int64_t c = 0; c < k; ++c) gram[c * k + c] = ud(rng);
  gram[5 * k + 5] = 0.0f;  // a column no input touched
  std::vector<float> col_scale(static_cast<std::size_t>(k));
  for (float& v : col_scale) v = ud(rng);
  for (std::int64_t group : {std::int64_t{0}, std::int64_t{32}, std::int64_t{128}})
    for (const detail::ScaleRule rule : {detail::ScaleRule{}, detail::ScaleRule{false},
                                         detail::ScaleRule{true, col_scale.data()}}) {
      const std::int64_t g = group == 0 ? k : group;
      std::vector<std::int8_t> q1(w.size()), q2(w.size());
      std::vector<float> s1(static_cast<std::size_t>(n * (k / g))), s2(s1.size());
      REQUIRE(detail::quantize_rows(w.data(), n, k, g, q1.data(), s1.data(), rule) == -1);
      REQUIRE(detail::gptq_rows(w.data(), n, k, g, gram.data(), 0.01, q2.data(), s2.data(), rule) ==
              -1);
      INFO("group " << group << ", search " << rule.search << ", weighted "
                    << (rule.col_scale != nullptr));
      REQUIRE(q1 == q2);
      REQUIRE(s1 == s2);
    }
}

TEST_CASE("gptq_rows equals a column-by-column GPTQ reference", "[gptq]") {
  const std::int64_t n = 12, k = 320, rows = 400;  // k > 128: more than one block
  const std::vector<float> w = trained_like(n, k, 21, 0.05f);
  const std::vector<float> x = correlated_rows(rows, k, 22, 23);
  const std::vector<float> gram = gram_of(x, rows, k);
  for (std::int64_t group : {std::int64_t{0}, std::int64_t{32}, std::int64_t{64}}) {
    const std::int64_t g = group == 0 ? k : group;
    std::vector<std::int8_t> q(w.size()), rq;
    std::vector<float> s(static_cast<std::size_t>(n * (k / g))), rs;
    // The reference sets scales to max|w| / 127: the library's rule without the search.
    REQUIRE(detail::gptq_rows(w.data(), n, k, g, gram.data(), 0.01, q.data(), s.data(),
                              detail::ScaleRule{false}) == -1);
    reference_gptq(w, n, k, g, gram, 0.01, rq, rs);
    // The blocked Cholesky form and the Schur-complement form differ by float rounding only: a
    // code may land on the other side of a .5 and move the values after it by one step's share.
    std::int64_t same = 0, far = 0;
    for (std::size_t i = 0; i < q.size(); ++i) {
      same += q[i] == rq[i];
      far += std::abs(q[i] - rq[i]) > 1;
    }
    INFO("group " << group << ": " << same << " of " << q.size() << " codes equal");
    CHECK(far == 0);
    CHECK(static_cast<double>(same) >= 0.995 * static_cast<double>(q.size()));
    for (std::size_t i = 0; i < s.size(); ++i) REQUIRE(std::fabs(s[i] - rs[i]) <= 1e-3f * rs[i]);
  }
}

TEST_CASE("gptq_rows: what it cannot round is left to round-to-nearest (-2)", "[gptq][errors]") {
  const std::int64_t n = 4, k = 64;
  const std::vector<float> w = trained_like(n, k, 61, 0.05f);
  std::vector<float> gram(static_cast<std::size_t>(k * k), 0.0f);
  for (std::int64_t c = 0; c < k; ++c) gram[c * k + c] = 1.0f;
  std::vector<std::int8_t> q(w.size());
  std::vector<float> s(static_cast<std::size_t>(n * 2));
  REQUIRE(detail::gptq_rows(w.data(), n, k, 48, gram.data(), 0.01, q.data(), s.data()) == -2);
  REQUIRE(detail::gptq_rows(w.data(), n, k, 0, gram.data(), 0.01, q.data(), s.data()) == -2);
  std::vector<float> bad = gram;
  bad[3 * k + 5] = bad[5 * k + 3] = std::numeric_limits<float>::infinity();
  REQUIRE(detail::gptq_rows(w.data(), n, k, 32, bad.data(), 0.01, q.data(), s.data()) == -2);
  bad = gram;
  bad[7 * k + 7] = std::nanf("");
  REQUIRE(detail::gptq_rows(w.data(), n, k, 32, bad.data(), 0.01, q.data(), s.data()) == -2);
  std::vector<float> wn = w;
  wn[2 * k + 9] = std::nanf("");  // a non-finite weight is reported by its index
  REQUIRE(detail::gptq_rows(wn.data(), n, k, 32, gram.data(), 0.01, q.data(), s.data()) ==
          2 * k + 9);
}

TEST_CASE("GptqScope: nested scopes, the innermost wins, any destruction order", "[gptq]") {
  CpuBackend& b = cpu2();
  const std::int64_t n = 16, k = 64, rows = 128;
  const Tensor w = tensor_f32(b, Shape{n, k}, trained_like(n, k, 71, 0.05f));
  InputRecorder r1(b), r2(b);
  Tensor out(b, DType::f32, Shape{rows, n});
  r1.gemm(tensor_f32(b, Shape{rows, k}, correlated_rows(rows, k, 72, 73)), w, out);
  r2.gemm(tensor_f32(b, Shape{rows, k}, correlated_rows(rows, k, 74, 75)), w, out);
  const auto codes = [&] { return host_f32(b, dequantize(b, quantize(b, w, QuantSpec{}))); };
  const std::vector<float> rtn = codes();
  std::vector<float> with1, with2;
  {
    GptqScope s1(r1);
    with1 = codes();
  }
  {
    GptqScope s2(r2);
    with2 = codes();
  }
  REQUIRE(with1 != rtn);
  REQUIRE(with2 != with1);
  auto outer = std::make_unique<GptqScope>(r1);
  auto inner = std::make_unique<GptqScope>(r2);
  REQUIRE(codes() == with2);
  outer.reset();  // out of order: the inner scope stays active
  REQUIRE(codes() == with2);
  inner.reset();
  REQUIRE(detail::GptqAccess::active() == nullptr);
  REQUIRE(codes() == rtn);
}

TEST_CASE("InputRecorder: Gram matrices of gemm and grouped_gemm inputs, outputs unchanged",
          "[gptq]") {
  CpuBackend& b = cpu2();
  InputRecorder rec(b);
  const std::int64_t k = 40, n = 24, E = 3;
  const std::vector<float> xh = random_floats(10 * k, 31);
  const Tensor x = tensor_f32(b, Shape{10, k}, xh);
  const Tensor w = tensor_f32(b, Shape{n, k}, random_floats(n * k, 32));
  const Tensor ws = tensor_f32(b, Shape{E, n, k}, random_floats(E * n * k, 33));
  Tensor c1(b, DType::f32, Shape{10, n}), c2(b, DType::f32, Shape{10, n});
  rec.gemm(x, w, c1);
  b.gemm(x, w, c2);
  REQUIRE(host_f32(b, c1) == host_f32(b, c2));
  const std::vector<std::int32_t> off{0, 3, 3, 10};  // expert 1 gets no rows
  rec.grouped_gemm(x, ws, tensor_i32(b, Shape{E + 1}, off), c1);
  b.grouped_gemm(x, ws, tensor_i32(b, Shape{E + 1}, off), c2);
  REQUIRE(host_f32(b, c1) == host_f32(b, c2));
  REQUIRE(rec.matrices() == 3);

  const auto check = [&](const InputRecorder::Gram* g, std::int64_t r0, std::int64_t r1) {
    REQUIRE(g != nullptr);
    REQUIRE(g->rows == r1 - r0);
    REQUIRE(g->finite);
    const std::vector<float> sub(xh.begin() + r0 * k, xh.begin() + r1 * k);
    const std::vector<float> want = gram_of(sub, r1 - r0, k);
    for (std::size_t i = 0; i < want.size(); ++i)
      REQUIRE(std::fabs(g->gram[i] - want[i]) <= 1e-5f * (1.0f + std::fabs(want[i])));
  };
  check(rec.gram(TensorView(w).data, 0, k), 0, 10);
  check(rec.gram(TensorView(ws).data, 0, k), 0, 3);
  check(rec.gram(TensorView(ws).data, 2, k), 3, 10);
  REQUIRE(rec.gram(TensorView(ws).data, 1, k) == nullptr);
  REQUIRE(rec.gram(TensorView(w).data, 0, k + 1) == nullptr);
  rec.gemm(x, w, c1);  // a second call adds to the same matrix
  REQUIRE(rec.gram(TensorView(w).data, 0, k)->rows == 20);
  rec.clear();
  REQUIRE(rec.matrices() == 0);
}

TEST_CASE("InputRecorder: rows buffered across calls sum to the naive Gram matrix", "[gptq]") {
  // 100, 100, 100 rows (the buffer passes kFlushRows on the third); 300 on an empty buffer
  // (flushed at once); 50, then 300 on top of them (flushed together); 7 left buffered until
  // gram() reads them.
  CpuBackend& b = cpu2();
  InputRecorder rec(b);
  const std::int64_t k = 24, n = 5;
  const std::vector<std::int64_t> calls{100, 100, 100, 300, 50, 300, 7};
  std::int64_t total = 0;
  for (std::int64_t r : calls) total += r;
  const std::vector<float> xh = random_floats(total * k, 35);
  const Tensor w = tensor_f32(b, Shape{n, k}, random_floats(n * k, 36));
  std::int64_t r0 = 0;
  for (std::int64_t r : calls) {
    const std::vector<float> part(xh.begin() + r0 * k, xh.begin() + (r0 + r) * k);
    Tensor c(b, DType::f32, Shape{r, n});
    rec.gemm(tensor_f32(b, Shape{r, k}, part), w, c);
    r0 += r;
  }
  const InputRecorder::Gram* g = rec.gram(TensorView(w).data, 0, k);
  REQUIRE(g != nullptr);
  REQUIRE(g->rows == total);
  const std::vector<float> want = gram_of(xh, total, k);
  for (std::int64_t i = 0; i < k; ++i)
    for (std::int64_t j = 0; j < k; ++j) {
      CAPTURE(i, j);
      const float got = g->gram[static_cast<std::size_t>(i * k + j)];
      REQUIRE(got == g->gram[static_cast<std::size_t>(j * k + i)]);  // symmetric
      REQUIRE(std::fabs(got - want[static_cast<std::size_t>(i * k + j)]) <=
              1e-4f * (1.0f + std::fabs(want[static_cast<std::size_t>(i * k + j)])));
    }
  // Reading again adds nothing twice.
  REQUIRE(rec.gram(TensorView(w).data, 0, k)->gram == g->gram);

  // A bank: experts 0 and 2 get 130 rows per call, so both buffers fill on the second call and
  // are added together (one thread each); expert 1 gets none.
  const std::int64_t E = 3, per = 130, calls_bank = 2;
  const Tensor ws = tensor_f32(b, Shape{E, n, k}, random_floats(E * n * k, 37));
  const std::vector<std::int32_t> off{0, per, per, 2 * per};
  const std::vector<float> xb = random_floats(calls_bank * 2 * per * k, 38);
  for (std::int64_t c = 0; c < calls_bank; ++c) {
    const std::vector<float> part(xb.begin() + c * 2 * per * k, xb.begin() + (c + 1) * 2 * per * k);
    Tensor out(b, DType::f32, Shape{2 * per, n});
    rec.grouped_gemm(tensor_f32(b, Shape{2 * per, k}, part), ws, tensor_i32(b, Shape{E + 1}, off),
                     out);
  }
  for (std::int64_t e : {0, 2}) {
    CAPTURE(e);
    std::vector<float> rows_e;  // expert e's rows of every call
    for (std::int64_t c = 0; c < calls_bank; ++c) {
      const auto from = xb.begin() + (c * 2 * per + (e == 0 ? 0 : per)) * k;
      rows_e.insert(rows_e.end(), from, from + per * k);
    }
    const std::vector<float> want_e = gram_of(rows_e, calls_bank * per, k);
    const InputRecorder::Gram* ge = rec.gram(TensorView(ws).data, e, k);
    REQUIRE(ge != nullptr);
    REQUIRE(ge->rows == calls_bank * per);
    for (std::size_t i = 0; i < want_e.size(); ++i)
      REQUIRE(std::fabs(ge->gram[i] - want_e[i]) <= 1e-4f * (1.0f + std::fabs(want_e[i])));
  }
  REQUIRE(rec.gram(TensorView(ws).data, 1, k) == nullptr);
}

TEST_CASE("GPTQ through quantize(): lower output error than round-to-nearest on held-out inputs",
          "[gptq]") {
  CpuBackend& b = cpu2();
  const std::int64_t n = 64, k = 256, rows = 512;
  const std::vector<float> wh = trained_like(n, k, 41, 0.05f);
  const Tensor w = tensor_f32(b, Shape{n, k}, wh);
  const std::vector<float> cal = correlated_rows(rows, k, 42, 43);
  const std::vector<float> held = correlated_rows(rows, k, 42, 44);  // same mix, new draws
  InputRecorder rec(b);
  Tensor out(b, DType::f32, Shape{rows, n});
  rec.gemm(tensor_f32(b, Shape{rows, k}, cal), w, out);
  for (const QuantSpec spec :
       {QuantSpec{0, ActivationMode::weight_only}, QuantSpec{32, ActivationMode::weight_only},
        QuantSpec{128, ActivationMode::w8a8}}) {
    const QuantizedTensor rtn = quantize(b, w, spec);
    QuantizedTensor gptq;
    {
      GptqScope scope(rec);
      gptq = quantize(b, w, spec);
    }
    REQUIRE(gptq.spec() == spec);
    const std::vector<float> wr = host_f32(b, dequantize(b, rtn));
    const std::vector<float> wg = host_f32(b, dequantize(b, gptq));
    const double e_rtn = output_error(wh, wr, held, n, k, rows);
    const double e_gptq = output_error(wh, wg, held, n, k, rows);
    const double e_cal = output_error(wh, wg, cal, n, k, rows);
    WARN(spec.scheme_name() << " " << spec.mode_name() << ": held-out output error GPTQ / RTN "
                            << e_gptq / e_rtn << " (calibration rows: "
                            << e_cal / output_error(wh, wr, cal, n, k, rows) << ")");
    REQUIRE(e_gptq < 0.8 * e_rtn);
    // Outside a scope, the same weight is rounded to nearest again.
    REQUIRE(host_f32(b, dequantize(b, quantize(b, w, spec))) == wr);
  }
}

TEST_CASE("GPTQ on an expert bank: per-expert Gram matrices, the same codes on 1 or 3 threads",
          "[gptq]") {
  CpuBackend& b = cpu2();
  const std::int64_t E = 5, n = 24, k = 64, rows = 400;
  const Tensor w = tensor_f32(b, Shape{E, n, k}, trained_like(E * n, k, 81, 0.05f));
  InputRecorder rec(b);
  // Expert 1 gets no rows and expert 3 too few (min_rows): both keep round-to-nearest.
  const std::vector<std::int32_t> off{0, 150, 150, 300, 304, 400};
  Tensor out(b, DType::f32, Shape{rows, n});
  rec.grouped_gemm(tensor_f32(b, Shape{rows, k}, correlated_rows(rows, k, 82, 83)), w,
                   tensor_i32(b, Shape{E + 1}, off), out);
  const QuantSpec spec{32, ActivationMode::weight_only};
  const std::vector<float> rtn = host_f32(b, dequantize(b, quantize(b, w, spec)));
  std::vector<float> by_threads[2];
  for (int i = 0; i < 2; ++i) {
    GptqOptions o;
    o.threads = i == 0 ? 1 : 3;
    GptqScope scope(rec, o);
    by_threads[i] = host_f32(b, dequantize(b, quantize(b, w, spec)));
  }
  REQUIRE(by_threads[0] == by_threads[1]);
  const auto expert = [&](const std::vector<float>& v, std::int64_t e) {
    return std::vector<float>(v.begin() + e * n * k, v.begin() + (e + 1) * n * k);
  };
  for (std::int64_t e : {0, 2, 4}) REQUIRE(expert(by_threads[0], e) != expert(rtn, e));
  for (std::int64_t e : {1, 3}) REQUIRE(expert(by_threads[0], e) == expert(rtn, e));
}

TEST_CASE("GPTQ: bad input is an Error", "[gptq][errors]") {
  CpuBackend& b = cpu2();
  const std::int64_t k = 32;
  const Tensor w = tensor_f32(b, Shape{8, k}, random_floats(8 * k, 51));
  InputRecorder rec(b);
  std::vector<float> xh = random_floats(16 * k, 52);
  xh[3 * k + 7] = std::nanf("");
  Tensor out(b, DType::f32, Shape{16, 8});
  rec.gemm(tensor_f32(b, Shape{16, k}, xh), w, out);
  {
    GptqScope scope(rec);
    REQUIRE_THROWS_MATCHES(quantize(b, w, QuantSpec{}, "blk.0.q_proj"), Error,
                           Catch::Matchers::Predicate<Error>([](const Error& e) {
                             const std::string m = e.what();
                             return m.find("quantize") != std::string::npos &&
                                    m.find("blk.0.q_proj") != std::string::npos &&
                                    m.find("NaN or Inf") != std::string::npos;
                           }));
  }
  REQUIRE_THROWS_AS(GptqScope(rec, GptqOptions{-1.0}), Error);
  REQUIRE_THROWS_AS(GptqScope(rec, GptqOptions{1e300}), Error);
  REQUIRE_THROWS_AS(GptqScope(rec, GptqOptions{std::nan(""), 8}), Error);
  REQUIRE_THROWS_AS(GptqScope(rec, GptqOptions{0.01, -1}), Error);
  REQUIRE_THROWS_AS(GptqScope(rec, GptqOptions{0.01, 8, -2}), Error);

  const Model m = load_model(b, fixture("qwen3_moe"));
  const auto fails = [&](const Calibration& c, const std::string& needle) {
    try {
      (void)quantize_model(m, QuantConfig{}, c);
    } catch (const Error& e) {
      const std::string msg = e.what();
      INFO(msg);
      return msg.find("quantize_model") != std::string::npos &&
             msg.find(needle) != std::string::npos;
    }
    return false;
  };
  REQUIRE(fails(Calibration{}, "no sequences"));
  REQUIRE(fails(Calibration{{{1, 2, 3}, {}}}, "sequence 1 is empty"));
  REQUIRE(fails(Calibration{{{1, 2, 300}}}, "token id 300"));
  REQUIRE(fails(Calibration{{{1, -1}}}, "token id -1"));
  REQUIRE(fails(Calibration{{std::vector<std::int32_t>(257, 1)}}, "257 tokens"));
  Calibration bad_damping{{{1, 2, 3}}};
  bad_damping.gptq.damping = -1.0;
  REQUIRE_THROWS_AS(quantize_model(m, QuantConfig{}, bad_damping), Error);
}

namespace {

/// Held-out figures of an int8 model against its f32 model over `eval` sequences.
struct Heldout {
  double kl = 0.0;                ///< mean KL(f32 || int8) of next-token distributions
  std::vector<double> layer_err;  ///< per decoder layer: relative L2 error of the residual
  double agree = 0.0;             ///< share of (MoE layer, token) with the f32 top-k set
};

Heldout heldout(const Model& f32, const Model& q,
                const std::vector<std::vector<std::int32_t>>& eval) {
  Heldout h;
  std::vector<double> num(f32.layers().size(), 0.0), den(num.size(), 0.0);
  std::int64_t same = 0, total = 0;
  for (const auto& seq : eval) {
    const auto T = static_cast<std::int64_t>(seq.size());
    std::vector<std::vector<float>> hidden[2];
    std::vector<std::vector<std::int32_t>> routing[2];
    std::vector<float> logits[2];
    for (int i = 0; i < 2; ++i) {
      Session s(i == 0 ? f32 : q);
      s.set_layer_observer(
          [&](std::int64_t, TensorView x) { hidden[i].push_back(host_f32(f32.backend(), x)); });
      s.set_routing_observer(
          [&](std::int64_t, const RoutingStats& st) { routing[i].push_back(st.expert_ids); });
      logits[i] = host_f32(f32.backend(), s.prefill(seq, /*all_logits=*/true));
    }
    h.kl += mean_kl(logits[0], logits[1], f32.vocab_size()) / static_cast<double>(eval.size());
    for (std::size_t l = 0; l < num.size(); ++l)
      for (std::size_t j = 0; j < hidden[0][l].size(); ++j) {
        const double d = static_cast<double>(hidden[1][l][j]) - hidden[0][l][j];
        num[l] += d * d;
        den[l] += static_cast<double>(hidden[0][l][j]) * hidden[0][l][j];
      }
    for (std::size_t l = 0; l < routing[0].size(); ++l) {
      same += same_sets(routing[0][l], routing[1][l], T,
                        static_cast<int>(static_cast<std::int64_t>(routing[0][l].size()) / T));
      total += T;
    }
  }
  for (std::size_t l = 0; l < num.size(); ++l) h.layer_err.push_back(std::sqrt(num[l] / den[l]));
  h.agree = total ? static_cast<double>(same) / static_cast<double>(total) : 1.0;
  return h;
}

/// The attention and routed-expert (or dense MLP) weights of a layer, in a fixed order.
std::vector<const Weight*> layer_weights(const DecoderLayer& l) {
  std::vector<const Weight*> out;
  if (const auto* g = std::get_if<GqaAttention>(&l.attention())) {
    const GqaWeights& w = g->weights();
    out = {&w.q_proj, &w.k_proj, &w.v_proj, &w.o_proj};
  } else {
    const MlaWeights& w = std::get<MlaAttention>(l.attention()).weights();
    out = {&w.q_proj, &w.q_a_proj, &w.q_b_proj, &w.kv_a_proj, &w.kv_b_proj, &w.o_proj};
  }
  const SwiGluExperts& x =
      l.is_moe() ? std::get<MoEBlock>(l.ffn()).experts() : std::get<DenseMlp>(l.ffn()).mlp();
  out.push_back(&x.gate_up());
  out.push_back(&x.down());
  return out;
}

/// sum over matrices of ||(W - Wq) x^T||^2 over the inputs `rec` saw W take: the output error of
/// a layer's rounding on those inputs.
double recorded_error(Backend& b, const DecoderLayer& f32, const DecoderLayer& q,
                      const InputRecorder& rec) {
  const std::vector<const Weight*> wf = layer_weights(f32), wq = layer_weights(q);
  double total = 0.0;
  for (std::size_t i = 0; i < wf.size(); ++i) {
    if (wf[i]->empty() || !wq[i]->is_quantized()) continue;  // a group K does not fit stays f32
    const std::vector<float> a = host_f32(b, wf[i]->tensor());
    const std::vector<float> c = host_f32(b, dequantize(b, wq[i]->quantized()));
    const Shape& s = wf[i]->shape();
    const std::int64_t k = s[s.rank() - 1], n = s[s.rank() - 2];
    const std::int64_t mats = s.rank() == 3 ? s[0] : 1;
    for (std::int64_t e = 0; e < mats; ++e) {
      const InputRecorder::Gram* g = rec.gram(TensorView(wf[i]->tensor()).data, e, k);
      if (!g) continue;
      for (std::int64_t r = 0; r < n; ++r) {
        std::vector<double> d(static_cast<std::size_t>(k));
        for (std::int64_t j = 0; j < k; ++j)
          d[j] = static_cast<double>(a[(e * n + r) * k + j]) - c[(e * n + r) * k + j];
        for (std::int64_t i2 = 0; i2 < k; ++i2)
          for (std::int64_t j = 0; j < k; ++j) total += d[i2] * d[j] * g->gram[i2 * k + j];
      }
    }
  }
  return total;
}

/// Per decoder layer: the held-out output error of GPTQ's rounding over round-to-nearest's,
/// both on the inputs the f32 model gives that layer over `eval`.
std::vector<double> heldout_matrix_error(const Model& f32, const Model& rtn, const Model& gptq,
                                         const std::vector<std::vector<std::int32_t>>& eval) {
  Backend& b = f32.backend();
  std::vector<Tensor> xs, positions;
  std::vector<KvCache> caches;
  for (const auto& seq : eval) {
    const auto T = static_cast<std::int64_t>(seq.size());
    std::vector<std::int32_t> pos(seq.size());
    for (std::size_t t = 0; t < pos.size(); ++t) pos[t] = static_cast<std::int32_t>(t);
    positions.push_back(tensor_i32(b, Shape{T}, pos));
    xs.emplace_back(b, DType::f32, Shape{T, f32.hidden()});
    f32.embeddings().encode(b, tensor_i32(b, Shape{T}, seq), xs.back());
    caches.emplace_back(f32, T);
    caches.back().reserve(T);
  }
  std::vector<double> ratio;
  for (std::size_t l = 0; l < f32.layers().size(); ++l) {
    InputRecorder rec(b);
    for (std::size_t s = 0; s < xs.size(); ++s)
      f32.layers()[l].forward(rec, xs[s], AttentionContext{positions[s], f32.inv_freq(), 0},
                              caches[s].layer(l));
    ratio.push_back(recorded_error(b, f32.layers()[l], gptq.layers()[l], rec) /
                    recorded_error(b, f32.layers()[l], rtn.layers()[l], rec));
  }
  return ratio;
}

void check_gptq_fixture(const std::string& name) {
  CpuBackend& b = cpu2();
  const Model f32 = load_model(b, fixture(name));
  const std::vector<std::int32_t> ids = license_ids();
  REQUIRE(ids.size() > 8000);
  // Calibration on the first half of the text, evaluation on the second.
  Calibration calib;
  calib.sequences = windows(ids, 0, ids.size() / 2, 16, 128);
  const auto eval = windows(ids, ids.size() / 2, ids.size(), 12, 128);
  for (const QuantSpec spec :
       {QuantSpec{0, ActivationMode::weight_only}, QuantSpec{32, ActivationMode::weight_only},
        QuantSpec{0, ActivationMode::w8a8}}) {
    QuantConfig cfg;
    cfg.spec = spec;
    const Model rtn = quantize_model(f32, cfg), gptq = quantize_model(f32, cfg, calib);
    const std::vector<double> ratio = heldout_matrix_error(f32, rtn, gptq, eval);
    const Heldout hr = heldout(f32, rtn, eval), hg = heldout(f32, gptq, eval);
    WARN(name << " " << spec.scheme_name() << " " << spec.mode_name()
              << " held out: weight output error GPTQ / RTN per layer " << percent_list(ratio, 3)
              << " %; next-token KL RTN " << hr.kl << ", GPTQ " << hg.kl
              << "; top-k sets equal RTN " << 100.0 * hr.agree << " %, GPTQ " << 100.0 * hg.agree
              << " %; layer outputs' relative L2 error RTN " << percent_list(hr.layer_err, 3)
              << " %, GPTQ " << percent_list(hg.layer_err, 3) << " %");
    // What GPTQ minimises, on text it did not see: measured 0.34-0.86 of RTN's per layer.
    for (double r : ratio) REQUIRE(r < 0.95);
    // End to end, a few near-tied routing decisions that flip either way dominate these tiny
    // models' output errors; GPTQ must not lose ground there (measured: docs/quantization.md).
    if (spec.mode == ActivationMode::weight_only) {
      REQUIRE(hg.agree >= hr.agree - 0.005);
      REQUIRE(hg.kl < 1.5 * hr.kl);
    }
  }
}

}  // namespace

TEST_CASE("GPTQ fixture qwen3_moe", "[gptq][models]") {
  check_gptq_fixture("qwen3_moe");
}
TEST_CASE("GPTQ fixture mixtral_hub_sharded", "[gptq][models]") {
  check_gptq_fixture("mixtral_hub_sharded");
}
TEST_CASE("GPTQ fixture qwen2_moe", "[gptq][models]") {
  check_gptq_fixture("qwen2_moe");
}
TEST_CASE("GPTQ fixture olmoe", "[gptq][models]") {
  check_gptq_fixture("olmoe");
}
TEST_CASE("GPTQ fixture deepseek_v3", "[gptq][models]") {
  check_gptq_fixture("deepseek_v3");
}
TEST_CASE("GPTQ fixture glm4_moe_qknorm", "[gptq][models]") {
  check_gptq_fixture("glm4_moe_qknorm");
}
TEST_CASE("GPTQ fixture glm4_moe_hub_tied", "[gptq][models]") {
  check_gptq_fixture("glm4_moe_hub_tied");
}
