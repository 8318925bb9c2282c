// SPDX-License-Identifier: Apache-2.0
// CudaBackend against CpuBackend on the same inputs (larger and more varied shapes than the
// conformance suite), exact where the interface fixes the result (conversions, the
// counter-based generator, routing choices, dispatch plans, int8 embeddings), within per-dtype
// tolerances elsewhere (int8 GEMMs on the same quantised weights: 1e-5 of the product's scale
// for W8A8, 1e-4 for weight-only); then the model fixtures end to end on the GPU, in f32 and
// in int8. Part of autoglm_cuda_tests, which ctest reports as skipped on a machine without a
// CUDA device.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <random>

#include <nlohmann/json.hpp>

#include "autoglm/backend/cuda_backend.hpp"
#include "support.hpp"

using namespace autoglm;
using namespace agt;

namespace {

CpuBackend& cpu() {
  static CpuBackend b(CpuBackendOptions{.threads = 2});
  return b;
}
CudaBackend& gpu() {
  static CudaBackend b;
  return b;
}

/// The same host values on both backends.
struct Pair {
  Tensor c, g;
};
Pair both_f32(Shape s, const std::vector<float>& h) {
  return {tensor_f32(cpu(), s, h), tensor_f32(gpu(), s, h)};
}
Pair both_i32(Shape s, const std::vector<std::int32_t>& h) {
  return {tensor_i32(cpu(), s, h), tensor_i32(gpu(), s, h)};
}
Pair both_empty(DType dt, Shape s) {
  return {Tensor(cpu(), dt, s), Tensor(gpu(), dt, s)};
}

void close_f32(const Pair& p, double atol, double rtol, const std::string& what) {
  const auto want = host_f32(cpu(), p.c);
  check_close(host_f32(gpu(), p.g), want, atol, rtol, what);
}

}  // namespace

TEST_CASE("cuda: fill_uniform and conversions are bit-identical to the CPU", "[cuda]") {
  for (std::uint64_t seed : {0ull, 7ull, 0xdeadbeefcafeull}) {
    const Shape s{100003};
    Tensor c(cpu(), DType::f32, s), g(gpu(), DType::f32, s);
    cpu().fill_uniform(c, seed, 0.37f);
    gpu().fill_uniform(g, seed, 0.37f);
    check_bitwise(host_f32(gpu(), g), host_f32(cpu(), c), "fill_uniform");
  }
  std::vector<float> h = random_floats(70000, 3, -70000.0f, 70000.0f);
  for (std::size_t i = 0; i < h.size(); i += 2) h[i] = std::ldexp(h[i], -static_cast<int>(i % 50));
  h[0] = std::numeric_limits<float>::quiet_NaN();
  h[1] = -std::numeric_limits<float>::infinity();
  const Pair src = both_f32(Shape{70000}, h);
  for (DType a : {DType::f16, DType::bf16}) {
    const Pair mid = both_empty(a, Shape{70000});
    cpu().convert(src.c, mid.c);
    gpu().convert(src.g, mid.g);
    check_bitwise(host_u16(gpu(), mid.g), host_u16(cpu(), mid.c), "f32 -> half");
    const DType other = a == DType::f16 ? DType::bf16 : DType::f16;
    const Pair cross = both_empty(other, Shape{70000});
    cpu().convert(mid.c, cross.c);
    gpu().convert(mid.g, cross.g);
    check_bitwise(host_u16(gpu(), cross.g), host_u16(cpu(), cross.c), "half -> half");
    const Pair back = both_empty(DType::f32, Shape{70000});
    cpu().convert(mid.c, back.c);
    gpu().convert(mid.g, back.g);
    const auto gb = host_f32(gpu(), back.g), cb = host_f32(cpu(), back.c);
    std::size_t bad = 0;
    for (std::size_t i = 0; i < gb.size(); ++i)
      bad += !(gb[i] == cb[i] || (std::isnan(gb[i]) && std::isnan(cb[i])));
    CHECK(bad == 0);
  }
}

TEST_CASE("cuda: gemm and grouped_gemm at larger shapes; TF32 opt-in", "[cuda]") {
  struct Case {
    std::int64_t M, N, K;
  };
  for (Case c : {Case{1, 4096, 512}, Case{77, 300, 513}, Case{256, 256, 1024}}) {
    const auto A = random_floats(c.M * c.K, 1), B = random_floats(c.N * c.K, 2);
    const auto C0 = random_floats(c.M * c.N, 3);
    const Pair a = both_f32(Shape{c.M, c.K}, A), b = both_f32(Shape{c.N, c.K}, B);
    const Pair out = both_f32(Shape{c.M, c.N}, C0);
    cpu().gemm(a.c, b.c, out.c, GemmParams{0.75f, -0.5f});
    gpu().gemm(a.g, b.g, out.g, GemmParams{0.75f, -0.5f});
    // FP32 with different summation orders: errors grow like sqrt(K) * eps * |terms|.
    close_f32(out, 1e-4, 1e-4, "gemm");
    CudaBackend tf32(CudaBackendOptions{.allow_tf32 = true});
    Tensor ta = tensor_f32(tf32, Shape{c.M, c.K}, A), tb = tensor_f32(tf32, Shape{c.N, c.K}, B);
    Tensor tc(tf32, DType::f32, Shape{c.M, c.N});
    tf32.gemm(ta, tb, tc);
    Tensor rc(cpu(), DType::f32, Shape{c.M, c.N});
    cpu().gemm(a.c, b.c, rc);
    // TF32 keeps 10 mantissa bits of each operand: ~1e-3 relative per product.
    check_close(host_f32(tf32, tc), host_f32(cpu(), rc), 2e-2 * std::sqrt(double(c.K) / 64), 1e-2,
                "gemm tf32");
  }
  const std::int64_t E = 9, N = 96, K = 200, R = 333;
  std::vector<std::int32_t> off{0};
  std::mt19937 g(4);
  for (std::int64_t e = 0; e < E; ++e)
    off.push_back(e == 2 || e == 5
                      ? off.back()
                      : std::min<std::int32_t>(static_cast<std::int32_t>(R - 7),
                                               off.back() + static_cast<std::int32_t>(g() % 80)));
  const Pair x = both_f32(Shape{R, K}, random_floats(R * K, 5)),
             w = both_f32(Shape{E, N, K}, random_floats(E * N * K, 6)),
             o = both_i32(Shape{E + 1}, off);
  const Pair out = both_f32(Shape{R, N}, std::vector<float>(R * N, 3.0f));  // tail untouched
  cpu().grouped_gemm(x.c, w.c, o.c, out.c);
  gpu().grouped_gemm(x.g, w.g, o.g, out.g);
  close_f32(out, 1e-4, 1e-4, "grouped_gemm");
}

