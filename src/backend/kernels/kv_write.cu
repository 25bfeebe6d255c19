// Writes new key or value rows into a preallocated cache at a position read
// from device memory: cache[bh, pos + r, :] = x[bh, r, :] for x of
// [b * heads, s, d] and cache of [b * heads, capacity, d]. The position
// lives on the device so a decode step captured in a CUDA graph writes each
// replay's token where it belongs (a slice assignment bakes its offset
// into the launch). Rows past the capacity are skipped (the host checks
// room before the step).
#include "common.cuh"

template <typename T>
__device__ void kv_write(T* cache, const T* x, const uint32_t* pos, int s, int d, int cap,
                         size_t n) {
  const int p = (int)*pos;
  FOR_EACH_ELEMENT(i, n) {
    const size_t row = i / d;
    const int c = (int)(i % d), r = (int)(row % s);
    const size_t bh = row / s;
    if (p + r < cap) cache[(bh * cap + p + r) * d + c] = x[i];
  }
}

#define KV_WRITE_OPS(T, SUFFIX)                                                              \
  extern "C" __global__ void kv_write_##SUFFIX(T* cache, const T* x, const uint32_t* pos,  \
                                               int s, int d, int cap, size_t n) {           \
    kv_write<T>(cache, x, pos, s, d, cap, n);                                               \
  }
FOR_EACH_FLOAT(KV_WRITE_OPS)
