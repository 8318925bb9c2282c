// SPDX-License-Identifier: Apache-2.0
// load_model: Hugging Face checkpoint directory -> Model. Two phases: plan (every tensor's
// name, presence, dtype and shape checked against config.json, nothing read), then build (the
// tensors loaded in plan order, with progress reports). Objects are only ever returned by value,
// so a failure or cancellation anywhere leaves nothing behind.
//
// Memory: every weight matrix ends up in the backend's weight layout (panel32 on the CPU), a
// copy of the mapped file bytes. So that the load's peak resident set stays near the size of the
// checkpoint instead of mapping + copy, each matrix is written straight into that layout (no
// row-major intermediate that prepare_weights would copy again), and its source pages are
// dropped from this process (SafeTensorsModel::release) as soon as they are copied — expert by
// expert for fused expert tensors. Only tensors used in place (embedding table, norms, biases)
// stay mapped.
#include <charconv>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "autoglm/io/safetensors.hpp"
#include "autoglm/models/model.hpp"
#include "autoglm/quant/checkpoint.hpp"
#include "common/checks.hpp"
#include "models/weight_sources.hpp"

namespace autoglm {
namespace {

constexpr std::string_view kFn = "load_model";

/// The checkpoint plus the list of tensors the model needs, checked before anything is read.
class Checkpoint {
 public:
  Checkpoint(Backend& backend, SafeTensorsModel st, std::string dir,
             const std::function<bool(const LoadProgress&)>* progress,
             std::optional<QuantSpec> int8 = std::nullopt,
             WeightStorage storage = WeightStorage::as_stored)
      : backend_(backend),
        st_(std::move(st)),
        dir_(std::move(dir)),
        progress_(progress),
        int8_(int8),
        storage_(storage) {}

  bool has(const std::string& name) const { return st_.find(name) != nullptr; }
  /// True when `name` is stored as int8 (an autoglm int8 checkpoint's quantized weight).
  bool is_int8(const std::string& name) const {
    const TensorInfo* i = st_.find(name);
    return i && i->dtype == DType::i8;
  }
  const SafeTensorsModel& st() const noexcept { return st_; }

  /// Plans `name` with shape `want`; `what` says what needs it (for messages).
  void need(const std::string& name, const Shape& want, std::string_view what) {
    const TensorInfo* info = st_.find(name);
    if (!info)
      detail::fail(ErrorCode::not_found, kFn, "{}: tensor '{}' ({}) is missing from the checkpoint",
                   dir_, name, what);
    const std::string& file = st_.file_of(name).source();
    if (info->dtype == DType::i8) {
      need_int8(*info, file, want, what);
      return;
    }
    if (has(col_scale_name(name)))
      detail::fail(ErrorCode::invalid_argument, kFn,
                   "{}: tensor '{}' has column scales ('{}') but is not I8", file, name,
                   col_scale_name(name));
    if (!info->dtype || !is_float_dtype(*info->dtype))
      detail::fail(ErrorCode::unsupported, kFn,
                   "{}: tensor '{}' has dtype {}; only F32, F16 and BF16 weights are supported",
                   file, name, info->dtype_tag);
    if (!info->shape || !(*info->shape == want))
      detail::fail(ErrorCode::shape_mismatch, kFn,
                   "{}: tensor '{}' ({}) has shape [{}], but config.json implies {}", file, name,
                   what, fmt::join(info->extents, ", "), want.str());
    progress_state_.tensors_total += 1;
    progress_state_.bytes_total += info->nbytes;
  }

  /// Checks an int8 weight and its scale tensor against the expected shape.
  void need_int8(const TensorInfo& info, const std::string& file, const Shape& want,
                 std::string_view what) {
    const std::string& name = info.name;
    if (!int8_)
      detail::fail(ErrorCode::unsupported, kFn,
                   "{}: tensor '{}' is I8, but config.json has no quantization_config with "
                   "quant_method '{}'",
                   file, name, kAutoglmQuantMethod);
    if (!info.shape || !(*info.shape == want) || want.rank() < 2)
      detail::fail(ErrorCode::shape_mismatch, kFn,
                   "{}: int8 tensor '{}' ({}) has shape [{}], but config.json implies {}", file,
                   name, what, fmt::join(info.extents, ", "), want.str());
    const std::int64_t k = want[want.rank() - 1], group = int8_->group_of(k);
    if (k % group != 0)
      detail::fail(ErrorCode::shape_mismatch, kFn,
                   "{}: int8 tensor '{}' has {} columns, not a multiple of the group {}", file,
                   name, k, group);
    const std::string sn = scale_name(name);
    const TensorInfo* s = st_.find(sn);
    if (!s)
      detail::fail(ErrorCode::not_found, kFn,
                   "{}: scale tensor '{}' of the int8 tensor '{}' is missing", file, sn, name);
    const std::string& sfile = st_.file_of(sn).source();
    if (s->dtype != DType::f32)
      detail::fail(ErrorCode::dtype_mismatch, kFn,
                   "{}: scale tensor '{}' has dtype {}; must be F32", sfile, sn, s->dtype_tag);
    Shape ws = want;
    ws = want.rank() == 2 ? Shape{want[0], k / group} : Shape{want[0], want[1], k / group};
    if (!s->shape || !(*s->shape == ws))
      detail::fail(ErrorCode::shape_mismatch, kFn,
                   "{}: scale tensor '{}' has shape [{}], but {} with {} needs {}", sfile, sn,
                   fmt::join(s->extents, ", "), name, int8_->scheme_name(), ws.str());
    progress_state_.tensors_total += 2;
    progress_state_.bytes_total += info.nbytes + s->nbytes;
    const std::string cn = col_scale_name(name);
    if (const TensorInfo* c = st_.find(cn)) {
      const std::string& cfile = st_.file_of(cn).source();
      const Shape wc = want.rank() == 2 ? Shape{k} : Shape{want[0], k};
      if (c->dtype != DType::f32)
        detail::fail(ErrorCode::dtype_mismatch, kFn,
                     "{}: column-scale tensor '{}' has dtype {}; must be F32", cfile, cn,
                     c->dtype_tag);
      if (!c->shape || !(*c->shape == wc))
        detail::fail(ErrorCode::shape_mismatch, kFn,
                     "{}: column-scale tensor '{}' has shape [{}], but {} needs {}", cfile, cn,
                     fmt::join(c->extents, ", "), name, wc.str());
      progress_state_.tensors_total += 1;
      progress_state_.bytes_total += c->nbytes;
    }
  }

