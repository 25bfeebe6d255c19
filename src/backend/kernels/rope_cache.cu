// One decode step's attention inputs in one pass, for the static-cache
// decode path: the fused q/k/v projection's output plus its bias, RoPE on q
// and k with the cos/sin table rows of the device-held position, q written
// as [b, hq, s, d] and k, v written straight into the preallocated caches
// [b, hkv, capacity, d] at that position. It replaces the head split, two
// RoPE launches and two cache writes per layer (a captured decode step is
// bound by its number of kernels, not their work).
//
// RoPE as Candle's `rope` (and transformers' rotate_half): for j < d/2,
//   y[j] = x[j] cos[j] - x[j + d/2] sin[j],  y[j + d/2] = x[j + d/2] cos[j] + x[j] sin[j];
// the biased input is rounded to the storage dtype first (as the separate
// bias add rounds it), the rotation computed in f32 and rounded once.
#include "common.cuh"

template <typename T>
__device__ void qkv_rope_cache(const T* qkv, const T* bias, const T* cos, const T* sin,
                               const uint32_t* pos, T* q, T* kc, T* vc, int s, int hq, int hkv,
                               int d, int cap, size_t n) {
  const int half = d / 2, heads = hq + 2 * hkv;
  const size_t width = (size_t)heads * d;
  const int p0 = (int)*pos;
  FOR_EACH_ELEMENT(i, n) {
    const int j = (int)(i % half);
    const size_t r = i / half;
    const int head = (int)(r % heads);
    const size_t row = r / heads;  // bi * s + si
    const int si = (int)(row % s);
    const size_t bi = row / s;
    const int p = p0 + si;
    if (p >= cap) continue;
    const size_t src = row * width + (size_t)head * d + j;
    const int bc = head * d + j;
    float x1 = to_f(from_f<T>(to_f(qkv[src]) + to_f(bias[bc])));
    float x2 = to_f(from_f<T>(to_f(qkv[src + half]) + to_f(bias[bc + half])));
    float y1 = x1, y2 = x2;
    if (head < hq + hkv) {
      const float c = to_f(cos[(size_t)p * half + j]), sn = to_f(sin[(size_t)p * half + j]);
      y1 = x1 * c - x2 * sn;
      y2 = x2 * c + x1 * sn;
    }
    T* dst;
    if (head < hq) {
      dst = q + ((bi * hq + head) * s + si) * d;
    } else if (head < hq + hkv) {
      dst = kc + ((bi * hkv + (head - hq)) * cap + p) * d;
    } else {
      dst = vc + ((bi * hkv + (head - hq - hkv)) * cap + p) * d;
    }
    dst[j] = from_f<T>(y1);
    dst[j + half] = from_f<T>(y2);
  }
}

#define ROPE_CACHE_OPS(T, SUFFIX)                                                             \
  extern "C" __global__ void qkv_rope_cache_##SUFFIX(                                         \
      const T* qkv, const T* bias, const T* cos, const T* sin, const uint32_t* pos, T* q,     \
      T* kc, T* vc, int s, int hq, int hkv, int d, int cap, size_t n) {                       \
    qkv_rope_cache<T>(qkv, bias, cos, sin, pos, q, kc, vc, s, hq, hkv, d, cap, n);            \
  }
FOR_EACH_FLOAT(ROPE_CACHE_OPS)
