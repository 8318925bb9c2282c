// SPDX-License-Identifier: Apache-2.0
// Test helpers: host copies through the Backend interface only (so the same helpers serve a
// device backend), an autoglm::Error matcher, and tolerant / bitwise comparisons.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "autoglm/autoglm.hpp"

namespace Catch {
template <>
struct StringMaker<autoglm::Error> {
  static std::string convert(const autoglm::Error& e) {
    return std::string(autoglm::error_code_name(e.code())) + " \"" + e.what() + "\"";
  }
};
}  // namespace Catch

namespace agt {

using namespace autoglm;

/// f32 tensor -> host vector.
inline std::vector<float> host_f32(Backend& b, TensorView v) {
  REQUIRE(v.dtype == DType::f32);
  std::vector<float> h(static_cast<std::size_t>(v.numel()));
  b.copy_to_host(h.data(), v);
  return h;
}

/// i32 tensor -> host vector.
inline std::vector<std::int32_t> host_i32(Backend& b, TensorView v) {
  REQUIRE(v.dtype == DType::i32);
  std::vector<std::int32_t> h(static_cast<std::size_t>(v.numel()));
  b.copy_to_host(h.data(), v);
  return h;
}

/// f16 / bf16 tensor -> host bit patterns.
inline std::vector<std::uint16_t> host_u16(Backend& b, TensorView v) {
  REQUIRE(dtype_size(v.dtype) == 2);
  std::vector<std::uint16_t> h(static_cast<std::size_t>(v.numel()));
  b.copy_to_host(h.data(), v);
  return h;
}

/// Host values -> new f32 tensor.
inline Tensor tensor_f32(Backend& b, Shape s, const std::vector<float>& h) {
  REQUIRE(static_cast<std::int64_t>(h.size()) == s.numel());
  Tensor t(b, DType::f32, s);
  b.copy_from_host(t, h.data());
  return t;
}

/// Host values -> new i32 tensor.
inline Tensor tensor_i32(Backend& b, Shape s, const std::vector<std::int32_t>& h) {
  REQUIRE(static_cast<std::int64_t>(h.size()) == s.numel());
  Tensor t(b, DType::i32, s);
  b.copy_from_host(t, h.data());
  return t;
}

/// New f32 tensor uniform in [-scale, scale] from the backend's counter-based generator.
inline Tensor uniform(Backend& b, Shape s, std::uint64_t seed, float scale = 1.0f) {
  Tensor t(b, DType::f32, s);
  b.fill_uniform(t, seed, scale);
  return t;
}

/// Seeded shape draws for sweep tests: integers in [lo, hi], and row counts from three ranges
/// in turn (the few-rows path, one 252-row tile, several tiles), so a sweep crosses every row
/// boundary of the kernels.
class ShapeDraws {
 public:
  /// Draws seeded by `seed`; rows() goes up to max_rows.
  ShapeDraws(std::uint64_t seed, std::int64_t max_rows) : g_(seed), max_rows_(max_rows) {}
  /// An integer in [lo, hi].
  std::int64_t operator()(std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(g_);
  }
  /// A row count for case i: 1-8, 9-252 or 253-max_rows as i % 3 is 0, 1 or 2.
  std::int64_t rows(int i) {
    return i % 3 == 0 ? (*this)(1, 8) : i % 3 == 1 ? (*this)(9, 252) : (*this)(253, max_rows_);
  }

 private:
  std::mt19937_64 g_;
  std::int64_t max_rows_;
};

/// Host-side random values in [lo, hi) from a fixed-seed std::mt19937_64 (test data only).
inline std::vector<float> random_floats(std::size_t n, std::uint64_t seed, float lo = -1.0f,
                                        float hi = 1.0f) {
  std::mt19937_64 g(seed);
  std::vector<float> v(n);
  for (float& x : v) {
    const double u = static_cast<double>(g() >> 11) * (1.0 / 9007199254740992.0);
    x = static_cast<float>(lo + (hi - lo) * u);
  }
  return v;
}

/// A view of `t` that claims to live on another device than `b` (for device checks).
inline TensorView on_other_device(const Backend& b, TensorView t) {
  t.device =
      b.device().kind == DeviceKind::cpu ? Device{DeviceKind::cuda, 0} : Device{DeviceKind::cpu, 0};
  return t;
}

/// Matches an autoglm::Error by code and by substrings of what().
class ErrorMatcher final : public Catch::MatcherBase<Error> {
 public:
  ErrorMatcher(ErrorCode code, std::vector<std::string> parts)
      : code_(code), parts_(std::move(parts)) {}
  bool match(const Error& e) const override {
    if (e.code() != code_) return false;
    const std::string w = e.what();
    return std::all_of(parts_.begin(), parts_.end(),
                       [&](const std::string& p) { return w.find(p) != std::string::npos; });
  }
  std::string describe() const override {
    std::ostringstream s;
    s << "is an Error with code " << error_code_name(code_) << " whose message contains";
    for (const auto& p : parts_) s << " \"" << p << "\"";
    return s.str();
  }

 private:
  ErrorCode code_;
  std::vector<std::string> parts_;
};

}  // namespace agt

/// Requires `expr` to throw autoglm::Error with ErrorCode::code and a message containing every
/// given string (the function name in brackets and the offending value, by convention).
#define REQUIRE_ERROR(expr, code, ...)           \
  REQUIRE_THROWS_MATCHES(expr, ::autoglm::Error, \
                         ::agt::ErrorMatcher(::autoglm::ErrorCode::code, {__VA_ARGS__}))
#define CHECK_ERROR(expr, code, ...)           \
  CHECK_THROWS_MATCHES(expr, ::autoglm::Error, \
                       ::agt::ErrorMatcher(::autoglm::ErrorCode::code, {__VA_ARGS__}))

namespace agt {

/// Elementwise |got - want| <= atol + rtol * |want| (NaN never passes); one assertion with the
/// count and first offender.
template <typename G, typename W>
void check_close(const G& got, const W& want, double atol, double rtol, const std::string& what) {
  REQUIRE(got.size() == want.size());
  std::size_t bad = 0, first = 0;
  double worst = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = static_cast<double>(want[i]);
    const double err = std::abs(g - w);
    if (!(err <= atol + rtol * std::abs(w))) {
      if (bad++ == 0) first = i;
    }
    if (err > worst || std::isnan(err)) worst = err;
  }
  INFO(what << ": " << bad << " of " << got.size() << " outside atol=" << atol << " rtol=" << rtol
            << "; worst abs error " << worst);
  if (bad > 0) {
    INFO("first at index " << first << ": got " << static_cast<double>(got[first]) << ", want "
                           << static_cast<double>(want[first]));
    CHECK(bad == 0);
  } else {
    CHECK(bad == 0);
  }
}

/// Exact equality of two vectors, bit for bit (floats compared by representation).
template <typename T>
void check_bitwise(const std::vector<T>& a, const std::vector<T>& b, const std::string& what) {
  REQUIRE(a.size() == b.size());
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0 && bad++ == 0) first = i;
  INFO(what << ": " << bad << " of " << a.size() << " differ; first at " << first);
  CHECK(bad == 0);
}

}  // namespace agt