TEST_CASE("cuda: routing choices and plans equal the CPU's", "[cuda]") {
  const std::int64_t T = 301, E = 64;
  const auto L = random_floats(T * E, 10, -4.0f, 4.0f), bias = random_floats(E, 11, -0.3f, 0.3f);
  const Pair logits = both_f32(Shape{T, E}, L), b = both_f32(Shape{E}, bias);
  struct Case {
    ScoreFunc f;
    int k, n_group, topk_group;
    GroupMask mask;
    bool use_bias;
    float noise;
  };
  for (Case c : {Case{ScoreFunc::softmax, 2, 1, 1, GroupMask::neg_inf, false, 0.0f},
                 Case{ScoreFunc::softmax, 8, 1, 1, GroupMask::neg_inf, false, 0.5f},
                 Case{ScoreFunc::sigmoid, 8, 8, 4, GroupMask::neg_inf, true, 0.0f},
                 Case{ScoreFunc::sigmoid, 6, 8, 3, GroupMask::zero, true, 0.0f},
                 Case{ScoreFunc::sigmoid, 1, 1, 1, GroupMask::neg_inf, true, 0.0f}}) {
    RouteParams p;
    p.score = c.f;
    p.top_k = c.k;
    p.n_group = c.n_group;
    p.topk_group = c.topk_group;
    p.group_mask = c.mask;
    p.noise_std = c.noise;
    p.seed = 99;
    p.renorm_epsilon = c.f == ScoreFunc::sigmoid ? 1e-20f : 0.0f;
    p.routed_scaling = 2.5f;
    const Pair ids = both_empty(DType::i32, Shape{T, c.k}),
               wts = both_empty(DType::f32, Shape{T, c.k}),
               st = both_empty(DType::f32, Shape{E + 1});
    cpu().route_topk(logits.c, c.use_bias ? TensorView(b.c) : TensorView{}, p, ids.c, wts.c, st.c);
    gpu().route_topk(logits.g, c.use_bias ? TensorView(b.g) : TensorView{}, p, ids.g, wts.g, st.g);
    CHECK(host_i32(gpu(), ids.g) == host_i32(cpu(), ids.c));
    close_f32(wts, 1e-6, 1e-5, "route_topk weights");
    close_f32(st, 1e-4, 1e-5, "route_topk stats");

    // The plan of these ids, with and without capacity.
    for (std::int64_t cap : {0, 9}) {
      const Pair cnt = both_empty(DType::i32, Shape{E}),
                 offs = both_empty(DType::i32, Shape{E + 1}),
                 rt = both_i32(Shape{T * c.k}, std::vector<std::int32_t>(T * c.k, -7)),
                 sr = both_empty(DType::i32, Shape{T * c.k});
      cpu().plan_dispatch(ids.c, cap, cnt.c, offs.c, rt.c, sr.c);
      gpu().plan_dispatch(ids.g, cap, cnt.g, offs.g, rt.g, sr.g);
      CHECK(host_i32(gpu(), cnt.g) == host_i32(cpu(), cnt.c));
      CHECK(host_i32(gpu(), offs.g) == host_i32(cpu(), offs.c));
      CHECK(host_i32(gpu(), rt.g) == host_i32(cpu(), rt.c));
      CHECK(host_i32(gpu(), sr.g) == host_i32(cpu(), sr.c));
    }
  }
  for (std::int64_t C : {1, 13, 301, 1000}) {
    const Pair ids = both_empty(DType::i32, Shape{T, E}), wts = both_empty(DType::f32, Shape{T, E}),
               st = both_empty(DType::f32, Shape{E + 1});
    cpu().route_expert_choice(logits.c, C, ids.c, wts.c, st.c);
    gpu().route_expert_choice(logits.g, C, ids.g, wts.g, st.g);
    CHECK(host_i32(gpu(), ids.g) == host_i32(cpu(), ids.c));
    close_f32(wts, 1e-7, 1e-5, "expert choice weights");
    close_f32(st, 1e-4, 1e-5, "expert choice stats");
  }
}

