// SPDX-License-Identifier: Apache-2.0
// INT8 GEMM: packing, the portable reference path and the run-time dispatch. This unit is
// compiled for the baseline ISA (see CMakeLists.txt) because it runs on every CPU; the vector
// paths live in qgemm_avx2.cpp and qgemm_avx512.cpp, and the avx512_vnni W8A8 path hands tiles
// of 16 rows or more to qgemm_amx.cpp where the CPU has AMX-INT8 (AUTOGLM_Q8_AMX=0 turns that
// off); the avx2 W8A8 path runs qgemm_avxvnni.cpp where the CPU has AVX-VNNI
// (AUTOGLM_Q8_AVXVNNI=0 keeps vpmaddwd).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "cpu/gemm_kernels.hpp"  // amx_bf16_available
#include "cpu/qgemm_isa.hpp"
#include "cpu/qgemm_kernels.hpp"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define AUTOGLM_Q8_X86 1
#else
#define AUTOGLM_Q8_X86 0
#endif

namespace autoglm::detail::q8 {
namespace {

Isa detect_isa() noexcept {
#if AUTOGLM_Q8_X86 && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the vector state (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return Isa::avx512_vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::portable;
}

Isa hardware_isa() noexcept {
  static const Isa isa = detect_isa();
  return isa;
}

Isa env_isa() noexcept {
  const Isa hw = hardware_isa();
  const char* env = std::getenv("AUTOGLM_Q8_ISA");
  if (env == nullptr) return hw;
  for (Isa isa : {Isa::portable, Isa::avx2, Isa::avx512_vnni})
    if (isa_name(isa) == env) return std::min(isa, hw);
  return hw;
}

// AMX tile data is off until the process asks Linux for it (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); the grant covers every thread.
bool detect_amx() noexcept {
#if AUTOGLM_Q8_X86 && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
  if (hardware_isa() != Isa::avx512_vnni) return false;
  // CPUID.(7, 0).EDX: bit 24 AMX-TILE, bit 25 AMX-INT8 (read directly: not every compiler's
  // __builtin_cpu_supports knows the AMX names).
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
  if ((edx >> 24 & 1u) == 0 || (edx >> 25 & 1u) == 0) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
  return false;
#endif
}

bool detect_avxvnni() noexcept {
#if AUTOGLM_Q8_X86 && (defined(__GNUC__) || defined(__clang__))
  if (hardware_isa() < Isa::avx2) return false;  // also: the OS saves the ymm state
  // CPUID.(7, 1).EAX bit 4: AVX-VNNI (read directly, as for AMX).
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) == 0) return false;
  return (eax >> 4 & 1u) != 0;
#else
  return false;
#endif
}

// An optional kernel's run-time switch: on where the CPU has the kernel's instructions unless
// the environment variable `env` is "0", decided at the first query; tests turn it off and on.
struct KernelSwitch {
  const char* env;
  std::atomic<int> state{-1};  // -1: not decided yet; 0: off; 1: on

  bool enabled(bool available) {
    int s = state.load(std::memory_order_relaxed);
    if (s < 0) {
      const char* v = std::getenv(env);
      s = available && !(v != nullptr && std::strcmp(v, "0") == 0) ? 1 : 0;
      state.store(s, std::memory_order_relaxed);
    }
    return s == 1;
  }
  void set(bool on, bool available) {
    state.store(on && available ? 1 : 0, std::memory_order_relaxed);
  }
};

KernelSwitch& amx_switch() {
  static KernelSwitch s{"AUTOGLM_Q8_AMX"};
  return s;
}

KernelSwitch& avxvnni_switch() {
  static KernelSwitch s{"AUTOGLM_Q8_AVXVNNI"};
  return s;
}

// Byte offset of w[row][c] in the packed layout of a matrix with kq quads per row.
inline std::int64_t packed_index(std::int64_t row, std::int64_t c, std::int64_t kq) {
  return ((row / kPanel * kq + c / 4) * kPanel + row % kPanel) * 4 + c % 4;
}

void quantize_portable(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k,
                       std::int64_t group, std::uint8_t* xq, std::int64_t ldq, float* xs) {
  const std::int64_t kp = padded_depth(k), ng = k / group;
  for (std::int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    std::uint8_t* qi = xq + i * ldq;
    for (std::int64_t g = 0; g < ng; ++g) {
      const std::int64_t c0 = g * group, c1 = c0 + group;
      float amax = 0.0f;
      for (std::int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(xi[c]));
      const float s = amax / 127.0f;
      xs[i * ng + g] = s;
      if (s == 0.0f) {
        std::memset(qi + c0, 128, static_cast<std::size_t>(group));
        continue;
      }
      for (std::int64_t c = c0; c < c1; ++c) {
        const float q = std::clamp(std::nearbyint(xi[c] / s), -127.0f, 127.0f);
        qi[c] = static_cast<std::uint8_t>(static_cast<int>(q) + 128);
      }
    }
    for (std::int64_t c = k; c < kp; ++c) qi[c] = 128;
  }
}

