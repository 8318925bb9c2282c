// SPDX-License-Identifier: Apache-2.0
#include "autoglm/backend/cpu_backend.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include "common/checks.hpp"
#include "common/random.hpp"
#include "cpu/cpu_backend_impl.hpp"
#include "cpu/gemm_kernels.hpp"

namespace autoglm {
namespace {

using detail::expect_dim;
using detail::expect_dtype;
using detail::expect_matrix;
using detail::expect_rank;
using detail::expect_same_shape;

// exp(x) for x in float range, within ~2 ulp: Cody-Waite reduction x = n ln2 + r and a degree-6
// polynomial for e^r; branch-free and call-free so loops over it vectorise.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  // Round x / ln2 to an integer by the 1.5 * 2^23 trick: no float-to-int conversion, so a NaN
  // input propagates as NaN instead of being undefined behaviour.
  constexpr float kShift = 12582912.0f;
  const float t = x * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  const std::int32_t ni = std::bit_cast<std::int32_t>(t) - std::bit_cast<std::int32_t>(kShift);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>(static_cast<std::uint32_t>(ni + 127) << 23);
}

}  // namespace

CpuBackend::CpuBackend(CpuBackendOptions options) {
  AUTOGLM_CHECK(options.threads >= 0, invalid_argument, "CpuBackend", "threads={} must be >= 0",
                options.threads);
  const int n = options.threads == 0 ? tbb::info::default_concurrency() : options.threads;
  impl_ = std::make_unique<Impl>(n, options.cache_bytes, options.huge_pages);
  // Asked only when wanted: the AMX check requests the tile state from Linux.
  impl_->bf16_amx = options.bf16_compute && detail::amx_bf16_available();
  impl_->bf16_compute =
      options.bf16_compute && (impl_->bf16_amx || detail::avx512_bf16_available()) &&
      weight_layout() == Layout::panel32 && detail::panel_kernel_reads(DType::bf16);
}

bool CpuBackend::bf16_compute() const noexcept {
  return impl_->bf16_compute;
}

CpuBackend::~CpuBackend() = default;

int CpuBackend::num_threads() const noexcept {
  return impl_->arena.max_concurrency();
}

void* CpuBackend::allocate(std::size_t bytes) {
  void* p = impl_->take(bytes);
  AUTOGLM_CHECK(p != nullptr, device, "CpuBackend::allocate", "out of memory for {} bytes", bytes);
  return p;
}

void CpuBackend::deallocate(void* ptr) noexcept {
  impl_->give(ptr);
}

namespace {

// Calls f(matrix index, n, k) for every [n, k] matrix of a panel32 view.
template <typename F>
void for_each_matrix(const TensorView& t, F&& f) {
  const std::int64_t n = t.dim(t.rank() - 2), k = t.dim(t.rank() - 1);
  const std::int64_t count = n * k == 0 ? 0 : t.numel() / (n * k);
  for (std::int64_t i = 0; i < count; ++i) f(i, n, k);
}

// Elements of one panel32 matrix [n, k] (padded rows included).
std::int64_t panel_elems(std::int64_t n, std::int64_t k) {
  return (n + kPanelRows - 1) / kPanelRows * kPanelRows * k;
}

// Byte pointer `elems` elements of dtype dt past p.
template <typename T>
T* advance(T* p, std::int64_t elems, DType dt) {
  using Byte = std::conditional_t<std::is_const_v<T>, const char, char>;
  return reinterpret_cast<Byte*>(p) + elems * static_cast<std::int64_t>(dtype_size(dt));
}

// Throws unless t is a float dtype this backend keeps weights in (panel32 takes no other).
void expect_panel_dtype(std::string_view fn, std::string_view arg, const TensorView& t,
                        const Backend& b) {
  if (t.layout == Layout::panel32) detail::expect_weight_dtype(fn, arg, t, b);
}

}  // namespace

void CpuBackend::copy_from_host(TensorView dst, const void* src) {
  detail::expect_device("CpuBackend::copy_from_host", "dst", dst, device(), true);
  if (dst.layout == Layout::panel32) {
    expect_panel_dtype("CpuBackend::copy_from_host", "dst", dst, *this);
    for_each_matrix(dst, [&](std::int64_t i, std::int64_t n, std::int64_t k) {
      detail::to_panels(advance(src, i * n * k, dst.dtype), dst.dtype, n, k,
                        advance(dst.data, i * panel_elems(n, k), dst.dtype));
    });
    return;
  }
  if (dst.nbytes() > 0) std::memcpy(dst.data, src, dst.nbytes());
}

void CpuBackend::copy_to_host(void* dst, TensorView src) {
  detail::expect_device("CpuBackend::copy_to_host", "src", src, device(), true);
  if (src.layout == Layout::panel32) {
    expect_panel_dtype("CpuBackend::copy_to_host", "src", src, *this);
    for_each_matrix(src, [&](std::int64_t i, std::int64_t n, std::int64_t k) {
      detail::from_panels(advance(src.data, i * panel_elems(n, k), src.dtype), src.dtype, n, k,
                          advance(dst, i * n * k, src.dtype));
    });
    return;
  }
  if (src.nbytes() > 0) std::memcpy(dst, src.data, src.nbytes());
}

