// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <memory>

#include "autoglm/backend/backend.hpp"

namespace autoglm {

/// Options of the CUDA backend.
struct CudaBackendOptions {
  int device = 0;  ///< CUDA device ordinal
  /// Let cuBLAS run FP32 GEMMs on TF32 tensor cores (about 1e-3 relative error instead of
  /// FP32's ~1e-6; several times faster on Ampere and later). Off: strict FP32.
  bool allow_tf32 = false;
  /// Bytes of freed device buffers kept for reuse (a forward pass allocates the same
  /// activation sizes every call, and cudaMalloc / cudaFree synchronise the device).
  std::size_t cache_bytes = std::size_t{1} << 30;
  /// Check index and router-logit values as the CPU backend does (out-of-range ids, negative
  /// positions, non-finite logits), with the same Errors. Each check costs one host
  /// synchronisation; false skips them (kernels then ignore bad indices instead of faulting).
  bool check_values = true;
};

/// CUDA backend: kernels on one stream of one device, FP32 GEMMs through cuBLAS, INT8 GEMMs
/// (weight-only and W8A8) in its own kernels, device memory from a caching pool (cudaMalloc,
/// never managed memory). Calls are asynchronous except those that return data to the host
/// (copy_to_host), validate device values (see CudaBackendOptions::check_values) or plan from
/// device data (grouped_gemm and grouped_qgemm read offsets); copy_from_host returns once the
/// host buffer may be reused. Results match CpuBackend within floating-point tolerance;
/// conversions, fill_uniform, routing choices, dispatch plans, int8 embedding lookups and the
/// W8A8 activation quantisation match it exactly. Only Layout::row_major weights. Every CUDA
/// or cuBLAS failure is an autoglm::Error (ErrorCode::device) naming the call and its status.
/// Tensors must not outlive the backend that made them.
class CudaBackend final : public Backend {
 public:
  /// Creates a stream and a cuBLAS handle on options.device; Error (device) when there is no
  /// such device.
  explicit CudaBackend(CudaBackendOptions options = {});
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  /// Number of CUDA devices; 0 when there is none or no usable driver (never throws).
  static int device_count() noexcept;

  std::string_view name() const noexcept override { return "cuda"; }
  Device device() const noexcept override;
  /// 1: the backend issues all work from the calling thread onto one stream.
  int num_threads() const noexcept override { return 1; }

  void* allocate(std::size_t bytes) override;
  void deallocate(void* ptr) noexcept override;
  void synchronize() override;

  void copy_from_host(TensorView dst, const void* src) override;
  void copy_to_host(void* dst, TensorView src) override;
  void convert(TensorView src, TensorView dst) override;
  /// Same-layout copy; any other layout is Error(unsupported).
  void relayout(TensorView src, TensorView dst) override;
  void fill(TensorView dst, float value) override;
  void fill_uniform(TensorView dst, std::uint64_t seed, float scale) override;

  void gemm(TensorView a, TensorView b, TensorView c, GemmParams p = {}) override;
  void grouped_gemm(TensorView x, TensorView w, TensorView offsets, TensorView out) override;

  // INT8 weights stay row-major on the device (pack_quantized and quantized_to_host are the
  // Backend defaults). Both activation modes, with the CPU's semantics (docs/cuda.md).
  /// Int8 GEMM: a warp per output column for up to 8 rows, shared-memory tiles above.
  void qgemm(TensorView a, const QuantizedTensor& w, TensorView c) override;
  /// Grouped int8 GEMM; reads the offsets to the host (one synchronisation) as grouped_gemm.
  void grouped_qgemm(TensorView x, const QuantizedTensor& w, TensorView offsets,
                     TensorView out) override;
  /// Int8 embedding lookup, dequantised; ids are checked as embedding checks them.
  void qembedding(const QuantizedTensor& table, TensorView ids, TensorView out) override;

  void route_topk(TensorView logits, TensorView bias, const RouteParams& p, TensorView ids,
                  TensorView weights, TensorView stats) override;
  void route_expert_choice(TensorView logits, std::int64_t capacity, TensorView ids,
                           TensorView weights, TensorView stats) override;
  void plan_dispatch(TensorView ids, std::int64_t capacity, TensorView counts, TensorView offsets,
                     TensorView row_token, TensorView slot_row) override;
  void gather_rows(TensorView x, TensorView row_token, TensorView out) override;
  void combine(TensorView y, TensorView slot_row, TensorView weights, TensorView out,
               bool accumulate) override;

  void silu_mul(TensorView in, TensorView out) override;
  void gelu(TensorView in, TensorView out) override;
  void softmax(TensorView x) override;
  void rms_norm(TensorView x, TensorView weight, float eps, TensorView out) override;
  void add(TensorView a, TensorView b, TensorView out) override;
  void add_scaled_rows(TensorView x, TensorView scale, RowScale f, TensorView out) override;
  void embedding(TensorView table, TensorView ids, TensorView out) override;
  void add_bias(TensorView x, TensorView bias, TensorView out) override;
  void clamp(TensorView x, float lo, float hi) override;
  void copy_columns(TensorView src, std::int64_t src_col, TensorView dst, std::int64_t dst_col,
                    std::int64_t width) override;
  void rope(TensorView x, TensorView positions, TensorView inv_freq, const RopeParams& p) override;
  void attention(TensorView q, TensorView k, TensorView v, TensorView positions,
                 const AttentionParams& p, TensorView out) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace autoglm
