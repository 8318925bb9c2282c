// SPDX-License-Identifier: Apache-2.0
#include "autoglm/quant/quantize.hpp"

#include "autoglm/quant/gptq.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <thread>
#include <vector>

namespace autoglm {

std::string QuantSpec::scheme_name() const {
  return group == 0 ? std::string("int8_per_channel") : fmt::format("int8_g{}", group);
}

std::string_view QuantSpec::mode_name() const noexcept {
  return mode == ActivationMode::w8a8 ? "w8a8" : "weight_only";
}

QuantSpec QuantSpec::parse(std::string_view scheme, std::string_view mode) {
  QuantSpec s;
  if (scheme == "int8_per_channel" || scheme == "int8")
    s.group = 0;
  else if (scheme == "int8_g32")
    s.group = 32;
  else if (scheme == "int8_g64")
    s.group = 64;
  else if (scheme == "int8_g128")
    s.group = 128;
  else
    detail::fail(ErrorCode::not_found, "QuantSpec::parse",
                 "unknown scheme '{}' (known: int8_per_channel, int8_g32, int8_g64, int8_g128)",
                 scheme);
  if (mode == "w8a8")
    s.mode = ActivationMode::w8a8;
  else if (mode == "weight_only")
    s.mode = ActivationMode::weight_only;
  else
    detail::fail(ErrorCode::not_found, "QuantSpec::parse",
                 "unknown activation mode '{}' (known: w8a8, weight_only)", mode);
  return s;
}

void QuantConfig::set_parts(std::string_view list) {
  QuantConfig c = *this;
  c.experts = c.attention = c.dense_mlp = c.lm_head = c.embeddings = c.router = false;
  while (!list.empty()) {
    const std::size_t comma = list.find(',');
    const std::string_view part = list.substr(0, comma);
    if (part == "experts")
      c.experts = true;
    else if (part == "attention")
      c.attention = true;
    else if (part == "dense")
      c.dense_mlp = true;
    else if (part == "head")
      c.lm_head = true;
    else if (part == "embeddings")
      c.embeddings = true;
    else if (part == "router")
      c.router = true;
    else
      detail::fail(ErrorCode::not_found, "QuantConfig::set_parts",
                   "unknown part '{}' (known: experts, attention, dense, head, embeddings, router)",
                   part);
    list = comma == std::string_view::npos ? std::string_view() : list.substr(comma + 1);
  }
  *this = c;
}

namespace {

void check_spec(std::string_view fn, const QuantSpec& spec, std::int64_t k) {
  AUTOGLM_CHECK(spec.group == 0 || spec.group == 32 || spec.group == 64 || spec.group == 128,
                invalid_argument, fn, "group {} must be 0 (per channel), 32, 64 or 128",
                spec.group);
  AUTOGLM_CHECK(spec.group == 0 || k % spec.group == 0, shape_mismatch, fn,
                "group {} does not divide the {} input columns", spec.group, k);
}

}  // namespace

namespace {

void check_col_scales(std::string_view fn, const Tensor& col_scales, const Shape& s,
                      const Backend* backend) {
  if (!col_scales.defined()) return;
  AUTOGLM_CHECK(s.rank() == 2 || s.rank() == 3, shape_mismatch, fn,
                "column scales need data [N, K] or [E, N, K], got {}", s.str());
  const Shape want = s.rank() == 2 ? Shape{s[1]} : Shape{s[0], s[2]};
  AUTOGLM_CHECK(col_scales.dtype() == DType::f32 && col_scales.layout() == Layout::row_major,
                dtype_mismatch, fn, "column scales must be row-major f32, got {}",
                dtype_name(col_scales.dtype()));
  AUTOGLM_CHECK(col_scales.shape() == want, shape_mismatch, fn,
                "column scales must be {} for data {}, got {}", want.str(), s.str(),
                col_scales.shape().str());
  AUTOGLM_CHECK(col_scales.backend() == backend, device, fn,
                "data and column scales are on different backends");
}

}  // namespace

QuantizedTensor::QuantizedTensor(Tensor data, Tensor scales, QuantSpec spec, Tensor col_scales)
    : spec_(spec),
      data_(std::move(data)),
      scales_(std::move(scales)),
      col_scales_(std::move(col_scales)) {
  constexpr std::string_view fn = "QuantizedTensor";
  AUTOGLM_CHECK(data_.dtype() == DType::i8 && data_.layout() == Layout::row_major, dtype_mismatch,
                fn, "data must be row-major i8, got {}", dtype_name(data_.dtype()));
  AUTOGLM_CHECK(scales_.dtype() == DType::f32, dtype_mismatch, fn, "scales must be f32, got {}",
                dtype_name(scales_.dtype()));
  const Shape& s = data_.shape();
  AUTOGLM_CHECK(s.rank() >= 2 && s.rank() <= 3, shape_mismatch, fn,
                "data must be [N, K] or [E, N, K], got {}", s.str());
  const std::int64_t k = s[s.rank() - 1];
  check_spec(fn, spec_, k);
  const std::int64_t groups = k == 0 ? 0 : k / spec_.group_of(k);
  const Shape want = s.rank() == 2 ? Shape{s[0], groups} : Shape{s[0], s[1], groups};
  AUTOGLM_CHECK(scales_.shape() == want || (groups == 0 && scales_.numel() == 0), shape_mismatch,
                fn, "scales must be {} for data {} ({}), got {}", want.str(), s.str(),
                spec_.scheme_name(), scales_.shape().str());
  AUTOGLM_CHECK(data_.backend() == scales_.backend(), device, fn,
                "data and scales are on different backends");
  check_col_scales(fn, col_scales_, s, data_.backend());
  shape_ = s;
}

QuantizedTensor QuantizedTensor::packed(Shape shape, QuantSpec spec, Tensor data, Tensor scales,
                                        Tensor aux, Tensor col_scales) {
  check_col_scales("QuantizedTensor::packed", col_scales, shape, data.backend());
  QuantizedTensor q;
  q.shape_ = shape;
  q.spec_ = spec;
  q.data_ = std::move(data);
  q.scales_ = std::move(scales);
  q.aux_ = std::move(aux);
  q.col_scales_ = std::move(col_scales);
  q.packed_ = true;
  return q;
}

const Tensor& Weight::tensor() const {
  AUTOGLM_CHECK(!is_quantized(), dtype_mismatch, "Weight::tensor",
                "the weight {} is int8 ({}); use quantized()", shape().str(),
                std::get<QuantizedTensor>(v_).spec().scheme_name());
  return std::get<Tensor>(v_);
}

const QuantizedTensor& Weight::quantized() const {
  AUTOGLM_CHECK(is_quantized(), dtype_mismatch, "Weight::quantized",
                "the weight {} is not quantized", shape().str());
  return std::get<QuantizedTensor>(v_);
}

namespace detail {

// Column scales are kept when they bring the expected error below this share of the plain one.
constexpr double kEqualiseGain = 0.75;

namespace {

// Below this a group's largest |w| is stored as zeros: 127 / amax must stay finite.
constexpr float kMinAmax = 1e-30f;
// Candidate factors of the scale search: 1 + kScaleStep * j, 0 <= j <= kScaleSteps. Never
// below 1, which would clamp the group's largest weights: a 0.9-1.1 range bought less on a
// trained model (docs/quantization.md, "Scale search").
constexpr int kScaleSteps = 40;
constexpr float kScaleStep = 0.005f;

// Candidate j has scale amax * (1 + kScaleStep * j) / 127, as products with these factors
// (scale and inverse), so that the search divides once per group.
struct CandidateFactors {
  std::array<float, kScaleSteps + 1> scale{}, inv{};
  constexpr CandidateFactors() {
    for (int j = 0; j <= kScaleSteps; ++j) {
      const double f = 1.0 + static_cast<double>(kScaleStep) * j;
      scale[static_cast<std::size_t>(j)] = static_cast<float>(f / 127.0);
      inv[static_cast<std::size_t>(j)] = static_cast<float>(127.0 / f);
    }
  }
};
constexpr CandidateFactors kCandidates;

GroupScale candidate(float amax, float inv_amax, int j) {
  const auto i = static_cast<std::size_t>(j);
  return {amax * kCandidates.scale[i], inv_amax * kCandidates.inv[i]};
}

// Sum of col_scale^2 * (v - code * scale)^2 over a group, as round_code rounds: x + 1.5 * 2^23 -
// 1.5 * 2^23 is nearbyint(x) for |x| < 2^22 (|x| <= 127 here) in the default rounding
// mode, and vectorises where the library call does not. Sixteen partial sums, so that the
// compiler may keep them in vector lanes without reassociating float additions.
template <bool Weighted>
inline float rounding_error(const float* v, std::int64_t len, const float* cs, GroupScale s) {
  constexpr float kRound = 12582912.0f;
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  auto add = [&](std::int64_t i, int lane) {
    const float x = v[i];
    const float c = std::min(std::max((x * s.inv + kRound) - kRound, -127.0f), 127.0f);
    const float d = x - c * s.scale;
    acc[lane] += Weighted ? cs[i] * cs[i] * d * d : d * d;
  };
  std::int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) add(i + j, j);
  for (; i < len; ++i) add(i, 0);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// Built for AVX-512 and AVX2 too (chosen at load time): the search rounds every weight 41
// times, which would otherwise be most of quantize()'s time on the baseline build's 4 lanes.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AUTOGLM_QUANT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AUTOGLM_QUANT_CLONES
#endif

// The j of the candidate with the least error; 0 on ties.
template <bool Weighted>
AUTOGLM_QUANT_CLONES int best_candidate(const float* v, std::int64_t len, const float* cs,
                                        float amax, float inv_amax) {
  int best = 0;
  float best_error = rounding_error<Weighted>(v, len, cs, candidate(amax, inv_amax, 0));
  for (int j = 1; j <= kScaleSteps; ++j) {
    const float e = rounding_error<Weighted>(v, len, cs, candidate(amax, inv_amax, j));
    if (e < best_error) {
      best_error = e;
      best = j;
    }
  }
  return best;
}

}  // namespace

GroupScale group_scale(const float* v, std::int64_t len, const float* col_scale, bool search) {
  float amax = 0.0f;
  for (std::int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(v[i]));
  if (!(amax >= kMinAmax)) return {};
  if (!search) return {amax / 127.0f, 127.0f / amax};
  const float inv_amax = 1.0f / amax;
  const int j = col_scale ? best_candidate<true>(v, len, col_scale, amax, inv_amax)
                          : best_candidate<false>(v, len, nullptr, amax, inv_amax);
  return candidate(amax, inv_amax, j);
}

std::int64_t quantize_rows(const float* w, std::int64_t n, std::int64_t k, std::int64_t group,
                           std::int8_t* q, float* scales, const ScaleRule& rule) {
  if (n <= 0 || k <= 0 || group <= 0) return -1;
  for (std::int64_t i = 0; i < n * k; ++i)
    if (!std::isfinite(w[i])) return i;
  const std::int64_t groups = k / group;
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t g = 0; g < groups; ++g) {
      const float* src = w + r * k + g * group;
      std::int8_t* dst = q + r * k + g * group;
      const GroupScale s = group_scale(
          src, group, rule.col_scale ? rule.col_scale + g * group : nullptr, rule.search);
      scales[r * groups + g] = s.scale;
      for (std::int64_t c = 0; c < group; ++c) dst[c] = round_code(src[c], s);
    }
  }
  return -1;
}