  /// The column scales of the int8 weight `name` on the host (empty when it has none), each
  /// checked finite and > 0.
  std::vector<float> host_col_scales(const std::string& name) {
    const std::string cn = col_scale_name(name);
    if (!st_.find(cn)) return {};
    const HostTensor h = st_.host_view(cn);
    const float* v = h.view.as<const float>();
    std::vector<float> out(v, v + h.view.numel());
    for (std::size_t i = 0; i < out.size(); ++i)
      // quantize clamps to [1/256, 256]; far outside, x * col_scale would overflow or vanish.
      if (!(out[i] >= 0x1p-64f && out[i] <= 0x1p64f))
        detail::fail(ErrorCode::numeric, kFn,
                     "{}: column-scale tensor '{}' holds {} at {}; column scales must be finite "
                     "and > 0 (within [2^-64, 2^64])",
                     st_.file_of(cn).source(), cn, out[i], i);
    report(cn);
    return out;
  }

  /// host_col_scales(name) on the backend, or an undefined tensor; shape [k] or [E, k].
  Tensor take_col_scales(const std::string& name, const Shape& shape) {
    const std::vector<float> cs = host_col_scales(name);
    if (cs.empty()) return Tensor();
    Tensor t(backend_, DType::f32, shape);
    backend_.copy_from_host(t, cs.data());
    st_.release(col_scale_name(name));
    return t;
  }

  /// A planned int8 weight with its scales, row-major (aliasing the mapped file on the CPU).
  QuantizedTensor take_q(const std::string& name) {
    const std::string sn = scale_name(name);
    Tensor data = st_.load(backend_, name, DType::i8);
    Tensor scales = st_.load(backend_, sn, DType::f32);
    report(name);
    report(sn);
    const Shape& ds = data.shape();
    Tensor cs =
        take_col_scales(name, ds.rank() == 2 ? Shape{ds[1]} : Shape{ds[0], ds[ds.rank() - 1]});
    return QuantizedTensor(std::move(data), std::move(scales), *int8_, std::move(cs));
  }

  /// take_q packed for the backend's kernels, the file's pages released.
  QuantizedTensor take_packed(const std::string& name) {
    QuantizedTensor q = backend_.pack_quantized(take_q(name));
    // Row-major int8 on the CPU aliases the mapping; anything else is a copy.
    if (q.is_packed() || backend_.device().kind != DeviceKind::cpu) st_.release(name);
    return q;
  }

  /// An int8 stack [E, N, K] whose matrix e is the row-wise concatenation of the int8
  /// tensors parts[e] (gate then up for a fused gate_up), packed for the backend.
  QuantizedTensor take_q_rows(const std::vector<std::vector<std::string>>& parts,
                              const Shape& shape) {
    const std::int64_t E = shape[0], n = shape[1], k = shape[2];
    const std::int64_t groups = k / int8_->group_of(k);
    Tensor data(backend_, DType::i8, shape);
    Tensor scales(backend_, DType::f32, Shape{E, n, groups});
    // Column scales [E, k]: the parts of one matrix share x, so they must share these too.
    std::vector<float> cs;
    for (std::int64_t e = 0; e < E; ++e) {
      std::int64_t row = 0;
      std::vector<float> matrix_cs;
      const auto& names = parts[static_cast<std::size_t>(e)];
      for (std::size_t p = 0; p < names.size(); ++p) {
        const std::string& name = names[p];
        if (!is_int8(name))
          detail::fail(ErrorCode::dtype_mismatch, kFn,
                       "{}: tensor '{}' is not I8, but the other matrices of its bank are",
                       st_.file_of(name).source(), name);
        std::vector<float> part_cs = host_col_scales(name);
        st_.release(col_scale_name(name));
        if (p == 0)
          matrix_cs = std::move(part_cs);
        else if (part_cs != matrix_cs)
          detail::fail(ErrorCode::invalid_argument, kFn,
                       "{}: int8 tensors '{}' and '{}' are fused into one matrix but have "
                       "different column scales",
                       st_.file_of(name).source(), names[0], name);
        const std::int64_t rows = (*st_.at(name).shape)[0];
        const HostTensor q = st_.host_view(name);
        const HostTensor s = st_.host_view(scale_name(name));
        backend_.copy_from_host(TensorView(data)[e].slice(row, row + rows), q.view.data);
        backend_.copy_from_host(TensorView(scales)[e].slice(row, row + rows), s.view.data);
        st_.release(name);
        report(name);
        report(scale_name(name));
        row += rows;
      }
      if (!matrix_cs.empty()) {
        if (cs.empty()) cs.assign(static_cast<std::size_t>(E * k), 1.0f);
        std::copy(matrix_cs.begin(), matrix_cs.end(), cs.begin() + e * k);
      }
    }
    Tensor col_scales;
    if (!cs.empty()) {
      col_scales = Tensor(backend_, DType::f32, Shape{E, k});
      backend_.copy_from_host(col_scales, cs.data());
    }
    return backend_.pack_quantized(
        QuantizedTensor(std::move(data), std::move(scales), *int8_, std::move(col_scales)));
  }

