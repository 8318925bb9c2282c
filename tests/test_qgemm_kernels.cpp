// SPDX-License-Identifier: Apache-2.0
// The f32 activation packing (pack_x) and the INT8 GEMM kernels (src/cpu/qgemm_kernels.hpp):
// packing, group sums, activation quantization, and every ISA path of gemm_w8a8 / gemm_wonly
// against naive references (int64 group sums for W8A8, double for weight-only) and against the
// portable path (bit for bit for W8A8). A path this CPU cannot run is skipped with a warning.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "cpu/gemm_kernels.hpp"
#include "cpu/qgemm_isa.hpp"
#include "cpu/qgemm_kernels.hpp"

namespace q8 = autoglm::detail::q8;

namespace {

constexpr q8::Isa kIsas[] = {q8::Isa::portable, q8::Isa::avx2, q8::Isa::avx512_vnni};

std::vector<q8::Isa> runnable_isas() {
  std::vector<q8::Isa> out;
  for (q8::Isa isa : kIsas) {
    if (q8::isa_supported(isa))
      out.push_back(isa);
    else
      WARN("skipping " << q8::isa_name(isa) << ": this CPU does not support it");
  }
  return out;
}

// A row-major int8 matrix with its packed form, scales and group sums.
struct QMat {
  std::int64_t n, k, group;
  std::vector<std::int8_t> w, packed;
  std::vector<float> scales;
  std::vector<std::int32_t> sums;

  QMat(std::int64_t n_, std::int64_t k_, std::int64_t group_, std::mt19937& rng,
       bool extreme = false)
      : n(n_), k(k_), group(group_) {
    std::uniform_int_distribution<int> byte(-128, 127), pick(0, 1);
    std::uniform_real_distribution<float> scale(0.001f, 0.02f);
    w.resize(static_cast<std::size_t>(n * k));
    for (auto& v : w) v = static_cast<std::int8_t>(extreme ? (pick(rng) ? 127 : -128) : byte(rng));
    packed.assign(static_cast<std::size_t>(q8::packed_bytes(n, k)), 99);
    q8::pack(w.data(), n, k, packed.data());
    const std::int64_t ng = k / group, rows = q8::padded_rows(n);
    scales.assign(static_cast<std::size_t>(rows * ng), 0.0f);
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t g = 0; g < ng; ++g) scales[r * ng + g] = extreme ? 1.0f : scale(rng);
    sums.assign(static_cast<std::size_t>(rows * ng), 12345);
    q8::group_sums(w.data(), n, k, group, sums.data());
  }

  q8::QWeights view() const { return {packed.data(), scales.data(), sums.data(), n, k, group}; }
};

std::vector<std::int64_t> groups_for(std::int64_t k) {
  std::vector<std::int64_t> g = {k};
  for (std::int64_t c : {32, 64, 128})
    if (c < k && k % c == 0) g.push_back(c);
  return g;
}

// (col0, cols) tiles of n columns: the whole, one past the first panel, and a short one.
std::vector<std::pair<std::int64_t, std::int64_t>> tiles_for(std::int64_t n) {
  std::vector<std::pair<std::int64_t, std::int64_t>> t = {{0, n}};
  if (n > 16) {
    t.emplace_back(16, n - 16);
    t.emplace_back(0, std::min<std::int64_t>(n, 20));
  }
  if (n > 32) t.emplace_back(32, std::min<std::int64_t>(n - 32, 3));
  return t;
}

constexpr float kSentinel = -7777.0f;

// Runs one path into an [m, ldo] buffer of sentinels; checks nothing outside the tile changed.
template <class F>
std::vector<float> run_tile(std::int64_t m, std::int64_t cols, F&& f) {
  const std::int64_t ldo = cols + 5;
  std::vector<float> out(static_cast<std::size_t>(m * ldo), kSentinel);
  f(out.data(), ldo);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = cols; j < ldo; ++j) REQUIRE(out[i * ldo + j] == kSentinel);
  std::vector<float> dense(static_cast<std::size_t>(m * cols));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < cols; ++j) dense[i * cols + j] = out[i * ldo + j];
  return dense;
}