TEST_CASE("cuda: permutation and elementwise primitives", "[cuda]") {
  const std::int64_t T = 129, d = 1000, R = 300, k = 3;
  const Pair x = both_f32(Shape{T, d}, random_floats(T * d, 20, -5.0f, 5.0f));
  std::mt19937 g(21);
  std::vector<std::int32_t> rt(R), sr(T * k);
  for (auto& v : rt) v = static_cast<std::int32_t>(g() % T);
  for (auto& v : sr) v = g() % 5 == 0 ? -1 : static_cast<std::int32_t>(g() % R);
  const Pair rows = both_i32(Shape{R}, rt), slots = both_i32(Shape{T, k}, sr);
  const Pair gathered = both_empty(DType::f32, Shape{R, d});
  cpu().gather_rows(x.c, rows.c, gathered.c);
  gpu().gather_rows(x.g, rows.g, gathered.g);
  close_f32(gathered, 0.0, 0.0, "gather_rows");
  const Pair w = both_f32(Shape{T, k}, random_floats(T * k, 22, 0.0f, 1.0f));
  for (bool acc : {false, true}) {
    const Pair out = both_f32(Shape{T, d}, random_floats(T * d, 23));
    cpu().combine(gathered.c, slots.c, w.c, out.c, acc);
    gpu().combine(gathered.g, slots.g, w.g, out.g, acc);
    close_f32(out, 1e-6, 1e-6, "combine");
  }
  const Pair h2 = both_f32(Shape{T, 2 * d}, random_floats(T * 2 * d, 24, -8.0f, 8.0f));
  const Pair act = both_empty(DType::f32, Shape{T, d});
  cpu().silu_mul(h2.c, act.c);
  gpu().silu_mul(h2.g, act.g);
  close_f32(act, 1e-6, 1e-5, "silu_mul");
  cpu().gelu(x.c, act.c);
  gpu().gelu(x.g, act.g);
  close_f32(act, 1e-6, 1e-5, "gelu");
  const Pair sm = both_f32(Shape{T, d}, random_floats(T * d, 25, -20.0f, 20.0f));
  cpu().softmax(sm.c);
  gpu().softmax(sm.g);
  close_f32(sm, 1e-8, 1e-5, "softmax");
  const Pair nw = both_f32(Shape{d}, random_floats(d, 26, 0.5f, 1.5f));
  cpu().rms_norm(x.c, nw.c, 1e-6f, act.c);
  gpu().rms_norm(x.g, nw.g, 1e-6f, act.g);
  close_f32(act, 1e-6, 1e-5, "rms_norm");
  const Pair y = both_f32(Shape{T, d}, random_floats(T * d, 27));
  cpu().add(x.c, y.c, act.c);
  gpu().add(x.g, y.g, act.g);
  close_f32(act, 0.0, 0.0, "add");
  const Pair sc = both_f32(Shape{T}, random_floats(T, 28, -3.0f, 3.0f));
  for (RowScale f : {RowScale::identity, RowScale::sigmoid}) {
    cpu().add_scaled_rows(x.c, sc.c, f, act.c);
    gpu().add_scaled_rows(x.g, sc.g, f, act.g);
    close_f32(act, 1e-5, 1e-5, "add_scaled_rows");
  }
  cpu().add_bias(x.c, nw.c, act.c);
  gpu().add_bias(x.g, nw.g, act.g);
  close_f32(act, 0.0, 0.0, "add_bias");
  cpu().clamp(act.c, -1.0f, 2.0f);
  gpu().clamp(act.g, -1.0f, 2.0f);
  close_f32(act, 0.0, 0.0, "clamp");
  const Pair ids = both_i32(Shape{R}, rt);
  const Pair emb = both_empty(DType::f32, Shape{R, d});
  cpu().embedding(x.c, ids.c, emb.c);
  gpu().embedding(x.g, ids.g, emb.g);
  close_f32(emb, 0.0, 0.0, "embedding");
  REQUIRE_ERROR(gpu().embedding(x.g, tensor_i32(gpu(), Shape{3}, {0, 129, 1}),
                                Tensor(gpu(), DType::f32, Shape{3, d})),
                out_of_range, "CudaBackend::embedding]", "token id 129 at position 1");
}

