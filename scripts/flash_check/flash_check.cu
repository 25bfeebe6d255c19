// Standalone check and benchmark of src/backend/kernels/flash_attn.cu, without
// Rust: runs the forward and backward kernels over a table of shapes, compares
// them with a naive f32 reference (one warp per query row / per key, on the
// GPU), then times the benchmark shape with cudaEvents.
//
//   bash scripts/flash_check/build.sh      # -> .dev/flash/flash_check
//   flash_check            # table + timings; exit 1 on a tolerance failure
//   flash_check --small    # the small rows only, no timing (for compute-sanitizer)
//
// Error measure, per output: max |kernel − reference| / max |reference|
// (relative to the largest reference value, like tests/suite/kernels.rs).
// Tolerances: O 2e-2, dQ/dK/dV 5e-2 (bf16); the same for f16 (which in
// practice comes out about 8x tighter). The reference gets the same rounded
// inputs as the kernel and computes everything in f32.
#include "flash_attn.cu"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));  \
      exit(2);                                                                             \
    }                                                                                      \
  } while (0)

// ------------------------------------------------------------ reference --

__device__ float warp_dot(const float* a, const float* b, int d) {
  float acc = 0.f;
  for (int i = threadIdx.x % 32; i < d; i += 32) acc += a[i] * b[i];
  return warp_sum(acc);
}

struct RefArgs {
  const float *q, *k, *v, *dout, *bias;
  int b, hq, hkv, s, t, d, causal, window;
  long long bs, hs, rs;
  float scale;
};

__device__ bool ref_visible(const RefArgs& a, int i, int j) {
  const int qpos = i + a.t - a.s;
  return (!a.causal || j <= qpos) && (a.window <= 0 || qpos - j < a.window);
}

__device__ float ref_score(const RefArgs& a, int bi, int h, int i, int j) {
  const int hk = h / (a.hq / a.hkv);
  const float* qi = a.q + (((size_t)bi * a.hq + h) * a.s + i) * a.d;
  const float* kj = a.k + (((size_t)bi * a.hkv + hk) * a.t + j) * a.d;
  float x = warp_dot(qi, kj, a.d) * a.scale;
  if (a.bias) x += a.bias[bi * a.bs + h * a.hs + (long long)i * a.rs + j];
  return x;
}

// One warp per query row: O, lse (natural log; +inf when no key is visible),
// the row max and log-sum separately (p = exp((x − max) − logsum): with an
// f32::MIN padding bias, max + logsum would lose logsum), dsum = Σ_j p_j dP_j
// and dQ.
__global__ void ref_rows(RefArgs a, float* o, float* lse, float* rmax, float* rlog, float* dsum,
                         float* dq) {
  const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= (size_t)a.b * a.hq * a.s) return;
  const int lane = threadIdx.x % 32;
  const int i = row % a.s, h = (row / a.s) % a.hq, bi = row / ((size_t)a.s * a.hq);
  const int hk = h / (a.hq / a.hkv);
  const float* kb = a.k + ((size_t)bi * a.hkv + hk) * a.t * a.d;
  const float* vb = a.v + ((size_t)bi * a.hkv + hk) * a.t * a.d;
  const float* doi = a.dout + row * a.d;
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j < a.t; ++j) {
    if (!ref_visible(a, i, j)) continue;
    const float x = ref_score(a, bi, h, i, j);
    const float mn = fmaxf(m, x);
    l = l * expf(m - mn) + expf(x - mn);
    m = mn;
  }
  const float L = l > 0.f ? m + logf(l) : INFINITY;
  const float logl = logf(l);
  if (lane == 0) {
    lse[row] = L;
    rmax[row] = m;
    rlog[row] = logl;
  }
  float acc[4] = {0, 0, 0, 0};  // d <= 128: 4 components per lane
  float ds = 0.f;
  for (int j = 0; j < a.t; ++j) {
    if (!ref_visible(a, i, j) || l == 0.f) continue;
    const float p = expf((ref_score(a, bi, h, i, j) - m) - logl);
    for (int c = 0; c < 4; ++c) {
      const int dd = lane + 32 * c;
      if (dd < a.d) acc[c] += p * vb[(size_t)j * a.d + dd];
    }
    ds += p * warp_dot(doi, vb + (size_t)j * a.d, a.d);
  }
  for (int c = 0; c < 4; ++c)
    if (lane + 32 * c < a.d) o[row * a.d + lane + 32 * c] = acc[c];
  if (lane == 0) dsum[row] = ds;
  float g[4] = {0, 0, 0, 0};
  for (int j = 0; j < a.t; ++j) {
    if (!ref_visible(a, i, j) || l == 0.f) continue;
    const float p = expf((ref_score(a, bi, h, i, j) - m) - logl);
    const float dp = warp_dot(doi, vb + (size_t)j * a.d, a.d);
    const float dS = p * (dp - ds);
    for (int c = 0; c < 4; ++c) {
      const int dd = lane + 32 * c;
      if (dd < a.d) g[c] += dS * kb[(size_t)j * a.d + dd];
    }
  }
  for (int c = 0; c < 4; ++c)
    if (lane + 32 * c < a.d) dq[row * a.d + lane + 32 * c] = g[c] * a.scale;
}

