// SPDX-License-Identifier: Apache-2.0
#include "autoglm/quant/gptq.hpp"

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <exception>
#include <fstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace autoglm {

namespace {

using RowMatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

thread_local GptqScope* tl_scope = nullptr;

}  // namespace

// ------------------------------------------------------------------------------ InputRecorder

std::int64_t InputRecorder::matrices() const noexcept {
  std::int64_t n = 0;
  for (const auto& [ptr, slots] : stats_)
    for (const auto& s : slots) n += s && s->sum.rows > 0;
  return n;
}

const InputRecorder::Gram* InputRecorder::gram(const void* weight, std::int64_t index,
                                               std::int64_t k) const {
  const auto it = stats_.find(weight);
  if (it == stats_.end() || index < 0 || index >= std::ssize(it->second)) return nullptr;
  Slot* s = it->second[static_cast<std::size_t>(index)].get();
  // A matrix whose only inputs were non-finite has no rows but must still be reported.
  if (!s || (s->sum.rows == 0 && s->sum.finite) ||
      static_cast<std::int64_t>(s->sum.gram.size()) != k * k)
    return nullptr;
  {
    const std::lock_guard<std::mutex> lock(flush_mutex_);
    flush(*s, k);
    s->pending.shrink_to_fit();  // a matrix being quantized records no more rows
    if (s->upper_stale) {  // only the first read after new rows writes: later readers just read
      Eigen::Map<RowMatrixF> gm(s->sum.gram.data(), k, k);
      gm.triangularView<Eigen::StrictlyUpper>() = gm.transpose();
      s->upper_stale = false;
    }
  }
  return &s->sum;
}

std::vector<float> InputRecorder::snapshot(TensorView x) const {
  std::vector<float> host(static_cast<std::size_t>(x.numel()));
  inner_->copy_to_host(host.data(), x);
  return host;
}

void InputRecorder::add_rows(Slot& s, const float* x, std::int64_t rows, std::int64_t k) {
  const Eigen::Map<const RowMatrixF> xm(x, rows, k);
  Eigen::Map<RowMatrixF> gm(s.sum.gram.data(), k, k);
  // Half the flops of x^T x: the lower triangle only, mirrored when gram() reads it.
  gm.selfadjointView<Eigen::Lower>().rankUpdate(xm.transpose());
  s.upper_stale = true;
  // |G_ij| <= sqrt(G_ii G_jj): finite diagonal sums mean no entry overflowed.
  for (std::int64_t c = 0; c < k; ++c)
    if (!std::isfinite(gm(c, c))) s.sum.finite = false;
}

void InputRecorder::flush(Slot& s, std::int64_t k) {
  if (s.pending_rows == 0) return;
  if (s.sum.finite) add_rows(s, s.pending.data(), s.pending_rows, k);
  s.pending.clear();
  s.pending_rows = 0;
}

InputRecorder::Slot* InputRecorder::record(const void* weight, std::int64_t index,
                                           std::int64_t matrices, const float* x, std::int64_t rows,
                                           std::int64_t k) {
  if (rows <= 0) return nullptr;
  auto& slots = stats_[weight];
  if (std::ssize(slots) != matrices) {
    slots.clear();
    slots.resize(static_cast<std::size_t>(matrices));
  }
  auto& s = slots[static_cast<std::size_t>(index)];
  if (!s || static_cast<std::int64_t>(s->sum.gram.size()) != k * k) {
    s = std::make_unique<Slot>();
    s->sum.gram.assign(static_cast<std::size_t>(k * k), 0.0f);
  }
  if (!s->sum.finite) return nullptr;
  for (std::int64_t i = 0; i < rows * k; ++i)
    if (!std::isfinite(x[i])) {
      s->sum.finite = false;  // reported by quantize(), which knows the weight's name
      return nullptr;         // (the buffered rows are dropped by the next flush)
    }
  s->sum.rows += rows;
  s->pending.insert(s->pending.end(), x, x + rows * k);
  s->pending_rows += rows;
  return s->pending_rows >= kFlushRows ? s.get() : nullptr;
}

