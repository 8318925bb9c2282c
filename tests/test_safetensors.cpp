// SPDX-License-Identifier: Apache-2.0
// io/safetensors.hpp: writer round trips, a hand-built file against values computed here,
// every hostile-file check (single and sharded), in-place and misaligned loading, the
// aliasing Tensor constructor, and that a failed open leaves no descriptor or mapping behind.
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "backends.hpp"
#include "support.hpp"

using namespace autoglm;
using namespace std::string_literals;
namespace fs = std::filesystem;

namespace {

Backend& cpu() { return agt::CpuOneThread::get(); }

/// A fresh directory under the system temp dir, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() / fmt::format("autoglm_st_{}_{}", ::getpid(), counter++);
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>(v >> (8 * i) & 0xffu);
  return s;
}

/// 8-byte little-endian length, header, data.
std::string raw_file(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

/// The header padded with spaces so the data section starts at a multiple of 8.
std::string padded(std::string header) {
  while ((8 + header.size()) % 8 != 0) header += ' ';
  return header;
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

/// from_buffer over a copy of `bytes` that the file keeps alive.
SafeTensorsFile from_string(const std::string& bytes) {
  auto owned = std::make_shared<std::string>(bytes);
  return SafeTensorsFile::from_buffer(
      std::span<const std::byte>(reinterpret_cast<const std::byte*>(owned->data()), owned->size()), owned,
      "test-buffer");
}

std::string bytes_of(const void* p, std::size_t n) { return std::string(static_cast<const char*>(p), n); }

template <typename T>
std::string bytes_of(const std::vector<T>& v) {
  return bytes_of(v.data(), v.size() * sizeof(T));
}

/// A JSON object of the given members.
std::string obj(std::initializer_list<std::string> members) {
  std::string s = "{";
  for (const std::string& m : members) {
    if (s.size() > 1) s += ',';
    s += m;
  }
  return s + "}";
}

/// A one-tensor header entry.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  std::uint64_t begin, std::uint64_t end) {
  return fmt::format(R"("{}":{{"dtype":"{}","shape":{},"data_offsets":[{},{}]}})", name, dtype, shape, begin,
                     end);
}

/// Requires both SafeTensorsFile::open (from a file) and ::from_buffer to reject `bytes` with
/// ErrorCode::io and a message containing every part.
void require_hostile(const std::string& bytes, const std::vector<std::string>& parts) {
  TempDir dir;
  const fs::path p = dir / "hostile.safetensors";
  write_file(p, bytes);
  std::vector<std::string> file_parts = parts, buffer_parts = parts;
  file_parts.push_back("[SafeTensorsFile::open]");
  file_parts.push_back(fmt::format("file={}", p.string()));
  buffer_parts.push_back("[SafeTensorsFile::from_buffer]");
  buffer_parts.push_back("file=test-buffer");
  CHECK_THROWS_MATCHES(SafeTensorsFile::open(p), Error, agt::ErrorMatcher(ErrorCode::io, file_parts));
  CHECK_THROWS_MATCHES(from_string(bytes), Error, agt::ErrorMatcher(ErrorCode::io, buffer_parts));
}

bool inside(const void* p, std::span<const std::byte> buf) {
  const auto* b = reinterpret_cast<const std::byte*>(p);
  return b >= buf.data() && b < buf.data() + buf.size();
}

/// Open descriptors and mappings of this process whose target mentions `needle`.
std::pair<int, int> fds_and_maps(const std::string& needle) {
  int fds = 0, maps = 0;
  for (const auto& e : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const fs::path target = fs::read_symlink(e.path(), ec);
    if (!ec && target.string().find(needle) != std::string::npos) ++fds;
  }
  std::ifstream m("/proc/self/maps");
  for (std::string line; std::getline(m, line);)
    if (line.find(needle) != std::string::npos) ++maps;
  return {fds, maps};
}

std::vector<std::byte> as_bytes(const std::string& s) {
  std::vector<std::byte> v(s.size());
  std::memcpy(v.data(), s.data(), s.size());
  return v;
}

}  // namespace

TEST_CASE("safetensors: dtype tags", "[safetensors]") {
  for (DType d : {DType::f32, DType::f16, DType::bf16, DType::i8, DType::i32})
    CHECK(dtype_from_safetensors_tag(safetensors_dtype_tag(d)) == d);
  CHECK_FALSE(dtype_from_safetensors_tag("U8").has_value());
  CHECK_FALSE(dtype_from_safetensors_tag("F64").has_value());
  CHECK_FALSE(dtype_from_safetensors_tag("f32").has_value());  // tags are upper case
  CHECK_FALSE(dtype_from_safetensors_tag("").has_value());
}

