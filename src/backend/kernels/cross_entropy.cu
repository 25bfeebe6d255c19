// Softmax cross-entropy over rows of logits, without an f32 copy of them.
// One block per row; math in f32.
//
// Forward: per row, the log-sum-exp (online max and rescaled sum, one pass)
// and the target's logit: out[2r] = lse, out[2r + 1] = logits[r, target].
// Backward: d[r, j] = (exp(logits[r, j] - lse[r]) - [j == target]) * g,
// with g read from lse_g[rows] (the loss gradient over the kept count, left
// on the device so no host sync is needed).
#include "common.cuh"

// Merges (m2, s2) into (m, s): s is a sum of exp(x - m).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}

template <typename T>
__device__ void ce_fwd(const T* logits, const uint32_t* targets, float* out, int v) {
  const size_t r = blockIdx.x;
  const T* row = logits + r * (size_t)v;
  float m = -INFINITY, s = 0.f;
  for (int i = threadIdx.x; i < v; i += blockDim.x) {
    const float x = to_f(row[i]);
    if (x == -INFINITY) continue;
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, o);
    const float s2 = __shfl_xor_sync(0xffffffff, s, o);
    lse_merge(m, s, m2, s2);
  }
  __shared__ float pm[32], ps[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (blockDim.x > 32) {
    if (lane == 0) {
      pm[warp] = m;
      ps[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
      const int warps = blockDim.x / 32;
      m = lane < warps ? pm[lane] : -INFINITY;
      s = lane < warps ? ps[lane] : 0.f;
      for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffff, m, o);
        const float s2 = __shfl_xor_sync(0xffffffff, s, o);
        lse_merge(m, s, m2, s2);
      }
    }
  }
  if (threadIdx.x == 0) {
    out[2 * r] = m + logf(s);
    out[2 * r + 1] = to_f(row[targets[r]]);
  }
}

template <typename T>
__device__ void ce_bwd(const T* logits, const uint32_t* targets, const float* lse_g, T* d, int v,
                       int rows) {
  const size_t r = blockIdx.x;
  const size_t off = r * (size_t)v;
  const float lse = lse_g[r], g = lse_g[rows];
  const int t = (int)targets[r];
  for (int i = threadIdx.x; i < v; i += blockDim.x) {
    float p = expf(to_f(logits[off + i]) - lse);
    if (i == t) p -= 1.f;
    d[off + i] = from_f<T>(p * g);
  }
}

#define CE_OPS(T, SUFFIX)                                                                   \
  extern "C" __global__ void ce_fwd_##SUFFIX(const T* logits, const uint32_t* targets,      \
                                             float* out, int v) {                          \
    ce_fwd<T>(logits, targets, out, v);                                                    \
  }                                                                                         \
  extern "C" __global__ void ce_bwd_##SUFFIX(const T* logits, const uint32_t* targets,      \
                                             const float* lse_g, T* d, int v, int rows) {  \
    ce_bwd<T>(logits, targets, lse_g, d, v, rows);                                         \
  }

FOR_EACH_FLOAT(CE_OPS)
