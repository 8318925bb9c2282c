// SPDX-License-Identifier: Apache-2.0
// CUDA kernels for memory, value checks, routing and dispatch. Where the CPU backend's
// result is exactly specified (dtype rounding, the counter-based generator, routing order and
// ties, the dispatch order), the kernels reproduce it bit for bit; __fmul_rn / __fadd_rn mark
// the operations that must not be fused into an FMA for that.
#include <cstdint>

#include "device_common.cuh"
#include "kernels.hpp"

namespace autoglm::cuda_kernels {
namespace {

using dev::grid_start;
using dev::grid_stride;

// ------------------------------------------------------------------ dtype conversion
// Same bit manipulations as include/autoglm/core/dtype.hpp.
__device__ __forceinline__ float bf16_to_float(std::uint16_t h) {
  return __uint_as_float(static_cast<std::uint32_t>(h) << 16);
}

__device__ __forceinline__ std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

__device__ __forceinline__ float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | static_cast<std::uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  return __uint_as_float(bits);
}

__device__ __forceinline__ std::uint16_t float_to_f16(float f) {
  const std::uint32_t u = __float_as_uint(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (abs < 0x38800000u) {
    const float scaled = __fmul_rn(__uint_as_float(abs), 16777216.0f);
    const float r = __fadd_rn(__fadd_rn(scaled, 8388608.0f), -8388608.0f);
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(r));
  }
  const std::uint32_t v = abs + 0xc8000fffu + ((abs >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | (v >> 13));
}

__global__ void convert_kernel(const void* src, int sc, void* dst, int dc, dev::i64 n) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride()) {
    float v;
    if (sc == kF16)
      v = f16_to_float(static_cast<const std::uint16_t*>(src)[i]);
    else if (sc == kBF16)
      v = bf16_to_float(static_cast<const std::uint16_t*>(src)[i]);
    else
      v = static_cast<const float*>(src)[i];
    if (dc == kF16)
      static_cast<std::uint16_t*>(dst)[i] = float_to_f16(v);
    else if (dc == kBF16)
      static_cast<std::uint16_t*>(dst)[i] = float_to_bf16(v);
    else
      static_cast<float*>(dst)[i] = v;
  }
}

// ------------------------------------------------------------------ fills
// src/common/random.hpp's generator.
__device__ __forceinline__ std::uint64_t hash64(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + i + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ float uniform_pm1(std::uint64_t seed, std::uint64_t i) {
  const float u = static_cast<float>(hash64(seed, i) >> 40);  // < 2^24: exact
  return __fadd_rn(__fmul_rn(u, 2.0f / 16777216.0f), -1.0f);
}

__device__ __forceinline__ float normal(std::uint64_t seed, std::uint64_t i) {
  const std::uint64_t h = hash64(seed ^ 0x5bd1e995ull, i);
  const double u1 = (static_cast<double>(h >> 40) + 1.0) / 16777217.0;
  const double u2 = static_cast<double>(h & 0xffffffull) / 16777216.0;
  return static_cast<float>(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

__global__ void fill_kernel(float* p, dev::i64 n, float v) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride()) p[i] = v;
}

__global__ void fill_uniform_kernel(float* p, dev::i64 n, std::uint64_t seed, float scale) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride())
    p[i] = __fmul_rn(scale, uniform_pm1(seed, static_cast<std::uint64_t>(i)));
}

__global__ void scale_kernel(float* p, dev::i64 n, float beta) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride())
    p[i] = beta == 0.0f ? 0.0f : p[i] * beta;
}

// ------------------------------------------------------------------ value checks
__global__ void nonfinite_kernel(const float* p, dev::i64 n, unsigned long long* first) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride())
    if (!isfinite(p[i])) atomicMin(first, static_cast<unsigned long long>(i));
}