struct Activations {
  std::int64_t m, k, ldq;
  std::vector<std::uint8_t> xq;
  std::vector<float> xs;
};

// xs: one scale per (row, group) of `groups` groups.
Activations random_activations(std::int64_t m, std::int64_t k, std::int64_t groups,
                               std::mt19937& rng, bool extreme = false) {
  Activations a{m, k, q8::padded_depth(k) + 8, {}, {}};
  std::uniform_int_distribution<int> byte(0, 255), pick(0, 1);
  std::uniform_real_distribution<float> scale(0.01f, 0.1f);
  a.xq.assign(static_cast<std::size_t>(m * a.ldq), 128);
  a.xs.resize(static_cast<std::size_t>(m * groups));
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t c = 0; c < k; ++c)
      a.xq[i * a.ldq + c] = static_cast<std::uint8_t>(extreme ? (pick(rng) ? 255 : 0) : byte(rng));
  for (float& v : a.xs) v = extreme ? 1.0f : scale(rng);
  return a;
}

// Naive W8A8: exact int64 group sums, then scales in double. bound: sum of |terms|.
void w8a8_reference(const Activations& a, const QMat& w, std::int64_t col0, std::int64_t cols,
                    std::vector<double>& ref, std::vector<double>& bound) {
  const std::int64_t ng = w.k / w.group;
  ref.assign(static_cast<std::size_t>(a.m * cols), 0.0);
  bound.assign(ref.size(), 0.0);
  for (std::int64_t i = 0; i < a.m; ++i)
    for (std::int64_t jj = 0; jj < cols; ++jj) {
      const std::int64_t j = col0 + jj;
      double s = 0.0, b = 0.0;
      for (std::int64_t g = 0; g < ng; ++g) {
        std::int64_t isum = 0;
        for (std::int64_t c = g * w.group; c < (g + 1) * w.group; ++c)
          isum += (std::int64_t{a.xq[i * a.ldq + c]} - 128) * w.w[j * w.k + c];
        const double t = static_cast<double>(isum) * w.scales[j * ng + g] * a.xs[i * ng + g];
        s += t;
        b += std::fabs(t);
      }
      ref[i * cols + jj] = s;
      bound[i * cols + jj] = b;
    }
}

// W8A8 runs every ISA, and avx512_vnni both with and without its AMX tiles where the CPU has them.
struct W8A8Path {
  q8::Isa isa;
  bool amx;
  bool avxvnni = false;
  std::string name() const {
    return std::string(q8::isa_name(isa)) + (amx ? "+amx" : "") + (avxvnni ? "+avxvnni" : "");
  }
};

std::vector<W8A8Path> w8a8_paths() {
  std::vector<W8A8Path> out;
  for (q8::Isa isa : runnable_isas()) {
    out.push_back({isa, false});
    if (isa == q8::Isa::avx512_vnni) {
      if (q8::impl::amx_available())
        out.push_back({isa, true});
      else
        WARN("skipping AMX: this CPU or OS does not offer AMX-INT8");
    }
    if (isa == q8::Isa::avx2) {
      if (q8::impl::avxvnni_available())
        out.push_back({isa, false, true});
      else
        WARN("skipping AVX-VNNI: this CPU does not offer it");
    }
  }
  return out;
}

void run_w8a8(const W8A8Path& path, const Activations& a, std::int64_t m, const QMat& w,
              std::int64_t col0, std::int64_t cols, float* out, std::int64_t ldo) {
  q8::impl::set_amx_enabled(path.amx);
  q8::impl::set_avxvnni_enabled(path.avxvnni);
  q8::gemm_w8a8(path.isa, a.xq.data(), a.ldq, a.xs.data(), m, w.view(), col0, cols, out, ldo);
  q8::impl::set_amx_enabled(true);
  q8::impl::set_avxvnni_enabled(true);
}

}  // namespace

