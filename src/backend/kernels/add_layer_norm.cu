// y = LayerNorm(x + lin_bias + residual): a post-norm encoder's projection
// bias, residual add and LayerNorm in one pass (Candle: a broadcast add, an
// add and its layer_norm kernel). The sums are rounded to T as the composed
// ops round them (x + lin_bias, then + residual); mean and centred variance
// in f32 (transformers' LayerNorm, not Candle's E[x^2] - E[x]^2); the output
// is rounded once. layer_norm_* is the same without the residual and
// projection bias (r and lb null): a plain LayerNorm.
// params: [3, n] = lin_bias, weight, bias ([2, n] = weight, bias for
// layer_norm_*).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ float summed(const T* x, const T* r, const T* lb, int i) {
  if (r == nullptr) return to_f(x[i]);
  return to_f(from_f<T>(to_f(from_f<T>(to_f(x[i]) + to_f(lb[i]))) + to_f(r[i])));
}

// `lanes` (16 or 32, a power of two dividing the warp) lanes per row,
// 128 / lanes rows a block. A row of up to lanes * 32 elements (whole
// 16-byte vectors, aligned) is held in registers (32 per lane), so x,
// residual and the bias are read once, 16 bytes at a time; other rows take
// three passes over global memory. Half a warp per row for rows of at most
// 64 vectors (the launcher's choice): at MiniLM's 384 bf16 columns (48
// vectors) a whole warp left half its lanes idle on the second vector;
// half-warps take three full passes for two rows.
template <typename T, bool RES>
__device__ void add_layer_norm(const T* x, const T* r, const T* lb, const T* w, const T* b, T* y,
                               int rows, int n, float eps, int lanes) {
  const int lane = threadIdx.x % lanes;
  const int row_id = blockIdx.x * (blockDim.x / lanes) + threadIdx.x / lanes;
  // Lanes past the last row compute the last row again and store nothing:
  // the shuffles below are full-warp and must not lose lanes.
  const bool live = row_id < rows;
  const int row = live ? row_id : rows - 1;
  const size_t off = (size_t)row * n;
  const T* xr = x + off;
  const T* rr = RES ? r + off : nullptr;
  constexpr int V = Vec16<T>::N, K = 32 / V;
  if (n <= lanes * 32 && n % V == 0 && aligned16(x) && aligned16(r) && aligned16(lb) &&
      aligned16(w) && aligned16(b) && aligned16(y)) {
    // Lane `lane` holds vectors lane, lane + lanes, ... of the row (16 bytes
    // each). Every load of the row is issued before any is used: loaded and
    // converted one vector at a time, a thread had two or three 16-byte
    // loads in flight and the kernel ran at 2.75 TB/s against a plain
    // read-two-write-one kernel's 3.9 (MiniLM's [65536, 384], H200).
    // Past the row's end a lane loads the row's first vector again (no
    // branch around the loads, which kept them apart) and drops it.
    uint4 xa[K], ra[K], ba[K];
#pragma unroll
    for (int j = 0; j < K; j++) {
      const int i = (lane + lanes * j) * V, ic = i < n ? i : 0;
      xa[j] = *reinterpret_cast<const uint4*>(xr + ic);
      if (RES) {
        ra[j] = *reinterpret_cast<const uint4*>(rr + ic);
        ba[j] = *reinterpret_cast<const uint4*>(lb + ic);
      }
    }
    float v[32];
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < K; j++) {
      const bool in = (lane + lanes * j) * V < n;
      const T* xe = reinterpret_cast<const T*>(&xa[j]);
      const T* re = reinterpret_cast<const T*>(&ra[j]);
      const T* be = reinterpret_cast<const T*>(&ba[j]);
#pragma unroll
      for (int k = 0; k < V; k++) {
        float a = to_f(xe[k]);
        if (RES) a = to_f(from_f<T>(to_f(from_f<T>(a + to_f(be[k]))) + to_f(re[k])));
        a = in ? a : 0.f;
        v[j * V + k] = a;
        s += a;
      }
    }
    const float mean = group_sum(s, lanes) / n;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < K; j++) {
      if ((lane + lanes * j) * V < n) {
#pragma unroll
        for (int k = 0; k < V; k++) {
          const float d = v[j * V + k] - mean;
          ss += d * d;
        }
      }
    }
    const float rstd = rsqrtf(group_sum(ss, lanes) / n + eps);
    if (!live) return;
#pragma unroll
    for (int j = 0; j < K; j++) {
      const int i = (lane + lanes * j) * V;
      if (i < n) {
        float wv[V], bv[V], o[V];
        load16(w + i, wv);
        load16(b + i, bv);
#pragma unroll
        for (int k = 0; k < V; k++) o[k] = (v[j * V + k] - mean) * rstd * wv[k] + bv[k];
        store16(y + off + i, o);
      }
    }
    return;
  }
  float s = 0.f;
  for (int i = lane; i < n; i += lanes) s += summed(xr, rr, lb, i);
  const float mean = group_sum(s, lanes) / n;
  float ss = 0.f;
  for (int i = lane; i < n; i += lanes) {
    const float d = summed(xr, rr, lb, i) - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(group_sum(ss, lanes) / n + eps);
  if (!live) return;
  for (int i = lane; i < n; i += lanes) {
    const float d = summed(xr, rr, lb, i) - mean;
    y[off + i] = from_f<T>(d * rstd * to_f(w[i]) + to_f(b[i]));
  }
}

#define ADD_LAYER_NORM_OPS(T, SUFFIX)                                                       \
  extern "C" __global__ void add_layer_norm_##SUFFIX(const T* x, const T* r, const T* p,   \
                                                     T* y, int rows, int n, float eps,    \
                                                     int lanes) {                          \
    add_layer_norm<T, true>(x, r, p, p + n, p + 2 * (size_t)n, y, rows, n, eps, lanes);    \
  }                                                                                         \
  extern "C" __global__ void layer_norm_##SUFFIX(const T* x, const T* p, T* y, int rows, int n, \
                                                 float eps, int lanes) {                   \
    add_layer_norm<T, false>(x, (const T*)nullptr, (const T*)nullptr, p, p + n, y, rows, n,  \
                             eps, lanes);                                                   \
  }

FOR_EACH_FLOAT(ADD_LAYER_NORM_OPS)
