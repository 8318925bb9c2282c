// SPDX-License-Identifier: Apache-2.0
// CUDA kernels for the elementwise, normalisation and attention primitives, and the int8
// GEMMs (weight-only and W8A8) with the int8 embedding lookup.
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

__global__ void embedding_kernel(const float* table, dev::i64 V, const std::int32_t* ids,
                                 dev::i64 T, dev::i64 d, float* out) {
  for (dev::i64 i = grid_start(); i < T * d; i += grid_stride()) {
    const std::int32_t id = ids[i / d];
    out[i] = id >= 0 && id < V ? table[id * d + i % d] : 0.0f;
  }
}

__global__ void add_bias_kernel(const float* x, const float* b, dev::i64 R, dev::i64 N,
                                float* out) {
  for (dev::i64 i = grid_start(); i < R * N; i += grid_stride()) out[i] = x[i] + b[i % N];
}

__global__ void scale_columns_kernel(const float* x, dev::i64 k, const float* col_scale, float* out,
                                     dev::i64 n) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride())
    out[i] = __fmul_rn(x[i], col_scale[i % k]);
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
__global__ void copy_columns_kernel(const T* src, dev::i64 Cs, dev::i64 src_col, T* dst,
                                    dev::i64 Rd, dev::i64 Cd, dev::i64 dst_col, dev::i64 width,
                                    dev::i64 g) {
  for (dev::i64 i = grid_start(); i < Rd * width; i += grid_stride()) {
    const dev::i64 r = i / width, j = i % width;
    dst[r * Cd + dst_col + j] = src[(r / g) * Cs + src_col + j];
  }
}

// One block per (token, head): the rotated slice is staged in shared memory first, because
// the interleaved layout writes element i from elements 2i and 2i + 1.
__global__ void rope_kernel(float* x, const std::int32_t* pos, const float* f, dev::i64 H,
                            dev::i64 D, dev::i64 offset, dev::i64 r, bool interleaved, float af) {
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
  float* qs = sh;            // [D]
  float* wm = qs + D;        // [warps]
  float* wl = wm + warps;    // [warps]
  float* wacc = wl + warps;  // [warps, Dv]
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

// ------------------------------------------------------------------ int8 GEMM
// Decode (m <= kQRowsMax rows of x): one warp per output column j reads weight row j once,
// coalesced (16-byte loads when aligned), for all rows of x at once: the product is bound by
// the weight stream. Prefill: kTile x kTile output tiles kTileK deep through shared memory.
// Scales are applied once per group; W8A8 sums each group exactly in int32 first, as the CPU
// does, so only the f32 sum over groups differs from it in rounding.

constexpr int kQWarps = static_cast<int>(cuda_detail::kQRowsWarps);
constexpr int kTile = static_cast<int>(cuda_detail::kQTile);
constexpr int kTileK = static_cast<int>(cuda_detail::kQTileK);
constexpr unsigned kFullMask = 0xffffffffu;

// Exact int8 -> f32 of the four bytes of w (byte i -> f[i]): byte + 128 becomes the low
// mantissa of 2^23, and subtracting 2^23 + 128 leaves the value. Two full-rate integer / FP
// operations instead of a quarter-rate I2F conversion per weight, which would otherwise bound
// the decode kernel below the memory bandwidth.
__device__ __forceinline__ void bytes_to_floats(std::uint32_t w, float* f) {
  const std::uint32_t u = w ^ 0x80808080u;
#pragma unroll
  for (unsigned i = 0; i < 4; ++i)
    f[i] = __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7440u + i)) - 8388736.0f;
}

