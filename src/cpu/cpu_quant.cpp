// SPDX-License-Identifier: Apache-2.0
// CpuBackend's int8 primitives: packing quantized weights for the kernels of qgemm_kernels.hpp
// and the (grouped) int8 GEMMs that run them over oneTBB.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/checks.hpp"
#include "cpu/cpu_backend_impl.hpp"
#include "cpu/qgemm_kernels.hpp"

namespace autoglm {

namespace {

namespace q8 = detail::q8;

using detail::expect_dim;
using detail::expect_dtype;
using detail::expect_matrix;
using detail::expect_rank;

// Geometry of a packed stack of `mats` matrices [n, k].
struct Packed {
  std::int64_t mats, n, k, groups, group, pn, bytes;
  explicit Packed(const QuantizedTensor& w)
      : mats(w.shape().rank() == 3 ? w.dim(0) : 1),
        n(w.dim(w.shape().rank() - 2)),
        k(w.dim(w.shape().rank() - 1)),
        groups(w.groups()),
        group(w.group()),
        pn(q8::padded_rows(n)),
        bytes(q8::packed_bytes(n, k)) {}
  /// Rejects a packed tensor whose buffers do not hold this geometry (QuantizedTensor::packed
  /// takes them as given), before a kernel reads past them.
  void check(std::string_view fn, const QuantizedTensor& w) const {
    const auto f32 = static_cast<std::size_t>(mats * pn * groups);
    AUTOGLM_CHECK(w.data().dtype() == DType::i8 &&
                      w.data().nbytes() == static_cast<std::size_t>(mats * bytes) &&
                      w.scales().dtype() == DType::f32 &&
                      w.scales().numel() == mats * pn * groups && w.aux().dtype() == DType::i32 &&
                      w.aux().nbytes() == f32 * 4,
                  invalid_argument, fn,
                  "packed int8 tensor {} does not hold the CPU layout ({} data bytes, {} scales "
                  "and sums expected)",
                  w.shape().str(), mats * bytes, f32);
  }
  q8::QWeights matrix(const QuantizedTensor& w, std::int64_t e) const {
    return q8::QWeights{w.data().data<std::int8_t>() + e * bytes,
                        w.scales().data<float>() + e * pn * groups,
                        w.aux().data<std::int32_t>() + e * pn * groups,
                        n,
                        k,
                        group};
  }
};

// One tile of an int8 product: rows [row0, row0 + rows) of matrix e, columns [col0, col0 + cols).
struct QTile {
  std::int64_t e, row0, rows, col0, cols;
};

// Tile shapes depend on the problem only, never on the thread count (bit-identical results).
void add_qtiles(std::vector<QTile>& tiles, std::int64_t e, std::int64_t row0, std::int64_t m,
                std::int64_t n) {
  if (m == 0 || n == 0) return;
  const std::int64_t mb = std::min<std::int64_t>(m, 192);
  // Few rows stream the weights once: narrow tiles spread that stream over every thread.
  const std::int64_t nb = m <= 8 ? 64 : 128;
  for (std::int64_t i0 = 0; i0 < m; i0 += mb)
    for (std::int64_t j0 = 0; j0 < n; j0 += nb)
      tiles.push_back({e, row0 + i0, std::min(mb, m - i0), j0, std::min(nb, n - j0)});
}

}  // namespace

QuantizedTensor CpuBackend::pack_quantized(const QuantizedTensor& w) {
  constexpr std::string_view fn = "CpuBackend::pack_quantized";
  if (w.is_packed()) return w;
  detail::expect_device(fn, "w", w.data(), device());
  const Packed g(w);
  Tensor data(*this, DType::i8, Shape{g.mats, g.bytes});
  Tensor scales(*this, DType::f32, Shape{g.mats, g.pn, g.groups});
  Tensor sums(*this, DType::i32, Shape{g.mats, g.pn, g.groups});
  const std::int8_t* src = w.data().data<std::int8_t>();
  const float* ssrc = w.scales().data<float>();
  impl_->parallel(g.mats, 1, [&](std::int64_t e) {
    const std::int8_t* we = src + e * g.n * g.k;
    q8::pack(we, g.n, g.k, data.data<std::int8_t>() + e * g.bytes);
    float* sc = scales.data<float>() + e * g.pn * g.groups;
    std::fill(sc, sc + g.pn * g.groups, 0.0f);
    std::copy(ssrc + e * g.n * g.groups, ssrc + (e + 1) * g.n * g.groups, sc);
    if (g.groups > 0)
      q8::group_sums(we, g.n, g.k, g.group, sums.data<std::int32_t>() + e * g.pn * g.groups);
  });
  return QuantizedTensor::packed(w.shape(), w.spec(), std::move(data), std::move(scales),
                                 std::move(sums), w.col_scales());
}

void CpuBackend::quantized_to_host(const QuantizedTensor& w, std::int8_t* data, float* scales) {
  if (!w.is_packed()) {
    Backend::quantized_to_host(w, data, scales);
    return;
  }
  const Packed g(w);
  impl_->parallel(g.mats, 1, [&](std::int64_t e) {
    q8::unpack(w.data().data<std::int8_t>() + e * g.bytes, g.n, g.k, data + e * g.n * g.k);
    const float* sc = w.scales().data<float>() + e * g.pn * g.groups;
    std::copy(sc, sc + g.n * g.groups, scales + e * g.n * g.groups);
  });
}

namespace {

// Runs the tiles of an int8 product of x (rows grouped as the tiles say) with the packed w.
template <typename Parallel>
void run_qtiles(Backend& backend, Parallel&& parallel, const float* x, std::int64_t rows,
                const QuantizedTensor& w, const Packed& g, const std::vector<QTile>& tiles,
                float* out) {
  const q8::Isa isa = q8::best_isa();
  const std::int64_t k = g.k, n = g.n;
  if (w.spec().mode == ActivationMode::w8a8) {
    const std::int64_t ldq = (q8::padded_depth(k) + 63) / 64 * 64;
    Tensor xq(backend, DType::i8, Shape{rows, ldq});
    const std::int64_t ng = g.groups;
    Tensor xs(backend, DType::f32, Shape{rows, ng});
    auto* q = reinterpret_cast<std::uint8_t*>(xq.data<std::int8_t>());
    constexpr std::int64_t kRowsPerTask = 16;
    parallel((rows + kRowsPerTask - 1) / kRowsPerTask, [&](std::int64_t b) {
      const std::int64_t r0 = b * kRowsPerTask, m = std::min(kRowsPerTask, rows - r0);
      q8::quantize_activations(isa, x + r0 * k, k, m, k, g.group, q + r0 * ldq, ldq,
                               xs.data<float>() + r0 * ng);
    });
    parallel(static_cast<std::int64_t>(tiles.size()), [&](std::int64_t i) {
      const QTile& t = tiles[static_cast<std::size_t>(i)];
      q8::gemm_w8a8(isa, q + t.row0 * ldq, ldq, xs.data<float>() + t.row0 * ng, t.rows,
                    g.matrix(w, t.e), t.col0, t.cols, out + t.row0 * n + t.col0, n);
    });
  } else {
    parallel(static_cast<std::int64_t>(tiles.size()), [&](std::int64_t i) {
      const QTile& t = tiles[static_cast<std::size_t>(i)];
      q8::gemm_wonly(isa, x + t.row0 * k, k, t.rows, g.matrix(w, t.e), t.col0, t.cols,
                     out + t.row0 * n + t.col0, n);
    });
  }
}

// The activations of an equalised product: row r of x [rows, k] times the column scales of the
// matrix its tile reads (w's col_scales [mats, k]). Null when w has none.
template <typename Parallel>
Tensor scale_columns(Backend& backend, Parallel&& parallel, const float* x, std::int64_t rows,
                     std::int64_t k, const QuantizedTensor& w, const std::vector<QTile>& tiles) {
  if (!w.has_col_scales()) return Tensor();
  Tensor xs(backend, DType::f32, Shape{rows, k});
  const float* cs = w.col_scales().data<float>();
  float* out = xs.data<float>();
  // Tiles of one matrix cover its rows once per column block: take the first block's.
  parallel(static_cast<std::int64_t>(tiles.size()), [&](std::int64_t i) {
    const QTile& t = tiles[static_cast<std::size_t>(i)];
    if (t.col0 != 0) return;
    const float* s = cs + t.e * k;
    for (std::int64_t r = t.row0; r < t.row0 + t.rows; ++r)
      for (std::int64_t c = 0; c < k; ++c) out[r * k + c] = x[r * k + c] * s[c];
  });
  return xs;
}

}  // namespace

void CpuBackend::qgemm(TensorView a, const QuantizedTensor& w, TensorView c) {
  constexpr std::string_view fn = "CpuBackend::qgemm";
  detail::expect_qgemm_io(fn, a, w, c, this, device());
  const std::int64_t m = a.dim(0), n = w.dim(0);
  if (m == 0 || n == 0) return;
  const QuantizedTensor packed = pack_quantized(w);
  const Packed g(packed);
  g.check(fn, packed);
  if (g.k == 0) {
    fill(c, 0.0f);
    return;
  }
  std::vector<QTile> tiles;
  add_qtiles(tiles, 0, 0, m, n);
  auto parallel = [&](std::int64_t cnt, auto&& f) { impl_->parallel(cnt, 1, f); };
  const Tensor xs = scale_columns(*this, parallel, a.as<float>(), m, g.k, packed, tiles);
  run_qtiles(*this, parallel, xs.defined() ? xs.data<float>() : a.as<float>(), m, packed, g, tiles,
             c.as<float>());
}

void CpuBackend::grouped_qgemm(TensorView x, const QuantizedTensor& w, TensorView offsets,
                               TensorView out) {
  constexpr std::string_view fn = "CpuBackend::grouped_qgemm";
  detail::expect_grouped_qgemm_io(fn, x, w, offsets, out, this, device());
  const std::int64_t E = w.dim(0), n = w.dim(1), k = w.dim(2);
  const std::int32_t* off = offsets.as<std::int32_t>();
  detail::check_offsets(fn, off, E, x.dim(0));
  const std::int64_t rows = off[E];
  if (rows == 0 || n == 0) return;
  const QuantizedTensor packed = pack_quantized(w);
  const Packed g(packed);
  g.check(fn, packed);
  if (k == 0) {
    fill(out.slice(0, rows), 0.0f);
    return;
  }
  // One task list across all experts, as grouped_gemm does.
  std::vector<QTile> tiles;
  for (std::int64_t e = 0; e < E; ++e) add_qtiles(tiles, e, off[e], off[e + 1] - off[e], n);
  auto parallel = [&](std::int64_t cnt, auto&& f) { impl_->parallel(cnt, 1, f); };
  const Tensor xs = scale_columns(*this, parallel, x.as<float>(), rows, k, packed, tiles);
  run_qtiles(*this, parallel, xs.defined() ? xs.data<float>() : x.as<float>(), rows, packed, g,
             tiles, out.as<float>());
}

}  // namespace autoglm

namespace autoglm {

void CpuBackend::qembedding(const QuantizedTensor& table, TensorView ids, TensorView out) {
  constexpr std::string_view fn = "CpuBackend::qembedding";
  detail::expect_qembedding_io(fn, table, ids, out, this, device());
  const std::int64_t V = table.dim(0), d = table.dim(1), T = ids.numel();
  const std::int32_t* I = ids.as<std::int32_t>();
  detail::check_token_ids(fn, I, T, V);
  const std::int64_t group = table.group(), groups = table.groups();
  const std::int8_t* q = table.data().data<std::int8_t>();
  const float* s = table.scales().data<float>();
  impl_->parallel(T, 16, [&](std::int64_t t) {
    const std::int8_t* row = q + I[t] * d;
    const float* rs = s + I[t] * groups;
    float* o = out.as<float>() + t * d;
    for (std::int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(row[c]) * rs[c / group];
  });
}

}  // namespace autoglm
