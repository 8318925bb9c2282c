// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "autoglm/backend/backend.hpp"
#include "autoglm/moe/decoder.hpp"
#include "autoglm/moe/encoder.hpp"
#include "autoglm/moe/layer.hpp"

namespace autoglm {

/// Per-layer routing of one forward pass, on the host.
struct LayerTrace {
  std::int64_t slots = 0;             ///< columns of ids / weights
  std::vector<std::int32_t> ids;      ///< [T, slots] chosen experts (-1: none)
  std::vector<float> weights;         ///< [T, slots] routing weights
  RoutingStats stats;                 ///< load statistics
};

/// Output of Pipeline::forward.
struct PipelineResult {
  Tensor logits;                   ///< [T, V] on the backend
  std::vector<LayerTrace> layers;  ///< one per MoE layer when tracing, else empty
};

/// Options of Pipeline.
struct PipelineOptions {
  bool pre_norm = true;     ///< RMSNorm before each MoE layer (x + MoE(norm(x)))
  float norm_eps = 1e-6f;   ///< eps of those norms
};

/// Encoder -> N x (x + MoE(norm(x))) -> Decoder.
template <typename Enc, typename Layer, typename Dec>
  requires Encoder<Enc> && Decoder<Dec>
class Pipeline {
 public:
  /// Checks that the widths of all parts agree.
  Pipeline(Enc encoder, std::vector<Layer> layers, Dec decoder, PipelineOptions options = {})
      : encoder_(std::move(encoder)), layers_(std::move(layers)), decoder_(std::move(decoder)),
        options_(options) {
    const std::int64_t d = encoder_.hidden();
    AUTOGLM_CHECK(decoder_.hidden() == d, shape_mismatch, "Pipeline",
                  "decoder width {} differs from encoder width {}", decoder_.hidden(), d);
    for (std::size_t i = 0; i < layers_.size(); ++i)
      AUTOGLM_CHECK(layers_[i].hidden() == d, shape_mismatch, "Pipeline",
                    "layer {} has width {}, encoder {}", i, layers_[i].hidden(), d);
    AUTOGLM_CHECK(options_.norm_eps > 0.0f, invalid_argument, "Pipeline", "norm_eps={} must be > 0",
                  options_.norm_eps);
  }

  /// The encoder.
  const Enc& encoder() const noexcept { return encoder_; }
  /// The MoE layers.
  const std::vector<Layer>& layers() const noexcept { return layers_; }
  /// The decoder.
  const Dec& decoder() const noexcept { return decoder_; }
  /// d.
  std::int64_t hidden() const noexcept { return encoder_.hidden(); }
  /// V of the decoder.
  std::int64_t vocab_size() const noexcept { return decoder_.vocab_size(); }

  // tokens: [T] host ids -> logits [T, V].
  /// Runs the pipeline; with `trace`, records every layer's routing on the host.
  template <BackendLike B>
  PipelineResult forward(B& backend, std::span<const std::int32_t> tokens, bool trace = false) const {
    const auto T = static_cast<std::int64_t>(tokens.size());
    const std::int64_t d = hidden();
    PipelineResult res;
    res.logits = Tensor(backend, DType::f32, Shape{T, vocab_size()});
    if (T == 0) return res;
    Tensor ids(backend, DType::i32, Shape{T});
    backend.copy_from_host(ids, tokens.data());
    Tensor x(backend, DType::f32, Shape{T, d});
    encoder_.encode(backend, ids, x);
    Tensor ones;
    if (options_.pre_norm) {
      ones = Tensor(backend, DType::f32, Shape{d});
      backend.fill(ones, 1.0f);
    }
    Tensor h(backend, DType::f32, Shape{T, d});
    Tensor y(backend, DType::f32, Shape{T, d});
    for (const Layer& layer : layers_) {
      TensorView in = x;
      if (options_.pre_norm) {
        backend.rms_norm(x, ones, options_.norm_eps, h);
        in = h;
      }
      const Routing r = layer.route(backend, in);
      layer.apply(backend, in, r, y);
      backend.add(x, y, x);
      if (trace) {
        LayerTrace lt;
        lt.slots = r.ids.dim(1);
        lt.ids.resize(static_cast<std::size_t>(r.ids.numel()));
        lt.weights.resize(lt.ids.size());
        backend.copy_to_host(lt.ids.data(), r.ids);
        backend.copy_to_host(lt.weights.data(), r.weights);
        lt.stats = routing_stats(backend, r);
        res.layers.push_back(std::move(lt));
      }
    }
    decoder_.decode(backend, x, res.logits);
    return res;
  }

  /// Greedy or sampled continuation of `prompt` by `max_new` tokens. Every position is encoded
  /// independently in this attention-free pipeline, so each step feeds only the newest token.
  template <BackendLike B>
  std::vector<std::int32_t> generate(B& backend, std::span<const std::int32_t> prompt,
                                     int max_new, Sampler& sampler) const {
    AUTOGLM_CHECK(!prompt.empty(), invalid_argument, "Pipeline::generate", "empty prompt");
    AUTOGLM_CHECK(max_new >= 0, invalid_argument, "Pipeline::generate", "max_new={} must be >= 0",
                  max_new);
    std::vector<std::int32_t> out;
    std::vector<float> logits(static_cast<std::size_t>(vocab_size()));
    std::int32_t last = prompt.back();
    for (int i = 0; i < max_new; ++i) {
      const PipelineResult r = forward(backend, std::span<const std::int32_t>(&last, 1));
      backend.copy_to_host(logits.data(), r.logits);
      last = sampler.sample(logits);
      out.push_back(last);
    }
    return out;
  }

 private:
  Enc encoder_;
  std::vector<Layer> layers_;
  Dec decoder_;
  PipelineOptions options_;
};

}  // namespace autoglm
