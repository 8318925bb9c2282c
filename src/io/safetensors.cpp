// SPDX-License-Identifier: Apache-2.0
// safetensors reader (mmap, every check of the reference reader plus '{' start, duplicate keys
// and alignment), sharded checkpoints, loading into a Backend, and the atomic writer.
#include "autoglm/io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

namespace autoglm {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// dtypes

struct DTypeSpec {
  std::string_view tag;
  unsigned bits;
  std::optional<DType> dtype;
};

// Every dtype of the safetensors spec (safetensors/src/tensor.rs, Dtype), sizes in bits.
constexpr DTypeSpec kSpecs[] = {
    {"BOOL", 8, std::nullopt},        {"F4", 4, std::nullopt},
    {"F6_E2M3", 6, std::nullopt},     {"F6_E3M2", 6, std::nullopt},
    {"U8", 8, std::nullopt},          {"I8", 8, DType::i8},
    {"F8_E5M2", 8, std::nullopt},     {"F8_E4M3", 8, std::nullopt},
    {"F8_E8M0", 8, std::nullopt},     {"F8_E4M3FNUZ", 8, std::nullopt},
    {"F8_E5M2FNUZ", 8, std::nullopt}, {"I16", 16, std::nullopt},
    {"U16", 16, std::nullopt},        {"F16", 16, DType::f16},
    {"BF16", 16, DType::bf16},        {"I32", 32, DType::i32},
    {"U32", 32, std::nullopt},        {"F32", 32, DType::f32},
    {"C64", 64, std::nullopt},        {"F64", 64, std::nullopt},
    {"I64", 64, std::nullopt},        {"U64", 64, std::nullopt},
};

const DTypeSpec* find_spec(std::string_view tag) noexcept {
  for (const DTypeSpec& s : kSpecs)
    if (s.tag == tag) return &s;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// messages

// s with control bytes (and, when ascii_only, every non-ASCII byte) as \xNN, cut at `limit`.
std::string printable(std::string_view s, bool ascii_only = false, std::size_t limit = 160) {
  std::string out;
  const std::size_t n = std::min(s.size(), limit);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f || (ascii_only && c >= 0x80))
      out += fmt::format("\\x{:02x}", c);
    else
      out += static_cast<char>(c);
  }
  if (s.size() > limit) out += fmt::format("... ({} bytes)", s.size());
  return out;
}

// 'name', printable.
std::string squote(std::string_view s) {
  return fmt::format("'{}'", printable(s));
}

std::string extents_str(const std::vector<std::uint64_t>& e) {
  std::string s = "[";
  for (std::size_t i = 0; i < e.size() && i < 16; ++i)
    s += fmt::format("{}{}", i ? ", " : "", e[i]);
  if (e.size() > 16) s += fmt::format(", ... ({} extents)", e.size());
  return s + "]";
}

// Throws Error(io, fn, "file=<src>: <message>").
template <typename... Args>
[[noreturn]] void bad_file(std::string_view fn, std::string_view src, fmt::format_string<Args...> f,
                           Args&&... args) {
  detail::fail(ErrorCode::io, fn, "file={}: {}", src, fmt::format(f, std::forward<Args>(args)...));
}

std::string errno_text(int e) {
  return std::error_code(e, std::generic_category()).message();
}

// ---------------------------------------------------------------------------------------------
// POSIX resources

// Closes a file descriptor on scope exit.
class Fd {
 public:
  explicit Fd(int fd) noexcept : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const noexcept { return fd_; }
  // Closes now; returns the errno of a failed close, else 0.
  int close() noexcept {
    const int r = fd_ >= 0 ? ::close(fd_) : 0;
    fd_ = -1;
    return r == 0 ? 0 : errno;
  }

 private:
  int fd_;
};

// A read-only mapping, unmapped on destruction.
class Mapping {
 public:
  Mapping() = default;
  ~Mapping() {
    if (addr_ != nullptr) ::munmap(addr_, size_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  void reset(void* addr, std::size_t size) noexcept {
    addr_ = addr;
    size_ = size;
  }
  const std::byte* data() const noexcept { return static_cast<const std::byte*>(addr_); }

 private:
  void* addr_ = nullptr;
  std::size_t size_ = 0;
};

// Opens `path` read-only as a regular file (never blocks on a FIFO); fstat into st.
int open_regular(std::string_view fn, const std::filesystem::path& path, struct stat& st) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    const int e = errno;
    detail::fail(e == ENOENT ? ErrorCode::not_found : ErrorCode::io, fn, "file={}: cannot open: {}",
                 path.string(), errno_text(e));
  }
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    bad_file(fn, path.string(), "cannot stat: {}", errno_text(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    bad_file(fn, path.string(), "not a regular file");
  }
  return fd;
}

// ---------------------------------------------------------------------------------------------
// header parsing: a SAX handler that keeps only what a safetensors header may hold

struct RawTensor {
  std::string name;
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;
  unsigned seen = 0;  // 1 dtype, 2 shape, 4 data_offsets
  std::size_t n_offsets = 0;
  std::vector<std::string> other_keys;  // ignored fields, for duplicate detection
};

class HeaderHandler {
 public:
  std::vector<RawTensor> tensors;
  std::map<std::string, std::string> metadata;
  std::string error;  // why parsing stopped

  bool null() {
    if (skip_ > 0) return true;
    if (expect_ == Expect::metadata) return consumed();  // "__metadata__": null = none
    return other_scalar("null");
  }
  bool boolean(bool v) { return other_scalar(v ? "true" : "false"); }
  bool number_integer(json::number_integer_t v) {
    return other_scalar(fmt::format("the number {}", v));
  }
  bool number_float(json::number_float_t, const std::string& s) {
    return other_scalar("the number " + printable(s));
  }
  bool binary(json::binary_t&) { return other_scalar("binary data"); }