TEST_CASE("q8 pack and unpack round trip odd shapes", "[q8]") {
  std::mt19937 rng(1);
  for (std::int64_t n : {1, 15, 16, 17, 50})
    for (std::int64_t k : {1, 3, 4, 7, 130}) {
      CAPTURE(n, k);
      QMat q(n, k, k, rng);
      REQUIRE(q8::packed_bytes(n, k) == q8::padded_rows(n) * q8::padded_depth(k));
      const std::int64_t kq = q8::padded_depth(k) / 4;
      for (std::int64_t r = 0; r < q8::padded_rows(n); ++r)
        for (std::int64_t c = 0; c < q8::padded_depth(k); ++c) {
          const std::int64_t at = ((r / 16 * kq + c / 4) * 16 + r % 16) * 4 + c % 4;
          const std::int8_t want = (r < n && c < k) ? q.w[r * k + c] : 0;
          REQUIRE(q.packed[at] == want);
        }
      std::vector<std::int8_t> back(q.w.size(), 1);
      q8::unpack(q.packed.data(), n, k, back.data());
      REQUIRE(back == q.w);
    }
}

TEST_CASE("q8 group sums", "[q8]") {
  std::mt19937 rng(2);
  const std::int64_t n = 17, k = 64;
  for (std::int64_t group : {64, 32, 4}) {
    CAPTURE(group);
    QMat q(n, k, group, rng);
    const std::int64_t ng = k / group;
    for (std::int64_t r = 0; r < q8::padded_rows(n); ++r)
      for (std::int64_t g = 0; g < ng; ++g) {
        std::int32_t want = 0;
        if (r < n)
          for (std::int64_t c = g * group; c < (g + 1) * group; ++c) want += q.w[r * k + c];
        REQUIRE(q.sums[r * ng + g] == want);
      }
  }
}

TEST_CASE("q8 quantize_activations matches a naive loop", "[q8]") {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> val(-3.0f, 3.0f);
  for (q8::Isa isa : runnable_isas())
    for (std::int64_t k : {1, 5, 7, 16, 33, 130})
      for (std::int64_t group = 1; group <= k; ++group) {
        if (k % group != 0 || (group < 3 && group != k)) continue;
        CAPTURE(q8::isa_name(isa), k, group);
        const std::int64_t m = 5, ldx = k + 3, kp = q8::padded_depth(k), ldq = kp + 6;
        const std::int64_t ng = k / group;
        std::vector<float> x(static_cast<std::size_t>(m * ldx), 1e9f);
        for (std::int64_t i = 0; i < m; ++i)
          for (std::int64_t c = 0; c < k; ++c) x[i * ldx + c] = i == 2 ? 0.0f : val(rng);
        // Exact halves: with max |x| = 127, x / s lands on .5 and must round to even.
        for (std::int64_t c = 0; c < k; ++c) x[3 * ldx + c] = c == 0 ? -127.0f : 0.5f + c % 5;
        // One large value in row 4's first group: the other groups keep their own scales. Row
        // 1's last group all zero beside non-zero groups (scale 0, codes 128).
        x[4 * ldx] = 1000.0f;
        if (ng > 1)
          for (std::int64_t c = k - group; c < k; ++c) x[1 * ldx + c] = 0.0f;
        std::vector<std::uint8_t> xq(static_cast<std::size_t>(m * ldq), 7);
        std::vector<float> xs(static_cast<std::size_t>(m * ng), -1.0f);
        q8::quantize_activations(isa, x.data(), ldx, m, k, group, xq.data(), ldq, xs.data());
        for (std::int64_t i = 0; i < m; ++i) {
          for (std::int64_t g = 0; g < ng; ++g) {
            float amax = 0.0f;
            for (std::int64_t c = g * group; c < (g + 1) * group; ++c)
              amax = std::max(amax, std::fabs(x[i * ldx + c]));
            const float s = amax / 127.0f;
            REQUIRE(xs[i * ng + g] == s);
            for (std::int64_t c = g * group; c < (g + 1) * group; ++c) {
              int want = 128;
              if (s != 0.0f) {
                const float r = std::nearbyint(x[i * ldx + c] / s);
                want = static_cast<int>(std::clamp(r, -127.0f, 127.0f)) + 128;
              }
              REQUIRE(int{xq[i * ldq + c]} == want);
            }
          }
          for (std::int64_t c = k; c < kp; ++c) REQUIRE(int{xq[i * ldq + c]} == 128);
          for (std::int64_t c = kp; c < ldq; ++c) REQUIRE(int{xq[i * ldq + c]} == 7);
        }
        if (group == k && k > 1) REQUIRE(int{xq[3 * ldq + 1]} == 128 + 2);  // 1.5 -> 2
        if (group == k && k > 2) REQUIRE(int{xq[3 * ldq + 2]} == 128 + 2);  // 2.5 -> 2
        if (ng > 1) {
          REQUIRE(xs[4 * ng + 1] < 3.0f / 127.0f);  // not 1000 / 127
          REQUIRE(xs[1 * ng + ng - 1] == 0.0f);
          REQUIRE(xs[1 * ng] > 0.0f);
        }
      }
}