std::int64_t quantize_rows_parallel(const float* w, std::int64_t n, std::int64_t k,
                                    std::int64_t group, std::int8_t* q, float* scales,
                                    const ScaleRule& rule, int threads) {
  if (n <= 0 || k <= 0 || group <= 0) return -1;
  if (threads <= 0) threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  // At least ~64 K weights a thread, or the thread costs more than it saves.
  const std::int64_t chunks =
      std::clamp<std::int64_t>(n * k / 65536, 1, std::min<std::int64_t>(threads, n));
  if (chunks == 1) return quantize_rows(w, n, k, group, q, scales, rule);
  const std::int64_t groups = k / group;
  std::vector<std::int64_t> bad(static_cast<std::size_t>(chunks), -1);
  parallel_for(chunks, [&](std::int64_t t) {
    const std::int64_t r0 = n * t / chunks, r1 = n * (t + 1) / chunks;
    const std::int64_t b =
        quantize_rows(w + r0 * k, r1 - r0, k, group, q + r0 * k, scales + r0 * groups, rule);
    bad[static_cast<std::size_t>(t)] = b < 0 ? -1 : r0 * k + b;
  });
  for (std::int64_t b : bad)
    if (b >= 0) return b;
  return -1;
}

bool column_scales(const float* w, std::int64_t n, std::int64_t k, std::int64_t group,
                   ActivationMode mode, float* col_scale) {
  std::fill(col_scale, col_scale + k, 1.0f);
  // W8A8 quantises the activations too, and x * col_scale widens exactly the columns that
  // carry large scales: at Qwen3 shapes that cost more than it saved (docs/quantization.md).
  if (mode == ActivationMode::w8a8 || n <= 0 || k <= 0 || group <= 0) return false;
  std::vector<double> colmax(static_cast<std::size_t>(k), 0.0);
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < k; ++c)
      colmax[c] = std::max(colmax[c], static_cast<double>(std::fabs(w[r * k + c])));
  // Reference level: the geometric mean of the non-zero column maxima, so a scale of 1 means
  // a typical column. An infinite or huge weight disables the search (quantize_rows reports
  // it; a NaN, which std::max skips, too).
  double log_sum = 0.0;
  std::int64_t nonzero = 0;
  for (double m : colmax) {
    if (!(m <= 1e30)) return false;
    if (m > 0.0) {
      log_sum += std::log(m);
      ++nonzero;
    }
  }
  if (nonzero == 0) return false;
  const double ref = std::exp(log_sum / static_cast<double>(nonzero));
  const std::int64_t groups = k / group;
  auto scale_of = [&](std::int64_t c, double alpha) {
    return colmax[c] > 0.0 ? std::clamp(std::pow(colmax[c] / ref, alpha), 1.0 / 256, 256.0) : 1.0;
  };

  // Expected squared output error of rounding w / s for activations of unit variance, up to a
  // common factor: per row and group, step^2 times the sum of s^2 over the group.
  std::vector<double> s(static_cast<std::size_t>(k)), s2(static_cast<std::size_t>(groups));
  auto expected_error = [&]() {
    std::fill(s2.begin(), s2.end(), 0.0);
    for (std::int64_t c = 0; c < k; ++c) s2[c / group] += s[c] * s[c];
    double err = 0.0;
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t g = 0; g < groups; ++g) {
        double amax = 0.0;
        for (std::int64_t c = g * group; c < (g + 1) * group; ++c)
          amax = std::max(amax, std::fabs(w[r * k + c] / s[c]));
        err += amax * amax * s2[g];
      }
    return err;
  };
  std::fill(s.begin(), s.end(), 1.0);
  const double plain = expected_error();
  double best = plain, best_alpha = 0.0;
  for (double alpha : {0.25, 0.5, 0.75, 1.0}) {
    for (std::int64_t c = 0; c < k; ++c) s[c] = scale_of(c, alpha);
    const double e = expected_error();
    if (e < best) {
      best = e;
      best_alpha = alpha;
    }
  }
  // Only where a few large columns clearly dominate: the estimate assumes activations of equal
  // variance in every column, and a small matrix's column maxima vary by chance alone (on the
  // transformers fixtures a 10 % threshold equalised noise and lost routing agreement).
  if (best > kEqualiseGain * plain) return false;
  for (std::int64_t c = 0; c < k; ++c) col_scale[c] = static_cast<float>(scale_of(c, best_alpha));
  return true;
}

