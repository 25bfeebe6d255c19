// y = act(x + bias), the bias broadcast over rows: the bias add after a
// matmul and the activation of an MLP's first projection in one pass
// (Candle: a broadcast add, whose per-element index arithmetic made it the
// slowest kernel of an encoder forward, then a unary kernel). Elementwise,
// grid-stride; the sum is rounded to T before the activation, as the two
// composed ops round, then the activation is computed in f32.
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

// 32-bit indices when they fit (the modulo is most of the arithmetic).
template <typename T, typename I>
__device__ void bias_act(const T* x, const T* b, T* y, I total, I n, int act) {
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (I)blockDim.x * gridDim.x) {
    const float v = to_f(from_f<T>(to_f(x[i]) + to_f(b[i % n])));
    y[i] = from_f<T>(activate(v, act));
  }
}

#define BIAS_ACT_OPS(T, SUFFIX)                                                             \
  extern "C" __global__ void bias_act_##SUFFIX(const T* x, const T* b, T* y, size_t total, \
                                               int n, int act) {                           \
    if (total <= 0xffffffffull)                                                            \
      bias_act<T, unsigned>(x, b, y, (unsigned)total, (unsigned)n, act);                   \
    else                                                                                   \
      bias_act<T, size_t>(x, b, y, total, (size_t)n, act);                                 \
  }

FOR_EACH_FLOAT(BIAS_ACT_OPS)