TEST_CASE("cuda: copy_columns (dtypes, repeats, overlap), rope, attention", "[cuda]") {
  for (DType dt : {DType::f32, DType::bf16, DType::i8}) {
    const std::int64_t R = 17, Cs = 40, g = 3, Cd = 50;
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(R * Cs) * dtype_size(dt));
    std::mt19937 r(30);
    for (auto& b : bytes) b = static_cast<std::uint8_t>(r());
    Tensor sc(cpu(), dt, Shape{R, Cs}), sg(gpu(), dt, Shape{R, Cs});
    cpu().copy_from_host(sc, bytes.data());
    gpu().copy_from_host(sg, bytes.data());
    std::vector<std::uint8_t> zero(static_cast<std::size_t>(R * g * Cd) * dtype_size(dt), 0);
    Tensor dc(cpu(), dt, Shape{R * g, Cd}), dg(gpu(), dt, Shape{R * g, Cd});
    cpu().copy_from_host(dc, zero.data());
    gpu().copy_from_host(dg, zero.data());
    cpu().copy_columns(sc, 5, dc, 11, 30);
    gpu().copy_columns(sg, 5, dg, 11, 30);
    std::vector<std::uint8_t> hc(zero.size()), hg(zero.size());
    cpu().copy_to_host(hc.data(), dc);
    gpu().copy_to_host(hg.data(), dg);
    CHECK(hc == hg);
    // Within one matrix, overlapping ranges: the CPU's memmove semantics.
    cpu().copy_columns(sc, 0, sc, 3, 30);
    gpu().copy_columns(sg, 0, sg, 3, 30);
    std::vector<std::uint8_t> oc(bytes.size()), og(bytes.size());
    cpu().copy_to_host(oc.data(), sc);
    gpu().copy_to_host(og.data(), sg);
    CHECK(oc == og);
  }
  const std::int64_t T = 37, H = 6, D = 96;
  std::vector<std::int32_t> pos(T);
  for (std::int64_t t = 0; t < T; ++t) pos[t] = static_cast<std::int32_t>(3000 + 17 * t);
  const Pair positions = both_i32(Shape{T}, pos);
  for (const RopeParams p : {RopeParams{0, 0, false, 1.0f}, RopeParams{32, 64, true, 1.2f},
                             RopeParams{16, 32, false, 0.9f}}) {
    const std::int64_t r = p.rotary_dim == 0 ? D - p.offset : p.rotary_dim;
    std::vector<float> inv(static_cast<std::size_t>(r / 2));
    for (std::size_t i = 0; i < inv.size(); ++i)
      inv[i] = static_cast<float>(
          std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(r)));
    const Pair f = both_f32(Shape{r / 2}, inv);
    const Pair xr = both_f32(Shape{T, H, D}, random_floats(T * H * D, 31));
    cpu().rope(xr.c, positions.c, f.c, p);
    gpu().rope(xr.g, positions.g, f.g, p);
    // Angles up to ~3600 rad: sin/cos of large f32 arguments differ by a few ulp of the angle.
    close_f32(xr, 2e-4, 2e-4, "rope");
  }
  struct Case {
    std::int64_t T, S, Hq, Hkv, D, Dv;
    AttentionParams p;
  };
  for (Case c : {Case{1, 300, 8, 2, 64, 64, {0.125f, true, 0}},
                 Case{40, 300, 8, 8, 128, 128, {0.09f, true, 0}},
                 Case{40, 300, 4, 1, 192, 128, {0.07f, true, 64}},
                 Case{16, 50, 6, 3, 32, 48, {0.2f, false, 0}},
                 Case{3, 10, 2, 1, 16, 512, {0.2f, true, 0}}}) {
    const Pair q =
        both_f32(Shape{c.T, c.Hq, c.D}, random_floats(c.T * c.Hq * c.D, 40, -2.0f, 2.0f));
    const Pair kk =
        both_f32(Shape{c.S, c.Hkv, c.D}, random_floats(c.S * c.Hkv * c.D, 41, -2.0f, 2.0f));
    const Pair v = both_f32(Shape{c.S, c.Hkv, c.Dv}, random_floats(c.S * c.Hkv * c.Dv, 42));
    std::vector<std::int32_t> qp(static_cast<std::size_t>(c.T));
    for (std::int64_t t = 0; t < c.T; ++t) qp[t] = static_cast<std::int32_t>(c.S - c.T + t);
    const Pair qpos = both_i32(Shape{c.T}, qp);
    const Pair out = both_empty(DType::f32, Shape{c.T, c.Hq, c.Dv});
    cpu().attention(q.c, kk.c, v.c, qpos.c, c.p, out.c);
    gpu().attention(q.g, kk.g, v.g, qpos.g, c.p, out.g);
    close_f32(out, 1e-5, 1e-4, "attention");
  }
}

TEST_CASE("cuda: row-major weights only; CUDA-specific errors", "[cuda]") {
  CudaBackend& b = gpu();
  CHECK(b.weight_layout() == Layout::row_major);
  CHECK(b.device().kind == DeviceKind::cuda);
  Tensor w = uniform(b, Shape{2, 40, 8}, 1);
  REQUIRE_ERROR(b.relayout(w, Tensor(b, DType::f32, Shape{2, 40, 8}, Layout::panel32)), unsupported,
                "CudaBackend::relayout]");
  std::vector<float> h(2 * 40 * 8);
  REQUIRE_ERROR(b.copy_from_host(Tensor(b, DType::f32, Shape{2, 40, 8}, Layout::panel32), h.data()),
                unsupported, "copy_from_host]", "row-major");
  REQUIRE_ERROR(CudaBackend(CudaBackendOptions{.device = 1000}), device, "CudaBackend",
                "device=1000");
  // Non-finite router logits are found on the device and reported like the CPU does.
  std::vector<float> L(5 * 8, 0.5f);
  L[3 * 8 + 6] = std::numeric_limits<float>::infinity();
  Tensor ids(b, DType::i32, Shape{5, 2}), wt(b, DType::f32, Shape{5, 2}),
      st(b, DType::f32, Shape{9});
  REQUIRE_ERROR(
      b.route_topk(tensor_f32(b, Shape{5, 8}, L), TensorView{}, RouteParams{}, ids, wt, st),
      numeric, "CudaBackend::route_topk]", "router logit [3, 6] is inf");
}

// ------------------------------------------------------------------------------ int8