  bool number_unsigned(json::number_unsigned_t v) {
    if (skip_ > 0) return true;
    switch (expect_) {
      case Expect::shape_item:
        tensors.back().shape.push_back(v);
        return true;
      case Expect::offset_item: {
        RawTensor& t = tensors.back();
        if (t.n_offsets == 0) t.begin = v;
        if (t.n_offsets == 1) t.end = v;
        if (++t.n_offsets > 2)
          return reject(
              fmt::format("tensor {}: data_offsets has more than 2 entries", squote(t.name)));
        return true;
      }
      case Expect::unknown:
        return consumed();
      default:
        return wrong_type(fmt::format("the number {}", v));
    }
  }

  bool string(std::string& s) {
    if (skip_ > 0) return true;
    switch (expect_) {
      case Expect::dtype:
        tensors.back().dtype = std::move(s);
        return consumed();
      case Expect::meta_value:
        metadata.emplace(std::move(key_), std::move(s));
        return consumed();
      case Expect::unknown:
        return consumed();
      default:
        return wrong_type("a string");
    }
  }

  bool start_object(std::size_t) {
    if (skip_ > 0) return ++skip_, true;
    switch (expect_) {
      case Expect::root:
        boxes_.push_back(Box::root);
        break;
      case Expect::metadata:
        boxes_.push_back(Box::metadata);
        break;
      case Expect::entry:
        boxes_.push_back(Box::entry);
        tensors.emplace_back();
        tensors.back().name = std::move(key_);
        break;
      case Expect::unknown:
        skip_ = 1;
        return true;
      default:
        return wrong_type("an object");
    }
    expect_ = Expect::none;
    return true;
  }

  bool key(std::string& k) {
    if (skip_ > 0) return true;
    switch (boxes_.back()) {
      case Box::root:
        if (k == "__metadata__") {
          if (seen_metadata_) return reject("duplicate key '__metadata__'");
          seen_metadata_ = true;
          expect_ = Expect::metadata;
        } else {
          key_ = std::move(k);  // duplicates are found after parsing, by sorting
          expect_ = Expect::entry;
        }
        return true;
      case Box::metadata:
        if (metadata.count(k) != 0)
          return reject(fmt::format("__metadata__: duplicate key {}", squote(k)));
        key_ = std::move(k);
        expect_ = Expect::meta_value;
        return true;
      case Box::entry: {
        RawTensor& t = tensors.back();
        const unsigned bit = k == "dtype" ? 1u : k == "shape" ? 2u : k == "data_offsets" ? 4u : 0u;
        const bool dup =
            bit != 0 ? (t.seen & bit) != 0
                     : std::find(t.other_keys.begin(), t.other_keys.end(), k) != t.other_keys.end();
        if (dup)
          return reject(fmt::format("tensor {}: duplicate key {}", squote(t.name), squote(k)));
        t.seen |= bit;
        if (bit == 0) t.other_keys.push_back(k);
        expect_ = bit == 1   ? Expect::dtype
                  : bit == 2 ? Expect::shape
                  : bit == 4 ? Expect::offsets
                             : Expect::unknown;
        return true;
      }
      default:
        return reject("internal: key outside an object");
    }
  }

  bool end_object() {
    if (skip_ > 0) return close_skipped();
    const Box b = boxes_.back();
    boxes_.pop_back();
    if (b == Box::entry) {
      const RawTensor& t = tensors.back();
      static constexpr std::pair<unsigned, std::string_view> fields[] = {
          {1u, "dtype"}, {2u, "shape"}, {4u, "data_offsets"}};
      for (const auto& [bit, field] : fields)
        if ((t.seen & bit) == 0)
          return reject(fmt::format("tensor {} has no {}", squote(t.name), field));
    }
    expect_ = Expect::none;
    return true;
  }

  bool start_array(std::size_t) {
    if (skip_ > 0) return ++skip_, true;
    switch (expect_) {
      case Expect::shape:
        boxes_.push_back(Box::shape);
        expect_ = Expect::shape_item;
        return true;
      case Expect::offsets:
        boxes_.push_back(Box::offsets);
        expect_ = Expect::offset_item;
        return true;
      case Expect::unknown:
        skip_ = 1;
        return true;
      default:
        return wrong_type("an array");
    }
  }

  bool end_array() {
    if (skip_ > 0) return close_skipped();
    const Box b = boxes_.back();
    boxes_.pop_back();
    if (b == Box::offsets && tensors.back().n_offsets != 2)
      return reject(fmt::format("tensor {}: data_offsets must have 2 entries, got {}",
                                squote(tensors.back().name), tensors.back().n_offsets));
    expect_ = Expect::none;
    return true;
  }

  bool parse_error(std::size_t position, const std::string&,
                   const nlohmann::detail::exception& ex) {
    error = fmt::format("invalid JSON header at byte {}: {}", position,
                        printable(ex.what(), true, 300));
    return false;
  }

 private:
  enum class Expect : std::uint8_t {
    root,
    none,
    metadata,
    meta_value,
    entry,
    dtype,
    shape,
    offsets,
    shape_item,
    offset_item,
    unknown
  };
  enum class Box : std::uint8_t { root, metadata, entry, shape, offsets };

