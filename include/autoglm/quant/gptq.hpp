// SPDX-License-Identifier: Apache-2.0
// Calibrated int8 quantization (GPTQ): the codes of each weight row are chosen column by column,
// each rounding error spread over the columns not yet rounded in proportion to how the layer's
// real inputs correlate them, so that the output error ||(W - Q) X|| over calibration inputs X
// is smaller than round-to-nearest's. The scales and the file format do not change: a GPTQ
// tensor is an ordinary QuantizedTensor, saved and loaded like any other.
//
// Building blocks, usable on any component that multiplies its weights through linear /
// grouped_linear (every block of autoglm, and user experts that call them):
//   InputRecorder rec(backend);          // a Backend that forwards every call to `backend`
//   layer.forward(rec, x, ...);          // and adds x^T x of each weight's inputs per matrix
//   { GptqScope scope(rec);              // while alive on this thread, quantize() rounds the
//     q = layer.quantized(backend, spec); }  // weights rec saw with GPTQ
// quantize_model(model, config, calibration) runs this layer by layer over token sequences.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "autoglm/backend/backend.hpp"
#include "autoglm/models/model.hpp"
#include "autoglm/quant/quantize.hpp"

namespace autoglm {

namespace detail {
struct GptqAccess;
}  // namespace detail

/// The largest GptqOptions::damping accepted (a share of the mean diagonal: 1000 is already
/// round-to-nearest for any practical purpose).
inline constexpr double kMaxDamping = 1e3;

/// Numeric options of GPTQ.
struct GptqOptions {
  /// Added to the diagonal of each input Gram matrix, as a share of its mean diagonal: keeps the
  /// inverse stable where a few calibration rows leave it singular (an expert that saw 3
  /// tokens). 0.01 as in the GPTQ paper; larger is closer to round-to-nearest.
  double damping = 0.01;
  /// Matrices whose weight rows saw fewer calibration rows than this keep round-to-nearest: a
  /// Gram matrix of a handful of tokens fits those tokens, not the expert's inputs in general.
  std::int64_t min_rows = 8;
  /// Matrices (experts of a bank) rounded at once, one thread each; 0 = the hardware's threads.
  /// Each matrix is rounded on its own, so the codes do not depend on it.
  int threads = 0;
};

/// A Backend that forwards every call to another one and, for each weight that gemm and
/// grouped_gemm multiply (keyed by the weight's storage address, so the weights must outlive
/// the recorder's use), accumulates the Gram matrix x^T x of its input rows: one [K, K] matrix
/// per weight matrix, per expert of a bank (the rows `offsets` gives it). Rows are buffered per
/// matrix and added kFlushRows at a time as one symmetric rank update (a few rows per expert per
/// sequence would each re-read the whole K x K sum). Memory: 4 K^2 bytes per recorded matrix
/// plus up to 4 K kFlushRows bytes of buffered rows. Tensors a forward pass makes through the
/// recorder must not outlive it.
class InputRecorder final : public Backend {
 public:
  /// Records on top of `inner`, which must outlive the recorder.
  explicit InputRecorder(Backend& inner) : inner_(&inner) {}

  /// The backend the calls go to.
  Backend& inner() const noexcept { return *inner_; }
  /// Weight matrices with at least one recorded row.
  std::int64_t matrices() const noexcept;
  /// Rows a matrix buffers before they are added to its Gram matrix.
  static constexpr std::int64_t kFlushRows = 256;
  /// Forgets everything recorded.
  void clear() noexcept { stats_.clear(); }

  /// The inputs one weight matrix saw.
  struct Gram {
    std::vector<float> gram;  ///< [K, K] symmetric, row-major: the sum of x x^T over its rows
    std::int64_t rows = 0;    ///< input rows summed
    bool finite = true;       ///< every recorded input was finite
  };
  /// The inputs of matrix `index` (0 for a single matrix, e for expert e of a bank) of the
  /// weight stored at `weight`, with its buffered rows added first; nullptr when it saw no rows
  /// or its K is not k. Safe to call from several threads while nothing records.
  const Gram* gram(const void* weight, std::int64_t index, std::int64_t k) const;