TEST_CASE("safetensors: writer round trip", "[safetensors]") {
  TempDir dir;
  const auto f32 = agt::random_floats(15, 1);
  std::vector<std::uint16_t> f16(7), bf16(6);
  for (std::size_t i = 0; i < f16.size(); ++i) f16[i] = float_to_f16(0.5f * static_cast<float>(i) - 1.0f);
  for (std::size_t i = 0; i < bf16.size(); ++i) bf16[i] = float_to_bf16(3.0f - static_cast<float>(i));
  const std::vector<std::int8_t> i8{-128, -1, 0, 1, 127, 5, 6, 7, 8};
  const std::vector<std::int32_t> i32{-7, 0, 1 << 30, 42};
  const std::vector<double> f64{1.0, -2.0};
  const float scalar = 6.25f;
  const std::vector<SafeTensorsEntry> entries{
      {"model.w", "F32", {3, 5}, f32.data(), f32.size() * 4},
      {"h16", "F16", {7}, f16.data(), f16.size() * 2},
      {"hb", "BF16", {2, 3}, bf16.data(), bf16.size() * 2},
      {"q", "I8", {9}, i8.data(), i8.size()},
      {"ids", "I32", {2, 2}, i32.data(), i32.size() * 4},
      {"scalar", "F32", {}, &scalar, 4},
      {"empty", "F32", {0, 3}, nullptr, 0},
      {"wide", "F64", {2}, f64.data(), f64.size() * 8},
  };
  const std::map<std::string, std::string> meta{{"format", "pt"}, {"note", "ünïcode ✓"}};
  const fs::path p = dir / "rt.safetensors";
  save_safetensors(p, entries, meta);

  SECTION("contents, header padding and alignment") {
    const std::string bytes = read_file(p);
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
    CHECK((8 + n) % 8 == 0);
    CHECK(bytes[8] == '{');
    CHECK(as_bytes(bytes) == serialize_safetensors(entries, meta));
    // No temporary left beside the file.
    CHECK(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()) == 1);

    const SafeTensorsFile f = SafeTensorsFile::open(p);
    CHECK(f.metadata() == meta);
    CHECK(f.names() == std::vector<std::string>{"empty", "h16", "hb", "ids", "model.w", "q", "scalar", "wide"});
    for (const SafeTensorsEntry& e : entries) {
      INFO(e.name);
      const TensorInfo& t = f.at(e.name);
      CHECK(t.dtype_tag == e.dtype);
      CHECK(t.nbytes == e.nbytes);
      REQUIRE(t.extents.size() == e.shape.size());
      for (std::size_t i = 0; i < e.shape.size(); ++i) CHECK(t.extents[i] == static_cast<std::uint64_t>(e.shape[i]));
      CHECK(bytes_of(t.data, t.nbytes) == bytes_of(e.data, e.nbytes));
      // Sorted by element size: every tensor is aligned for its dtype in the file.
      const std::size_t elem = e.dtype == "F64" ? 8 : e.dtype == "I8" ? 1 : e.dtype.back() == '6' ? 2 : 4;
      CHECK(t.offset % elem == 0);
      CHECK(reinterpret_cast<std::uintptr_t>(t.data) % elem == 0);
      if (t.nbytes > 0) CHECK(inside(t.data, f.buffer()));
    }
    CHECK(f.at("model.w").shape == Shape{3, 5});
    CHECK(f.at("scalar").shape == Shape{});
    CHECK(f.at("empty").shape == Shape{0, 3});
    CHECK_FALSE(f.at("wide").loadable());
  }

  SECTION("load to the backend") {
    const SafeTensorsFile f = SafeTensorsFile::open(p);
    Tensor w = f.load(cpu(), "model.w");
    CHECK(w.shape() == Shape{3, 5});
    CHECK(agt::host_f32(cpu(), w) == f32);
    std::vector<float> want16, wantb;
    for (auto h : f16) want16.push_back(f16_to_float(h));
    for (auto h : bf16) wantb.push_back(bf16_to_float(h));
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "h16")) == want16);
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "hb")) == wantb);
    CHECK(agt::host_u16(cpu(), f.load(cpu(), "hb", DType::bf16)) == bf16);
    CHECK(agt::host_i32(cpu(), f.load(cpu(), "ids", DType::i32)) == i32);
    Tensor q = f.load(cpu(), "q", DType::i8);
    std::vector<std::int8_t> got(9);
    cpu().copy_to_host(got.data(), q);
    CHECK(got == i8);
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "scalar")) == std::vector<float>{6.25f});
    CHECK(f.load(cpu(), "empty").shape() == Shape{0, 3});
    CHECK(f.load(cpu(), "empty").defined());
  }

  SECTION("overwrite is atomic and leaves no temporary") {
    const std::vector<SafeTensorsEntry> small{{"x", "F32", {1}, &scalar, 4}};
    save_safetensors(p, small);
    CHECK(SafeTensorsFile::open(p).names() == std::vector<std::string>{"x"});
    CHECK(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()) == 1);
  }
}

