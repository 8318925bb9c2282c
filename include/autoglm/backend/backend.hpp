// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "autoglm/core/quant.hpp"
#include "autoglm/core/tensor.hpp"

namespace autoglm {

/// How router logits become expert scores.
enum class ScoreFunc : std::uint8_t {
  softmax,  ///< Mixtral, Qwen, OLMoE: softmax over experts
  sigmoid,  ///< DeepSeek-V3, GLM-4.5: independent sigmoid per expert
};

/// Value given to experts of groups that group-limited routing discards.
enum class GroupMask : std::uint8_t {
  zero,     ///< transformers 4.x (DeepseekV3TopkRouter, Glm4MoeTopkRouter before 5.0)
  neg_inf,  ///< transformers 5.x, DeepSeek reference, llama.cpp, vLLM
};

/// Token-choice routing parameters (see docs/architecture.md for the order of operations).
struct RouteParams {
  ScoreFunc score = ScoreFunc::softmax;  ///< logits -> scores
  int top_k = 2;                         ///< experts per token, in [1, E]
  bool renormalize = true;               ///< divide the k weights by their sum
  float renorm_epsilon = 0.0f;           ///< added to the sum before dividing (HF sigmoid: 1e-20)
  float routed_scaling = 1.0f;           ///< weights *= this after renormalisation
  int n_group = 1;                       ///< expert groups (E % n_group == 0)
  int topk_group = 1;                    ///< groups kept per token, in [1, n_group]
  GroupMask group_mask = GroupMask::neg_inf;  ///< fill for discarded groups
  float noise_std = 0.0f;                     ///< Gaussian noise on logits (noisy top-k); 0 = none
  std::uint64_t seed = 0;  ///< noise seed; noise depends on (seed, token, expert)
};

/// C = alpha * A * B^T + beta * C, weights stored [out, in] as Hugging Face does.
struct GemmParams {
  float alpha = 1.0f;  ///< scale of the product
  float beta = 0.0f;   ///< scale of the previous C; 0 ignores C's contents
};

/// Activation of an elementwise row scale in Backend::add_scaled_rows.
enum class RowScale : std::uint8_t { identity, sigmoid };

/// Rotary position embedding of Backend::rope. Each head's dimensions [offset, offset +
/// rotary_dim) are rotated by the angles position * inv_freq[i]; the others pass through.
struct RopeParams {
  std::int64_t offset = 0;      ///< first rotated dimension of each head (DeepSeek MLA: nope)
  std::int64_t rotary_dim = 0;  ///< rotated dimensions, even; 0 = head_dim - offset
  /// false: rotate_half (NEOX) pairs, element i with i + rotary_dim/2 (transformers default).
  /// true: adjacent pairs (2i, 2i+1) as DeepSeek's reference rotates them, written
  /// de-interleaved as transformers' rope_interleave does: [x_even rotated | x_odd rotated].
  bool interleaved = false;
  float attention_factor = 1.0f;  ///< cos and sin are multiplied by it (yarn mscale)
};

/// Scaled dot-product attention of Backend::attention.
struct AttentionParams {
  float scale = 1.0f;  ///< score multiplier, usually head_dim^-0.5
  bool causal = true;  ///< query at position p sees keys 0 ... p only
  /// Sliding window: a query at position p sees key s only if p - s < window; 0 = unlimited.
  std::int64_t window = 0;
};

/// The primitive set every backend implements, at MoE grain: one call covers a whole routing,
/// permutation or grouped GEMM, so a device backend keeps its kernels in its own translation
/// units. All tensors are dense row-major views on this backend's device; every entry point
/// validates shapes and dtypes and throws autoglm::Error on a mismatch.
class Backend {
 public:
  virtual ~Backend() = default;

  /// Short name, e.g. "cpu".
  virtual std::string_view name() const noexcept = 0;
  /// Device of the buffers this backend allocates.
  virtual Device device() const noexcept = 0;
  /// Worker threads the backend computes with.
  virtual int num_threads() const noexcept = 0;

  /// 64-byte aligned buffer of `bytes` (may be 0).
  virtual void* allocate(std::size_t bytes) = 0;
  /// Frees a buffer from allocate().
  virtual void deallocate(void* ptr) noexcept = 0;
  /// Waits for all queued work.
  virtual void synchronize() = 0;