  bool reject(std::string message) {
    error = std::move(message);
    return false;
  }
  bool consumed() {
    expect_ = Expect::none;
    return true;
  }
  bool close_skipped() {
    if (--skip_ == 0) expect_ = Expect::none;
    return true;
  }
  bool other_scalar(const std::string& what) {
    if (skip_ > 0) return true;
    if (expect_ == Expect::unknown) return consumed();
    return wrong_type(what);
  }
  // The value just seen does not fit where it stands.
  bool wrong_type(const std::string& got) {
    const std::string name = tensors.empty() ? std::string() : squote(tensors.back().name);
    switch (expect_) {
      case Expect::root:
        return reject("header must be a JSON object, got " + got);
      case Expect::metadata:
        return reject("__metadata__ must be an object of strings, got " + got);
      case Expect::meta_value:
        return reject(
            fmt::format("__metadata__ value of {} must be a string, got {}", squote(key_), got));
      case Expect::entry:
        return reject(fmt::format("tensor {} must be an object, got {}", squote(key_), got));
      case Expect::dtype:
        return reject(fmt::format("tensor {}: dtype must be a string, got {}", name, got));
      case Expect::shape:
      case Expect::shape_item:
        return reject(fmt::format(
            "tensor {}: shape must be an array of non-negative integers, got {}", name, got));
      case Expect::offsets:
      case Expect::offset_item:
        return reject(fmt::format(
            "tensor {}: data_offsets must be two non-negative integers, got {}", name, got));
      default:
        return reject("unexpected " + got);
    }
  }

