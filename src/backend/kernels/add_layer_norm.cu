// y = LayerNorm(x + lin_bias + residual): a post-norm encoder's projection
// bias, residual add and LayerNorm in one pass (Candle: a broadcast add, an
// add and its layer_norm kernel). The sums are rounded to T as the composed
// ops round them (x + lin_bias, then + residual); mean and centred variance
// in f32 (transformers' LayerNorm, not Candle's E[x^2] - E[x]^2); the output
// is rounded once.
// params: [3, n] = lin_bias, weight, bias.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float summed(const T* x, const T* r, const T* lb, int i) {
  return to_f(from_f<T>(to_f(from_f<T>(to_f(x[i]) + to_f(lb[i]))) + to_f(r[i])));
}

// One warp per row, ROWS_PER_BLOCK rows a block. A row of up to 1024
// elements (whole 16-byte vectors, aligned) is held in registers (32 per
// lane), so x, residual and the bias are read once, 16 bytes at a time;
// other rows take three passes over global memory.
#define ROWS_PER_BLOCK 4
template <typename T>
__device__ void add_layer_norm(const T* x, const T* r, const T* params, T* y, int rows, int n,
                               float eps) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp: warp_sum below stays full
  const size_t off = (size_t)row * n;
  const T* xr = x + off;
  const T* rr = r + off;
  const T* lb = params;
  const T* w = params + n;
  const T* b = params + 2 * n;
  constexpr int V = Vec16<T>::N, K = 32 / V;
  if (n <= 1024 && n % V == 0 && aligned16(x) && aligned16(r) && aligned16(params) &&
      aligned16(y)) {
    // Lane `lane` holds vectors lane, lane + 32, ... of the row (16 bytes each).
    float v[32];
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < K; j++) {
      const int i = (lane + 32 * j) * V;
      if (i < n) {
        float a[V], c[V], e[V];
        load16(xr + i, a);
        load16(lb + i, c);
        load16(rr + i, e);
#pragma unroll
        for (int k = 0; k < V; k++) {
          v[j * V + k] = to_f(from_f<T>(to_f(from_f<T>(a[k] + c[k])) + e[k]));
          s += v[j * V + k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < V; k++) v[j * V + k] = 0.f;
      }
    }
    const float mean = warp_sum(s) / n;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < K; j++) {
      if ((lane + 32 * j) * V < n) {
#pragma unroll
        for (int k = 0; k < V; k++) {
          const float d = v[j * V + k] - mean;
          ss += d * d;
        }
      }
    }
    const float rstd = rsqrtf(warp_sum(ss) / n + eps);
#pragma unroll
    for (int j = 0; j < K; j++) {
      const int i = (lane + 32 * j) * V;
      if (i < n) {
        float wv[V], bv[V], o[V];
        load16(w + i, wv);
        load16(b + i, bv);
#pragma unroll
        for (int k = 0; k < V; k++) o[k] = (v[j * V + k] - mean) * rstd * wv[k] + bv[k];
        store16(y + off + i, o);
      }
    }
    return;
  }
  float s = 0.f;
  for (int i = lane; i < n; i += 32) s += summed(xr, rr, lb, i);
  const float mean = warp_sum(s) / n;
  float ss = 0.f;
  for (int i = lane; i < n; i += 32) {
    const float d = summed(xr, rr, lb, i) - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(warp_sum(ss) / n + eps);
  for (int i = lane; i < n; i += 32) {
    const float d = summed(xr, rr, lb, i) - mean;
    y[off + i] = from_f<T>(d * rstd * to_f(w[i]) + to_f(b[i]));
  }
}

#define ADD_LAYER_NORM_OPS(T, SUFFIX)                                                       \
  extern "C" __global__ void add_layer_norm_##SUFFIX(const T* x, const T* r, const T* p,   \
                                                     T* y, int rows, int n, float eps) {  \
    add_layer_norm<T>(x, r, p, y, rows, n, eps);                                           \
  }

FOR_EACH_FLOAT(ADD_LAYER_NORM_OPS)
