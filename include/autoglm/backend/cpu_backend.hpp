// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstddef>
#include <memory>

#include "autoglm/backend/backend.hpp"

namespace autoglm {

/// Options of the CPU backend.
struct CpuBackendOptions {
  int threads = 0;  ///< worker threads; 0 = all hardware threads
  /// Bytes of freed large buffers kept for reuse (activations of the next forward pass).
  std::size_t cache_bytes = std::size_t{1} << 30;
  /// Products with bf16 weights round the activations to bf16 (nearest even) and run on
  /// AMX-BF16 tiles, or with AVX512_BF16 dot products on CPUs without AMX (AMD Zen 4), with f32
  /// accumulation, as PyTorch's bf16 matmuls do: several times the f32 FMA throughput
  /// (prefill), results within bf16 rounding of the exact ones. Off by default (bf16 weights
  /// are then widened exactly, f32 compute). Ignored where the CPU or OS has neither (see
  /// CpuBackend::bf16_compute). Each output row depends on its own input row
  /// only: cached decoding still equals recomputation, and 1 or N threads agree bit for bit.
  bool bf16_compute = false;
  /// Buffers of 16 MiB or more (weights, large activations) are 2 MiB-aligned mappings advised
  /// for transparent huge pages (Linux, where THP is "always" or "madvise"): streaming expert
  /// weights then needs one page walk per 2 MiB instead of per 4 KiB (docs/benchmarks.md: up to
  /// ~10 % on a weight-streaming GEMM, a few % on whole MoE layers). Off: plain aligned_alloc.
  bool huge_pages = true;
};

/// CPU backend on Eigen (GEMM tiles) and oneTBB (parallel loops in a private task arena).
/// Work is split into tiles whose shape never depends on the thread count, so results are
/// bit-identical for any number of threads. Tensors must not outlive the backend that made them.
class CpuBackend final : public Backend {
 public:
  /// Creates the backend; threads < 0 is an Error.
  explicit CpuBackend(CpuBackendOptions options = {});
  ~CpuBackend() override;
  CpuBackend(const CpuBackend&) = delete;
  CpuBackend& operator=(const CpuBackend&) = delete;

  std::string_view name() const noexcept override { return "cpu"; }
  Device device() const noexcept override { return Device{DeviceKind::cpu, 0}; }
  int num_threads() const noexcept override;

  void* allocate(std::size_t bytes) override;
  void deallocate(void* ptr) noexcept override;
  void synchronize() override {}

  void copy_from_host(TensorView dst, const void* src) override;
  void copy_to_host(void* dst, TensorView src) override;
  void convert(TensorView src, TensorView dst) override;
  void fill(TensorView dst, float value) override;
  /// True when CpuBackendOptions::bf16_compute was asked for and this machine runs it.
  bool bf16_compute() const noexcept;
  /// f32 always; bf16 and f16 in builds with the AVX-512 panel kernels.
  bool supports_weight_dtype(DType t) const noexcept override;
  Layout weight_layout() const noexcept override;
  void relayout(TensorView src, TensorView dst) override;
  void fill_uniform(TensorView dst, std::uint64_t seed, float scale) override;

  void gemm(TensorView a, TensorView b, TensorView c, GemmParams p = {}) override;
  void grouped_gemm(TensorView x, TensorView w, TensorView offsets, TensorView out) override;

  QuantizedTensor pack_quantized(const QuantizedTensor& w) override;
  void quantized_to_host(const QuantizedTensor& w, std::int8_t* data, float* scales) override;
  void qgemm(TensorView a, const QuantizedTensor& w, TensorView c) override;
  void grouped_qgemm(TensorView x, const QuantizedTensor& w, TensorView offsets,
                     TensorView out) override;
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
  // Attention primitives (src/cpu/cpu_attention.cpp).
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