__global__ void range_kernel(const std::int32_t* p, dev::i64 n, std::int32_t lo, std::int32_t hi,
                             unsigned long long* first) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride())
    if (p[i] < lo || p[i] > hi) atomicMin(first, static_cast<unsigned long long>(i));
}

// ------------------------------------------------------------------ routing
constexpr unsigned kRouteThreads = 128;

// (v, i) ranks before (bv, bi): larger value, ties to the lower index; bi < 0 is "none".
__device__ __forceinline__ bool ranks_before(float v, int i, float bv, int bi) {
  return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

// Block-wide arg-max under ranks_before; the winner's index reaches every thread.
__device__ int block_argmax(float v, int i, float* sv, int* si) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ranks_before(ov, oi, v, i)) v = ov, i = oi;
  }
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sv[warp] = v, si[warp] = i;
  __syncthreads();
  const bool have = lane < (blockDim.x >> 5);
  v = have ? sv[lane] : -INFINITY;
  i = have ? si[lane] : -1;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ranks_before(ov, oi, v, i)) v = ov, i = oi;
  }
  return i;
}

// One block per token; the order of operations is docs/architecture.md's (and the CPU's).
__global__ void route_topk_kernel(const float* logits, const float* bias, int E, RouteArgs a,
                                  std::int32_t* ids, float* weights, float* partial) {
  extern __shared__ float sh[];
  float* scores = sh;
  float* sel = scores + E;
  float* gscore = sel + E;
  int* taken = reinterpret_cast<int*>(gscore + a.n_group);
  int* gkeep = taken + E;
  int* idx = gkeep + a.n_group;
  __shared__ float red[32];
  __shared__ float av[32];
  __shared__ int ai[32];
  const dev::i64 t = blockIdx.x;
  const unsigned tid = threadIdx.x, bd = blockDim.x;
  const float* L = logits + t * E;

  // 1. logits (+ noise), kept in sel for now.
  for (int e = tid; e < E; e += bd) {
    float l = L[e];
    if (a.noise_std > 0.0f)
      l = __fadd_rn(l,
                    __fmul_rn(a.noise_std, normal(a.seed, static_cast<std::uint64_t>(t * E + e))));
    sel[e] = l;
  }
  // 2. scores and logsumexp.
  float m = -INFINITY;
  for (int e = tid; e < E; e += bd) m = fmaxf(m, sel[e]);
  m = dev::block_max(m, red);
  float s = 0.0f;
  for (int e = tid; e < E; e += bd) s += expf(sel[e] - m);
  s = dev::block_sum(s, red);
  const float lse = m + logf(s);
  float ss = 0.0f;
  for (int e = tid; e < E; e += bd) {
    const float sc = a.sigmoid ? 1.0f / (1.0f + expf(-sel[e])) : expf(sel[e] - m) / s;
    scores[e] = sc;
    ss += sc;
  }
  ss = dev::block_sum(ss, red);
  // Statistics, then 3. selection scores.
  float* part = partial + t * (E + 1);
  for (int e = tid; e < E; e += bd) {
    part[e] = scores[e] / ss;
    sel[e] = scores[e] + (bias ? bias[e] : 0.0f);
    taken[e] = 0;
  }
  if (tid == 0) part[E] = lse * lse;
  __syncthreads();
  // 4. group limit.
  if (a.n_group > 1) {
    const int gsize = E / a.n_group;
    for (int g = tid; g < a.n_group; g += bd) {
      const float* x = sel + g * gsize;
      float b1 = -INFINITY, b2 = -INFINITY;
      for (int j = 0; j < gsize; ++j) {
        if (x[j] > b1) {
          b2 = b1;
          b1 = x[j];
        } else if (x[j] > b2) {
          b2 = x[j];
        }
      }
      gscore[g] = gsize >= 2 ? b1 + b2 : b1;
      gkeep[g] = 0;
    }
    __syncthreads();
    if (tid == 0) {
      for (int r = 0; r < a.topk_group; ++r) {
        int best = -1;
        for (int g = 0; g < a.n_group; ++g)
          if (!gkeep[g] && ranks_before(gscore[g], g, best < 0 ? 0.0f : gscore[best], best))
            best = g;
        gkeep[best] = 1;
      }
    }
    __syncthreads();
    const float fillv = a.mask_neg_inf ? -INFINITY : 0.0f;
    for (int e = tid; e < E; e += bd)
      if (!gkeep[e / gsize]) sel[e] = fillv;
    __syncthreads();
  }
  // 5. top-k of the selection scores, one block arg-max per pick.
  for (int j = 0; j < a.top_k; ++j) {
    float bv = -INFINITY;
    int bi = -1;
    for (int e = tid; e < E; e += bd)
      if (!taken[e] && ranks_before(sel[e], e, bv, bi)) bv = sel[e], bi = e;
    const int win = block_argmax(bv, bi, av, ai);
    if (tid == 0) {
      idx[j] = win;
      taken[win] = 1;
    }
    __syncthreads();
  }
  // 6./7. unbiased weights, renormalised in pick order as the CPU sums them, then scaled.
  if (tid == 0) {
    float wsum = 0.0f;
    for (int j = 0; j < a.top_k; ++j) wsum += scores[idx[j]];
    const float denom = a.renormalize ? wsum + a.renorm_epsilon : 1.0f;
    for (int j = 0; j < a.top_k; ++j) {
      ids[t * a.top_k + j] = idx[j];
      weights[t * a.top_k + j] = scores[idx[j]] / denom * a.routed_scaling;
    }
  }
}

