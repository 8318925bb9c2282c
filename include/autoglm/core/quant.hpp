// SPDX-License-Identifier: Apache-2.0
// INT8 weights: quantization schemes as types, the QuantizedTensor that holds int8 data with its
// scales, and Weight, the operand of a linear layer (an f32 Tensor or a QuantizedTensor).
//
// Symmetric int8: for each output row n and group g of `group` input columns,
//   scale[n, g] = f * max |w[n, c]| / 127 over c in the group, q[n, c] = round(w[n, c] / scale)
// (within [-127, 127]), and w is read back as q * scale. f is 1, or with
// QuantSpec::search_scales the one of 1 + 0.005 j (0 <= j <= 40) whose codes give the group
// the least squared rounding error. A group whose largest |w| is below 1e-30 (all zero, or
// negligible) gets scale 0 and codes 0, never a division.
//
// Column equalisation (QuantSpec::equalize): the quantizer may first divide each input column c
// of a matrix by a scale col_scale[c] > 0 chosen from the weights' own statistics, so that a
// few columns of large weights no longer set every row's scale; the kernels then multiply the
// activations by col_scale (w x = (w / col_scale) (col_scale x)), and w is read back as
// q * scale * col_scale[c].
#pragma once

#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "autoglm/core/tensor.hpp"

namespace autoglm {

/// How activations meet int8 weights.
enum class ActivationMode : std::uint8_t {
  weight_only,  ///< f32 activations; weights dequantised inside the kernel
  w8a8,         ///< activations quantised per token (dynamic, symmetric), int32 accumulation
};

/// Symmetric int8 with one scale per output row.
struct Int8PerChannel {
  /// Input columns per scale; 0 = the whole row.
  static constexpr std::int64_t group_size = 0;
};

/// Symmetric int8 with one scale per G consecutive input columns of each output row.
template <int G>
requires(G == 32 || G == 64 || G == 128) struct Int8Grouped {
  /// Input columns per scale.
  static constexpr std::int64_t group_size = G;
};

/// A quantization scheme type: Int8PerChannel or Int8Grouped<G>.
template <typename S>
concept QuantScheme = requires {
  { S::group_size } -> std::convertible_to<std::int64_t>;
};

/// The runtime form of a scheme plus an activation mode: what a QuantizedTensor and a quantized
/// file record.
struct QuantSpec {
  std::int64_t group = 0;  ///< 0: per channel, else 32, 64 or 128
  /// How the kernels take activations: weight-only by default (the accurate mode; W8A8 is
  /// faster from ~100 tokens per expert up, see docs/quantization.md).
  ActivationMode mode = ActivationMode::weight_only;
  /// Quantizer option: search per-column scales (column equalisation, see above) for each
  /// matrix and keep them where they lower the expected output error; a matrix without large
  /// columns keeps none. What was chosen is recorded per tensor (QuantizedTensor::col_scales,
  /// `<name>_colscale` in a file), so readers of int8 tensors do not depend on this flag.
  bool equalize = true;
  /// Quantizer option: choose each group's scale among 41 candidates from 1 to 1.2 times
  /// max|w| / 127 by the least squared rounding error (weighted by col_scale^2 where the matrix
  /// is equalised), where false takes max|w| / 127 (as GPTQ does per channel, see
  /// docs/quantization.md). It lowers the squared rounding error of
  /// normal weights by ~20 % at g32 and ~2-6 % per channel (docs/quantization.md). Readers do
  /// not depend on it: a file holds the scales chosen.
  bool search_scales = true;

  /// The spec of scheme S.
  template <QuantScheme S>
  static constexpr QuantSpec of(ActivationMode m = ActivationMode::weight_only) noexcept {
    return QuantSpec{S::group_size, m};
  }
  /// "int8_per_channel" or "int8_g64".
  std::string scheme_name() const;
  /// "w8a8" or "weight_only".
  std::string_view mode_name() const noexcept;
  /// Inverse of scheme_name / mode_name; an unknown name is an Error listing the valid ones.
  static QuantSpec parse(std::string_view scheme, std::string_view mode);
  /// Whether o describes the same int8 format: scheme and activation mode, whatever quantizer
  /// options (equalize, search_scales) made it.
  bool same_format(const QuantSpec& o) const noexcept { return group == o.group && mode == o.mode; }
  /// Columns per scale of a row of k columns (k itself per channel).
  std::int64_t group_of(std::int64_t k) const noexcept { return group == 0 ? k : group; }
  friend bool operator==(const QuantSpec&, const QuantSpec&) = default;
};

/// Int8 weights [..., N, K] (a matrix or a stack of expert matrices) with f32 scales
/// [..., N, K / group] and, when equalised, f32 column scales [..., K]. The data is either
/// row-major or packed into its backend's kernel layout (Backend::pack_quantized);
/// Backend::quantized_to_host reads either back row-major. Copies share the buffers.
class QuantizedTensor {
 public:
  QuantizedTensor() = default;
  // data: i8 [..., N, K] row-major; scales: f32 [..., N, K / group]; col_scales: f32 [..., K]
  // or undefined (none); same backend.
  /// Validates dtypes, shapes and the group (it must divide K). The column scales' values are
  /// the caller's to check (the loader does: finite and > 0).
  QuantizedTensor(Tensor data, Tensor scales, QuantSpec spec, Tensor col_scales = Tensor());
  /// A packed tensor: `data` and `aux` in a backend-specific layout (see pack_quantized);
  /// col_scales as in the constructor.
  static QuantizedTensor packed(Shape shape, QuantSpec spec, Tensor data, Tensor scales, Tensor aux,
                                Tensor col_scales = Tensor());