// Weight-only, decode. V: weight bytes per lane load (16: int4 loads, needs k % 16 == 0 and
// aligned rows; 1: any k). MR >= m rows of x. A 16-byte chunk lies within one scale group
// (groups are multiples of 16), so its partial sum takes its scale once.
template <int V, int MR>
__global__ void __launch_bounds__(256) qrows_wonly_kernel(const float* __restrict__ x, dev::i64 m,
                                                          QMatrix w, float* __restrict__ out) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const dev::i64 j = static_cast<dev::i64>(blockIdx.x) * kQWarps + (threadIdx.x >> 5);
  if (j >= w.n) return;  // a whole warp: nothing block-wide follows
  const int k = static_cast<int>(w.k), group = static_cast<int>(w.group);
  const std::int8_t* wj = w.data + j * w.k;
  const float* sj = w.scales + j * w.groups;
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.0f;
  if constexpr (V == 16) {
    for (int c = lane * 16; c < k; c += 32 * 16) {
      const int4 raw = __ldg(reinterpret_cast<const int4*>(wj + c));
      float wf[16];
      bytes_to_floats(static_cast<std::uint32_t>(raw.x), wf);
      bytes_to_floats(static_cast<std::uint32_t>(raw.y), wf + 4);
      bytes_to_floats(static_cast<std::uint32_t>(raw.z), wf + 8);
      bytes_to_floats(static_cast<std::uint32_t>(raw.w), wf + 12);
      const float s = __ldg(sj + c / group);
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (r < m) {
          const float4* xr = reinterpret_cast<const float4*>(x + r * w.k + c);
          float part = 0.0f;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float4 v = __ldg(xr + q);
            part = fmaf(v.x, wf[4 * q], part);
            part = fmaf(v.y, wf[4 * q + 1], part);
            part = fmaf(v.z, wf[4 * q + 2], part);
            part = fmaf(v.w, wf[4 * q + 3], part);
          }
          acc[r] = fmaf(part, s, acc[r]);
        }
      }
    }
  } else {
    for (int c = lane; c < k; c += 32) {
      const float wv = static_cast<float>(wj[c]) * __ldg(sj + c / group);
#pragma unroll
      for (int r = 0; r < MR; ++r)
        if (r < m) acc[r] = fmaf(__ldg(x + r * w.k + c), wv, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    const float v = dev::warp_sum(acc[r]);
    if (lane == 0 && r < m) out[r * w.n + j] = v;
  }
}

// W8A8, decode: int32 dot products (__dp4a, four int8 pairs per instruction) summed exactly
// over each scale group, then scaled by the weight's and the activation row's group scales. A group
// of g columns spans L = g / V lanes of one pass (V = 16: 2, 4 or 8 lanes; V = 1: 32) or P = g /
// (32 V) whole passes; its lanes' sums are added with shuffles (exact) and one lane applies the
// scale. One group per row (per channel, or a grouped k == g) sums the whole row: int32 per lane,
// int64 across lanes, then one conversion, exactly the CPU's value.
template <int V, int MR>
__global__ void __launch_bounds__(256)
    qrows_w8a8_kernel(const std::int8_t* __restrict__ xq, dev::i64 ldq,
                      const float* __restrict__ xs, dev::i64 m, QMatrix w,
                      float* __restrict__ out) {
  constexpr int kStep = 32 * V;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const dev::i64 j = static_cast<dev::i64>(blockIdx.x) * kQWarps + (threadIdx.x >> 5);
  if (j >= w.n) return;
  const int k = static_cast<int>(w.k), group = static_cast<int>(w.group);
  const std::int8_t* wj = w.data + j * w.k;
  const float* sj = w.scales + j * w.groups;
  const bool whole = w.groups == 1;
  const int L = whole ? 32 : min(group / V, 32);
  const int P = whole ? 1 : max(group / kStep, 1);
  int isum[MR];
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    isum[r] = 0;
    acc[r] = 0.0f;
  }
  const int passes = (k + kStep - 1) / kStep;
  for (int it = 0; it < passes; ++it) {
    const int c = it * kStep + lane * V;
    if (c < k) {
      if constexpr (V == 16) {
        const int4 wv = __ldg(reinterpret_cast<const int4*>(wj + c));
#pragma unroll
        for (int r = 0; r < MR; ++r) {
          if (r < m) {
            const int4 xv = __ldg(reinterpret_cast<const int4*>(xq + r * ldq + c));
            isum[r] = __dp4a(xv.x, wv.x, isum[r]);
            isum[r] = __dp4a(xv.y, wv.y, isum[r]);
            isum[r] = __dp4a(xv.z, wv.z, isum[r]);
            isum[r] = __dp4a(xv.w, wv.w, isum[r]);
          }
        }
      } else {
        const int wv = wj[c];
#pragma unroll
        for (int r = 0; r < MR; ++r)
          if (r < m) isum[r] += static_cast<int>(xq[r * ldq + c]) * wv;
      }
    }
    if (!whole && (it + 1) % P == 0) {  // the groups of this pass are complete
      const bool leader = (lane & (L - 1)) == 0 && c < k;
      const dev::i64 g = c / group;
      const float s = leader ? __ldg(sj + g) : 0.0f;
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        int v = isum[r];
        for (int o = 1; o < L; o <<= 1) v += __shfl_xor_sync(kFullMask, v, o);
        if (leader && r < m)
          acc[r] = fmaf(__int2float_rn(v), __fmul_rn(s, __ldg(xs + r * w.groups + g)), acc[r]);
        isum[r] = 0;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    float total;
    if (whole) {
      long long v = isum[r];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
      total = r < m ? __fmul_rn(__ll2float_rn(v), __fmul_rn(__ldg(sj), __ldg(xs + r))) : 0.0f;
    } else {
      total = dev::warp_sum(acc[r]);
    }
    if (lane == 0 && r < m) out[r * w.n + j] = total;
  }
}

// The tiled kernels' group step: when the depth tile ending at `end` closes a scale group (or
// k), each thread's 4 x 4 partial sums (rows row0 + ty + 16 i, columns col0 + tx + 16 jj) are
// added into acc times their group's scale (W8A8: times the row's activation scale of the
// group, xs [m, w.groups]) and cleared.
template <typename T>
__device__ __forceinline__ void fold_group(T (&part)[4][4], float (&acc)[4][4], const QMatrix& w,
                                           dev::i64 col0, int tx, dev::i64 end, dev::i64 k,
                                           const float* xs = nullptr, dev::i64 row0 = 0, int ty = 0,
                                           dev::i64 m = 0) {
  if (end != k && end % w.group != 0) return;
  const dev::i64 g = (end - 1) / w.group;
  float sx[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  if (xs != nullptr) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const dev::i64 row = row0 + ty + 16 * i;
      sx[i] = row < m ? xs[row * w.groups + g] : 0.0f;
    }
  }
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    const dev::i64 col = col0 + tx + 16 * jj;
    const float s = col < w.n ? w.scales[col * w.groups + g] : 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // int -> float rounds to nearest (__int2float_rn) for the W8A8 sums.
      const float st = xs != nullptr ? __fmul_rn(s, sx[i]) : s;
      acc[i][jj] = fmaf(static_cast<float>(part[i][jj]), st, acc[i][jj]);
      part[i][jj] = T(0);
    }
  }
}

