// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include <fmt/format.h>

#include "autoglm/core/dtype.hpp"
#include "autoglm/core/error.hpp"

namespace autoglm {

class Backend;

/// Where a buffer lives. Components never dereference a pointer whose device is not cpu.
enum class DeviceKind : std::uint8_t { cpu, cuda };

/// A device: kind plus ordinal.
struct Device {
  DeviceKind kind = DeviceKind::cpu;  ///< cpu or cuda
  int index = 0;                      ///< ordinal among devices of that kind
  friend bool operator==(const Device&, const Device&) = default;
};

/// How a tensor's bytes are arranged. Only weight operands of Backend::gemm and
/// Backend::grouped_gemm accept a layout other than row_major; copy_to_host / copy_from_host
/// always speak the logical row-major order.
enum class Layout : std::uint8_t {
  row_major,  ///< dense, last dimension contiguous
  /// Weights [..., N, K] as panels of 32 rows: [..., ceil(N/32), K, 32], rows past N zero. A
  /// GEMM then streams each panel once, in order, whatever the number of tokens.
  panel32,
};

/// Rows per panel of Layout::panel32.
inline constexpr std::int64_t kPanelRows = 32;

/// Up to four extents; extents are int64 so products of real model sizes cannot overflow.
class Shape {
 public:
  /// Largest rank a Shape holds.
  static constexpr int max_rank = 4;

  Shape() = default;
  /// Shape{tokens, hidden}. Negative extents are rejected.
  Shape(std::initializer_list<std::int64_t> dims) {
    AUTOGLM_CHECK(dims.size() <= max_rank, invalid_argument, "Shape", "rank {} exceeds {}",
                  dims.size(), max_rank);
    for (std::int64_t d : dims) {
      AUTOGLM_CHECK(d >= 0, invalid_argument, "Shape", "negative extent {}", d);
      dims_[rank_++] = d;
    }
  }

  /// Number of dimensions.
  int rank() const noexcept { return rank_; }
  /// Extent i; i < rank().
  std::int64_t operator[](int i) const noexcept { return dims_[static_cast<std::size_t>(i)]; }
  /// Product of the extents (1 for rank 0).
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
    return n;
  }
  friend bool operator==(const Shape& a, const Shape& b) noexcept {
    return a.rank_ == b.rank_ && std::equal(a.dims_.begin(), a.dims_.begin() + a.rank_, b.dims_.begin());
  }
  /// "[2, 4096]".
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) s += fmt::format("{}{}", i ? ", " : "", dims_[static_cast<std::size_t>(i)]);
    return s + "]";
  }

 private:
  std::array<std::int64_t, max_rank> dims_{};
  int rank_ = 0;
};

/// Non-owning, dense row-major view: pointer, dtype, device, shape. Slicing the leading
/// dimension keeps it dense, which is all MoE code needs (rows of tokens, experts of a bank).
struct TensorView {
  void* data = nullptr;   ///< first element; may be device memory
  DType dtype = DType::f32;
  Device device{};
  Shape shape = Shape{0};  ///< a default view is empty, not a scalar
  Layout layout = Layout::row_major;  ///< byte arrangement (see Layout)

  /// Elements in the view.
  std::int64_t numel() const noexcept { return shape.numel(); }
  /// Bytes in the view.
  std::size_t nbytes() const noexcept { return storage_bytes(layout, dtype, shape); }
  /// Extent of dimension i.
  std::int64_t dim(int i) const noexcept { return shape[i]; }
  /// Number of dimensions.
  int rank() const noexcept { return shape.rank(); }
  /// True when there are no elements.
  bool empty() const noexcept { return numel() == 0; }

  /// Typed pointer; the caller must know the dtype matches.
  template <typename T>
  T* as() const noexcept { return static_cast<T*>(data); }

  /// Bytes a tensor of this layout, dtype and shape occupies.
  static std::size_t storage_bytes(Layout l, DType dt, const Shape& s) noexcept {
    if (l == Layout::panel32 && s.rank() >= 2) {
      const std::int64_t n = s[s.rank() - 2], k = s[s.rank() - 1];
      const std::int64_t outer = n * k == 0 ? 0 : s.numel() / (n * k);
      const std::int64_t padded = (n + kPanelRows - 1) / kPanelRows * kPanelRows;
      return static_cast<std::size_t>(outer * padded * k) * dtype_size(dt);
    }
    return static_cast<std::size_t>(s.numel()) * dtype_size(dt);
  }