namespace {

/// max |got - want| <= rtol * max |want|: the error relative to the product's scale, as
/// tests/test_quant.cpp measures int8 products (a single output may cancel to ~0, where an
/// elementwise relative bound means nothing).
void close_scaled(const Pair& p, double rtol, const std::string& what) {
  const std::vector<float> got = host_f32(gpu(), p.g), want = host_f32(cpu(), p.c);
  REQUIRE(got.size() == want.size());
  double scale = 1e-30, diff = 0.0;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    scale = std::max(scale, std::abs(static_cast<double>(want[i])));
    const double d = std::abs(static_cast<double>(got[i]) - want[i]);
    if (d > diff || std::isnan(d)) {
      diff = std::isnan(d) ? std::numeric_limits<double>::infinity() : d;
      worst = i;
    }
  }
  INFO(what << ": max |diff| " << diff << " at " << worst << " vs max |ref| " << scale);
  CHECK(diff <= rtol * scale);
}

/// The same int8 weights on both backends: quantised (row-major) on the CPU, data and scales
/// copied to the GPU.
struct QPair {
  QuantizedTensor c, g;
};

/// A GPU tensor with src's contents whose first element sits `shift` elements past an aligned
/// address (a view into a larger buffer): the kernels' unaligned paths.
Tensor shifted_gpu_copy(const Tensor& src, Backend& src_backend, std::int64_t shift) {
  const std::size_t es = dtype_size(src.dtype());
  std::vector<unsigned char> bytes(src.nbytes());
  src_backend.copy_to_host(bytes.data(), src);
  auto big = std::make_shared<Tensor>(gpu(), src.dtype(), Shape{src.numel() + 16});
  TensorView v = src.view();
  v.device = gpu().device();
  v.data = static_cast<unsigned char*>(big->view().data) + static_cast<std::size_t>(shift) * es;
  gpu().copy_from_host(v, bytes.data());
  return Tensor(gpu(), v, std::move(big));
}

QPair quantize_both(Shape s, const std::vector<float>& h, QuantSpec spec, std::int64_t shift = 0) {
  QuantizedTensor c = quantize(cpu(), tensor_f32(cpu(), s, h), spec, "w", /*pack=*/false);
  Tensor data = shifted_gpu_copy(c.data(), cpu(), shift);
  Tensor scales = shifted_gpu_copy(c.scales(), cpu(), 0);
  Tensor col_scales = c.has_col_scales() ? shifted_gpu_copy(c.col_scales(), cpu(), 0) : Tensor();
  return {std::move(c),
          QuantizedTensor(std::move(data), std::move(scales), spec, std::move(col_scales))};
}

/// Weights like trained ones: normal, a few columns 4x larger (test_quant.cpp's trained_like).
std::vector<float> weights(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::vector<float> w(static_cast<std::size_t>(rows * cols));
  for (float& v : w) v = nd(rng);
  for (std::int64_t c = 0; c < cols; c += 97)
    for (std::int64_t r = 0; r < rows; ++r) w[static_cast<std::size_t>(r * cols + c)] *= 4.0f;
  return w;
}

/// Activations in [-2, 2] with an all-zero row (a zero activation scale) when m > 1.
std::vector<float> activations(std::int64_t m, std::int64_t k, std::uint64_t seed) {
  std::vector<float> x = random_floats(static_cast<std::size_t>(m * k), seed, -2.0f, 2.0f);
  if (m > 1) std::fill(x.begin() + k, x.begin() + 2 * k, 0.0f);
  x[0] = 0.0f;
  return x;
}

double int8_rtol(ActivationMode mode) {
  return mode == ActivationMode::w8a8 ? 1e-5 : 1e-4;
}

}  // namespace

TEST_CASE("cuda: qgemm equals the CPU's on the same int8 weights", "[cuda][int8]") {
  struct Case {
    std::int64_t n, k;
  };
  // k: vector loads (k % 16 == 0) and byte loads (per channel: 100, 99), groups 32 / 64 / 128;
  // m: the decode kernel's 1, 2, 4 and 8 rows per pass, then the tiled kernel.
  for (Case s : {Case{1000, 2048}, Case{300, 96}, Case{37, 1408}, Case{64, 100}, Case{130, 99},
                 Case{1, 4096}, Case{200, 48}}) {
    for (std::int64_t group : {0, 32, 64, 128}) {
      if (group != 0 && s.k % group != 0) continue;
      for (ActivationMode mode : {ActivationMode::w8a8, ActivationMode::weight_only}) {
        const QuantSpec spec{group, mode};
        const QPair w = quantize_both(Shape{s.n, s.k}, weights(s.n, s.k, 50 + s.k), spec);
        for (std::int64_t m : {1, 2, 3, 5, 8, 9, 64, 130}) {
          const Pair x = both_f32(Shape{m, s.k}, activations(m, s.k, 60 + m));
          // Prefilled: every output must be written.
          const Pair out = both_f32(Shape{m, s.n}, std::vector<float>(m * s.n, 7.0f));
          cpu().qgemm(x.c, w.c, out.c);
          gpu().qgemm(x.g, w.g, out.g);
          close_scaled(out, int8_rtol(mode),
                       fmt::format("qgemm n {} k {} {} {} m {}", s.n, s.k, spec.scheme_name(),
                                   spec.mode_name(), m));
        }
      }
    }
  }
  // Through linear(), as layers call it.
  const QPair w = quantize_both(Shape{96, 256}, weights(96, 256, 70), QuantSpec{64});
  const Pair x = both_f32(Shape{4, 256}, activations(4, 256, 71));
  const Pair out = both_empty(DType::f32, Shape{4, 96});
  linear(cpu(), x.c, Weight(w.c), out.c);
  linear(gpu(), x.g, Weight(w.g), out.g);
  close_scaled(out, 1e-4, "linear int8");
}

