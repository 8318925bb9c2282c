// SPDX-License-Identifier: Apache-2.0
// core/dtype.hpp, core/error.hpp, core/tensor.hpp: half-precision conversions against an
// independent rounding reference (and the compiler's _Float16), Shape / TensorView / Tensor.
#include <bit>
#include <cfloat>
#include <limits>
#include <random>
#include <set>

#include "reference.hpp"
#include "support.hpp"

using namespace autoglm;
using agt::ref::half_decode;
using agt::ref::half_round;
using agt::ref::kBF16;
using agt::ref::kF16;

namespace {

bool same_nan_or_bits(std::uint16_t got, std::uint16_t want, float in, const agt::ref::HalfFormat& f) {
  if (std::isnan(in)) {
    return (got & 0x7fffu) > f.inf && ((got & 0x8000u) != 0) == std::signbit(in);
  }
  return got == want;
}

/// Every finite value of the format, the midpoints between neighbours and one float ulp either
/// side of them, float specials and subnormals, and random bit patterns; both signs.
std::vector<float> rounding_inputs(const agt::ref::HalfFormat& f) {
  std::vector<float> in;
  for (std::uint32_t mag = 0; mag < f.inf; ++mag) {
    const double lo = agt::ref::half_magnitude(mag, f), hi = agt::ref::half_magnitude(mag + 1, f);
    const auto mid = static_cast<float>((lo + hi) / 2);  // exact: one more bit than the format
    REQUIRE(static_cast<double>(mid) == (lo + hi) / 2);
    for (float v : {static_cast<float>(lo), mid, std::nextafter(mid, 0.0f),
                    std::nextafter(mid, std::numeric_limits<float>::infinity())}) {
      in.push_back(v);
      in.push_back(-v);
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(),
                  -std::numeric_limits<float>::quiet_NaN(), std::bit_cast<float>(0x7f800001u),
                  std::bit_cast<float>(0xff800001u), std::bit_cast<float>(0x7fbfffffu), FLT_MAX,
                  -FLT_MAX, FLT_MIN, std::numeric_limits<float>::denorm_min(), 1e-40f, 65504.0f,
                  65519.996f, 65520.0f, 65536.0f, 1e10f, 3.3895314e38f, 3.3961776e38f})
    in.push_back(v);
  std::mt19937 g(20240611u);
  for (int i = 0; i < (1 << 18); ++i) in.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(g())));
  return in;
}

}  // namespace

TEST_CASE("f16_to_float is exact for all 65536 bit patterns", "[dtype]") {
  std::size_t bad = 0, first = 0;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const double want = half_decode(static_cast<std::uint16_t>(h), kF16);
    const float got = f16_to_float(static_cast<std::uint16_t>(h));
    bool ok = std::isnan(want) ? std::isnan(got) && std::signbit(got) == ((h & 0x8000u) != 0)
                               : static_cast<double>(got) == want &&
                                     std::signbit(got) == ((h & 0x8000u) != 0);
#ifdef __FLT16_MAX__
    if (!std::isnan(want))  // the compiler's own conversion agrees too
      ok = ok && static_cast<float>(std::bit_cast<_Float16>(static_cast<std::uint16_t>(h))) == got;
#endif
    if (!ok && bad++ == 0) first = h;
  }
  INFO("first mismatch at 0x" << std::hex << first);
  CHECK(bad == 0);
}