// One warp per key: dK and dV summed over the query heads of its group.
__global__ void ref_keys(RefArgs a, const float* lse, const float* rmax, const float* rlog,
                         const float* dsum, float* dk, float* dv) {
  const size_t key = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (key >= (size_t)a.b * a.hkv * a.t) return;
  const int lane = threadIdx.x % 32;
  const int j = key % a.t, hk = (key / a.t) % a.hkv, bi = key / ((size_t)a.t * a.hkv);
  const int rep = a.hq / a.hkv;
  const float* vj = a.v + key * a.d;
  float gk[4] = {0, 0, 0, 0}, gv[4] = {0, 0, 0, 0};
  for (int h = hk * rep; h < (hk + 1) * rep; ++h) {
    for (int i = 0; i < a.s; ++i) {
      const size_t row = ((size_t)bi * a.hq + h) * a.s + i;
      if (!ref_visible(a, i, j) || isinf(lse[row])) continue;
      const float p = expf((ref_score(a, bi, h, i, j) - rmax[row]) - rlog[row]);
      const float* doi = a.dout + row * a.d;
      const float* qi = a.q + row * a.d;
      const float dS = p * (warp_dot(doi, vj, a.d) - dsum[row]);
      for (int c = 0; c < 4; ++c) {
        const int dd = lane + 32 * c;
        if (dd < a.d) {
          gk[c] += dS * qi[dd];
          gv[c] += p * doi[dd];
        }
      }
    }
  }
  for (int c = 0; c < 4; ++c)
    if (lane + 32 * c < a.d) {
      dk[key * a.d + lane + 32 * c] = gk[c] * a.scale;
      dv[key * a.d + lane + 32 * c] = gv[c];
    }
}

// ---------------------------------------------------------------- host --

enum BiasMode { NONE = 0, PAD = 1, RELPOS = 2 };
enum Dt { BF16 = 0, F16 = 1 };

struct Case {
  int b, hq, hkv, s, t, d, causal, window, bias;
  Dt dt;
  bool small;  // part of the --small set (sanitizer runs)
};

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float randn() {
  auto u = [] {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return ((rng_state >> 40) + 0.5f) / 16777216.f;
  };
  const float u1 = u(), u2 = u();
  return sqrtf(-2.f * logf(u1)) * cosf(6.2831853f * u2);
}

template <typename T> static uint16_t to_bits(float f);
template <> uint16_t to_bits<__nv_bfloat16>(float f) {
  __nv_bfloat16 h = __float2bfloat16(f);
  uint16_t u;
  memcpy(&u, &h, 2);
  return u;
}
template <> uint16_t to_bits<__half>(float f) {
  __half h = __float2half(f);
  uint16_t u;
  memcpy(&u, &h, 2);
  return u;
}
template <typename T> static float from_bits(uint16_t u) {
  T h;
  memcpy(&h, &u, 2);
  return (float)h;
}

// Device buffers of one case: half-precision inputs, their f32 copies.
template <typename T> struct Buffers {
  size_t nq, nk;
  T *q, *k, *v, *o, *dout, *dq, *dk, *dv;
  float *lse, *dsum, *dq_acc, *dk_acc, *dv_acc, *bias = nullptr;
  long long bs = 0, hs = 0, rs = 0;
};