TEST_CASE("cuda: grouped_qgemm equals the CPU's; unaligned operands", "[cuda][int8]") {
  const std::int64_t E = 9, R = 333;
  std::vector<std::int32_t> off{0};
  std::mt19937 g(80);
  // Experts 2 and 5 empty, some with decode-sized row counts, some tiled.
  for (std::int64_t e = 0; e < E; ++e) {
    const std::int32_t rows = e == 2 || e == 5 ? 0
                              : e % 2          ? static_cast<std::int32_t>(1 + g() % 8)
                                               : static_cast<std::int32_t>(g() % 90);
    off.push_back(std::min<std::int32_t>(static_cast<std::int32_t>(R - 7), off.back() + rows));
  }
  struct Case {
    std::int64_t n, k, group;
  };
  for (Case c : {Case{96, 256, 0}, Case{200, 256, 32}, Case{64, 384, 128}, Case{50, 100, 0}})
    for (ActivationMode mode : {ActivationMode::w8a8, ActivationMode::weight_only})
      for (std::int64_t shift : {0, 1}) {  // 1: weights one byte off (byte-load paths)
        const QuantSpec spec{c.group, mode};
        const QPair w = quantize_both(Shape{E, c.n, c.k}, weights(E * c.n, c.k, 81), spec, shift);
        const std::vector<float> xh = activations(R, c.k, 82);
        const Pair x = both_f32(Shape{R, c.k}, xh), o = both_i32(Shape{E + 1}, off);
        const Pair out = both_f32(Shape{R, c.n}, std::vector<float>(R * c.n, 3.0f));  // tail kept
        cpu().grouped_qgemm(x.c, w.c, o.c, out.c);
        gpu().grouped_qgemm(x.g, w.g, o.g, out.g);
        const std::string what = fmt::format("grouped_qgemm n {} k {} {} {} shift {}", c.n, c.k,
                                             spec.scheme_name(), spec.mode_name(), shift);
        close_scaled(out, int8_rtol(mode), what);
        // Activations one float off 16-byte alignment: the weight-only byte-load path.
        const Tensor xs = shifted_gpu_copy(x.g, gpu(), 1);
        const Pair out2{out.c, Tensor(gpu(), DType::f32, Shape{R, c.n})};
        gpu().fill(out2.g, 3.0f);
        gpu().grouped_qgemm(xs, w.g, o.g, out2.g);
        close_scaled(out2, int8_rtol(mode), what + " (x unaligned)");
      }
}

TEST_CASE("cuda: int8 weights stay row-major; qembedding is exact", "[cuda][int8]") {
  const std::int64_t V = 500, d = 256;
  for (std::int64_t group : {0, 32, 128}) {
    const QuantSpec spec{group, ActivationMode::weight_only, /*equalize=*/false};  // a table
    const std::vector<float> th = weights(V, d, 90);
    const QPair t = quantize_both(Shape{V, d}, th, spec);
    // quantize() on the GPU backend gives the CPU's codes and scales; pack_quantized keeps them
    // row-major, so quantized_to_host's default reads them back.
    const QuantizedTensor direct = quantize(gpu(), tensor_f32(gpu(), Shape{V, d}, th), spec, "t");
    CHECK_FALSE(direct.is_packed());
    std::vector<std::int8_t> codes(static_cast<std::size_t>(V * d)), codes_g(codes.size());
    std::vector<float> sc(static_cast<std::size_t>(V * t.c.groups())), sc_g(sc.size());
    cpu().quantized_to_host(t.c, codes.data(), sc.data());
    gpu().quantized_to_host(direct, codes_g.data(), sc_g.data());
    CHECK(codes_g == codes);
    check_bitwise(sc_g, sc, "scales");
    check_bitwise(host_f32(gpu(), dequantize(gpu(), direct)),
                  host_f32(cpu(), dequantize(cpu(), t.c)), "dequantize");

    std::vector<std::int32_t> ids(300);
    std::mt19937 g(91);
    for (auto& v : ids) v = static_cast<std::int32_t>(g() % V);
    ids[0] = 0;
    ids[1] = static_cast<std::int32_t>(V - 1);
    const Pair id = both_i32(Shape{300}, ids), out = both_empty(DType::f32, Shape{300, d});
    cpu().qembedding(t.c, id.c, out.c);
    gpu().qembedding(t.g, id.g, out.g);
    check_bitwise(host_f32(gpu(), out.g), host_f32(cpu(), out.c), "qembedding");
  }
  const QPair t = quantize_both(Shape{11, 64}, weights(11, 64, 92), QuantSpec{});
  REQUIRE_ERROR(gpu().qembedding(t.g, tensor_i32(gpu(), Shape{4}, {0, 11, 1, -1}),
                                 Tensor(gpu(), DType::f32, Shape{4, 64})),
                out_of_range, "[CudaBackend::qembedding]", "token id 11 at position 1", "[0, 11)");
  REQUIRE_ERROR(gpu().qembedding(t.c, tensor_i32(gpu(), Shape{1}, {0}),
                                 Tensor(gpu(), DType::f32, Shape{1, 64})),
                device, "[CudaBackend::qembedding]", "another backend");
}

