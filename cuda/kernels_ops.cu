// SPDX-License-Identifier: Apache-2.0
// CUDA kernels for the elementwise, normalisation and attention primitives.
#include <cstdint>

#include "device_common.cuh"
#include "kernels.hpp"

namespace autoglm::cuda_kernels {
namespace {

using dev::grid_start;
using dev::grid_stride;

__global__ void silu_mul_kernel(const float* in, dev::i64 R, dev::i64 F, float* out) {
  for (dev::i64 i = grid_start(); i < R * F; i += grid_stride()) {
    const dev::i64 r = i / F, c = i % F;
    const float g = in[r * 2 * F + c], u = in[r * 2 * F + F + c];
    out[i] = g / (1.0f + expf(-g)) * u;
  }
}

__global__ void gelu_kernel(const float* in, float* out, dev::i64 n) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride()) {
    const float v = in[i];
    out[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
  }
}

// One block per row, as every row reduction here.
__global__ void softmax_kernel(float* x, dev::i64 n) {
  __shared__ float red[32];
  float* v = x + static_cast<dev::i64>(blockIdx.x) * n;
  float m = -INFINITY;
  for (dev::i64 i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, v[i]);
  m = dev::block_max(m, red);
  float s = 0.0f;
  for (dev::i64 i = threadIdx.x; i < n; i += blockDim.x) s += (v[i] = expf(v[i] - m));
  s = dev::block_sum(s, red);
  for (dev::i64 i = threadIdx.x; i < n; i += blockDim.x) v[i] /= s;
}

__global__ void rms_norm_kernel(const float* x, const float* w, dev::i64 d, float eps, float* out) {
  __shared__ float red[32];
  const float* xi = x + static_cast<dev::i64>(blockIdx.x) * d;
  float* o = out + static_cast<dev::i64>(blockIdx.x) * d;
  float ss = 0.0f;
  for (dev::i64 c = threadIdx.x; c < d; c += blockDim.x) ss += xi[c] * xi[c];
  ss = dev::block_sum(ss, red);  // every read of xi precedes any write of o (in place)
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  for (dev::i64 c = threadIdx.x; c < d; c += blockDim.x) o[c] = xi[c] * inv * w[c];
}

__global__ void add_kernel(const float* a, const float* b, float* out, dev::i64 n) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride()) out[i] = a[i] + b[i];
}

__global__ void add_scaled_rows_kernel(const float* x, const float* scale, bool sigmoid, dev::i64 T,
                                       dev::i64 d, float* out) {
  for (dev::i64 i = grid_start(); i < T * d; i += grid_stride()) {
    float s = scale[i / d];
    if (sigmoid) s = 1.0f / (1.0f + expf(-s));
    out[i] += s * x[i];
  }
}

__global__ void embedding_kernel(const float* table, dev::i64 V, const std::int32_t* ids, dev::i64 T,
                                 dev::i64 d, float* out) {
  for (dev::i64 i = grid_start(); i < T * d; i += grid_stride()) {
    const std::int32_t id = ids[i / d];
    out[i] = id >= 0 && id < V ? table[id * d + i % d] : 0.0f;
  }
}

__global__ void add_bias_kernel(const float* x, const float* b, dev::i64 R, dev::i64 N, float* out) {
  for (dev::i64 i = grid_start(); i < R * N; i += grid_stride()) out[i] = x[i] + b[i % N];
}

__global__ void clamp_kernel(float* x, dev::i64 n, float lo, float hi) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride()) {
    float v = x[i];
    v = v < lo ? lo : v;  // std::min(std::max(v, lo), hi): NaN stays NaN
    v = hi < v ? hi : v;
    x[i] = v;
  }
}

template <typename T>
__global__ void copy_columns_kernel(const T* src, dev::i64 Cs, dev::i64 src_col, T* dst, dev::i64 Rd,
                                    dev::i64 Cd, dev::i64 dst_col, dev::i64 width, dev::i64 g) {
  for (dev::i64 i = grid_start(); i < Rd * width; i += grid_stride()) {
    const dev::i64 r = i / width, j = i % width;
    dst[r * Cd + dst_col + j] = src[(r / g) * Cs + src_col + j];
  }
}

