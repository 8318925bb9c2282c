// SPDX-License-Identifier: Apache-2.0
// CudaBackend: construction, memory, conversions, GEMMs (cuBLAS; int8 in kernels_ops.cu),
// routing and dispatch.
// Argument validation mirrors CpuBackend call for call (common/checks.hpp and the same
// messages), so both backends reject the same input with the same Error.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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

// Pool granularity: small buffers in 512-byte steps, large ones in 2 MiB steps, so that
// activations of slightly different sizes share cached blocks.
std::size_t rounded_size(std::size_t bytes) {
  constexpr std::size_t kSmall = 512, kLarge = std::size_t{2} << 20;
  const std::size_t step = bytes < kLarge ? kSmall : kLarge;
  return (std::max<std::size_t>(bytes, 1) + step - 1) / step * step;
}

bool is_float(DType t) {
  return t == DType::f32 || t == DType::f16 || t == DType::bf16;
}

// Every layout other than row_major is refused with the same words.
void expect_row_major(std::string_view fn, std::string_view arg, const TensorView& t) {
  AUTOGLM_CHECK(t.layout == Layout::row_major, unsupported, fn,
                "{} is not row-major; the CUDA backend keeps weights row-major", arg);
}

}  // namespace

// ---------------------------------------------------------------------------- pool

void* CudaBackend::Impl::take(std::size_t bytes) {
  const std::size_t size = rounded_size(bytes);
  {
    std::lock_guard lock(pool_mutex);
    auto it = free_blocks.lower_bound(size);
    if (it != free_blocks.end() && it->first <= 2 * size) {
      void* p = it->second;
      live[p] = it->first;
      cached -= it->first;
      free_blocks.erase(it);
      return p;
    }
  }
  void* p = nullptr;
  cudaError_t st = cudaMalloc(&p, size);
  if (st == cudaErrorMemoryAllocation) {  // cached blocks may make room
    (void)cudaGetLastError();
    release_cache();
    st = cudaMalloc(&p, size);
  }
  if (st == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    detail::fail(ErrorCode::device, "CudaBackend::allocate",
                 "out of memory for {} bytes on cuda:{}", bytes, device);
  }
  cuda_detail::check(st, "cudaMalloc");
  std::lock_guard lock(pool_mutex);
  live[p] = size;
  return p;
}

void CudaBackend::Impl::give(void* p) noexcept {
  if (!p) return;
  std::size_t size = 0;
  {
    std::lock_guard lock(pool_mutex);
    auto it = live.find(p);
    if (it == live.end()) return;  // not ours
    size = it->second;
    live.erase(it);
    if (cached + size <= cache_limit) {
      free_blocks.emplace(size, p);
      cached += size;
      return;
    }
  }
  // cudaFree must not pull memory from under kernels still queued on the stream; the block
  // belongs to this backend's device, whichever device the calling thread has current.
  (void)cudaSetDevice(device);
  (void)cudaStreamSynchronize(stream);
  (void)cudaFree(p);
}

void CudaBackend::Impl::release_cache() noexcept {
  std::lock_guard lock(pool_mutex);
  if (free_blocks.empty()) return;
  (void)cudaStreamSynchronize(stream);
  for (auto& [size, p] : free_blocks) (void)cudaFree(p);
  free_blocks.clear();
  cached = 0;
}

// ---------------------------------------------------------------------------- lifetime

int CudaBackend::device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