  Expect expect_ = Expect::root;
  std::vector<Box> boxes_;
  std::string key_;  // pending tensor name or metadata key
  int skip_ = 0;     // > 0: nesting depth inside an ignored field
  bool seen_metadata_ = false;
};

std::uint64_t read_le64(const std::byte* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | static_cast<std::uint8_t>(p[i]);
  return v;
}

// Shape of the extents, or nullopt when Shape cannot hold them: rank > max_rank, an extent past
// int64, or a product of the non-zero extents past int64 (Shape::numel would overflow).
std::optional<Shape> to_shape(const std::vector<std::uint64_t>& e) {
  if (e.size() > static_cast<std::size_t>(Shape::max_rank)) return std::nullopt;
  std::uint64_t nonzero = 1;
  for (std::uint64_t d : e) {
    if (d > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      return std::nullopt;
    if (d != 0 && __builtin_mul_overflow(nonzero, d, &nonzero)) return std::nullopt;
  }
  if (nonzero > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
    return std::nullopt;
  const auto i = [&](std::size_t k) { return static_cast<std::int64_t>(e[k]); };
  switch (e.size()) {
    case 0:
      return Shape{};
    case 1:
      return Shape{i(0)};
    case 2:
      return Shape{i(0), i(1)};
    case 3:
      return Shape{i(0), i(1), i(2)};
    default:
      return Shape{i(0), i(1), i(2), i(3)};
  }
}

// Throws Error(unsupported) unless t is loadable, naming the file, tensor, dtype or shape.
void require_loadable(std::string_view fn, const std::string& src, const TensorInfo& t) {
  if (!t.dtype) {
    if (find_spec(t.dtype_tag) != nullptr)
      detail::fail(
          ErrorCode::unsupported, fn,
          "file={}: tensor {} has dtype {}, which autoglm does not hold (F32, F16, BF16, I8, I32)",
          src, squote(t.name), squote(t.dtype_tag));
    detail::fail(ErrorCode::unsupported, fn,
                 "file={}: tensor {} has dtype {}, which is not a safetensors dtype", src,
                 squote(t.name), squote(t.dtype_tag));
  }
  if (!t.shape) {
    if (t.extents.size() > static_cast<std::size_t>(Shape::max_rank))
      detail::fail(ErrorCode::unsupported, fn, "file={}: tensor {} has rank {} > {} (shape {})",
                   src, squote(t.name), t.extents.size(), Shape::max_rank, extents_str(t.extents));
    detail::fail(ErrorCode::unsupported, fn,
                 "file={}: tensor {} has shape {}, whose extents do not fit int64", src,
                 squote(t.name), extents_str(t.extents));
  }
}

bool aligned_for(const std::byte* p, DType dt) noexcept {
  return reinterpret_cast<std::uintptr_t>(p) % dtype_size(dt) == 0;
}

// ---------------------------------------------------------------------------------------------
// index files

// Reads a small regular file whole (at most `limit` bytes).
std::string read_small_file(std::string_view fn, const std::filesystem::path& path,
                            std::uint64_t limit) {
  struct stat st {};
  Fd fd(open_regular(fn, path, st));
  if (static_cast<std::uint64_t>(st.st_size) > limit)
    bad_file(fn, path.string(), "{} bytes exceed the limit of {}", st.st_size, limit);
  std::string s(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t done = 0;
  while (done < s.size()) {
    const ssize_t r = ::read(fd.get(), s.data() + done, s.size() - done);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) bad_file(fn, path.string(), "read failed: {}", errno_text(errno));
    if (r == 0) break;  // shrank while reading
    done += static_cast<std::size_t>(r);
  }
  s.resize(done);
  return s;
}

// SAX handler for model.safetensors.index.json: keeps only weight_map (tensor -> shard), skips
// every other key however nested, so memory stays proportional to weight_map. Duplicate keys at
// the top level are rejected here, duplicate tensors after parsing.
class IndexHandler {
 public:
  std::vector<std::pair<std::string, std::string>> weight_map;  // file order
  bool has_weight_map = false;
  std::string error;

  bool null() { return scalar("null"); }
  bool boolean(bool) { return scalar("a boolean"); }
  bool number_integer(json::number_integer_t) { return scalar("a number"); }
  bool number_unsigned(json::number_unsigned_t) { return scalar("a number"); }
  bool number_float(json::number_float_t, const std::string&) { return scalar("a number"); }
  bool binary(json::binary_t&) { return scalar("binary data"); }
  bool string(std::string& s) {
    if (skip_ == 0 && state_ == State::wm_value) {
      weight_map.emplace_back(std::move(key_), std::move(s));
      state_ = State::in_wm;
      return true;
    }
    return scalar("a string");
  }
  bool start_object(std::size_t) {
    if (skip_ > 0) return ++skip_, true;
    switch (state_) {
      case State::root_value:
        state_ = State::in_root;
        return true;
      case State::wm:
        state_ = State::in_wm;
        return true;
      case State::other_value:
        skip_ = 1;
        return true;
      default:
        return wrong("an object");
    }
  }
  bool start_array(std::size_t) {
    if (skip_ > 0) return ++skip_, true;
    if (state_ == State::other_value) return skip_ = 1, true;
    return wrong("an array");
  }
  bool end_object() { return end(); }
  bool end_array() { return end(); }
  bool key(std::string& k) {
    if (skip_ > 0) return true;
    if (state_ == State::in_wm) {
      key_ = std::move(k);
      state_ = State::wm_value;
      return true;
    }
    if (std::find(root_keys_.begin(), root_keys_.end(), k) != root_keys_.end())
      return reject(fmt::format("duplicate key {}", squote(k)));
    root_keys_.push_back(k);
    has_weight_map |= k == "weight_map";
    state_ = k == "weight_map" ? State::wm : State::other_value;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&,
                   const nlohmann::detail::exception& ex) {
    return reject(
        fmt::format("invalid JSON at byte {}: {}", position, printable(ex.what(), true, 300)));
  }

 private:
  enum class State : std::uint8_t { root_value, in_root, other_value, wm, in_wm, wm_value, done };
  bool reject(std::string m) {
    error = std::move(m);
    return false;
  }
  bool scalar(std::string_view what) {
    if (skip_ > 0) return true;
    if (state_ == State::other_value) return state_ = State::in_root, true;
    return wrong(what);
  }
  bool end() {
    if (skip_ > 0) {
      if (--skip_ == 0) state_ = State::in_root;
      return true;
    }
    state_ = state_ == State::in_wm ? State::in_root : State::done;
    return true;
  }
  bool wrong(std::string_view got) {
    switch (state_) {
      case State::root_value:
        return reject(fmt::format("the index must be a JSON object, got {}", got));
      case State::wm:
        return reject(fmt::format("weight_map must be an object, got {}", got));
      case State::wm_value:
        return reject(fmt::format("weight_map value of tensor {} must be a shard file name, got {}",
                                  squote(key_), got));
      default:
        return reject(fmt::format("unexpected {}", got));
    }
  }

  State state_ = State::root_value;
  int skip_ = 0;
  std::string key_;
  std::vector<std::string> root_keys_;
};

// Throws unless `shard` is a relative path that stays inside the index's directory.
void check_shard_name(std::string_view fn, const std::string& index, const std::string& tensor,
                      const std::string& shard) {
  const auto bad = [&](std::string_view why) {
    bad_file(fn, index, "weight_map assigns tensor {} to shard {}: {}", squote(tensor),
             squote(shard), why);
  };
  if (shard.empty()) bad("empty shard name");
  if (shard.find('\0') != std::string::npos) bad("NUL byte in the shard name");
  const std::filesystem::path p(shard);
  if (p.has_root_path()) bad("absolute shard paths are not allowed");
  for (const auto& part : p)
    if (part == "..") bad("'..' would leave the checkpoint directory");
}

// ---------------------------------------------------------------------------------------------
// writer

struct Planned {
  const SafeTensorsEntry* entry;
  unsigned bits;
  std::uint64_t begin, end;
};

struct Plan {
  std::string header;  // JSON, padded with spaces
  std::vector<Planned> order;
  std::uint64_t data_bytes = 0;
};

Plan plan_file(std::string_view fn, std::span<const SafeTensorsEntry> tensors,
               const std::map<std::string, std::string>& metadata) {
  Plan plan;
  std::vector<const SafeTensorsEntry*> by_name;
  for (const SafeTensorsEntry& e : tensors) by_name.push_back(&e);
  std::sort(by_name.begin(), by_name.end(), [](auto* a, auto* b) { return a->name < b->name; });
  for (std::size_t i = 0; i < by_name.size(); ++i) {
    const SafeTensorsEntry& e = *by_name[i];
    AUTOGLM_CHECK(i == 0 || by_name[i - 1]->name != e.name, invalid_argument, fn,
                  "duplicate tensor name {}", squote(e.name));
    AUTOGLM_CHECK(e.name != "__metadata__", invalid_argument, fn,
                  "'__metadata__' is reserved and cannot name a tensor");
    const DTypeSpec* spec = find_spec(e.dtype);
    AUTOGLM_CHECK(spec != nullptr, invalid_argument, fn, "tensor {}: unknown dtype {}",
                  squote(e.name), squote(e.dtype));
    std::uint64_t n = 1;
    bool overflow = false;
    for (std::int64_t d : e.shape) {
      AUTOGLM_CHECK(d >= 0, invalid_argument, fn, "tensor {}: negative extent {}", squote(e.name),
                    d);
      overflow |= __builtin_mul_overflow(n, static_cast<std::uint64_t>(d), &n);
    }
    std::uint64_t bits = 0;
    overflow |= __builtin_mul_overflow(n, std::uint64_t{spec->bits}, &bits);
    AUTOGLM_CHECK(!overflow, invalid_argument, fn, "tensor {}: shape × dtype overflows 64 bits",
                  squote(e.name));
    AUTOGLM_CHECK(bits % 8 == 0, invalid_argument, fn,
                  "tensor {}: {} elements of {} are not a whole number of bytes", squote(e.name), n,
                  e.dtype);
    AUTOGLM_CHECK(bits / 8 == e.nbytes, invalid_argument, fn,
                  "tensor {}: shape × {} needs {} bytes, entry has {}", squote(e.name), e.dtype,
                  bits / 8, e.nbytes);
    AUTOGLM_CHECK(e.data != nullptr || e.nbytes == 0, invalid_argument, fn, "tensor {}: no data",
                  squote(e.name));
    plan.order.push_back(Planned{&e, spec->bits, 0, 0});
  }
  // Largest elements first, so every tensor starts aligned for its dtype.
  std::stable_sort(plan.order.begin(), plan.order.end(),
                   [](const Planned& a, const Planned& b) { return a.bits > b.bits; });
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (Planned& p : plan.order) {
    p.begin = offset;
    AUTOGLM_CHECK(!__builtin_add_overflow(offset, p.entry->nbytes, &offset), invalid_argument, fn,
                  "total size overflows 64 bits");
    p.end = offset;
    header[p.entry->name] = {
        {"dtype", p.entry->dtype}, {"shape", p.entry->shape}, {"data_offsets", {p.begin, p.end}}};
  }
  plan.data_bytes = offset;
  try {
    plan.header = header.dump(-1, ' ', false, json::error_handler_t::strict);
  } catch (const json::exception& e) {
    detail::fail(ErrorCode::invalid_argument, fn,
                 "a tensor name or metadata entry is not valid UTF-8: {}",
                 printable(e.what(), true, 200));
  }
  while ((8 + plan.header.size()) % 8 != 0) plan.header += ' ';
  AUTOGLM_CHECK(plan.header.size() <= kSafeTensorsMaxHeader, invalid_argument, fn,
                "header of {} bytes exceeds the limit of {}", plan.header.size(),
                kSafeTensorsMaxHeader);
  return plan;
}

void put_le64(std::byte* p, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i) & 0xffu);
}

void write_all(std::string_view fn, const std::string& path, int fd, const void* data,
               std::size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t r = ::write(fd, p, std::min<std::size_t>(n, std::size_t{1} << 30));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0)
      detail::fail(ErrorCode::io, fn, "file={}: write failed: {}", path, errno_text(errno));
    p += r;
    n -= static_cast<std::size_t>(r);
  }
}