  /// Loads a planned tensor as f32 (aliasing the mapped file when it already is f32), for
  /// tensors used as they are (embedding table, norms, biases).
  Tensor take(const std::string& name) {
    Tensor t = st_.load(backend_, name, DType::f32);
    report(name);
    return t;
  }

  /// A planned embedding table, row-major, in matrix_dtype (aliasing the mapped file when
  /// stored so): looked up row by row, never copied whole.
  Tensor take_table(const std::string& name) {
    Tensor t = st_.load(backend_, name, matrix_dtype({name}));
    report(name);
    return t;
  }

  /// Layout of the weight matrices the consumers would otherwise re-lay out (prepare_weights).
  Layout weight_layout() const noexcept { return backend_.weight_layout(); }

  /// The dtype a weight matrix built from the planned float tensors `names` is kept in: their
  /// common stored dtype when it is bf16 / f16, WeightStorage::as_stored asks for it and the
  /// backend computes with it (then it is exact: the kernels widen it); else f32.
  DType matrix_dtype(const std::vector<std::string>& names) const {
    if (storage_ != WeightStorage::as_stored || names.empty()) return DType::f32;
    const DType dt = *st_.at(names[0]).dtype;
    for (const std::string& n : names)
      if (*st_.at(n).dtype != dt) return DType::f32;
    return backend_.supports_weight_dtype(dt) ? dt : DType::f32;
  }

  /// A planned weight matrix: int8 packed for the kernels when stored as int8, else in the
  /// backend's weight layout as matrix_dtype says, its source pages released. With a row-major
  /// backend the float case is take() (f32, in place when stored so). `f32`: widened whatever
  /// matrix_dtype says.
  Weight take_weight(const std::string& name, bool f32 = false) {
    if (is_int8(name)) return take_packed(name);
    if (weight_layout() == Layout::row_major) return take(name);
    Tensor out(backend_, f32 ? DType::f32 : matrix_dtype({name}), *st_.at(name).shape,
               weight_layout());
    take_into(name, out);
    return out;
  }

  /// Copies a planned tensor into dst (converting from its stored dtype; dst row-major with
  /// the same element count, or in another layout with the same shape), then releases the
  /// source pages.
  void take_into(const std::string& name, TensorView dst) {
    const TensorInfo& info = st_.at(name);
    if (dst.layout == Layout::row_major) {
      const Tensor src = st_.load(backend_, name, *info.dtype);
      backend_.convert(TensorView(src).reshaped(dst.shape), dst);
    } else {
      // relayout keeps the dtype: in place when stored as dst's dtype, else a converted
      // temporary.
      const Tensor src = st_.load(backend_, name, dst.dtype);
      backend_.relayout(src, dst);
    }
    st_.release(name);
    report(name);
  }

  /// A planned stack [E, N, K] in the backend's weight layout, re-laid out one matrix at a
  /// time with each matrix's source pages released right after it is copied, so a fused
  /// expert tensor (GBs) is never resident twice.
  Tensor take_stack(const std::string& name) {
    if (weight_layout() == Layout::row_major) return take(name);
    const TensorInfo& info = st_.at(name);
    const Shape shape = *info.shape;
    Tensor out(backend_, matrix_dtype({name}), shape, weight_layout());
    if (backend_.device().kind == DeviceKind::cpu && shape[0] > 0) {
      // The stored bytes (mapped, or an aligned copy), one matrix at a time; a 16-bit stack
      // widened to f32 goes through one f32 matrix reused for the whole stack.
      const HostTensor src = st_.host_view(name);
      Tensor wide;
      if (*info.dtype != out.dtype())
        wide = Tensor(backend_, out.dtype(), Shape{shape[1], shape[2]});
      const std::size_t per = info.nbytes / static_cast<std::size_t>(shape[0]);
      for (std::int64_t e = 0; e < shape[0]; ++e) {
        const TensorView m = src.view[e];
        if (wide.defined()) {
          backend_.convert(m, wide);
          backend_.relayout(wide, TensorView(out)[e]);
        } else {
          backend_.relayout(m, TensorView(out)[e]);
        }
        st_.release(name, static_cast<std::size_t>(e) * per, static_cast<std::size_t>(e + 1) * per);
      }
    } else {  // device memory: one converted staging tensor
      const Tensor src = st_.load(backend_, name, out.dtype());
      backend_.relayout(src, out);
      st_.release(name);
    }
    report(name);
    return out;
  }

  /// take_stack, or take_packed for an int8 stack.
  Weight take_stack_weight(const std::string& name) {
    return is_int8(name) ? Weight(take_packed(name)) : Weight(take_stack(name));
  }

  /// The first report (nothing loaded yet).
  void start() { call(); }

 private:
  void report(const std::string& name) {
    const TensorInfo& info = st_.at(name);
    progress_state_.tensors_done += 1;
    progress_state_.bytes_done += info.nbytes;
    progress_state_.tensor = name;
    call();
  }
  void call() {
    if (progress_ && *progress_ && !(*progress_)(progress_state_))
      detail::fail(ErrorCode::cancelled, kFn,
                   "{}: cancelled by the progress callback after {} of {} tensors", dir_,
                   progress_state_.tensors_done, progress_state_.tensors_total);
  }