TEST_CASE("safetensors: writer rejects bad entries", "[safetensors]") {
  TempDir dir;
  const float v[4] = {1, 2, 3, 4};
  using E = std::vector<SafeTensorsEntry>;
  CHECK_ERROR(serialize_safetensors(E{{"a", "F32", {1}, v, 4}, {"a", "F32", {1}, v, 4}}), invalid_argument,
              "[serialize_safetensors]", "duplicate tensor name 'a'");
  CHECK_ERROR(serialize_safetensors(E{{"__metadata__", "F32", {1}, v, 4}}), invalid_argument, "reserved");
  CHECK_ERROR(serialize_safetensors(E{{"a", "F33", {1}, v, 4}}), invalid_argument, "unknown dtype 'F33'");
  CHECK_ERROR(serialize_safetensors(E{{"a", "F32", {-1}, v, 4}}), invalid_argument, "negative extent -1");
  CHECK_ERROR(serialize_safetensors(E{{"a", "F32", {3}, v, 16}}), invalid_argument, "needs 12 bytes, entry has 16");
  CHECK_ERROR(serialize_safetensors(E{{"a", "F4", {3}, v, 2}}), invalid_argument, "not a whole number of bytes");
  CHECK_ERROR(serialize_safetensors(E{{"a", "F32", {1}, nullptr, 4}}), invalid_argument, "no data");
  CHECK_ERROR(serialize_safetensors(E{{"a", "F32", {1ll << 62, 1ll << 62}, v, 4}}), invalid_argument, "overflows");
  CHECK_ERROR(serialize_safetensors(E{{"bad\xff", "F32", {1}, v, 4}}), invalid_argument, "UTF-8");
  // A failed save creates nothing.
  CHECK_ERROR(save_safetensors(dir / "x.safetensors", E{{"a", "F33", {1}, v, 4}}), invalid_argument,
              "[save_safetensors]");
  CHECK_ERROR(save_safetensors(dir / "missing" / "x.safetensors", E{{"a", "F32", {1}, v, 4}}), io,
              "[save_safetensors]", "cannot create");
  CHECK(fs::is_empty(dir.path()));

  SECTION("entries from CPU views") {
    Tensor t(cpu(), DType::f32, Shape{2, 2});
    cpu().copy_from_host(t, v);
    save_safetensors(dir / "t.safetensors", E{safetensors_entry("t", t)});
    CHECK(agt::host_f32(cpu(), SafeTensorsFile::open(dir / "t.safetensors").load(cpu(), "t")) ==
          std::vector<float>{1, 2, 3, 4});
    CHECK_ERROR(safetensors_entry("t", agt::on_other_device(cpu(), t)), device, "[safetensors_entry]", "'t'");
  }
}

TEST_CASE("safetensors: hand-built file against expected values", "[safetensors]") {
  // Values chosen here and encoded by hand, little-endian, independent of the writer.
  const std::string a = "\x00\x00\xc0\x3f"    // 1.5f   = 0x3fc00000
                        "\x00\x00\x00\xc0"    // -2.0f  = 0xc0000000
                        "\x00\x00\x80\x3e"    // 0.25f  = 0x3e800000
                        "\x00\x00\x00\x41"s;  // 8.0f   = 0x41000000
  const std::string b = "\xc0\x3f\x00\xc0"s;  // bf16 1.5 (0x3fc0), -2.0 (0xc000)
  const std::string c = "\x00\x3c\x00\xc1"s;  // f16 1.0 (0x3c00), -2.5 (0xc100)
  const std::string d = "\x7f\x80\xff"s;      // i8 127, -128, -1
  const std::string e = "\x05\x00\x00\x00"s;  // i32 5
  const std::string u = "\x09"s;              // U8 9 (unsupported dtype)
  const std::string header = padded(
      obj({entry("e", "I32", "[1]", 24, 28), entry("a", "F32", "[2,2]", 0, 16),
      entry("b", "BF16", "[2]", 16, 20), entry("c", "F16", "[2]", 20, 24),
      entry("d", "I8", "[3]", 28, 31), entry("u", "U8", "[1]", 31, 32),
      R"("__metadata__":{"format":"pt","source":"hand"})"}));
  const std::string bytes = raw_file(header, a + b + c + e + d + u);
  TempDir dir;
  write_file(dir / "hand.safetensors", bytes);

  for (const bool from_file : {true, false}) {
    INFO("from_file=" << from_file);
    const SafeTensorsFile f = from_file ? SafeTensorsFile::open(dir / "hand.safetensors") : from_string(bytes);
    CHECK(f.size() == 6);
    CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"source", "hand"}});
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "a")) == std::vector<float>{1.5f, -2.0f, 0.25f, 8.0f});
    CHECK(f.load(cpu(), "a").shape() == Shape{2, 2});
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "b")) == std::vector<float>{1.5f, -2.0f});
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "c")) == std::vector<float>{1.0f, -2.5f});
    CHECK(agt::host_i32(cpu(), f.load(cpu(), "e", DType::i32)) == std::vector<std::int32_t>{5});
    std::vector<std::int8_t> got(3);
    cpu().copy_to_host(got.data(), f.load(cpu(), "d", DType::i8));
    CHECK(got == std::vector<std::int8_t>{127, -128, -1});
    // f32 -> bf16 through the backend.
    CHECK(agt::host_u16(cpu(), f.load(cpu(), "a", DType::bf16)) ==
          std::vector<std::uint16_t>{0x3fc0, 0xc000, 0x3e80, 0x4100});
    // The U8 tensor is only an Error when requested; it names the tensor and the dtype.
    CHECK_FALSE(f.at("u").loadable());
    CHECK(f.at("u").nbytes == 1);
    CHECK_ERROR(f.load(cpu(), "u"), unsupported, "[SafeTensorsFile::load]", "tensor 'u'", "'U8'");
    CHECK_ERROR(f.host_view("u"), unsupported, "[SafeTensorsFile::host_view]", "tensor 'u'", "'U8'");
    // Integers never convert.
    CHECK_ERROR(f.load(cpu(), "d"), dtype_mismatch, "tensor 'd'", "I8", "as f32");
    CHECK_ERROR(f.load(cpu(), "a", DType::i32), dtype_mismatch, "tensor 'a'", "as i32");
    // Missing names.
    CHECK(f.find("nope") == nullptr);
    CHECK_ERROR(f.at("nope"), not_found, "no tensor 'nope'");
    CHECK_ERROR(f.load(cpu(), "nope"), not_found, "[SafeTensorsFile::load]", "no tensor 'nope'");
    CHECK_ERROR(f.host_view("nope"), not_found, "no tensor 'nope'");
  }
}

