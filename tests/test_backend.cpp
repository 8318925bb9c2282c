// SPDX-License-Identifier: Apache-2.0
// Backend conformance suite. Written against autoglm::Backend& only (data moves through
// copy_from_host / copy_to_host), run for every backend in AUTOGLM_TEST_BACKENDS, and checked
// against the naive double-precision references in reference.hpp.
#include <bit>
#include <cerrno>
#include <limits>
#include <numeric>
#include <set>
#include <thread>

#include <sys/mman.h>
#include <unistd.h>

#include "backends.hpp"
#include "common/random.hpp"  // the documented counter-based noise (seed, token * E + expert)
#include "reference.hpp"
#include "support.hpp"

using namespace autoglm;
using namespace agt;

#define BACKEND_TEST(name, tags) TEMPLATE_TEST_CASE(name, "[backend]" tags, AUTOGLM_TEST_BACKENDS)

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<double> to_double(const std::vector<float>& v) {
  return {v.begin(), v.end()};
}

/// Runs route_topk on host logits; returns ids, weights, stats on the host.
struct TopkOut {
  std::vector<std::int32_t> ids;
  std::vector<float> weights, stats;
};
TopkOut run_topk(Backend& b, const std::vector<float>& logits, std::int64_t T, std::int64_t E,
                 const std::vector<float>& bias, const RouteParams& p) {
  Tensor L = tensor_f32(b, Shape{T, E}, logits);
  Tensor B;
  if (!bias.empty()) B = tensor_f32(b, Shape{E}, bias);
  Tensor ids(b, DType::i32, Shape{T, p.top_k});
  Tensor w(b, DType::f32, Shape{T, p.top_k});
  Tensor s(b, DType::f32, Shape{E + 1});
  b.route_topk(L, B, p, ids, w, s);
  return {host_i32(b, ids), host_f32(b, w), host_f32(b, s)};
}

void check_stats(const std::vector<float>& got, const ref::Route& r) {
  check_close(got, r.stats, 2e-5, 2e-5, "routing stats");
}

}  // namespace

BACKEND_TEST("allocate: 64-byte aligned, zero bytes allowed", "") {
  Backend& b = TestType::get();
  for (std::size_t n : {0, 1, 7, 64, 65, 4097}) {
    void* p = b.allocate(n);
    CHECK(p != nullptr);
    CHECK(reinterpret_cast<std::uintptr_t>(p) % 64 == 0);
    b.deallocate(p);
  }
  b.synchronize();
}

TEST_CASE("CpuBackend huge_pages: large buffers are 2 MiB-aligned mappings, reused and freed",
          "[backend]") {
  for (bool huge : {true, false}) {
    DYNAMIC_SECTION("huge_pages=" << huge) {
      CpuBackend b(CpuBackendOptions{.threads = 1, .huge_pages = huge});
      // 16 MiB and up is mapped; a pooled size (<= 256 MiB) comes back from the cache.
      for (std::size_t n :
           {std::size_t{16} << 20, (std::size_t{40} << 20) + 12, (std::size_t{300} << 20) + 4}) {
        auto* p = static_cast<unsigned char*>(b.allocate(n));
        REQUIRE(p != nullptr);
        CHECK(reinterpret_cast<std::uintptr_t>(p) % (huge ? (std::size_t{2} << 20) : 64) == 0);
        p[0] = 1;
        p[n / 2] = 2;
        p[n - 1] = 3;  // the whole length is writable
        CHECK(int(p[0] + p[n / 2] + p[n - 1]) == 6);
        b.deallocate(p);
        void* q = b.allocate(n);
        if (n <= (std::size_t{256} << 20)) CHECK(q == p);
        b.deallocate(q);
      }
      // A cached mapping serves a smaller pooled request (down to half its size), whole.
      {
        CpuBackend b2(CpuBackendOptions{.threads = 1, .huge_pages = huge});
        void* big = b2.allocate(std::size_t{24} << 20);
        b2.deallocate(big);
        auto* small = static_cast<unsigned char*>(b2.allocate(std::size_t{13} << 20));
        CHECK(small == big);
        small[(std::size_t{13} << 20) - 1] = 7;
        b2.deallocate(small);
      }
      // Tensors on such buffers compute as any other.
      Tensor t(b, DType::f32, Shape{5 << 20});
      b.fill(t, 2.5f);
      const auto h = host_f32(b, t);
      CHECK(h.front() == 2.5f);
      CHECK(h.back() == 2.5f);
    }
  }
}

TEST_CASE("CpuBackend huge_pages: a buffer the full cache cannot keep is unmapped", "[backend]") {
  // cache_bytes 20 MiB holds one 16 MiB buffer: the second goes back to the system at once.
  CpuBackend b(CpuBackendOptions{.threads = 1, .cache_bytes = std::size_t{20} << 20});
  const std::size_t n = std::size_t{16} << 20;
  void* p = b.allocate(n);
  void* q = b.allocate(n);
  REQUIRE((p && q && p != q));
  b.deallocate(p);
  b.deallocate(q);
  // msync fails with ENOMEM on an address no mapping covers (Linux).
  const auto page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  CHECK(msync(p, page, MS_ASYNC) == 0);  // cached, still mapped
  errno = 0;
  CHECK(msync(q, page, MS_ASYNC) == -1);
  CHECK(errno == ENOMEM);
  void* r = b.allocate(n);
  CHECK(r == p);  // the cached one comes back
  b.deallocate(r);
}

BACKEND_TEST("copy_from_host / copy_to_host / fill", "") {
  Backend& b = TestType::get();
  const auto h = random_floats(123, 1);
  CHECK(host_f32(b, tensor_f32(b, Shape{3, 41}, h)) == h);
  std::vector<std::int32_t> hi(50);
  std::iota(hi.begin(), hi.end(), -7);
  CHECK(host_i32(b, tensor_i32(b, Shape{50}, hi)) == hi);

  Tensor t(b, DType::f32, Shape{4, 5});
  b.fill(t, 2.5f);
  CHECK(host_f32(b, t) == std::vector<float>(20, 2.5f));
  b.fill(TensorView(t).slice(1, 2), -1.0f);
  const auto f = host_f32(b, t);
  CHECK(f[4] == 2.5f);
  CHECK(f[5] == -1.0f);
  CHECK(f[9] == -1.0f);
  CHECK(f[10] == 2.5f);

  Tensor i(b, DType::i32, Shape{3});
  REQUIRE_ERROR(b.fill(i, 1.0f), dtype_mismatch, "fill]", "dst must be f32, got i32");
  REQUIRE_ERROR(b.fill(on_other_device(b, t), 1.0f), device, "fill]", "another device");
}

BACKEND_TEST("convert between f32, f16 and bf16 rounds like the reference", "") {
  Backend& b = TestType::get();
  // Random values over a wide range plus ties, subnormals, overflow and non-finite values;
  // more than one conversion block.
  std::vector<float> h = random_floats(40000, 2, -3.0f, 3.0f);
  for (std::size_t i = 0; i < h.size(); i += 3)
    h[i] = std::ldexp(h[i], static_cast<int>(i % 60) - 40);
  const std::vector<float> special{1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f,
                                   1.0f + 0x1p-8f,  0x1p-25f,
                                   3 * 0x1p-26f,    65520.0f,
                                   70000.0f,        -1e30f,
                                   1e-40f,          kInf,
                                   -kInf,           kNaN,
                                   -0.0f,           3.4e38f};
  std::copy(special.begin(), special.end(), h.begin());
  const auto n = static_cast<std::int64_t>(h.size());
  Tensor src = tensor_f32(b, Shape{n}, h);

  Tensor h16(b, DType::f16, Shape{n});
  b.convert(src, h16);
  Tensor bf(b, DType::bf16, Shape{n});
  b.convert(src, bf);
  Tensor bf_from_h16(b, DType::bf16, Shape{n});
  b.convert(h16, bf_from_h16);
  Tensor back(b, DType::f32, Shape{n});
  b.convert(h16, back);
  Tensor back_bf(b, DType::f32, Shape{n});
  b.convert(bf, back_bf);

  const auto g16 = host_u16(b, h16), gbf = host_u16(b, bf), gbf2 = host_u16(b, bf_from_h16);
  const auto gback = host_f32(b, back), gback_bf = host_f32(b, back_bf);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < h.size(); ++i) {
    if (std::isnan(h[i])) {
      bad += !(std::isnan(ref::half_decode(g16[i], ref::kF16)) &&
               std::isnan(ref::half_decode(gbf[i], ref::kBF16)) && std::isnan(gback[i]));
      continue;
    }
    const std::uint16_t w16 = ref::half_round(h[i], ref::kF16);
    const std::uint16_t wbf = ref::half_round(h[i], ref::kBF16);
    const double d16 = ref::half_decode(w16, ref::kF16);
    bad += g16[i] != w16;
    bad += gbf[i] != wbf;
    bad += gbf2[i] != ref::half_round(static_cast<float>(d16), ref::kBF16);
    bad += static_cast<double>(gback[i]) != d16;
    bad += static_cast<double>(gback_bf[i]) != ref::half_decode(wbf, ref::kBF16);
  }
  CHECK(bad == 0);

  // Same dtype: a plain copy, also for integers.
  std::vector<std::int32_t> iv{1, -2, 3, 1 << 30};
  Tensor i1 = tensor_i32(b, Shape{4}, iv);
  Tensor i2(b, DType::i32, Shape{2, 2});
  b.convert(i1, i2);
  CHECK(host_i32(b, i2) == iv);

  Tensor f4(b, DType::f32, Shape{4});
  REQUIRE_ERROR(b.convert(i1, f4), dtype_mismatch, "convert]", "cannot convert i32 to f32");
  Tensor f5(b, DType::f32, Shape{5});
  REQUIRE_ERROR(b.convert(f4, f5), shape_mismatch, "convert]", "[4]", "[5]");
}