std::atomic<std::uint64_t> g_tmp_counter{0};

}  // namespace

// -----------------------------------------------------------------------------------------------
// dtype tags

std::string_view safetensors_dtype_tag(DType dtype) noexcept {
  switch (dtype) {
    case DType::f32:
      return "F32";
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
    case DType::i8:
      return "I8";
    case DType::i32:
      return "I32";
  }
  return "?";
}

std::optional<DType> dtype_from_safetensors_tag(std::string_view tag) noexcept {
  const DTypeSpec* s = find_spec(tag);
  return s != nullptr ? s->dtype : std::nullopt;
}

// -----------------------------------------------------------------------------------------------
// SafeTensorsFile

SafeTensorsFile SafeTensorsFile::open(const std::filesystem::path& path) {
  constexpr std::string_view fn = "SafeTensorsFile::open";
  struct stat st {};
  Fd fd(open_regular(fn, path, st));
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size < 8)
    bad_file(fn, path.string(), "{} bytes, shorter than the 8-byte header length", size);
  auto mapping = std::make_shared<Mapping>();  // before mmap: nothing can leak the mapping
  void* addr = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (addr == MAP_FAILED)
    bad_file(fn, path.string(), "mmap of {} bytes failed: {}", size, errno_text(errno));
  mapping->reset(addr, static_cast<std::size_t>(size));
  fd.close();
  const std::span<const std::byte> bytes(mapping->data(), static_cast<std::size_t>(size));
  SafeTensorsFile f = parse(fn, bytes, std::move(mapping), path.string());
  f.mapped_ = true;
  return f;
}

SafeTensorsFile SafeTensorsFile::from_buffer(std::span<const std::byte> bytes,
                                             std::shared_ptr<const void> owner,
                                             std::string source) {
  if (owner == nullptr && bytes.data() != nullptr)  // non-owning: the caller keeps the bytes alive
    owner = std::shared_ptr<const void>(std::shared_ptr<const void>(), bytes.data());
  return parse("SafeTensorsFile::from_buffer", bytes, std::move(owner), std::move(source));
}