  Backend& backend_;
  SafeTensorsModel st_;
  std::string dir_;
  const std::function<bool(const LoadProgress&)>* progress_;
  LoadProgress progress_state_;
  std::optional<QuantSpec> int8_;
  WeightStorage storage_;
};

/// Expert tensors of one MoE layer, in either layout.
struct ExpertNames {
  bool fused = false;
  std::string gate_up, down;                 // fused [E, 2I, d], [E, d, I]
  std::vector<std::string> gate, up, downs;  // per expert [I, d], [I, d], [d, I]
};

/// A SwiGLU MLP stored as three matrices (shared expert, dense layer).
struct MlpNames {
  std::string gate, up, down;
  bool defined() const noexcept { return !gate.empty(); }
};

/// Every tensor name of one decoder layer (empty: absent).
struct LayerNames {
  std::string in_norm, post_norm;
  // GQA
  std::string q, k, v, o, q_bias, k_bias, v_bias, o_bias, q_norm, k_norm;
  // MLA
  std::string q_a, q_a_bias, q_a_norm, q_b, kv_a, kv_a_bias, kv_a_norm, kv_b;
  // FFN
  bool moe = false;
  std::string router, selection_bias, shared_gate;
  ExpertNames experts;
  MlpNames shared, dense;
};

/// Plans one decoder layer: resolves names for the checkpoint's layout, checks every tensor.
LayerNames plan_layer(Checkpoint& ck, const ModelConfig& c, int i) {
  const FamilyTraits tr = family_traits(c.family);
  const std::string p = fmt::format("model.layers.{}.", i);
  const std::int64_t d = c.hidden_size;
  LayerNames n;
  n.in_norm = p + "input_layernorm.weight";
  n.post_norm = p + "post_attention_layernorm.weight";
  ck.need(n.in_norm, Shape{d}, "input norm");
  ck.need(n.post_norm, Shape{d}, "post-attention norm");
  const std::string a = p + "self_attn.";
  if (tr.attention == AttentionKind::gqa) {
    const std::int64_t Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, D = c.head_dim;
    n.q = a + "q_proj.weight";
    n.k = a + "k_proj.weight";
    n.v = a + "v_proj.weight";
    n.o = a + "o_proj.weight";
    ck.need(n.q, Shape{Hq * D, d}, "q projection");
    ck.need(n.k, Shape{Hkv * D, d}, "k projection");
    ck.need(n.v, Shape{Hkv * D, d}, "v projection");
    ck.need(n.o, Shape{d, Hq * D}, "o projection");
    if (c.qkv_bias) {
      n.q_bias = a + "q_proj.bias";
      n.k_bias = a + "k_proj.bias";
      n.v_bias = a + "v_proj.bias";
      ck.need(n.q_bias, Shape{Hq * D}, "q bias (attention_bias / qkv_bias)");
      ck.need(n.k_bias, Shape{Hkv * D}, "k bias (attention_bias / qkv_bias)");
      ck.need(n.v_bias, Shape{Hkv * D}, "v bias (attention_bias / qkv_bias)");
    }
    if (c.o_proj_bias) {
      n.o_bias = a + "o_proj.bias";
      ck.need(n.o_bias, Shape{d}, "o bias (attention_bias)");
    }
    if (c.qk_norm != QkNorm::none) {
      n.q_norm = a + "q_norm.weight";
      n.k_norm = a + "k_norm.weight";
      const bool whole = c.qk_norm == QkNorm::whole;
      ck.need(n.q_norm, whole ? Shape{Hq * D} : Shape{D}, "q norm");
      ck.need(n.k_norm, whole ? Shape{Hkv * D} : Shape{D}, "k norm");
    }
  } else {
    const std::int64_t H = c.num_attention_heads, qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
    const std::int64_t kvr = c.kv_lora_rank, rope = c.qk_rope_head_dim;
    if (c.q_lora_rank > 0) {
      n.q_a = a + "q_a_proj.weight";
      n.q_a_norm = a + "q_a_layernorm.weight";
      n.q_b = a + "q_b_proj.weight";
      ck.need(n.q_a, Shape{c.q_lora_rank, d}, "q LoRA down projection");
      ck.need(n.q_a_norm, Shape{c.q_lora_rank}, "q LoRA norm");
      ck.need(n.q_b, Shape{H * qk, c.q_lora_rank}, "q LoRA up projection");
      if (c.qkv_bias) {
        n.q_a_bias = a + "q_a_proj.bias";
        ck.need(n.q_a_bias, Shape{c.q_lora_rank}, "q_a bias (attention_bias)");
      }
    } else {
      n.q = a + "q_proj.weight";
      ck.need(n.q, Shape{H * qk, d}, "q projection (q_lora_rank null)");
    }
    n.kv_a = a + "kv_a_proj_with_mqa.weight";
    n.kv_a_norm = a + "kv_a_layernorm.weight";
    n.kv_b = a + "kv_b_proj.weight";
    n.o = a + "o_proj.weight";
    ck.need(n.kv_a, Shape{kvr + rope, d}, "kv latent projection");
    ck.need(n.kv_a_norm, Shape{kvr}, "kv latent norm");
    ck.need(n.kv_b, Shape{H * (c.qk_nope_head_dim + c.v_head_dim), kvr}, "kv up projection");
    ck.need(n.o, Shape{d, H * c.v_head_dim}, "o projection");
    if (c.qkv_bias) {
      n.kv_a_bias = a + "kv_a_proj_with_mqa.bias";
      ck.need(n.kv_a_bias, Shape{kvr + rope}, "kv_a bias (attention_bias)");
    }
    if (c.o_proj_bias) {
      n.o_bias = a + "o_proj.bias";
      ck.need(n.o_bias, Shape{d}, "o bias (attention_bias)");
    }
  }

  n.moe = c.is_moe_layer(i);
  const std::string mlp = p + std::string(tr.moe_block) + ".";
  if (!n.moe) {
    n.dense = {mlp + "gate_proj.weight", mlp + "up_proj.weight", mlp + "down_proj.weight"};
    if (!ck.has(n.dense.gate) && ck.has(mlp + "gate.weight"))
      detail::fail(ErrorCode::invalid_argument, kFn,
                   "{}: config.json makes layer {} a dense MLP, but the checkpoint holds a MoE "
                   "router '{}'",
                   ck.st().file_of(mlp + "gate.weight").source(), i, mlp + "gate.weight");
    const std::int64_t F = c.intermediate_size;
    ck.need(n.dense.gate, Shape{F, d}, "dense MLP gate (intermediate_size)");
    ck.need(n.dense.up, Shape{F, d}, "dense MLP up (intermediate_size)");
    ck.need(n.dense.down, Shape{d, F}, "dense MLP down (intermediate_size)");
    return n;
  }

  const std::int64_t E = c.num_experts, I = c.moe_intermediate_size;
  // Find the expert block and layout: Mixtral Hub names first, then transformers 5 / Hub "mlp".
  std::vector<std::string> blocks;
  if (!tr.hub_moe_block.empty()) blocks.push_back(p + std::string(tr.hub_moe_block) + ".");
  blocks.push_back(mlp);
  std::string blk;
  std::string gname = "gate_proj", uname = "up_proj", dname = "down_proj";
  for (const std::string& b : blocks) {
    if (ck.has(b + "experts.gate_up_proj")) {
      blk = b;
      n.experts.fused = true;
      break;
    }
    if (ck.has(b + "experts.0.gate_proj.weight")) {
      blk = b;
      break;
    }
    if (ck.has(b + "experts.0.w1.weight")) {
      blk = b;
      gname = "w1";
      uname = "w3";
      dname = "w2";
      break;
    }
  }
  if (blk.empty()) {
    if (ck.has(mlp + "gate_proj.weight"))
      detail::fail(ErrorCode::invalid_argument, kFn,
                   "{}: config.json makes layer {} a MoE layer, but the checkpoint holds a dense "
                   "MLP '{}'",
                   ck.st().file_of(mlp + "gate_proj.weight").source(), i, mlp + "gate_proj.weight");
    detail::fail(ErrorCode::not_found, kFn,
                 "tensor '{}experts.gate_up_proj' / '{}experts.0.gate_proj.weight'{} (layer {} "
                 "experts) is missing from the checkpoint",
                 mlp, mlp,
                 tr.hub_moe_block.empty()
                     ? std::string()
                     : fmt::format(" / '{}experts.0.w1.weight'", blocks.front()),
                 i);
  }
  if (!n.experts.fused) {
    const std::string extra = fmt::format("{}experts.{}.{}.weight", blk, E, gname);
    if (ck.has(extra))
      detail::fail(ErrorCode::invalid_argument, kFn,
                   "{}: the checkpoint holds '{}', but config.json says num_experts={}",
                   ck.st().file_of(extra).source(), extra, E);
  }
  n.router = blk + "gate.weight";
  ck.need(n.router, Shape{E, d}, "router (num_experts)");
  if (tr.selection_bias) {
    n.selection_bias = blk + "gate.e_score_correction_bias";
    ck.need(n.selection_bias, Shape{E}, "selection bias");
  }
  if (n.experts.fused) {
    n.experts.gate_up = blk + "experts.gate_up_proj";
    n.experts.down = blk + "experts.down_proj";
    ck.need(n.experts.gate_up, Shape{E, 2 * I, d}, "fused experts (num_experts, expert width)");
    ck.need(n.experts.down, Shape{E, d, I}, "fused experts (num_experts, expert width)");
  } else {
    for (std::int64_t e = 0; e < E; ++e) {
      const std::string ep = fmt::format("{}experts.{}.", blk, e);
      n.experts.gate.push_back(ep + gname + ".weight");
      n.experts.up.push_back(ep + uname + ".weight");
      n.experts.downs.push_back(ep + dname + ".weight");
      ck.need(n.experts.gate.back(), Shape{I, d}, "expert gate (expert width)");
      ck.need(n.experts.up.back(), Shape{I, d}, "expert up (expert width)");
      ck.need(n.experts.downs.back(), Shape{d, I}, "expert down (expert width)");
    }
  }
  if (!tr.shared_block.empty() && c.shared_expert_intermediate_size > 0) {
    const std::string sp = mlp + std::string(tr.shared_block) + ".";
    const std::int64_t S = c.shared_expert_intermediate_size;
    n.shared = {sp + "gate_proj.weight", sp + "up_proj.weight", sp + "down_proj.weight"};
    ck.need(n.shared.gate, Shape{S, d}, "shared expert gate (shared width)");
    ck.need(n.shared.up, Shape{S, d}, "shared expert up (shared width)");
    ck.need(n.shared.down, Shape{d, S}, "shared expert down (shared width)");
    if (tr.shared_gate && c.shared_expert_gate) {
      n.shared_gate = mlp + "shared_expert_gate.weight";
      ck.need(n.shared_gate, Shape{1, d}, "shared expert gate");
    }
  }
  return n;
}

Tensor optional(Checkpoint& ck, const std::string& name) {
  return name.empty() ? Tensor() : ck.take(name);
}

/// optional() for a weight matrix: in the backend's weight layout (Checkpoint::take_weight).
Weight optional_weight(Checkpoint& ck, const std::string& name) {
  return name.empty() ? Weight() : ck.take_weight(name);
}

/// Gate and up [F, d] each into dst = gate_up[e] ([2F, d], gate rows first). A panel32 matrix
/// cannot be sliced by rows, so with another weight layout both go through `scratch` (a
/// row-major [2F, d] reused across experts) and are re-laid out together.
void take_gate_up(Backend& b, Checkpoint& ck, const std::string& gate, const std::string& up,
                  TensorView dst, Tensor& scratch) {
  const std::int64_t F = dst.dim(0) / 2;
  if (dst.layout == Layout::row_major) {
    ck.take_into(gate, dst.slice(0, F));
    ck.take_into(up, dst.slice(F, 2 * F));
    return;
  }
  if (!scratch.defined()) scratch = Tensor(b, dst.dtype, dst.shape);
  ck.take_into(gate, TensorView(scratch).slice(0, F));
  ck.take_into(up, TensorView(scratch).slice(F, 2 * F));
  b.relayout(scratch, dst);
}

/// [1, 2F, d] / [1, d, F] bank of a three-matrix MLP, in the backend's weight layout.
SwiGluExperts build_mlp(Backend& b, Checkpoint& ck, const MlpNames& n, std::int64_t d,
                        std::int64_t F) {
  if (ck.is_int8(n.gate))
    return SwiGluExperts(ck.take_q_rows({{n.gate, n.up}}, Shape{1, 2 * F, d}),
                         ck.take_q_rows({{n.down}}, Shape{1, d, F}));
  Tensor gu(b, ck.matrix_dtype({n.gate, n.up}), Shape{1, 2 * F, d}, ck.weight_layout());
  Tensor dn(b, ck.matrix_dtype({n.down}), Shape{1, d, F}, ck.weight_layout());
  Tensor scratch;
  take_gate_up(b, ck, n.gate, n.up, TensorView(gu)[0], scratch);
  ck.take_into(n.down, TensorView(dn)[0]);
  return SwiGluExperts(std::move(gu), std::move(dn));
}

DecoderLayer build_layer(Backend& b, Checkpoint& ck, const ModelConfig& c, const LayerNames& n) {
  const std::int64_t d = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  Tensor in_norm = ck.take(n.in_norm);
  Tensor post_norm = ck.take(n.post_norm);
  const RopeParams rope{0, c.rotary_dim(), c.rope_interleave,
                        static_cast<float>(c.rope_attention_factor())};
  const AttentionParams attn{static_cast<float>(c.attention_scale()), true, c.sliding_window};
  AttentionBlock attention = [&]() -> AttentionBlock {
    if (family_traits(c.family).attention == AttentionKind::gqa) {
      GqaWeights w;
      w.q_proj = ck.take_weight(n.q);
      w.k_proj = ck.take_weight(n.k);
      w.v_proj = ck.take_weight(n.v);
      w.o_proj = ck.take_weight(n.o);
      w.q_bias = optional(ck, n.q_bias);
      w.k_bias = optional(ck, n.k_bias);
      w.v_bias = optional(ck, n.v_bias);
      w.o_bias = optional(ck, n.o_bias);
      w.q_norm = optional(ck, n.q_norm);
      w.k_norm = optional(ck, n.k_norm);
      GqaOptions o;
      o.heads = c.num_attention_heads;
      o.kv_heads = c.num_key_value_heads;
      o.head_dim = c.head_dim;
      o.qk_norm = c.qk_norm;
      o.norm_eps = eps;
      if (c.clip_qkv) o.clip_qkv = static_cast<float>(*c.clip_qkv);
      o.rope = rope;
      o.attention = attn;
      return GqaAttention(std::move(w), o);
    }
    MlaWeights w;
    w.q_proj = optional_weight(ck, c.q_lora_rank > 0 ? std::string() : n.q);
    w.q_a_proj = optional_weight(ck, n.q_a);
    w.q_a_bias = optional(ck, n.q_a_bias);
    w.q_a_norm = optional(ck, n.q_a_norm);
    w.q_b_proj = optional_weight(ck, n.q_b);
    w.kv_a_proj = ck.take_weight(n.kv_a);
    w.kv_a_bias = optional(ck, n.kv_a_bias);
    w.kv_a_norm = ck.take(n.kv_a_norm);
    w.kv_b_proj = ck.take_weight(n.kv_b);
    w.o_proj = ck.take_weight(n.o);
    w.o_bias = optional(ck, n.o_bias);
    MlaOptions o;
    o.heads = c.num_attention_heads;
    o.q_lora_rank = c.q_lora_rank;
    o.kv_lora_rank = c.kv_lora_rank;
    o.nope_dim = c.qk_nope_head_dim;
    o.rope_dim = c.qk_rope_head_dim;
    o.v_dim = c.v_head_dim;
    o.latent_eps = 1e-6f;  // transformers' class default for q_a/kv_a_layernorm
    o.interleaved = c.rope_interleave;
    o.rope_attention_factor = rope.attention_factor;
    o.attention = attn;
    return MlaAttention(std::move(w), o);
  }();

  FeedForward ffn = [&]() -> FeedForward {
    if (!n.moe) return DenseMlp(build_mlp(b, ck, n.dense, d, c.intermediate_size));
    const std::int64_t E = c.num_experts, I = c.moe_intermediate_size;
    // The router stays f32 (it is small): with CpuBackendOptions::bf16_compute a bf16 router
    // would round its activations too, and the top-k choice is discontinuous in the logits.
    Weight router = ck.take_weight(n.router, /*f32=*/true);
    Tensor bias = optional(ck, n.selection_bias);
    Weight gu, dn;
    if (n.experts.fused) {
      gu = ck.take_stack_weight(n.experts.gate_up);
      dn = ck.take_stack_weight(n.experts.down);
    } else if (ck.is_int8(n.experts.gate[0])) {
      std::vector<std::vector<std::string>> gate_up, down;
      for (std::int64_t e = 0; e < E; ++e) {
        gate_up.push_back({n.experts.gate[e], n.experts.up[e]});
        down.push_back({n.experts.downs[e]});
      }
      gu = ck.take_q_rows(gate_up, Shape{E, 2 * I, d});
      dn = ck.take_q_rows(down, Shape{E, d, I});
    } else {
      // Written straight into the weight layout, one expert at a time (see the file comment).
      std::vector<std::string> gate_up = n.experts.gate;
      gate_up.insert(gate_up.end(), n.experts.up.begin(), n.experts.up.end());
      Tensor gu_bank(b, ck.matrix_dtype(gate_up), Shape{E, 2 * I, d}, ck.weight_layout());
      Tensor dn_bank(b, ck.matrix_dtype(n.experts.downs), Shape{E, d, I}, ck.weight_layout());
      Tensor scratch;
      for (std::int64_t e = 0; e < E; ++e) {
        take_gate_up(b, ck, n.experts.gate[e], n.experts.up[e], TensorView(gu_bank)[e], scratch);
        ck.take_into(n.experts.downs[e], TensorView(dn_bank)[e]);
      }
      gu = std::move(gu_bank);
      dn = std::move(dn_bank);
    }
    GateNetwork gate(std::move(router), std::move(bias), c.gate_options());
    SwiGluExperts experts(std::move(gu), std::move(dn));
    if (!n.shared.defined()) return MoEBlock(std::move(gate), std::move(experts));
    SwiGluExperts mlp = build_mlp(b, ck, n.shared, d, c.shared_expert_intermediate_size);
    Tensor sgate = optional(ck, n.shared_gate);
    return MoEBlock(std::move(gate), std::move(experts),
                    WeightedSumAggregator(SharedExpert(std::move(mlp), std::move(sgate))));
  }();
  return DecoderLayer(std::move(in_norm), std::move(post_norm), eps, std::move(attention),
                      std::move(ffn));
}

/// Rejects decoder layers the config does not know about (MTP layers are allowed).
void check_layer_count(const Checkpoint& ck, const ModelConfig& c) {
  const std::int64_t limit = c.num_hidden_layers + c.num_nextn_predict_layers;
  constexpr std::string_view prefix = "model.layers.";
  for (const std::string& name : ck.st().names()) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    std::int64_t layer = -1;
    const char* first = name.data() + prefix.size();
    const char* last = name.data() + name.size();
    const auto [ptr, ec] = std::from_chars(first, last, layer);
    if (ec != std::errc() || ptr == first || ptr == last || *ptr != '.') continue;
    if (layer >= limit)
      detail::fail(ErrorCode::invalid_argument, kFn,
                   "{}: the checkpoint holds '{}', but config.json has num_hidden_layers={} and "
                   "num_nextn_predict_layers={}",
                   ck.st().file_of(name).source(), name, c.num_hidden_layers,
                   c.num_nextn_predict_layers);
  }
}

}  // namespace