TEST_CASE("safetensors: in-place loading keeps the mapping alive", "[safetensors]") {
  TempDir dir;
  const auto vals = agt::random_floats(64, 7);
  const std::vector<SafeTensorsEntry> es{{"w", "F32", {8, 8}, vals.data(), 256}};
  save_safetensors(dir / "w.safetensors", es);
  Tensor in_place, copied, via_model;
  {
    const SafeTensorsFile f = SafeTensorsFile::open(dir / "w.safetensors");
    in_place = f.load(cpu(), "w");
    copied = f.load(cpu(), "w", DType::f32, LoadMode::copy);
    CHECK(inside(in_place.data<float>(), f.buffer()));
    CHECK(in_place.data<float>() == static_cast<const void*>(f.at("w").data));
    CHECK_FALSE(inside(copied.data<float>(), f.buffer()));
    CHECK(in_place.backend() == &cpu());
    const HostTensor h = f.host_view("w");
    CHECK(h.view.data == static_cast<const void*>(f.at("w").data));
    via_model = SafeTensorsModel::open(dir / "w.safetensors").load(cpu(), "w");
  }
  // The file objects are gone; the tensors still read the (mapped) bytes.
  CHECK(agt::host_f32(cpu(), in_place) == vals);
  CHECK(agt::host_f32(cpu(), copied) == vals);
  CHECK(agt::host_f32(cpu(), via_model) == vals);
  // Two mappings (the file and the model opened it separately), no descriptor: fds close at open.
  CHECK(fds_and_maps(dir.path().string()) == std::pair{0, 2});
  in_place = Tensor();
  via_model = Tensor();
  CHECK(fds_and_maps(dir.path().string()) == std::pair{0, 0});
}

TEST_CASE("safetensors: misaligned data is copied before use", "[safetensors]") {
  // The data section starts at 8 + 17 = 25: an F32 at offset 0 is 1 byte past 4-alignment
  // (the mapping and std::string buffers are at least 8-aligned), an F16 at offset 8 too.
  const float vals[2] = {3.5f, -0.125f};
  const std::uint16_t halves[2] = {0x3c00, 0xbc00};  // f16 1.0, -1.0
  std::string header = obj({entry("x", "F32", "[2]", 0, 8), entry("h", "F16", "[2]", 8, 12)});
  while ((8 + header.size()) % 8 != 1) header += ' ';
  const std::string bytes = raw_file(header, bytes_of(vals, 8) + bytes_of(halves, 4));
  TempDir dir;
  write_file(dir / "odd.safetensors", bytes);
  for (const bool from_file : {true, false}) {
    INFO("from_file=" << from_file);
    const SafeTensorsFile f = from_file ? SafeTensorsFile::open(dir / "odd.safetensors") : from_string(bytes);
    const TensorInfo& x = f.at("x");
    REQUIRE(reinterpret_cast<std::uintptr_t>(x.data) % 4 != 0);
    const HostTensor h = f.host_view("x");
    CHECK(h.view.data != static_cast<const void*>(x.data));
    CHECK(reinterpret_cast<std::uintptr_t>(h.view.data) % 64 == 0);
    CHECK(std::memcmp(h.view.data, vals, 8) == 0);
    Tensor t = f.load(cpu(), "x");
    CHECK_FALSE(inside(t.data<float>(), f.buffer()));
    CHECK(reinterpret_cast<std::uintptr_t>(t.data<float>()) % 4 == 0);
    CHECK(agt::host_f32(cpu(), t) == std::vector<float>{3.5f, -0.125f});
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "h")) == std::vector<float>{1.0f, -1.0f});
    CHECK(agt::host_u16(cpu(), f.load(cpu(), "h", DType::f16)) == std::vector<std::uint16_t>{0x3c00, 0xbc00});
  }
}

TEST_CASE("safetensors: Tensor aliasing constructor", "[safetensors][tensor]") {
  float buf[6] = {1, 2, 3, 4, 5, 6};
  auto owner = std::make_shared<int>(0);
  const TensorView v{buf, DType::f32, cpu().device(), Shape{2, 3}};
  {
    Tensor t(cpu(), v, owner);
    CHECK(owner.use_count() == 2);
    Tensor copy = t;
    CHECK(owner.use_count() == 3);
    CHECK(t.data<float>() == buf);
    CHECK(t.defined());
    CHECK(agt::host_f32(cpu(), copy) == std::vector<float>{1, 2, 3, 4, 5, 6});
  }
  CHECK(owner.use_count() == 1);
  CHECK(Tensor(cpu(), TensorView{nullptr, DType::f32, cpu().device(), Shape{0}}, owner).defined());
  CHECK_ERROR(Tensor(cpu(), v, nullptr), invalid_argument, "[Tensor]", "owner");
  CHECK_ERROR(Tensor(cpu(), agt::on_other_device(cpu(), v), owner), device, "[Tensor]");
  CHECK_ERROR(Tensor(cpu(), TensorView{nullptr, DType::f32, cpu().device(), Shape{2}}, owner), invalid_argument,
              "[Tensor]", "no buffer");
}

