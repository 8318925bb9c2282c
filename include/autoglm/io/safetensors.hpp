// SPDX-License-Identifier: Apache-2.0
// safetensors checkpoints: a memory-mapped, validating reader (single file or sharded with
// model.safetensors.index.json), a loader into any Backend, and an atomic writer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "autoglm/backend/backend.hpp"
#include "autoglm/core/dtype.hpp"
#include "autoglm/core/tensor.hpp"

namespace autoglm {

/// Largest JSON header a safetensors file may declare (the reference reader's MAX_HEADER_SIZE).
inline constexpr std::uint64_t kSafeTensorsMaxHeader = 100'000'000;

/// The safetensors dtype tag of an autoglm dtype: "F32", "F16", "BF16", "I8", "I32".
std::string_view safetensors_dtype_tag(DType dtype) noexcept;

/// The autoglm dtype of a safetensors tag ("F32", "F16", "BF16", "I8", "I32"), or nullopt for
/// any other tag (U8, F64, F8_E4M3, ... or a string that is no safetensors dtype at all).
std::optional<DType> dtype_from_safetensors_tag(std::string_view tag) noexcept;

/// One tensor of a safetensors file, as its header describes it. Every byte range has been
/// checked when the file was opened; `dtype` and `shape` are empty when autoglm cannot hold the
/// tensor, which is an Error only when the tensor is requested (SafeTensorsFile::host_view,
/// SafeTensorsFile::load), so other tensors of the file stay usable.
struct TensorInfo {
  std::string name;                    ///< key in the header
  std::string dtype_tag;               ///< dtype as written, e.g. "BF16"
  std::vector<std::uint64_t> extents;  ///< shape as written (any rank)
  std::optional<DType> dtype;          ///< the autoglm dtype; nullopt when unsupported
  /// extents as a Shape; nullopt when the rank exceeds Shape::max_rank or the extents do not
  /// fit int64.
  std::optional<Shape> shape;
  /// First byte, inside the file's buffer; read-only, and possibly not aligned for the dtype
  /// (host_view and load copy such tensors into an aligned buffer).
  const std::byte* data = nullptr;
  std::size_t nbytes = 0;    ///< data_offsets[1] - data_offsets[0]
  std::uint64_t offset = 0;  ///< data_offsets[0], from the start of the data section

  /// True when dtype and shape are both representable, so the tensor can be loaded.
  bool loadable() const noexcept { return dtype.has_value() && shape.has_value(); }
};

/// Host bytes of one tensor, aligned for its dtype, plus the owner that keeps them alive (the
/// file mapping, or an aligned copy when the file's bytes are misaligned). The bytes are
/// read-only: the mapping is PROT_READ.
struct HostTensor {
  TensorView view;                    ///< device cpu, row-major; do not write through it
  std::shared_ptr<const void> owner;  ///< keeps view.data valid
};

/// How SafeTensorsFile::load may place a tensor whose dtype already matches.
enum class LoadMode : std::uint8_t {
  /// On a backend whose device is the CPU, an aligned tensor of the wanted dtype aliases the
  /// mapped file bytes (no copy; the Tensor keeps the mapping alive and must not be written).
  in_place,
  /// Always copy into a buffer the backend allocates (writable).
  copy,
};

/// A validated safetensors file held in memory: a read-only POSIX mmap of a file, or a caller's
/// buffer. Every check of the reference reader is applied when it is opened — file >= 8 bytes,
/// header length <= kSafeTensorsMaxHeader and within the file, UTF-8 JSON object whose text
/// starts with '{', `__metadata__` string -> string only, tensors sorted by offset covering the
/// data section exactly (no gaps, overlaps or trailing bytes, end >= begin), byte size ==
/// product(shape) × dtype size with overflow checks — plus duplicate keys (rejected at any
/// level). Copies share the mapping; it is unmapped when the last copy, TensorInfo user
/// (HostTensor) or in-place Tensor is gone.
class SafeTensorsFile {
 public:
  /// Maps and validates `path`; any defect is an Error (code io) naming the file, the tensor
  /// and the offending value. Nothing is left mapped or open when it throws.
  static SafeTensorsFile open(const std::filesystem::path& path);
  /// Validates bytes already in memory (used by the fuzzer and by embedders that read files
  /// themselves). `owner` keeps `bytes` alive and may be null when the caller guarantees that
  /// `bytes` outlive the file and every tensor it hands out; `source` names it in errors.
  static SafeTensorsFile from_buffer(std::span<const std::byte> bytes,
                                     std::shared_ptr<const void> owner = nullptr,
                                     std::string source = "<memory>");

