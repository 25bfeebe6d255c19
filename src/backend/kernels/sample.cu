// Sampling the next token of every row on the device: penalties,
// temperature, top-k, top-p, min-p and the draw, so a decoding step copies
// one u32 per row back to the host instead of a vocabulary-wide row.
//
// A cluster of CL blocks of 1024 threads per row (8 on sm_90 and later,
// one SM each: a single SM walking a 150k-entry row took 0.5 ms, Nsight
// Compute); the blocks share partial results through distributed shared
// memory and cluster barriers. The semantics are those of the host
// path in `inference::sampling` (transformers' order and tie rules), which
// the GPU tier checks token for token:
// - repetition penalty (divide positive logits, multiply negative ones) on
//   the distinct ids of the context, then `logit -= sub` for frequency and
//   presence penalties, then `logit / temperature`; NaN counts as -inf;
// - top-k keeps every logit >= the k-th largest (ties kept);
// - top-p keeps, most likely first with ties by ascending id, each token
//   whose mass ahead of it (among top-k's survivors) is < p;
// - min-p keeps tokens with exp(logit - max) >= min_p;
// - the draw walks the kept tokens in id order, subtracting each one's
//   weight exp(logit - max) from u * total until it falls below one.
// Exponentials in f32, sums in f64, as the host.
//
// The k-th value and the top-p cut are found without a sort: a histogram
// over 256 buckets of logit value (most likely first) finds the bucket that
// holds the cut, then a radix select on the order-preserving integer key of
// each f32 in that bucket (8 bits per pass, 4 passes) finds the exact value.
// Bucketing by value first spreads a flat distribution over the bins (the
// key's top bits put nearly every logit in a few bins, and the atomics on
// them serialise). Every reduction is order-independent (integer
// histograms) or runs in a fixed order, so a row gives the same token every
// run.
//
// meta (u32): [u as f64, one per row (2 u32 each)] [offsets, rows + 1]
// [ids n] [flags n] [subs n as f32 bits], n = offsets[rows]: row r's
// penalty entries are offsets[r]..offsets[r + 1], ids distinct per row;
// flags[j] != 0 applies the repetition penalty to ids[j].
// out[r]: the token, or NO_FINITE (every logit -inf/NaN) or POS_INF (a +inf
// logit: softmax undefined); the host turns these into errors.
#include "common.cuh"

#include <cooperative_groups.h>

#define NT 1024
#define NO_FINITE 0xFFFFFFFEu
#define POS_INF 0xFFFFFFFFu
// Histograms: each group of four warps fills its own 256 bins with
// shared-memory atomics, then the groups' and the cluster's bins are added.
// The weights are integers (counts, or masses in fixed point), so the sums
// do not depend on the order the atomics land in.
#define GROUPS 4
// Elements of the cut's bucket a block gathers for the byte passes.
#define CAP 4096

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CL 8
#define CLUSTER_DIMS __cluster_dims__(CL, 1, 1)
#else
#define CL 1
#define CLUSTER_DIMS
#endif

// Cluster barrier and remote shared memory (a block barrier and the block's
// own memory without clusters).
__device__ __forceinline__ void cl_sync() {
#if CL > 1
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}
template <typename T>
__device__ __forceinline__ T* cl_at(T* p, int rank) {
#if CL > 1
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}
__device__ __forceinline__ int cl_rank() {
#if CL > 1
  return (int)cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

// Larger float, larger key (negative floats have their bits flipped).
__device__ __forceinline__ uint32_t key_of(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float float_of(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

struct RowState {
  unsigned long long hist[GROUPS][256];
  unsigned long long bins[256];   // this block's bins of the pass
  unsigned long long total[256];  // the cluster's
  unsigned long long wsum[8];
  int comp[CAP];
  int ncomp;
  double dsh[33];
  float fpart[2];  // this block's max, min
  int ipart[2];    // count, any +inf
  double dpart;    // a double partial for the cluster
  int tpart;       // an int partial for the cluster
  int last;
  int found;
  int cut_idx;
  unsigned long long cut_run;
};

// Exclusive scan of one double per thread over the block, in a fixed order;
// `total` gets the block's sum.
__device__ double block_scan_d(double v, double* sh, double& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffff, inc, o);
    if (lane >= o) inc += y;
  }
  __syncthreads();
  if (lane == 31) sh[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    double w = sh[lane], wi = w;
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffff, wi, o);
      if (lane >= o) wi += y;
    }
    sh[lane] = wi - w;  // exclusive over warps
    if (lane == 31) sh[32] = wi;
  }
  __syncthreads();
  const double out = sh[warp] + inc - v;
  total = sh[32];
  __syncthreads();
  return out;
}