TEST_CASE("safetensors: hostile single files", "[safetensors][hostile]") {
  const std::string f32x2 = std::string(8, '\0');
  const std::string ok = obj({entry("a", "F32", "[2]", 0, 8)});

  SECTION("valid baseline") { CHECK(from_string(raw_file(ok, f32x2)).size() == 1); }
  SECTION("truncated") {
    require_hostile("", {"0 bytes, shorter than the 8-byte header length"});
    require_hostile("\x05\x00\x00"s, {"3 bytes, shorter than the 8-byte header length"});
    require_hostile(raw_file(ok, f32x2).substr(0, 7), {"7 bytes"});
    // Truncated inside the header or the data.
    const std::string full = raw_file(ok, f32x2);
    require_hostile(full.substr(0, 20), {"header length", "runs past the end of the file (20 bytes)"});
    require_hostile(full.substr(0, full.size() - 1), {"tensor 'a' ends at byte 8", "(7 bytes)"});
  }
  SECTION("header length too big or past EOF") {
    require_hostile(le64(100'000'001) + "{}", {"header length 100000001 exceeds the limit of 100000000"});
    require_hostile(le64(~std::uint64_t{0}) + "{}", {"header length 18446744073709551615 exceeds"});
    require_hostile(le64(50) + "{}", {"header length 50 runs past the end of the file (10 bytes)"});
    require_hostile(le64(100'000'000) + "{}", {"header length 100000000 runs past the end"});
  }
  SECTION("header must start with '{'") {
    require_hostile(raw_file(std::string(" ") + ok, f32x2), {"does not start with '{'", "0x20"});
    require_hostile(raw_file("[]"), {"does not start with '{'", "0x5b"});
    require_hostile(raw_file("\xef\xbb\xbf{}"), {"does not start with '{'", "0xef"});  // UTF-8 BOM
    require_hostile(raw_file(""), {"does not start with '{'", "empty"});
  }
  SECTION("invalid JSON or UTF-8") {
    require_hostile(raw_file(R"({"a":)"), {"invalid JSON header"});
    require_hostile(raw_file(R"({} x)"), {"invalid JSON header"});
    require_hostile(raw_file(R"({"__metadata__":{}}})"), {"invalid JSON header"});
    require_hostile(raw_file("{\"\xff\":1}"), {"invalid JSON header", "UTF-8"});
    require_hostile(raw_file("{\"a\xc3\":1}"), {"invalid JSON header", "UTF-8"});
    require_hostile(raw_file("{\"a\":{\"dtype\":\"F32\x01\"}}"), {"invalid JSON header"});
    require_hostile(raw_file(std::string("{\0}", 3)), {"invalid JSON header"});
  }
  SECTION("duplicates") {
    require_hostile(raw_file(obj({entry("a", "F32", "[1]", 0, 4), entry("a", "F32", "[1]", 4, 8)}), f32x2),
                    {"duplicate tensor name 'a'"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", f32x2),
                    {"tensor 'a': duplicate key 'dtype'"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","x":1,"x":2,"shape":[2],"data_offsets":[0,8]}})", f32x2),
                    {"tensor 'a': duplicate key 'x'"});
    require_hostile(raw_file(R"({"__metadata__":{"k":"1","k":"2"}})"), {"__metadata__: duplicate key 'k'"});
    require_hostile(raw_file(R"({"__metadata__":{},"__metadata__":{}})"), {"duplicate key '__metadata__'"});
  }
  SECTION("coverage of the data section") {
    // gap between tensors, and before the first
    require_hostile(raw_file(obj({entry("a", "F32", "[1]", 0, 4), entry("b", "F32", "[1]", 8, 12)}),
                             std::string(12, '\0')),
                    {"tensor 'b' begins at byte 8", "previous tensor 'a' ends at byte 4", "gap of 4 bytes"});
    require_hostile(raw_file(obj({entry("a", "F32", "[1]", 4, 8)}), f32x2), {"tensor 'a'", "not at 0"});
    // overlap
    require_hostile(raw_file(obj({entry("a", "F32", "[2]", 0, 8), entry("b", "F32", "[2]", 4, 12)}),
                             std::string(12, '\0')),
                    {"tensor 'b' begins at byte 4", "inside the previous tensor 'a'", "overlap"});
    require_hostile(raw_file(obj({entry("a", "F32", "[2]", 0, 8), entry("b", "F32", "[2]", 0, 8)}), f32x2),
                    {"overlap"});
    // trailing bytes, and a file holding bytes but no tensors
    require_hostile(raw_file(ok, f32x2 + "abcd"), {"4 trailing bytes after the last tensor 'a'"});
    require_hostile(raw_file("{}", "x"), {"1 trailing bytes"});
    // past the end of the data section
    require_hostile(raw_file(obj({entry("a", "F32", "[4]", 0, 16)}), f32x2),
                    {"tensor 'a' ends at byte 16, past the end of the data section (8 bytes)"});
    // offsets out of order: end before begin
    require_hostile(raw_file(obj({entry("a", "F32", "[1]", 8, 4)}), f32x2),
                    {"tensor 'a': data_offsets [8, 4] end before they begin"});
  }
  SECTION("tensors listed out of offset order are fine") {
    const std::string h = obj({entry("z", "F32", "[1]", 0, 4), entry("a", "F32", "[1]", 4, 8)});
    const float v[2] = {1.0f, 2.0f};
    const SafeTensorsFile f = from_string(raw_file(h, bytes_of(v, 8)));
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "a")) == std::vector<float>{2.0f});
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "z")) == std::vector<float>{1.0f});
  }
  SECTION("shape × dtype against the byte size") {
    require_hostile(raw_file(obj({entry("a", "F32", "[3]", 0, 8)}), f32x2),
                    {"tensor 'a': shape [3] × F32 is 12 bytes, but data_offsets [0, 8] hold 8"});
    require_hostile(raw_file(obj({entry("a", "BF16", "[2,3]", 0, 8)}), f32x2), {"is 12 bytes", "hold 8"});
    require_hostile(raw_file(obj({entry("a", "F32", "[4294967296,4294967296]", 0, 8)}), f32x2),
                    {"tensor 'a': shape [4294967296, 4294967296] × F32 overflows 64 bits"});
    require_hostile(raw_file(obj({entry("a", "F64", "[2305843009213693952]", 0, 8)}), f32x2),
                    {"overflows 64 bits"});
    require_hostile(raw_file(obj({entry("a", "F4", "[3]", 0, 2)}), "ab"), {"not a whole number of bytes"});
  }
  SECTION("malformed entries") {
    require_hostile(raw_file(R"({"a":1})"), {"tensor 'a' must be an object, got the number 1"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","shape":[2]}})", f32x2), {"tensor 'a' has no data_offsets"});
    require_hostile(raw_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", f32x2), {"tensor 'a' has no dtype"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", f32x2), {"tensor 'a' has no shape"});
    require_hostile(raw_file(R"({"a":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", f32x2),
                    {"tensor 'a': dtype must be a string, got the number 7"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", f32x2),
                    {"tensor 'a': shape must be an array of non-negative integers, got the number -2"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", f32x2),
                    {"shape must be", "got the number 2.0"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", f32x2),
                    {"shape must be", "got an array"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", f32x2),
                    {"shape must be", "got the number 2"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", f32x2),
                    {"data_offsets has more than 2 entries"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", f32x2),
                    {"data_offsets must have 2 entries, got 1"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551616]}})", f32x2),
                    {"data_offsets must be two non-negative integers"});
    require_hostile(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,null]}})", f32x2),
                    {"data_offsets must be two non-negative integers, got null"});
  }
  SECTION("__metadata__ is string -> string only") {
    require_hostile(raw_file(R"({"__metadata__":{"k":1}})"), {"__metadata__ value of 'k' must be a string, got the number 1"});
    require_hostile(raw_file(R"({"__metadata__":{"k":{"x":"y"}}})"), {"value of 'k' must be a string, got an object"});
    require_hostile(raw_file(R"({"__metadata__":{"k":["x"]}})"), {"got an array"});
    require_hostile(raw_file(R"({"__metadata__":"pt"})"), {"__metadata__ must be an object of strings, got a string"});
    require_hostile(raw_file(R"({"__metadata__":[]})"), {"__metadata__ must be an object"});
    CHECK(from_string(raw_file(R"({"__metadata__":null})")).metadata().empty());
    CHECK(from_string(raw_file(R"({"__metadata__":{}})")).metadata().empty());
  }
  SECTION("unknown fields are ignored, however nested") {
    const std::string h = R"({"a":{"x":{"y":[1,[2,{"z":null}],-3.5]},"dtype":"F32","shape":[2],"data_offsets":[0,8],"q":true}})";
    CHECK(from_string(raw_file(h + "   ", f32x2)).at("a").shape == Shape{2});  // trailing spaces too
  }
  SECTION("unsupported tensors fail only when requested") {
    const std::string h = obj({entry("a", "F32", "[1]", 0, 4), entry("q4", "Q4_K", "[7]", 4, 6),
                          entry("f8", "F8_E4M3", "[2]", 6, 8), entry("r5", "I8", "[1,1,1,1,2]", 8, 10),
                          entry("z", "F32", "[0,9223372036854775808]", 10, 10),
                          entry("big", "I8", "[0,4611686018427387904,4]", 10, 10)});
    const float one = 1.0f;
    const SafeTensorsFile f = from_string(raw_file(h, bytes_of(&one, 4) + "abcdef"));
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "a")) == std::vector<float>{1.0f});
    CHECK(f.at("q4").nbytes == 2);
    CHECK_ERROR(f.load(cpu(), "q4"), unsupported, "tensor 'q4'", "'Q4_K'", "not a safetensors dtype");
    CHECK_ERROR(f.load(cpu(), "f8"), unsupported, "tensor 'f8'", "'F8_E4M3'", "autoglm does not hold");
    CHECK_ERROR(f.load(cpu(), "r5", DType::i8), unsupported, "tensor 'r5'", "rank 5 > 4");
    CHECK_ERROR(f.host_view("z"), unsupported, "tensor 'z'", "do not fit int64");
    CHECK_ERROR(f.host_view("big"), unsupported, "tensor 'big'", "do not fit int64");
  }
  SECTION("empty files, zero-size and rank-0 tensors") {
    CHECK(from_string(raw_file("{}")).size() == 0);
    CHECK(from_string(raw_file(padded("{}"))).size() == 0);
    const std::string h = obj({entry("e", "F32", "[0]", 0, 0), entry("s", "F32", "[]", 0, 4),
                          entry("e2", "F16", "[3,0]", 4, 4)});
    const SafeTensorsFile f = from_string(raw_file(h, "\x00\x00\x80\x3f"s));
    CHECK(f.load(cpu(), "e").numel() == 0);
    CHECK(f.load(cpu(), "e2").shape() == Shape{3, 0});
    CHECK(agt::host_f32(cpu(), f.load(cpu(), "s")) == std::vector<float>{1.0f});
  }
}