void divide_columns(float* w, std::int64_t n, std::int64_t k, const float* col_scale) {
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < k; ++c) w[r * k + c] /= col_scale[c];
}

}  // namespace detail

QuantizedTensor quantize(Backend& backend, TensorView w, QuantSpec spec, std::string_view name,
                         bool pack) {
  constexpr std::string_view fn = "quantize";
  AUTOGLM_CHECK(is_float_dtype(w.dtype), dtype_mismatch, fn, "{} must be f32, bf16 or f16, got {}",
                name, dtype_name(w.dtype));
  AUTOGLM_CHECK(w.rank() == 2 || w.rank() == 3, shape_mismatch, fn,
                "{} must be [N, K] or [E, N, K], got {}", name, w.shape.str());
  const std::int64_t n = w.dim(w.rank() - 2), k = w.dim(w.rank() - 1);
  const std::int64_t mats = w.rank() == 3 ? w.dim(0) : 1;
  check_spec(fn, spec, k);
  const std::int64_t group = spec.group_of(k), groups = k == 0 ? 0 : k / group;
  Tensor data(backend, DType::i8, w.shape);
  Tensor scales(backend, DType::f32, w.rank() == 2 ? Shape{n, groups} : Shape{mats, n, groups});
  // Matrices in flight: one normally (a host copy of a whole expert stack would double its
  // memory); under a GptqScope, whose rounding costs ~K^3 flops a matrix, one per thread.
  const std::int64_t batch =
      std::clamp<std::int64_t>(detail::GptqAccess::active() ? detail::GptqAccess::threads() : 1, 1,
                               std::max<std::int64_t>(mats, 1));
  struct Slot {
    std::vector<float> host;  // [n, k], equalised
    std::vector<std::int8_t> q;
    std::vector<float> s;
    const InputRecorder::Gram* gram = nullptr;
    std::int64_t bad = -2;
  };
  std::vector<Slot> slots(static_cast<std::size_t>(batch));
  for (Slot& sl : slots) {
    sl.host.resize(static_cast<std::size_t>(n * k));
    sl.q.resize(sl.host.size());
    sl.s.resize(static_cast<std::size_t>(n * groups));
  }
  std::vector<std::uint16_t> half(w.dtype == DType::f32 ? 0 : static_cast<std::size_t>(n * k));
  // Column scales of every matrix, kept only if one of them chose any.
  std::vector<float> cs(spec.equalize ? static_cast<std::size_t>(mats * k) : 0, 1.0f);
  bool equalised = false;
  const double damping = detail::GptqAccess::options().damping;
  for (std::int64_t e0 = 0; e0 < mats; e0 += batch) {
    const std::int64_t e1 = std::min(mats, e0 + batch);
    // Host copies, column scales and the checks that name the weight: in order, on this thread.
    for (std::int64_t e = e0; e < e1; ++e) {
      Slot& sl = slots[static_cast<std::size_t>(e - e0)];
      const TensorView src = w.rank() == 3 ? w[e] : w;
      if (half.empty()) {
        backend.copy_to_host(sl.host.data(), src);
      } else {  // 16-bit storage widens exactly, so the codes equal those of the f32 weights
        backend.copy_to_host(half.data(), src);
        for (std::size_t i = 0; i < half.size(); ++i) sl.host[i] = half_to_float(half[i], w.dtype);
      }
      if (spec.equalize &&
          detail::column_scales(sl.host.data(), n, k, group, spec.mode, cs.data() + e * k)) {
        equalised = true;
        detail::divide_columns(sl.host.data(), n, k, cs.data() + e * k);
      }
      sl.gram = detail::GptqAccess::gram(w.data, e, k);
      if (sl.gram && !sl.gram->finite) {
        if (w.rank() == 3)
          detail::fail(ErrorCode::numeric, fn,
                       "the calibration inputs of {} (matrix {}) hold a NaN or Inf", name, e);
        detail::fail(ErrorCode::numeric, fn, "the calibration inputs of {} hold a NaN or Inf",
                     name);
      }
    }
    // Rounding: each matrix on its own, so results do not depend on the thread count.
    detail::parallel_for(e1 - e0, [&](std::int64_t i) {
      Slot& sl = slots[static_cast<std::size_t>(i)];
      const std::int64_t e = e0 + i;
      sl.bad = -2;
      // An equalised matrix multiplies the inputs x * col_scale: the error of column c weighs
      // col_scale[c]^2 in the scale search, and the inputs' Gram matrix is D G D.
      const float* cse = spec.equalize ? cs.data() + e * k : nullptr;
      const bool scaled_cols = cse && std::any_of(cse, cse + k, [](float v) { return v != 1.0f; });
      const detail::ScaleRule rule{spec.search_scales, scaled_cols ? cse : nullptr};
      if (sl.gram) {
        std::vector<float> scaled;
        if (scaled_cols) {
          scaled = sl.gram->gram;
          for (std::int64_t r = 0; r < k; ++r)
            for (std::int64_t c = 0; c < k; ++c) scaled[r * k + c] *= cse[r] * cse[c];
        }
        sl.bad = detail::gptq_rows(sl.host.data(), n, k, group,
                                   scaled.empty() ? sl.gram->gram.data() : scaled.data(), damping,
                                   sl.q.data(), sl.s.data(), rule);
      }
      // No statistics, or a Gram matrix GPTQ cannot use: round to nearest.
      // (One matrix at a time outside GPTQ: its rows go to the backend's threads.)
      if (sl.bad == -2)
        sl.bad =
            detail::quantize_rows_parallel(sl.host.data(), n, k, group, sl.q.data(), sl.s.data(),
                                           rule, batch == 1 ? backend.num_threads() : 1);
    });
    for (std::int64_t e = e0; e < e1; ++e) {
      const Slot& sl = slots[static_cast<std::size_t>(e - e0)];
      if (sl.bad >= 0) {
        const std::int64_t r = sl.bad / k, c = sl.bad % k;
        const float v = sl.host[static_cast<std::size_t>(sl.bad)];
        if (w.rank() == 3)
          detail::fail(ErrorCode::numeric, fn, "{} has a non-finite weight {} at [{}, {}, {}]",
                       name, v, e, r, c);
        detail::fail(ErrorCode::numeric, fn, "{} has a non-finite weight {} at [{}, {}]", name, v,
                     r, c);
      }
      const TensorView dq = w.rank() == 3 ? data.view()[e] : data.view();
      const TensorView ds = w.rank() == 3 ? scales.view()[e] : scales.view();
      backend.copy_from_host(dq, sl.q.data());
      backend.copy_from_host(ds, sl.s.data());
    }
  }
  Tensor col_scales;
  if (equalised) {
    col_scales = Tensor(backend, DType::f32, w.rank() == 2 ? Shape{k} : Shape{mats, k});
    backend.copy_from_host(col_scales, cs.data());
  }
  QuantizedTensor out(std::move(data), std::move(scales), spec, std::move(col_scales));
  return pack ? backend.pack_quantized(out) : out;
}