bool CpuBackend::supports_weight_dtype(DType t) const noexcept {
  return t == DType::f32 || (weight_layout() == Layout::panel32 && detail::panel_kernel_reads(t));
}

Layout CpuBackend::weight_layout() const noexcept {
#if defined(__AVX512F__)
  return Layout::panel32;
#else
  return Layout::row_major;
#endif
}

void CpuBackend::relayout(TensorView src, TensorView dst) {
  constexpr std::string_view fn = "CpuBackend::relayout";
  detail::expect_device(fn, "src", src, device(), true);
  detail::expect_device(fn, "dst", dst, device(), true);
  detail::expect_weight_dtype(fn, "src", src, *this);
  expect_dtype(fn, "dst", dst, src.dtype);
  expect_same_shape(fn, "src", src, "dst", dst);
  AUTOGLM_CHECK(src.rank() >= 2, shape_mismatch, fn, "weights need rank >= 2, got {}",
                src.shape.str());
  if (src.layout == dst.layout) {
    if (src.data != dst.data && src.nbytes() > 0) std::memmove(dst.data, src.data, src.nbytes());
    return;
  }
  const std::int64_t n = src.dim(src.rank() - 2), k = src.dim(src.rank() - 1);
  const std::int64_t count = n * k == 0 ? 0 : src.numel() / (n * k);
  const DType dt = src.dtype;
  impl_->parallel(count, 1, [&](std::int64_t i) {
    if (dst.layout == Layout::panel32)
      detail::to_panels(advance(src.data, i * n * k, dt), dt, n, k,
                        advance(dst.data, i * panel_elems(n, k), dt));
    else
      detail::from_panels(advance(src.data, i * panel_elems(n, k), dt), dt, n, k,
                          advance(dst.data, i * n * k, dt));
  });
}

void CpuBackend::convert(TensorView src, TensorView dst) {
  constexpr std::string_view fn = "CpuBackend::convert";
  detail::expect_device(fn, "src", src, device());
  detail::expect_device(fn, "dst", dst, device());
  AUTOGLM_CHECK(src.numel() == dst.numel(), shape_mismatch, fn, "src {} and dst {} sizes differ",
                src.shape.str(), dst.shape.str());
  if (src.dtype == dst.dtype) {
    if (src.data != dst.data && src.nbytes() > 0) std::memmove(dst.data, src.data, src.nbytes());
    return;
  }
  AUTOGLM_CHECK(is_float_dtype(src.dtype) && is_float_dtype(dst.dtype), dtype_mismatch, fn,
                "cannot convert {} to {}", dtype_name(src.dtype), dtype_name(dst.dtype));
  auto load = [&](std::int64_t i) -> float {
    return src.dtype == DType::f32 ? src.as<float>()[i]
                                   : half_to_float(src.as<std::uint16_t>()[i], src.dtype);
  };
  const std::int64_t n = src.numel();
  constexpr std::int64_t block = 1 << 14;
  impl_->parallel((n + block - 1) / block, 1, [&](std::int64_t b) {
    const std::int64_t end = std::min(n, (b + 1) * block);
    for (std::int64_t i = b * block; i < end; ++i) {
      const float v = load(i);
      switch (dst.dtype) {
        case DType::f16:
          dst.as<std::uint16_t>()[i] = float_to_f16(v);
          break;
        case DType::bf16:
          dst.as<std::uint16_t>()[i] = float_to_bf16(v);
          break;
        default:
          dst.as<float>()[i] = v;
      }
    }
  });
}

void CpuBackend::fill(TensorView dst, float value) {
  detail::expect_device("CpuBackend::fill", "dst", dst, device());
  expect_dtype("CpuBackend::fill", "dst", dst, DType::f32);
  std::fill_n(dst.as<float>(), dst.numel(), value);
}

void CpuBackend::fill_uniform(TensorView dst, std::uint64_t seed, float scale) {
  detail::expect_device("CpuBackend::fill_uniform", "dst", dst, device(), /*any_layout=*/true);
  expect_dtype("CpuBackend::fill_uniform", "dst", dst, DType::f32);
  float* d = dst.as<float>();
  if (dst.layout == Layout::panel32) {
    // Values follow the logical (row-major) element index, so a panel32 tensor holds exactly
    // what a row-major one filled with the same seed would, without a second copy.
    const std::int64_t n = dst.dim(dst.rank() - 2), k = dst.dim(dst.rank() - 1);
    const std::int64_t panels = (n + kPanelRows - 1) / kPanelRows;
    const std::int64_t count = n * k == 0 ? 0 : dst.numel() / (n * k);
    impl_->parallel(count * panels, 1, [&](std::int64_t job) {
      const std::int64_t m = job / panels, p = job % panels;
      float* out = d + m * panel_elems(n, k) + p * k * kPanelRows;
      for (std::int64_t c = 0; c < k; ++c)
        for (std::int64_t r = 0; r < kPanelRows; ++r) {
          const std::int64_t row = p * kPanelRows + r;
          out[c * kPanelRows + r] =
              row < n ? scale * detail::uniform_pm1(
                                    seed, static_cast<std::uint64_t>((m * n + row) * k + c))
                      : 0.0f;
        }
    });
    return;
  }
  const std::int64_t n = dst.numel();
  constexpr std::int64_t block = 1 << 16;
  impl_->parallel((n + block - 1) / block, 1, [&](std::int64_t b) {
    const std::int64_t end = std::min(n, (b + 1) * block);
    for (std::int64_t i = b * block; i < end; ++i)
      d[i] = scale * detail::uniform_pm1(seed, static_cast<std::uint64_t>(i));
  });
}

