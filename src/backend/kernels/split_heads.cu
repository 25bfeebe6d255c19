// The fused q/k/v projection's output [b * s, (hq + 2 hkv) * d] plus its
// bias, written as q [b, hq, s, d], k and v [b, hkv, s, d] one after the
// other in one buffer: the bias adds and the three head transposes
// (Candle: three broadcast adds and three copies) in one pass. The sum is
// rounded once, as the composed add rounds it. Reads coalesced, writes in
// runs of d.
#include "common.cuh"

// One block per input row (b * s of them), threads over its columns in
// runs of V: 16 bytes at a time when the head width and the pointers allow,
// else one element. 32-bit index arithmetic once per run.
template <typename T, int V>
__device__ void split_row(const T* qkv, const T* bias, T* out, int batch, int s, int hq, int hkv,
                          int d) {
  const int row = blockIdx.x;
  const int bi = row / s, si = row - (row / s) * s;
  const int width = (hq + 2 * hkv) * d;
  const size_t q_size = (size_t)batch * hq * s * d;
  const size_t kv_size = (size_t)batch * hkv * s * d;
  const T* src = qkv + (size_t)row * width;
  for (int c = threadIdx.x * V; c < width; c += blockDim.x * V) {
    const int head = c / d, dd = c - (c / d) * d;
    size_t dst;
    if (head < hq) {
      dst = (((size_t)bi * hq + head) * s + si) * d + dd;
    } else if (head < hq + hkv) {
      dst = q_size + (((size_t)bi * hkv + (head - hq)) * s + si) * d + dd;
    } else {
      dst = q_size + kv_size + (((size_t)bi * hkv + (head - hq - hkv)) * s + si) * d + dd;
    }
    if (V == 1) {
      out[dst] = from_f<T>(to_f(src[c]) + to_f(bias[c]));
    } else {
      float a[V], b[V];
      load16(src + c, a);
      load16(bias + c, b);
#pragma unroll
      for (int k = 0; k < V; k++) a[k] += b[k];
      store16(out + dst, a);
    }
  }
}

#define SPLIT_HEADS_OPS(T, SUFFIX)                                                          \
  extern "C" __global__ void split_heads_##SUFFIX(const T* qkv, const T* bias, T* out,     \
                                                  int batch, int s, int hq, int hkv, int d) { \
    constexpr int V = Vec16<T>::N;                                                          \
    if (d % V == 0 && aligned16(qkv) && aligned16(bias) && aligned16(out))                  \
      split_row<T, V>(qkv, bias, out, batch, s, hq, hkv, d);                                \
    else                                                                                    \
      split_row<T, 1>(qkv, bias, out, batch, s, hq, hkv, d);                                \
  }

FOR_EACH_FLOAT(SPLIT_HEADS_OPS)