TEST_CASE("q8 gemm_w8a8 equals exact integer sums on every path", "[q8]") {
  std::mt19937 rng(4);
  const auto paths = w8a8_paths();
  struct Shape {
    std::int64_t m, n, k;
  };
  std::vector<Shape> shapes;
  // Up to 12 rows: the AVX-512 path's one pass over the weights, one panel at a time; 1-3 rows
  // with separate accumulators for even and odd quads (k = 7 and 130: odd quad counts).
  for (std::int64_t m : {1, 2, 3, 5, 8, 12, 13, 64})
    for (std::int64_t n : {1, 16, 17, 50})
      for (std::int64_t k : {4, 7, 64, 130}) shapes.push_back({m, n, k});
  // k blocking with row reuse: groups split across blocks (carry) and groups within a block;
  // AMX row blocks of 32 with partial row tiles (16, 20, 37, 50 rows).
  for (std::int64_t m : {7, 10, 12, 13, 16, 20, 37, 50, 64}) shapes.push_back({m, 40, 1024});
  // AMX k blocks of 4096: a per-channel group carried across blocks.
  for (std::int64_t m : {20, 33}) shapes.push_back({m, 40, 4160});
  for (const Shape& s : shapes)
    for (std::int64_t group : groups_for(s.k)) {
      QMat w(s.n, s.k, group, rng);
      const Activations a = random_activations(s.m, s.k, s.k / group, rng);
      for (auto [col0, cols] : tiles_for(s.n)) {
        CAPTURE(s.m, s.n, s.k, group, col0, cols);
        std::vector<double> ref, bound;
        w8a8_reference(a, w, col0, cols, ref, bound);
        std::vector<float> portable;
        for (const W8A8Path& path : paths) {
          CAPTURE(path.name());
          const auto out = run_tile(s.m, cols, [&](float* o, std::int64_t ldo) {
            run_w8a8(path, a, s.m, w, col0, cols, o, ldo);
          });
          for (std::size_t e = 0; e < out.size(); ++e)
            REQUIRE(std::fabs(out[e] - ref[e]) <= 1e-5 * bound[e] + 1e-30);
          // Exact group sums and the same rounding steps: every path matches bit for bit.
          if (path.isa == q8::Isa::portable)
            portable = out;
          else
            REQUIRE(out == portable);
        }
      }
    }
}

TEST_CASE("q8 gemm_w8a8 is exact at extreme values", "[q8]") {
  // Unit scales and one group: out must be float(the exact sum) bit for bit, with products at
  // the int8 extremes (0 - 128 against -128) that a saturating i16 pair sum would get wrong.
  std::mt19937 rng(5);
  for (const W8A8Path& path : w8a8_paths())
    for (std::int64_t m : {1, 7, 40}) {
      const std::int64_t n = 33, k = 2048;
      QMat w(n, k, k, rng, true);
      const Activations a = random_activations(m, k, 1, rng, true);
      CAPTURE(path.name(), m);
      const auto out = run_tile(
          m, n, [&](float* o, std::int64_t ldo) { run_w8a8(path, a, m, w, 0, n, o, ldo); });
      for (std::int64_t i = 0; i < m; ++i)
        for (std::int64_t j = 0; j < n; ++j) {
          std::int64_t isum = 0;
          for (std::int64_t c = 0; c < k; ++c)
            isum += (std::int64_t{a.xq[i * a.ldq + c]} - 128) * w.w[j * k + c];
          REQUIRE(out[i * n + j] == static_cast<float>(isum));
        }
    }
}