void InputRecorder::flush_all(const std::vector<Slot*>& slots, std::int64_t k) const {
  const auto n = std::ssize(slots);
  const std::int64_t threads = std::clamp<std::int64_t>(inner_->num_threads(), 1, n);
  // Each slot on its own: the sums do not depend on the thread count (1: this thread only).
  detail::parallel_for(threads, [&](std::int64_t t) {
    for (std::int64_t i = t; i < n; i += threads) flush(*slots[static_cast<std::size_t>(i)], k);
  });
}

void InputRecorder::gemm(TensorView a, TensorView b, TensorView c, GemmParams p) {
  // The inputs are read before the call (c may alias a) and summed after it succeeded; what
  // the inner backend rejects is not recorded.
  const bool take = a.rank() == 2 && b.rank() == 2 && a.dtype == DType::f32 && a.dim(1) == b.dim(1);
  const std::vector<float> x = take ? snapshot(a) : std::vector<float>();
  inner_->gemm(a, b, c, p);
  if (!take) return;
  if (Slot* s = record(b.data, 0, 1, x.data(), a.dim(0), a.dim(1))) flush(*s, a.dim(1));
}

void InputRecorder::grouped_gemm(TensorView x, TensorView w, TensorView offsets, TensorView out) {
  const bool take = x.rank() == 2 && w.rank() == 3 && x.dtype == DType::f32 &&
                    offsets.rank() == 1 && offsets.dtype == DType::i32 &&
                    offsets.dim(0) == w.dim(0) + 1;
  const std::vector<float> xh = take ? snapshot(x) : std::vector<float>();
  inner_->grouped_gemm(x, w, offsets, out);  // validates the offsets against x
  if (!take) return;
  const std::int64_t E = w.dim(0), k = x.dim(1);
  std::vector<std::int32_t> off(static_cast<std::size_t>(E + 1));
  inner_->copy_to_host(off.data(), offsets);
  // The experts whose buffers filled are added together, one thread each.
  std::vector<Slot*> full;
  for (std::int64_t e = 0; e < E; ++e)
    if (Slot* s = record(w.data, e, E, xh.data() + off[e] * k, off[e + 1] - off[e], k))
      full.push_back(s);
  if (!full.empty()) flush_all(full, k);
}

// -------------------------------------------------------------------------------- GptqScope

GptqScope::GptqScope(const InputRecorder& recorder, GptqOptions options)
    : recorder_(&recorder), options_(options), previous_(tl_scope) {
  detail::check_gptq_options("GptqScope", options);
  tl_scope = this;
}

GptqScope::~GptqScope() {
  // Scopes held out of order (in optionals, on the heap) are unlinked wherever they sit.
  if (tl_scope == this) {
    tl_scope = previous_;
    return;
  }
  for (GptqScope* s = tl_scope; s; s = s->previous_)
    if (s->previous_ == this) {
      s->previous_ = previous_;
      return;
    }
}