namespace {

// Packs each group's rows of x for the panel kernel, in parallel; start[g] is the group's
// offset in the returned buffer.
template <typename Parallel>
Tensor pack_groups(Backend& backend, Parallel&& parallel, const float* x, std::int64_t k,
                   const std::vector<std::int64_t>& row0, const std::vector<std::int64_t>& rows,
                   std::vector<std::int64_t>& start) {
  const auto G = static_cast<std::int64_t>(rows.size());
  start.assign(static_cast<std::size_t>(G), 0);
  std::int64_t total = 0;
  for (std::int64_t g = 0; g < G; ++g) {
    start[g] = total;
    total += detail::packed_x_size(rows[g], k);
  }
  Tensor packed(backend, DType::f32, Shape{total});
  parallel(G, [&](std::int64_t g) {
    if (rows[g] > 0)
      detail::pack_x(x + row0[g] * k, k, rows[g], k, packed.data<float>() + start[g]);
  });
  return packed;
}

// One GEMM tile of a (grouped) product: rows [row0, row0 + rows) of group e, output columns
// [col0, col0 + cols).
struct Tile {
  std::int64_t e, row0, rows, col0, cols;
};

// Rows per tile of the f32 kernels: whole packed blocks (21 of pack_block_rows) with panels.
std::int64_t row_tile(std::int64_t m, bool panels) {
  return panels ? 21 * detail::pack_block_rows(m) : std::min<std::int64_t>(m, 256);
}

// What a tile's row count is a multiple of: whole packed blocks with panels.
std::int64_t row_unit(std::int64_t m, bool panels) {
  return panels ? detail::pack_block_rows(m) : 8;
}

// Tiles of one group of m rows and n columns, mb rows per tile: widths depend on the shape only
// (never on the thread count), so every output element's summation order is fixed.
// mb_unit: the rows a tile's row count must be a multiple of (the packed row blocks).
void add_tiles(std::vector<Tile>& tiles, std::int64_t e, std::int64_t row0, std::int64_t m,
               std::int64_t n, std::int64_t k, std::int64_t mb, std::int64_t mb_unit) {
  if (m == 0 || n == 0) return;
  // Few rows are bandwidth-bound: narrower tiles give more tasks to spread the weight stream.
  std::int64_t nb = m <= 8 ? 96 : 192;
  if (k <= 512) nb *= 2;
  // Few columns (a router's experts) and many rows: split the rows too, so that the product
  // has kMinTiles tasks for the threads (a 128-token router was one tile, one thread).
  constexpr std::int64_t kMinTiles = 8;
  const std::int64_t col_tiles = (n + nb - 1) / nb, row_tiles = (m + mb - 1) / mb;
  if (col_tiles * row_tiles < kMinTiles && m > mb_unit) {
    const std::int64_t units = (m + mb_unit - 1) / mb_unit;
    const std::int64_t want = (kMinTiles + col_tiles - 1) / col_tiles;
    mb = std::min(mb, (units + want - 1) / want * mb_unit);
  }
  for (std::int64_t i0 = 0; i0 < m; i0 += mb)
    for (std::int64_t j0 = 0; j0 < n; j0 += nb)
      tiles.push_back({e, row0 + i0, std::min(mb, m - i0), j0, std::min(nb, n - j0)});
}

// 16-bit weights are read by the panel kernels only: a row-major one is an Error that says
// how to get the kernels' layout (widening it here would hide a copy in every call).
void expect_prepared(std::string_view fn, std::string_view arg, const TensorView& w) {
  AUTOGLM_CHECK(w.dtype == DType::f32 || w.layout == Layout::panel32, unsupported, fn,
                "{} is a row-major {} weight {}; prepare_weights puts it in the kernels' layout",
                arg, dtype_name(w.dtype), w.shape.str());
}

// CpuBackendOptions::bf16_compute: out[rows of group g] = alpha * bf16(x) * w[g]^T + beta * out
// on AMX-BF16 tiles (amx) or with AVX512_BF16 dot products, w bf16 panel32 (matrix g at
// w + g * wstride). Each group's rows are rounded and packed once; row tiles are whole 16-row
// blocks (256 rows).
template <typename Parallel>
void bf16_products(Backend& backend, bool amx, Parallel&& parallel, const float* x, std::int64_t k,
                   const std::vector<std::int64_t>& row0, const std::vector<std::int64_t>& rows,
                   const std::uint16_t* w, std::int64_t wstride, std::int64_t n, float* out,
                   std::int64_t ldo, float alpha, float beta) {
  const auto G = static_cast<std::int64_t>(rows.size());
  std::vector<Tile> tiles;
  std::vector<std::int64_t> start(static_cast<std::size_t>(G));
  std::int64_t total = 0;
  for (std::int64_t g = 0; g < G; ++g) {
    start[g] = total;
    total += detail::amx_packed_a_size(rows[g], k);
    add_tiles(tiles, g, row0[g], rows[g], n, k, 16 * detail::kAmxTileRows,
              16 * detail::kAmxTileRows);
  }
  Tensor packed(backend, DType::bf16, Shape{std::max<std::int64_t>(total, 1)});
  std::uint16_t* ap = packed.data<std::uint16_t>();
  parallel(G, [&](std::int64_t g) {
    if (rows[g] > 0) detail::pack_a_bf16(x + row0[g] * k, k, rows[g], k, ap + start[g]);
  });
  const std::int64_t per_row = (k + detail::kAmxStepK - 1) / detail::kAmxStepK * detail::kAmxStepK;
  parallel(static_cast<std::int64_t>(tiles.size()), [&](std::int64_t i) {
    const Tile& t = tiles[static_cast<std::size_t>(i)];
    const std::uint16_t* a = ap + start[t.e] + (t.row0 - row0[t.e]) * per_row;
    const std::uint16_t* wt = w + t.e * wstride + t.col0 / kPanelRows * kPanelRows * k;
    const std::int64_t panels = (t.cols + kPanelRows - 1) / kPanelRows;
    float* o = out + t.row0 * ldo + t.col0;
    if (!amx) {
      detail::gemm_bf16_dp_tile(a, t.rows, wt, k, panels, t.cols, o, ldo, alpha, beta);
      return;
    }
    thread_local std::vector<std::uint16_t> bs;
    thread_local std::vector<float> cs;
    bs.resize(static_cast<std::size_t>(detail::amx_b_scratch_size(t.rows, k)));
    cs.resize(static_cast<std::size_t>(detail::kAmxCScratch));
    detail::gemm_bf16_amx_tile(a, t.rows, wt, k, panels, t.cols, o, ldo, alpha, beta, bs.data(),
                               cs.data());
  });
}

}  // namespace