// One block per (token, head): the rotated slice is staged in shared memory first, because
// the interleaved layout writes element i from elements 2i and 2i + 1.
__global__ void rope_kernel(float* x, const std::int32_t* pos, const float* f, dev::i64 H, dev::i64 D,
                            dev::i64 offset, dev::i64 r, bool interleaved, float af) {
  extern __shared__ float buf[];
  const dev::i64 th = blockIdx.x, t = th / H, half = r / 2;
  float* v = x + th * D + offset;
  for (dev::i64 i = threadIdx.x; i < r; i += blockDim.x) buf[i] = v[i];
  __syncthreads();
  const float fp = static_cast<float>(pos[t]);
  for (dev::i64 i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(fp, f[i]);  // f32 product, as transformers forms freqs
    const float c = cosf(angle) * af, s = sinf(angle) * af;
    const float a = interleaved ? buf[2 * i] : buf[i];
    const float b = interleaved ? buf[2 * i + 1] : buf[half + i];
    v[i] = a * c - b * s;
    v[half + i] = b * c + a * s;
  }
}

constexpr int kValuesPerLane = static_cast<int>(cuda_detail::kMaxAttentionValueDim / 32);

// One block per (query, head). Each warp takes every warps-th key of the visible range and
// keeps an online softmax (running max, sum, value accumulator spread over its lanes); the
// warps' partial results are merged at the end. Keys are visited in a fixed order, so the
// result is deterministic.
__global__ void attention_kernel(const float* q, const float* k, const float* v,
                                 const std::int32_t* pos, dev::i64 Hq, dev::i64 S, dev::i64 Hkv,
                                 dev::i64 D, dev::i64 Dv, float scale, bool causal, dev::i64 window,
                                 float* out) {
  extern __shared__ float sh[];
  const unsigned warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
  float* qs = sh;                // [D]
  float* wm = qs + D;            // [warps]
  float* wl = wm + warps;        // [warps]
  float* wacc = wl + warps;      // [warps, Dv]
  const dev::i64 th = blockIdx.x, t = th / Hq, h = th % Hq, kh = h / (Hq / Hkv);
  const dev::i64 p_t = pos[t];
  const dev::i64 end = causal ? (S < p_t + 1 ? S : p_t + 1) : S;
  const dev::i64 begin = window > 0 ? (p_t - window + 1 > 0 ? p_t - window + 1 : 0) : 0;
  float* o = out + th * Dv;
  if (begin >= end) {  // sees no key: zeros (the whole block takes this branch)
    for (dev::i64 i = threadIdx.x; i < Dv; i += blockDim.x) o[i] = 0.0f;
    return;
  }
  for (dev::i64 i = threadIdx.x; i < D; i += blockDim.x) qs[i] = q[th * D + i];
  __syncthreads();
  float m = -INFINITY, l = 0.0f, acc[kValuesPerLane];
#pragma unroll
  for (int c = 0; c < kValuesPerLane; ++c) acc[c] = 0.0f;
  for (dev::i64 s = begin + warp; s < end; s += warps) {
    const float* kr = k + (s * Hkv + kh) * D;
    float dot = 0.0f;
    for (dev::i64 i = lane; i < D; i += 32) dot += qs[i] * kr[i];
    const float sc = dev::warp_sum(dot) * scale;
    const float m_new = fmaxf(m, sc);
    const float corr = expf(m - m_new);  // 0 on the first key (m = -inf)
    const float p = expf(sc - m_new);
    l = l * corr + p;
    const float* vr = v + (s * Hkv + kh) * Dv;
#pragma unroll
    for (int c = 0; c < kValuesPerLane; ++c) {
      const dev::i64 i = lane + 32 * c;
      if (i < Dv) acc[c] = acc[c] * corr + p * vr[i];
    }
    m = m_new;
  }
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
#pragma unroll
  for (int c = 0; c < kValuesPerLane; ++c) {
    const dev::i64 i = lane + 32 * c;
    if (i < Dv) wacc[warp * Dv + i] = acc[c];
  }
  __syncthreads();
  float M = -INFINITY;
  for (unsigned w = 0; w < warps; ++w) M = fmaxf(M, wm[w]);
  float L = 0.0f;
  for (unsigned w = 0; w < warps; ++w) L += wl[w] * expf(wm[w] - M);  // idle warp: 0 * 0
  for (dev::i64 i = threadIdx.x; i < Dv; i += blockDim.x) {
    float a = 0.0f;
    for (unsigned w = 0; w < warps; ++w) a += wacc[w * Dv + i] * expf(wm[w] - M);
    o[i] = a / L;
  }
}