BACKEND_TEST("fill_uniform depends only on (seed, index) and is uniform in [-scale, scale]", "") {
  Backend& b = TestType::get();
  const std::int64_t n = 1 << 17;  // several generation blocks
  const auto a = host_f32(b, uniform(b, Shape{n}, 7, 0.5f));
  const auto again = host_f32(b, uniform(b, Shape{n / 2, 2}, 7, 0.5f));  // shape does not matter
  CHECK(a == again);
  const auto prefix = host_f32(b, uniform(b, Shape{300}, 7, 0.5f));
  CHECK(std::equal(prefix.begin(), prefix.end(), a.begin()));
  const auto scaled = host_f32(b, uniform(b, Shape{300}, 7, 2.0f));
  for (std::size_t i = 0; i < 300; ++i) CHECK(scaled[i] == 4.0f * prefix[i]);

  const auto other = host_f32(b, uniform(b, Shape{n}, 8, 0.5f));
  std::size_t same = 0;
  for (std::int64_t i = 0; i < n; ++i) same += a[i] == other[i];
  CHECK(same < static_cast<std::size_t>(n / 1000));

  double mean = 0.0, sq = 0.0;
  float lo = 1.0f, hi = -1.0f;
  for (float v : a) {
    mean += v;
    sq += static_cast<double>(v) * v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  mean /= n;
  const double var = sq / n - mean * mean;
  CHECK(lo >= -0.5f);
  CHECK(hi <= 0.5f);
  CHECK(lo < -0.499f);
  CHECK(hi > 0.499f);
  CHECK(std::abs(mean) < 0.005);
  CHECK(var == Approx(0.25 / 3.0).epsilon(0.02));
  CHECK(std::set<float>(a.begin(), a.end()).size() > static_cast<std::size_t>(n * 0.99));
  CHECK(host_f32(b, uniform(b, Shape{10}, 3, 0.0f)) == std::vector<float>(10, 0.0f));

  Tensor i(b, DType::i32, Shape{4});
  REQUIRE_ERROR(b.fill_uniform(i, 1, 1.0f), dtype_mismatch, "fill_uniform]", "got i32");
}

BACKEND_TEST("gemm: C = alpha A B^T + beta C", "") {
  Backend& b = TestType::get();
  struct Case {
    std::int64_t M, N, K;
  };
  std::uint64_t seed = 10;
  for (Case c : {Case{1, 1, 1}, Case{3, 5, 7}, Case{17, 33, 64}, Case{64, 48, 64}, Case{300, 5, 8},
                 Case{2, 600, 16}}) {
    for (GemmParams p : {GemmParams{1.0f, 0.0f}, GemmParams{0.5f, -2.0f}, GemmParams{-1.5f, 1.0f},
                         GemmParams{0.0f, 3.0f}}) {
      DYNAMIC_SECTION("M=" << c.M << " N=" << c.N << " K=" << c.K << " alpha=" << p.alpha
                           << " beta=" << p.beta) {
        const auto A = random_floats(c.M * c.K, ++seed), B = random_floats(c.N * c.K, ++seed);
        const auto C0 = random_floats(c.M * c.N, ++seed);
        Tensor ta = tensor_f32(b, Shape{c.M, c.K}, A), tb = tensor_f32(b, Shape{c.N, c.K}, B);
        Tensor tc = tensor_f32(b, Shape{c.M, c.N}, C0);
        b.gemm(ta, tb, tc, p);
        auto want = ref::matmul_nt(A, B, c.M, c.N, c.K);
        for (std::size_t i = 0; i < want.size(); ++i) want[i] = p.alpha * want[i] + p.beta * C0[i];
        check_close(host_f32(b, tc), want, 1e-5, 1e-5, "gemm");
      }
    }
  }
  SECTION("beta = 0 ignores C's contents (NaN)") {
    const auto A = random_floats(6 * 4, 1), B = random_floats(5 * 4, 2);
    Tensor tc = tensor_f32(b, Shape{6, 5}, std::vector<float>(30, kNaN));
    b.gemm(tensor_f32(b, Shape{6, 4}, A), tensor_f32(b, Shape{5, 4}, B), tc);
    check_close(host_f32(b, tc), ref::matmul_nt(A, B, 6, 5, 4), 1e-5, 1e-5, "gemm beta=0");
  }
  SECTION("empty extents") {
    Tensor a0(b, DType::f32, Shape{0, 4}), b5 = uniform(b, Shape{5, 4}, 1),
                                           c0(b, DType::f32, Shape{0, 5});
    b.gemm(a0, b5, c0);  // M = 0: nothing to do
    Tensor a3(b, DType::f32, Shape{3, 0}), b2(b, DType::f32, Shape{2, 0});
    const auto C0 = random_floats(6, 3);
    Tensor c = tensor_f32(b, Shape{3, 2}, C0);
    b.gemm(a3, b2, c, GemmParams{1.0f, 2.0f});  // K = 0: C = beta C
    std::vector<double> want(C0.begin(), C0.end());
    for (double& v : want) v *= 2.0;
    check_close(host_f32(b, c), want, 0.0, 0.0, "gemm K=0");
    b.gemm(a3, b2, c);
    CHECK(host_f32(b, c) == std::vector<float>(6, 0.0f));
  }
  SECTION("bad input") {
    Tensor a(b, DType::f32, Shape{4, 7}), w(b, DType::f32, Shape{5, 6}),
        c(b, DType::f32, Shape{4, 5});
    REQUIRE_ERROR(b.gemm(a, w, c), shape_mismatch, "gemm]",
                  "b dimension 1 must be 7, got shape [5, 6]");
    Tensor w7(b, DType::f32, Shape{5, 7}), c6(b, DType::f32, Shape{4, 6});
    REQUIRE_ERROR(b.gemm(a, w7, c6), shape_mismatch, "gemm]", "c dimension 1 must be 5");
    Tensor ai(b, DType::i32, Shape{4, 7});
    REQUIRE_ERROR(b.gemm(ai, w7, c), dtype_mismatch, "gemm]", "a must be f32, got i32");
    Tensor a3(b, DType::f32, Shape{1, 4, 7});
    REQUIRE_ERROR(b.gemm(a3, w7, c), shape_mismatch, "gemm]", "a must have rank 2", "[1, 4, 7]");
    REQUIRE_ERROR(b.gemm(on_other_device(b, a), w7, c), device, "gemm]", "a is on another device");
    TensorView null = a;
    null.data = nullptr;
    REQUIRE_ERROR(b.gemm(null, w7, c), invalid_argument, "gemm]", "a has no buffer");
  }
}

BACKEND_TEST("grouped_gemm: per-expert row blocks, empty experts, untouched tail", "") {
  Backend& b = TestType::get();
  const std::int64_t E = 5, N = 6, K = 8, R = 14;
  const auto X = random_floats(R * K, 20), W = random_floats(E * N * K, 21);
  const std::vector<std::int32_t> off{0, 0, 4,
                                      4, 9, 12};  // experts 0 and 2 empty; rows 12, 13 unused
  Tensor x = tensor_f32(b, Shape{R, K}, X), w = tensor_f32(b, Shape{E, N, K}, W);
  Tensor o = tensor_i32(b, Shape{E + 1}, off);
  Tensor out = tensor_f32(b, Shape{R, N}, std::vector<float>(R * N, 7.0f));
  b.grouped_gemm(x, w, o, out);
  check_close(host_f32(b, out), ref::grouped_matmul_nt(X, W, off, R, N, K, 7.0), 1e-5, 1e-5,
              "grouped_gemm");

  SECTION("every expert empty leaves out untouched") {
    Tensor z = tensor_i32(b, Shape{E + 1}, std::vector<std::int32_t>(E + 1, 0));
    Tensor out2 = tensor_f32(b, Shape{R, N}, std::vector<float>(R * N, 7.0f));
    b.grouped_gemm(x, w, z, out2);
    CHECK(host_f32(b, out2) == std::vector<float>(R * N, 7.0f));
  }
  SECTION("one expert with many rows") {
    const std::int64_t R2 = 300;
    const auto X2 = random_floats(R2 * K, 22), W2 = random_floats(2 * N * K, 23);
    Tensor out2(b, DType::f32, Shape{R2, N});
    b.grouped_gemm(tensor_f32(b, Shape{R2, K}, X2), tensor_f32(b, Shape{2, N, K}, W2),
                   tensor_i32(b, Shape{3}, {0, 0, 300}), out2);
    std::vector<float> W2e(W2.begin() + N * K, W2.end());
    check_close(host_f32(b, out2), ref::matmul_nt(X2, W2e, R2, N, K), 1e-5, 1e-5,
                "grouped_gemm big");
  }
  SECTION("bad input") {
    REQUIRE_ERROR(b.grouped_gemm(x, w, tensor_i32(b, Shape{6}, {0, 5, 3, 4, 9, 12}), out),
                  invalid_argument, "grouped_gemm]", "offsets decrease at expert 1: 5 > 3");
    REQUIRE_ERROR(b.grouped_gemm(x, w, tensor_i32(b, Shape{6}, {0, 0, 4, 4, 9, 15}), out),
                  invalid_argument, "grouped_gemm]", "within 14 rows", "[0, 15]");
    REQUIRE_ERROR(b.grouped_gemm(x, w, tensor_i32(b, Shape{6}, {1, 2, 4, 4, 9, 12}), out),
                  invalid_argument, "grouped_gemm]", "start at 0");
    REQUIRE_ERROR(b.grouped_gemm(x, w, tensor_i32(b, Shape{5}, {0, 0, 4, 4, 9}), out),
                  shape_mismatch, "grouped_gemm]", "offsets dimension 0 must be 6");
    REQUIRE_ERROR(b.grouped_gemm(x, w, tensor_f32(b, Shape{6}, std::vector<float>(6, 0.0f)), out),
                  dtype_mismatch, "grouped_gemm]", "offsets must be i32, got f32");
    REQUIRE_ERROR(b.grouped_gemm(x, Tensor(b, DType::f32, Shape{N, K}), o, out), shape_mismatch,
                  "grouped_gemm]", "w must have rank 3");
    REQUIRE_ERROR(b.grouped_gemm(Tensor(b, DType::f32, Shape{R, K + 1}), w, o, out), shape_mismatch,
                  "grouped_gemm]", "x dimension 1 must be 8");
    REQUIRE_ERROR(b.grouped_gemm(x, w, o, Tensor(b, DType::f32, Shape{R - 1, N})), shape_mismatch,
                  "grouped_gemm]", "out dimension 0 must be 14");
  }
}

BACKEND_TEST("route_topk softmax: top-k, renormalisation, scaling, stats", "[routing]") {
  Backend& b = TestType::get();
  const std::int64_t T = 37, E = 8;
  const auto L = random_floats(T * E, 30, -3.0f, 3.0f);
  struct Case {
    int k;
    bool renorm;
    float scale, eps;
  };
  for (Case c :
       {Case{2, true, 1.0f, 0.0f}, Case{1, true, 1.0f, 0.0f}, Case{3, false, 1.0f, 0.0f},
        Case{8, true, 1.0f, 0.0f}, Case{2, true, 2.5f, 0.1f}, Case{4, false, 0.5f, 0.0f}}) {
    DYNAMIC_SECTION("k=" << c.k << " renorm=" << c.renorm << " scale=" << c.scale
                         << " eps=" << c.eps) {
      RouteParams p;
      p.top_k = c.k;
      p.renormalize = c.renorm;
      p.routed_scaling = c.scale;
      p.renorm_epsilon = c.eps;
      const TopkOut out = run_topk(b, L, T, E, {}, p);
      const ref::Route r = ref::route_topk(to_double(L), T, E, {}, p);
      ref::check_topk(r, out.ids, out.weights, p);
      check_stats(out.stats, r);
      if (c.k == 1 && c.renorm) {  // a single renormalised weight is exactly 1
        CHECK(out.weights == std::vector<float>(T, 1.0f));
      }
    }
  }
}

BACKEND_TEST("route_topk sigmoid: the selection bias chooses but does not weigh", "[routing]") {
  Backend& b = TestType::get();
  RouteParams p;
  p.score = ScoreFunc::sigmoid;
  p.top_k = 1;
  p.renormalize = false;
  const std::vector<float> L{2.0f, 1.0f, 0.0f, -1.0f};
  const std::vector<float> bias{0.0f, 0.0f, 0.0f, 5.0f};
  TopkOut o = run_topk(b, L, 1, 4, bias, p);
  CHECK(o.ids == std::vector<std::int32_t>{3});
  CHECK(o.weights[0] == Approx(ref::sigmoid(-1.0)).epsilon(1e-6));  // unbiased score
  p.top_k = 2;
  o = run_topk(b, L, 1, 4, bias, p);
  CHECK(o.ids == std::vector<std::int32_t>{3, 0});
  CHECK(o.weights[1] == Approx(ref::sigmoid(2.0)).epsilon(1e-6));
  p.renormalize = true;
  o = run_topk(b, L, 1, 4, bias, p);
  const double s3 = ref::sigmoid(-1.0), s0 = ref::sigmoid(2.0);
  CHECK(o.weights[0] == Approx(s3 / (s3 + s0)).epsilon(1e-6));
  // stats: sigmoid scores normalised by the row's sigmoid sum (bias plays no part).
  double ssum = 0.0;
  for (float l : L) ssum += ref::sigmoid(l);
  CHECK(o.stats[3] == Approx(s3 / ssum).epsilon(1e-6));
  const double lse = std::log(std::exp(2.0) + std::exp(1.0) + 1.0 + std::exp(-1.0));
  CHECK(o.stats[4] == Approx(lse * lse).epsilon(1e-6));

  SECTION("random, with bias, renorm eps and routed scaling") {
    const std::int64_t T = 37, E = 16;
    const auto Lr = random_floats(T * E, 31, -4.0f, 4.0f);
    const auto br = random_floats(E, 32, -0.2f, 0.2f);
    RouteParams q;
    q.score = ScoreFunc::sigmoid;
    q.top_k = 4;
    q.renorm_epsilon = 1e-20f;
    q.routed_scaling = 2.5f;
    const TopkOut out = run_topk(b, Lr, T, E, br, q);
    const ref::Route r = ref::route_topk(to_double(Lr), T, E, br, q);
    ref::check_topk(r, out.ids, out.weights, q);
    check_stats(out.stats, r);
  }
}

BACKEND_TEST("route_topk group-limited: top-2 group score and both group masks", "[routing]") {
  Backend& b = TestType::get();
  RouteParams p;
  p.score = ScoreFunc::sigmoid;

  SECTION("group score is the sum of the top two, not the maximum") {
    // sel = sigmoid(0) + bias = [0.9, -0.5 | 0.3, 0.3]: group 0 has the best expert, group 1
    // the best top-2 sum (0.6 > 0.4), so group 1 is kept.
    p.top_k = 1;
    p.n_group = 2;
    p.topk_group = 1;
    const TopkOut o = run_topk(b, {0, 0, 0, 0}, 1, 4, {0.4f, -1.0f, -0.2f, -0.2f}, p);
    CHECK(o.ids == std::vector<std::int32_t>{2});
    CHECK(o.weights[0] == 1.0f);
  }

  SECTION("negative bias-corrected scores: 0.0 and -inf masks differ") {
    // All sigmoid scores 0.5; sel = 0.5 + bias = [-0.1 -0.2 | -0.4 -0.4 | -0.05 -0.3 | -0.5 -0.5].
    // Group sums -0.3, -0.8, -0.35, -1.0 keep groups 0 and 2 (experts 0, 1, 4, 5).
    const std::vector<float> bias{-0.6f, -0.7f, -0.9f, -0.9f, -0.55f, -0.8f, -1.0f, -1.0f};
    p.top_k = 3;
    p.n_group = 4;
    p.topk_group = 2;
    p.routed_scaling = 2.5f;
    p.group_mask = GroupMask::neg_inf;
    TopkOut o = run_topk(b, std::vector<float>(8, 0.0f), 1, 8, bias, p);
    CHECK(o.ids == std::vector<std::int32_t>{4, 0, 1});
    p.group_mask = GroupMask::zero;  // masked experts (0.0) beat every kept one (< 0)
    o = run_topk(b, std::vector<float>(8, 0.0f), 1, 8, bias, p);
    CHECK(o.ids == std::vector<std::int32_t>{2, 3, 6});
    for (float w : o.weights) CHECK(w == Approx(2.5 / 3.0).epsilon(1e-6));
  }

  struct Case {
    int n_group, topk_group, k;
    float bias_lo, bias_hi;
  };
  for (GroupMask mask : {GroupMask::zero, GroupMask::neg_inf}) {
    for (Case c :
         {Case{4, 2, 4, -0.2f, 0.2f}, Case{8, 3, 5, -0.2f, 0.2f}, Case{16, 5, 5, -0.1f, 0.1f},
          Case{4, 2, 4, -1.5f, -0.8f}, Case{4, 1, 3, -1.2f, 0.2f}}) {
      DYNAMIC_SECTION("random mask=" << (mask == GroupMask::zero ? "zero" : "neg_inf")
                                     << " n_group=" << c.n_group << " topk_group=" << c.topk_group
                                     << " k=" << c.k << " bias in [" << c.bias_lo << ", "
                                     << c.bias_hi << "]") {
        const std::int64_t T = 37, E = 16;
        const auto L = random_floats(T * E, 40 + c.n_group, -3.0f, 3.0f);
        const auto bias = random_floats(E, 50 + c.k, c.bias_lo, c.bias_hi);
        RouteParams q;
        q.score = ScoreFunc::sigmoid;
        q.top_k = c.k;
        q.n_group = c.n_group;
        q.topk_group = c.topk_group;
        q.group_mask = mask;
        q.renorm_epsilon = 1e-20f;
        q.routed_scaling = 2.5f;
        const TopkOut out = run_topk(b, L, T, E, bias, q);
        const ref::Route r = ref::route_topk(to_double(L), T, E, bias, q);
        ref::check_topk(r, out.ids, out.weights, q);
        check_stats(out.stats, r);
      }
    }
  }

  SECTION("softmax scores are group-limited too") {
    const std::int64_t T = 20, E = 8;
    const auto L = random_floats(T * E, 60, -3.0f, 3.0f);
    RouteParams q;
    q.top_k = 2;
    q.n_group = 4;
    q.topk_group = 2;
    const TopkOut out = run_topk(b, L, T, E, {}, q);
    const ref::Route r = ref::route_topk(to_double(L), T, E, {}, q);
    ref::check_topk(r, out.ids, out.weights, q);
  }
}

BACKEND_TEST("route_topk noise: seeded, per (token, expert), Gaussian with noise_std",
             "[routing]") {
  Backend& b = TestType::get();
  const std::int64_t T = 37, E = 8;
  const auto L = random_floats(T * E, 70, -2.0f, 2.0f);
  RouteParams p;
  p.top_k = 2;
  p.noise_std = 0.7f;
  p.seed = 123;
  const TopkOut out = run_topk(b, L, T, E, {}, p);

  SECTION("matches the reference with the counter-based normal draws") {
    std::vector<double> noise(static_cast<std::size_t>(T * E));
    for (std::int64_t i = 0; i < T * E; ++i)
      noise[i] = detail::normal(p.seed, static_cast<std::uint64_t>(i));
    const ref::Route r = ref::route_topk(to_double(L), T, E, {}, p, noise);
    ref::check_topk(r, out.ids, out.weights, p);
    check_stats(out.stats, r);
  }
  SECTION("same seed, same routing; another seed, another routing; noise changes routing") {
    const TopkOut again = run_topk(b, L, T, E, {}, p);
    check_bitwise(again.ids, out.ids, "ids");
    check_bitwise(again.weights, out.weights, "weights");
    RouteParams q = p;
    q.seed = 124;
    CHECK(run_topk(b, L, T, E, {}, q).ids != out.ids);
    q.noise_std = 0.0f;
    CHECK(run_topk(b, L, T, E, {}, q).ids != out.ids);
  }
  SECTION("a token's noise does not depend on the batch size") {
    const std::vector<float> head(L.begin(), L.begin() + 20 * E);
    const TopkOut part = run_topk(b, head, 20, E, {}, p);
    check_bitwise(part.ids, std::vector<std::int32_t>(out.ids.begin(), out.ids.begin() + 40),
                  "ids");
    check_bitwise(part.weights, std::vector<float>(out.weights.begin(), out.weights.begin() + 40),
                  "weights");
  }
  SECTION("noise statistics") {
    // Two experts, zero logits, top-1 without renormalisation: the weight is
    // sigmoid(|n0 - n1|), so logit(w) recovers |n0 - n1| ~ half-normal with scale sigma*sqrt(2).
    const float sigma = 0.8f;
    double sum_abs = 0.0;
    int first = 0, n = 0;
    for (std::uint64_t seed = 1; seed <= 8; ++seed) {
      RouteParams q;
      q.top_k = 1;
      q.renormalize = false;
      q.noise_std = sigma;
      q.seed = seed;
      const TopkOut o = run_topk(b, std::vector<float>(64 * 2, 0.0f), 64, 2, {}, q);
      for (int t = 0; t < 64; ++t) {
        const double w = o.weights[t];
        REQUIRE(w >= 0.5);
        sum_abs += std::log(w / (1.0 - w));
        first += o.ids[t] == 0;
        ++n;
      }
    }
    const double mean_abs = sum_abs / n;  // E|N(0, 2 sigma^2)| = 2 sigma / sqrt(pi)
    CHECK(mean_abs == Approx(2.0 * sigma / std::sqrt(M_PI)).epsilon(0.1));
    CHECK(first > n * 4 / 10);
    CHECK(first < n * 6 / 10);
  }
}

BACKEND_TEST("route_topk rejects bad parameters and non-finite logits", "[routing][errors]") {
  Backend& b = TestType::get();
  const std::int64_t T = 3, E = 8;
  Tensor L = uniform(b, Shape{T, E}, 80);
  Tensor ids(b, DType::i32, Shape{T, 2}), w(b, DType::f32, Shape{T, 2}),
      s(b, DType::f32, Shape{E + 1});
  auto with = [](auto f) {
    RouteParams p;
    f(p);
    return p;
  };
  auto route = [&](const RouteParams& p) {
    Tensor i2(b, DType::i32, Shape{T, p.top_k}), w2(b, DType::f32, Shape{T, p.top_k});
    b.route_topk(L, TensorView{}, p, i2, w2, s);
  };
  REQUIRE_ERROR(route(with([](RouteParams& p) { p.top_k = 0; })), invalid_argument, "route_topk]",
                "top_k=0 outside [1, num_experts=8]");
  REQUIRE_ERROR(route(with([](RouteParams& p) { p.top_k = 9; })), invalid_argument, "route_topk]",
                "top_k=9 outside [1, num_experts=8]");
  REQUIRE_ERROR(route(with([](RouteParams& p) { p.n_group = 3; })), invalid_argument, "route_topk]",
                "n_group=3 does not divide num_experts=8");
  REQUIRE_ERROR(route(with([](RouteParams& p) {
                  p.n_group = 4;
                  p.topk_group = 5;
                })),
                invalid_argument, "route_topk]", "topk_group=5 outside [1, n_group=4]");
  REQUIRE_ERROR(route(with([](RouteParams& p) {
                  p.n_group = 4;
                  p.topk_group = 0;
                })),
                invalid_argument, "route_topk]", "topk_group=0");
  REQUIRE_ERROR(route(with([](RouteParams& p) {
                  p.n_group = 4;
                  p.topk_group = 1;
                  p.top_k = 3;
                })),
                invalid_argument, "route_topk]", "top_k=3 exceeds the 2 experts");
  REQUIRE_ERROR(route(with([](RouteParams& p) { p.noise_std = -1.0f; })), invalid_argument,
                "route_topk]", "noise_std=-1");
  REQUIRE_ERROR(route(with([](RouteParams& p) { p.renorm_epsilon = -1.0f; })), invalid_argument,
                "route_topk]", "renorm_epsilon=-1");
  REQUIRE_ERROR(route(with([](RouteParams& p) { p.routed_scaling = kNaN; })), invalid_argument,
                "route_topk]", "routed_scaling");

  const RouteParams p;
  REQUIRE_ERROR(b.route_topk(L, TensorView{}, p, Tensor(b, DType::i32, Shape{T, 3}), w, s),
                shape_mismatch, "route_topk]", "ids dimension 1 must be 2");
  REQUIRE_ERROR(b.route_topk(L, TensorView{}, p, Tensor(b, DType::f32, Shape{T, 2}), w, s),
                dtype_mismatch, "route_topk]", "ids must be i32, got f32");
  REQUIRE_ERROR(b.route_topk(L, TensorView{}, p, ids, Tensor(b, DType::f32, Shape{T + 1, 2}), s),
                shape_mismatch, "route_topk]", "weights");
  REQUIRE_ERROR(b.route_topk(L, TensorView{}, p, ids, w, Tensor(b, DType::f32, Shape{E})),
                shape_mismatch, "route_topk]", "stats must hold 9 values, got 8");
  REQUIRE_ERROR(b.route_topk(L, Tensor(b, DType::f32, Shape{E - 1}), p, ids, w, s), shape_mismatch,
                "route_topk]", "bias must hold 8 values, got 7");
  REQUIRE_ERROR(b.route_topk(Tensor(b, DType::f16, Shape{T, E}), TensorView{}, p, ids, w, s),
                dtype_mismatch, "route_topk]", "logits must be f32, got f16");
  REQUIRE_ERROR(b.route_topk(on_other_device(b, L), TensorView{}, p, ids, w, s), device,
                "route_topk]", "logits is on another device");

  for (float bad : {kNaN, kInf, -kInf}) {
    auto h = host_f32(b, L);
    h[1 * E + 2] = bad;
    Tensor Lb = tensor_f32(b, Shape{T, E}, h);
    const std::string v = std::isnan(bad) ? "is nan" : (bad > 0 ? "is inf" : "is -inf");
    REQUIRE_ERROR(b.route_topk(Lb, TensorView{}, p, ids, w, s), numeric, "route_topk]",
                  "router logit [1, 2] " + v);
  }
}

BACKEND_TEST("route_topk and route_expert_choice on an empty batch", "[routing]") {
  Backend& b = TestType::get();
  const std::int64_t E = 4;
  Tensor L(b, DType::f32, Shape{0, E});
  Tensor s = tensor_f32(b, Shape{E + 1}, std::vector<float>(E + 1, 9.0f));
  b.route_topk(L, TensorView{}, RouteParams{}, Tensor(b, DType::i32, Shape{0, 2}),
               Tensor(b, DType::f32, Shape{0, 2}), s);
  CHECK(host_f32(b, s) == std::vector<float>(E + 1, 0.0f));
  b.fill(s, 9.0f);
  b.route_expert_choice(L, 3, Tensor(b, DType::i32, Shape{0, E}),
                        Tensor(b, DType::f32, Shape{0, E}), s);
  CHECK(host_f32(b, s) == std::vector<float>(E + 1, 0.0f));
}

BACKEND_TEST("route_expert_choice: each expert takes its top-C tokens", "[routing]") {
  Backend& b = TestType::get();
  const std::int64_t T = 37, E = 6;
  const auto L = random_floats(T * E, 90, -3.0f, 3.0f);
  Tensor tl = tensor_f32(b, Shape{T, E}, L);
  for (std::int64_t C : {1, 5, 37, 100}) {
    DYNAMIC_SECTION("capacity " << C) {
      Tensor ids(b, DType::i32, Shape{T, E}), w(b, DType::f32, Shape{T, E}),
          s(b, DType::f32, Shape{E + 1});
      b.route_expert_choice(tl, C, ids, w, s);
      const ref::Route r = ref::expert_choice(to_double(L), T, E, C);
      const auto hid = host_i32(b, ids);
      ref::check_expert_choice(r, hid, host_f32(b, w));
      check_stats(host_f32(b, s), r);
      std::int64_t taken = 0;
      for (std::int32_t e : hid) taken += e >= 0;
      CHECK(taken == E * std::min(C, T));
    }
  }
  SECTION("bad input") {
    Tensor ids(b, DType::i32, Shape{T, E}), w(b, DType::f32, Shape{T, E}),
        s(b, DType::f32, Shape{E + 1});
    REQUIRE_ERROR(b.route_expert_choice(tl, 0, ids, w, s), invalid_argument, "route_expert_choice]",
                  "capacity=0 must be >= 1");
    REQUIRE_ERROR(b.route_expert_choice(tl, 2, Tensor(b, DType::i32, Shape{T, E - 1}), w, s),
                  shape_mismatch, "route_expert_choice]", "ids dimension 1 must be 6");
    REQUIRE_ERROR(b.route_expert_choice(tl, 2, ids, w, Tensor(b, DType::f32, Shape{E})),
                  shape_mismatch, "route_expert_choice]", "stats");
    auto h = L;
    h[5 * E + 1] = kNaN;
    REQUIRE_ERROR(b.route_expert_choice(tensor_f32(b, Shape{T, E}, h), 2, ids, w, s), numeric,
                  "route_expert_choice]", "router logit [5, 1] is nan");
    h[5 * E + 1] = -kInf;
    REQUIRE_ERROR(b.route_expert_choice(tensor_f32(b, Shape{T, E}, h), 2, ids, w, s), numeric,
                  "route_expert_choice]", "is -inf");
  }
}

namespace {

struct Planned {
  std::vector<std::int32_t> counts, offsets, row_token, slot_row;
};

Planned run_plan(Backend& b, const std::vector<std::int32_t>& ids, std::int64_t T, std::int64_t k,
                 std::int64_t E, std::int64_t cap, std::int64_t extra_rows = 0) {
  Tensor c(b, DType::i32, Shape{E}), o(b, DType::i32, Shape{E + 1});
  Tensor rt(b, DType::i32, Shape{T * k + extra_rows}), sr(b, DType::i32, Shape{T * k});
  b.plan_dispatch(tensor_i32(b, Shape{T, k}, ids), cap, c, o, rt, sr);
  return {host_i32(b, c), host_i32(b, o), host_i32(b, rt), host_i32(b, sr)};
}

/// The plan's invariants against the reference's counts and kept slots.
void check_plan(const Planned& p, const std::vector<std::int32_t>& ids, std::int64_t T,
                std::int64_t k, std::int64_t E, std::int64_t cap) {
  const ref::Dispatch d = ref::plan(ids, T, k, E, cap);
  CHECK(p.counts == d.counts);
  REQUIRE(p.offsets.size() == static_cast<std::size_t>(E + 1));
  CHECK(p.offsets[0] == 0);
  for (std::int64_t e = 0; e < E; ++e) CHECK(p.offsets[e + 1] == p.offsets[e] + d.counts[e]);
  std::vector<int> used(static_cast<std::size_t>(d.rows), 0);
  std::size_t bad = 0;
  for (std::int64_t i = 0; i < T * k; ++i) {
    const std::int32_t r = p.slot_row[i];
    if (!d.kept[i]) {
      bad += r != -1;
      continue;
    }
    const std::int32_t e = ids[i];
    if (r < p.offsets[e] || r >= p.offsets[e + 1]) {
      ++bad;
      continue;
    }
    ++used[r];
    bad += p.row_token[r] != i / k;
  }
  CHECK(bad == 0);
  CHECK(std::all_of(used.begin(), used.end(), [](int u) { return u == 1; }));  // a permutation
}

}  // namespace

BACKEND_TEST("plan_dispatch: counting sort with slot-major capacity priority", "[routing]") {
  Backend& b = TestType::get();
  SECTION("first choices beat second choices, earlier tokens first") {
    // capacity 2: slot 0 fills experts 0 and 1 (tokens 0..3), so every second choice of
    // experts 0 and 1 is dropped, even token 0's; token 2's second choice (expert 2) fits.
    const std::vector<std::int32_t> ids{0, 1, 1, 0, 0, 2, 1, 0};
    const Planned p = run_plan(b, ids, 4, 2, 3, 2);
    CHECK(p.counts == std::vector<std::int32_t>{2, 2, 1});
    CHECK(p.offsets == std::vector<std::int32_t>{0, 2, 4, 5});
    for (std::size_t i : {1u, 3u, 7u}) CHECK(p.slot_row[i] == -1);
    for (std::size_t i : {0u, 2u, 4u, 5u, 6u}) CHECK(p.slot_row[i] >= 0);
    check_plan(p, ids, 4, 2, 3, 2);
  }
  SECTION("random ids with -1, several capacities") {
    const std::int64_t T = 50, k = 3, E = 7;
    std::mt19937 g(5);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(T * k));
    for (auto& e : ids) e = (g() % 10 == 0) ? -1 : static_cast<std::int32_t>(g() % E);
    ids[0] = ids[1] = ids[2] = 3;  // skewed toward expert 3
    for (std::int64_t t = 10; t < 40; ++t) ids[t * k] = 3;
    for (std::int64_t cap : {0, -5, 1, 4, 13, 1000}) {
      INFO("capacity " << cap);
      check_plan(run_plan(b, ids, T, k, E, cap, 5), ids, T, k, E, cap);
    }
  }
  SECTION("empty batch") {
    const Planned p = run_plan(b, {}, 0, 2, 3, 0);
    CHECK(p.counts == std::vector<std::int32_t>{0, 0, 0});
    CHECK(p.offsets == std::vector<std::int32_t>{0, 0, 0, 0});
  }
  SECTION("bad input") {
    Tensor c(b, DType::i32, Shape{7}), o(b, DType::i32, Shape{8}), rt(b, DType::i32, Shape{6}),
        sr(b, DType::i32, Shape{6});
    REQUIRE_ERROR(b.plan_dispatch(tensor_i32(b, Shape{3, 2}, {0, 1, 2, 3, 7, 0}), 0, c, o, rt, sr),
                  out_of_range, "plan_dispatch]", "expert id 7 at token 2 outside [0, 7)");
    REQUIRE_ERROR(b.plan_dispatch(tensor_i32(b, Shape{3, 2}, {0, -2, 2, 3, 1, 0}), 0, c, o, rt, sr),
                  out_of_range, "plan_dispatch]", "expert id -2 at token 0");
    Tensor ids = tensor_i32(b, Shape{3, 2}, {0, 1, 2, 3, 4, 5});
    REQUIRE_ERROR(b.plan_dispatch(ids, 0, c, Tensor(b, DType::i32, Shape{7}), rt, sr),
                  shape_mismatch, "plan_dispatch]", "offsets must hold 8 values, got 7");
    REQUIRE_ERROR(b.plan_dispatch(ids, 0, c, o, rt, Tensor(b, DType::i32, Shape{5})),
                  shape_mismatch, "plan_dispatch]", "must hold 6 values");
    REQUIRE_ERROR(b.plan_dispatch(ids, 0, Tensor(b, DType::f32, Shape{7}), o, rt, sr),
                  dtype_mismatch, "plan_dispatch]", "counts must be i32, got f32");
  }
}