void CpuBackend::gemm(TensorView a, TensorView b, TensorView c, GemmParams p) {
  constexpr std::string_view fn = "CpuBackend::gemm";
  expect_matrix(fn, "a", a, device());
  detail::expect_device(fn, "b", b, device(), /*any_layout=*/true);
  expect_rank(fn, "b", b, 2);
  detail::expect_weight_dtype(fn, "b", b, *this);
  expect_matrix(fn, "c", c, device());
  expect_dim(fn, "b", b, 1, a.dim(1));
  expect_dim(fn, "c", c, 0, a.dim(0));
  expect_dim(fn, "c", c, 1, b.dim(0));
  const std::int64_t m = a.dim(0), n = b.dim(0), k = a.dim(1);
  if (m == 0 || n == 0) return;
  expect_prepared(fn, "b", b);
  if (k == 0) {  // an empty sum: C = beta C, whatever the weights' layout (the kernels need k > 0)
    float* C = c.as<float>();
    for (std::int64_t i = 0; i < m * n; ++i) C[i] = p.beta == 0.0f ? 0.0f : p.beta * C[i];
    return;
  }
  const bool panels = b.layout == Layout::panel32;
  if (panels && b.dtype == DType::bf16 && impl_->bf16_compute) {
    bf16_products(
        *this, impl_->bf16_amx, [&](std::int64_t g, auto&& f) { impl_->parallel(g, 1, f); },
        a.as<float>(), k, {0}, {m}, b.as<std::uint16_t>(), 0, n, c.as<float>(), n, p.alpha, p.beta);
    return;
  }
  std::vector<Tile> tiles;
  add_tiles(tiles, 0, 0, m, n, k, row_tile(m, panels), row_unit(m, panels));
  const float* A = a.as<float>();
  const void* B = b.data;
  float* C = c.as<float>();
  Tensor packed;
  if (panels) {
    std::vector<std::int64_t> start;
    packed = pack_groups(
        *this, [&](std::int64_t g, auto&& f) { impl_->parallel(g, 1, f); }, A, k, {0}, {m}, start);
  }
  impl_->parallel(static_cast<std::int64_t>(tiles.size()), 1, [&](std::int64_t i) {
    const Tile& t = tiles[static_cast<std::size_t>(i)];
    if (panels) {
      detail::gemm_panel_tile(packed.data<float>() + t.row0 * k, t.rows, detail::pack_block_rows(m),
                              advance(B, t.col0 / kPanelRows * kPanelRows * k, b.dtype), b.dtype, k,
                              (t.cols + kPanelRows - 1) / kPanelRows, t.cols,
                              C + t.row0 * n + t.col0, n, p.alpha, p.beta);
    } else {
      detail::gemm_nt_tile(A + t.row0 * k, k, static_cast<const float*>(B) + t.col0 * k, k,
                           C + t.row0 * n + t.col0, n, t.rows, t.cols, k, p.alpha, p.beta);
    }
  });
}

