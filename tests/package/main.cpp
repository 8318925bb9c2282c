// SPDX-License-Identifier: Apache-2.0
// Uses the installed package: a small MoE layer checked against a direct computation.
#include <cmath>
#include <cstdio>
#include <vector>

#include <autoglm/autoglm.hpp>

int main() {
  using namespace autoglm;
  CpuBackend backend(CpuBackendOptions{1});
  const std::int64_t E = 4, d = 16, f = 8, T = 5;
  // argmax routing with one expert bank: y = expert_{argmax}(x), checked per token by hand.
  GateOptions go;
  go.policy = GatePolicy::argmax;
  MoELayer layer(GateNetwork::random(backend, E, d, go, 1), SwiGluExperts::random(backend, E, d, f, 2));
  Tensor x(backend, DType::f32, Shape{T, d}), y(backend, DType::f32, Shape{T, d});
  backend.fill_uniform(x, 3, 1.0f);
  layer.forward(backend, x, y);
  std::vector<float> xs(T * d), ys(T * d), wr(E * d), gu(E * 2 * f * d), dn(E * d * f);
  backend.copy_to_host(xs.data(), x);
  backend.copy_to_host(ys.data(), y);
  backend.copy_to_host(wr.data(), layer.gate().weight());
  backend.copy_to_host(gu.data(), layer.experts().gate_up());
  backend.copy_to_host(dn.data(), layer.experts().down());
  double err = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    const float* xt = &xs[t * d];
    std::int64_t best = 0;
    double bl = -1e30;
    for (std::int64_t e = 0; e < E; ++e) {
      double l = 0;
      for (std::int64_t c = 0; c < d; ++c) l += wr[e * d + c] * xt[c];
      if (l > bl) bl = l, best = e;
    }
    std::vector<double> h(f);
    for (std::int64_t i = 0; i < f; ++i) {
      double g = 0, u = 0;
      for (std::int64_t c = 0; c < d; ++c) {
        g += gu[(best * 2 * f + i) * d + c] * xt[c];
        u += gu[(best * 2 * f + f + i) * d + c] * xt[c];
      }
      h[i] = g / (1 + std::exp(-g)) * u;
    }
    for (std::int64_t c = 0; c < d; ++c) {
      double o = 0;
      for (std::int64_t i = 0; i < f; ++i) o += dn[(best * d + c) * f + i] * h[i];
      err = std::max(err, std::fabs(o - ys[t * d + c]));
    }
  }
  std::printf("autoglm %s consumer: max |error| %.3g\n", AUTOGLM_VERSION_STRING, err);
  return err < 1e-4 ? 0 : 1;
}