TEST_CASE("float_to_f16 rounds to nearest even, subnormals, overflow to Inf, NaN stays NaN",
          "[dtype]") {
  const std::vector<float> in = rounding_inputs(kF16);
  std::size_t bad = 0, bad_compiler = 0;
  float first = 0.0f;
  for (float f : in) {
    const std::uint16_t want = half_round(f, kF16);
    const std::uint16_t got = float_to_f16(f);
    if (!same_nan_or_bits(got, want, f, kF16) && bad++ == 0) first = f;
#ifdef __FLT16_MAX__
    if (!std::isnan(f) && std::bit_cast<std::uint16_t>(static_cast<_Float16>(f)) != want)
      ++bad_compiler;  // validates the reference itself
#endif
  }
  INFO(in.size() << " inputs; first mismatch at " << first << " (bits 0x" << std::hex
                 << std::bit_cast<std::uint32_t>(first) << ")");
  CHECK(bad == 0);
  CHECK(bad_compiler == 0);

  // Hand-checked cases.
  CHECK(float_to_f16(1.0f) == 0x3c00);
  CHECK(float_to_f16(1.0f + 0x1p-11f) == 0x3c00);        // tie -> even (down)
  CHECK(float_to_f16(1.0f + 3 * 0x1p-11f) == 0x3c02);    // tie -> even (up)
  CHECK(float_to_f16(0x1p-24f) == 0x0001);               // smallest subnormal
  CHECK(float_to_f16(0x1p-25f) == 0x0000);               // tie with zero -> even
  CHECK(float_to_f16(-0x1p-25f) == 0x8000);              // keeps the sign
  CHECK(float_to_f16(3 * 0x1p-26f) == 0x0001);           // above the tie
  CHECK(float_to_f16(0x1p-14f - 0x1p-25f) == 0x0400);    // tie at the normal boundary -> even
  CHECK(float_to_f16(65504.0f) == 0x7bff);
  CHECK(float_to_f16(65519.99f) == 0x7bff);
  CHECK(float_to_f16(65520.0f) == 0x7c00);               // tie with the overflow -> Inf
  CHECK(float_to_f16(-1e30f) == 0xfc00);
  CHECK(float_to_f16(1e-40f) == 0x0000);                 // float subnormal -> +0
}

TEST_CASE("bf16_to_float is exact for all 65536 bit patterns", "[dtype]") {
  std::size_t bad = 0;
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const double want = half_decode(static_cast<std::uint16_t>(h), kBF16);
    const float got = bf16_to_float(static_cast<std::uint16_t>(h));
    const bool ok = std::isnan(want) ? std::isnan(got)
                                     : static_cast<double>(got) == want &&
                                           std::signbit(got) == ((h & 0x8000u) != 0);
    bad += !ok;
  }
  CHECK(bad == 0);
}

TEST_CASE("float_to_bf16 rounds to nearest even, overflow to Inf, NaN stays NaN", "[dtype]") {
  const std::vector<float> in = rounding_inputs(kBF16);
  std::size_t bad = 0;
  float first = 0.0f;
  for (float f : in) {
    const std::uint16_t got = float_to_bf16(f);
    if (!same_nan_or_bits(got, half_round(f, kBF16), f, kBF16) && bad++ == 0) first = f;
  }
  INFO(in.size() << " inputs; first mismatch at bits 0x" << std::hex
                 << std::bit_cast<std::uint32_t>(first));
  CHECK(bad == 0);
  CHECK(float_to_bf16(1.0f + 0x1p-8f) == 0x3f80);      // tie -> even (down)
  CHECK(float_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82);  // tie -> even (up)
  CHECK(float_to_bf16(FLT_MAX) == 0x7f80);             // rounds past the largest bf16
  CHECK((float_to_bf16(std::bit_cast<float>(0x7f800001u)) & 0x7fffu) > 0x7f80u);  // payload low
}

TEST_CASE("dtype and error-code names, sizes and Error formatting", "[dtype]") {
  CHECK(dtype_size(DType::f32) == 4);
  CHECK(dtype_size(DType::f16) == 2);
  CHECK(dtype_size(DType::bf16) == 2);
  for (DType t : {DType::f32, DType::f16, DType::bf16}) CHECK(is_float_dtype(t));
  for (DType t : {DType::i8, DType::i32}) CHECK_FALSE(is_float_dtype(t));
  CHECK(half_to_float(0x3c00, DType::f16) == 1.0f);   // binary16 1.0
  CHECK(half_to_float(0x3f80, DType::bf16) == 1.0f);  // bf16 1.0
  CHECK(half_to_float(0xc000, DType::bf16) == -2.0f);
  CHECK(dtype_size(DType::i8) == 1);
  CHECK(dtype_size(DType::i32) == 4);
  CHECK(dtype_name(DType::bf16) == "bf16");
  CHECK(dtype_name(DType::i8) == "i8");
  STATIC_REQUIRE(dtype_of<float>() == DType::f32);
  STATIC_REQUIRE(dtype_of<std::int32_t>() == DType::i32);
  STATIC_REQUIRE(dtype_of<std::int8_t>() == DType::i8);
  CHECK(error_code_name(ErrorCode::shape_mismatch) == "shape_mismatch");
  CHECK(error_code_name(ErrorCode::not_found) == "not_found");
  const Error e(ErrorCode::numeric, "Where::fn", "value 3 is bad");
  CHECK(std::string(e.what()) == "[Where::fn] value 3 is bad");
  CHECK(e.code() == ErrorCode::numeric);
  const std::runtime_error& base = e;  // catchable as a standard exception
  CHECK(std::string(base.what()).find("value 3") != std::string::npos);
}