void CpuBackend::grouped_gemm(TensorView x, TensorView w, TensorView offsets, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::grouped_gemm";
  detail::expect_device(fn, "w", w, device(), /*any_layout=*/true);
  expect_rank(fn, "w", w, 3);
  detail::expect_weight_dtype(fn, "w", w, *this);
  const std::int64_t E = w.dim(0), n = w.dim(1), k = w.dim(2);
  detail::expect_grouped_io(fn, x, E, n, k, offsets, out, device());
  const std::int32_t* off = offsets.as<std::int32_t>();
  detail::check_offsets(fn, off, E, x.dim(0));
  expect_prepared(fn, "w", w);
  if (k == 0) {  // empty sums: the experts' rows are zero (the kernels need k > 0)
    std::fill(out.as<float>(), out.as<float>() + off[E] * n, 0.0f);
    return;
  }
  const bool panels = w.layout == Layout::panel32;
  std::vector<std::int64_t> row0(static_cast<std::size_t>(E)), rows(static_cast<std::size_t>(E));
  for (std::int64_t e = 0; e < E; ++e) {
    row0[e] = off[e];
    rows[e] = off[e + 1] - off[e];
  }
  const float* X = x.as<float>();
  const void* W = w.data;
  float* O = out.as<float>();
  const std::int64_t wstride = panels ? panel_elems(n, k) : n * k;
  if (panels && w.dtype == DType::bf16 && impl_->bf16_compute) {
    bf16_products(
        *this, impl_->bf16_amx, [&](std::int64_t g, auto&& f) { impl_->parallel(g, 1, f); }, X, k,
        row0, rows, w.as<std::uint16_t>(), wstride, n, O, n, 1.0f, 0.0f);
    return;
  }
  // One task list across all experts, so a heavy expert is spread over every thread and light
  // experts do not leave threads waiting at a per-expert barrier.
  std::vector<Tile> tiles;
  for (std::int64_t e = 0; e < E; ++e)
    add_tiles(tiles, e, row0[e], rows[e], n, k, row_tile(rows[e], panels),
              row_unit(rows[e], panels));
  Tensor packed;
  std::vector<std::int64_t> start;
  if (panels)
    packed = pack_groups(
        *this, [&](std::int64_t g, auto&& f) { impl_->parallel(g, 1, f); }, X, k, row0, rows,
        start);
  impl_->parallel(static_cast<std::int64_t>(tiles.size()), 1, [&](std::int64_t i) {
    const Tile& t = tiles[static_cast<std::size_t>(i)];
    const void* We = advance(W, t.e * wstride, w.dtype);
    if (panels) {
      detail::gemm_panel_tile(packed.data<float>() + start[t.e] + (t.row0 - row0[t.e]) * k, t.rows,
                              detail::pack_block_rows(rows[t.e]),
                              advance(We, t.col0 / kPanelRows * kPanelRows * k, w.dtype), w.dtype,
                              k, (t.cols + kPanelRows - 1) / kPanelRows, t.cols,
                              O + t.row0 * n + t.col0, n, 1.0f, 0.0f);
    } else {
      detail::gemm_nt_tile(X + t.row0 * k, k, static_cast<const float*>(We) + t.col0 * k, k,
                           O + t.row0 * n + t.col0, n, t.rows, t.cols, k, 1.0f, 0.0f);
    }
  });
}

