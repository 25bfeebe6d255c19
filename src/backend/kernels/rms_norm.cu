// Fused RMSNorm, forward and backward (dx), for f32, bf16 and f16.
// One block per row; statistics accumulate in f32.
//
// Forward matches transformers' Qwen2RMSNorm rounding:
//   y = w * to_dtype(x * rsqrt(mean(x^2) + eps))
// Backward (g = dy * w, r = rsqrt(mean(x^2) + eps)):
//   dx = r * g - x * r^3 * sum(g * x) / n
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// Sum over the block; every thread gets the result. blockDim.x is a multiple
// of 32, at most 1024.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? partial[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  __syncthreads();  // partial[] may be reused by a second call
  return v;
}

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

#define RMS_NORM_OPS(T, SUFFIX)                                                            \
  extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T* x, const T* w, T* y, int n,   \
                                                   float eps) {                           \
    rms_norm_fwd<T>(x, w, y, n, eps);                                                     \
  }                                                                                        \
  extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T* x, const T* w, const T* dy,   \
                                                   T* dx, int n, float eps) {             \
    rms_norm_bwd<T>(x, w, dy, dx, n, eps);                                                \
  }

RMS_NORM_OPS(float, f32)
RMS_NORM_OPS(__nv_bfloat16, bf16)
RMS_NORM_OPS(__half, f16)