namespace detail {

void check_gptq_options(std::string_view fn, const GptqOptions& options) {
  AUTOGLM_CHECK(options.damping >= 0.0 && options.damping <= kMaxDamping, invalid_argument, fn,
                "damping={} must be in [0, {}]", options.damping, kMaxDamping);
  AUTOGLM_CHECK(options.min_rows >= 0, invalid_argument, fn, "min_rows={} must be >= 0",
                options.min_rows);
  AUTOGLM_CHECK(options.threads >= 0 && options.threads <= 1024, invalid_argument, fn,
                "threads={} must be in [0, 1024]", options.threads);
}

const GptqScope* GptqAccess::active() noexcept {
  return tl_scope;
}

const InputRecorder::Gram* GptqAccess::gram(const void* weight, std::int64_t index,
                                            std::int64_t k) {
  const GptqScope* s = tl_scope;
  if (!s) return nullptr;
  const InputRecorder::Gram* g = s->recorder_->gram(weight, index, k);
  // A non-finite record is returned whatever its row count, so that quantize() reports it.
  if (g && g->finite && g->rows < std::max<std::int64_t>(s->options_.min_rows, 1)) return nullptr;
  return g;
}

GptqOptions GptqAccess::options() noexcept {
  return tl_scope ? tl_scope->options_ : GptqOptions{};
}

int GptqAccess::threads() noexcept {
  const int t = tl_scope ? tl_scope->options_.threads : 1;
  return t > 0 ? t : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

void parallel_for(std::int64_t count, const std::function<void(std::int64_t)>& f) {
  std::vector<std::exception_ptr> errors(
      static_cast<std::size_t>(std::max<std::int64_t>(count, 0)));
  const auto run = [&](std::int64_t i) {
    try {
      f(i);
    } catch (...) {
      errors[static_cast<std::size_t>(i)] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  std::int64_t started = 1;
  try {
    for (; started < count; ++started) pool.emplace_back(run, started);
  } catch (const std::system_error&) {  // no more threads: the rest runs here
  }
  if (count > 0) run(0);
  for (std::int64_t i = started; i < count; ++i) run(i);
  for (std::thread& t : pool) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

std::int64_t gptq_rows(const float* w, std::int64_t n, std::int64_t k, std::int64_t group,
                       const float* gram, double damping, std::int8_t* q, float* scales,
                       const ScaleRule& rule) {
  if (n <= 0 || k <= 0) return -1;
  if (group <= 0 || k % group != 0) return -2;
  for (std::int64_t i = 0; i < n * k; ++i)
    if (!std::isfinite(w[i])) return i;
  const std::int64_t groups = k / group;

  // H = gram + damping * mean(diag) * I; a column no input ever touched gets
  // the mean diagonal (its error then moves nothing: no input reads it).
  RowMatrixD h = Eigen::Map<const RowMatrixF>(gram, k, k).cast<double>();
  double mean_diag = 0.0;
  for (std::int64_t c = 0; c < k; ++c) mean_diag += h(c, c);
  mean_diag /= static_cast<double>(k);
  if (!h.allFinite()) return -2;
  if (!(mean_diag > 0.0)) mean_diag = 1.0;
  for (std::int64_t c = 0; c < k; ++c)
    if (h(c, c) <= 0.0) {
      h.row(c).setZero();
      h.col(c).setZero();
      h(c, c) = mean_diag;
    }
  // U: the upper Cholesky factor of H^-1 (H^-1 = U^T U). Row c of U, divided by U(c, c), is how
  // an error in column c moves the columns after it once the columns before it are fixed.
  Eigen::MatrixXd u;
  for (int attempt = 0;; ++attempt) {
    Eigen::MatrixXd hd = h;
    hd.diagonal().array() += damping * mean_diag;
    Eigen::LLT<Eigen::MatrixXd> llt(hd);
    if (llt.info() == Eigen::Success) {
      Eigen::MatrixXd inv = llt.solve(Eigen::MatrixXd::Identity(k, k));
      Eigen::LLT<Eigen::MatrixXd> llt_inv(inv);
      if (llt_inv.info() == Eigen::Success) {
        u = llt_inv.matrixU();
        // LLT passes NaN pivots as success: only a finite factor with a positive diagonal counts.
        if (u.allFinite() && (u.diagonal().array() > 0.0).all()) break;
      }
    }
    if (attempt == 3) return -2;
    damping = std::min(std::max(damping * 10.0, 1e-4), kMaxDamping);
  }

  RowMatrixD wd = Eigen::Map<const RowMatrixF>(w, n, k).cast<double>();
  // Columns are rounded in blocks; updates inside a block are immediate, the rest of the matrix
  // gets one product per block. A block holds whole groups, so a group's scale is set from
  // columns that all carry the updates of the columns before them.
  const std::int64_t block =
      group >= k ? std::min<std::int64_t>(k, 128) : group * std::max<std::int64_t>(1, 128 / group);
  std::vector<GroupScale> scale(static_cast<std::size_t>(n));
  std::vector<float> values(static_cast<std::size_t>(group));
  RowMatrixD err(n, block);
  for (std::int64_t b0 = 0; b0 < k; b0 += block) {
    const std::int64_t b1 = std::min(k, b0 + block), width = b1 - b0;
    for (std::int64_t c = b0; c < b1; ++c) {
      if (c % group == 0) {
        // In float, as quantize_rows sees them, so a diagonal H gives its codes exactly.
        for (std::int64_t r = 0; r < n; ++r) {
          for (std::int64_t j = 0; j < group; ++j)
            values[static_cast<std::size_t>(j)] = static_cast<float>(wd(r, c + j));
          if (!std::all_of(values.begin(), values.end(), [](float v) { return std::isfinite(v); }))
            return -2;  // the updates overflowed: the caller rounds to nearest
          const GroupScale s = group_scale(
              values.data(), group, rule.col_scale ? rule.col_scale + c : nullptr, rule.search);
          scale[static_cast<std::size_t>(r)] = s;
          scales[r * groups + c / group] = s.scale;
        }
      }
      const double d = u(c, c);
      for (std::int64_t r = 0; r < n; ++r) {
        const float v = static_cast<float>(wd(r, c));
        if (!std::isfinite(v)) return -2;  // the updates overflowed: the caller rounds to nearest
        const GroupScale& s = scale[static_cast<std::size_t>(r)];
        const std::int8_t code = round_code(v, s);
        q[r * k + c] = code;
        const double e = (wd(r, c) - static_cast<double>(code) * s.scale) / d;
        err(r, c - b0) = e;
        for (std::int64_t j = c + 1; j < b1; ++j) wd(r, j) -= e * u(c, j);
      }
    }
    if (b1 < k)
      wd.rightCols(k - b1).noalias() -= err.leftCols(width) * u.block(b0, b1, width, k - b1);
  }
  return -1;
}

}  // namespace detail

// ------------------------------------------------------------------------------ quantize_model

std::vector<std::vector<std::int32_t>> Calibration::read_sequences(
    const std::filesystem::path& path) {
  constexpr std::string_view fn = "Calibration::read_sequences";
  std::ifstream f(path);
  AUTOGLM_CHECK(f.good(), io, fn, "cannot read {}", path.string());
  std::vector<std::vector<std::int32_t>> out;
  std::string line;
  for (std::int64_t n = 1; std::getline(f, line); ++n) {
    std::vector<std::int32_t> seq;
    std::size_t i = 0;
    while (i < line.size()) {
      if (line[i] == ' ' || line[i] == ',' || line[i] == '\t' || line[i] == '\r') {
        ++i;
        continue;
      }
      std::size_t j = i;
      while (j < line.size() && line[j] != ' ' && line[j] != ',' && line[j] != '\t' &&
             line[j] != '\r')
        ++j;
      std::int32_t v = -1;
      const auto [end, ec] = std::from_chars(line.data() + i, line.data() + j, v);
      AUTOGLM_CHECK(ec == std::errc() && end == line.data() + j && v >= 0, io, fn,
                    "{} line {}: '{}' is not a token id", path.string(), n,
                    line.substr(i, std::min<std::size_t>(j - i, 32)));
      seq.push_back(v);
      i = j;
    }
    if (!seq.empty()) out.push_back(std::move(seq));
  }
  AUTOGLM_CHECK(!out.empty(), io, fn, "{} holds no token sequences", path.string());
  return out;
}

Model quantize_model(const Model& model, const QuantConfig& config,
                     const Calibration& calibration) {
  constexpr std::string_view fn = "quantize_model";
  detail::check_tied_parts(fn, model.config().tie_word_embeddings, config);
  AUTOGLM_CHECK(!calibration.sequences.empty(), invalid_argument, fn,
                "the calibration set holds no sequences");
  const std::int64_t V = model.embeddings().vocab_size();
  const std::int64_t max_context =
      std::max<std::int64_t>(1, model.config().max_position_embeddings);
  for (std::size_t s = 0; s < calibration.sequences.size(); ++s) {
    const auto& seq = calibration.sequences[s];
    AUTOGLM_CHECK(!seq.empty(), invalid_argument, fn, "calibration sequence {} is empty", s);
    AUTOGLM_CHECK(std::ssize(seq) <= max_context, out_of_range, fn,
                  "calibration sequence {} holds {} tokens, more than the model's context {}", s,
                  seq.size(), max_context);
    for (std::size_t t = 0; t < seq.size(); ++t)
      AUTOGLM_CHECK(seq[t] >= 0 && seq[t] < V, out_of_range, fn,
                    "calibration sequence {} has token id {} at position {}, outside the "
                    "vocabulary [0, {})",
                    s, seq[t], t, V);
  }
  detail::check_gptq_options(fn, calibration.gptq);

  Backend& b = model.backend();
  EmbeddingEncoder embeddings =
      config.embeddings ? model.embeddings().quantized(b, config.spec) : model.embeddings();

  // The residual stream of every sequence, with its positions.
  struct Stream {
    Tensor x;  // [T, d]
    Tensor positions;
  };
  std::int64_t longest = 0;
  std::vector<Stream> streams;
  streams.reserve(calibration.sequences.size());
  for (const auto& seq : calibration.sequences) {
    const auto T = static_cast<std::int64_t>(seq.size());
    Tensor ids(b, DType::i32, Shape{T});
    b.copy_from_host(ids, seq.data());
    std::vector<std::int32_t> pos(seq.size());
    for (std::size_t t = 0; t < pos.size(); ++t) pos[t] = static_cast<std::int32_t>(t);
    Tensor positions(b, DType::i32, Shape{T});
    b.copy_from_host(positions, pos.data());
    Tensor x(b, DType::f32, Shape{T, model.hidden()});
    embeddings.encode(b, ids, x);
    streams.push_back(Stream{std::move(x), std::move(positions)});
    longest = std::max(longest, T);
  }

  std::vector<DecoderLayer> layers;
  layers.reserve(model.layers().size());
  for (std::size_t l = 0; l < model.layers().size(); ++l) {
    const DecoderLayer& layer = model.layers()[l];
    // Every pass starts at position 0 and writes the cache rows it reads: one cache as long as
    // the longest sequence serves every sequence and both passes of this layer.
    KvLayer cache{Tensor(b, DType::f32, Shape{longest, layer.kv_heads(), layer.key_dim()}),
                  Tensor(b, DType::f32, Shape{longest, layer.kv_heads(), layer.value_dim()})};
    InputRecorder recorder(b);
    for (Stream& s : streams) {
      const AttentionContext ctx{s.positions, model.inv_freq(), 0};
      Tensor x(b, DType::f32, s.x.shape());
      b.convert(s.x, x);  // the f32 pass must not move the stream
      layer.forward(recorder, x, ctx, cache);
    }
    {
      GptqScope scope(recorder, calibration.gptq);
      layers.push_back(layer.quantized(b, config));
    }
    for (Stream& s : streams) {
      const AttentionContext ctx{s.positions, model.inv_freq(), 0};
      layers.back().forward(b, s.x, ctx, cache);
    }
  }
  // The layers and the embedding table are int8 already (quantize_weight keeps int8 weights):
  // this rounds the head as quantize_model without calibration does.
  return quantize_model(
      Model(b, model.config(), std::move(embeddings), std::move(layers), model.head()), config);
}

}  // namespace autoglm