namespace {

// Scores and statistics of one token's logits row; returns logsumexp.
float score_row(const float* logits, std::int64_t E, ScoreFunc f, float* scores) {
  float mx = -std::numeric_limits<float>::infinity();
  for (std::int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[e]);
  float sum = 0.0f;
  for (std::int64_t e = 0; e < E; ++e) sum += std::exp(logits[e] - mx);
  if (f == ScoreFunc::softmax) {
    for (std::int64_t e = 0; e < E; ++e) scores[e] = std::exp(logits[e] - mx) / sum;
  } else {
    for (std::int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  }
  return mx + std::log(sum);
}

// Indices of the k largest values, descending; ties go to the lower index.
void top_k_indices(const float* v, std::int64_t n, int k, std::int32_t* idx,
                   std::vector<std::int32_t>& scratch) {
  scratch.resize(static_cast<std::size_t>(n));
  std::iota(scratch.begin(), scratch.end(), 0);
  std::partial_sort(
      scratch.begin(), scratch.begin() + k, scratch.end(),
      [&](std::int32_t a, std::int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  std::copy_n(scratch.begin(), k, idx);
}

constexpr std::int64_t kStatBlock = 64;  // tokens per partial-statistics block

}  // namespace

void CpuBackend::route_topk(TensorView logits, TensorView bias, const RouteParams& p,
                            TensorView ids, TensorView weights, TensorView stats) {
  constexpr std::string_view fn = "CpuBackend::route_topk";
  detail::expect_route_topk_io(fn, logits, bias, p, ids, weights, stats, device());
  const std::int64_t T = logits.dim(0), E = logits.dim(1);
  const float* B = bias.empty() ? nullptr : bias.as<float>();
  const float* L = logits.as<float>();
  for (std::int64_t i = 0; i < T * E; ++i)
    AUTOGLM_CHECK(std::isfinite(L[i]), numeric, fn, "router logit [{}, {}] is {}", i / E, i % E,
                  L[i]);

  const int k = p.top_k;
  const std::int64_t gsize = E / p.n_group;
  const std::int64_t nblocks = (T + kStatBlock - 1) / kStatBlock;
  std::vector<float> partial(static_cast<std::size_t>(nblocks * (E + 1)), 0.0f);
  impl_->parallel(nblocks, 1, [&](std::int64_t blk) {
    std::vector<float> row(E), scores(E), sel(E), gscore(p.n_group);
    std::vector<std::int32_t> scratch, idx(k), gidx(p.topk_group);
    float* part = partial.data() + blk * (E + 1);
    for (std::int64_t t = blk * kStatBlock; t < std::min(T, (blk + 1) * kStatBlock); ++t) {
      std::copy_n(L + t * E, E, row.data());
      if (p.noise_std > 0.0f)
        for (std::int64_t e = 0; e < E; ++e)
          row[e] += p.noise_std * detail::normal(p.seed, static_cast<std::uint64_t>(t * E + e));
      const float lse = score_row(row.data(), E, p.score, scores.data());
      part[E] += lse * lse;
      float ssum = 0.0f;
      for (std::int64_t e = 0; e < E; ++e) ssum += scores[e];
      for (std::int64_t e = 0; e < E; ++e) part[e] += scores[e] / ssum;
      for (std::int64_t e = 0; e < E; ++e) sel[e] = scores[e] + (B ? B[e] : 0.0f);
      if (p.n_group > 1) {
        for (int g = 0; g < p.n_group; ++g) {
          // Group score: sum of the group's two best selection scores (one if the group has one).
          const float* s = sel.data() + g * gsize;
          float b1 = -std::numeric_limits<float>::infinity(), b2 = b1;
          for (std::int64_t j = 0; j < gsize; ++j) {
            if (s[j] > b1) {
              b2 = b1;
              b1 = s[j];
            } else if (s[j] > b2) {
              b2 = s[j];
            }
          }
          gscore[g] = gsize >= 2 ? b1 + b2 : b1;
        }
        top_k_indices(gscore.data(), p.n_group, p.topk_group, gidx.data(), scratch);
        std::vector<char> keep(p.n_group, 0);
        for (int g : gidx) keep[g] = 1;
        const float fillv =
            p.group_mask == GroupMask::zero ? 0.0f : -std::numeric_limits<float>::infinity();
        for (int g = 0; g < p.n_group; ++g)
          if (!keep[g]) std::fill_n(sel.data() + g * gsize, gsize, fillv);
      }
      top_k_indices(sel.data(), E, k, idx.data(), scratch);
      float wsum = 0.0f;
      for (int j = 0; j < k; ++j) wsum += scores[idx[j]];
      // Divide (not multiply by the reciprocal): a single renormalised weight is then exactly 1.
      const float denom = p.renormalize ? wsum + p.renorm_epsilon : 1.0f;
      for (int j = 0; j < k; ++j) {
        ids.as<std::int32_t>()[t * k + j] = idx[j];
        weights.as<float>()[t * k + j] = scores[idx[j]] / denom * p.routed_scaling;
      }
    }
  });
  float* S = stats.as<float>();
  std::fill_n(S, E + 1, 0.0f);
  for (std::int64_t b = 0; b < nblocks; ++b)
    for (std::int64_t e = 0; e <= E; ++e) S[e] += partial[b * (E + 1) + e];
}

void CpuBackend::route_expert_choice(TensorView logits, std::int64_t capacity, TensorView ids,
                                     TensorView weights, TensorView stats) {
  constexpr std::string_view fn = "CpuBackend::route_expert_choice";
  detail::expect_expert_choice_io(fn, logits, capacity, ids, weights, stats, device());
  const std::int64_t T = logits.dim(0), E = logits.dim(1);
  const float* L = logits.as<float>();
  for (std::int64_t i = 0; i < T * E; ++i)
    AUTOGLM_CHECK(std::isfinite(L[i]), numeric, fn, "router logit [{}, {}] is {}", i / E, i % E,
                  L[i]);
  std::vector<float> probs(static_cast<std::size_t>(T * E));
  std::vector<float> lse(static_cast<std::size_t>(T));
  impl_->parallel(T, 16, [&](std::int64_t t) {
    lse[t] = score_row(L + t * E, E, ScoreFunc::softmax, probs.data() + t * E);
  });
  const std::int64_t C = std::min(capacity, T);
  // chosen[e * C + c]: c-th token expert e takes.
  std::vector<std::int32_t> chosen(static_cast<std::size_t>(E * C));
  impl_->parallel(E, 1, [&](std::int64_t e) {
    std::vector<float> col(T);
    std::vector<std::int32_t> scratch;
    for (std::int64_t t = 0; t < T; ++t) col[t] = probs[t * E + e];
    top_k_indices(col.data(), T, static_cast<int>(C), chosen.data() + e * C, scratch);
  });
  std::int32_t* I = ids.as<std::int32_t>();
  float* W = weights.as<float>();
  std::fill_n(I, T * E, -1);
  std::fill_n(W, T * E, 0.0f);
  std::vector<std::int32_t> fillc(static_cast<std::size_t>(T), 0);
  for (std::int64_t e = 0; e < E; ++e)  // expert order within a token's slots
    for (std::int64_t c = 0; c < C; ++c) {
      const std::int32_t t = chosen[e * C + c];
      const std::int32_t j = fillc[t]++;
      I[t * E + j] = static_cast<std::int32_t>(e);
      W[t * E + j] = probs[t * E + e];
    }
  float* S = stats.as<float>();
  std::fill_n(S, E + 1, 0.0f);
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t e = 0; e < E; ++e) S[e] += probs[t * E + e];
    S[E] += lse[t] * lse[t];
  }
}

void CpuBackend::plan_dispatch(TensorView ids, std::int64_t capacity, TensorView counts,
                               TensorView offsets, TensorView row_token, TensorView slot_row) {
  constexpr std::string_view fn = "CpuBackend::plan_dispatch";
  detail::expect_dispatch_io(fn, ids, counts, offsets, row_token, slot_row, device());
  const std::int64_t T = ids.dim(0), k = ids.dim(1), E = counts.numel();
  const std::int32_t* I = ids.as<std::int32_t>();
  for (std::int64_t i = 0; i < T * k; ++i)
    AUTOGLM_CHECK(I[i] >= -1 && I[i] < E, out_of_range, fn,
                  "expert id {} at token {} outside [0, {})", I[i],
                  i / std::max<std::int64_t>(k, 1), E);
  const std::int64_t cap = capacity <= 0 ? std::numeric_limits<std::int64_t>::max() : capacity;
  std::int32_t* cnt = counts.as<std::int32_t>();
  std::int32_t* off = offsets.as<std::int32_t>();
  std::int32_t* srow = slot_row.as<std::int32_t>();
  std::fill_n(cnt, E, 0);
  // Pass 1 decides who fits (slot-major so first choices win), pass 2 places rows.
  for (std::int64_t j = 0; j < k; ++j)
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int32_t e = I[t * k + j];
      if (e < 0) {
        srow[t * k + j] = -1;
      } else if (cnt[e] < cap) {
        srow[t * k + j] = cnt[e]++;  // position within the expert for now
      } else {
        srow[t * k + j] = -1;
      }
    }
  off[0] = 0;
  for (std::int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + cnt[e];
  std::int32_t* rt = row_token.as<std::int32_t>();
  for (std::int64_t i = 0; i < T * k; ++i) {
    if (srow[i] < 0) continue;
    srow[i] += off[I[i]];
    rt[srow[i]] = static_cast<std::int32_t>(i / k);
  }
}

void CpuBackend::gather_rows(TensorView x, TensorView row_token, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::gather_rows";
  expect_matrix(fn, "x", x, device());
  expect_matrix(fn, "out", out, device());
  detail::expect_device(fn, "row_token", row_token, device());
  expect_dtype(fn, "row_token", row_token, DType::i32);
  expect_dim(fn, "out", out, 1, x.dim(1));
  AUTOGLM_CHECK(row_token.numel() >= out.dim(0), shape_mismatch, fn,
                "row_token holds {} rows, out needs {}", row_token.numel(), out.dim(0));
  const std::int64_t R = out.dim(0), d = x.dim(1), T = x.dim(0);
  const std::int32_t* rt = row_token.as<std::int32_t>();
  for (std::int64_t r = 0; r < R; ++r)
    AUTOGLM_CHECK(rt[r] >= 0 && rt[r] < T, out_of_range, fn, "row {} names token {} of {}", r,
                  rt[r], T);
  impl_->parallel(R, 16, [&](std::int64_t r) {
    std::memcpy(out.as<float>() + r * d, x.as<float>() + rt[r] * d, sizeof(float) * d);
  });
}

void CpuBackend::combine(TensorView y, TensorView slot_row, TensorView weights, TensorView out,
                         bool accumulate) {
  constexpr std::string_view fn = "CpuBackend::combine";
  expect_matrix(fn, "y", y, device());
  expect_matrix(fn, "out", out, device());
  expect_matrix(fn, "weights", weights, device());
  detail::expect_device(fn, "slot_row", slot_row, device());
  expect_dtype(fn, "slot_row", slot_row, DType::i32);
  const std::int64_t T = out.dim(0), d = out.dim(1), k = weights.dim(1), R = y.dim(0);
  expect_dim(fn, "y", y, 1, d);
  expect_dim(fn, "weights", weights, 0, T);
  AUTOGLM_CHECK(slot_row.numel() == T * k, shape_mismatch, fn, "slot_row must hold {} values",
                T * k);
  const std::int32_t* sr = slot_row.as<std::int32_t>();
  for (std::int64_t i = 0; i < T * k; ++i)
    AUTOGLM_CHECK(sr[i] >= -1 && sr[i] < R, out_of_range, fn, "slot {} names row {} of {}", i,
                  sr[i], R);
  const float* W = weights.as<float>();
  const float* Y = y.as<float>();
  impl_->parallel(T, 4, [&](std::int64_t t) {
    float* o = out.as<float>() + t * d;
    if (!accumulate) std::fill_n(o, d, 0.0f);
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t r = sr[t * k + j];
      if (r < 0) continue;
      const float w = W[t * k + j];
      const float* yr = Y + static_cast<std::int64_t>(r) * d;
      for (std::int64_t c = 0; c < d; ++c) o[c] += w * yr[c];
    }
  });
}