Model load_model(Backend& backend, const std::filesystem::path& dir, const LoadOptions& options) {
  ModelConfig c = load_model_config(dir);
  if (options.fidelity) c.fidelity = *options.fidelity;
  AUTOGLM_CHECK(c.quantization.method.empty() || c.quantization.method == kAutoglmQuantMethod,
                unsupported, kFn,
                "{}: quantised checkpoints (quant_method '{}') are not supported; use an F32, "
                "F16 or BF16 checkpoint, or one written by quantize_checkpoint ('{}')",
                c.source, c.quantization.method, kAutoglmQuantMethod);
  AUTOGLM_CHECK(c.num_hidden_layers >= 1, invalid_argument, kFn,
                "{}: num_hidden_layers={} must be >= 1", c.source, c.num_hidden_layers);
  SafeTensorsModel st = SafeTensorsModel::open(dir);
  std::optional<QuantSpec> int8;
  if (!c.quantization.method.empty()) {
    const auto& md = st.metadata();
    const auto scheme = md.find("autoglm.quant"), mode = md.find("autoglm.activations");
    AUTOGLM_CHECK(scheme != md.end() && mode != md.end(), not_found, kFn,
                  "{}: an '{}' checkpoint needs autoglm.quant and autoglm.activations in its "
                  "safetensors metadata",
                  dir.string(), kAutoglmQuantMethod);
    int8 = QuantSpec::parse(scheme->second, mode->second);
  }
  if (options.quantize) detail::check_tied_parts(kFn, c.tie_word_embeddings, *options.quantize);
  AUTOGLM_CHECK(!(int8 && options.quantize), invalid_argument, kFn,
                "{}: LoadOptions::quantize was set, but the checkpoint is already int8 ({})",
                dir.string(), int8 ? int8->scheme_name() : std::string());
  Checkpoint ck(backend, std::move(st), dir.string(),
                options.progress ? &options.progress : nullptr, int8, options.weights);
  check_layer_count(ck, c);

  // Plan: every name, dtype and shape, before any weight is read.
  const std::int64_t V = c.vocab_size, d = c.hidden_size;
  const std::string embed = "model.embed_tokens.weight", norm = "model.norm.weight";
  ck.need(embed, Shape{V, d}, "token embeddings (vocab_size, hidden_size)");
  std::vector<LayerNames> names;
  for (int i = 0; i < static_cast<int>(c.num_hidden_layers); ++i)
    names.push_back(plan_layer(ck, c, i));
  ck.need(norm, Shape{d}, "final norm");
  const std::string head_name = "lm_head.weight";
  if (!c.tie_word_embeddings) {
    if (!ck.has(head_name))
      detail::fail(ErrorCode::not_found, kFn,
                   "{}: tensor '{}' is missing and config.json does not set tie_word_embeddings",
                   dir.string(), head_name);
    ck.need(head_name, Shape{V, d}, "LM head (vocab_size, hidden_size)");
  }

  // Build, in plan order.
  ck.start();
  // An int8 table stays row-major (looked up row by row) and aliases the mapped file.
  if (ck.has(col_scale_name(embed)))
    detail::fail(ErrorCode::unsupported, kFn,
                 "{}: the embedding table '{}' has column scales ('{}'); a looked-up table must "
                 "have none",
                 dir.string(), embed, col_scale_name(embed));
  const Weight table = ck.is_int8(embed) ? Weight(ck.take_q(embed)) : Weight(ck.take_table(embed));
  std::vector<DecoderLayer> layers;
  layers.reserve(names.size());
  for (const LayerNames& n : names) {
    DecoderLayer layer = build_layer(backend, ck, c, n);
    // Quantizing here frees this layer's f32 weights before the next one is read.
    layers.push_back(options.quantize ? layer.quantized(backend, *options.quantize)
                                      : std::move(layer));
  }
  Tensor final_norm = ck.take(norm);
  // Tied: the head is a re-laid-out (or packed) copy of the table; the table's pages that copy
  // touches are released afterwards (the embedding faults back only the rows it looks up).
  Weight head;
  if (!c.tie_word_embeddings) {
    head = ck.take_weight(head_name);
  } else if (table.is_quantized()) {
    head = backend.pack_quantized(table.quantized());
    ck.st().release(embed);
  } else {
    head = table;
    // The head is the table in the weight layout, re-laid out from the table itself (which
    // holds the dtype matrix_dtype chose), then the table's file pages are released.
    if (ck.weight_layout() != Layout::row_major) {
      head = prepare_weights(backend, table.tensor());
      ck.st().release(embed);
    }
  }
  const float eps = static_cast<float>(c.rms_norm_eps);
  Model model(backend, std::move(c), EmbeddingEncoder(std::move(table)), std::move(layers),
              LmHeadDecoder(std::move(final_norm), std::move(head), eps));
  // The layers are int8 already (quantize_weight keeps int8 weights): this does the
  // embeddings and the head as the config says.
  if (options.quantize) return quantize_model(model, *options.quantize);
  return model;
}

}  // namespace autoglm

