// Fused SwiGLU, forward and backward, for f32, bf16 and f16. Elementwise,
// grid-stride; math in f32, one rounding per output.
//
// Forward:  y = silu(gate) * up, silu(g) = g / (1 + exp(-g)) (Candle's form)
// Backward (s = sigmoid(gate)), both gradients from one pass over the inputs:
//   d_gate = dy * up * s * (1 + gate * (1 - s))
//   d_up   = dy * silu(gate)
// The backward output is stacked: d_gate in grads[0..n], d_up in grads[n..2n].
// Packed forward (inference): gate and up as the two halves of each row of
// one [rows, 2w] tensor (the output of the stacked gate/up projection).
#include "common.cuh"

template <typename T>
__device__ void swiglu_packed_fwd(const T* gu, T* y, size_t n, size_t w) {
  FOR_EACH_ELEMENT(i, n) {
    const size_t r = i / w, j = i - r * w;
    const float g = to_f(gu[2 * w * r + j]);
    y[i] = from_f<T>(g / (1.f + expf(-g)) * to_f(gu[2 * w * r + w + j]));
  }
}

template <typename T>
__device__ void swiglu_fwd(const T* gate, const T* up, T* y, size_t n) {
  FOR_EACH_ELEMENT(i, n) {
    const float g = to_f(gate[i]);
    y[i] = from_f<T>(g / (1.f + expf(-g)) * to_f(up[i]));
  }
}

template <typename T>
__device__ void swiglu_bwd(const T* gate, const T* up, const T* dy, T* grads, size_t n) {
  FOR_EACH_ELEMENT(i, n) {
    const float g = to_f(gate[i]);
    const float d = to_f(dy[i]);
    const float s = 1.f / (1.f + expf(-g));
    grads[i] = from_f<T>(d * to_f(up[i]) * s * (1.f + g * (1.f - s)));
    grads[n + i] = from_f<T>(d * g * s);
  }
}

#define SWIGLU_OPS(T, SUFFIX)                                                              \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* gate, const T* up, T* y,        \
                                                 size_t n) {                              \
    swiglu_fwd<T>(gate, up, y, n);                                                        \
  }                                                                                        \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* gate, const T* up, const T* dy, \
                                                 T* grads, size_t n) {                    \
    swiglu_bwd<T>(gate, up, dy, grads, n);                                                \
  }                                                                                        \
  extern "C" __global__ void swiglu_packed_fwd_##SUFFIX(const T* gu, T* y, size_t n,      \
                                                        size_t w) {                       \
    swiglu_packed_fwd<T>(gu, y, n, w);                                                    \
  }

FOR_EACH_FLOAT(SWIGLU_OPS)