void CpuBackend::silu_mul(TensorView in, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::silu_mul";
  expect_matrix(fn, "in", in, device());
  expect_matrix(fn, "out", out, device());
  const std::int64_t R = in.dim(0), F = out.dim(1);
  expect_dim(fn, "out", out, 0, R);
  expect_dim(fn, "in", in, 1, 2 * F);
  impl_->parallel(R, 4, [&](std::int64_t r) {
    const float* g = in.as<float>() + r * 2 * F;
    const float* u = g + F;
    float* o = out.as<float>() + r * F;
    for (std::int64_t c = 0; c < F; ++c) o[c] = g[c] / (1.0f + exp_approx(-g[c])) * u[c];
  });
}

void CpuBackend::gelu(TensorView in, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::gelu";
  detail::expect_device(fn, "in", in, device());
  detail::expect_device(fn, "out", out, device());
  expect_dtype(fn, "in", in, DType::f32);
  expect_dtype(fn, "out", out, DType::f32);
  expect_same_shape(fn, "in", in, "out", out);
  const std::int64_t n = in.numel();
  constexpr std::int64_t block = 4096;
  impl_->parallel((n + block - 1) / block, 1, [&](std::int64_t b) {
    for (std::int64_t i = b * block; i < std::min(n, (b + 1) * block); ++i) {
      const float v = in.as<float>()[i];
      out.as<float>()[i] = 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    }
  });
}