TEST_CASE("safetensors: sharded checkpoints", "[safetensors]") {
  TempDir dir;
  const float va[2] = {1, 2}, vb[3] = {3, 4, 5}, vc[1] = {6};
  using E = std::vector<SafeTensorsEntry>;
  save_safetensors(dir / "model-00001-of-00002.safetensors",
                   E{{"a", "F32", {2}, va, 8}, {"b", "F32", {3}, vb, 12}}, {{"format", "pt"}});
  fs::create_directories(dir / "sub");
  save_safetensors(dir / "sub" / "model-00002-of-00002.safetensors", E{{"c", "F32", {1}, vc, 4}},
                   {{"format", "pt"}});
  const std::string index = R"({"metadata":{"total_size":24},"weight_map":{
      "a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors",
      "c":"sub/model-00002-of-00002.safetensors"}})";
  write_file(dir / "model.safetensors.index.json", index);

  SECTION("open the directory or the index") {
    for (const fs::path& p : {dir.path(), dir / "model.safetensors.index.json"}) {
      const SafeTensorsModel m = SafeTensorsModel::open(p);
      CHECK(m.names() == std::vector<std::string>{"a", "b", "c"});
      CHECK(m.shards().size() == 2);
      CHECK(m.metadata() == std::map<std::string, std::string>{{"format", "pt"}});
      CHECK(agt::host_f32(cpu(), m.load(cpu(), "b")) == std::vector<float>{3, 4, 5});
      CHECK(agt::host_f32(cpu(), m.load(cpu(), "c")) == std::vector<float>{6});
      CHECK(m.file_of("c").source().find("sub/model-00002") != std::string::npos);
      CHECK(m.find("c") != nullptr);
      CHECK(m.find("c")->nbytes == 4);
      CHECK(m.find("zz") == nullptr);
      CHECK(std::memcmp(m.host_view("a").view.data, va, 8) == 0);
      CHECK_ERROR(m.load(cpu(), "zz"), not_found, "no tensor 'zz'");
      CHECK_ERROR(m.at("zz"), not_found, "no tensor 'zz'");
    }
  }
  SECTION("a directory with model.safetensors, and with neither") {
    TempDir single;
    save_safetensors(single / "model.safetensors", E{{"w", "F32", {1}, vc, 4}});
    CHECK(SafeTensorsModel::open(single.path()).names() == std::vector<std::string>{"w"});
    TempDir empty;
    CHECK_ERROR(SafeTensorsModel::open(empty.path()), not_found, "[SafeTensorsModel::open]", "neither");
    CHECK_ERROR(SafeTensorsModel::open(empty / "x.safetensors"), not_found, "cannot open", "x.safetensors");
  }

  const auto require_bad_index = [&](const std::string& text, ErrorCode code, std::vector<std::string> parts) {
    write_file(dir / "model.safetensors.index.json", text);
    parts.push_back("[SafeTensorsModel::open]");
    CHECK_THROWS_MATCHES(SafeTensorsModel::open(dir.path()), Error, agt::ErrorMatcher(code, parts));
  };
  SECTION("hostile indexes") {
    require_bad_index(R"({"weight_map":{"a":"model-00003-of-00002.safetensors"}})", ErrorCode::not_found,
                      {"shard 'model-00003-of-00002.safetensors'", "tensor 'a'", "cannot open"});
    require_bad_index(R"({"weight_map":{"a":"../model-00001-of-00002.safetensors"}})", ErrorCode::io,
                      {"tensor 'a'", "'../model-00001-of-00002.safetensors'", "'..' would leave"});
    require_bad_index(R"({"weight_map":{"a":"sub/../../x.safetensors"}})", ErrorCode::io, {"'..' would leave"});
    require_bad_index(R"({"weight_map":{"a":"/etc/passwd"}})", ErrorCode::io, {"'/etc/passwd'", "absolute"});
    require_bad_index(R"({"weight_map":{"a":"x\u0000.safetensors"}})", ErrorCode::io, {"NUL byte"});
    require_bad_index(R"({"weight_map":{"a":""}})", ErrorCode::io, {"empty shard name"});
    require_bad_index(R"({"weight_map":{"c":"model-00001-of-00002.safetensors"}})", ErrorCode::io,
                      {"assigns tensor 'c' to shard 'model-00001-of-00002.safetensors', which does not hold it"});
    require_bad_index(R"({"weight_map":{"a":"model-00001-of-00002.safetensors","a":"x"}})", ErrorCode::io,
                      {"duplicate key 'a'"});
    require_bad_index(R"({"weight_map":{},"weight_map":{}})", ErrorCode::io, {"duplicate key 'weight_map'"});
    require_bad_index(R"({"metadata":{}})", ErrorCode::io, {"no weight_map"});
    require_bad_index(R"({"weight_map":"x"})", ErrorCode::io, {"weight_map must be an object, got a string"});
    require_bad_index(R"({"weight_map":{"a":{"x":1}}})", ErrorCode::io, {"tensor 'a' must be a shard file name, got an object"});
    // Other keys are skipped whatever they hold.
    write_file(dir / "model.safetensors.index.json",
               R"({"metadata":{"total_size":24,"x":[[[{"y":null}]],true,-1.5]},"extra":[1,2],"weight_map":{
                   "a":"model-00001-of-00002.safetensors"}})");
    CHECK(SafeTensorsModel::open(dir.path()).names() == std::vector<std::string>{"a"});
    require_bad_index(R"({"weight_map":[]})", ErrorCode::io, {"weight_map must be an object, got an array"});
    require_bad_index(R"({"weight_map":{}})", ErrorCode::io, {"weight_map is empty"});
    require_bad_index(R"({"weight_map":{"a":3}})", ErrorCode::io, {"tensor 'a' must be a shard file name"});
    require_bad_index(R"([])", ErrorCode::io, {"must be a JSON object"});
    require_bad_index(R"({"weight_map":)", ErrorCode::io, {"invalid JSON"});
    require_bad_index("{\"weight_map\":{\"\xff\":\"x\"}}", ErrorCode::io, {"invalid JSON"});
    // A hostile shard: the error names the index, the shard and the shard's own defect.
    write_file(dir / "bad.safetensors", "abc");
    require_bad_index(R"({"weight_map":{"a":"bad.safetensors"}})", ErrorCode::io,
                      {"shard 'bad.safetensors'", "3 bytes, shorter than the 8-byte header length"});
    // A directory as a shard.
    require_bad_index(R"({"weight_map":{"a":"sub"}})", ErrorCode::io, {"not a regular file"});
  }
}