  std::string_view name() const noexcept override { return inner_->name(); }
  Device device() const noexcept override { return inner_->device(); }
  int num_threads() const noexcept override { return inner_->num_threads(); }
  void* allocate(std::size_t bytes) override { return inner_->allocate(bytes); }
  void deallocate(void* ptr) noexcept override { inner_->deallocate(ptr); }
  void synchronize() override { inner_->synchronize(); }
  void copy_from_host(TensorView dst, const void* src) override {
    inner_->copy_from_host(dst, src);
  }
  void copy_to_host(void* dst, TensorView src) override { inner_->copy_to_host(dst, src); }
  void convert(TensorView src, TensorView dst) override { inner_->convert(src, dst); }
  bool supports_weight_dtype(DType t) const noexcept override {
    return inner_->supports_weight_dtype(t);
  }
  Layout weight_layout() const noexcept override { return inner_->weight_layout(); }
  void relayout(TensorView src, TensorView dst) override { inner_->relayout(src, dst); }
  void fill(TensorView dst, float value) override { inner_->fill(dst, value); }
  void fill_uniform(TensorView dst, std::uint64_t seed, float scale) override {
    inner_->fill_uniform(dst, seed, scale);
  }
  /// Records a's rows as inputs of b, then forwards.
  void gemm(TensorView a, TensorView b, TensorView c, GemmParams p = {}) override;
  /// Records each expert's rows as inputs of w[e], then forwards.
  void grouped_gemm(TensorView x, TensorView w, TensorView offsets, TensorView out) override;
  QuantizedTensor pack_quantized(const QuantizedTensor& w) override {
    return inner_->pack_quantized(w);
  }
  void quantized_to_host(const QuantizedTensor& w, std::int8_t* data, float* scales) override {
    inner_->quantized_to_host(w, data, scales);
  }
  void qgemm(TensorView a, const QuantizedTensor& w, TensorView c) override {
    inner_->qgemm(a, w, c);
  }
  void grouped_qgemm(TensorView x, const QuantizedTensor& w, TensorView offsets,
                     TensorView out) override {
    inner_->grouped_qgemm(x, w, offsets, out);
  }
  void qembedding(const QuantizedTensor& table, TensorView ids, TensorView out) override {
    inner_->qembedding(table, ids, out);
  }
  void route_topk(TensorView logits, TensorView bias, const RouteParams& p, TensorView ids,
                  TensorView weights, TensorView stats) override {
    inner_->route_topk(logits, bias, p, ids, weights, stats);
  }
  void route_expert_choice(TensorView logits, std::int64_t capacity, TensorView ids,
                           TensorView weights, TensorView stats) override {
    inner_->route_expert_choice(logits, capacity, ids, weights, stats);
  }
  void plan_dispatch(TensorView ids, std::int64_t capacity, TensorView counts, TensorView offsets,
                     TensorView row_token, TensorView slot_row) override {
    inner_->plan_dispatch(ids, capacity, counts, offsets, row_token, slot_row);
  }
  void gather_rows(TensorView x, TensorView row_token, TensorView out) override {
    inner_->gather_rows(x, row_token, out);
  }
  void combine(TensorView y, TensorView slot_row, TensorView weights, TensorView out,
               bool accumulate) override {
    inner_->combine(y, slot_row, weights, out, accumulate);
  }
  void silu_mul(TensorView in, TensorView out) override { inner_->silu_mul(in, out); }
  void gelu(TensorView in, TensorView out) override { inner_->gelu(in, out); }
  void softmax(TensorView x) override { inner_->softmax(x); }
  void rms_norm(TensorView x, TensorView weight, float eps, TensorView out) override {
    inner_->rms_norm(x, weight, eps, out);
  }
  void add(TensorView a, TensorView b, TensorView out) override { inner_->add(a, b, out); }
  void add_scaled_rows(TensorView x, TensorView scale, RowScale f, TensorView out) override {
    inner_->add_scaled_rows(x, scale, f, out);
  }
  void embedding(TensorView table, TensorView ids, TensorView out) override {
    inner_->embedding(table, ids, out);
  }
  void add_bias(TensorView x, TensorView bias, TensorView out) override {
    inner_->add_bias(x, bias, out);
  }
  void clamp(TensorView x, float lo, float hi) override { inner_->clamp(x, lo, hi); }
  void copy_columns(TensorView src, std::int64_t src_col, TensorView dst, std::int64_t dst_col,
                    std::int64_t width) override {
    inner_->copy_columns(src, src_col, dst, dst_col, width);
  }
  void rope(TensorView x, TensorView positions, TensorView inv_freq, const RopeParams& p) override {
    inner_->rope(x, positions, inv_freq, p);
  }
  void attention(TensorView q, TensorView k, TensorView v, TensorView positions,
                 const AttentionParams& p, TensorView out) override {
    inner_->attention(q, k, v, positions, p, out);
  }

 private:
  // x: host copy of a view on the inner backend.
  std::vector<float> snapshot(TensorView x) const;
  // One weight matrix: its sum and the rows not yet in it.
  struct Slot {
    Gram sum;
    std::vector<float> pending;  // [pending_rows, k]
    std::int64_t pending_rows = 0;
    bool upper_stale = false;  // rows were added to the lower triangle since gram() mirrored it
  };
  // Buffers x [rows, k] (f32 on the host) for matrix `index` of `weight`; the slot when its
  // buffer holds kFlushRows rows or more (the caller flushes it), else nullptr.
  Slot* record(const void* weight, std::int64_t index, std::int64_t matrices, const float* x,
               std::int64_t rows, std::int64_t k);
  // Flushes every slot, spread over the inner backend's thread count.
  void flush_all(const std::vector<Slot*>& slots, std::int64_t k) const;
  // Adds x [rows, k] to the lower triangle of s.sum (gram() mirrors it).
  static void add_rows(Slot& s, const float* x, std::int64_t rows, std::int64_t k);
  static void flush(Slot& s, std::int64_t k);