// Sum of one double per thread over the block (fixed order).
__device__ double block_sum_d(double v, double* sh) {
  double t;
  block_scan_d(v, sh, t);
  return t;
}

// The cluster's sum of one double per block, added in rank order (every
// block gets the same value).
__device__ double cluster_sum_d(RowState& st, double v) {
  if (threadIdx.x == 0) st.dpart = v;
  cl_sync();
  double t = 0.0;
  for (int c = 0; c < CL; c++) t += *cl_at(&st.dpart, c);
  cl_sync();
  return t;
}
__device__ int cluster_sum_i(RowState& st, int v) {
  if (threadIdx.x == 0) st.tpart = v;
  cl_sync();
  int t = 0;
  for (int c = 0; c < CL; c++) t += *cl_at(&st.tpart, c);
  cl_sync();
  return t;
}

// Bucket of a logit by value, 0 the most likely: monotone (a larger logit
// never lands in a later bucket, equal logits share one).
struct Buckets {
  float mx, scale;
  __device__ int of(float l) const { return (int)fminf(255.f, (mx - l) * scale); }
};

// Adds the groups' bins, then the cluster's, into st.total; then finds the
// bin where the running weight (from `start`, bins taken most likely first:
// ascending indices when `ascending`, else descending) reaches `target`:
// st.cut_idx (-1: never) and st.cut_run, the weight before that bin.
__device__ void cluster_bins_cut(RowState& st, bool ascending, unsigned long long start,
                                 unsigned long long target) {
  const int tid = threadIdx.x;
  __syncthreads();
  if (tid < 256) {
    unsigned long long m = 0;
    for (int g = 0; g < GROUPS; g++) m += st.hist[g][tid];
    st.bins[tid] = m;
  }
  if (tid == 0) st.cut_idx = -1;
  cl_sync();
  if (tid < 256) {
    unsigned long long m = 0;
    for (int c = 0; c < CL; c++) m += cl_at(st.bins, c)[tid];
    st.total[tid] = m;
  }
  cl_sync();  // no block clears its bins before every block has read them
  // Inclusive scan over the 256 bins in "most likely first" order.
  const int lane = tid % 32, warp = tid / 32;
  unsigned long long val = 0, inc = 0;
  if (tid < 256) {
    val = st.total[ascending ? tid : 255 - tid];
    inc = val;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(0xffffffff, inc, o);
      if (lane >= o) inc += y;
    }
    if (lane == 31) st.wsum[warp] = inc;
  }
  __syncthreads();
  if (tid < 256) {
    unsigned long long before = start;
    for (int w = 0; w < warp; w++) before += st.wsum[w];
    before += inc - val;
    if (before < target && before + val >= target) {
      st.cut_idx = ascending ? tid : 255 - tid;
      st.cut_run = before;
    }
  }
  __syncthreads();
}