  /// dst <- host bytes (dst.nbytes() of them).
  virtual void copy_from_host(TensorView dst, const void* src) = 0;
  /// host bytes <- src (src.nbytes() of them).
  virtual void copy_to_host(void* dst, TensorView src) = 0;
  /// dst <- src with dtype conversion (f32/f16/bf16 among themselves; same dtype for ints).
  virtual void convert(TensorView src, TensorView dst) = 0;
  /// True when gemm and grouped_gemm take weights of dtype t as they are (f32 always; a
  /// backend may add bf16 / f16, widened exactly inside its kernels). prepare_weights converts
  /// other float weights to f32.
  virtual bool supports_weight_dtype(DType t) const noexcept { return t == DType::f32; }
  /// The layout this backend's GEMMs read weights fastest in (see prepare_weights).
  virtual Layout weight_layout() const noexcept { return Layout::row_major; }
  /// dst <- src in dst's layout; same shape and dtype (f32, or a 16-bit dtype the backend
  /// supports as weights), rank >= 2. Backends that only use row_major need not implement it.
  virtual void relayout(TensorView src, TensorView dst) {
    (void)src;
    (void)dst;
    detail::fail(ErrorCode::unsupported, "Backend::relayout", "backend {} has no other layouts",
                 name());
  }
  /// Every element of dst (f32) set to value.
  virtual void fill(TensorView dst, float value) = 0;
  /// dst (f32, any layout) <- uniform in [-scale, scale], a function of (seed, logical index).
  virtual void fill_uniform(TensorView dst, std::uint64_t seed, float scale) = 0;

  // a: [M, K] f32; b: [N, K] (any layout; f32 or a supported 16-bit weight dtype); c: [M, N] f32.
  /// Dense GEMM, C = alpha A B^T + beta C.
  virtual void gemm(TensorView a, TensorView b, TensorView c, GemmParams p = {}) = 0;
  // x: [R, K] rows grouped by expert; w: [E, N, K] (any layout; f32 or a supported 16-bit
  // weight dtype); offsets: [E + 1] i32; out: [R, N].
  /// Grouped GEMM: out[offsets[e]:offsets[e+1]] = x[same rows] * w[e]^T for every expert.
  virtual void grouped_gemm(TensorView x, TensorView w, TensorView offsets, TensorView out) = 0;

  /// w in this backend's int8 kernel layout; expert banks and layers call it once when their
  /// weights are built. The default keeps w row-major.
  virtual QuantizedTensor pack_quantized(const QuantizedTensor& w) { return w; }
  // data: [numel] int8 row-major [..., N, K]; scales: [numel / K * groups] f32.
  /// Row-major int8 data and scales of w (packed or not) to host memory, as a file stores them.
  virtual void quantized_to_host(const QuantizedTensor& w, std::int8_t* data, float* scales) {
    AUTOGLM_CHECK(!w.is_packed(), unsupported, "Backend::quantized_to_host",
                  "backend {} packed this tensor but cannot unpack it", name());
    copy_to_host(data, w.data());
    copy_to_host(scales, w.scales());
  }
  // a: [M, K] f32; w: int8 [N, K]; c: [M, N] f32.
  /// c = a * dequant(w)^T, the activations taken as w.spec().mode says.
  virtual void qgemm(TensorView a, const QuantizedTensor& w, TensorView c) {
    (void)a;
    (void)w;
    (void)c;
    detail::fail(ErrorCode::unsupported, "Backend::qgemm", "backend {} has no int8 GEMM", name());
  }
  // x: [R, K] rows grouped by expert; w: int8 [E, N, K]; offsets: [E + 1] i32; out: [R, N].
  /// Grouped int8 GEMM: out[offsets[e]:offsets[e+1]] = x[same rows] * dequant(w[e])^T.
  virtual void grouped_qgemm(TensorView x, const QuantizedTensor& w, TensorView offsets,
                             TensorView out) {
    (void)x;
    (void)w;
    (void)offsets;
    (void)out;
    detail::fail(ErrorCode::unsupported, "Backend::grouped_qgemm",
                 "backend {} has no int8 grouped GEMM", name());
  }