TEST_CASE("Shape: extents, numel, str, equality, and rejected extents", "[tensor]") {
  const Shape s{2, 3, 4};
  CHECK(s.rank() == 3);
  CHECK(s[1] == 3);
  CHECK(s.numel() == 24);
  CHECK(s.str() == "[2, 3, 4]");
  CHECK(Shape{}.rank() == 0);
  CHECK(Shape{}.numel() == 1);
  CHECK(Shape{}.str() == "[]");
  CHECK(Shape{5, 0}.numel() == 0);
  CHECK(Shape{2, 3} == Shape{2, 3});
  CHECK_FALSE(Shape{2, 3} == Shape{3, 2});
  CHECK_FALSE(Shape{2, 3} == Shape{2, 3, 1});
  CHECK(Shape{int64_t{1} << 40, 4}.numel() == (int64_t{1} << 42));  // int64 extents
  REQUIRE_ERROR((Shape{2, -3}), invalid_argument, "[Shape]", "negative extent -3");
  REQUIRE_ERROR((Shape{1, 2, 3, 4, 5}), invalid_argument, "[Shape]", "rank 5 exceeds 4");
}

TEST_CASE("TensorView: slice, index, reshape and their errors", "[tensor]") {
  CpuBackend b(CpuBackendOptions{1});
  Tensor t(b, DType::f32, Shape{4, 3});
  const TensorView v = t;
  auto* base = static_cast<char*>(v.data);
  CHECK(v.row_bytes() == 12);
  CHECK(v.nbytes() == 48);

  const TensorView s = v.slice(1, 3);
  CHECK(s.shape == Shape{2, 3});
  CHECK(static_cast<char*>(s.data) == base + 12);
  CHECK(s.dtype == DType::f32);
  CHECK(v.slice(4, 4).empty());

  const TensorView r = v[2];
  CHECK(r.shape == Shape{3});
  CHECK(static_cast<char*>(r.data) == base + 24);
  const TensorView scalar = r[1];
  CHECK(scalar.rank() == 0);
  CHECK(scalar.numel() == 1);
  CHECK(static_cast<char*>(scalar.data) == base + 28);

  Tensor t3(b, DType::f16, Shape{3, 2, 5});
  const TensorView s3 = TensorView(t3).slice(1, 2);
  CHECK(s3.shape == Shape{1, 2, 5});
  CHECK(static_cast<char*>(s3.data) == static_cast<char*>(t3.view().data) + 20);

  CHECK(v.reshaped(Shape{3, 4}).shape == Shape{3, 4});
  CHECK(v.reshaped(Shape{12}).data == v.data);

  REQUIRE_ERROR(v.slice(3, 2), out_of_range, "[TensorView::slice]", "rows [3, 2) of shape [4, 3]");
  REQUIRE_ERROR(v.slice(0, 5), out_of_range, "[TensorView::slice]", "[0, 5)");
  REQUIRE_ERROR(v.slice(-1, 2), out_of_range, "[TensorView::slice]", "[-1, 2)");
  REQUIRE_ERROR(v[4], out_of_range, "[TensorView::slice]", "[4, 5)");
  REQUIRE_ERROR(scalar.slice(0, 1), out_of_range, "[TensorView::slice]");
  REQUIRE_ERROR(v.reshaped(Shape{5, 2}), shape_mismatch, "[TensorView::reshaped]", "[4, 3] -> [5, 2]");

  const TensorView empty{};
  CHECK(empty.rank() == 1);
  CHECK(empty.empty());
  CHECK(empty.nbytes() == 0);
  CHECK(empty.row_bytes() == 0);
}

