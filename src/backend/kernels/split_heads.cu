// The fused q/k/v projection's output [b * s, (hq + 2 hkv) * d] plus its
// bias, written as q [b, hq, s, d], k and v [b, hkv, s, d] one after the
// other in one buffer: the bias adds and the three head transposes
// (Candle: three broadcast adds and three copies) in one pass. The sum is
// rounded once, as the composed add rounds it. Elementwise, grid-stride
// over the input (reads coalesced, writes in runs of d).
#include "common.cuh"

template <typename T>
__device__ void split_heads(const T* qkv, const T* bias, T* out, size_t total, int batch, int s,
                            int hq, int hkv, int d) {
  const size_t width = (size_t)(hq + 2 * hkv) * d;
  const size_t q_size = (size_t)batch * hq * s * d;
  const size_t kv_size = (size_t)batch * hkv * s * d;
  FOR_EACH_ELEMENT(i, total) {
    const size_t row = i / width;
    const int c = (int)(i - row * width);
    const int bi = (int)(row / s);
    const int si = (int)(row - (size_t)bi * s);
    const int head = c / d;
    const int dd = c - head * d;
    const T v = from_f<T>(to_f(qkv[i]) + to_f(bias[c]));
    size_t dst;
    if (head < hq) {
      dst = (((size_t)bi * hq + head) * s + si) * d + dd;
    } else if (head < hq + hkv) {
      dst = q_size + (((size_t)bi * hkv + (head - hq)) * s + si) * d + dd;
    } else {
      dst = q_size + kv_size + (((size_t)bi * hkv + (head - hq - hkv)) * s + si) * d + dd;
    }
    out[dst] = v;
  }
}

#define SPLIT_HEADS_OPS(T, SUFFIX)                                                          \
  extern "C" __global__ void split_heads_##SUFFIX(const T* qkv, const T* bias, T* out,     \
                                                  size_t total, int batch, int s, int hq,   \
                                                  int hkv, int d) {                         \
    split_heads<T>(qkv, bias, out, total, batch, s, hq, hkv, d);                            \
  }

FOR_EACH_FLOAT(SPLIT_HEADS_OPS)