__global__ void softmax_stats_kernel(const float* logits, int E, float* partial) {
  __shared__ float red[32];
  const dev::i64 t = blockIdx.x;
  const float* L = logits + t * E;
  float* part = partial + t * (E + 1);
  float m = -INFINITY;
  for (int e = threadIdx.x; e < E; e += blockDim.x) m = fmaxf(m, L[e]);
  m = dev::block_max(m, red);
  float s = 0.0f;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s += expf(L[e] - m);
  s = dev::block_sum(s, red);
  for (int e = threadIdx.x; e < E; e += blockDim.x) part[e] = expf(L[e] - m) / s;
  if (threadIdx.x == 0) {
    const float lse = m + logf(s);
    part[E] = lse * lse;
  }
}

// One thread per token: its rank in every expert's column decides whether the expert takes
// it; O(T^2 E) work, fine for the batch sizes expert choice is used with.
__global__ void expert_choice_kernel(const float* P, dev::i64 T, dev::i64 E, dev::i64 C,
                                     std::int32_t* ids, float* weights) {
  for (dev::i64 t = grid_start(); t < T; t += grid_stride()) {
    dev::i64 j = 0;
    for (dev::i64 e = 0; e < E; ++e) {
      const float p = P[t * (E + 1) + e];
      dev::i64 rank = 0;
      for (dev::i64 u = 0; u < T && rank < C; ++u) {
        const float q = P[u * (E + 1) + e];
        rank += (q > p || (q == p && u < t)) ? 1 : 0;
      }
      if (rank < C) {
        ids[t * E + j] = static_cast<std::int32_t>(e);
        weights[t * E + j] = p;
        ++j;
      }
    }
    for (; j < E; ++j) {
      ids[t * E + j] = -1;
      weights[t * E + j] = 0.0f;
    }
  }
}

__global__ void reduce_columns_kernel(const float* partial, dev::i64 rows, dev::i64 cols,
                                      float* out) {
  __shared__ float red[32];
  const dev::i64 c = blockIdx.x;
  float s = 0.0f;
  for (dev::i64 r = threadIdx.x; r < rows; r += blockDim.x) s += partial[r * cols + c];
  s = dev::block_sum(s, red);
  if (threadIdx.x == 0) out[c] = s;
}

// ------------------------------------------------------------------ dispatch
constexpr unsigned kRankThreads = 256;