TEST_CASE("cuda: int8 argument errors match the CPU's", "[cuda][int8]") {
  CudaBackend& b = gpu();
  const QPair w = quantize_both(Shape{8, 64}, weights(8, 64, 100), QuantSpec{32});
  Tensor c(b, DType::f32, Shape{3, 8});
  REQUIRE_ERROR(b.qgemm(uniform(b, Shape{3, 32}, 1), w.g, c), shape_mismatch,
                "[CudaBackend::qgemm]", "disagree on K");
  REQUIRE_ERROR(b.qgemm(uniform(b, Shape{3, 64}, 1), w.c, c), device, "[CudaBackend::qgemm]",
                "another backend");
  REQUIRE_ERROR(b.qgemm(uniform(b, Shape{3, 64}, 1), w.g, Tensor(b, DType::f32, Shape{3, 9})),
                shape_mismatch, "[CudaBackend::qgemm]", "c dimension 1 must be 8");
  // A tensor packed for another layout is refused, not misread.
  const QuantizedTensor packed =
      QuantizedTensor::packed(w.g.shape(), w.g.spec(), w.g.data(), w.g.scales(), Tensor());
  REQUIRE_ERROR(b.qgemm(uniform(b, Shape{3, 64}, 1), packed, c), unsupported,
                "[CudaBackend::qgemm]", "packed");
  REQUIRE_ERROR(
      b.qembedding(packed, tensor_i32(b, Shape{1}, {0}), Tensor(b, DType::f32, Shape{1, 64})),
      invalid_argument, "[CudaBackend::qembedding]", "(packed)");
  // W8A8 per channel past what int32 sums hold (127 * 127 * K > INT32_MAX) is refused;
  // weight-only sums in f32 and takes it.
  const std::int64_t long_k = 2147483647 / (127 * 127) + 1;
  const Tensor xl = uniform(b, Shape{1, long_k}, 3);
  Tensor cl(b, DType::f32, Shape{1, 1});
  const QPair wl =
      quantize_both(Shape{1, long_k}, weights(1, long_k, 102), QuantSpec{0, ActivationMode::w8a8});
  REQUIRE_ERROR(b.qgemm(xl, wl.g, cl), unsupported, "[CudaBackend::qgemm]", "W8A8 sums in int32");
  const QPair wl2 = quantize_both(Shape{1, long_k}, weights(1, long_k, 102), QuantSpec{});
  b.qgemm(xl, wl2.g, cl);

  const QPair e = quantize_both(Shape{3, 8, 64}, weights(24, 64, 101), QuantSpec{0});
  Tensor x = uniform(b, Shape{6, 64}, 2), out(b, DType::f32, Shape{6, 8});
  REQUIRE_ERROR(b.grouped_qgemm(x, e.g, tensor_i32(b, Shape{4}, {0, 4, 2, 6}), out),
                invalid_argument, "[CudaBackend::grouped_qgemm]", "offsets decrease at expert 1");
  REQUIRE_ERROR(b.grouped_qgemm(x, e.g, tensor_i32(b, Shape{4}, {0, 2, 4, 7}), out),
                invalid_argument, "[CudaBackend::grouped_qgemm]", "within 6 rows");
  REQUIRE_ERROR(b.grouped_qgemm(x, w.g, tensor_i32(b, Shape{4}, {0, 2, 4, 6}), out), shape_mismatch,
                "[CudaBackend::grouped_qgemm]", "[E, N, K]");
  REQUIRE_ERROR(b.grouped_qgemm(x, e.g, tensor_i32(b, Shape{3}, {0, 2, 4}), out), shape_mismatch,
                "[CudaBackend::grouped_qgemm]", "offsets dimension 0 must be 4");
  // Empty sums: K = 0 writes zeros, per channel too (where groups() would divide by zero).
  for (std::int64_t group : {0, 32}) {
    const QuantizedTensor k0(Tensor(b, DType::i8, Shape{5, 0}), Tensor(b, DType::f32, Shape{5, 0}),
                             QuantSpec{group});
    Tensor c0 = tensor_f32(b, Shape{2, 5}, std::vector<float>(10, 1.0f));
    b.qgemm(Tensor(b, DType::f32, Shape{2, 0}), k0, c0);
    CHECK(host_f32(b, c0) == std::vector<float>(10, 0.0f));
    const QuantizedTensor e0(Tensor(b, DType::i8, Shape{2, 5, 0}),
                             Tensor(b, DType::f32, Shape{2, 5, 0}), QuantSpec{group});
    Tensor o0 = tensor_f32(b, Shape{4, 5}, std::vector<float>(20, 1.0f));
    b.grouped_qgemm(Tensor(b, DType::f32, Shape{4, 0}), e0, tensor_i32(b, Shape{3}, {0, 1, 3}), o0);
    std::vector<float> want(20, 0.0f);
    std::fill(want.begin() + 15, want.end(), 1.0f);  // row 3 is past offsets[E]: untouched
    CHECK(host_f32(b, o0) == want);
  }
}

// ------------------------------------------------------------------------------ fixtures