BACKEND_TEST("gather_rows", "") {
  Backend& b = TestType::get();
  const auto X = random_floats(10 * 6, 100);
  Tensor x = tensor_f32(b, Shape{10, 6}, X);
  const std::vector<std::int32_t> rt{9, 0, 3, 3, 7, 0, 1, -5};  // last entry past out's rows
  Tensor out(b, DType::f32, Shape{7, 6});
  b.gather_rows(x, tensor_i32(b, Shape{8}, rt), out);
  std::vector<float> want;
  for (int r = 0; r < 7; ++r)
    want.insert(want.end(), X.begin() + rt[r] * 6, X.begin() + rt[r] * 6 + 6);
  CHECK(host_f32(b, out) == want);
  REQUIRE_ERROR(b.gather_rows(x, tensor_i32(b, Shape{7}, {0, 1, 2, 10, 0, 0, 0}), out),
                out_of_range, "gather_rows]", "row 3 names token 10 of 10");
  REQUIRE_ERROR(b.gather_rows(x, tensor_i32(b, Shape{7}, {0, -1, 2, 1, 0, 0, 0}), out),
                out_of_range, "gather_rows]", "row 1 names token -1");
  REQUIRE_ERROR(b.gather_rows(x, tensor_i32(b, Shape{6}, {0, 1, 2, 1, 0, 0}), out), shape_mismatch,
                "gather_rows]", "row_token holds 6 rows, out needs 7");
  REQUIRE_ERROR(b.gather_rows(x, tensor_i32(b, Shape{7}, {9, 0, 3, 3, 7, 0, 1}),
                              Tensor(b, DType::f32, Shape{7, 5})),
                shape_mismatch, "gather_rows]", "out dimension 1 must be 6");
}

