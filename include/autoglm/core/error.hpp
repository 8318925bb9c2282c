// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace autoglm {

/// What kind of failure an Error reports.
enum class ErrorCode {
  invalid_argument,  ///< a value outside its documented range
  shape_mismatch,    ///< tensor shapes that do not fit together
  dtype_mismatch,    ///< a dtype the operation does not take
  out_of_range,      ///< an index (token id, expert id) past its bound
  not_found,         ///< an unknown name (registry, tensor, key)
  numeric,           ///< NaN or Inf where finite values are required
  device,            ///< a tensor on the wrong device, or a device failure
  io,                ///< file or parse failure
  unsupported,       ///< a valid request this build cannot serve
  cancelled,         ///< the caller asked to stop (e.g. a load progress callback)
};

/// Name of an ErrorCode, e.g. "shape_mismatch".
constexpr std::string_view error_code_name(ErrorCode c) noexcept {
  switch (c) {
    case ErrorCode::invalid_argument: return "invalid_argument";
    case ErrorCode::shape_mismatch: return "shape_mismatch";
    case ErrorCode::dtype_mismatch: return "dtype_mismatch";
    case ErrorCode::out_of_range: return "out_of_range";
    case ErrorCode::not_found: return "not_found";
    case ErrorCode::numeric: return "numeric";
    case ErrorCode::device: return "device";
    case ErrorCode::io: return "io";
    case ErrorCode::unsupported: return "unsupported";
    case ErrorCode::cancelled: return "cancelled";
  }
  return "unknown";
}

/// The one exception type autoglm throws for bad input: a code plus "[function] message".
class Error : public std::runtime_error {
 public:
  /// Builds "[where] message".
  Error(ErrorCode code, std::string_view where, std::string_view message)
      : std::runtime_error(fmt::format("[{}] {}", where, message)), code_(code) {}

  /// The failure kind.
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

namespace detail {

/// Throws Error(code, where, fmt::format(f, args...)).
template <typename... Args>
[[noreturn]] void fail(ErrorCode code, std::string_view where, fmt::format_string<Args...> f,
                       Args&&... args) {
  throw Error(code, where, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace detail
}  // namespace autoglm

/// Throws autoglm::Error(code, where, ...) unless cond holds.
#define AUTOGLM_CHECK(cond, code, where, ...)                               \
  do {                                                                      \
    if (!(cond)) ::autoglm::detail::fail(::autoglm::ErrorCode::code, where, __VA_ARGS__); \
  } while (0)