SafeTensorsFile SafeTensorsFile::parse(std::string_view fn, std::span<const std::byte> bytes,
                                       std::shared_ptr<const void> owner, std::string source) {
  const std::string& src = source;
  const std::uint64_t size = bytes.size();
  // 1. the length prefix
  if (size < 8) bad_file(fn, src, "{} bytes, shorter than the 8-byte header length", size);
  const std::uint64_t n = read_le64(bytes.data());
  // 2. its limit, 3. within the file
  if (n > kSafeTensorsMaxHeader)
    bad_file(fn, src, "header length {} exceeds the limit of {}", n, kSafeTensorsMaxHeader);
  if (n > size - 8)
    bad_file(fn, src, "header length {} runs past the end of the file ({} bytes)", n, size);
  // 4. a UTF-8 JSON object whose text starts with '{'
  const char* text = reinterpret_cast<const char*>(bytes.data()) + 8;
  if (n == 0 || text[0] != '{')
    bad_file(fn, src, "header does not start with '{{' (first byte {})",
             n == 0 ? std::string("none: the header is empty")
                    : fmt::format("0x{:02x}", static_cast<unsigned char>(text[0])));
  HeaderHandler h;
  if (!json::sax_parse(text, text + n, &h, json::input_format_t::json, /*strict=*/true,
                       /*ignore_comments=*/false))
    bad_file(fn, src, "{}", h.error);

  std::vector<RawTensor>& raw = h.tensors;
  std::sort(raw.begin(), raw.end(),
            [](const RawTensor& a, const RawTensor& b) { return a.name < b.name; });
  for (std::size_t i = 1; i < raw.size(); ++i)
    if (raw[i].name == raw[i - 1].name)
      bad_file(fn, src, "duplicate tensor name {}", squote(raw[i].name));

  // 6. each tensor's byte range matches its shape × dtype
  for (const RawTensor& t : raw) {
    if (t.end < t.begin)
      bad_file(fn, src, "tensor {}: data_offsets [{}, {}] end before they begin", squote(t.name),
               t.begin, t.end);
    const DTypeSpec* spec = find_spec(t.dtype);
    if (spec == nullptr) continue;  // unknown dtype: an Error only when the tensor is requested
    std::uint64_t count = 1;
    bool overflow = false;
    for (std::uint64_t d : t.shape) overflow |= __builtin_mul_overflow(count, d, &count);
    std::uint64_t bits = 0;
    overflow |= __builtin_mul_overflow(count, std::uint64_t{spec->bits}, &bits);
    if (overflow)
      bad_file(fn, src, "tensor {}: shape {} × {} overflows 64 bits", squote(t.name),
               extents_str(t.shape), spec->tag);
    if (bits % 8 != 0)
      bad_file(fn, src, "tensor {}: shape {} of {} is not a whole number of bytes ({} bits)",
               squote(t.name), extents_str(t.shape), spec->tag, bits);
    if (bits / 8 != t.end - t.begin)
      bad_file(fn, src, "tensor {}: shape {} × {} is {} bytes, but data_offsets [{}, {}] hold {}",
               squote(t.name), extents_str(t.shape), spec->tag, bits / 8, t.begin, t.end,
               t.end - t.begin);
  }

  // 5, 7. sorted by offset, the tensors tile the data section exactly
  const std::uint64_t data_size = size - 8 - n;
  std::vector<const RawTensor*> by_offset;
  by_offset.reserve(raw.size());
  for (const RawTensor& t : raw) by_offset.push_back(&t);
  std::stable_sort(by_offset.begin(), by_offset.end(), [](const RawTensor* a, const RawTensor* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::uint64_t expected = 0;
  const RawTensor* prev = nullptr;
  for (const RawTensor* t : by_offset) {
    if (t->begin > expected && prev == nullptr)
      bad_file(fn, src,
               "tensor {} begins at byte {} of the data section, not at 0: a gap of {} bytes",
               squote(t->name), t->begin, t->begin);
    if (t->begin > expected)
      bad_file(fn, src,
               "tensor {} begins at byte {} of the data section, but the previous tensor {} ends "
               "at byte {}: a gap of {} bytes",
               squote(t->name), t->begin, squote(prev->name), expected, t->begin - expected);
    if (t->begin < expected)
      bad_file(fn, src,
               "tensor {} begins at byte {} of the data section, inside the previous tensor {} "
               "(ends at byte {}): overlap",
               squote(t->name), t->begin, squote(prev->name), expected);
    expected = t->end;
    prev = t;
  }
  if (expected > data_size)
    bad_file(fn, src, "tensor {} ends at byte {}, past the end of the data section ({} bytes)",
             squote(prev->name), expected, data_size);
  if (expected < data_size)
    bad_file(
        fn, src,
        "{} trailing bytes after the last tensor{} (data section of {} bytes, tensors end at {})",
        data_size - expected, prev ? fmt::format(" {}", squote(prev->name)) : std::string(),
        data_size, expected);

  SafeTensorsFile f;
  f.source_ = std::move(source);
  f.owner_ = std::move(owner);
  f.bytes_ = bytes;
  f.metadata_ = std::move(h.metadata);
  f.tensors_.reserve(raw.size());
  const std::byte* data = bytes.data() + 8 + n;
  for (RawTensor& t : raw) {
    TensorInfo info;
    info.dtype = dtype_from_safetensors_tag(t.dtype);
    info.shape = to_shape(t.shape);
    info.name = std::move(t.name);
    info.dtype_tag = std::move(t.dtype);
    info.extents = std::move(t.shape);
    info.data = data + t.begin;
    info.nbytes = static_cast<std::size_t>(t.end - t.begin);
    info.offset = t.begin;
    f.tensors_.push_back(std::move(info));
  }
  return f;
}

std::vector<std::string> SafeTensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const TensorInfo& t : tensors_) out.push_back(t.name);
  return out;
}

