// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace autoglm {

/// Element types a tensor can hold. f16 and bf16 are storage types: compute converts to f32.
enum class DType : std::uint8_t { f32, f16, bf16, i8, i32 };

/// Bytes per element.
constexpr std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::f32:
      return 4;
    case DType::f16:
      return 2;
    case DType::bf16:
      return 2;
    case DType::i8:
      return 1;
    case DType::i32:
      return 4;
  }
  return 0;
}

/// Lower-case name, e.g. "bf16".
constexpr std::string_view dtype_name(DType t) noexcept {
  switch (t) {
    case DType::f32:
      return "f32";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::i8:
      return "i8";
    case DType::i32:
      return "i32";
  }
  return "?";
}

/// The DType of a C++ element type (float, std::int8_t, std::int32_t).
template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::f32;
}
template <>
constexpr DType dtype_of<std::int8_t>() {
  return DType::i8;
}
template <>
constexpr DType dtype_of<std::int32_t>() {
  return DType::i32;
}

/// bf16 bits -> float (exact).
inline float bf16_to_float(std::uint16_t h) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

/// float -> bf16 bits, round to nearest even; NaN stays NaN.
inline std::uint16_t float_to_bf16(float f) noexcept {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

/// IEEE binary16 bits -> float (exact, subnormals included).
inline float f16_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | static_cast<std::uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  return std::bit_cast<float>(bits);
}

/// float -> IEEE binary16 bits, round to nearest even, overflow to Inf.
inline std::uint16_t float_to_f16(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520 -> Inf
  if (abs < 0x38800000u) {  // below the smallest normal: subnormal or zero
    const float a = std::bit_cast<float>(abs);
    // 2^-24 is the subnormal step; nearbyint-free rounding via the float adder (ties to even).
    const float scaled = a * 16777216.0f;  // a / 2^-24
    const float r = (scaled + 8388608.0f) - 8388608.0f;
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(r));
  }
  std::uint32_t v = abs + 0xc8000fffu + ((abs >> 13) & 1u);  // rebias 127->15 and round
  return static_cast<std::uint16_t>(sign | (v >> 13));
}

/// True for the float dtypes: f32, and the 16-bit storage types f16 and bf16.
constexpr bool is_float_dtype(DType t) noexcept {
  return t == DType::f32 || t == DType::f16 || t == DType::bf16;
}

/// 16-bit float bits of dtype dt (f16 or bf16) -> float (exact).
inline float half_to_float(std::uint16_t h, DType dt) noexcept {
  return dt == DType::bf16 ? bf16_to_float(h) : f16_to_float(h);
}

}  // namespace autoglm