TEST_CASE("q8 gemm_w8a8 with groups that split a k-quad falls back correctly", "[q8]") {
  std::mt19937 rng(6);
  const std::int64_t m = 3, n = 20, k = 6, group = 2;
  QMat w(n, k, group, rng);
  const Activations a = random_activations(m, k, k / group, rng);
  std::vector<double> ref, bound;
  w8a8_reference(a, w, 0, n, ref, bound);
  for (q8::Isa isa : runnable_isas()) {
    const auto out = run_tile(m, n, [&](float* o, std::int64_t ldo) {
      q8::gemm_w8a8(isa, a.xq.data(), a.ldq, a.xs.data(), m, w.view(), 0, n, o, ldo);
    });
    for (std::size_t e = 0; e < out.size(); ++e)
      REQUIRE(std::fabs(out[e] - ref[e]) <= 1e-5 * bound[e] + 1e-30);
  }
}

TEST_CASE("q8 gemm_wonly matches a double reference on every path", "[q8]") {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> val(-2.0f, 2.0f);
  const auto isas = runnable_isas();
  struct Shape {
    std::int64_t m, n, k;
  };
  std::vector<Shape> shapes;
  // Rows: one streaming row block (<= 4), balanced blocks (5 = 3 + 2, 9 = 3 x 3, 13, 64),
  // and the dequantizing path above 64 rows.
  for (std::int64_t m : {1, 2, 4, 5, 9, 13, 64, 70})
    for (std::int64_t n : {1, 16, 17, 50})
      for (std::int64_t k : {4, 7, 64, 130}) shapes.push_back({m, n, k});
  for (std::int64_t m : {3, 13, 70}) shapes.push_back({m, 40, 1024});
  for (const Shape& s : shapes)
    for (std::int64_t group : groups_for(s.k)) {
      QMat w(s.n, s.k, group, rng);
      const std::int64_t ldx = s.k + 1, ng = s.k / group;
      // The last row ends the buffer: a read past k would leave it.
      std::vector<float> x(static_cast<std::size_t>((s.m - 1) * ldx + s.k));
      for (auto& v : x) v = val(rng);
      for (auto [col0, cols] : tiles_for(s.n)) {
        CAPTURE(s.m, s.n, s.k, group, col0, cols);
        std::vector<double> ref(static_cast<std::size_t>(s.m * cols)), bound(ref.size());
        for (std::int64_t i = 0; i < s.m; ++i)
          for (std::int64_t jj = 0; jj < cols; ++jj) {
            const std::int64_t j = col0 + jj;
            double acc = 0.0, b = 0.0;
            for (std::int64_t c = 0; c < s.k; ++c) {
              const double t =
                  double{x[i * ldx + c]} * w.w[j * s.k + c] * w.scales[j * ng + c / group];
              acc += t;
              b += std::fabs(t);
            }
            ref[i * cols + jj] = acc;
            bound[i * cols + jj] = b;
          }
        std::vector<float> portable;
        for (q8::Isa isa : isas) {
          CAPTURE(q8::isa_name(isa));
          const auto out = run_tile(s.m, cols, [&](float* o, std::int64_t ldo) {
            q8::gemm_wonly(isa, x.data(), ldx, s.m, w.view(), col0, cols, o, ldo);
          });
          for (std::size_t e = 0; e < out.size(); ++e)
            REQUIRE(std::fabs(out[e] - ref[e]) <= 1e-4 * bound[e] + 1e-30);
          if (isa == q8::Isa::portable)
            portable = out;
          else
            for (std::size_t e = 0; e < out.size(); ++e)
              REQUIRE(std::fabs(out[e] - portable[e]) <= 1e-4 * bound[e] + 1e-30);
        }
      }
    }
}