TEST_CASE("Tensor: 64-byte aligned buffers, metadata, shared copies", "[tensor]") {
  CpuBackend b(CpuBackendOptions{1});
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::i8, DType::i32})
    for (std::int64_t n : {0, 1, 3, 63, 64, 65, 1000}) {
      Tensor t(b, dt, Shape{n});
      INFO(dtype_name(dt) << " x " << n);
      CHECK(t.defined());
      CHECK(reinterpret_cast<std::uintptr_t>(t.view().data) % 64 == 0);
      CHECK(t.nbytes() == static_cast<std::size_t>(n) * dtype_size(dt));
    }

  Tensor t(b, DType::bf16, Shape{3, 5});
  CHECK(t.dtype() == DType::bf16);
  CHECK(t.shape() == Shape{3, 5});
  CHECK(t.dim(1) == 5);
  CHECK(t.numel() == 15);
  CHECK(t.nbytes() == 30);
  CHECK(t.backend() == &b);
  CHECK(t.view().device == b.device());
  CHECK(static_cast<TensorView>(t).data == t.view().data);

  Tensor f(b, DType::f32, Shape{4});
  const std::vector<float> h{1.0f, 2.0f, 3.0f, 4.0f};
  b.copy_from_host(f, h.data());
  Tensor copy = f;  // shares the buffer (a use after free here would trip the sanitizers)
  CHECK(copy.data<float>() == f.data<float>());
  f = Tensor();
  CHECK_FALSE(f.defined());
  std::vector<float> back(4);
  b.copy_to_host(back.data(), copy);
  CHECK(back == h);

  const Tensor none;
  CHECK_FALSE(none.defined());
  CHECK(none.empty());
  CHECK(none.backend() == nullptr);

  REQUIRE_ERROR(Tensor(b, DType::f32, Shape{int64_t{1} << 40, int64_t{1} << 22}), invalid_argument,
                "[Tensor]", "too large");
}

TEST_CASE("CpuBackend options", "[tensor]") {
  CHECK(CpuBackend(CpuBackendOptions{1}).num_threads() == 1);
  CHECK(CpuBackend(CpuBackendOptions{2}).num_threads() == 2);
  CHECK(CpuBackend().num_threads() >= 1);
  CHECK(CpuBackend().name() == "cpu");
  CHECK(CpuBackend().device() == Device{DeviceKind::cpu, 0});
  REQUIRE_ERROR(CpuBackend(CpuBackendOptions{-1}), invalid_argument, "[CpuBackend]", "threads=-1");
}

TEST_CASE("Layout::panel32 views: storage size, stack slicing, no reshape", "[tensor][layout]") {
  CpuBackend b(CpuBackendOptions{1});
  Tensor w(b, DType::f32, Shape{3, 37, 5}, Layout::panel32);  // 37 rows pad to 64 per matrix
  CHECK(w.layout() == Layout::panel32);
  CHECK(w.nbytes() == 3u * 64u * 5u * 4u);
  CHECK(TensorView::storage_bytes(Layout::panel32, DType::f32, Shape{32, 2}) == 32u * 2u * 4u);
  CHECK(TensorView::storage_bytes(Layout::row_major, DType::f32, Shape{37, 5}) == 37u * 5u * 4u);
  CHECK(reinterpret_cast<std::uintptr_t>(w.view().data) % 64 == 0);
  const TensorView m1 = TensorView(w).slice(1, 2);
  CHECK(m1.shape == Shape{1, 37, 5});
  CHECK(static_cast<char*>(m1.data) == static_cast<char*>(w.view().data) + 64 * 5 * 4);
  CHECK(m1.layout == Layout::panel32);
  REQUIRE_ERROR(TensorView(w).reshaped(Shape{3 * 37, 5}), invalid_argument, "[TensorView::reshaped]", "panel32");
  Tensor m(b, DType::f32, Shape{37, 5}, Layout::panel32);
  REQUIRE_ERROR(TensorView(m).slice(0, 1), invalid_argument, "[TensorView::slice]", "[37, 5]");
  REQUIRE_ERROR(Tensor(b, DType::f32, Shape{5}, Layout::panel32), invalid_argument, "[Tensor]",
                "panel32 needs rank >= 2, got [5]");
}