CudaBackend::CudaBackend(CudaBackendOptions options) : impl_(std::make_unique<Impl>()) {
  int n = 0;
  AUTOGLM_CUDA(cudaGetDeviceCount, &n);
  AUTOGLM_CHECK(options.device >= 0 && options.device < n, device, "CudaBackend",
                "device={} outside the {} CUDA devices present", options.device, n);
  Impl& m = *impl_;
  m.device = options.device;
  m.check_values = options.check_values;
  m.cache_limit = options.cache_bytes;
  AUTOGLM_CUDA(cudaSetDevice, m.device);
  AUTOGLM_CUDA(cudaStreamCreateWithFlags, &m.stream, cudaStreamNonBlocking);
  try {
    AUTOGLM_CUDA(cublasCreate, &m.blas);
    AUTOGLM_CUDA(cublasSetStream, m.blas, m.stream);
    AUTOGLM_CUDA(cublasSetMathMode, m.blas,
                 options.allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
    AUTOGLM_CUDA(cudaMalloc, reinterpret_cast<void**>(&m.flag), sizeof(unsigned long long));
  } catch (...) {
    if (m.blas) (void)cublasDestroy(m.blas);
    (void)cudaStreamDestroy(m.stream);
    throw;
  }
}

CudaBackend::~CudaBackend() {
  Impl& m = *impl_;
  (void)cudaSetDevice(m.device);
  (void)cudaStreamSynchronize(m.stream);
  m.release_cache();
  for (auto& [p, size] : m.live) (void)cudaFree(p);  // tensors that outlived the backend
  (void)cudaFree(m.flag);
  (void)cublasDestroy(m.blas);
  (void)cudaStreamDestroy(m.stream);
}

Device CudaBackend::device() const noexcept {
  return Device{DeviceKind::cuda, impl_->device};
}

void* CudaBackend::allocate(std::size_t bytes) {
  impl_->activate();
  return impl_->take(bytes);
}

void CudaBackend::deallocate(void* ptr) noexcept {
  impl_->give(ptr);
}

void CudaBackend::synchronize() {
  impl_->activate();
  impl_->sync();
}

// ---------------------------------------------------------------------------- copies

void CudaBackend::copy_from_host(TensorView dst, const void* src) {
  constexpr std::string_view fn = "CudaBackend::copy_from_host";
  detail::expect_device(fn, "dst", dst, device(), true);
  expect_row_major(fn, "dst", dst);
  if (dst.nbytes() == 0) return;
  Impl& m = *impl_;
  m.activate();
  AUTOGLM_CUDA(cudaMemcpyAsync, dst.data, src, dst.nbytes(), cudaMemcpyHostToDevice, m.stream);
  m.sync();  // the caller may free or reuse src once this returns
}

void CudaBackend::copy_to_host(void* dst, TensorView src) {
  constexpr std::string_view fn = "CudaBackend::copy_to_host";
  detail::expect_device(fn, "src", src, device(), true);
  expect_row_major(fn, "src", src);
  if (src.nbytes() == 0) return;
  Impl& m = *impl_;
  m.activate();
  AUTOGLM_CUDA(cudaMemcpyAsync, dst, src.data, src.nbytes(), cudaMemcpyDeviceToHost, m.stream);
  m.sync();
}

void CudaBackend::relayout(TensorView src, TensorView dst) {
  constexpr std::string_view fn = "CudaBackend::relayout";
  detail::expect_device(fn, "src", src, device(), true);
  detail::expect_device(fn, "dst", dst, device(), true);
  expect_dtype(fn, "src", src, DType::f32);
  expect_dtype(fn, "dst", dst, DType::f32);
  expect_same_shape(fn, "src", src, "dst", dst);
  AUTOGLM_CHECK(src.rank() >= 2, shape_mismatch, fn, "weights need rank >= 2, got {}",
                src.shape.str());
  AUTOGLM_CHECK(src.layout == Layout::row_major && dst.layout == Layout::row_major, unsupported, fn,
                "backend cuda has no other layouts than row_major");
  if (src.data == dst.data || src.nbytes() == 0) return;
  Impl& m = *impl_;
  m.activate();
  AUTOGLM_CUDA(cudaMemcpyAsync, dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice,
               m.stream);
}

void CudaBackend::convert(TensorView src, TensorView dst) {
  constexpr std::string_view fn = "CudaBackend::convert";
  detail::expect_device(fn, "src", src, device());
  detail::expect_device(fn, "dst", dst, device());
  AUTOGLM_CHECK(src.numel() == dst.numel(), shape_mismatch, fn, "src {} and dst {} sizes differ",
                src.shape.str(), dst.shape.str());
  Impl& m = *impl_;
  if (src.dtype == dst.dtype) {
    if (src.data != dst.data && src.nbytes() > 0) {
      m.activate();
      AUTOGLM_CUDA(cudaMemcpyAsync, dst.data, src.data, src.nbytes(), cudaMemcpyDeviceToDevice,
                   m.stream);
    }
    return;
  }
  AUTOGLM_CHECK(is_float(src.dtype) && is_float(dst.dtype), dtype_mismatch, fn,
                "cannot convert {} to {}", dtype_name(src.dtype), dtype_name(dst.dtype));
  m.activate();
  kern::convert(src.data, static_cast<int>(src.dtype), dst.data, static_cast<int>(dst.dtype),
                src.numel(), m.stream);
  Impl::launched("convert");
}

void CudaBackend::fill(TensorView dst, float value) {
  detail::expect_device("CudaBackend::fill", "dst", dst, device());
  expect_dtype("CudaBackend::fill", "dst", dst, DType::f32);
  impl_->activate();
  kern::fill(dst.as<float>(), dst.numel(), value, impl_->stream);
  Impl::launched("fill");
}

void CudaBackend::fill_uniform(TensorView dst, std::uint64_t seed, float scale) {
  constexpr std::string_view fn = "CudaBackend::fill_uniform";
  detail::expect_device(fn, "dst", dst, device(), /*any_layout=*/true);
  expect_dtype(fn, "dst", dst, DType::f32);
  expect_row_major(fn, "dst", dst);
  impl_->activate();
  kern::fill_uniform(dst.as<float>(), dst.numel(), seed, scale, impl_->stream);
  Impl::launched("fill_uniform");
}

// ---------------------------------------------------------------------------- GEMM

void CudaBackend::gemm(TensorView a, TensorView b, TensorView c, GemmParams p) {
  constexpr std::string_view fn = "CudaBackend::gemm";
  expect_matrix(fn, "a", a, device());
  expect_matrix(fn, "b", b, device(), DType::f32, /*any_layout=*/true);
  expect_matrix(fn, "c", c, device());
  expect_dim(fn, "b", b, 1, a.dim(1));
  expect_dim(fn, "c", c, 0, a.dim(0));
  expect_dim(fn, "c", c, 1, b.dim(0));
  expect_row_major(fn, "b", b);
  const std::int64_t M = a.dim(0), N = b.dim(0), K = a.dim(1);
  if (M == 0 || N == 0) return;
  Impl& m = *impl_;
  m.activate();
  if (K == 0) {  // cuBLAS needs k >= 1; the product is empty: C = beta C
    kern::scale(c.as<float>(), M * N, p.beta, m.stream);
    Impl::launched("scale");
    return;
  }
  // Row-major C[M, N] = A[M, K] B[N, K]^T is column-major C^T[N, M] = B^T... : cuBLAS sees
  // B as a K x N column-major matrix (op T gives N x K) and A as K x M (op N).
  const int n = cuda_detail::checked_int(N, fn, "N"), mm = cuda_detail::checked_int(M, fn, "M"),
            kk = cuda_detail::checked_int(K, fn, "K");
  AUTOGLM_CUDA(cublasSgemm, m.blas, CUBLAS_OP_T, CUBLAS_OP_N, n, mm, kk, &p.alpha, b.as<float>(),
               kk, a.as<float>(), kk, &p.beta, c.as<float>(), n);
}

namespace {

// The active experts of a grouped product from the device offsets [E + 1], validated against
// the x_rows rows of x; `rows` (if given) gets offsets[E]. The plan needs the row ranges on the
// host: one small synchronous read.
template <typename Impl>
std::vector<cuda_detail::ExpertRows> plan_experts(Impl& m, const TensorView& offsets,
                                                  std::int64_t E, std::int64_t x_rows,
                                                  std::string_view fn,
                                                  std::int64_t* rows = nullptr) {
  std::vector<std::int32_t> off(static_cast<std::size_t>(E + 1));
  AUTOGLM_CUDA(cudaMemcpyAsync, off.data(), offsets.data, off.size() * sizeof(std::int32_t),
               cudaMemcpyDeviceToHost, m.stream);
  m.sync();
  auto active = cuda_detail::plan_grouped_gemm(off.data(), E, x_rows, fn);
  if (rows) *rows = off[static_cast<std::size_t>(E)];
  return active;
}

}  // namespace

void CudaBackend::grouped_gemm(TensorView x, TensorView w, TensorView offsets, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::grouped_gemm";
  detail::expect_device(fn, "w", w, device(), /*any_layout=*/true);
  expect_rank(fn, "w", w, 3);
  expect_dtype(fn, "w", w, DType::f32);
  const std::int64_t E = w.dim(0), N = w.dim(1), K = w.dim(2);
  detail::expect_grouped_io(fn, x, E, N, K, offsets, out, device());
  expect_row_major(fn, "w", w);
  Impl& m = *impl_;
  m.activate();
  const auto active = plan_experts(m, offsets, E, x.dim(0), fn);
  if (N == 0 || active.empty()) return;
  const int n = cuda_detail::checked_int(N, fn, "N"), kk = cuda_detail::checked_int(K, fn, "K");
  const float one = 1.0f, zero = 0.0f;
  for (const cuda_detail::ExpertRows& er : active) {
    float* o = out.as<float>() + er.row0 * N;
    if (K == 0) {
      kern::scale(o, er.rows * N, 0.0f, m.stream);
      Impl::launched("scale");
      continue;
    }
    // One GEMM per active expert: out rows = x rows * W_e^T (see gemm for the transposition).
    AUTOGLM_CUDA(cublasSgemm, m.blas, CUBLAS_OP_T, CUBLAS_OP_N, n,
                 cuda_detail::checked_int(er.rows, fn, "rows"), kk, &one,
                 w.as<float>() + er.expert * N * K, kk, x.as<float>() + er.row0 * K, kk, &zero, o,
                 n);
  }
}

// ---------------------------------------------------------------------------- INT8 GEMM

namespace {

// The CUDA backend never packs (pack_quantized is the Backend default), so a packed tensor
// comes from another backend's layout and cannot be read here.
void expect_row_major_int8(std::string_view fn, std::string_view arg, const QuantizedTensor& w) {
  AUTOGLM_CHECK(!w.is_packed(), unsupported, fn,
                "{} is packed; the CUDA backend reads row-major int8 only", arg);
}

// Matrix e of w (a matrix, or expert e of a stack) in plain types; k > 0.
kern::QMatrix qmatrix(const QuantizedTensor& w, std::int64_t e) {
  const int r = w.shape().rank();
  const std::int64_t n = w.dim(r - 2), k = w.dim(r - 1), groups = w.groups();
  return kern::QMatrix{w.data().data<std::int8_t>() + e * n * k,
                       w.scales().data<float>() + e * n * groups,
                       n,
                       k,
                       w.group(),
                       groups};
}

// One int8 product of `rows` rows ready to launch: the matrix, where its rows of x (or of
// the quantised activations) and out start, and the kernel plan.
struct QProduct {
  kern::QMatrix w;
  std::int64_t row0, rows;
  cuda_detail::QGemmPlan plan;
  const float* col_scale;  ///< the matrix's column scales [k], or null
};

QProduct plan_product(std::string_view fn, const QuantizedTensor& w, std::int64_t e,
                      std::int64_t row0, std::int64_t rows, const float* x) {
  const kern::QMatrix q = qmatrix(w, e);
  const bool w8a8 = w.spec().mode == ActivationMode::w8a8;
  // W8A8 reads its own quantised activations (always aligned), weight-only the f32 rows.
  const auto xa = w8a8 ? std::uintptr_t{0} : reinterpret_cast<std::uintptr_t>(x + row0 * q.k);
  const bool vec = cuda_detail::qgemm_vec16(q.k, reinterpret_cast<std::uintptr_t>(q.data), xa);
  const float* cs = w.has_col_scales() ? w.col_scales().data<float>() + e * q.k : nullptr;
  return {q, row0, rows, cuda_detail::plan_qgemm(rows, q.n, q.k, q.group, w8a8, vec, fn), cs};
}

// Runs the planned products of x [rows, k] into out [rows, n] (each product on its row
// block). W8A8 quantises all rows once first. Every plan is made (and validated) before
// anything is launched.
template <typename Impl>
void run_products(CudaBackend& backend, Impl& m, const QuantizedTensor& w,
                  const std::vector<QProduct>& products, const float* x, std::int64_t rows,
                  std::int64_t k, float* out) {
  // Equalised weights take the activations times their column scales (a copy of x).
  Tensor scaled;
  if (w.has_col_scales()) {
    scaled = Tensor(backend, DType::f32, Shape{rows, k});
    for (const QProduct& p : products) {
      kern::scale_columns(x + p.row0 * k, p.rows, k, p.col_scale, scaled.data<float>() + p.row0 * k,
                          m.stream);
      Impl::launched("scale_columns");
    }
    x = scaled.data<float>();
  }
  if (w.spec().mode == ActivationMode::weight_only) {
    for (const QProduct& p : products) {
      kern::qgemm_weight_only(x + p.row0 * k, p.rows, p.w, out + p.row0 * p.w.n, p.plan, m.stream);
      Impl::launched("qgemm_weight_only");
    }
    return;
  }
  const std::int64_t ldq = cuda_detail::quantized_row_stride(k);
  Tensor xq(backend, DType::i8, Shape{rows, ldq});
  // One activation scale per (row, weight group), as on the CPU.
  const std::int64_t groups = w.groups(), group = k / groups;
  Tensor xs(backend, DType::f32, Shape{rows, groups});
  kern::quantize_activations(x, rows, k, group, xq.data<std::int8_t>(), ldq, xs.data<float>(),
                             m.stream);
  Impl::launched("quantize_activations");
  for (const QProduct& p : products) {
    kern::qgemm_w8a8(xq.data<std::int8_t>() + p.row0 * ldq, ldq, xs.data<float>() + p.row0 * groups,
                     p.rows, p.w, out + p.row0 * p.w.n, p.plan, m.stream);
    Impl::launched("qgemm_w8a8");
  }
}

}  // namespace

void CudaBackend::qgemm(TensorView a, const QuantizedTensor& w, TensorView c) {
  constexpr std::string_view fn = "CudaBackend::qgemm";
  detail::expect_qgemm_io(fn, a, w, c, this, device());
  expect_row_major_int8(fn, "w", w);
  const std::int64_t M = a.dim(0), N = w.dim(0), K = w.dim(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum (and w.groups() is undefined for K = 0 per channel)
    fill(c, 0.0f);
    return;
  }
  cuda_detail::checked_int(M, fn, "M");
  const std::vector<QProduct> products{plan_product(fn, w, 0, 0, M, a.as<float>())};
  Impl& m = *impl_;
  m.activate();
  run_products(*this, m, w, products, a.as<float>(), M, K, c.as<float>());
}

void CudaBackend::grouped_qgemm(TensorView x, const QuantizedTensor& w, TensorView offsets,
                                TensorView out) {
  constexpr std::string_view fn = "CudaBackend::grouped_qgemm";
  detail::expect_grouped_qgemm_io(fn, x, w, offsets, out, this, device());
  const std::int64_t E = w.dim(0), N = w.dim(1), K = w.dim(2);
  expect_row_major_int8(fn, "w", w);
  Impl& m = *impl_;
  m.activate();
  std::int64_t rows = 0;
  const auto active = plan_experts(m, offsets, E, x.dim(0), fn, &rows);
  if (rows == 0 || N == 0) return;
  if (K == 0) {
    fill(out.slice(0, rows), 0.0f);
    return;
  }
  cuda_detail::checked_int(rows, fn, "rows");
  std::vector<QProduct> products;
  products.reserve(active.size());
  for (const cuda_detail::ExpertRows& er : active)
    products.push_back(plan_product(fn, w, er.expert, er.row0, er.rows, x.as<float>()));
  run_products(*this, m, w, products, x.as<float>(), rows, K, out.as<float>());
}

// ---------------------------------------------------------------------------- routing

namespace {

// Throws the CPU's "router logit [t, e] is v" Error when logits hold a non-finite value.
// (Impl is deduced: a free function may not name the private CudaBackend::Impl.)
template <typename Impl>
void check_logits(Impl& m, std::string_view fn, const TensorView& logits, std::int64_t E) {
  if (!m.check_values || logits.empty()) return;
  const std::uint64_t i = m.first_failure([&](unsigned long long* flag) {
    kern::find_nonfinite(logits.as<float>(), logits.numel(), flag, m.stream);
  });
  if (i == cuda_detail::kNoFailure) return;
  const float v = m.template element<float>(logits.data, i);
  const auto ii = static_cast<std::int64_t>(i);
  detail::fail(ErrorCode::numeric, fn, "router logit [{}, {}] is {}", ii / E, ii % E, v);
}

}  // namespace

void CudaBackend::route_topk(TensorView logits, TensorView bias, const RouteParams& p,
                             TensorView ids, TensorView weights, TensorView stats) {
  constexpr std::string_view fn = "CudaBackend::route_topk";
  detail::expect_route_topk_io(fn, logits, bias, p, ids, weights, stats, device());
  const std::int64_t T = logits.dim(0), E = logits.dim(1);
  const float* B = bias.empty() ? nullptr : bias.as<float>();
  const std::size_t shared = cuda_detail::route_topk_shared_bytes(E, p.n_group, p.top_k);
  AUTOGLM_CHECK(shared <= cuda_detail::kDefaultSharedBytes, unsupported, fn,
                "{} experts exceed the routing kernel's shared memory", E);
  cuda_detail::checked_int(T, fn, "tokens");
  Impl& m = *impl_;
  m.activate();
  check_logits(m, fn, logits, E);
  if (T == 0) {
    kern::fill(stats.as<float>(), E + 1, 0.0f, m.stream);
    Impl::launched("fill");
    return;
  }
  Tensor partial(*this, DType::f32, Shape{T, E + 1});
  const kern::RouteArgs args{p.score == ScoreFunc::sigmoid ? 1 : 0,
                             p.top_k,
                             p.renormalize ? 1 : 0,
                             p.renorm_epsilon,
                             p.routed_scaling,
                             p.n_group,
                             p.topk_group,
                             p.group_mask == GroupMask::neg_inf ? 1 : 0,
                             p.noise_std,
                             p.seed};
  kern::route_topk(logits.as<float>(), B, T, E, args, ids.as<std::int32_t>(), weights.as<float>(),
                   partial.data<float>(), shared, m.stream);
  Impl::launched("route_topk");
  kern::reduce_columns(partial.data<float>(), T, E + 1, stats.as<float>(), m.stream);
  Impl::launched("reduce_columns");
}

void CudaBackend::route_expert_choice(TensorView logits, std::int64_t capacity, TensorView ids,
                                      TensorView weights, TensorView stats) {
  constexpr std::string_view fn = "CudaBackend::route_expert_choice";
  detail::expect_expert_choice_io(fn, logits, capacity, ids, weights, stats, device());
  const std::int64_t T = logits.dim(0), E = logits.dim(1);
  cuda_detail::checked_int(T, fn, "tokens");
  Impl& m = *impl_;
  m.activate();
  check_logits(m, fn, logits, E);
  if (T == 0) {
    kern::fill(stats.as<float>(), E + 1, 0.0f, m.stream);
    Impl::launched("fill");
    return;
  }
  Tensor partial(*this, DType::f32, Shape{T, E + 1});  // probabilities, then lse^2
  kern::softmax_stats(logits.as<float>(), T, E, partial.data<float>(), m.stream);
  Impl::launched("softmax_stats");
  kern::expert_choice_select(partial.data<float>(), T, E, std::min(capacity, T),
                             ids.as<std::int32_t>(), weights.as<float>(), m.stream);
  Impl::launched("expert_choice_select");
  kern::reduce_columns(partial.data<float>(), T, E + 1, stats.as<float>(), m.stream);
  Impl::launched("reduce_columns");
}

// ---------------------------------------------------------------------------- dispatch

void CudaBackend::plan_dispatch(TensorView ids, std::int64_t capacity, TensorView counts,
                                TensorView offsets, TensorView row_token, TensorView slot_row) {
  constexpr std::string_view fn = "CudaBackend::plan_dispatch";
  detail::expect_dispatch_io(fn, ids, counts, offsets, row_token, slot_row, device());
  const std::int64_t T = ids.dim(0), kk = ids.dim(1), E = counts.numel();
  cuda_detail::checked_int(T * kk, fn, "pairs");
  cuda_detail::checked_int(E, fn, "experts");
  Impl& m = *impl_;
  m.activate();
  const std::uint64_t bad = m.first_out_of_range(ids, T * kk, -1, E - 1);
  if (bad != cuda_detail::kNoFailure) {
    const auto i = static_cast<std::int64_t>(bad);
    detail::fail(ErrorCode::out_of_range, fn, "expert id {} at token {} outside [0, {})",
                 m.element<std::int32_t>(ids.data, bad), i / std::max<std::int64_t>(kk, 1), E);
  }
  const std::int64_t cap = capacity <= 0 ? std::numeric_limits<std::int64_t>::max() : capacity;
  kern::dispatch_rank(ids.as<std::int32_t>(), T, kk, E, cap, counts.as<std::int32_t>(),
                      slot_row.as<std::int32_t>(), m.stream);
  Impl::launched("dispatch_rank");
  kern::dispatch_offsets(counts.as<std::int32_t>(), E, offsets.as<std::int32_t>(), m.stream);
  Impl::launched("dispatch_offsets");
  kern::dispatch_place(ids.as<std::int32_t>(), T * kk, kk, offsets.as<std::int32_t>(),
                       slot_row.as<std::int32_t>(), row_token.as<std::int32_t>(), m.stream);
  Impl::launched("dispatch_place");
}

void CudaBackend::gather_rows(TensorView x, TensorView row_token, TensorView out) {
  constexpr std::string_view fn = "CudaBackend::gather_rows";
  expect_matrix(fn, "x", x, device());
  expect_matrix(fn, "out", out, device());
  detail::expect_device(fn, "row_token", row_token, device());
  expect_dtype(fn, "row_token", row_token, DType::i32);
  expect_dim(fn, "out", out, 1, x.dim(1));
  AUTOGLM_CHECK(row_token.numel() >= out.dim(0), shape_mismatch, fn,
                "row_token holds {} rows, out needs {}", row_token.numel(), out.dim(0));
  const std::int64_t R = out.dim(0), d = x.dim(1), T = x.dim(0);
  Impl& m = *impl_;
  m.activate();
  const std::uint64_t bad = m.first_out_of_range(row_token, R, 0, T - 1);
  if (bad != cuda_detail::kNoFailure)
    detail::fail(ErrorCode::out_of_range, fn, "row {} names token {} of {}", bad,
                 m.element<std::int32_t>(row_token.data, bad), T);
  kern::gather_rows(x.as<float>(), T, row_token.as<std::int32_t>(), R, d, out.as<float>(),
                    m.stream);
  Impl::launched("gather_rows");
}

void CudaBackend::combine(TensorView y, TensorView slot_row, TensorView weights, TensorView out,
                          bool accumulate) {
  constexpr std::string_view fn = "CudaBackend::combine";
  expect_matrix(fn, "y", y, device());
  expect_matrix(fn, "out", out, device());
  expect_matrix(fn, "weights", weights, device());
  detail::expect_device(fn, "slot_row", slot_row, device());
  expect_dtype(fn, "slot_row", slot_row, DType::i32);
  const std::int64_t T = out.dim(0), d = out.dim(1), kk = weights.dim(1), R = y.dim(0);
  expect_dim(fn, "y", y, 1, d);
  expect_dim(fn, "weights", weights, 0, T);
  AUTOGLM_CHECK(slot_row.numel() == T * kk, shape_mismatch, fn, "slot_row must hold {} values",
                T * kk);
  Impl& m = *impl_;
  m.activate();
  const std::uint64_t bad = m.first_out_of_range(slot_row, T * kk, -1, R - 1);
  if (bad != cuda_detail::kNoFailure)
    detail::fail(ErrorCode::out_of_range, fn, "slot {} names row {} of {}", bad,
                 m.element<std::int32_t>(slot_row.data, bad), R);
  kern::combine(y.as<float>(), R, slot_row.as<std::int32_t>(), weights.as<float>(), T, kk, d,
                out.as<float>(), accumulate, m.stream);
  Impl::launched("combine");
}

}  // namespace autoglm