template <typename Kernel, typename... Args>
void grid_launch(Kernel kernel, dev::i64 n, cudaStream_t s, Args... args) {
  const cuda_detail::LaunchConfig lc = cuda_detail::elementwise_launch(n);
  if (lc.grid > 0) kernel<<<lc.grid, lc.block, 0, s>>>(args...);
}

}  // namespace

void silu_mul(const float* in, i64 R, i64 F, float* out, cudaStream_t s) {
  grid_launch(silu_mul_kernel, R * F, s, in, R, F, out);
}
void gelu(const float* in, float* out, i64 n, cudaStream_t s) { grid_launch(gelu_kernel, n, s, in, out, n); }
void softmax_rows(float* x, i64 rows, i64 n, cudaStream_t s) {
  if (rows <= 0 || n <= 0) return;
  softmax_kernel<<<static_cast<unsigned>(rows), cuda_detail::row_block(n), 0, s>>>(x, n);
}
void rms_norm(const float* x, const float* w, i64 T, i64 d, float eps, float* out, cudaStream_t s) {
  if (T <= 0) return;
  rms_norm_kernel<<<static_cast<unsigned>(T), cuda_detail::row_block(d), 0, s>>>(x, w, d, eps, out);
}
void add(const float* a, const float* b, float* out, i64 n, cudaStream_t s) {
  grid_launch(add_kernel, n, s, a, b, out, n);
}
void add_scaled_rows(const float* x, const float* scale, bool sigmoid, i64 T, i64 d, float* out,
                     cudaStream_t s) {
  grid_launch(add_scaled_rows_kernel, T * d, s, x, scale, sigmoid, T, d, out);
}
void embedding(const float* table, i64 V, const std::int32_t* ids, i64 T, i64 d, float* out,
               cudaStream_t s) {
  grid_launch(embedding_kernel, T * d, s, table, V, ids, T, d, out);
}
void add_bias(const float* x, const float* bias, i64 R, i64 N, float* out, cudaStream_t s) {
  grid_launch(add_bias_kernel, R * N, s, x, bias, R, N, out);
}
void clamp(float* x, i64 n, float lo, float hi, cudaStream_t s) { grid_launch(clamp_kernel, n, s, x, n, lo, hi); }
void copy_columns(const void* src, i64 Cs, i64 src_col, void* dst, i64 Rd, i64 Cd, i64 dst_col,
                  i64 width, i64 g, int elem, cudaStream_t s) {
  const i64 n = Rd * width;
  switch (elem) {
    case 1:
      grid_launch(copy_columns_kernel<std::uint8_t>, n, s, static_cast<const std::uint8_t*>(src), Cs,
                  src_col, static_cast<std::uint8_t*>(dst), Rd, Cd, dst_col, width, g);
      break;
    case 2:
      grid_launch(copy_columns_kernel<std::uint16_t>, n, s, static_cast<const std::uint16_t*>(src), Cs,
                  src_col, static_cast<std::uint16_t*>(dst), Rd, Cd, dst_col, width, g);
      break;
    default:
      grid_launch(copy_columns_kernel<std::uint32_t>, n, s, static_cast<const std::uint32_t*>(src), Cs,
                  src_col, static_cast<std::uint32_t*>(dst), Rd, Cd, dst_col, width, g);
  }
}
void rope(float* x, const std::int32_t* pos, const float* inv_freq, i64 T, i64 H, i64 D, i64 offset,
          i64 r, bool interleaved, float af, cudaStream_t s) {
  if (T * H <= 0) return;
  rope_kernel<<<static_cast<unsigned>(T * H), cuda_detail::row_block(r / 2, 128),
                static_cast<std::size_t>(r) * sizeof(float), s>>>(x, pos, inv_freq, H, D, offset, r,
                                                                  interleaved, af);
}
void attention(const float* q, const float* k, const float* v, const std::int32_t* pos, i64 T,
               i64 Hq, i64 S, i64 Hkv, i64 D, i64 Dv, float scale, bool causal, i64 window,
               float* out, std::uint32_t warps, std::size_t shared_bytes, cudaStream_t s) {
  if (T * Hq <= 0) return;
  attention_kernel<<<static_cast<unsigned>(T * Hq), 32 * warps, shared_bytes, s>>>(
      q, k, v, pos, Hq, S, Hkv, D, Dv, scale, causal, window, out);
}

}  // namespace autoglm::cuda_kernels