template <typename T> static T* upload(const std::vector<float>& host, std::vector<float>& rounded) {
  std::vector<uint16_t> bits(host.size());
  rounded.resize(host.size());
  for (size_t i = 0; i < host.size(); ++i) {
    bits[i] = to_bits<T>(host[i]);
    rounded[i] = from_bits<T>(bits[i]);
  }
  T* d;
  CK(cudaMalloc(&d, bits.size() * 2 + 16));
  CK(cudaMemcpy(d, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
  return d;
}

static float* upload_f32(const std::vector<float>& host) {
  float* d;
  CK(cudaMalloc(&d, host.size() * 4 + 16));
  CK(cudaMemcpy(d, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
  return d;
}

template <typename T> struct Kernels;
#define KERNELS(T, SUFFIX)                                                                   \
  template <> struct Kernels<T> {                                                            \
    static void* fwd(int d) {                                                                \
      return d == 32 ? (void*)flash_attn_fwd_d32_##SUFFIX                                    \
             : d == 64 ? (void*)flash_attn_fwd_d64_##SUFFIX                                  \
                       : (void*)flash_attn_fwd_d128_##SUFFIX;                                \
    }                                                                                        \
    static void* fwd_nb(int d) {                                                             \
      return d == 32 ? (void*)flash_attn_fwd_nb_d32_##SUFFIX                                 \
             : d == 64 ? (void*)flash_attn_fwd_nb_d64_##SUFFIX                               \
                       : (void*)flash_attn_fwd_nb_d128_##SUFFIX;                             \
    }                                                                                        \
    static void* bwd(int d) {                                                                \
      return d == 32 ? (void*)flash_attn_bwd_d32_##SUFFIX                                    \
             : d == 64 ? (void*)flash_attn_bwd_d64_##SUFFIX                                  \
                       : (void*)flash_attn_bwd_d128_##SUFFIX;                                \
    }                                                                                        \
    static void* dot(int d) {                                                                \
      return d == 32 ? (void*)flash_attn_bwd_dot_d32_##SUFFIX                                \
             : d == 64 ? (void*)flash_attn_bwd_dot_d64_##SUFFIX                              \
                       : (void*)flash_attn_bwd_dot_d128_##SUFFIX;                            \
    }                                                                                        \
    static void* convert() { return (void*)flash_attn_convert_##SUFFIX; }                    \
  };
KERNELS(__nv_bfloat16, bf16)
KERNELS(__half, f16)

static int fwd_smem(int d) {
  return d == 32 ? flash::FwdCfg<32>::SMEM : d == 64 ? flash::FwdCfg<64>::SMEM : flash::FwdCfg<128>::SMEM;
}
static int bwd_smem(int d) {
  return d == 32 ? flash::BwdCfg<32>::SMEM : d == 64 ? flash::BwdCfg<64>::SMEM : flash::BwdCfg<128>::SMEM;
}

template <typename T> static void set_smem_limits() {
  for (int d : {32, 64, 128}) {
    CK(cudaFuncSetAttribute(Kernels<T>::fwd(d), cudaFuncAttributeMaxDynamicSharedMemorySize, fwd_smem(d)));
    CK(cudaFuncSetAttribute(Kernels<T>::fwd_nb(d), cudaFuncAttributeMaxDynamicSharedMemorySize, fwd_smem(d)));
    CK(cudaFuncSetAttribute(Kernels<T>::bwd(d), cudaFuncAttributeMaxDynamicSharedMemorySize, bwd_smem(d)));
  }
}

// Contiguous [b, h, rows, d] inputs; unbiased cases take the `_nb` entry, as
// the Rust op does.
template <typename T> static void run_fwd(const Case& c, Buffers<T>& B, float scale) {
  const int bm = c.d == 32 ? flash::FwdCfg<32>::BM : c.d == 64 ? flash::FwdCfg<64>::BM : flash::FwdCfg<128>::BM;
  const int nt = 32 * (c.d == 32 ? flash::FwdCfg<32>::WARPS : c.d == 64 ? flash::FwdCfg<64>::WARPS : flash::FwdCfg<128>::WARPS);
  dim3 grid((c.s + bm - 1) / bm, c.hq, c.b);
  int o_bshd = 0, nseq = 0;
  const unsigned int *t_dev = nullptr, *seqs = nullptr;
  flash::Strides qst{(long long)c.hq * c.s * c.d, c.s * c.d, c.d};
  flash::Strides kvst{(long long)c.hkv * c.t * c.d, c.t * c.d, c.d};
  void* args[] = {&B.q, &B.k, &B.v, &B.bias, &B.o, &B.lse, (void*)&c.hq, (void*)&c.hkv, (void*)&c.s,
                  (void*)&c.t, &scale, (void*)&c.causal, (void*)&c.window, &B.bs, &B.hs, &B.rs,
                  &o_bshd, &t_dev, &seqs, &nseq, &qst, &kvst};
  void* fn = B.bias ? Kernels<T>::fwd(c.d) : Kernels<T>::fwd_nb(c.d);
  CK(cudaLaunchKernel(fn, grid, dim3(nt), args, fwd_smem(c.d), 0));
}

static void convert(void* fn, float* src, void* dst, size_t n, float scale) {
  void* args[] = {&src, &dst, &n, &scale};
  const size_t blocks = std::min<size_t>((n + 255) / 256, 1024);
  CK(cudaLaunchKernel(fn, dim3(blocks), dim3(256), args, 0, 0));
}

// The whole backward as the Rust op runs it: dsum, zeroed accumulators, the
// main kernel, conversions.
template <typename T> static void run_bwd(const Case& c, Buffers<T>& B, float scale) {
  size_t rows = B.nq / c.d;
  {
    void* args[] = {&B.o, &B.dout, &B.dsum, &rows};
    const size_t threads = rows * (c.d / 8);
    CK(cudaLaunchKernel(Kernels<T>::dot(c.d), dim3((threads + 255) / 256), dim3(256), args, 0, 0));
  }
  CK(cudaMemsetAsync(B.dq_acc, 0, B.nq * 4));
  const bool gqa = c.hq != c.hkv;
  if (gqa) {
    CK(cudaMemsetAsync(B.dk_acc, 0, B.nk * 4));
    CK(cudaMemsetAsync(B.dv_acc, 0, B.nk * 4));
  }
  dim3 grid((c.t + 63) / 64, c.hq, c.b);
  void* args[] = {&B.q, &B.k, &B.v, &B.dout, &B.lse, &B.dsum, &B.bias, &B.dq_acc, &B.dk, &B.dv,
                  &B.dk_acc, &B.dv_acc, (void*)&c.hq, (void*)&c.hkv, (void*)&c.s, (void*)&c.t, &scale,
                  (void*)&c.causal, (void*)&c.window, &B.bs, &B.hs, &B.rs};
  CK(cudaLaunchKernel(Kernels<T>::bwd(c.d), grid, dim3(128), args, bwd_smem(c.d), 0));
  convert(Kernels<T>::convert(), B.dq_acc, B.dq, B.nq, scale);
  if (gqa) {
    convert(Kernels<T>::convert(), B.dk_acc, B.dk, B.nk, 1.f);
    convert(Kernels<T>::convert(), B.dv_acc, B.dv, B.nk, 1.f);
  }
}

template <typename T> static std::vector<float> download(const T* d, size_t n) {
  std::vector<uint16_t> bits(n);
  CK(cudaMemcpy(bits.data(), d, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = from_bits<T>(bits[i]);
  return out;
}
static std::vector<float> download_f32(const float* d, size_t n) {
  std::vector<float> out(n);
  CK(cudaMemcpy(out.data(), d, n * 4, cudaMemcpyDeviceToHost));
  return out;
}

// max |a − b| / max |b|; a non-finite kernel value counts as infinite error.
static float rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  float err = 0.f, ref = 0.f;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    err = fmaxf(err, fabsf(a[i] - b[i]));
    ref = fmaxf(ref, fabsf(b[i]));
  }
  return ref > 0.f ? err / ref : err;
}

template <typename T> static Buffers<T> make_buffers(const Case& c, RefArgs& ra, std::vector<float*>& f32s) {
  Buffers<T> B;
  B.nq = (size_t)c.b * c.hq * c.s * c.d;
  B.nk = (size_t)c.b * c.hkv * c.t * c.d;
  auto gen = [](size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = randn();
    return v;
  };
  std::vector<float> rq, rk, rv, rdo;
  B.q = upload<T>(gen(B.nq), rq);
  B.k = upload<T>(gen(B.nk), rk);
  B.v = upload<T>(gen(B.nk), rv);
  B.dout = upload<T>(gen(B.nq), rdo);
  ra = RefArgs{};
  ra.q = upload_f32(rq);
  ra.k = upload_f32(rk);
  ra.v = upload_f32(rv);
  ra.dout = upload_f32(rdo);
  f32s.insert(f32s.end(), {(float*)ra.q, (float*)ra.k, (float*)ra.v, (float*)ra.dout});
  if (c.bias == PAD) {
    // [b, 1, s, t]: batch bi hides its last 3·bi keys; batch 0 hides every
    // key of query row min(3, s − 1) (an all-padding row).
    std::vector<float> bias((size_t)c.b * c.s * c.t, 0.f);
    for (int bi = 0; bi < c.b; ++bi)
      for (int i = 0; i < c.s; ++i)
        for (int j = 0; j < c.t; ++j) {
          const bool hide = j >= c.t - 3 * bi || (bi == 0 && i == std::min(3, c.s - 1));
          if (hide) bias[((size_t)bi * c.s + i) * c.t + j] = -3.4028234663852886e38f;
        }
    B.bias = upload_f32(bias);
    B.bs = (long long)c.s * c.t, B.hs = 0, B.rs = c.t;
  } else if (c.bias == RELPOS) {
    // [1, hq, s, t] relative-position-like bias, broadcast over the batch.
    std::vector<float> bias((size_t)c.hq * c.s * c.t);
    for (auto& x : bias) x = 2.f * randn();
    B.bias = upload_f32(bias);
    B.bs = 0, B.hs = (long long)c.s * c.t, B.rs = c.t;
  }
  ra.bias = B.bias;
  ra.bs = B.bs, ra.hs = B.hs, ra.rs = B.rs;
  ra.b = c.b, ra.hq = c.hq, ra.hkv = c.hkv, ra.s = c.s, ra.t = c.t, ra.d = c.d;
  ra.causal = c.causal, ra.window = c.window;
  CK(cudaMalloc(&B.o, B.nq * 2));
  CK(cudaMalloc(&B.dq, B.nq * 2));
  CK(cudaMalloc(&B.dk, B.nk * 2));
  CK(cudaMalloc(&B.dv, B.nk * 2));
  CK(cudaMalloc(&B.lse, B.nq / c.d * 4));
  CK(cudaMalloc(&B.dsum, B.nq / c.d * 4));
  CK(cudaMalloc(&B.dq_acc, B.nq * 4));
  CK(cudaMalloc(&B.dk_acc, B.nk * 4));
  CK(cudaMalloc(&B.dv_acc, B.nk * 4));
  return B;
}

template <typename T> static void free_buffers(Buffers<T>& B, std::vector<float*>& f32s) {
  for (void* p : {(void*)B.q, (void*)B.k, (void*)B.v, (void*)B.o, (void*)B.dout, (void*)B.dq, (void*)B.dk,
                  (void*)B.dv, (void*)B.lse, (void*)B.dsum, (void*)B.dq_acc, (void*)B.dk_acc,
                  (void*)B.dv_acc, (void*)B.bias})
    if (p) CK(cudaFree(p));
  for (float* p : f32s) CK(cudaFree(p));
  f32s.clear();
}

static const char* bias_name(int m) { return m == NONE ? "-" : m == PAD ? "pad" : "relpos"; }

template <typename T> static bool check(const Case& c) {
  std::vector<float*> f32s;
  RefArgs ra;
  Buffers<T> B = make_buffers<T>(c, ra, f32s);
  const float scale = 1.f / sqrtf((float)c.d);
  ra.scale = scale;
  run_fwd<T>(c, B, scale);
  run_bwd<T>(c, B, scale);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());

  float *ro, *rlse, *rmax, *rlog, *rds, *rdq, *rdk, *rdv;
  CK(cudaMalloc(&ro, B.nq * 4));
  CK(cudaMalloc(&rlse, B.nq / c.d * 4));
  CK(cudaMalloc(&rmax, B.nq / c.d * 4));
  CK(cudaMalloc(&rlog, B.nq / c.d * 4));
  CK(cudaMalloc(&rds, B.nq / c.d * 4));
  CK(cudaMalloc(&rdq, B.nq * 4));
  CK(cudaMalloc(&rdk, B.nk * 4));
  CK(cudaMalloc(&rdv, B.nk * 4));
  const size_t rows = B.nq / c.d, keys = B.nk / c.d;
  ref_rows<<<(rows + 3) / 4, 128>>>(ra, ro, rlse, rmax, rlog, rds, rdq);
  ref_keys<<<(keys + 3) / 4, 128>>>(ra, rlse, rmax, rlog, rds, rdk, rdv);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());

  const float eo = rel_err(download(B.o, B.nq), download_f32(ro, B.nq));
  const float edq = rel_err(download(B.dq, B.nq), download_f32(rdq, B.nq));
  const float edk = rel_err(download(B.dk, B.nk), download_f32(rdk, B.nk));
  const float edv = rel_err(download(B.dv, B.nk), download_f32(rdv, B.nk));
  // lse: error relative to max(1, |lse|) over rows that see a key (both +inf
  // otherwise). Rows whose keys are all padding (max below -1e4) are skipped:
  // the kernel floors their scores, so their lse is about -11357 + log(n).
  float e_lse = 0.f;
  {
    auto a = download_f32(B.lse, rows), b = download_f32(rlse, rows), mx = download_f32(rmax, rows);
    for (size_t i = 0; i < rows; ++i) {
      if (mx[i] < -1e4f && !std::isinf(mx[i])) {
        if (!std::isfinite(a[i])) e_lse = INFINITY;
      } else if (std::isinf(b[i]) && b[i] > 0) {
        if (!(std::isinf(a[i]) && a[i] > 0)) e_lse = INFINITY;
      } else if (!std::isfinite(a[i])) {
        e_lse = INFINITY;
      } else {
        e_lse = fmaxf(e_lse, fabsf(a[i] - b[i]) / fmaxf(1.f, fabsf(b[i])));
      }
    }
  }
  const bool ok = eo <= 2e-2f && edq <= 5e-2f && edk <= 5e-2f && edv <= 5e-2f && e_lse <= 1e-2f;
  printf("%-4s b%d hq%-2d hkv%-2d s%-4d t%-4d d%-3d %-6s w%-3d %-6s | O %.2e  lse %.2e  dQ %.2e  dK %.2e  dV %.2e  %s\n",
         c.dt == BF16 ? "bf16" : "f16", c.b, c.hq, c.hkv, c.s, c.t, c.d, c.causal ? "causal" : "full",
         c.window, bias_name(c.bias), eo, e_lse, edq, edk, edv, ok ? "ok" : "FAIL");
  for (float* p : {ro, rlse, rmax, rlog, rds, rdq, rdk, rdv}) CK(cudaFree(p));
  free_buffers(B, f32s);
  return ok;
}

template <typename T> static void bench(const Case& c, const char* label, bool backward = true) {
  std::vector<float*> f32s;
  RefArgs ra;
  Buffers<T> B = make_buffers<T>(c, ra, f32s);
  const float scale = 1.f / sqrtf((float)c.d);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const int warm = 10, iters = 50;
  for (int i = 0; i < warm; ++i) run_fwd<T>(c, B, scale);
  CK(cudaEventRecord(e0));
  for (int i = 0; i < iters; ++i) run_fwd<T>(c, B, scale);
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float fwd_ms;
  CK(cudaEventElapsedTime(&fwd_ms, e0, e1));
  fwd_ms /= iters;
  // Useful FLOPs: 4·b·hq·s·t·d forward (two matmuls), 2.5x that backward;
  // half under a causal mask when s = t.
  const double frac = c.causal && c.s == c.t ? 0.5 : 1.0;
  const double f = 4.0 * c.b * c.hq * c.s * (double)c.t * c.d * frac;
  if (!backward) {
    printf("TIME %-28s fwd %.4f ms (%.0f TFLOP/s)\n", label, fwd_ms, f / fwd_ms / 1e9);
    free_buffers(B, f32s);
    return;
  }
  for (int i = 0; i < warm; ++i) run_bwd<T>(c, B, scale);
  CK(cudaEventRecord(e0));
  for (int i = 0; i < iters; ++i) run_bwd<T>(c, B, scale);
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float bwd_ms;
  CK(cudaEventElapsedTime(&bwd_ms, e0, e1));
  bwd_ms /= iters;
  CK(cudaGetLastError());
  printf("TIME %-28s fwd %.4f ms (%.0f TFLOP/s)  bwd %.4f ms (%.0f TFLOP/s)\n", label, fwd_ms,
         f / fwd_ms / 1e9, bwd_ms, 2.5 * f / bwd_ms / 1e9);
  free_buffers(B, f32s);
}

int main(int argc, char** argv) {
  const bool small = argc > 1 && !strcmp(argv[1], "--small");
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  set_smem_limits<__nv_bfloat16>();
  set_smem_limits<__half>();

  const Case cases[] = {
      // b hq hkv   s     t    d  causal win bias    dtype small
      {2, 4, 4, 1, 37, 64, 1, 0, NONE, BF16, true},       // decode
      {2, 14, 2, 1, 37, 128, 1, 0, PAD, F16, true},       // decode, GQA 7, padding row
      {1, 4, 2, 17, 17, 32, 1, 0, NONE, BF16, true},      // GQA 2
      {2, 7, 1, 17, 17, 128, 0, 0, PAD, BF16, true},      // GQA 7, all-masked row
      {1, 2, 1, 130, 129, 32, 1, 7, NONE, BF16, true},    // s > t: first row sees nothing
      {2, 12, 12, 77, 77, 64, 0, 0, RELPOS, BF16, true},  // MPNet-like
      {1, 4, 2, 64, 64, 64, 1, 0, NONE, BF16, true},      // exactly one tile
      {2, 4, 1, 128, 300, 64, 1, 0, PAD, BF16, false},    // causal offset t − s = 172
      {2, 14, 2, 512, 512, 64, 1, 0, NONE, BF16, false},  // benchmark shape, b2
      {2, 14, 2, 512, 512, 64, 1, 0, NONE, F16, false},
      {1, 4, 2, 1024, 1024, 128, 1, 256, NONE, BF16, false},
      {1, 2, 2, 1024, 1024, 32, 0, 0, NONE, F16, false},
      {2, 4, 4, 200, 200, 32, 0, 0, PAD, BF16, false},    // d = 32 with a bias (one K/V stage)
      {2, 6, 2, 200, 200, 128, 1, 50, PAD, F16, false},
      {1, 8, 8, 300, 300, 64, 0, 64, RELPOS, F16, false},  // window without causal
      {2, 4, 2, 513, 513, 64, 1, 0, PAD, F16, false},
      {1, 4, 4, 1024, 1024, 64, 0, 0, RELPOS, BF16, false},
  };
  int failures = 0;
  for (const Case& c : cases) {
    if (small && !c.small) continue;
    const bool ok = c.dt == BF16 ? check<__nv_bfloat16>(c) : check<__half>(c);
    failures += !ok;
  }
  if (!small) {
    // Encoder shapes (MiniLM, BGE/E5 base, MPNet) at b128 x 512.
    bench<__nv_bfloat16>({128, 12, 12, 512, 512, 32, 0, 0, NONE, BF16, false}, "b128 h12 s512 d32 full", false);
    bench<__nv_bfloat16>({128, 12, 12, 512, 512, 64, 0, 0, NONE, BF16, false}, "b128 h12 s512 d64 full", false);
    bench<__nv_bfloat16>({128, 12, 12, 512, 512, 64, 0, 0, RELPOS, BF16, false}, "b128 h12 s512 d64 relpos", false);
    bench<__nv_bfloat16>({8, 14, 2, 512, 512, 64, 1, 0, NONE, BF16, false}, "b8 hq14 hkv2 s512 d64 causal");
    bench<__nv_bfloat16>({8, 14, 2, 512, 512, 64, 0, 0, NONE, BF16, false}, "b8 hq14 hkv2 s512 d64 full", false);
    bench<__nv_bfloat16>({4, 32, 8, 2048, 2048, 128, 1, 0, NONE, BF16, false}, "b4 hq32 hkv8 s2048 d128 causal");
  }
  printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
