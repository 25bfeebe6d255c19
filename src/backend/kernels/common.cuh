// Helpers every kernel in this folder shares. build.rs compiles each `.cu`
// here with `-I src/backend/kernels`, so a kernel starts with
// `#include "common.cuh"` and gets the dtype conversions, the reductions and
// the per-dtype instantiation macro in one place instead of a copy per file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Loads widen to f32 and stores round from f32: every kernel does its math in
// f32 whatever the storage dtype, so bf16/f16 results are rounded once.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// 16-byte vector access: VEC<T> elements move as one uint4 load or store
// (memory-bound kernels issue an eighth of the bf16 instructions). The
// caller checks alignment with aligned16().
template <typename T> struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
};
__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}
template <typename T>
__device__ __forceinline__ void load16(const T* p, float* out) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int k = 0; k < Vec16<T>::N; k++) out[k] = to_f(t[k]);
}
template <typename T>
__device__ __forceinline__ void store16(T* p, const float* in) {
  uint4 u;
  T* t = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int k = 0; k < Vec16<T>::N; k++) t[k] = from_f<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = u;
}

// Sum over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// Sum over aligned groups of `lanes` lanes (a power of two up to 32); every
// lane of the warp must take part.
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a
// multiple of 32, at most 1024 (launch.rs's row config guarantees both).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  v = warp_sum(v);
  if (blockDim.x == 32) return v;  // one warp: no shared-memory round trip
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = warp_sum(lane < warps ? partial[lane] : 0.f);
  __syncthreads();  // partial[] may be reused by a second call
  return v;
}

// Grid-stride loop over `n` elements: launch.rs caps the grid, so one thread
// may handle several elements.
#define FOR_EACH_ELEMENT(i, n)                                                   \
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);      \
       i += (size_t)blockDim.x * gridDim.x)

// Instantiates `M(T, SUFFIX)` for every storage dtype. The suffixes are the
// ones launch.rs appends to a kernel's base name (`{base}_{f32|bf16|f16}`),
// so the naming contract between Rust and CUDA lives here and in
// `Float::SUFFIX`, nowhere else.
#define FOR_EACH_FLOAT(M) \
  M(float, f32)           \
  M(__nv_bfloat16, bf16)  \
  M(__half, f16)