  /// Tensor names, sorted.
  std::vector<std::string> names() const;
  /// Number of tensors.
  std::size_t size() const noexcept { return tensors_.size(); }
  /// The tensor called `name`, or nullptr.
  const TensorInfo* find(std::string_view name) const noexcept;
  /// The tensor called `name`; Error (not_found) naming it and the file when there is none.
  const TensorInfo& at(std::string_view name) const;
  /// Every tensor, sorted by name.
  const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
  /// The header's `__metadata__` (empty when absent).
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// The path given to open(), or from_buffer()'s source.
  const std::string& source() const noexcept { return source_; }
  /// The whole file (8-byte length, header, data section).
  std::span<const std::byte> buffer() const noexcept { return bytes_; }

  /// Aligned host bytes of `name`: the mapped bytes when they are aligned for the dtype, else
  /// an aligned copy. Error: not_found, or unsupported naming the tensor and its dtype / shape.
  HostTensor host_view(std::string_view name) const;

  /// `name` as a tensor on `backend` with dtype `want`. f32 / f16 / bf16 convert among
  /// themselves through Backend::convert; integer dtypes must match exactly. With
  /// LoadMode::in_place, a CPU backend and an aligned tensor already of dtype `want`, the
  /// Tensor aliases the mapped bytes (read-only) and keeps the mapping alive; otherwise the
  /// backend allocates it. Error: not_found, unsupported (dtype or rank), dtype_mismatch.
  Tensor load(Backend& backend, std::string_view name, DType want = DType::f32,
              LoadMode mode = LoadMode::in_place) const;

  /// Drops this process's resident pages of `name`'s bytes once a caller has copied them (a
  /// loader that re-lays weights out), so that loading a checkpoint does not hold the mapping
  /// and the copy at once: madvise(MADV_DONTNEED) on the whole pages inside bytes [begin, end)
  /// of the tensor (clamped to its size; default: all of it) in the read-only file mapping.
  /// Nothing is lost: a later read of those bytes (a view or in-place Tensor still in use)
  /// faults them back in from the file. Returns the bytes released; 0 for a file from
  /// from_buffer (the caller's memory is left alone), an unknown name, or a range holding no
  /// whole page.
  std::size_t release(std::string_view name, std::size_t begin = 0,
                      std::size_t end = static_cast<std::size_t>(-1)) const noexcept;

 private:
  SafeTensorsFile() = default;
  static SafeTensorsFile parse(std::string_view fn, std::span<const std::byte> bytes,
                               std::shared_ptr<const void> owner, std::string source);

  std::string source_;
  std::shared_ptr<const void> owner_;
  std::span<const std::byte> bytes_;
  bool mapped_ =
      false;  // bytes_ is open()'s private read-only file mapping (release may drop pages)
  std::vector<TensorInfo> tensors_;  // sorted by name
  std::map<std::string, std::string> metadata_;
};

/// A checkpoint directory: `model.safetensors`, or `model.safetensors.index.json` whose
/// `weight_map` names each tensor's shard. Shard names are resolved relative to the index; an
/// absolute name, a name with a ".." component or a NUL byte is an Error, as is a missing
/// shard or a tensor its shard does not hold. Every shard is mapped and validated at open.
/// Tensors a shard holds but the index does not name are not reachable (the index rules).
class SafeTensorsModel {
 public:
  /// Opens a directory (index preferred over model.safetensors), an `*.index.json` file, or a
  /// single `.safetensors` file. Error (io / not_found) naming the file and the offending value.
  static SafeTensorsModel open(const std::filesystem::path& path);