void gemm_w8a8_portable(const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
                        const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
                        std::int64_t ldo) {
  const std::int64_t kq = padded_depth(w.k) / 4, ng = w.k / w.group;
  for (std::int64_t jj = 0; jj < cols; ++jj) {
    const std::int64_t j = col0 + jj;
    const float* sc = w.scales + j * ng;
    for (std::int64_t i = 0; i < m; ++i) {
      const std::uint8_t* xi = xq + i * ldq;
      const float* si = xs + i * ng;
      float acc = 0.0f;
      for (std::int64_t g = 0; g < ng; ++g) {
        std::int64_t isum = 0;
        for (std::int64_t c = g * w.group; c < (g + 1) * w.group; ++c)
          isum += (std::int64_t{xi[c]} - 128) * w.data[packed_index(j, c, kq)];
        // The vector paths' rounding exactly (the two scales' product, then fused
        // multiply-adds), so every path gives bit-identical W8A8 results.
        const float f = static_cast<float>(isum), t = sc[g] * si[g];
        acc = g == 0 ? f * t : std::fma(f, t, acc);
      }
      out[i * ldo + jj] = acc;
    }
  }
}

void gemm_wonly_portable(const float* x, std::int64_t ldx, std::int64_t m, const QWeights& w,
                         std::int64_t col0, std::int64_t cols, float* out, std::int64_t ldo) {
  const std::int64_t kq = padded_depth(w.k) / 4, ng = w.k / w.group;
  for (std::int64_t jj = 0; jj < cols; ++jj) {
    const std::int64_t j = col0 + jj;
    const float* sc = w.scales + j * ng;
    for (std::int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * ldx;
      float acc = 0.0f;
      for (std::int64_t g = 0; g < ng; ++g) {
        float part = 0.0f;
        for (std::int64_t c = g * w.group; c < (g + 1) * w.group; ++c)
          part += xi[c] * static_cast<float>(w.data[packed_index(j, c, kq)]);
        acc += part * sc[g];
      }
      out[i * ldo + jj] = acc;
    }
  }
}

struct ScratchBlock {
  void* p = nullptr;
  std::size_t n = 0;
  ~ScratchBlock() { ::operator delete (p, std::align_val_t{64}); }
};

}  // namespace

namespace impl {

void* scratch(std::size_t bytes) {
  thread_local ScratchBlock block;
  if (bytes > block.n) {
    ::operator delete (block.p, std::align_val_t{64});
    block.p = nullptr;
    block.n = 0;
    // Grow geometrically: tiles of one layer differ a little in size.
    const std::size_t n = std::max(bytes, block.n * 3 / 2);
    block.p = ::operator new (n, std::align_val_t{64});
    block.n = n;
  }
  return block.p;
}

void transpose_scales(const QWeights& w, std::int64_t col0, std::int64_t panels, float* sct,
                      std::int32_t* nst) {
  const std::int64_t ng = w.k / w.group;
  for (std::int64_t p = 0; p < panels; ++p)
    for (std::int64_t r = 0; r < kPanel; ++r) {
      const std::int64_t row = col0 + p * kPanel + r;
      for (std::int64_t g = 0; g < ng; ++g) {
        sct[(p * ng + g) * kPanel + r] = w.scales[row * ng + g];
        if (nst != nullptr) nst[(p * ng + g) * kPanel + r] = -128 * w.sums[row * ng + g];
      }
    }
}

bool amx_available() noexcept {
  static const bool ok = detect_amx();
  return ok;
}

bool amx_enabled() noexcept {
  return amx_switch().enabled(amx_available());
}

void set_amx_enabled(bool on) noexcept {
  amx_switch().set(on, amx_available());
}

bool avxvnni_available() noexcept {
  static const bool ok = detect_avxvnni();
  return ok;
}

bool avxvnni_enabled() noexcept {
  return avxvnni_switch().enabled(avxvnni_available());
}

void set_avxvnni_enabled(bool on) noexcept {
  avxvnni_switch().set(on, avxvnni_available());
}

}  // namespace impl

Isa best_isa() noexcept {
  static const Isa isa = env_isa();
  return isa;
}

bool isa_supported(Isa isa) noexcept {
  return isa <= hardware_isa();
}

std::string_view isa_name(Isa isa) noexcept {
  switch (isa) {
    case Isa::portable:
      return "portable";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512_vnni:
      return "avx512_vnni";
  }
  return "unknown";
}

std::int64_t packed_bytes(std::int64_t n, std::int64_t k) {
  return padded_rows(n) * padded_depth(k);
}

void pack(const std::int8_t* w, std::int64_t n, std::int64_t k, std::int8_t* dst) {
  const std::int64_t kp = padded_depth(k), kq = kp / 4;
  std::memset(dst, 0, static_cast<std::size_t>(packed_bytes(n, k)));
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < k; ++c) dst[packed_index(r, c, kq)] = w[r * k + c];
}