// Finds where the running weight of the finite elements with key >= lo,
// most likely first, reaches `target`: the key K of that element, the
// weight strictly ahead of K's ties and the number of K's ties. MASS weighs
// each element by exp(l - mx) * wscale (fixed point), else by 1. False when
// the total stays under the target (rounding, MASS only).
//
// After the bucket pass each block gathers its slice's elements of the cut
// bucket (usually a few hundred of a 150k vocabulary) into shared memory,
// so the four byte passes and the tie count read only them; a bucket too
// full for CAP (a near-constant row) is scanned in place.
template <bool MASS>
__device__ bool select_cut(RowState& st, const float* s, int a, int b, Buckets bk, uint32_t lo,
                           double wscale, unsigned long long target, uint32_t& key,
                           unsigned long long& ahead, int& ties) {
  const int tid = threadIdx.x, group = (tid / 32) % GROUPS;
  auto weight = [&](float l) -> unsigned long long {
    if (MASS) return __double2ull_rn((double)expf(l - bk.mx) * wscale);
    return 1ull;
  };
  auto clear = [&]() {
    for (int i = tid; i < GROUPS * 256; i += NT) (&st.hist[0][0])[i] = 0ull;
    __syncthreads();
  };
  // Pass 0: buckets of value.
  clear();
  for (int i = a + tid; i < b; i += NT) {
    const float l = s[i];
    if (l > -INFINITY && key_of(l) >= lo) atomicAdd(&st.hist[group][bk.of(l)], weight(l));
  }
  cluster_bins_cut(st, true, 0ull, target);
  const int cb = st.cut_idx;
  if (cb < 0) return false;
  unsigned long long run = st.cut_run;
  if (tid == 0) st.ncomp = 0;
  __syncthreads();
  for (int i = a + tid; i < b; i += NT) {
    const float l = s[i];
    if (l > -INFINITY && key_of(l) >= lo && bk.of(l) == cb) {
      const int at = atomicAdd(&st.ncomp, 1);
      if (at < CAP) st.comp[at] = i;
    }
  }
  __syncthreads();
  const int nc = st.ncomp;
  const bool gathered = nc <= CAP;
  const int end = gathered ? nc : b - a;
  auto element = [&](int j) -> int { return gathered ? st.comp[j] : a + j; };
  // Passes 1-4: the key's bytes within that bucket, high byte first.
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    clear();
    for (int j = tid; j < end; j += NT) {
      const float l = s[element(j)];
      const uint32_t k = key_of(l);
      if (l > -INFINITY && k >= lo && (k & mask) == prefix && bk.of(l) == cb)
        atomicAdd(&st.hist[group][(k >> shift) & 255u], weight(l));
    }
    cluster_bins_cut(st, false, run, target);
    // Always found: the bucket's bins add up to the weight that reached it.
    const int d = max(st.cut_idx, 0);
    run = st.cut_idx < 0 ? run : st.cut_run;
    prefix |= (uint32_t)d << shift;
    mask |= 255u << shift;
  }
  key = prefix;
  ahead = run;
  // K's ties all sit in the cut bucket.
  int t = 0;
  for (int j = tid; j < end; j += NT) {
    const float l = s[element(j)];
    t += l > -INFINITY && key_of(l) == prefix;
  }
  ties = cluster_sum_i(st, (int)block_sum_d((double)t, st.dsh));
  return true;
}