  /// Tensor names, sorted.
  std::vector<std::string> names() const;
  /// Number of tensors.
  std::size_t size() const noexcept { return entries_.size(); }
  /// The tensor called `name` in whichever shard holds it, or nullptr.
  const TensorInfo* find(std::string_view name) const noexcept;
  /// The tensor called `name`; Error (not_found) when there is none.
  const TensorInfo& at(std::string_view name) const;
  /// The shard file that holds `name`; Error (not_found) when there is none.
  const SafeTensorsFile& file_of(std::string_view name) const;
  /// Shards, sorted by file name (one for a single-file checkpoint).
  const std::vector<SafeTensorsFile>& shards() const noexcept { return shards_; }
  /// `__metadata__` of the single file, or of the first shard (writers repeat it per shard).
  const std::map<std::string, std::string>& metadata() const noexcept;

  /// Aligned host bytes of `name` (see SafeTensorsFile::host_view).
  HostTensor host_view(std::string_view name) const;
  /// `name` on `backend` as dtype `want` (see SafeTensorsFile::load).
  Tensor load(Backend& backend, std::string_view name, DType want = DType::f32,
              LoadMode mode = LoadMode::in_place) const;
  /// Drops the resident pages of bytes [begin, end) of `name` in its shard (see
  /// SafeTensorsFile::release); 0 when there is no such tensor.
  std::size_t release(std::string_view name, std::size_t begin = 0,
                      std::size_t end = static_cast<std::size_t>(-1)) const noexcept;

 private:
  struct Entry {
    std::string name;
    std::size_t shard = 0;
  };
  SafeTensorsModel() = default;
  const Entry* entry(std::string_view name) const noexcept;

  std::vector<SafeTensorsFile> shards_;
  std::vector<Entry> entries_;  // sorted by name
};

/// One tensor for the writer: host bytes of a dense row-major tensor.
struct SafeTensorsEntry {
  std::string name;                 ///< unique; not "__metadata__"
  std::string dtype;                ///< safetensors tag: "F32", "BF16", "I8", "F64", ...
  std::vector<std::int64_t> shape;  ///< any rank, extents >= 0
  const void* data = nullptr;       ///< nbytes host bytes (may be null when nbytes is 0)
  std::size_t nbytes = 0;           ///< must equal product(shape) × dtype size
};

/// An entry for a row-major CPU view (f32/f16/bf16/i8/i32); the view's bytes must outlive the
/// write. Error when the view is on another device or not row-major.
SafeTensorsEntry safetensors_entry(std::string name, const TensorView& view);

/// The bytes of a safetensors file holding `tensors` and `metadata`: keys sorted, header padded
/// with spaces so the data section starts at a multiple of 8, data ordered by dtype size
/// (largest first) then name, so every tensor is aligned for its dtype. Error (invalid_argument)
/// on a duplicate or reserved name, an unknown dtype tag, a negative extent, or a byte count
/// that does not match the shape.
std::vector<std::byte> serialize_safetensors(
    std::span<const SafeTensorsEntry> tensors,
    const std::map<std::string, std::string>& metadata = {});

/// Writes serialize_safetensors' layout to `path` atomically: a temporary file in the same
/// directory, streamed, fsync'ed, then renamed over `path`; on failure `path` is untouched and
/// the temporary is removed. Error (io) naming the path and the system error.
void save_safetensors(const std::filesystem::path& path, std::span<const SafeTensorsEntry> tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace autoglm