// Block e (block E: id -1) walks the (token, slot) pairs slot-major -- every first choice
// before any second choice, earlier tokens first -- and numbers its expert's pairs in that
// order with a block-wide prefix count, as the CPU's sequential counting pass does.
__global__ void dispatch_rank_kernel(const std::int32_t* ids, dev::i64 T, dev::i64 k, dev::i64 E,
                                     dev::i64 cap, std::int32_t* counts, std::int32_t* slot_row) {
  __shared__ int warp_count[kRankThreads / 32];
  const int e = blockIdx.x == E ? -1 : static_cast<int>(blockIdx.x);
  const dev::i64 n = T * k;
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  dev::i64 running = 0;
  for (dev::i64 base = 0; base < n; base += blockDim.x) {
    const dev::i64 s = base + threadIdx.x;  // slot-major position: slot s / T, token s % T
    dev::i64 i = 0;
    bool match = false;
    if (s < n) {
      i = (s % T) * k + s / T;
      match = ids[i] == e;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, match);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    dev::i64 before = __popc(ballot & ((1u << lane) - 1u)), total = 0;
    for (unsigned w = 0; w < warps; ++w) {
      if (w < warp) before += warp_count[w];
      total += warp_count[w];
    }
    if (match) {
      const dev::i64 rank = running + before;
      slot_row[i] = e >= 0 && rank < cap ? static_cast<std::int32_t>(rank) : -1;
    }
    running += total;
    __syncthreads();  // warp_count is rewritten next round
  }
  if (threadIdx.x == 0 && e >= 0)
    counts[e] = static_cast<std::int32_t>(running < cap ? running : cap);
}

__global__ void dispatch_offsets_kernel(const std::int32_t* counts, dev::i64 E, std::int32_t* off) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  std::int32_t acc = 0;
  off[0] = 0;
  for (dev::i64 e = 0; e < E; ++e) off[e + 1] = (acc += counts[e]);
}

__global__ void dispatch_place_kernel(const std::int32_t* ids, dev::i64 n, dev::i64 k,
                                      const std::int32_t* off, std::int32_t* slot_row,
                                      std::int32_t* row_token) {
  for (dev::i64 i = grid_start(); i < n; i += grid_stride()) {
    if (slot_row[i] < 0) continue;
    const std::int32_t r = slot_row[i] + off[ids[i]];
    slot_row[i] = r;
    row_token[r] = static_cast<std::int32_t>(i / k);
  }
}

__global__ void gather_rows_kernel(const float* x, dev::i64 T, const std::int32_t* rt, dev::i64 R,
                                   dev::i64 d, float* out) {
  for (dev::i64 i = grid_start(); i < R * d; i += grid_stride()) {
    const dev::i64 r = i / d, c = i % d;
    const std::int32_t tok = rt[r];
    out[i] = tok >= 0 && tok < T ? x[tok * d + c] : 0.0f;
  }
}

__global__ void combine_kernel(const float* y, dev::i64 R, const std::int32_t* sr, const float* w,
                               dev::i64 T, dev::i64 k, dev::i64 d, float* out, bool accumulate) {
  for (dev::i64 i = grid_start(); i < T * d; i += grid_stride()) {
    const dev::i64 t = i / d, c = i % d;
    float acc = accumulate ? out[i] : 0.0f;
    for (dev::i64 j = 0; j < k; ++j) {
      const std::int32_t r = sr[t * k + j];
      if (r < 0 || r >= R) continue;
      acc += w[t * k + j] * y[r * d + c];
    }
    out[i] = acc;
  }
}

template <typename Kernel, typename... Args>
void grid_launch(Kernel kernel, dev::i64 n, cudaStream_t s, Args... args) {
  const cuda_detail::LaunchConfig lc = cuda_detail::elementwise_launch(n);
  if (lc.grid > 0) kernel<<<lc.grid, lc.block, 0, s>>>(args...);
}

}  // namespace