  Backend* inner_;
  // Per weight storage: one Slot per matrix of the weight (experts of a bank), made on demand.
  // gram() flushes buffered rows: mutable, under flush_mutex_.
  mutable std::unordered_map<const void*, std::vector<std::unique_ptr<Slot>>> stats_;
  mutable std::mutex flush_mutex_;
};

/// While alive, quantize() on this thread rounds every weight matrix that `recorder` saw with
/// GPTQ on its Gram matrix (column-equalised weights with the Gram matrix of the equalised
/// inputs) instead of round-to-nearest; other weights, and matrices with fewer than
/// options.min_rows rows, are rounded to nearest as before. Scopes nest; the innermost wins.
/// A recorded input that held a NaN or Inf is an Error naming the weight when it is quantized.
/// A scope belongs to the thread that made it and must end there; the recorder must not record
/// while a scope reads it.
class GptqScope {
 public:
  /// Activates `recorder`'s statistics (the recorder must outlive the scope).
  explicit GptqScope(const InputRecorder& recorder, GptqOptions options = {});
  ~GptqScope();
  GptqScope(const GptqScope&) = delete;
  GptqScope& operator=(const GptqScope&) = delete;

 private:
  const InputRecorder* recorder_;
  GptqOptions options_;
  GptqScope* previous_;
  friend struct detail::GptqAccess;
};

/// Calibration data of quantize_model: token sequences run through the model (each one from
/// position 0, as a prompt) to measure what each weight's inputs look like.
struct Calibration {
  /// Token id sequences; each non-empty and within the model's vocabulary and context.
  std::vector<std::vector<std::int32_t>> sequences;
  /// GPTQ's numeric options.
  GptqOptions gptq{};

  /// Token id sequences from a text file, one per line, ids separated by spaces or commas
  /// (blank lines skipped). An unreadable file, a field that is not an id in [0, 2^31) or a
  /// file without sequences is an Error naming the file and line.
  static std::vector<std::vector<std::int32_t>> read_sequences(const std::filesystem::path& path);
};

/// quantize_model with GPTQ: the calibration sequences run through the model one decoder layer
/// at a time; each layer's weights that `config` selects are rounded with GPTQ on the inputs
/// they received, where earlier layers are already int8 (so each layer also compensates what the
/// layers before it lost), and the sequences then advance through the int8 layer. The router
/// (if selected) is calibrated too; the embedding table and the LM head use round-to-nearest.
/// The result has the same schemes, shapes and file format as quantize_model's. An Error for
/// an empty calibration set, an empty or too long sequence, an id outside the vocabulary, and
/// (naming the tensor) a NaN or Inf weight or calibration activation; the model is unchanged.
Model quantize_model(const Model& model, const QuantConfig& config, const Calibration& calibration);

namespace detail {

/// What quantize() asks of the active GptqScope.
struct GptqAccess {
  /// The innermost scope of this thread, or nullptr.
  static const GptqScope* active() noexcept;
  /// The Gram matrix of matrix `index` of `weight` if the active scope has one with enough rows.
  static const InputRecorder::Gram* gram(const void* weight, std::int64_t index, std::int64_t k);
  /// The active scope's options (defaults when none is active).
  static GptqOptions options() noexcept;
  /// The active scope's thread count, 0 resolved to the hardware's (at least 1).
  static int threads() noexcept;
};

/// GptqOptions in range, else an Error naming fn and the option.
void check_gptq_options(std::string_view fn, const GptqOptions& options);

/// f(0) ... f(count - 1), each on its own thread (the calling thread takes f(0)); the first
/// exception thrown is rethrown after all have finished.
void parallel_for(std::int64_t count, const std::function<void(std::int64_t)>& f);

// w: [n, k] f32 row-major on the host; gram: [k, k] symmetric row-major; q: [n, k];
// scales: [n, k / group].
/// GPTQ rounding of w's rows with the column Gram matrix `gram` (the scales of each group are
/// set by `rule` from its columns as the updates left them when the group is reached; per
/// channel (group == k) from the original row). Equals quantize_rows with the same rule when
/// gram is diagonal. Returns
/// the index of the first non-finite weight, or -1; returns -2 (q and scales then unspecified:
/// round to nearest instead) for a group that does not divide k, a non-finite Gram matrix, one
/// no damping makes positive definite, or updates that overflow.
std::int64_t gptq_rows(const float* w, std::int64_t n, std::int64_t k, std::int64_t group,
                       const float* gram, double damping, std::int8_t* q, float* scales,
                       const ScaleRule& rule = {});

}  // namespace detail

}  // namespace autoglm
