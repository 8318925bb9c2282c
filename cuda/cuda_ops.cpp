// SPDX-License-Identifier: Apache-2.0
// CudaBackend's elementwise, normalisation, attention and int8 embedding primitives;
// validation mirrors CpuBackend (src/cpu/cpu_backend.cpp, cpu_attention.cpp, cpu_quant.cpp)
// with the same messages.
#include <cmath>
#include <limits>

#include "common/checks.hpp"
#include "cuda_backend_impl.hpp"
#include "kernels.hpp"

namespace autoglm {
namespace {

using detail::expect_dim;
using detail::expect_dtype;
using detail::expect_matrix;
using detail::expect_rank;
using detail::expect_same_shape;
namespace kern = cuda_kernels;

constexpr std::uint32_t kAttentionWarps = 4;

}  // namespace

void CudaBackend::silu_mul(TensorView in, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::silu_mul";
  expect_matrix(fn, "in", in, device());
  expect_matrix(fn, "out", out, device());
  const std::int64_t R = in.dim(0), F = out.dim(1);
  expect_dim(fn, "out", out, 0, R);
  expect_dim(fn, "in", in, 1, 2 * F);
  impl_->activate();
  kern::silu_mul(in.as<float>(), R, F, out.as<float>(), impl_->stream);
  Impl::launched("silu_mul");
}

void CudaBackend::gelu(TensorView in, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::gelu";
  detail::expect_device(fn, "in", in, device());
  detail::expect_device(fn, "out", out, device());
  expect_dtype(fn, "in", in, DType::f32);
  expect_dtype(fn, "out", out, DType::f32);
  expect_same_shape(fn, "in", in, "out", out);
  impl_->activate();
  kern::gelu(in.as<float>(), out.as<float>(), in.numel(), impl_->stream);
  Impl::launched("gelu");
}

void CudaBackend::softmax(TensorView x) {
  constexpr std::string_view fn = "CudaBackend::softmax";
  detail::expect_device(fn, "x", x, device());
  expect_dtype(fn, "x", x, DType::f32);
  AUTOGLM_CHECK(x.rank() >= 1, shape_mismatch, fn, "x must have rank >= 1");
  const std::int64_t n = x.dim(x.rank() - 1);
  const std::int64_t rows = n == 0 ? 0 : x.numel() / n;
  cuda_detail::checked_int(rows, fn, "rows");
  impl_->activate();
  kern::softmax_rows(x.as<float>(), rows, n, impl_->stream);
  Impl::launched("softmax");
}

void CudaBackend::rms_norm(TensorView x, TensorView weight, float eps, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::rms_norm";
  detail::expect_rms_norm_io(fn, x, weight, eps, out, device());
  const std::int64_t T = x.dim(0), d = x.dim(1);
  cuda_detail::checked_int(T, fn, "rows");
  impl_->activate();
  kern::rms_norm(x.as<float>(), weight.as<float>(), T, d, eps, out.as<float>(), impl_->stream);
  Impl::launched("rms_norm");
}

void CudaBackend::add(TensorView a, TensorView b, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::add";
  detail::expect_add_io(fn, a, b, out, device());
  impl_->activate();
  kern::add(a.as<float>(), b.as<float>(), out.as<float>(), a.numel(), impl_->stream);
  Impl::launched("add");
}

void CudaBackend::add_scaled_rows(TensorView x, TensorView scale, RowScale f, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::add_scaled_rows";
  detail::expect_add_scaled_rows_io(fn, x, scale, out, device());
  const std::int64_t T = x.dim(0), d = x.dim(1);
  impl_->activate();
  kern::add_scaled_rows(x.as<float>(), scale.as<float>(), f == RowScale::sigmoid, T, d,
                        out.as<float>(), impl_->stream);
  Impl::launched("add_scaled_rows");
}

namespace {

// The device ids [T] each in [0, V), else the CPU's Error naming the first outside. (Impl is
// deduced: a free function may not name the private CudaBackend::Impl.)
template <typename Impl>
void check_token_ids(Impl& m, std::string_view fn, const TensorView& ids, std::int64_t T,
                     std::int64_t V) {
  const std::uint64_t bad = m.first_out_of_range(ids, T, 0, V - 1);
  if (bad != cuda_detail::kNoFailure)
    detail::fail(ErrorCode::out_of_range, fn,
                 "token id {} at position {} outside vocabulary [0, {})",
                 m.template element<std::int32_t>(ids.data, bad), bad, V);
}

}  // namespace

void CudaBackend::embedding(TensorView table, TensorView ids, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::embedding";
  detail::expect_embedding_io(fn, table, ids, out, *this);
  const std::int64_t V = table.dim(0), d = table.dim(1), T = ids.numel();
  Impl& m = *impl_;
  m.activate();
  check_token_ids(m, fn, ids, T, V);
  kern::embedding(table.as<float>(), V, ids.as<std::int32_t>(), T, d, out.as<float>(), m.stream);
  Impl::launched("embedding");
}

void CudaBackend::qembedding(const QuantizedTensor& table, TensorView ids, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::qembedding";
  detail::expect_qembedding_io(fn, table, ids, out, this, device());
  const std::int64_t V = table.dim(0), d = table.dim(1), T = ids.numel();
  Impl& m = *impl_;
  m.activate();
  check_token_ids(m, fn, ids, T, V);
  if (T == 0 || d == 0) return;  // (and table.groups() is undefined for d = 0 per channel)
  const kern::QMatrix q{table.data().data<std::int8_t>(),
                        table.scales().data<float>(),
                        V,
                        d,
                        table.group(),
                        table.groups()};
  kern::qembedding(q, ids.as<std::int32_t>(), T, out.as<float>(), m.stream);
  Impl::launched("qembedding");
}

void CudaBackend::add_bias(TensorView x, TensorView bias, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::add_bias";
  expect_matrix(fn, "x", x, device());
  expect_matrix(fn, "out", out, device());
  expect_same_shape(fn, "x", x, "out", out);
  detail::expect_device(fn, "bias", bias, device());
  expect_dtype(fn, "bias", bias, DType::f32);
  const std::int64_t R = x.dim(0), N = x.dim(1);
  AUTOGLM_CHECK(bias.numel() == N, shape_mismatch, fn, "bias must hold {} values, got shape {}", N,
                bias.shape.str());
  impl_->activate();
  kern::add_bias(x.as<float>(), bias.as<float>(), R, N, out.as<float>(), impl_->stream);
  Impl::launched("add_bias");
}

void CudaBackend::clamp(TensorView x, float lo, float hi) {
  constexpr std::string_view fn = "CudaBackend::clamp";
  detail::expect_device(fn, "x", x, device());
  expect_dtype(fn, "x", x, DType::f32);
  AUTOGLM_CHECK(lo <= hi, invalid_argument, fn, "lo={} must be <= hi={}", lo, hi);
  impl_->activate();
  kern::clamp(x.as<float>(), x.numel(), lo, hi, impl_->stream);
  Impl::launched("clamp");
}

void CudaBackend::copy_columns(TensorView src, std::int64_t src_col, TensorView dst,
                               std::int64_t dst_col, std::int64_t width) {
  constexpr std::string_view fn = "CudaBackend::copy_columns";
  detail::expect_device(fn, "src", src, device());
  detail::expect_device(fn, "dst", dst, device());
  expect_rank(fn, "src", src, 2);
  expect_rank(fn, "dst", dst, 2);
  AUTOGLM_CHECK(src.dtype == dst.dtype, dtype_mismatch, fn, "src is {} but dst is {}",
                dtype_name(src.dtype), dtype_name(dst.dtype));
  const std::int64_t R = src.dim(0), Cs = src.dim(1), Rd = dst.dim(0), Cd = dst.dim(1);
  AUTOGLM_CHECK(
      width >= 0 && src_col >= 0 && dst_col >= 0 && src_col + width <= Cs && dst_col + width <= Cd,
      out_of_range, fn, "columns [{}, {}) of src {} or [{}, {}) of dst {} are outside the matrix",
      src_col, src_col + width, src.shape.str(), dst_col, dst_col + width, dst.shape.str());
  AUTOGLM_CHECK((R == 0 && Rd == 0) || (R > 0 && Rd % R == 0 && Rd >= R), shape_mismatch, fn,
                "dst rows {} must be a positive multiple of src rows {}", Rd, R);
  if (Rd == 0 || width == 0) return;
  Impl& m = *impl_;
  m.activate();
  // The CPU moves with memmove; a kernel has no order between elements, so overlapping
  // buffers go through a copy of src.
  const auto* s0 = static_cast<const char*>(src.data);
  const auto* d0 = static_cast<const char*>(dst.data);
  Tensor staged;
  const void* from = src.data;
  if (s0 < d0 + dst.nbytes() && d0 < s0 + src.nbytes()) {
    staged = Tensor(*this, src.dtype, src.shape);
    AUTOGLM_CUDA(cudaMemcpyAsync, staged.view().data, src.data, src.nbytes(),
                 cudaMemcpyDeviceToDevice, m.stream);
    from = staged.view().data;
  }
  kern::copy_columns(from, Cs, src_col, dst.data, Rd, Cd, dst_col, width, Rd / R,
                     static_cast<int>(dtype_size(src.dtype)), m.stream);
  Impl::launched("copy_columns");
}

void CudaBackend::rope(TensorView x, TensorView positions, TensorView inv_freq,
                       const RopeParams& p) {
  constexpr std::string_view fn = "CudaBackend::rope";
  const std::int64_t r = detail::expect_rope_io(fn, x, positions, inv_freq, p, device());
  const std::int64_t T = x.dim(0), H = x.dim(1), D = x.dim(2);
  AUTOGLM_CHECK(static_cast<std::size_t>(r) * sizeof(float) <= cuda_detail::kDefaultSharedBytes,
                unsupported, fn, "rotary_dim={} exceeds the rope kernel's shared memory", r);
  cuda_detail::checked_int(T * H, fn, "tokens x heads");
  Impl& m = *impl_;
  m.activate();
  const std::uint64_t bad =
      m.first_out_of_range(positions, T, 0, std::numeric_limits<std::int32_t>::max());
  if (bad != cuda_detail::kNoFailure)
    detail::fail(ErrorCode::out_of_range, fn, "position {} of token {} is negative",
                 m.element<std::int32_t>(positions.data, bad), bad);
  kern::rope(x.as<float>(), positions.as<std::int32_t>(), inv_freq.as<float>(), T, H, D, p.offset,
             r, p.interleaved, p.attention_factor, m.stream);
  Impl::launched("rope");
}

void CudaBackend::attention(TensorView q, TensorView k, TensorView v, TensorView positions,
                            const AttentionParams& p, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::attention";
  detail::expect_attention_io(fn, q, k, v, positions, p, out, device());
  const std::int64_t T = q.dim(0), Hq = q.dim(1), D = q.dim(2);
  const std::int64_t S = k.dim(0), Hkv = k.dim(1), Dv = v.dim(2);
  AUTOGLM_CHECK(Dv <= cuda_detail::kMaxAttentionValueDim, unsupported, fn,
                "value head dim {} exceeds the attention kernel's {}", Dv,
                cuda_detail::kMaxAttentionValueDim);
  const std::size_t shared = cuda_detail::attention_shared_bytes(D, Dv, kAttentionWarps);
  AUTOGLM_CHECK(shared <= cuda_detail::kDefaultSharedBytes, unsupported, fn,
                "head dims {} / {} exceed the attention kernel's shared memory", D, Dv);
  cuda_detail::checked_int(T * Hq, fn, "queries x heads");
  Impl& m = *impl_;
  m.activate();
  const std::uint64_t bad =
      m.first_out_of_range(positions, T, 0, std::numeric_limits<std::int32_t>::max());
  if (bad != cuda_detail::kNoFailure)
    detail::fail(ErrorCode::out_of_range, fn, "position {} of query {} is negative",
                 m.element<std::int32_t>(positions.data, bad), bad);
  kern::attention(q.as<float>(), k.as<float>(), v.as<float>(), positions.as<std::int32_t>(), T, Hq,
                  S, Hkv, D, Dv, p.scale, p.causal, p.window, out.as<float>(), kAttentionWarps,
                  shared, m.stream);
  Impl::launched("attention");
}

}  // namespace autoglm