TEST_CASE("safetensors: a failed open leaves nothing behind", "[safetensors][hostile]") {
  TempDir dir;
  const std::string needle = dir.path().string();
  const std::vector<std::string> bad{
      "abc",                                                        // before mmap
      le64(60) + "{}",                                               // after mmap: length
      raw_file(R"({"a":)"),                                          // after mmap: JSON
      raw_file(obj({entry("a", "F32", "[3]", 0, 8)}), std::string(8, '\0')),  // after mmap: size
  };
  const auto before = fds_and_maps(needle);
  CHECK(before == std::pair{0, 0});
  for (std::size_t i = 0; i < bad.size(); ++i) {
    const fs::path p = dir / fmt::format("bad{}.safetensors", i);
    write_file(p, bad[i]);
    for (int rep = 0; rep < 20; ++rep) CHECK_THROWS_AS(SafeTensorsFile::open(p), Error);
    CHECK_THROWS_AS(SafeTensorsModel::open(p), Error);
  }
  write_file(dir / "model.safetensors.index.json", R"({"weight_map":{"a":"bad3.safetensors"}})");
  CHECK_THROWS_AS(SafeTensorsModel::open(dir.path()), Error);
  CHECK(fds_and_maps(needle) == before);
  // And a successful open that is then dropped releases everything too.
  const float v = 1.0f;
  save_safetensors(dir / "good.safetensors", std::vector<SafeTensorsEntry>{{"a", "F32", {1}, &v, 4}});
  { const SafeTensorsFile f = SafeTensorsFile::open(dir / "good.safetensors"); CHECK(fds_and_maps(needle) == std::pair{0, 1}); }
  CHECK(fds_and_maps(needle) == before);
}