// Weight-only, prefill: 256 threads, each 4 x 4 outputs (rows ty + 16 i, columns tx + 16 j, so
// that shared-memory reads are broadcasts or distinct banks). The products of one group are
// summed in `part` and take the group's scale when the group ends (per channel: at the end).
__global__ void __launch_bounds__(256) qtile_wonly_kernel(const float* __restrict__ x, dev::i64 m,
                                                          QMatrix w, float* __restrict__ out) {
  __shared__ float xt[kTile][kTileK + 1];
  __shared__ float wt[kTile][kTileK + 1];
  const int tx = static_cast<int>(threadIdx.x & 15u), ty = static_cast<int>(threadIdx.x >> 4);
  const dev::i64 row0 = static_cast<dev::i64>(blockIdx.y) * kTile;
  const dev::i64 col0 = static_cast<dev::i64>(blockIdx.x) * kTile;
  const dev::i64 k = w.k;
  float acc[4][4], part[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) acc[i][jj] = part[i][jj] = 0.0f;
  for (dev::i64 k0 = 0; k0 < k; k0 += kTileK) {
    for (int i = static_cast<int>(threadIdx.x); i < kTile * kTileK; i += 256) {
      const int r = i / kTileK, c = i % kTileK;
      const dev::i64 kc = k0 + c, xr = row0 + r, wr = col0 + r;
      xt[r][c] = xr < m && kc < k ? x[xr * k + kc] : 0.0f;
      wt[r][c] = wr < w.n && kc < k ? static_cast<float>(w.data[wr * k + kc]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTileK; ++c) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xt[ty + 16 * i][c];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) b[jj] = wt[tx + 16 * jj][c];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) part[i][jj] = fmaf(a[i], b[jj], part[i][jj]);
    }
    __syncthreads();
    fold_group(part, acc, w, col0, tx, k0 + kTileK < k ? k0 + kTileK : k, k);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const dev::i64 row = row0 + ty + 16 * i;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const dev::i64 col = col0 + tx + 16 * jj;
      if (row < m && col < w.n) out[row * w.n + col] = acc[i][jj];
    }
  }
}