  // table: int8 [V, d] row-major (not packed); ids: [T] i32; out: [T, d] f32.
  /// Embedding lookup of an int8 table, dequantised; an id outside [0, V) is an Error.
  virtual void qembedding(const QuantizedTensor& table, TensorView ids, TensorView out) {
    (void)table;
    (void)ids;
    (void)out;
    detail::fail(ErrorCode::unsupported, "Backend::qembedding",
                 "backend {} has no int8 embedding lookup", name());
  }

  // logits: [T, E] f32; bias: [E] f32 or empty (selection only); ids/weights: [T, k]
  // i32/f32; stats: [E + 1] f32 <- per-expert sum of scores, then sum of logsumexp^2.
  /// Token-choice top-k routing (softmax or sigmoid, group-limited, renormalised, scaled).
  virtual void route_topk(TensorView logits, TensorView bias, const RouteParams& p, TensorView ids,
                          TensorView weights, TensorView stats) = 0;
  // logits: [T, E]; ids/weights: [T, E] (slot j of token t: j-th expert that chose t, or -1).
  /// Expert-choice routing: each expert takes the `capacity` tokens with its highest softmax
  /// probability; a token may be taken by zero or many experts.
  virtual void route_expert_choice(TensorView logits, std::int64_t capacity, TensorView ids,
                                   TensorView weights, TensorView stats) = 0;
  // ids: [T, k] i32 (-1 = no expert); counts: [E]; offsets: [E + 1]; row_token: [T * k];
  // slot_row: [T * k] (row of each slot, -1 when dropped). All i32.
  /// Groups (token, slot) pairs by expert with a counting sort. An expert keeps at most
  /// `capacity` rows (capacity <= 0: unlimited), first slots before second slots, earlier tokens
  /// first within a slot; the rest are dropped.
  virtual void plan_dispatch(TensorView ids, std::int64_t capacity, TensorView counts,
                             TensorView offsets, TensorView row_token, TensorView slot_row) = 0;
  // x: [T, d]; row_token: [R]; out: [R, d].
  /// out[r] = x[row_token[r]].
  virtual void gather_rows(TensorView x, TensorView row_token, TensorView out) = 0;
  // y: [R, d]; slot_row/weights: [T, k]; out: [T, d].
  /// out[t] (+)= sum_j weights[t, j] * y[slot_row[t, j]], slots in order; deterministic.
  virtual void combine(TensorView y, TensorView slot_row, TensorView weights, TensorView out,
                       bool accumulate) = 0;

  // in: [R, 2F] (gate | up); out: [R, F].
  /// SwiGLU: out = silu(gate) * up.
  virtual void silu_mul(TensorView in, TensorView out) = 0;
  /// out = gelu(in), erf form.
  virtual void gelu(TensorView in, TensorView out) = 0;
  /// Row-wise softmax over the last dimension, in place.
  virtual void softmax(TensorView x) = 0;
  // x, out: [T, d]; weight: [d].
  /// out = x * rsqrt(mean(x^2) + eps) * weight.
  virtual void rms_norm(TensorView x, TensorView weight, float eps, TensorView out) = 0;
  /// out = a + b, same shapes.
  virtual void add(TensorView a, TensorView b, TensorView out) = 0;
  // out, x: [T, d]; scale: [T] or [T, 1].
  /// out[t] += f(scale[t]) * x[t] with f identity or sigmoid.
  virtual void add_scaled_rows(TensorView x, TensorView scale, RowScale f, TensorView out) = 0;
  // table: [V, d] f32 (or a 16-bit dtype supports_weight_dtype accepts); ids: [T] i32;
  // out: [T, d] f32.
  /// Embedding lookup (16-bit rows widened exactly); an id outside [0, V) is an Error naming it.
  virtual void embedding(TensorView table, TensorView ids, TensorView out) = 0;

