// y = act(x + bias), the bias broadcast over rows: the bias add after a
// matmul and the activation of an MLP's first projection in one pass
// (Candle: a broadcast add, whose per-element index arithmetic made it the
// slowest kernel of an encoder forward, then a unary kernel). The sum is
// rounded to T before the activation, as the two composed ops round, then
// the activation is computed in f32.
// act: 0 none, 1 gelu (erf), 2 gelu (tanh), 3 relu, 4 silu.
#include "common.cuh"

__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case 1:
      return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case 2: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + tanhf(inner));
    }
    case 3:
      return v > 0.f ? v : 0.f;
    case 4:
      return v / (1.f + expf(-v));
    default:
      return v;
  }
}

// One block per row (grid-strided over rows past the grid limit), threads
// over its n columns, 16 bytes at a time when n and the pointers allow: no
// per-element index division.
template <typename T, int V>
__device__ void bias_act(const T* x, const T* b, T* y, size_t rows, int n, int act) {
  for (size_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    T* yr = y + row * n;
    for (int c = threadIdx.x * V; c < n; c += blockDim.x * V) {
      if (V == 1) {
        const float v = to_f(from_f<T>(to_f(xr[c]) + to_f(b[c])));
        yr[c] = from_f<T>(activate(v, act));
      } else {
        float a[V], bb[V];
        load16(xr + c, a);
        load16(b + c, bb);
#pragma unroll
        for (int k = 0; k < V; k++) a[k] = activate(to_f(from_f<T>(a[k] + bb[k])), act);
        store16(yr + c, a);
      }
    }
  }
}

#define BIAS_ACT_OPS(T, SUFFIX)                                                             \
  extern "C" __global__ void bias_act_##SUFFIX(const T* x, const T* b, T* y, size_t rows,  \
                                               int n, int act) {                           \
    constexpr int V = Vec16<T>::N;                                                         \
    if (n % V == 0 && aligned16(x) && aligned16(b) && aligned16(y))                        \
      bias_act<T, V>(x, b, y, rows, n, act);                                               \
    else                                                                                   \
      bias_act<T, 1>(x, b, y, rows, n, act);                                               \
  }

FOR_EACH_FLOAT(BIAS_ACT_OPS)