BACKEND_TEST("combine: weighted sum of expert rows per token, dropped slots skipped", "") {
  Backend& b = TestType::get();
  const std::int64_t R = 9, d = 5, T = 6, k = 3;
  const auto Y = random_floats(R * d, 110), W = random_floats(T * k, 111, 0.0f, 1.0f);
  const std::vector<std::int32_t> sr{0, 4, -1, 8, -1, -1, 2, 2, 1, -1, 3, 5, 7, 6, 0, -1, -1, -1};
  const auto prev = random_floats(T * d, 112);
  for (bool acc : {false, true}) {
    DYNAMIC_SECTION("accumulate=" << acc) {
      // Without accumulate the previous contents must not leak, even NaN.
      Tensor out = tensor_f32(b, Shape{T, d}, acc ? prev : std::vector<float>(T * d, kNaN));
      b.combine(tensor_f32(b, Shape{R, d}, Y), tensor_i32(b, Shape{T, k}, sr),
                tensor_f32(b, Shape{T, k}, W), out, acc);
      std::vector<double> want(static_cast<std::size_t>(T * d), 0.0);
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t c = 0; c < d; ++c) {
          double s = acc ? prev[t * d + c] : 0.0;
          for (std::int64_t j = 0; j < k; ++j)
            if (sr[t * k + j] >= 0)
              s += static_cast<double>(W[t * k + j]) * Y[sr[t * k + j] * d + c];
          want[t * d + c] = s;
        }
      check_close(host_f32(b, out), want, 1e-6, 1e-6, "combine");
    }
  }
  SECTION("bad input") {
    Tensor y = tensor_f32(b, Shape{R, d}, Y), w = tensor_f32(b, Shape{T, k}, W),
           out(b, DType::f32, Shape{T, d});
    auto bad = sr;
    bad[4] = 9;
    REQUIRE_ERROR(b.combine(y, tensor_i32(b, Shape{T, k}, bad), w, out, false), out_of_range,
                  "combine]", "slot 4 names row 9 of 9");
    bad[4] = -3;
    REQUIRE_ERROR(b.combine(y, tensor_i32(b, Shape{T, k}, bad), w, out, false), out_of_range,
                  "combine]", "slot 4 names row -3");
    REQUIRE_ERROR(
        b.combine(y, tensor_i32(b, Shape{T * k - 1}, std::vector<std::int32_t>(T * k - 1, 0)), w,
                  out, false),
        shape_mismatch, "combine]", "slot_row must hold 18 values");
    REQUIRE_ERROR(b.combine(y, tensor_i32(b, Shape{T, k}, sr),
                            Tensor(b, DType::f32, Shape{T - 1, k}), out, false),
                  shape_mismatch, "combine]", "weights dimension 0 must be 6");
    REQUIRE_ERROR(b.combine(Tensor(b, DType::f32, Shape{R, d + 1}), tensor_i32(b, Shape{T, k}, sr),
                            w, out, false),
                  shape_mismatch, "combine]", "y dimension 1 must be 5");
  }
}