TEST_CASE("safetensors: random corruptions are Errors, never crashes", "[safetensors][hostile]") {
  // A small deterministic fuzz pass (the libFuzzer target in tests/fuzz goes further).
  const auto vals = agt::random_floats(6, 3);
  std::vector<std::uint16_t> h(4, 0x3c00);
  const std::vector<SafeTensorsEntry> es{{"w", "F32", {2, 3}, vals.data(), 24}, {"h", "BF16", {4}, h.data(), 8}};
  const std::vector<std::byte> good = serialize_safetensors(es, {{"format", "pt"}});
  std::mt19937_64 g(99);
  int accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::vector<std::byte> b = good;
    const int edits = 1 + static_cast<int>(g() % 4);
    for (int e = 0; e < edits; ++e) {
      switch (g() % 4) {
        case 0: b[g() % b.size()] = static_cast<std::byte>(g()); break;                   // overwrite
        case 1: b.resize(g() % (b.size() + 1)); if (b.empty()) b.push_back(std::byte{0}); break;  // truncate
        case 2: b.insert(b.begin() + static_cast<std::ptrdiff_t>(g() % b.size()), static_cast<std::byte>(g())); break;
        default: b[g() % std::min<std::size_t>(b.size(), 8)] = static_cast<std::byte>(g() % 256); break;  // length
      }
    }
    try {
      const SafeTensorsFile f = SafeTensorsFile::from_buffer(b);
      ++accepted;
      for (const TensorInfo& t : f.tensors()) {
        try {
          const bool integer = t.dtype == DType::i8 || t.dtype == DType::i32;
          const Tensor x = f.load(cpu(), t.name, integer ? *t.dtype : DType::f32);
          CHECK(x.numel() == t.shape->numel());
        } catch (const Error&) {
        }
      }
    } catch (const Error&) {
    }
  }
  CHECK(accepted > 0);  // some mutations (metadata bytes, data bytes) stay valid
}
