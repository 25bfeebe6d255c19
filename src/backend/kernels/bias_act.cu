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

// A grid-stride loop over the flat tensor, V elements (16 bytes when n and
// the pointers allow) per step, the activation a template parameter (no
// branch per element). Each thread's bias column advances by the stride
// modulo the row's chunk count, so there is no division per element, and
// the launch is sized by the element count, not the row count: a few long
// rows (an encoder's [b, s·h] position add) fill the GPU as well as many
// short ones. (Loading four chunks per step before computing any raised the
// registers to 25% occupancy and lost 30%: Nsight Compute, H200.)
template <typename T, int V, int ACT>
__device__ void bias_act(const T* x, const T* b, T* y, size_t rows, int n) {
  // Unsigned: col + step < 2·nc < 2³² for any int width.
  const unsigned nc = (unsigned)n / V;  // chunks per row
  const size_t total = rows * (size_t)nc;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const unsigned step = (unsigned)(stride % nc);
  size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned col = (unsigned)(c % nc);
  for (; c < total; c += stride) {
    if (V == 1) {
      const float v = to_f(from_f<T>(to_f(x[c]) + to_f(b[col])));
      y[c] = from_f<T>(activate(v, ACT));
    } else {
      float a[V], bb[V];
      load16(x + c * V, a);
      load16(b + (size_t)col * V, bb);
#pragma unroll
      for (int k = 0; k < V; k++) a[k] = activate(to_f(from_f<T>(a[k] + bb[k])), ACT);
      store16(y + c * V, a);
    }
    col = col + step >= nc ? col + step - nc : col + step;
  }
}

template <typename T, int ACT>
__device__ void bias_act_v(const T* x, const T* b, T* y, size_t rows, int n) {
  constexpr int V = Vec16<T>::N;
  if (n % V == 0 && aligned16(x) && aligned16(b) && aligned16(y))
    bias_act<T, V, ACT>(x, b, y, rows, n);
  else
    bias_act<T, 1, ACT>(x, b, y, rows, n);
}

#define BIAS_ACT_OPS(T, SUFFIX)                                                            \
  extern "C" __global__ void bias_act_##SUFFIX(const T* x, const T* b, T* y, size_t rows, \
                                               int n, int act) {                          \
    switch (act) {                                                                        \
      case 1: bias_act_v<T, 1>(x, b, y, rows, n); break;                                  \
      case 2: bias_act_v<T, 2>(x, b, y, rows, n); break;                                  \
      case 3: bias_act_v<T, 3>(x, b, y, rows, n); break;                                  \
      case 4: bias_act_v<T, 4>(x, b, y, rows, n); break;                                  \
      default: bias_act_v<T, 0>(x, b, y, rows, n); break;                                 \
    }                                                                                     \
  }

FOR_EACH_FLOAT(BIAS_ACT_OPS)
