// SPDX-License-Identifier: Apache-2.0
// Counter-based random numbers: a value depends only on (seed, index), so every backend and
// every thread count draws the same numbers.
#pragma once

#include <cmath>
#include <cstdint>

namespace autoglm::detail {

/// splitmix64 finaliser of seed and counter.
inline std::uint64_t hash64(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + i + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// Uniform in [-1, 1).
inline float uniform_pm1(std::uint64_t seed, std::uint64_t i) {
  return static_cast<float>(hash64(seed, i) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

/// Standard normal (Box-Muller over two hashed uniforms).
inline float normal(std::uint64_t seed, std::uint64_t i) {
  const std::uint64_t h = hash64(seed ^ 0x5bd1e995ull, i);
  const double u1 = (static_cast<double>(h >> 40) + 1.0) / 16777217.0;
  const double u2 = static_cast<double>(h & 0xffffffull) / 16777216.0;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

}  // namespace autoglm::detail