  // x, out: [R, N]; bias: [N].
  /// out[r] = x[r] + bias (out may be x).
  virtual void add_bias(TensorView x, TensorView bias, TensorView out) = 0;
  /// x = clamp(x, lo, hi) elementwise, in place (OLMoE clip_qkv); lo <= hi.
  virtual void clamp(TensorView x, float lo, float hi) = 0;
  // src: [R, Cs]; dst: [R * g, Cd] for an integer g >= 1.
  /// dst[r, dst_col + j] = src[r / g, src_col + j] for j < width: moves a column block between
  /// row-major matrices, repeating each source row g times (one k_rope head shared by g heads).
  virtual void copy_columns(TensorView src, std::int64_t src_col, TensorView dst,
                            std::int64_t dst_col, std::int64_t width) = 0;
  // x: [T, H, D] f32, rotated in place; positions: [T] i32 (>= 0); inv_freq: [rotary_dim / 2].
  /// Rotary position embedding (see RopeParams); angles are float(position) * inv_freq in f32,
  /// as transformers computes them.
  virtual void rope(TensorView x, TensorView positions, TensorView inv_freq,
                    const RopeParams& p) = 0;
  // q: [T, Hq, D]; k: [S, Hkv, D]; v: [S, Hkv, Dv]; positions: [T] i32 (query t sits at
  // positions[t], key s at position s); out: [T, Hq, Dv]. Hq % Hkv == 0.
  /// Multi-head attention with grouped KV heads (KV head j serves query heads j*g ... j*g+g-1,
  /// g = Hq / Hkv), f32 scores and softmax. A query that sees no key gets zeros.
  virtual void attention(TensorView q, TensorView k, TensorView v, TensorView positions,
                         const AttentionParams& p, TensorView out) = 0;
};

/// w in the backend's preferred weight form: w itself when it already is (or is not a float
/// matrix stack), else a re-laid-out copy; a 16-bit weight the backend cannot compute with is
/// widened to f32 (exact). Expert banks and heads call this once at build time.
template <typename B>
Tensor prepare_weights(B& backend, Tensor w) {
  const DType dt = w.dtype();
  if (!is_float_dtype(dt) || w.shape().rank() < 2) return w;
  const DType want = backend.supports_weight_dtype(dt) ? dt : DType::f32;
  if (want == dt && w.layout() == backend.weight_layout()) return w;
  if (want != dt) {  // widen first (row-major), then re-lay out below if needed
    AUTOGLM_CHECK(w.layout() == Layout::row_major, unsupported, "prepare_weights",
                  "a {} {} weight in a non-row-major layout cannot be widened by backend {}",
                  dtype_name(dt), w.shape().str(), backend.name());
    Tensor wide(backend, DType::f32, w.shape());
    backend.convert(w, wide);
    w = std::move(wide);
    if (w.layout() == backend.weight_layout()) return w;
  }
  Tensor out(backend, w.dtype(), w.shape(), backend.weight_layout());
  backend.relayout(w, out);
  return out;
}

namespace detail {
/// prepare_weights through the tensor's own backend (no-op for a tensor without one).
inline Tensor prepared(Tensor w) {
  return w.backend() ? prepare_weights(*w.backend(), std::move(w)) : w;
}
/// A weight in its backend's preferred form: float re-laid-out (16-bit kept or widened, as
/// prepare_weights says), int8 packed for the kernels.
inline Weight prepared(const Weight& w) {
  if (!w.is_quantized()) return prepared(w.tensor());
  const QuantizedTensor& q = w.quantized();
  if (q.is_packed() || !q.backend()) return w;
  return q.backend()->pack_quantized(q);
}
}  // namespace detail

// x: [M, K] f32; w: [N, K] float (prepared) or int8; out: [M, N].
/// out = x w^T through gemm or qgemm, whichever the weight needs.
template <typename B>
void linear(B& backend, TensorView x, const Weight& w, TensorView out) {
  if (w.is_quantized())
    backend.qgemm(x, w.quantized(), out);
  else
    backend.gemm(x, w.tensor(), out);
}

// x: [R, K] grouped by expert; w: [E, N, K]; offsets: [E + 1] i32; out: [R, N].
/// grouped_gemm or grouped_qgemm, whichever the weight needs.
template <typename B>
void grouped_linear(B& backend, TensorView x, const Weight& w, TensorView offsets, TensorView out) {
  if (w.is_quantized())
    backend.grouped_qgemm(x, w.quantized(), offsets, out);
  else
    backend.grouped_gemm(x, w.tensor(), offsets, out);
}

/// A backend type usable as a template argument: the Backend interface, or a final
/// implementation of it whose calls the compiler can devirtualise.
template <typename B>
concept BackendLike = std::derived_from<B, Backend>;

}  // namespace autoglm