BACKEND_TEST("silu_mul: silu(gate) * up on [gate | up] rows", "") {
  Backend& b = TestType::get();
  const std::int64_t R = 7, F = 5;
  auto X = random_floats(R * 2 * F, 120, -6.0f, 6.0f);
  X[0] = 100.0f;
  X[1] = -100.0f;
  X[2] = 30.0f;
  X[3] = -30.0f;
  Tensor out(b, DType::f32, Shape{R, F});
  b.silu_mul(tensor_f32(b, Shape{R, 2 * F}, X), out);
  std::vector<double> want(static_cast<std::size_t>(R * F));
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t c = 0; c < F; ++c)
      want[r * F + c] = ref::silu(X[r * 2 * F + c]) * X[r * 2 * F + F + c];
  check_close(host_f32(b, out), want, 1e-6, 1e-5, "silu_mul");
  REQUIRE_ERROR(b.silu_mul(Tensor(b, DType::f32, Shape{R, 2 * F + 1}), out), shape_mismatch,
                "silu_mul]", "in dimension 1 must be 10");
  REQUIRE_ERROR(b.silu_mul(Tensor(b, DType::f32, Shape{R + 1, 2 * F}), out), shape_mismatch,
                "silu_mul]", "out dimension 0 must be 8");
}

BACKEND_TEST("gelu: erf form, in place allowed", "") {
  Backend& b = TestType::get();
  auto X = random_floats(3 * 4 * 50, 130, -6.0f, 6.0f);
  X[0] = 0.0f;
  X[1] = -10.0f;
  X[2] = 10.0f;
  Tensor x = tensor_f32(b, Shape{3, 4, 50}, X);
  std::vector<double> want(X.size());
  for (std::size_t i = 0; i < X.size(); ++i) want[i] = ref::gelu(X[i]);
  Tensor out(b, DType::f32, Shape{3, 4, 50});
  b.gelu(x, out);
  check_close(host_f32(b, out), want, 1e-6, 1e-5, "gelu");
  b.gelu(x, x);
  check_close(host_f32(b, x), want, 1e-6, 1e-5, "gelu in place");
  // gelu(1) = 0.8413447 (erf form), tanh form would give 0.8411920.
  Tensor one = tensor_f32(b, Shape{1}, {1.0f});
  b.gelu(one, one);
  CHECK(host_f32(b, one)[0] == Approx(0.8413447460685429).epsilon(1e-6));
  REQUIRE_ERROR(b.gelu(x, Tensor(b, DType::f32, Shape{3, 200})), shape_mismatch, "gelu]",
                "must match");
}

BACKEND_TEST("softmax: rows of the last dimension, stable, in place", "") {
  Backend& b = TestType::get();
  for (Shape s : {Shape{5, 7}, Shape{2, 3, 4}, Shape{9}}) {
    DYNAMIC_SECTION("shape " << s.str()) {
      const std::int64_t n = s[s.rank() - 1], rows = s.numel() / n;
      auto X = random_floats(static_cast<std::size_t>(s.numel()), 140, -5.0f, 5.0f);
      X[0] = 1000.0f;  // would overflow without the max subtraction
      X[1] = 1001.0f;
      if (n > 2) X[2] = -kInf;  // a masked entry gets probability 0
      Tensor x = tensor_f32(b, s, X);
      b.softmax(x);
      std::vector<double> want(X.size());
      for (std::int64_t r = 0; r < rows; ++r) {
        double mx = -1e300, sum = 0.0;
        for (std::int64_t i = 0; i < n; ++i) mx = std::max(mx, static_cast<double>(X[r * n + i]));
        for (std::int64_t i = 0; i < n; ++i) sum += std::exp(X[r * n + i] - mx);
        for (std::int64_t i = 0; i < n; ++i) want[r * n + i] = std::exp(X[r * n + i] - mx) / sum;
      }
      check_close(host_f32(b, x), want, 1e-7, 1e-5, "softmax");
    }
  }
  REQUIRE_ERROR(b.softmax(Tensor(b, DType::i32, Shape{2, 2})), dtype_mismatch, "softmax]",
                "got i32");
}