  /// Logical shape [..., N, K].
  const Shape& shape() const noexcept { return shape_; }
  /// Extent i of the logical shape.
  std::int64_t dim(int i) const noexcept { return shape_[i]; }
  /// Scheme and activation mode.
  const QuantSpec& spec() const noexcept { return spec_; }
  /// Input columns per scale.
  std::int64_t group() const noexcept { return spec_.group_of(shape_[shape_.rank() - 1]); }
  /// Scales per row.
  std::int64_t groups() const noexcept {
    const std::int64_t k = shape_[shape_.rank() - 1];
    return k == 0 ? 0 : k / group();
  }
  /// True when data() is in a backend's kernel layout rather than row-major.
  bool is_packed() const noexcept { return packed_; }
  /// Int8 data (row-major [..., N, K] unless packed).
  const Tensor& data() const noexcept { return data_; }
  /// Scales f32 [..., N, groups] (packed: the backend's padded layout).
  const Tensor& scales() const noexcept { return scales_; }
  /// Backend-specific extra data of a packed tensor (the CPU's int32 group sums), else empty.
  const Tensor& aux() const noexcept { return aux_; }
  /// Column scales f32 [..., K] of an equalised tensor (never packed), else undefined.
  const Tensor& col_scales() const noexcept { return col_scales_; }
  /// True when the tensor has column scales.
  bool has_col_scales() const noexcept { return col_scales_.defined(); }
  /// Bytes held: data, scales, aux and column scales.
  std::size_t nbytes() const noexcept {
    return data_.nbytes() + scales_.nbytes() + aux_.nbytes() + col_scales_.nbytes();
  }
  /// True when nothing is held.
  bool empty() const noexcept { return shape_.numel() == 0; }
  /// The backend holding the buffers.
  Backend* backend() const noexcept { return data_.backend(); }

 private:
  Shape shape_ = Shape{0};
  QuantSpec spec_{};
  Tensor data_;
  Tensor scales_;
  Tensor aux_;
  Tensor col_scales_;
  bool packed_ = false;
};

/// The weight of a linear layer, [..., N, K] (out, in): an f32 Tensor (any layout) or a
/// QuantizedTensor. Converts implicitly from either, so f32 code reads as before.
class Weight {
 public:
  Weight() = default;
  /// An f32 (or f16/bf16 storage) weight.
  Weight(Tensor t) : v_(std::move(t)) {}  // NOLINT: implicit by design
  /// An int8 weight.
  Weight(QuantizedTensor q) : v_(std::move(q)) {}  // NOLINT: implicit by design

  /// True when the weight is int8.
  bool is_quantized() const noexcept { return std::holds_alternative<QuantizedTensor>(v_); }
  /// The f32 tensor; an Error when the weight is quantized.
  const Tensor& tensor() const;
  /// The int8 tensor; an Error when the weight is not quantized.
  const QuantizedTensor& quantized() const;
  /// Logical shape.
  const Shape& shape() const noexcept {
    return is_quantized() ? std::get<QuantizedTensor>(v_).shape() : std::get<Tensor>(v_).shape();
  }
  /// Extent i.
  std::int64_t dim(int i) const noexcept { return shape()[i]; }
  /// Elements of the logical shape.
  std::int64_t numel() const noexcept { return shape().numel(); }
  /// Bytes held (int8 data plus scales when quantized).
  std::size_t nbytes() const noexcept {
    return is_quantized() ? std::get<QuantizedTensor>(v_).nbytes() : std::get<Tensor>(v_).nbytes();
  }
  /// True when the weight has no elements.
  bool empty() const noexcept { return numel() == 0; }
  /// True when a buffer is held (an int8 weight always holds one).
  bool defined() const noexcept { return is_quantized() || std::get<Tensor>(v_).defined(); }
  /// The f32 tensor as a view (an Error when quantized): f32-only code keeps working.
  operator TensorView() const { return tensor().view(); }  // NOLINT: implicit by design

 private:
  std::variant<Tensor, QuantizedTensor> v_;
};

namespace detail {
/// True for a weight the GEMMs compute with: int8, or float storage (f32, bf16, f16; a backend
/// that cannot read 16-bit weights gets them widened by prepare_weights).
inline bool is_float_or_int8(const Weight& w) {
  return w.is_quantized() || is_float_dtype(w.tensor().dtype());
}
}  // namespace detail

}  // namespace autoglm