void convert(const void* src, int sc, void* dst, int dc, i64 n, cudaStream_t s) {
  grid_launch(convert_kernel, n, s, src, sc, dst, dc, n);
}
void fill(float* p, i64 n, float v, cudaStream_t s) {
  grid_launch(fill_kernel, n, s, p, n, v);
}
void fill_uniform(float* p, i64 n, std::uint64_t seed, float scale, cudaStream_t s) {
  grid_launch(fill_uniform_kernel, n, s, p, n, seed, scale);
}
void scale(float* p, i64 n, float beta, cudaStream_t s) {
  grid_launch(scale_kernel, n, s, p, n, beta);
}
void find_nonfinite(const float* p, i64 n, unsigned long long* first, cudaStream_t s) {
  grid_launch(nonfinite_kernel, n, s, p, n, first);
}
void find_out_of_range(const std::int32_t* p, i64 n, std::int32_t lo, std::int32_t hi,
                       unsigned long long* first, cudaStream_t s) {
  grid_launch(range_kernel, n, s, p, n, lo, hi, first);
}

void route_topk(const float* logits, const float* bias, i64 T, i64 E, const RouteArgs& a,
                std::int32_t* ids, float* weights, float* partial, std::size_t shared_bytes,
                cudaStream_t s) {
  if (T <= 0) return;
  route_topk_kernel<<<static_cast<unsigned>(T), kRouteThreads, shared_bytes, s>>>(
      logits, bias, static_cast<int>(E), a, ids, weights, partial);
}
void softmax_stats(const float* logits, i64 T, i64 E, float* partial, cudaStream_t s) {
  if (T <= 0) return;
  softmax_stats_kernel<<<static_cast<unsigned>(T), cuda_detail::row_block(E, 256), 0, s>>>(
      logits, static_cast<int>(E), partial);
}
void expert_choice_select(const float* partial, i64 T, i64 E, i64 C, std::int32_t* ids,
                          float* weights, cudaStream_t s) {
  const cuda_detail::LaunchConfig lc = cuda_detail::elementwise_launch(T, 64);
  if (lc.grid > 0)
    expert_choice_kernel<<<lc.grid, lc.block, 0, s>>>(partial, T, E, C, ids, weights);
}
void reduce_columns(const float* partial, i64 rows, i64 cols, float* out, cudaStream_t s) {
  if (cols <= 0) return;
  reduce_columns_kernel<<<static_cast<unsigned>(cols), 256, 0, s>>>(partial, rows, cols, out);
}

void dispatch_rank(const std::int32_t* ids, i64 T, i64 k, i64 E, i64 cap, std::int32_t* counts,
                   std::int32_t* slot_row, cudaStream_t s) {
  dispatch_rank_kernel<<<static_cast<unsigned>(E + 1), kRankThreads, 0, s>>>(ids, T, k, E, cap,
                                                                             counts, slot_row);
}
void dispatch_offsets(const std::int32_t* counts, i64 E, std::int32_t* offsets, cudaStream_t s) {
  dispatch_offsets_kernel<<<1, 1, 0, s>>>(counts, E, offsets);
}
void dispatch_place(const std::int32_t* ids, i64 n, i64 k, const std::int32_t* offsets,
                    std::int32_t* slot_row, std::int32_t* row_token, cudaStream_t s) {
  grid_launch(dispatch_place_kernel, n, s, ids, n, k, offsets, slot_row, row_token);
}
void gather_rows(const float* x, i64 T, const std::int32_t* rt, i64 R, i64 d, float* out,
                 cudaStream_t s) {
  grid_launch(gather_rows_kernel, R * d, s, x, T, rt, R, d, out);
}
void combine(const float* y, i64 R, const std::int32_t* sr, const float* w, i64 T, i64 k, i64 d,
             float* out, bool accumulate, cudaStream_t s) {
  grid_launch(combine_kernel, T * d, s, y, R, sr, w, T, k, d, out, accumulate);
}

}  // namespace autoglm::cuda_kernels