void CpuBackend::softmax(TensorView x) {
  constexpr std::string_view fn = "CpuBackend::softmax";
  detail::expect_device(fn, "x", x, device());
  expect_dtype(fn, "x", x, DType::f32);
  AUTOGLM_CHECK(x.rank() >= 1, shape_mismatch, fn, "x must have rank >= 1");
  const std::int64_t n = x.dim(x.rank() - 1);
  const std::int64_t rows = n == 0 ? 0 : x.numel() / n;
  impl_->parallel(rows, 4, [&](std::int64_t r) {
    float* v = x.as<float>() + r * n;
    const float mx = *std::max_element(v, v + n);
    float s = 0.0f;
    for (std::int64_t i = 0; i < n; ++i) s += (v[i] = std::exp(v[i] - mx));
    for (std::int64_t i = 0; i < n; ++i) v[i] /= s;
  });
}

void CpuBackend::rms_norm(TensorView x, TensorView weight, float eps, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::rms_norm";
  detail::expect_rms_norm_io(fn, x, weight, eps, out, device());
  const std::int64_t T = x.dim(0), d = x.dim(1);
  const float* w = weight.as<float>();
  impl_->parallel(T, 4, [&](std::int64_t t) {
    const float* xi = x.as<float>() + t * d;
    float* o = out.as<float>() + t * d;
    float ss = 0.0f;
    for (std::int64_t c = 0; c < d; ++c) ss += xi[c] * xi[c];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (std::int64_t c = 0; c < d; ++c) o[c] = xi[c] * inv * w[c];
  });
}

void CpuBackend::add(TensorView a, TensorView b, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::add";
  detail::expect_add_io(fn, a, b, out, device());
  const std::int64_t n = a.numel();
  constexpr std::int64_t block = 1 << 14;
  impl_->parallel((n + block - 1) / block, 1, [&](std::int64_t blk) {
    for (std::int64_t i = blk * block; i < std::min(n, (blk + 1) * block); ++i)
      out.as<float>()[i] = a.as<float>()[i] + b.as<float>()[i];
  });
}

void CpuBackend::add_scaled_rows(TensorView x, TensorView scale, RowScale f, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::add_scaled_rows";
  detail::expect_add_scaled_rows_io(fn, x, scale, out, device());
  const std::int64_t T = x.dim(0), d = x.dim(1);
  impl_->parallel(T, 4, [&](std::int64_t t) {
    float s = scale.as<float>()[t];
    if (f == RowScale::sigmoid) s = 1.0f / (1.0f + std::exp(-s));
    const float* xi = x.as<float>() + t * d;
    float* o = out.as<float>() + t * d;
    for (std::int64_t c = 0; c < d; ++c) o[c] += s * xi[c];
  });
}

void CpuBackend::embedding(TensorView table, TensorView ids, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::embedding";
  detail::expect_embedding_io(fn, table, ids, out, *this);
  const std::int64_t V = table.dim(0), d = table.dim(1), T = ids.numel();
  const std::int32_t* I = ids.as<std::int32_t>();
  detail::check_token_ids(fn, I, T, V);
  impl_->parallel(T, 16, [&](std::int64_t t) {
    float* o = out.as<float>() + t * d;
    if (table.dtype == DType::f32) {
      std::memcpy(o, table.as<float>() + I[t] * d, sizeof(float) * d);
      return;
    }
    const std::uint16_t* row = table.as<std::uint16_t>() + I[t] * d;
    for (std::int64_t i = 0; i < d; ++i) o[i] = half_to_float(row[i], table.dtype);
  });
}

}  // namespace autoglm
