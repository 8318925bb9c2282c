// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for the safetensors reader. The input is parsed from memory (no file
// system), as a whole file and as header + NUL + data with a computed length prefix; an
// accepted file must then hand out every tensor's bytes, readable and aligned (ASan
// and UBSan check each typed read), and must survive a round trip through the writer. Only
// autoglm::Error may escape the reader; anything else (another exception, a sanitizer report, a
// broken invariant) is a crash.
#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "autoglm/io/safetensors.hpp"

namespace {

using namespace autoglm;

// Reads every element of an aligned host view with its own type.
std::uint64_t touch(const TensorView& v) {
  std::uint64_t sum = 0;
  const std::int64_t n = v.numel();
  for (std::int64_t i = 0; i < n; ++i) {
    switch (v.dtype) {
      case DType::f32: sum += std::bit_cast<std::uint32_t>(v.as<const float>()[i]); break;
      case DType::f16: sum += std::bit_cast<std::uint32_t>(f16_to_float(v.as<const std::uint16_t>()[i])); break;
      case DType::bf16: sum += std::bit_cast<std::uint32_t>(bf16_to_float(v.as<const std::uint16_t>()[i])); break;
      case DType::i8: sum += static_cast<std::uint8_t>(v.as<const std::int8_t>()[i]); break;
      case DType::i32: sum += static_cast<std::uint32_t>(v.as<const std::int32_t>()[i]); break;
    }
  }
  return sum;
}

// Every dtype of the safetensors spec; the writer takes exactly these.
constexpr std::string_view kSpecTags[] = {
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
    "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"};

void check(bool ok) {
  if (!ok) __builtin_trap();
}

// Rewrites the accepted file with the writer and parses it again: it must be accepted and
// hold the same tensors, bytes and metadata.
void round_trip(const SafeTensorsFile& f) {
  std::vector<SafeTensorsEntry> entries;
  for (const TensorInfo& t : f.tensors()) {
    if (std::find(std::begin(kSpecTags), std::end(kSpecTags), t.dtype_tag) == std::end(kSpecTags))
      continue;  // not a safetensors dtype: the writer rightly refuses it
    std::vector<std::int64_t> shape;
    bool fits = true;
    for (std::uint64_t e : t.extents) {
      fits &= e <= static_cast<std::uint64_t>(INT64_MAX);
      shape.push_back(static_cast<std::int64_t>(e));
    }
    if (!fits) continue;
    entries.push_back(SafeTensorsEntry{t.name, t.dtype_tag, std::move(shape), t.data, t.nbytes});
  }
  const std::vector<std::byte> bytes = serialize_safetensors(entries, f.metadata());  // must not throw
  const SafeTensorsFile g = SafeTensorsFile::from_buffer(bytes);                       // must not throw
  check(g.size() == entries.size());
  check(g.metadata() == f.metadata());
  for (const SafeTensorsEntry& e : entries) {
    const TensorInfo* t = g.find(e.name);
    check(t != nullptr && t->nbytes == e.nbytes && t->dtype_tag == e.dtype);
    check(e.nbytes == 0 || std::memcmp(t->data, e.data, e.nbytes) == 0);
  }
}

// Parses `bytes` as a file and, when accepted, checks every tensor and the writer round trip.
void exercise(std::span<const std::byte> bytes) {
  std::optional<SafeTensorsFile> file;
  try {
    file.emplace(SafeTensorsFile::from_buffer(bytes));
  } catch (const Error&) {
    return;  // rejected: fine
  }
  const SafeTensorsFile& f = *file;
  volatile std::uint64_t sink = 0;
  std::size_t total = 0;
  for (const TensorInfo& t : f.tensors()) {
    check(f.find(t.name) == &t);
    check(t.data >= f.buffer().data() && t.data + t.nbytes <= f.buffer().data() + f.buffer().size());
    total += t.nbytes;
    for (std::size_t i = 0; i < t.nbytes; ++i) sink = sink + static_cast<std::uint8_t>(t.data[i]);
    try {
      const HostTensor h = f.host_view(t.name);
      check(t.loadable());
      check(h.view.nbytes() == t.nbytes);
      check(reinterpret_cast<std::uintptr_t>(h.view.data) % dtype_size(h.view.dtype) == 0);
      sink = sink + touch(h.view);
    } catch (const Error& e) {
      check(!t.loadable() && e.code() == ErrorCode::unsupported);
    }
  }
  check(total + 8 <= bytes.size());
  try {
    round_trip(f);
  } catch (const Error&) {
    __builtin_trap();  // the writer must accept what the reader accepted
  }
}

}  // namespace

// Each input is tried twice: as a whole file, and as "header JSON, NUL, data bytes" with the
// length prefix computed here, so that mutations of the JSON do not all die on the prefix.
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* bytes = reinterpret_cast<const std::byte*>(data);
  exercise(std::span(bytes, size));
  const auto* nul = static_cast<const std::uint8_t*>(std::memchr(data, 0, size));
  const std::size_t header = nul != nullptr ? static_cast<std::size_t>(nul - data) : size;
  const std::size_t rest = nul != nullptr ? size - header - 1 : 0;
  std::vector<std::byte> file(8 + header + rest);
  for (int i = 0; i < 8; ++i) file[static_cast<std::size_t>(i)] = static_cast<std::byte>(header >> (8 * i) & 0xffu);
  if (header > 0) std::memcpy(file.data() + 8, data, header);
  if (rest > 0) std::memcpy(file.data() + 8 + header, data + header + 1, rest);
  exercise(file);
  return 0;
}