BACKEND_TEST("rms_norm: x * rsqrt(mean(x^2) + eps) * weight", "") {
  Backend& b = TestType::get();
  const std::int64_t T = 5, d = 16;
  auto X = random_floats(T * d, 150, -3.0f, 3.0f);
  std::fill(X.begin() + 2 * d, X.begin() + 3 * d, 0.0f);  // a zero row stays finite (zero)
  const auto Wt = random_floats(d, 151, 0.5f, 1.5f);
  const float eps = 1e-5f;
  std::vector<double> want;
  for (std::int64_t t = 0; t < T; ++t) {
    const auto r = ref::rms_norm_row(X.data() + t * d, d, Wt.data(), eps);
    want.insert(want.end(), r.begin(), r.end());
  }
  Tensor x = tensor_f32(b, Shape{T, d}, X), w = tensor_f32(b, Shape{d}, Wt),
         out(b, DType::f32, Shape{T, d});
  b.rms_norm(x, w, eps, out);
  check_close(host_f32(b, out), want, 1e-6, 1e-5, "rms_norm");
  b.rms_norm(x, w, eps, x);  // in place
  check_close(host_f32(b, x), want, 1e-6, 1e-5, "rms_norm in place");
  REQUIRE_ERROR(b.rms_norm(x, w, 0.0f, out), invalid_argument, "rms_norm]", "eps=0 must be > 0");
  REQUIRE_ERROR(b.rms_norm(x, Tensor(b, DType::f32, Shape{d - 1}), eps, out), shape_mismatch,
                "rms_norm]", "weight must hold 16 values, got 15");
  REQUIRE_ERROR(b.rms_norm(x, w, eps, Tensor(b, DType::f32, Shape{T, d + 1})), shape_mismatch,
                "rms_norm]", "[5, 16]", "[5, 17]");
}

BACKEND_TEST("add and add_scaled_rows", "") {
  Backend& b = TestType::get();
  const std::int64_t T = 6, d = 7;
  const auto A = random_floats(T * d, 160), B = random_floats(T * d, 161),
             S = random_floats(T, 162, -4.0f, 4.0f);
  Tensor a = tensor_f32(b, Shape{T, d}, A), bb = tensor_f32(b, Shape{T, d}, B),
         out(b, DType::f32, Shape{T, d});
  b.add(a, bb, out);
  std::vector<double> want(A.size());
  for (std::size_t i = 0; i < A.size(); ++i) want[i] = static_cast<double>(A[i]) + B[i];
  check_close(host_f32(b, out), want, 0.0, 1e-7, "add");
  b.add(a, bb, a);  // in place
  check_close(host_f32(b, a), want, 0.0, 1e-7, "add in place");
  REQUIRE_ERROR(b.add(a, Tensor(b, DType::f32, Shape{d, T}), out), shape_mismatch, "add]", "[6, 7]",
                "[7, 6]");
  REQUIRE_ERROR(b.add(a, Tensor(b, DType::i32, Shape{T, d}), out), dtype_mismatch, "add]",
                "b must be f32");

  for (RowScale f : {RowScale::identity, RowScale::sigmoid}) {
    for (Shape ss : {Shape{T}, Shape{T, 1}}) {
      DYNAMIC_SECTION((f == RowScale::identity ? "identity" : "sigmoid") << " scale " << ss.str()) {
        Tensor o = tensor_f32(b, Shape{T, d}, B);
        b.add_scaled_rows(tensor_f32(b, Shape{T, d}, A), tensor_f32(b, ss, S), f, o);
        std::vector<double> w2(A.size());
        for (std::int64_t t = 0; t < T; ++t) {
          const double s = f == RowScale::identity ? S[t] : ref::sigmoid(S[t]);
          for (std::int64_t c = 0; c < d; ++c) w2[t * d + c] = B[t * d + c] + s * A[t * d + c];
        }
        check_close(host_f32(b, o), w2, 1e-6, 1e-6, "add_scaled_rows");
      }
    }
  }
  REQUIRE_ERROR(b.add_scaled_rows(a, Tensor(b, DType::f32, Shape{T + 1}), RowScale::identity, out),
                shape_mismatch, "add_scaled_rows]", "scale must hold 6 values, got 7");
}

BACKEND_TEST("embedding: row lookup, ids outside the vocabulary are errors", "") {
  Backend& b = TestType::get();
  const std::int64_t V = 11, d = 6;
  const auto Tb = random_floats(V * d, 170);
  Tensor table = tensor_f32(b, Shape{V, d}, Tb);
  const std::vector<std::int32_t> ids{0, 10, 3, 3, 7};
  Tensor out(b, DType::f32, Shape{5, d});
  b.embedding(table, tensor_i32(b, Shape{5}, ids), out);
  std::vector<float> want;
  for (auto i : ids) want.insert(want.end(), Tb.begin() + i * d, Tb.begin() + (i + 1) * d);
  CHECK(host_f32(b, out) == want);
  b.embedding(table, Tensor(b, DType::i32, Shape{0}), Tensor(b, DType::f32, Shape{0, d}));
  REQUIRE_ERROR(b.embedding(table, tensor_i32(b, Shape{5}, {0, 1, 2, 11, 4}), out), out_of_range,
                "embedding]", "token id 11 at position 3 outside vocabulary [0, 11)");
  REQUIRE_ERROR(b.embedding(table, tensor_i32(b, Shape{5}, {0, -1, 2, 1, 4}), out), out_of_range,
                "embedding]", "token id -1 at position 1");
  REQUIRE_ERROR(b.embedding(table, tensor_f32(b, Shape{5}, std::vector<float>(5, 0.0f)), out),
                dtype_mismatch, "embedding]", "ids must be i32, got f32");
  REQUIRE_ERROR(b.embedding(table, tensor_i32(b, Shape{4}, {0, 1, 2, 3}), out), shape_mismatch,
                "embedding]", "out dimension 0 must be 4");
  REQUIRE_ERROR(b.embedding(on_other_device(b, table), tensor_i32(b, Shape{5}, ids), out), device,
                "embedding]", "table is on another device");
}

namespace {

/// Weight layouts this backend accepts: row_major always, plus every other layout its
/// relayout supports.
std::vector<Layout> weight_layouts(Backend& b) {
  std::vector<Layout> ls{Layout::row_major};
  Tensor src(b, DType::f32, Shape{2, 3});
  b.fill(src, 0.0f);
  try {
    Tensor dst(b, DType::f32, Shape{2, 3}, Layout::panel32);
    b.relayout(src, dst);
    ls.push_back(Layout::panel32);
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::unsupported);
    CHECK(b.weight_layout() == Layout::row_major);
  }
  return ls;
}

Tensor weights_in(Backend& b, Shape s, const std::vector<float>& h, Layout l) {
  Tensor t(b, DType::f32, s, l);
  b.copy_from_host(t, h.data());
  return t;
}

const char* layout_name(Layout l) {
  return l == Layout::row_major ? "row_major" : "panel32";
}

}  // namespace

BACKEND_TEST("weight layouts: logical host copies, relayout and prepare_weights", "[layout]") {
  Backend& b = TestType::get();
  const Shape s{3, 37, 5};  // 37 rows: one full and one partial panel per matrix
  const auto h = random_floats(static_cast<std::size_t>(s.numel()), 500);
  for (Layout l : weight_layouts(b)) {
    DYNAMIC_SECTION(layout_name(l)) {
      Tensor w = weights_in(b, s, h, l);
      CHECK(w.layout() == l);
      CHECK(host_f32(b, w) == h);  // copies speak the logical row-major order
      Tensor rm(b, DType::f32, s), back(b, DType::f32, s, l);
      b.relayout(w, rm);
      CHECK(host_f32(b, rm) == h);
      b.relayout(rm, back);
      CHECK(host_f32(b, back) == h);
      // Whole matrices of a stack slice in any layout.
      const TensorView tail = TensorView(w).slice(1, 3);
      std::vector<float> got(static_cast<std::size_t>(tail.numel()));
      b.copy_to_host(got.data(), tail);
      CHECK(std::equal(got.begin(), got.end(), h.begin() + 37 * 5));
    }
  }
  Tensor w = tensor_f32(b, s, h);
  Tensor p = prepare_weights(b, w);
  CHECK(p.layout() == b.weight_layout());
  CHECK(host_f32(b, p) == h);
  CHECK(prepare_weights(b, p).view().data == p.view().data);  // already prepared: no copy
  Tensor vec = tensor_f32(b, Shape{5}, {1, 2, 3, 4, 5});
  CHECK(prepare_weights(b, vec).view().data == vec.view().data);  // not a matrix: untouched

  REQUIRE_ERROR(b.relayout(w, Tensor(b, DType::f32, Shape{3, 5, 37})), shape_mismatch, "relayout]",
                "[3, 37, 5]", "[3, 5, 37]");
  REQUIRE_ERROR(b.relayout(vec, Tensor(b, DType::f32, Shape{5})), shape_mismatch, "relayout]",
                "rank >= 2");
}

BACKEND_TEST("gemm and grouped_gemm take weights in every layout", "[layout]") {
  Backend& b = TestType::get();
  struct Case {
    std::int64_t M, N, K;
  };
  std::uint64_t seed = 600;
  for (Layout l : weight_layouts(b)) {
    for (Case c : {Case{1, 1, 1}, Case{5, 37, 7}, Case{6, 32, 16}, Case{7, 33, 64}, Case{12, 64, 3},
                   Case{13, 100, 20}, Case{25, 70, 64}, Case{300, 40, 8},
                   // Past one row tile (252 rows) with a few rows over, and over two.
                   Case{256, 40, 8}, Case{258, 33, 300}, Case{510, 20, 17},
                   // Several column tiles: each accumulates in a scratch tile, copied out.
                   Case{40, 400, 33}, Case{7, 230, 270},
                   // K = 0 (C = beta C), after earlier products left a thread's scratch tile dirty.
                   Case{20, 400, 0}, Case{3, 5, 0}}) {
      DYNAMIC_SECTION("gemm " << layout_name(l) << " M=" << c.M << " N=" << c.N << " K=" << c.K) {
        const auto A = random_floats(c.M * c.K, ++seed), B = random_floats(c.N * c.K, ++seed);
        const auto C0 = random_floats(c.M * c.N, ++seed);
        for (GemmParams p : {GemmParams{1.0f, 0.0f}, GemmParams{0.5f, -2.0f}}) {
          Tensor tc = tensor_f32(b, Shape{c.M, c.N}, C0);
          b.gemm(tensor_f32(b, Shape{c.M, c.K}, A), weights_in(b, Shape{c.N, c.K}, B, l), tc, p);
          auto want = ref::matmul_nt(A, B, c.M, c.N, c.K);
          for (std::size_t i = 0; i < want.size(); ++i)
            want[i] = p.alpha * want[i] + p.beta * C0[i];
          check_close(host_f32(b, tc), want, 1e-5, 1e-5, "gemm");
        }
      }
    }
    for (std::vector<std::int32_t> off :
         {std::vector<std::int32_t>{0, 0, 7, 20, 40}, std::vector<std::int32_t>{0, 1, 2, 3, 300},
          std::vector<std::int32_t>{0, 0, 0, 0, 0}, std::vector<std::int32_t>{0, 5, 261, 261, 520},
          std::vector<std::int32_t>{0, 9, 40, 40, 75},
          std::vector<std::int32_t>{0, 8, 8, 30, 30}}) {
      DYNAMIC_SECTION("grouped_gemm " << layout_name(l) << " rows " << off.back()) {
        // 450 columns: several column tiles per expert. The 30-row case has K = 0: zero rows.
        const std::int64_t E = 4, N = off.back() == 75 || off.back() == 30 ? 450 : 37,
                           K = off.back() == 30 ? 0 : 16, R = std::max<std::int64_t>(off.back(), 1);
        const auto X = random_floats(R * K, ++seed), W = random_floats(E * N * K, ++seed);
        Tensor out = tensor_f32(b, Shape{R, N}, std::vector<float>(R * N, 5.0f));
        b.grouped_gemm(tensor_f32(b, Shape{R, K}, X), weights_in(b, Shape{E, N, K}, W, l),
                       tensor_i32(b, Shape{E + 1}, off), out);
        check_close(host_f32(b, out), ref::grouped_matmul_nt(X, W, off, R, N, K, 5.0), 1e-5, 1e-5,
                    "grouped_gemm");
      }
    }
  }
  SECTION("activations and outputs must be row-major") {
    const auto ls = weight_layouts(b);
    if (ls.size() > 1) {
      const Layout other = ls[1];
      Tensor a(b, DType::f32, Shape{4, 8}, other), w = uniform(b, Shape{6, 8}, 1),
                                                   c(b, DType::f32, Shape{4, 6});
      REQUIRE_ERROR(b.gemm(a, w, c), invalid_argument, "gemm]", "a must be row-major");
      Tensor c2(b, DType::f32, Shape{4, 6}, other);
      REQUIRE_ERROR(b.gemm(uniform(b, Shape{4, 8}, 2), w, c2), invalid_argument, "gemm]",
                    "c must be row-major");
      REQUIRE_ERROR(
          b.grouped_gemm(a, uniform(b, Shape{1, 6, 8}, 3), tensor_i32(b, Shape{2}, {0, 4}), c),
          invalid_argument, "grouped_gemm]", "x must be row-major");
      REQUIRE_ERROR(b.convert(a, Tensor(b, DType::f16, Shape{4, 8})), invalid_argument, "convert]",
                    "src must be row-major");
    }
  }
}