template <typename T>
__device__ void sample_row(const T* logits, const uint32_t* meta, float* scratch, uint32_t* out,
                           int v, int rows, float rep, float temp, int top_k, float top_p,
                           float min_p) {
  __shared__ RowState st;
  const int tid = threadIdx.x, rank = cl_rank();
  const int r = blockIdx.x / CL;
  const T* x = logits + (size_t)r * v;
  float* s = scratch + (size_t)r * v;
  const double u = reinterpret_cast<const double*>(meta)[r];
  const uint32_t* off = meta + 2 * rows;
  const uint32_t n = off[rows];
  const uint32_t* ids = off + rows + 1;
  const uint32_t* flags = ids + n;
  const float* subs = reinterpret_cast<const float*>(flags + n);
  // This block's slice of the row.
  const int per = (v + CL - 1) / CL;
  const int a = min(v, rank * per), b = min(v, a + per);

  for (int i = a + tid; i < b; i += NT) s[i] = to_f(x[i]);
  __syncthreads();
  for (uint32_t j = off[r] + tid; j < off[r + 1]; j += NT) {
    const int id = (int)ids[j];
    if (id < a || id >= b) continue;
    float l = s[id];
    if (flags[j]) l = l < 0.f ? l * rep : l / rep;
    s[id] = l - subs[j];
  }
  __syncthreads();

  // Temperature, NaN -> -inf, the extremes, the count of finite candidates.
  float mx = -INFINITY, mn = INFINITY;
  int cnt = 0, pinf = 0;
  for (int i = a + tid; i < b; i += NT) {
    float l = s[i];
    if (temp != 1.f) l = l / temp;
    if (isnan(l)) l = -INFINITY;
    s[i] = l;
    pinf |= l == INFINITY;
    if (l > -INFINITY) {
      cnt++;
      mx = fmaxf(mx, l);
      mn = fminf(mn, l);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    mn = fminf(mn, __shfl_xor_sync(0xffffffff, mn, o));
    cnt += __shfl_xor_sync(0xffffffff, cnt, o);
    pinf |= __shfl_xor_sync(0xffffffff, pinf, o);
  }
  __shared__ float wmx[32], wmn[32];
  __shared__ int wcnt[32], wpinf[32];
  if (tid % 32 == 0) {
    wmx[tid / 32] = mx;
    wmn[tid / 32] = mn;
    wcnt[tid / 32] = cnt;
    wpinf[tid / 32] = pinf;
  }
  __syncthreads();
  if (tid == 0) {
    float fa = -INFINITY, fb = INFINITY;
    int c = 0, p = 0;
    for (int w = 0; w < NT / 32; w++) {
      fa = fmaxf(fa, wmx[w]);
      fb = fminf(fb, wmn[w]);
      c += wcnt[w];
      p |= wpinf[w];
    }
    st.fpart[0] = fa;
    st.fpart[1] = fb;
    st.ipart[0] = c;
    st.ipart[1] = p;
  }
  cl_sync();
  mx = -INFINITY;
  mn = INFINITY;
  int count = 0;
  pinf = 0;
  for (int c = 0; c < CL; c++) {
    mx = fmaxf(mx, cl_at(st.fpart, c)[0]);
    mn = fminf(mn, cl_at(st.fpart, c)[1]);
    count += cl_at(st.ipart, c)[0];
    pinf |= cl_at(st.ipart, c)[1];
  }
  cl_sync();
  if (pinf || count == 0) {
    if (rank == 0 && tid == 0) out[r] = pinf ? POS_INF : NO_FINITE;
    return;
  }
  const Buckets bk{mx, mx > mn ? 255.f / (mx - mn) : 0.f};

  // Top-k: keep keys >= the k-th largest's.
  uint32_t kkey = 0;
  if (top_k > 0 && top_k < count) {
    unsigned long long ahead;
    int ties;
    select_cut<false>(st, s, a, b, bk, 0u, 0.0, (unsigned long long)top_k, kkey, ahead, ties);
  }

  // Top-p over top-k's survivors: the key of the last kept value and how
  // many of its ties (in id order) stay.
  bool cut = false;
  uint32_t pkey = 0;
  int nkeep = INT_MAX;
  if (top_p < 1.f) {
    double z = 0.0;
    for (int i = a + tid; i < b; i += NT) {
      const float l = s[i];
      if (l > -INFINITY && key_of(l) >= kkey) z += (double)expf(l - mx);
    }
    z = cluster_sum_d(st, block_sum_d(z, st.dsh));
    const double p = (double)top_p;
    // Masses in 2^-60 fixed point: w / z * 2^60 sums to about 2^60.
    const double fixed = 1152921504606846976.0;
    unsigned long long ahead = 0;
    int ties = 0;
    if (select_cut<true>(st, s, a, b, bk, kkey, fixed / z, (unsigned long long)ceil(p * fixed),
                         pkey, ahead, ties)) {
      cut = true;
      // As the host's last_kept: the first tie always, then while the
      // mass ahead is < p (every block computes the same count).
      const double q = (double)expf(float_of(pkey) - mx) / z;
      double m = (double)ahead / fixed;
      int k = 0;
      for (; k < ties; k++) {
        if (k > 0 && m >= p) break;
        m += q;
      }
      // Every tie kept (the usual case): no ranks needed.
      nkeep = k == ties ? INT_MAX : k;
    }
  }

  // Contiguous segments of the slice per thread from here: tie ranks and
  // the draw go in id order.
  const int seg = (b - a + NT - 1) / NT;
  const int lo = min(b, a + tid * seg), hi = min(b, lo + seg);
  int tie0 = 0;
  if (cut && nkeep != INT_MAX) {
    int mine = 0;
    for (int i = lo; i < hi; i++) mine += key_of(s[i]) == pkey;
    double block_ties;
    tie0 = (int)block_scan_d((double)mine, st.dsh, block_ties);
    if (tid == 0) st.tpart = (int)block_ties;
    cl_sync();
    for (int c = 0; c < rank; c++) tie0 += *cl_at(&st.tpart, c);
    cl_sync();
  }
  // The weight of element i when kept, else 0 (rank counts pkey's ties).
  auto kept_weight = [&](int i, int& rk) -> double {
    const float l = s[i];
    if (!(l > -INFINITY)) return 0.0;
    const uint32_t k = key_of(l);
    if (k < kkey) return 0.0;
    if (cut) {
      if (k < pkey) return 0.0;
      if (k == pkey && rk++ >= nkeep) return 0.0;
    }
    const float w = expf(l - mx);
    if (min_p > 0.f && !(w >= min_p)) return 0.0;
    return (double)w;
  };
  double tot = 0.0;
  int last = -1, rk = tie0;
  for (int i = lo; i < hi; i++) {
    const double w = kept_weight(i, rk);
    if (w > 0.0) {
      tot += w;
      last = i;
    }
  }
  double block_tot;
  const double pre_in_block = block_scan_d(tot, st.dsh, block_tot);
  // The block's last kept index.
  for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffff, last, o));
  if (tid == 0) {
    st.last = -1;
    st.found = -1;
  }
  __syncthreads();
  if (tid % 32 == 0) atomicMax(&st.last, last);
  if (tid == 0) st.dpart = block_tot;
  cl_sync();
  double before = 0.0, total = 0.0;
  for (int c = 0; c < CL; c++) {
    const double t = *cl_at(&st.dpart, c);
    if (c < rank) before += t;
    total += t;
  }
  const double target = u * total;
  const double pre = before + pre_in_block;
  if (tot > 0.0 && pre <= target && target < pre + tot) {
    double t = target - pre;
    rk = tie0;
    for (int i = lo; i < hi; i++) {
      const double w = kept_weight(i, rk);
      if (w <= 0.0) continue;
      if (t < w) {
        st.found = i;
        break;
      }
      t -= w;
    }
  }
  cl_sync();
  if (rank == 0 && tid == 0) {
    int found = -1, lastall = -1;
    for (int c = 0; c < CL; c++) {
      found = max(found, *cl_at(&st.found, c));
      lastall = max(lastall, *cl_at(&st.last, c));
    }
    // Rounding can leave the target just past the last weight: take the
    // last kept token, as the host does.
    out[r] = (uint32_t)(found >= 0 ? found : lastall);
  }
  cl_sync();  // no block leaves while rank 0 reads its shared memory
}

#define SAMPLE_OPS(T, SUFFIX)                                                                \
  extern "C" __global__ void CLUSTER_DIMS __launch_bounds__(NT)                             \
      sample_rows_##SUFFIX(const T* logits, const uint32_t* meta, float* scratch,           \
                           uint32_t* out, int v, int rows, float rep, float temp, int top_k, \
                           float top_p, float min_p) {                                       \
    sample_row<T>(logits, meta, scratch, out, v, rows, rep, temp, top_k, top_p, min_p);     \
  }
FOR_EACH_FLOAT(SAMPLE_OPS)
