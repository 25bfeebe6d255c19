// y = LayerNorm(x + lin_bias + residual): a post-norm encoder's projection
// bias, residual add and LayerNorm in one pass (Candle: a broadcast add, an
// add and its layer_norm kernel). One block per row. The sums are rounded to
// T as the composed ops round them (x + lin_bias, then + residual); mean and
// variance are two passes in f32 (transformers' LayerNorm, not Candle's
// E[x^2] - E[x]^2); the output is rounded once.
// params: [3, n] = lin_bias, weight, bias.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float summed(const T* x, const T* r, const T* lb, int i) {
  return to_f(from_f<T>(to_f(from_f<T>(to_f(x[i]) + to_f(lb[i]))) + to_f(r[i])));
}

template <typename T>
__device__ void add_layer_norm(const T* x, const T* r, const T* params, T* y, int n, float eps) {
  const size_t off = (size_t)blockIdx.x * n;
  const T* xr = x + off;
  const T* rr = r + off;
  const T* lb = params;
  const T* w = params + n;
  const T* b = params + 2 * n;
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += summed(xr, rr, lb, i);
  const float mean = block_sum(s) / n;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = summed(xr, rr, lb, i) - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(block_sum(ss) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = summed(xr, rr, lb, i) - mean;
    y[off + i] = from_f<T>(d * rstd * to_f(w[i]) + to_f(b[i]));
  }
}

#define ADD_LAYER_NORM_OPS(T, SUFFIX)                                                       \
  extern "C" __global__ void add_layer_norm_##SUFFIX(const T* x, const T* r, const T* p,   \
                                                     T* y, int n, float eps) {            \
    add_layer_norm<T>(x, r, p, y, n, eps);                                                 \
  }

FOR_EACH_FLOAT(ADD_LAYER_NORM_OPS)