// Four int8 at p as one little-endian word for __dp4a; bytes at or past `avail` read as 0.
__device__ __forceinline__ int load_quad(const std::int8_t* p, dev::i64 avail, bool aligned) {
  if (aligned && avail >= 4) return *reinterpret_cast<const int*>(p);
  unsigned v = 0;
#pragma unroll
  for (int b = 0; b < 4; ++b)
    if (b < avail) v |= static_cast<unsigned>(static_cast<std::uint8_t>(p[b])) << (8 * b);
  return static_cast<int>(v);
}

// W8A8, prefill: the tiling of qtile_wonly_kernel on int8 words (four columns each), __dp4a
// products summed exactly in int32 over a group, converted and scaled (weight times activation
// group scale) in group order, the CPU's order. xq rows are zero-padded to ldq,
// a multiple of kTileK, so activation words are read without bounds on k.
__global__ void __launch_bounds__(256)
    qtile_w8a8_kernel(const std::int8_t* __restrict__ xq, dev::i64 ldq,
                      const float* __restrict__ xs, dev::i64 m, QMatrix w,
                      float* __restrict__ out) {
  constexpr int kQuads = kTileK / 4;
  __shared__ int xt[kTile][kQuads + 1];
  __shared__ int wt[kTile][kQuads + 1];
  const int tx = static_cast<int>(threadIdx.x & 15u), ty = static_cast<int>(threadIdx.x >> 4);
  const dev::i64 row0 = static_cast<dev::i64>(blockIdx.y) * kTile;
  const dev::i64 col0 = static_cast<dev::i64>(blockIdx.x) * kTile;
  const dev::i64 k = w.k;
  const bool aligned = k % 4 == 0 && (reinterpret_cast<std::uintptr_t>(w.data) & 3u) == 0;
  int isum[4][4];
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      isum[i][jj] = 0;
      acc[i][jj] = 0.0f;
    }
  for (dev::i64 k0 = 0; k0 < k; k0 += kTileK) {
    for (int i = static_cast<int>(threadIdx.x); i < kTile * kQuads; i += 256) {
      const int r = i / kQuads, q = i % kQuads;
      const dev::i64 kc = k0 + 4 * q, xr = row0 + r, wr = col0 + r;
      xt[r][q] = xr < m ? *reinterpret_cast<const int*>(xq + xr * ldq + kc) : 0;
      wt[r][q] = wr < w.n && kc < k ? load_quad(w.data + wr * k + kc, k - kc, aligned) : 0;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kQuads; ++q) {
      int a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xt[ty + 16 * i][q];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) b[jj] = wt[tx + 16 * jj][q];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) isum[i][jj] = __dp4a(a[i], b[jj], isum[i][jj]);
    }
    __syncthreads();
    fold_group(isum, acc, w, col0, tx, k0 + kTileK < k ? k0 + kTileK : k, k, xs, row0, ty, m);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const dev::i64 row = row0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const dev::i64 col = col0 + tx + 16 * jj;
      if (col < w.n) out[row * w.n + col] = acc[i][jj];
    }
  }
}