namespace {

namespace fs = std::filesystem;

struct Expected {
  std::vector<std::int32_t> prompt, greedy, decode_inputs;
  std::map<std::string, std::vector<float>> arrays;
};

Expected read_expected(const fs::path& dir) {
  std::ifstream jf(dir / "expected.json");
  REQUIRE(jf.good());
  const nlohmann::json j = nlohmann::json::parse(jf);
  Expected e;
  e.prompt = j.at("prompt").get<std::vector<std::int32_t>>();
  e.greedy = j.at("greedy").get<std::vector<std::int32_t>>();
  e.decode_inputs = j.at("decode_inputs").get<std::vector<std::int32_t>>();
  const auto& bin = j.at("binary");
  std::ifstream bf(dir / bin.at("file").get<std::string>(), std::ios::binary);
  REQUIRE(bf.good());
  for (const auto& [name, a] : bin.at("arrays").items()) {
    std::vector<float> v(a.at("count").get<std::size_t>());
    bf.seekg(a.at("offset").get<std::streamoff>());
    bf.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * 4));
    e.arrays[name] = std::move(v);
  }
  return e;
}

/// max|got - want| / max(1, max|want|).
double rel_error(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  double diff = 0.0, scale = 1.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  }
  return diff / scale;
}

void check_fixture_on_gpu(const std::string& name) {
  const fs::path dir = fs::path(AUTOGLM_FIXTURES_DIR) / name;
  const Expected ex = read_expected(dir);
  LoadOptions lo;
  FidelityOptions f;  // transformers 5.x numerics, as the fixtures were made
  f.group_mask = GroupMask::neg_inf;
  f.renorm_epsilon = 1e-20f;
  lo.fidelity = f;
  CudaBackend& b = gpu();
  const Model model = load_model(b, dir, lo);
  const Model ref = load_model(cpu(), dir, lo);

  Session s(model);
  const std::vector<float> prefill = host_f32(b, s.prefill(ex.prompt, true));
  const double e_prefill = rel_error(prefill, ex.arrays.at("prefill_logits"));
  CHECK(e_prefill <= 1e-3);
  std::vector<float> decode;
  for (std::int32_t t : ex.decode_inputs) {
    const std::vector<float> row = host_f32(b, s.append(std::span(&t, 1)));
    decode.insert(decode.end(), row.begin(), row.end());
  }
  const double e_decode = rel_error(decode, ex.arrays.at("decode_logits"));
  CHECK(e_decode <= 1e-3);
  const std::vector<float> cpu_logits = host_f32(cpu(), ref.forward(ex.prompt));
  const double e_cpu = rel_error(host_f32(b, model.forward(ex.prompt)), cpu_logits);
  CHECK(e_cpu <= 1e-3);

  Session g(model);
  GenerateOptions go;
  go.max_new_tokens = 16;
  CHECK(g.generate(ex.prompt, go) == ex.greedy);
  INFO(name << " on cuda: relative error prefill " << e_prefill << ", decode " << e_decode
            << ", vs cpu " << e_cpu);
  SUCCEED();
}

}  // namespace

TEST_CASE("cuda fixtures: every model family through the CUDA backend", "[cuda][fixtures]") {
  for (const char* name :
       {"mixtral_hub_sharded", "mixtral_fused_tied", "qwen2_moe", "qwen3_moe", "olmoe",
        "deepseek_v3", "deepseek_v3_fused_noqlora", "glm4_moe_qknorm", "glm4_moe_hub_tied"}) {
    DYNAMIC_SECTION(name) {
      check_fixture_on_gpu(name);
    }
  }
}

TEST_CASE("cuda fixtures: int8 models equal the CPU's int8 models", "[cuda][fixtures][int8]") {
  // quantize_model on each backend: the same int8 codes (quantize() rounds on the host), the
  // embeddings and the head int8 too, so qembedding and the LM-head qgemm run as well.
  for (const char* name : {"mixtral_hub_sharded", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3",
                           "glm4_moe_qknorm", "glm4_moe_hub_tied"}) {
    const fs::path dir = fs::path(AUTOGLM_FIXTURES_DIR) / name;
    const Expected ex = read_expected(dir);
    LoadOptions lo;
    FidelityOptions f;
    f.group_mask = GroupMask::neg_inf;
    f.renorm_epsilon = 1e-20f;
    lo.fidelity = f;
    const Model g32 = load_model(gpu(), dir, lo);
    const Model c32 = load_model(cpu(), dir, lo);
    for (const QuantSpec spec :
         {QuantSpec{0, ActivationMode::weight_only}, QuantSpec{32, ActivationMode::weight_only},
          QuantSpec{0, ActivationMode::w8a8}, QuantSpec{32, ActivationMode::w8a8}}) {
      QuantConfig cfg;
      cfg.spec = spec;
      cfg.embeddings = true;
      cfg.lm_head = true;
      const Model gq = quantize_model(g32, cfg), cq = quantize_model(c32, cfg);
      const double e =
          rel_error(host_f32(gpu(), gq.forward(ex.prompt)), host_f32(cpu(), cq.forward(ex.prompt)));
      INFO(name << " " << spec.scheme_name() << " " << spec.mode_name()
                << ": relative error vs the CPU " << e);
      // W8A8 rounds each activation to a grid of max|x| / 127: where the two backends' f32
      // activations straddle a rounding boundary (they differ by ~1e-6 relative), one int8
      // value differs by one step, ~1e-3 of a 64-wide product on these small models.
      CHECK(e <= (spec.mode == ActivationMode::w8a8 ? 1e-2 : 1e-3));
    }
  }
}