namespace autoglm::detail {

std::map<std::string, WeightRows> decoder_weight_sources(const Model& model,
                                                         const std::filesystem::path& dir) {
  constexpr std::string_view fn = "save_quantized";
  const ModelConfig c = load_model_config(dir);
  const ModelConfig& mc = model.config();
  const auto sizes = [](const ModelConfig& x) {
    return std::vector<std::int64_t>{static_cast<std::int64_t>(x.family),
                                     x.vocab_size,
                                     x.hidden_size,
                                     x.num_hidden_layers,
                                     x.num_attention_heads,
                                     x.num_key_value_heads,
                                     x.head_dim,
                                     x.intermediate_size,
                                     x.moe_intermediate_size,
                                     x.num_experts,
                                     x.num_experts_per_tok,
                                     x.shared_expert_intermediate_size};
  };
  AUTOGLM_CHECK(sizes(c) == sizes(mc) && c.num_hidden_layers == model.num_layers(),
                invalid_argument, fn,
                "{}: the checkpoint's config (sizes {}) is not the model's ({}, from {})",
                dir.string(), fmt::join(sizes(c), ","), fmt::join(sizes(mc), ","), mc.source);
  Checkpoint ck(model.backend(), SafeTensorsModel::open(dir), dir.string(), nullptr, std::nullopt,
                WeightStorage::as_stored);
  std::map<std::string, WeightRows> out;
  const auto put = [&](const std::string& name, const Weight& w, std::int64_t matrix = -1,
                       std::int64_t row0 = 0, std::int64_t rows = 0) {
    if (!name.empty() && !w.empty()) out[name] = WeightRows{&w, matrix, row0, rows};
  };
  // A gate / up / down triple of one expert (or a shared / dense MLP): gate rows first.
  const auto put_swiglu = [&](const std::string& gate, const std::string& up,
                              const std::string& down, const SwiGluExperts& x, std::int64_t e) {
    put(gate, x.gate_up(), e, 0, x.ffn());
    put(up, x.gate_up(), e, x.ffn(), x.ffn());
    put(down, x.down(), e, 0, x.hidden());
  };
  for (int i = 0; i < static_cast<int>(c.num_hidden_layers); ++i) {
    const LayerNames n = plan_layer(ck, c, i);
    const DecoderLayer& l = model.layers()[static_cast<std::size_t>(i)];
    const bool gqa = family_traits(c.family).attention == AttentionKind::gqa;
    AUTOGLM_CHECK(gqa == std::holds_alternative<GqaAttention>(l.attention()) && n.moe == l.is_moe(),
                  invalid_argument, fn,
                  "{}: layer {} of the model does not have the checkpoint's attention / FFN kind",
                  dir.string(), i);
    if (const auto* g = std::get_if<GqaAttention>(&l.attention())) {
      const GqaWeights& w = g->weights();
      put(n.q, w.q_proj);
      put(n.k, w.k_proj);
      put(n.v, w.v_proj);
      put(n.o, w.o_proj);
    } else {
      const MlaWeights& w = std::get<MlaAttention>(l.attention()).weights();
      put(n.q, w.q_proj);
      put(n.q_a, w.q_a_proj);
      put(n.q_b, w.q_b_proj);
      put(n.kv_a, w.kv_a_proj);
      put(n.kv_b, w.kv_b_proj);
      put(n.o, w.o_proj);
    }
    if (!n.moe) {
      put_swiglu(n.dense.gate, n.dense.up, n.dense.down, std::get<DenseMlp>(l.ffn()).mlp(), 0);
      continue;
    }
    const MoEBlock& m = std::get<MoEBlock>(l.ffn());
    put(n.router, m.gate().weight());
    const SwiGluExperts& x = m.experts();
    if (n.experts.fused) {
      put(n.experts.gate_up, x.gate_up());
      put(n.experts.down, x.down());
    } else {
      for (std::size_t e = 0; e < n.experts.gate.size(); ++e)
        put_swiglu(n.experts.gate[e], n.experts.up[e], n.experts.downs[e], x,
                   static_cast<std::int64_t>(e));
    }
    if (n.shared.defined()) {
      AUTOGLM_CHECK(m.aggregator().shared().has_value(), invalid_argument, fn,
                    "{}: layer {} of the model has no shared expert", dir.string(), i);
      put_swiglu(n.shared.gate, n.shared.up, n.shared.down, m.aggregator().shared()->mlp(), 0);
    }
  }
  return out;
}

}  // namespace autoglm::detail