// One block per row and group (blockIdx.y steps through the groups when there are more than
// a grid's y extent). Division and round-half-even as the CPU's nearbyint(x / s), so the int8
// activations are identical to the CPU's. The last group also zeroes the row's padding
// (columns k ... ldq).
__global__ void quantize_activations_kernel(const float* __restrict__ x, dev::i64 k, dev::i64 group,
                                            dev::i64 groups, std::int8_t* __restrict__ xq,
                                            dev::i64 ldq, float* __restrict__ xs) {
  __shared__ float red[32];
  const dev::i64 i = blockIdx.x;
  const float* xi = x + i * k;
  std::int8_t* qi = xq + i * ldq;
  for (dev::i64 g = blockIdx.y; g < groups; g += gridDim.y) {  // uniform across the block
    const dev::i64 c0 = g * group, c1 = c0 + group, end = g == groups - 1 ? ldq : c1;
    float amax = 0.0f;
    for (dev::i64 c = c0 + threadIdx.x; c < c1; c += blockDim.x) amax = fmaxf(amax, fabsf(xi[c]));
    amax = dev::block_max(amax, red);
    const float s = __fdiv_rn(amax, 127.0f);
    if (threadIdx.x == 0) xs[i * groups + g] = s;
    for (dev::i64 c = c0 + threadIdx.x; c < end; c += blockDim.x) {
      int q = 0;
      if (c < k && s != 0.0f) q = min(max(__float2int_rn(__fdiv_rn(xi[c], s)), -127), 127);
      qi[c] = static_cast<std::int8_t>(q);
    }
  }
}

__global__ void qembedding_kernel(QMatrix t, const std::int32_t* ids, dev::i64 T, float* out) {
  const dev::i64 d = t.k;
  for (dev::i64 i = grid_start(); i < T * d; i += grid_stride()) {
    const std::int32_t id = ids[i / d];
    const dev::i64 c = i % d;
    out[i] = id >= 0 && id < t.n ? __fmul_rn(static_cast<float>(t.data[id * d + c]),
                                             t.scales[id * t.groups + c / t.group])
                                 : 0.0f;
  }
}

// Launches kernel<V, MR> for the plan's rows per pass.
#define AUTOGLM_QROWS_LAUNCH(kernel, V, plan, s, ...)           \
  do {                                                          \
    const dim3 grid_(plan.grid_x, plan.grid_y);                 \
    switch (plan.rows_per_pass) {                               \
      case 1:                                                   \
        kernel<V, 1><<<grid_, plan.block, 0, s>>>(__VA_ARGS__); \
        break;                                                  \
      case 2:                                                   \
        kernel<V, 2><<<grid_, plan.block, 0, s>>>(__VA_ARGS__); \
        break;                                                  \
      case 4:                                                   \
        kernel<V, 4><<<grid_, plan.block, 0, s>>>(__VA_ARGS__); \
        break;                                                  \
      default:                                                  \
        kernel<V, 8><<<grid_, plan.block, 0, s>>>(__VA_ARGS__); \
        break;                                                  \
    }                                                           \
  } while (0)

template <typename Kernel, typename... Args>
void grid_launch(Kernel kernel, dev::i64 n, cudaStream_t s, Args... args) {
  const cuda_detail::LaunchConfig lc = cuda_detail::elementwise_launch(n);
  if (lc.grid > 0) kernel<<<lc.grid, lc.block, 0, s>>>(args...);
}

}  // namespace