void unpack(const std::int8_t* src, std::int64_t n, std::int64_t k, std::int8_t* w) {
  const std::int64_t kq = padded_depth(k) / 4;
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < k; ++c) w[r * k + c] = src[packed_index(r, c, kq)];
}

void group_sums(const std::int8_t* w, std::int64_t n, std::int64_t k, std::int64_t group,
                std::int32_t* sums) {
  const std::int64_t ng = k / group;
  for (std::int64_t r = 0; r < padded_rows(n); ++r)
    for (std::int64_t g = 0; g < ng; ++g) {
      std::int32_t s = 0;
      if (r < n)
        for (std::int64_t c = g * group; c < (g + 1) * group; ++c) s += w[r * k + c];
      sums[r * ng + g] = s;
    }
}

void quantize_activations(Isa isa, const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k,
                          std::int64_t group, std::uint8_t* xq, std::int64_t ldq, float* xs) {
  if (m <= 0) return;
  switch (isa) {
#if AUTOGLM_Q8_X86
    case Isa::avx512_vnni:
      impl::quantize_avx512(x, ldx, m, k, group, xq, ldq, xs);
      return;
    case Isa::avx2:
      impl::quantize_avx2(x, ldx, m, k, group, xq, ldq, xs);
      return;
#endif
    default:
      quantize_portable(x, ldx, m, k, group, xq, ldq, xs);
      return;
  }
}

void gemm_w8a8(Isa isa, const std::uint8_t* xq, std::int64_t ldq, const float* xs, std::int64_t m,
               const QWeights& w, std::int64_t col0, std::int64_t cols, float* out,
               std::int64_t ldo) {
  if (m <= 0 || cols <= 0) return;
  if (impl::quads_per_group(w.k, w.group) == 0) isa = Isa::portable;
  switch (isa) {
#if AUTOGLM_Q8_X86
    case Isa::avx512_vnni:
      if (impl::amx_applies(m, w.group) && impl::amx_enabled())
        impl::gemm_w8a8_amx(xq, ldq, xs, m, w, col0, cols, out, ldo);
      else
        impl::gemm_w8a8_avx512(xq, ldq, xs, m, w, col0, cols, out, ldo);
      return;
    case Isa::avx2:
      if (impl::avxvnni_enabled())
        impl::gemm_w8a8_avxvnni(xq, ldq, xs, m, w, col0, cols, out, ldo);
      else
        impl::gemm_w8a8_avx2(xq, ldq, xs, m, w, col0, cols, out, ldo);
      return;
#endif
    default:
      gemm_w8a8_portable(xq, ldq, xs, m, w, col0, cols, out, ldo);
      return;
  }
}

void gemm_wonly(Isa isa, const float* x, std::int64_t ldx, std::int64_t m, const QWeights& w,
                std::int64_t col0, std::int64_t cols, float* out, std::int64_t ldo) {
  if (m <= 0 || cols <= 0) return;
  if (impl::quads_per_group(w.k, w.group) == 0) isa = Isa::portable;
  switch (isa) {
#if AUTOGLM_Q8_X86
    case Isa::avx512_vnni:
      impl::gemm_wonly_avx512(x, ldx, m, w, col0, cols, out, ldo);
      return;
    case Isa::avx2:
      impl::gemm_wonly_avx2(x, ldx, m, w, col0, cols, out, ldo);
      return;
#endif
    default:
      gemm_wonly_portable(x, ldx, m, w, col0, cols, out, ldo);
      return;
  }
}

}  // namespace autoglm::detail::q8

namespace autoglm::detail {

// These two checks are here, in the baseline-compiled file, so that asking costs no AVX-512
// instruction on CPUs without it. AVX512_BF16 dot products need the AVX-512 state the int8 path
// checks (hardware_isa: F, BW, VL, DQ, VNNI, enabled by the OS) and AVX512_BF16.
bool avx512_bf16_available() noexcept {
  static const bool ok = [] {
#if AUTOGLM_Q8_X86 && (defined(__GNUC__) || defined(__clang__))
    if (q8::hardware_isa() != q8::Isa::avx512_vnni) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // CPUID.(7, 1).EAX bit 5: AVX512_BF16.
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && (eax >> 5 & 1u) != 0;
#else
    return false;
#endif
  }();
  return ok;
}

// AMX-BF16 needs all of the above (AVX512_BF16 for the activation rounding), AMX-TILE and
// AMX-BF16, and Linux's grant of the tile data.
bool amx_bf16_available() noexcept {
  static const bool ok = [] {
#if AUTOGLM_Q8_X86 && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
    if (!avx512_bf16_available()) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // CPUID.(7, 0).EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    if ((edx >> 22 & 1u) == 0 || (edx >> 24 & 1u) == 0) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

}  // namespace autoglm::detail