TEST_CASE("q8 isa names and selection", "[q8]") {
  REQUIRE(q8::isa_name(q8::Isa::portable) == "portable");
  REQUIRE(q8::isa_name(q8::Isa::avx2) == "avx2");
  REQUIRE(q8::isa_name(q8::Isa::avx512_vnni) == "avx512_vnni");
  REQUIRE(q8::isa_supported(q8::Isa::portable));
  REQUIRE(q8::isa_supported(q8::best_isa()));
  INFO("best q8 path: " << q8::isa_name(q8::best_isa()));
  SUCCEED();
}

// ------------------------------------------------------------------------------ f32 packing

TEST_CASE("pack_x reads nothing past the last row (rows end at a guard page)", "[kernels]") {
  using namespace autoglm::detail;
  // ldx = k and the matrix's last float right before a PROT_NONE page: a load past the end of
  // a row (a 16-wide transpose over a short tail) would fault here.
  const auto page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t span = 64 * page;
  void* raw =
      mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(raw != MAP_FAILED);
  auto* base = static_cast<char*>(raw);
  REQUIRE(mprotect(base + span, page, PROT_NONE) == 0);
  for (std::int64_t m : {1, 7, 13, 25, 253})
    for (std::int64_t k : {1, 15, 17, 33}) {
      const auto n = static_cast<std::size_t>(m * k);
      auto* x = reinterpret_cast<float*>(base + span) - n;
      for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<float>(i);
      std::vector<float> got(static_cast<std::size_t>(packed_x_size(m, k)), -1.0f);
      pack_x(x, k, m, k, got.data());
      const std::int64_t mr = pack_block_rows(m);
      bool same = true;
      for (std::int64_t row = 0; row < m; ++row)
        for (std::int64_t p = 0; p < k; ++p)
          same = same && got[static_cast<std::size_t>((row / mr) * mr * k + p * mr + row % mr)] ==
                             x[row * k + p];
      INFO("m=" << m << " k=" << k);
      CHECK(same);
    }
  munmap(raw, span + page);
}

TEST_CASE("pack_x lays rows out in even blocks of [k][rows], zero-padded", "[kernels]") {
  using namespace autoglm::detail;
  // Block heights: m itself up to 6, then as even as the 12-row block count allows.
  CHECK(pack_block_rows(1) == 1);
  CHECK(pack_block_rows(6) == 6);
  CHECK(pack_block_rows(7) == 7);
  CHECK(pack_block_rows(12) == 12);
  CHECK(pack_block_rows(13) == 7);
  CHECK(pack_block_rows(32) == 11);
  CHECK(pack_block_rows(252) == 12);
  CHECK(pack_block_rows(253) == 12);
  for (std::int64_t m : {1, 3, 6, 7, 13, 24, 25, 32, 40, 253}) {
    for (std::int64_t k : {1, 15, 16, 17, 32, 300}) {
      const std::int64_t ldx = k + 3, mr = pack_block_rows(m);
      std::vector<float> x(static_cast<std::size_t>(m * ldx));
      for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i) + 0.5f;
      std::vector<float> got(static_cast<std::size_t>(packed_x_size(m, k)), -1.0f);
      pack_x(x.data(), ldx, m, k, got.data());
      REQUIRE(packed_x_size(m, k) == (m + mr - 1) / mr * mr * k);
      bool same = true;
      for (std::int64_t b = 0; b * mr < m; ++b)
        for (std::int64_t p = 0; p < k; ++p)
          for (std::int64_t i = 0; i < mr; ++i) {
            const std::int64_t row = b * mr + i;
            const float want = row < m ? x[static_cast<std::size_t>(row * ldx + p)] : 0.0f;
            same = same && got[static_cast<std::size_t>(b * mr * k + p * mr + i)] == want;
          }
      INFO("m=" << m << " k=" << k);
      CHECK(same);
    }
  }
}