void silu_mul(const float* in, i64 R, i64 F, float* out, cudaStream_t s) {
  grid_launch(silu_mul_kernel, R * F, s, in, R, F, out);
}
void gelu(const float* in, float* out, i64 n, cudaStream_t s) {
  grid_launch(gelu_kernel, n, s, in, out, n);
}
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
void clamp(float* x, i64 n, float lo, float hi, cudaStream_t s) {
  grid_launch(clamp_kernel, n, s, x, n, lo, hi);
}
void copy_columns(const void* src, i64 Cs, i64 src_col, void* dst, i64 Rd, i64 Cd, i64 dst_col,
                  i64 width, i64 g, int elem, cudaStream_t s) {
  const i64 n = Rd * width;
  switch (elem) {
    case 1:
      grid_launch(copy_columns_kernel<std::uint8_t>, n, s, static_cast<const std::uint8_t*>(src),
                  Cs, src_col, static_cast<std::uint8_t*>(dst), Rd, Cd, dst_col, width, g);
      break;
    case 2:
      grid_launch(copy_columns_kernel<std::uint16_t>, n, s, static_cast<const std::uint16_t*>(src),
                  Cs, src_col, static_cast<std::uint16_t*>(dst), Rd, Cd, dst_col, width, g);
      break;
    default:
      grid_launch(copy_columns_kernel<std::uint32_t>, n, s, static_cast<const std::uint32_t*>(src),
                  Cs, src_col, static_cast<std::uint32_t*>(dst), Rd, Cd, dst_col, width, g);
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

void quantize_activations(const float* x, i64 m, i64 k, i64 group, std::int8_t* xq, i64 ldq,
                          float* xs, cudaStream_t s) {
  if (m <= 0 || group <= 0) return;
  const i64 groups = k / group;
  const std::uint32_t block = cuda_detail::row_block(groups == 1 ? ldq : group);
  constexpr i64 kMaxGridY = 65535;
  const auto gy = static_cast<unsigned>(groups < kMaxGridY ? groups : kMaxGridY);
  quantize_activations_kernel<<<dim3(static_cast<unsigned>(m), gy), block, 0, s>>>(
      x, k, group, groups, xq, ldq, xs);
}
void qgemm_weight_only(const float* x, i64 m, const QMatrix& w, float* out,
                       const cuda_detail::QGemmPlan& plan, cudaStream_t s) {
  if (plan.grid_x == 0) return;
  if (plan.kernel == cuda_detail::QKernel::tiled)
    qtile_wonly_kernel<<<dim3(plan.grid_x, plan.grid_y), plan.block, 0, s>>>(x, m, w, out);
  else if (plan.vec == 16)
    AUTOGLM_QROWS_LAUNCH(qrows_wonly_kernel, 16, plan, s, x, m, w, out);
  else
    AUTOGLM_QROWS_LAUNCH(qrows_wonly_kernel, 1, plan, s, x, m, w, out);
}
void qgemm_w8a8(const std::int8_t* xq, i64 ldq, const float* xs, i64 m, const QMatrix& w,
                float* out, const cuda_detail::QGemmPlan& plan, cudaStream_t s) {
  if (plan.grid_x == 0) return;
  if (plan.kernel == cuda_detail::QKernel::tiled)
    qtile_w8a8_kernel<<<dim3(plan.grid_x, plan.grid_y), plan.block, 0, s>>>(xq, ldq, xs, m, w, out);
  else if (plan.vec == 16)
    AUTOGLM_QROWS_LAUNCH(qrows_w8a8_kernel, 16, plan, s, xq, ldq, xs, m, w, out);
  else
    AUTOGLM_QROWS_LAUNCH(qrows_w8a8_kernel, 1, plan, s, xq, ldq, xs, m, w, out);
}
void scale_columns(const float* x, i64 rows, i64 k, const float* col_scale, float* out,
                   cudaStream_t s) {
  grid_launch(scale_columns_kernel, rows * k, s, x, k, col_scale, out, rows * k);
}
void qembedding(const QMatrix& table, const std::int32_t* ids, i64 T, float* out, cudaStream_t s) {
  grid_launch(qembedding_kernel, T * table.k, s, table, ids, T, out);
}

#undef AUTOGLM_QROWS_LAUNCH

}  // namespace autoglm::cuda_kernels
