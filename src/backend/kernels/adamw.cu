// One AdamW update of one parameter, fused, for f32, bf16 and f16. The
// composed update is about a dozen Candle ops a parameter (each a launch
// and a full-size temporary); a LoRA step updates ~100 small parameters,
// so the optimizer's host time (15 ms of a 0.5B step, measured) was
// launches. The composed form's expressions, math in f32:
//   m' = m * beta1 + g * (1 - beta1)
//   v' = v * beta2 + g^2 * (1 - beta2)
//   p' = p * decay - m' / (sqrt(v') / bc2_sqrt + eps) * step_size
// Inputs p, g (n each) and mv (m over v, 2n); output p' m' v' stacked (3n).
#include "common.cuh"

template <typename T>
__device__ void adamw_update(const T* p, const T* g, const T* mv, T* out, float beta1, float beta2,
                             float eps, float decay, float step_size, float bc2_sqrt, size_t n) {
  FOR_EACH_ELEMENT(i, n) {
    const float gi = to_f(g[i]);
    const float m = to_f(mv[i]) * beta1 + gi * (1.f - beta1);
    const float v = to_f(mv[n + i]) * beta2 + gi * gi * (1.f - beta2);
    const float update = m / (sqrtf(v) / bc2_sqrt + eps) * step_size;
    out[i] = from_f<T>(to_f(p[i]) * decay - update);
    out[n + i] = from_f<T>(m);
    out[2 * n + i] = from_f<T>(v);
  }
}

#define ADAMW_OPS(T, SUFFIX)                                                                    \
  extern "C" __global__ void adamw_update_##SUFFIX(const T* p, const T* g, const T* mv, T* out, \
                                                   float beta1, float beta2, float eps,        \
                                                   float decay, float step_size,               \
                                                   float bc2_sqrt, size_t n) {                  \
    adamw_update<T>(p, g, mv, out, beta1, beta2, eps, decay, step_size, bc2_sqrt, n);          \
  }
FOR_EACH_FLOAT(ADAMW_OPS)
