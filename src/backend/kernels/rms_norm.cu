// Fused RMSNorm, forward and backward (dx), for f32, bf16 and f16.
// One block per row; statistics accumulate in f32.
//
// Forward matches transformers' Qwen2RMSNorm rounding:
//   y = w * to_dtype(x * rsqrt(mean(x^2) + eps))
// Backward (g = dy * w, r = rsqrt(mean(x^2) + eps)):
//   dx = r * g - x * r^3 * sum(g * x) / n
#include "common.cuh"

template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int n, float eps) {
  const T* xr = x + (size_t)blockIdx.x * n;
  T* yr = y + (size_t)blockIdx.x * n;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float v = to_f(xr[i]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    // Round the normalised value to T before the weight, as transformers does.
    const float normed = to_f(from_f<T>(to_f(xr[i]) * r));
    yr[i] = from_f<T>(normed * to_f(w[i]));
  }
}

template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* dy, T* dx, int n, float eps) {
  const size_t off = (size_t)blockIdx.x * n;
  float ss = 0.f, dot = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float xv = to_f(x[off + i]);
    ss += xv * xv;
    dot += to_f(dy[off + i]) * to_f(w[i]) * xv;
  }
  ss = block_sum(ss);
  dot = block_sum(dot);
  const float r = rsqrtf(ss / n + eps);
  const float c = r * r * r * dot / n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float g = to_f(dy[off + i]) * to_f(w[i]);
    dx[off + i] = from_f<T>(r * g - to_f(x[off + i]) * c);
  }
}

// Residual add fused with the RMSNorm after it (inference): out[0] = x + r
// rounded to T (the new residual stream), out[1] = rms_norm(out[0]). Each
// thread re-reads only the sums it wrote itself.
template <typename T>
__device__ void add_rms_norm(const T* x, const T* r, const T* w, T* out, int n, float eps,
                             size_t rows) {
  const size_t off = (size_t)blockIdx.x * n;
  T* sum = out + off;
  T* yr = out + rows * n + off;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const T v = from_f<T>(to_f(x[off + i]) + to_f(r[off + i]));
    sum[i] = v;
    ss += to_f(v) * to_f(v);
  }
  const float rs = rsqrtf(block_sum(ss) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float normed = to_f(from_f<T>(to_f(sum[i]) * rs));
    yr[i] = from_f<T>(normed * to_f(w[i]));
  }
}

#define RMS_NORM_OPS(T, SUFFIX)                                                            \
  extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T* x, const T* w, T* y, int n,   \
                                                   float eps) {                           \
    rms_norm_fwd<T>(x, w, y, n, eps);                                                     \
  }                                                                                        \
  extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T* x, const T* w, const T* dy,   \
                                                   T* dx, int n, float eps) {             \
    rms_norm_bwd<T>(x, w, dy, dx, n, eps);                                                \
  }                                                                                        \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const T* x, const T* r, const T* w,    \
                                                   T* out, int n, float eps, size_t rows) { \
    add_rms_norm<T>(x, r, w, out, n, eps, rows);                                           \
  }

FOR_EACH_FLOAT(RMS_NORM_OPS)