Weight quantize_weight(Backend& backend, const Weight& w, const QuantSpec& spec,
                       std::string_view name, bool pack) {
  if (w.is_quantized() || !w.defined() || w.empty()) return w;
  const Shape& s = w.shape();
  if (s.rank() < 2 || s.rank() > 3 || !detail::is_float_or_int8(w)) return w;
  const std::int64_t k = s[s.rank() - 1];
  if (spec.group != 0 && k % spec.group != 0) return w;
  return quantize(backend, w.tensor(), spec, name, pack);
}

Tensor dequantize(Backend& backend, const QuantizedTensor& w) {
  const Shape& s = w.shape();
  const std::int64_t k = s[s.rank() - 1], rows = k == 0 ? 0 : s.numel() / k;
  const std::int64_t group = w.group(), groups = w.groups();
  std::vector<std::int8_t> q(static_cast<std::size_t>(s.numel()));
  std::vector<float> sc(static_cast<std::size_t>(rows * groups));
  backend.quantized_to_host(w, q.data(), sc.data());
  std::vector<float> cs;
  if (w.has_col_scales()) {
    cs.resize(static_cast<std::size_t>(w.col_scales().numel()));
    backend.copy_to_host(cs.data(), w.col_scales());
  }
  // Rows per matrix: column scales are per matrix of a stack.
  const std::int64_t n = s[s.rank() - 2];
  std::vector<float> f(q.size());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < k; ++c) {
      float v = static_cast<float>(q[static_cast<std::size_t>(r * k + c)]) *
                sc[static_cast<std::size_t>(r * groups + c / group)];
      if (!cs.empty()) v *= cs[static_cast<std::size_t>((r / n) * k + c)];
      f[static_cast<std::size_t>(r * k + c)] = v;
    }
  Tensor out(backend, DType::f32, s);
  backend.copy_from_host(out, f.data());
  return out;
}

}  // namespace autoglm