BACKEND_TEST("16-bit weights: gemm and grouped_gemm read bf16 / f16 exactly as their f32 values",
             "[layout][half]") {
  Backend& b = TestType::get();
  std::uint64_t seed = 900;
  for (DType dt : {DType::bf16, DType::f16}) {
    const bool kept = b.supports_weight_dtype(dt);
    auto round = [&](const std::vector<float>& v, std::vector<std::uint16_t>& bits) {
      std::vector<float> wide(v.size());
      bits.resize(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) {
        bits[i] = dt == DType::bf16 ? float_to_bf16(v[i]) : float_to_f16(v[i]);
        wide[i] = dt == DType::bf16 ? bf16_to_float(bits[i]) : f16_to_float(bits[i]);
      }
      return wide;
    };
    // N = 70: two full panels and a partial one; K = 300: more than one 256-deep block, and
    // not a multiple of 16. M spans the few-rows path (<= 6), whole and partial 12-row blocks.
    // Then narrow and shallow shapes (one partial panel, K below the prefetch distance).
    struct Dims {
      std::int64_t N, K;
    };
    for (Dims dims : {Dims{70, 300}, Dims{20, 1}, Dims{33, 17}}) {
      const std::int64_t N = dims.N, K = dims.K;
      std::vector<std::uint16_t> bits;
      const auto W = round(random_floats(static_cast<std::size_t>(N * K), ++seed), bits);
      Tensor w16(b, dt, Shape{N, K});
      b.copy_from_host(w16, bits.data());
      const Tensor p16 = prepare_weights(b, w16);
      const Tensor p32 = prepare_weights(b, tensor_f32(b, Shape{N, K}, W));
      DYNAMIC_SECTION(dtype_name(dt) << " storage N=" << N << " K=" << K) {
        CHECK(p16.layout() == b.weight_layout());
        CHECK(p16.dtype() == (kept ? dt : DType::f32));
        CHECK(host_f32(b, p32) == W);
        if (kept) {
          CHECK(host_u16(b, p16) == bits);  // panel copies speak the logical row-major order
          Tensor rm(b, dt, Shape{N, K});
          b.relayout(p16, rm);
          CHECK(host_u16(b, rm) == bits);
          if (b.weight_layout() != Layout::row_major)
            REQUIRE_ERROR(
                b.gemm(uniform(b, Shape{2, K}, 1), w16, Tensor(b, DType::f32, Shape{2, N})),
                unsupported, "gemm]", "row-major", "prepare_weights");
        } else {
          CHECK(host_f32(b, p16) == W);
        }
      }
      for (std::int64_t M : {1, 3, 6, 7, 12, 13, 40}) {
        DYNAMIC_SECTION("gemm " << dtype_name(dt) << " M=" << M << " N=" << N << " K=" << K) {
          const auto A = random_floats(static_cast<std::size_t>(M * K), ++seed);
          const auto C0 = random_floats(static_cast<std::size_t>(M * N), ++seed);
          const GemmParams p{0.5f, -2.0f};
          Tensor a = tensor_f32(b, Shape{M, K}, A);
          Tensor c16 = tensor_f32(b, Shape{M, N}, C0), c32 = tensor_f32(b, Shape{M, N}, C0);
          b.gemm(a, p16, c16, p);
          b.gemm(a, p32, c32, p);
          check_bitwise(host_f32(b, c16), host_f32(b, c32), "16-bit vs f32 weights");
          auto want = ref::matmul_nt(A, W, M, N, K);
          for (std::size_t i = 0; i < want.size(); ++i)
            want[i] = p.alpha * want[i] + p.beta * C0[i];
          check_close(host_f32(b, c16), want, 1e-5, 1e-5, "gemm");
        }
      }
    }
    DYNAMIC_SECTION("grouped_gemm " << dtype_name(dt)) {
      const std::int64_t E = 3, R = 60, N = 70, K = 300;
      const std::vector<std::int32_t> off{0, 5, 5, R};
      std::vector<std::uint16_t> sbits;
      const auto S = round(random_floats(static_cast<std::size_t>(E * N * K), ++seed), sbits);
      Tensor s16(b, dt, Shape{E, N, K});
      b.copy_from_host(s16, sbits.data());
      const Tensor q16 = prepare_weights(b, s16);
      const Tensor q32 = prepare_weights(b, tensor_f32(b, Shape{E, N, K}, S));
      if (kept) {  // a stack's matrices after the first copy back in the logical order too
        CHECK(host_u16(b, q16) == sbits);
        Tensor back(b, dt, Shape{E, N, K});
        b.relayout(q16, back);
        CHECK(host_u16(b, back) == sbits);
        const TensorView tail = TensorView(q16).slice(1, 3);
        std::vector<std::uint16_t> got(static_cast<std::size_t>(tail.numel()));
        b.copy_to_host(got.data(), tail);
        CHECK(std::equal(got.begin(), got.end(), sbits.begin() + N * K));
      }
      const auto X = random_floats(static_cast<std::size_t>(R * K), ++seed);
      Tensor x = tensor_f32(b, Shape{R, K}, X), offs = tensor_i32(b, Shape{E + 1}, off);
      Tensor o16(b, DType::f32, Shape{R, N}), o32(b, DType::f32, Shape{R, N});
      b.grouped_gemm(x, q16, offs, o16);
      b.grouped_gemm(x, q32, offs, o32);
      check_bitwise(host_f32(b, o16), host_f32(b, o32), "16-bit vs f32 expert weights");
      check_close(host_f32(b, o16), ref::grouped_matmul_nt(X, S, off, R, N, K), 1e-5, 1e-5,
                  "grouped_gemm");
    }
  }
  SECTION("16-bit embedding tables: rows widened exactly") {
    for (DType dt : {DType::bf16, DType::f16}) {
      const std::int64_t V = 9, d = 37;
      const auto vals = random_floats(static_cast<std::size_t>(V * d), ++seed);
      std::vector<std::uint16_t> bits(vals.size());
      std::vector<float> wide(vals.size());
      for (std::size_t i = 0; i < vals.size(); ++i) {
        bits[i] = dt == DType::bf16 ? float_to_bf16(vals[i]) : float_to_f16(vals[i]);
        wide[i] = dt == DType::bf16 ? bf16_to_float(bits[i]) : f16_to_float(bits[i]);
      }
      Tensor table(b, dt, Shape{V, d});
      b.copy_from_host(table, bits.data());
      const std::vector<std::int32_t> ids{3, 0, 8, 3};
      Tensor out(b, DType::f32, Shape{4, d});
      if (!b.supports_weight_dtype(dt)) {
        REQUIRE_ERROR(b.embedding(table, tensor_i32(b, Shape{4}, ids), out), dtype_mismatch,
                      "embedding]", "table must be f32");
        continue;
      }
      b.embedding(table, tensor_i32(b, Shape{4}, ids), out);
      std::vector<float> want;
      for (std::int32_t id : ids)
        want.insert(want.end(), wide.begin() + id * d, wide.begin() + (id + 1) * d);
      CHECK(host_f32(b, out) == want);
    }
  }
  SECTION("other weight dtypes are rejected, naming the accepted ones") {
    Tensor a = uniform(b, Shape{2, 8}, 1), c(b, DType::f32, Shape{2, 4});
    REQUIRE_ERROR(b.gemm(a, Tensor(b, DType::i32, Shape{4, 8}), c), dtype_mismatch, "gemm]",
                  "b must be f32", "got i32");
    REQUIRE_ERROR(
        b.grouped_gemm(a, Tensor(b, DType::i8, Shape{1, 4, 8}), tensor_i32(b, Shape{2}, {0, 2}), c),
        dtype_mismatch, "grouped_gemm]", "w must be f32", "got i8");
  }
}

