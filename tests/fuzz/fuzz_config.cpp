// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: parse_model_config on arbitrary bytes. It must return a ModelConfig or throw
// autoglm::Error; a crash, a sanitizer report or any other exception is a bug. The derived
// helpers of a config that parsed must not throw at all (they run outside the try).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "autoglm/io/model_config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::optional<autoglm::ModelConfig> c;
  try {
    c = autoglm::parse_model_config(text, "fuzz.json");
  } catch (const autoglm::Error&) {
    return 0;
  }
  const std::int64_t layers = c->num_hidden_layers + c->num_nextn_predict_layers;
  int moe = 0;
  for (std::int64_t i = 0; i < layers && i < 4096; ++i)
    moe += c->is_moe_layer(static_cast<int>(i)) ? 1 : 0;
  const autoglm::GateOptions g = c->gate_options();
  volatile double sink =
      c->attention_scale() + c->rope_attention_factor() + c->rotary_dim() + g.top_k + moe;
  (void)sink;
  return 0;
}