  /// Rows [begin, end) of dimension 0 (for panel32: whole matrices of a rank >= 3 stack).
  TensorView slice(std::int64_t begin, std::int64_t end) const {
    AUTOGLM_CHECK(layout == Layout::row_major || rank() >= 3, invalid_argument,
                  "TensorView::slice", "a panel32 {} view slices only along a stack dimension",
                  shape.str());
    AUTOGLM_CHECK(rank() >= 1 && begin >= 0 && begin <= end && end <= dim(0), out_of_range,
                  "TensorView::slice", "rows [{}, {}) of shape {}", begin, end, shape.str());
    TensorView v = *this;
    v.shape = reshape_leading(end - begin);
    v.data = static_cast<char*>(data) + static_cast<std::size_t>(begin) * row_bytes();
    return v;
  }
  /// Element i of dimension 0, with rank reduced by one.
  TensorView operator[](std::int64_t i) const {
    TensorView v = slice(i, i + 1);
    v.shape = drop_leading();
    return v;
  }
  /// Same bytes, new shape with the same element count.
  TensorView reshaped(Shape s) const {
    AUTOGLM_CHECK(layout == Layout::row_major, invalid_argument, "TensorView::reshaped",
                  "cannot reshape a panel32 view");
    AUTOGLM_CHECK(s.numel() == numel(), shape_mismatch, "TensorView::reshaped", "{} -> {}",
                  shape.str(), s.str());
    TensorView v = *this;
    v.shape = s;
    return v;
  }
  /// Bytes per index of dimension 0.
  std::size_t row_bytes() const noexcept {
    return rank() == 0 || dim(0) == 0 ? 0 : nbytes() / static_cast<std::size_t>(dim(0));
  }

 private:
  Shape reshape_leading(std::int64_t n) const {
    switch (rank()) {
      case 1: return Shape{n};
      case 2: return Shape{n, dim(1)};
      case 3: return Shape{n, dim(1), dim(2)};
      default: return Shape{n, dim(1), dim(2), dim(3)};
    }
  }
  Shape drop_leading() const {
    switch (rank()) {
      case 1: return Shape{};
      case 2: return Shape{dim(1)};
      case 3: return Shape{dim(1), dim(2)};
      default: return Shape{dim(1), dim(2), dim(3)};
    }
  }
};

/// Owning tensor: a 64-byte aligned buffer from a Backend, freed through that backend.
/// Copies share the buffer (like a shared_ptr); use Backend::copy for a deep copy.
class Tensor {
 public:
  Tensor() = default;
  /// Allocates shape × dtype on the backend in `layout`; contents are uninitialised.
  Tensor(Backend& backend, DType dtype, Shape shape, Layout layout = Layout::row_major);
  /// Wraps memory the backend did not allocate, e.g. a memory-mapped checkpoint (see
  /// SafeTensorsFile::load): the tensor views `view` and holds `keep_alive`, the owner of
  /// view.data, for as long as any copy of the tensor exists; nothing is freed through the
  /// backend. view.device must be backend.device(), view.data non-null unless the view is
  /// empty, keep_alive non-null. The memory may be read-only: writing to such a tensor is the
  /// caller's responsibility.
  Tensor(Backend& backend, TensorView view, std::shared_ptr<const void> keep_alive);

  /// The view over the whole buffer.
  const TensorView& view() const noexcept { return view_; }
  operator TensorView() const noexcept { return view_; }  // NOLINT: tensors pass as views
  /// Typed pointer; the caller must know the dtype matches.
  template <typename T>
  T* data() const noexcept { return view_.as<T>(); }
  /// Element type.
  DType dtype() const noexcept { return view_.dtype; }
  /// Extents.
  const Shape& shape() const noexcept { return view_.shape; }
  /// Byte arrangement.
  Layout layout() const noexcept { return view_.layout; }
  /// Extent of dimension i.
  std::int64_t dim(int i) const noexcept { return view_.dim(i); }
  /// Elements.
  std::int64_t numel() const noexcept { return view_.numel(); }
  /// Bytes.
  std::size_t nbytes() const noexcept { return view_.nbytes(); }
  /// True when no buffer is held or it has no elements.
  bool empty() const noexcept { return view_.empty(); }
  /// True when a buffer is held.
  bool defined() const noexcept { return static_cast<bool>(storage_); }
  /// Backend that owns the buffer, or nullptr for a default-constructed tensor.
  Backend* backend() const noexcept { return backend_; }

 private:
  std::shared_ptr<void> storage_;
  TensorView view_{};
  Backend* backend_ = nullptr;
};

}  // namespace autoglm