BACKEND_TEST("gemm and grouped_gemm over random shapes, every weight layout and dtype",
             "[layout][half][sweep]") {
  // Tiling bugs live at shape boundaries nobody lists (a row tile of 6 after 252 rows was
  // wrong for a while): draw M, N, K and expert offsets at random, across every boundary the
  // kernels have (12-row blocks, 252-row tiles, 16/32-wide panels, 256-deep blocks, column
  // tiles), and check every product against the double reference.
  Backend& b = TestType::get();
  ShapeDraws draw(20261201, 600);
  struct Kind {
    Layout layout;
    DType dtype;
  };
  std::vector<Kind> kinds;
  for (Layout l : weight_layouts(b)) kinds.push_back({l, DType::f32});
  for (DType dt : {DType::bf16, DType::f16})
    if (b.supports_weight_dtype(dt)) kinds.push_back({b.weight_layout(), dt});
  // Host values exactly representable in the weight dtype, and the weights on the backend.
  auto make_weights = [&](Shape s, const Kind& kd, std::uint64_t seed, std::vector<float>& host) {
    host = random_floats(static_cast<std::size_t>(s.numel()), seed);
    if (kd.dtype == DType::f32) return weights_in(b, s, host, kd.layout);
    std::vector<std::uint16_t> bits(host.size());
    for (std::size_t i = 0; i < host.size(); ++i) {
      bits[i] = kd.dtype == DType::bf16 ? float_to_bf16(host[i]) : float_to_f16(host[i]);
      host[i] = kd.dtype == DType::bf16 ? bf16_to_float(bits[i]) : f16_to_float(bits[i]);
    }
    Tensor w(b, kd.dtype, s);
    b.copy_from_host(w, bits.data());
    return prepare_weights(b, w);
  };
  for (int i = 0; i < 24; ++i) {
    const Kind kd = kinds[static_cast<std::size_t>(i) % kinds.size()];
    // N past a 384-column tile, K past 512 (where tiles narrow) now and then.
    const std::int64_t M = draw.rows(i), N = draw(1, 450),
                       K = i % 4 == 3 ? draw(513, 700) : draw(1, 320);
    const GemmParams p = i % 2 == 0 ? GemmParams{1.0f, 0.0f} : GemmParams{0.75f, -0.5f};
    DYNAMIC_SECTION("gemm #" << i << " " << dtype_name(kd.dtype) << " " << layout_name(kd.layout)
                             << " M=" << M << " N=" << N << " K=" << K) {
      std::vector<float> W;
      const Tensor w = make_weights(Shape{N, K}, kd, 7000 + i, W);
      const auto A = random_floats(static_cast<std::size_t>(M * K), 8000 + i);
      const auto C0 = random_floats(static_cast<std::size_t>(M * N), 9000 + i);
      Tensor c = tensor_f32(b, Shape{M, N}, C0);
      b.gemm(tensor_f32(b, Shape{M, K}, A), w, c, p);
      auto want = ref::matmul_nt(A, W, M, N, K);
      for (std::size_t j = 0; j < want.size(); ++j) want[j] = p.alpha * want[j] + p.beta * C0[j];
      check_close(host_f32(b, c), want, 1e-5, 1e-5, "gemm");
    }
  }
  for (int i = 0; i < 16; ++i) {
    const Kind kd = kinds[static_cast<std::size_t>(i) % kinds.size()];
    const std::int64_t E = draw(1, 6), N = draw(1, 200), K = draw(1, 300);
    // Expert row counts from the same three ranges; about one expert in four empty; the rows
    // after the last expert's stay untouched.
    std::vector<std::int32_t> off{0};
    for (std::int64_t e = 0; e < E; ++e)
      off.push_back(off.back() +
                    static_cast<std::int32_t>(draw(0, 3) == 0 ? 0 : draw.rows(i + int(e)) / 2));
    const std::int64_t R = std::max<std::int64_t>(off.back() + draw(0, 3), 1);
    DYNAMIC_SECTION("grouped_gemm #" << i << " " << dtype_name(kd.dtype) << " "
                                     << layout_name(kd.layout) << " E=" << E << " rows "
                                     << off.back() << " N=" << N << " K=" << K) {
      std::vector<float> W;
      const Tensor w = make_weights(Shape{E, N, K}, kd, 10000 + i, W);
      const auto X = random_floats(static_cast<std::size_t>(R * K), 11000 + i);
      Tensor out = tensor_f32(b, Shape{R, N}, std::vector<float>(R * N, 5.0f));
      b.grouped_gemm(tensor_f32(b, Shape{R, K}, X), w, tensor_i32(b, Shape{E + 1}, off), out);
      check_close(host_f32(b, out), ref::grouped_matmul_nt(X, W, off, R, N, K, 5.0), 1e-5, 1e-5,
                  "grouped_gemm");
    }
  }
}

TEST_CASE("CpuBackend serves overlapping calls from several application threads",
          "[backend][threads]") {
  // Products large enough to take every shared resource at once: pooled buffers (packed
  // activations), the per-thread scratch tiles of many-row panel tiles, the task arena.
  CpuBackend b(CpuBackendOptions{2});
  constexpr int kThreads = 3;
  const std::int64_t E = 3, N = 400, K = 300, R = 330;
  const std::vector<std::int32_t> off{0, 20, 300, R};
  const Tensor w = prepare_weights(b, tensor_f32(b, Shape{E, N, K}, random_floats(E * N * K, 77)));
  const Tensor dense = prepare_weights(b, tensor_f32(b, Shape{N, K}, random_floats(N * K, 78)));
  const Tensor offs = tensor_i32(b, Shape{E + 1}, off);
  auto run = [&](int i) {
    const Tensor x = tensor_f32(b, Shape{R, K}, random_floats(R * K, 80 + i));
    Tensor out(b, DType::f32, Shape{R, N}), c(b, DType::f32, Shape{R, N});
    b.grouped_gemm(x, w, offs, out);
    b.gemm(x, dense, c);
    std::vector<float> r = host_f32(b, out), rc = host_f32(b, c);
    r.insert(r.end(), rc.begin(), rc.end());
    return r;
  };
  std::vector<std::vector<float>> alone(kThreads), together(kThreads);
  for (int i = 0; i < kThreads; ++i) alone[i] = run(i);
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> pool;
  for (int i = 0; i < kThreads; ++i)
    pool.emplace_back([&, i] {
      try {  // Catch's assertions are not thread-safe: results are checked after the join
        for (int rep = 0; rep < 4; ++rep) together[i] = run(i);
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    });
  for (std::thread& t : pool) t.join();
  for (int i = 0; i < kThreads; ++i) {
    CAPTURE(i);
    CHECK(errors[i].empty());
    CHECK(together[i] == alone[i]);
  }
}

namespace {
CpuBackendOptions amx_options(int threads) {
  CpuBackendOptions o;
  o.threads = threads;
  o.bf16_compute = true;
  return o;
}
}  // namespace

TEST_CASE(
    "CpuBackend bf16_compute: bf16 weights times bf16-rounded activations (AMX or AVX512_BF16)",
    "[half][amx]") {
  CpuBackend b1(amx_options(1)), b2(amx_options(2));
  if (!b1.bf16_compute()) {
    WARN("no AMX-BF16 or AVX512_BF16 here: bf16_compute is ignored, nothing to check");
    return;
  }
  std::uint64_t seed = 1200;
  auto bf16_round = [](std::vector<float> v) {
    for (float& f : v) f = bf16_to_float(float_to_bf16(f));
    return v;
  };
  auto bf16_weight = [&](Backend& b, const std::vector<float>& w, Shape s) {
    std::vector<std::uint16_t> bits(w.size());
    for (std::size_t i = 0; i < w.size(); ++i) bits[i] = float_to_bf16(w[i]);
    Tensor t(b, DType::bf16, s);
    b.copy_from_host(t, bits.data());
    return prepare_weights(b, t);
  };
  struct Case {
    std::int64_t M, N, K;
  };
  // Partial tiles in rows (1, 5, 17), columns (33, 70) and depth (17, 300: not a multiple of
  // 32); one row pair (32) and several (300); K = 1; several column tiles (N = 450).
  for (Case c : {Case{1, 70, 300}, Case{5, 33, 17}, Case{16, 64, 64}, Case{17, 70, 300},
                 Case{32, 32, 1}, Case{300, 40, 100}, Case{3, 450, 40}, Case{40, 450, 33}}) {
    DYNAMIC_SECTION("gemm M=" << c.M << " N=" << c.N << " K=" << c.K) {
      const auto W = bf16_round(random_floats(static_cast<std::size_t>(c.N * c.K), ++seed));
      const auto A = random_floats(static_cast<std::size_t>(c.M * c.K), ++seed);
      const auto C0 = random_floats(static_cast<std::size_t>(c.M * c.N), ++seed);
      const GemmParams p{0.5f, -2.0f};
      std::vector<float> got[2];
      CpuBackend* bs[2] = {&b1, &b2};
      for (int i = 0; i < 2; ++i) {
        Backend& b = *bs[i];
        Tensor out = tensor_f32(b, Shape{c.M, c.N}, C0);
        b.gemm(tensor_f32(b, Shape{c.M, c.K}, A), bf16_weight(b, W, Shape{c.N, c.K}), out, p);
        got[i] = host_f32(b, out);
      }
      check_bitwise(got[0], got[1], "1 vs 2 threads");
      auto want = ref::matmul_nt(bf16_round(A), W, c.M, c.N, c.K);
      for (std::size_t i = 0; i < want.size(); ++i) want[i] = p.alpha * want[i] + p.beta * C0[i];
      check_close(got[0], want, 1e-4, 1e-4, "bf16_compute gemm vs bf16-rounded reference");
      // Rows are independent: the last row alone gives the same bits.
      Tensor one = tensor_f32(b1, Shape{1, c.N}, std::vector<float>(C0.end() - c.N, C0.end()));
      b1.gemm(tensor_f32(b1, Shape{1, c.K}, std::vector<float>(A.end() - c.K, A.end())),
              bf16_weight(b1, W, Shape{c.N, c.K}), one, p);
      check_bitwise(host_f32(b1, one), std::vector<float>(got[0].end() - c.N, got[0].end()),
                    "one row vs the same row in a batch");
    }
  }
  SECTION("grouped_gemm") {
    const std::int64_t E = 3, N = 70, K = 300, R = 60;
    const std::vector<std::int32_t> off{0, 5, 5, R};
    const auto W = bf16_round(random_floats(static_cast<std::size_t>(E * N * K), ++seed));
    const auto X = random_floats(static_cast<std::size_t>(R * K), ++seed);
    Tensor out(b2, DType::f32, Shape{R, N});
    b2.grouped_gemm(tensor_f32(b2, Shape{R, K}, X), bf16_weight(b2, W, Shape{E, N, K}),
                    tensor_i32(b2, Shape{E + 1}, off), out);
    check_close(host_f32(b2, out), ref::grouped_matmul_nt(bf16_round(X), W, off, R, N, K), 1e-4,
                1e-4, "bf16_compute grouped_gemm");
  }
  SECTION("f32 and f16 weights are not affected") {
    const auto W = random_floats(70 * 40, ++seed), A = random_floats(3 * 40, ++seed);
    CpuBackend exact(CpuBackendOptions{.threads = 1});
    Tensor o1(b1, DType::f32, Shape{3, 70}), o2(exact, DType::f32, Shape{3, 70});
    b1.gemm(tensor_f32(b1, Shape{3, 40}, A), prepare_weights(b1, tensor_f32(b1, Shape{70, 40}, W)),
            o1);
    exact.gemm(tensor_f32(exact, Shape{3, 40}, A),
               prepare_weights(exact, tensor_f32(exact, Shape{70, 40}, W)), o2);
    check_bitwise(host_f32(b1, o1), host_f32(exact, o2), "f32 weights, bf16_compute on / off");
  }
}