const TensorInfo* SafeTensorsFile::find(std::string_view name) const noexcept {
  const auto it =
      std::lower_bound(tensors_.begin(), tensors_.end(), name,
                       [](const TensorInfo& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

const TensorInfo& SafeTensorsFile::at(std::string_view name) const {
  const TensorInfo* t = find(name);
  AUTOGLM_CHECK(t != nullptr, not_found, "SafeTensorsFile::at", "file={}: no tensor {}", source_,
                squote(name));
  return *t;
}

HostTensor SafeTensorsFile::host_view(std::string_view name) const {
  constexpr std::string_view fn = "SafeTensorsFile::host_view";
  const TensorInfo* t = find(name);
  AUTOGLM_CHECK(t != nullptr, not_found, fn, "file={}: no tensor {}", source_, squote(name));
  require_loadable(fn, source_, *t);
  const TensorView view{const_cast<std::byte*>(t->data), *t->dtype, Device{}, *t->shape};
  if (aligned_for(t->data, *t->dtype)) return HostTensor{view, owner_};
  // Misaligned for the dtype: an aligned copy owns the bytes.
  void* p = std::aligned_alloc(64, (t->nbytes + 63) / 64 * 64 + 64);
  AUTOGLM_CHECK(p != nullptr, device, fn, "file={}: tensor {}: out of memory for {} bytes", source_,
                squote(name), t->nbytes);
  std::shared_ptr<void> copy(p, std::free);
  if (t->nbytes > 0) std::memcpy(p, t->data, t->nbytes);
  TensorView v = view;
  v.data = p;
  return HostTensor{v, std::move(copy)};
}

Tensor SafeTensorsFile::load(Backend& backend, std::string_view name, DType want,
                             LoadMode mode) const {
  constexpr std::string_view fn = "SafeTensorsFile::load";
  const TensorInfo* t = find(name);
  AUTOGLM_CHECK(t != nullptr, not_found, fn, "file={}: no tensor {}", source_, squote(name));
  require_loadable(fn, source_, *t);
  const DType have = *t->dtype;
  const Shape& shape = *t->shape;
  AUTOGLM_CHECK(have == want || (is_float_dtype(have) && is_float_dtype(want)), dtype_mismatch, fn,
                "file={}: tensor {} is {} and cannot be loaded as {}", source_, squote(name),
                t->dtype_tag, dtype_name(want));
  const bool host = backend.device().kind == DeviceKind::cpu;
  const bool aligned = aligned_for(t->data, have);
  const TensorView mapped{const_cast<std::byte*>(t->data), have, backend.device(), shape};
  if (have == want) {
    if (host && aligned && mode == LoadMode::in_place) return Tensor(backend, mapped, owner_);
    Tensor out(backend, want, shape);
    if (t->nbytes > 0) backend.copy_from_host(out, t->data);
    return out;
  }
  Tensor out(backend, want, shape);
  if (host && aligned) {
    backend.convert(mapped, out);
  } else {  // device memory, or misaligned source: stage the raw bytes in a backend buffer
    Tensor staged(backend, have, shape);
    if (t->nbytes > 0) backend.copy_from_host(staged, t->data);
    backend.convert(staged, out);
  }
  return out;
}

std::size_t SafeTensorsFile::release(std::string_view name, std::size_t begin,
                                     std::size_t end) const noexcept {
  const TensorInfo* t = mapped_ ? find(name) : nullptr;
  if (t == nullptr) return 0;
  end = std::min(end, t->nbytes);
  if (begin >= end) return 0;
  // Whole pages inside the range only: a page shared with a neighbour would be refaulted at its
  // next use anyway (the mapping is PROT_READ and MAP_PRIVATE, never written, so MADV_DONTNEED
  // just unmaps clean page-cache pages), but it may be the neighbour's and still in use.
  static const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto base = reinterpret_cast<std::uintptr_t>(t->data);
  const std::uintptr_t first = (base + begin + page - 1) / page * page;
  const std::uintptr_t last = (base + end) / page * page;
  if (last <= first) return 0;
  // Best effort: a failure (none is expected for a range of a live mapping) only means the
  // pages stay resident until the mapping goes.
  if (::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED) != 0) return 0;
  return last - first;
}

// -----------------------------------------------------------------------------------------------
// SafeTensorsModel

SafeTensorsModel SafeTensorsModel::open(const std::filesystem::path& path) {
  constexpr std::string_view fn = "SafeTensorsModel::open";
  std::error_code ec;
  std::filesystem::path file = path;
  if (std::filesystem::is_directory(path, ec)) {
    const auto index = path / "model.safetensors.index.json";
    const auto single = path / "model.safetensors";
    if (std::filesystem::exists(index, ec))
      file = index;
    else if (std::filesystem::exists(single, ec))
      file = single;
    else
      detail::fail(ErrorCode::not_found, fn,
                   "directory={}: neither model.safetensors.index.json nor "
                   "model.safetensors is there",
                   path.string());
  }
  const std::string name = file.filename().string();
  const bool is_index = name.size() >= 11 && name.compare(name.size() - 11, 11, ".index.json") == 0;

  SafeTensorsModel m;
  if (!is_index) {
    m.shards_.push_back(SafeTensorsFile::open(file));
    for (const TensorInfo& t : m.shards_.front().tensors()) m.entries_.push_back(Entry{t.name, 0});
    return m;
  }

  const std::string src = file.string();
  const std::string text = read_small_file(fn, file, kSafeTensorsMaxHeader);
  IndexHandler h;
  if (!json::sax_parse(text.begin(), text.end(), &h, json::input_format_t::json, /*strict=*/true,
                       /*ignore_comments=*/false))
    bad_file(fn, src, "{}", h.error);
  if (!h.has_weight_map) bad_file(fn, src, "no weight_map");
  if (h.weight_map.empty()) bad_file(fn, src, "weight_map is empty");
  std::sort(h.weight_map.begin(), h.weight_map.end());
  std::map<std::string, std::vector<std::string>> by_shard;
  for (std::size_t i = 0; i < h.weight_map.size(); ++i) {
    const auto& [tensor, shard] = h.weight_map[i];
    if (i > 0 && h.weight_map[i - 1].first == tensor)
      bad_file(fn, src, "weight_map: duplicate key {}", squote(tensor));
    check_shard_name(fn, src, tensor, shard);
    by_shard[shard].push_back(tensor);
  }
  const std::filesystem::path dir = file.parent_path();
  std::map<std::string, std::size_t> shard_index;
  for (const auto& [shard, tensors] : by_shard) {
    try {
      m.shards_.push_back(SafeTensorsFile::open(dir / shard));
    } catch (const Error& e) {
      detail::fail(e.code(), fn, "file={}: shard {} (holding tensor {}): {}", src, squote(shard),
                   squote(tensors.front()), e.what());
    }
    const SafeTensorsFile& f = m.shards_.back();
    for (const std::string& t : tensors) {
      if (f.find(t) == nullptr)
        bad_file(fn, src, "weight_map assigns tensor {} to shard {}, which does not hold it",
                 squote(t), squote(shard));
      m.entries_.push_back(Entry{t, m.shards_.size() - 1});
    }
  }
  std::sort(m.entries_.begin(), m.entries_.end(),
            [](const Entry& a, const Entry& b) { return a.name < b.name; });
  return m;
}

const SafeTensorsModel::Entry* SafeTensorsModel::entry(std::string_view name) const noexcept {
  const auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                                   [](const Entry& e, std::string_view n) { return e.name < n; });
  return it != entries_.end() && it->name == name ? &*it : nullptr;
}

std::vector<std::string> SafeTensorsModel::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const Entry& e : entries_) out.push_back(e.name);
  return out;
}

const TensorInfo* SafeTensorsModel::find(std::string_view name) const noexcept {
  const Entry* e = entry(name);
  return e != nullptr ? shards_[e->shard].find(name) : nullptr;
}

const SafeTensorsFile& SafeTensorsModel::file_of(std::string_view name) const {
  const Entry* e = entry(name);
  AUTOGLM_CHECK(e != nullptr, not_found, "SafeTensorsModel", "no tensor {} in {}", squote(name),
                shards_.empty() ? std::string("an empty model") : shards_.front().source());
  return shards_[e->shard];
}

const TensorInfo& SafeTensorsModel::at(std::string_view name) const {
  return file_of(name).at(name);
}

const std::map<std::string, std::string>& SafeTensorsModel::metadata() const noexcept {
  static const std::map<std::string, std::string> empty;
  return shards_.empty() ? empty : shards_.front().metadata();
}

HostTensor SafeTensorsModel::host_view(std::string_view name) const {
  return file_of(name).host_view(name);
}

Tensor SafeTensorsModel::load(Backend& backend, std::string_view name, DType want,
                              LoadMode mode) const {
  return file_of(name).load(backend, name, want, mode);
}

std::size_t SafeTensorsModel::release(std::string_view name, std::size_t begin,
                                      std::size_t end) const noexcept {
  const Entry* e = entry(name);
  return e != nullptr ? shards_[e->shard].release(name, begin, end) : 0;
}

// -----------------------------------------------------------------------------------------------
// writer

SafeTensorsEntry safetensors_entry(std::string name, const TensorView& view) {
  constexpr std::string_view fn = "safetensors_entry";
  AUTOGLM_CHECK(view.device.kind == DeviceKind::cpu, device, fn,
                "tensor {} is not in host memory; copy it to the host first", squote(name));
  AUTOGLM_CHECK(view.layout == Layout::row_major, invalid_argument, fn,
                "tensor {} must be row-major", squote(name));
  AUTOGLM_CHECK(view.data != nullptr || view.empty(), invalid_argument, fn,
                "tensor {} has no buffer", squote(name));
  SafeTensorsEntry e;
  e.name = std::move(name);
  e.dtype = std::string(safetensors_dtype_tag(view.dtype));
  for (int i = 0; i < view.rank(); ++i) e.shape.push_back(view.dim(i));
  e.data = view.data;
  e.nbytes = view.nbytes();
  return e;
}

std::vector<std::byte> serialize_safetensors(std::span<const SafeTensorsEntry> tensors,
                                             const std::map<std::string, std::string>& metadata) {
  const Plan plan = plan_file("serialize_safetensors", tensors, metadata);
  std::vector<std::byte> out(8 + plan.header.size() + plan.data_bytes);
  put_le64(out.data(), plan.header.size());
  std::memcpy(out.data() + 8, plan.header.data(), plan.header.size());
  std::byte* data = out.data() + 8 + plan.header.size();
  for (const Planned& p : plan.order)
    if (p.entry->nbytes > 0) std::memcpy(data + p.begin, p.entry->data, p.entry->nbytes);
  return out;
}

void save_safetensors(const std::filesystem::path& path, std::span<const SafeTensorsEntry> tensors,
                      const std::map<std::string, std::string>& metadata) {
  constexpr std::string_view fn = "save_safetensors";
  const Plan plan = plan_file(fn, tensors, metadata);
  const std::string target = path.string();
  AUTOGLM_CHECK(path.has_filename(), io, fn, "file={}: not a file name", target);
  const std::filesystem::path tmp =
      path.parent_path() /
      fmt::format(".{}.tmp.{}.{}", path.filename().string(), ::getpid(), g_tmp_counter++);
  const int raw_fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (raw_fd < 0)
    detail::fail(ErrorCode::io, fn, "file={}: cannot create {}: {}", target, tmp.string(),
                 errno_text(errno));
  Fd fd(raw_fd);
  struct Unlink {  // removes the temporary unless the rename happened
    const std::filesystem::path& p;
    bool armed = true;
    ~Unlink() {
      if (armed) ::unlink(p.c_str());
    }
  } guard{tmp};
  std::byte len[8];
  put_le64(len, plan.header.size());
  write_all(fn, target, fd.get(), len, sizeof len);
  write_all(fn, target, fd.get(), plan.header.data(), plan.header.size());
  for (const Planned& p : plan.order)
    write_all(fn, target, fd.get(), p.entry->data, p.entry->nbytes);
  if (::fsync(fd.get()) != 0)
    detail::fail(ErrorCode::io, fn, "file={}: fsync failed: {}", target, errno_text(errno));
  if (const int e = fd.close(); e != 0)
    detail::fail(ErrorCode::io, fn, "file={}: close failed: {}", target, errno_text(e));
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    detail::fail(ErrorCode::io, fn, "file={}: rename from {} failed: {}", target, tmp.string(),
                 errno_text(errno));
  guard.armed = false;
  // Best effort: make the rename itself durable.
  const std::filesystem::path dir =
      path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace autoglm
