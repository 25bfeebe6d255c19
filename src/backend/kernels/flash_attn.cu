// FlashAttention-2 forward and backward for bf16 and f16, head dims 32, 64
// and 128, on tensor cores (mma.sync m16n8k16, f32 accumulators; sm_80+,
// built for sm_90).
//
// Why a fused kernel: the composed attention materialises the [b, h, s, t]
// scores in f32 (and, for training, the probabilities and their gradient),
// which dominates memory and time at long sequences. Here scores live in
// registers one [64 x BN] tile at a time with an online softmax; the backward
// recomputes them from the saved log-sum-exp instead of storing them.
//
// Layouts (element offsets; contiguous except the forward's q, k, v, which
// take strides per batch, head and row, see `Strides`):
//   q, o, dout, dq : [b, hq, s, d]      k, v, dk, dv : [b, hkv, t, d]
//   lse, dsum      : [b, hq, s] f32     bias         : f32, element strides
//   (b_stride, h_stride, row_stride) over [b, hq, s, t], last dim contiguous,
//   stride 0 for broadcast dims; null pointer for no bias.
// Query head h reads key/value head h / (hq / hkv) (grouped-query attention).
// Query i sits at absolute position i + (t - s); it sees key j when
//   (!causal || j <= i + t - s) && (window == 0 || (i + t - s) - j < window).
// A row that sees no key at all gives O = 0, lse = +inf (so the backward's
// recomputed probabilities are 0). With a bias, scores (in log2 units) are
// floored at SCORE_FLOOR = -16384 (a natural-log bias of about -11357): a
// padding mask of f32::MIN then gives every key of an all-padding row the
// same score, hence the uniform weights the composed path gives it, and the
// row's lse stays small enough that lse = max + log2(sum) keeps its
// log2(sum) (at f32::MIN it would be absorbed and the backward's recomputed
// probabilities would be 1 instead of 1/n). f32::MIN * log2(e) overflows to
// -inf, which the floor also absorbs; masked keys of other rows still get
// weight exp2(-16384 - max) = 0.
//
// Packed (variable-length) forward, as text-embeddings-inference batches
// encoder inputs: with `seqs` non-null, q, k, v are [1, h, tokens, d] holding
// `nseq` sequences end to end (s = t = tokens) and each attends only to
// itself. `seqs` holds nseq + 1 token offsets, then nseq + 1 tile offsets
// (prefix sums of ceil(len / 64)); block x of the grid (total tiles, hq, 1)
// takes the tile its sequence's offsets give (a binary search). Masks and
// bias apply within the sequence (bias indexed by its local row and column);
// O is written as [tokens, hq, d] (o_bshd) and lse as [hq, tokens]. No
// padding is read or computed.
//
// Forward, one block per (64 query rows, head, batch), 4 warps of 16 rows:
// Q fragments stay in registers, K/V tiles stream through shared memory with
// cp.async (at d = 32 double-buffered; otherwise the next K tile loads
// during P·V, the next V tile during Q·Kᵀ),
// P never leaves registers (the m16n8k16 accumulator layout of S is the A
// operand layout of P·V). Writes O (input dtype) and lse (natural log).
//
// Backward (FA2): flash_attn_bwd_dot_* computes dsum = rowsum(dO∘O);
// flash_attn_bwd_* runs one block per (64 keys, query head, batch), each warp
// owning 16 keys, and loops over query tiles (double-buffered): Sᵀ = K Qᵀ and
// dPᵀ = V dOᵀ in registers, Pᵀ = exp(Sᵀ − lse), dSᵀ = Pᵀ∘(dPᵀ − dsum),
// dV += Pᵀ dO and dK += dSᵀ Q in registers, dQ += dS K through shared memory
// and f32 atomics into dq_acc. dK/dV go straight to the output dtype when
// hq == hkv and are atomically summed into f32 buffers for GQA;
// flash_attn_convert_* turns the f32 buffers into the output dtype.
#include "common.cuh"

namespace flash {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float SCORE_FLOOR = -16384.f;

// 2^x in one MUFU.EX2, denormal results flushed to zero: exp2f without
// fast math adds a range test and two predicated multiplies per call to
// keep denormals, and the ALU pipe those tests use was the forward's
// busiest (46% at d = 32, Nsight Compute, H200). Softmax weights below
// 2^-126 are zero either way once summed with the row's maximum's 1.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Shared-memory rows are padded by 8 elements (16 bytes) so that the eight
// rows one ldmatrix phase reads fall in distinct banks for d = 32, 64, 128.
template <int D> struct Pad { static constexpr int LD = D + 8; };

// Element strides of a [b, h, rows, D] input per batch, head and row (the
// head dim contiguous; every stride a multiple of 8 so rows stay 16-byte
// aligned): q, k and v may be views, e.g. of one fused q/k/v projection
// [b, s, 3, h, D], read in place instead of split into copies.
// The head and row strides are 32-bit (the host checks every offset they
// reach fits): 64-bit ones raised the d = 32 forward's spills.
struct Strides {
  long long b;
  int h, r;
};

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Two 1.0s packed as an mma operand register.
template <typename T> __device__ __forceinline__ constexpr uint32_t ones2();
template <> __device__ __forceinline__ constexpr uint32_t ones2<__nv_bfloat16>() { return 0x3f803f80u; }
template <> __device__ __forceinline__ constexpr uint32_t ones2<__half>() { return 0x3c003c00u; }

template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                   uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16-byte async copy; zero-fills the destination when !ok (rows past the end).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t dynamic_smem_size() {
  uint32_t v;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(v));
  return v;
}

// ROWS x D elements from global (row stride D, or `rs` elements) into shared
// (row stride LD), rows at or past `valid` zero-filled, in 16-byte chunks.
// `src` must point at a valid row 0. `tid` < NT: each thread copies the same
// ROWS * CH / NT chunks of every tile, so the trip count is a constant and
// the per-thread row/column offsets are loop-invariant (a `c = tid; c < ROWS
// * CH; c += NT` loop compiled into a generic loop with a remainder: about
// 55 instructions per tile and operand at d = 32, a quarter of the forward's
// loop).
template <typename T, int ROWS, int D, int NT, int LD = Pad<D>::LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int valid, int tid, int rs = D) {
  constexpr int EL = 16 / (int)sizeof(T), CH = D / EL;
  static_assert(NT % CH == 0 && (ROWS * CH) % NT == 0, "whole rows per pass, whole passes per tile");
  constexpr int PASSES = ROWS * CH / NT, RSTEP = NT / CH;
  const int r0 = tid / CH, col = (tid % CH) * EL;
#pragma unroll
  for (int i = 0; i < PASSES; ++i) {
    const int r = r0 + i * RSTEP;
    const bool ok = r < valid;
    cp_async16(dst + r * LD + col, src + (ok ? r * rs + col : 0), ok);
  }
}

// Whether key j is visible from the query at absolute position qpos.
__device__ __forceinline__ bool visible(int j, int qpos, int t, int causal, int window) {
  return j < t && (!causal || j <= qpos) && (window <= 0 || qpos - j < window);
}

// ---------------------------------------------------------------- forward --

// (Tiles of 128 keys were tried: 3% faster at d = 32 without a bias, 16%
// slower for MPNet's d = 64 with its position bias; H200, 2026-11-28.)
// K/V tile buffers: two for the unbiased forward at d = 32 (the next tile's
// K and V load during the whole of this one, one barrier per tile): 3.6%
// faster at MiniLM's b128 x 512 (0.243 vs 0.252 ms a layer). Otherwise one
// (the next K loads during P·V, the next V during Q·Kᵀ): two were 2% slower
// at d = 64, 10% with MPNet's bias, and took the biased d = 32 entry from
// 128 to 161 registers (flash_check, H200, 2026-11-29). SMEM is sized for
// MAX_STAGES, so both entries of a head dim launch with the same bytes.
template <int D, bool HAS_BIAS = false> struct FwdCfg {
  static constexpr int WARPS = 4;
  static constexpr int BM = 16 * WARPS;
  static constexpr int BN = 64;
  static constexpr int MAX_STAGES = D == 32 ? 2 : 1;
  static constexpr int STAGES = HAS_BIAS ? 1 : MAX_STAGES;
  static constexpr int SMEM = (BM + 2 * MAX_STAGES * BN) * Pad<D>::LD * 2;
};

// Where a forward block works: its first query row `m0` and batch `bi`;
// its sequence's query and key counts `s`, `t` (a packed block's own
// sequence); the rows (of D elements) where the sequence starts in lse and a
// [b, hq, s, D] output, its first token in a [tokens, hq, D] output, and the
// element offsets of its first query and key rows. With t_dev, k and v hold
// t rows per head (a preallocated cache) of which the first *t_dev are keys:
// the count lives on the device so a captured decode step replays at every
// length. Queries sit `off` = t - s positions after key 0; the tile's
// queries see keys [n_begin, n_hi) at most (n_begin rounded down to a BN
// tile).
struct FwdBlock {
  int m0, bi, s, t, off, n_begin, n_hi;
  size_t q_row0, o_tok0;
  long long q_el0, kv_el0;
};

template <int BM, int BN, bool PACKED>
__device__ __forceinline__ FwdBlock fwd_block(int h, int hk, int hq, int s, int t,
                                              const unsigned int* t_dev,
                                              const unsigned int* seqs, int nseq,
                                              const Strides& qst, const Strides& kvst,
                                              int causal, int window) {
  FwdBlock f;
  f.s = s;
  f.t = t_dev != nullptr ? (int)*t_dev : t;
  if constexpr (!PACKED) {
    // Heaviest (latest, under a causal mask) query tiles first.
    f.m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    f.bi = blockIdx.z;
    f.q_row0 = ((size_t)f.bi * hq + h) * s;
    f.o_tok0 = (size_t)f.bi * s;
    f.q_el0 = f.bi * qst.b + h * qst.h;
    f.kv_el0 = f.bi * kvst.b + hk * kvst.h;
  } else {
    // Packed sequences (see the header): find the one this tile is in.
    const unsigned int* tiles = seqs + nseq + 1;
    int lo = 0, hi = nseq - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (tiles[mid] <= blockIdx.x) lo = mid; else hi = mid - 1;
    }
    const int start = (int)seqs[lo];
    f.s = f.t = (int)(seqs[lo + 1] - seqs[lo]);
    f.m0 = (int)(blockIdx.x - tiles[lo]) * BM;
    f.bi = 0;
    f.q_row0 = (size_t)h * s + start;
    f.o_tok0 = start;
    f.q_el0 = h * qst.h + start * qst.r;
    f.kv_el0 = hk * kvst.h + start * kvst.r;
  }
  f.off = f.t - f.s;
  int n_lo = 0;
  f.n_hi = f.t;
  if (causal) f.n_hi = min(f.t, f.m0 + BM + f.off);
  if (window > 0) n_lo = max(0, f.m0 + f.off - window + 1);
  f.n_begin = (n_lo / BN) * BN;
  return f;
}

// Whether the key tile at n0 needs the per-score visibility test for the
// query tile at m0: it crosses the end of the keys, the causal diagonal or
// the window edge.
template <int BM, int BN>
__device__ __forceinline__ bool tile_needs_mask(int n0, int m0, int off, int t, int causal,
                                                int window) {
  return n0 + BN > t || (causal && n0 + BN - 1 > m0 + off) ||
         (window > 0 && n0 < m0 + BM - 1 + off - window + 1);
}

// How scores are scaled: unbiased scores stay unscaled until the exponent
// (one FMA per score, `in_exp`); a bias is added in log2 units, so biased
// scores are scaled first (`first`), and so is everything under a scale
// that is not positive, which would turn -inf into NaN in the exponent.
struct ScoreScale {
  float log2, in_exp;
  bool first;
};
template <bool HAS_BIAS> __device__ __forceinline__ ScoreScale score_scale(float scale) {
  ScoreScale c;
  c.log2 = scale * LOG2E;
  c.first = HAS_BIAS || !(c.log2 > 0.f);
  c.in_exp = c.first ? 1.f : c.log2;
  return c;
}

// One score of the general (masked or biased) path in log2 units: scaled
// if `sc.first`, the bias added and floored, -inf where the key is hidden.
template <bool HAS_BIAS>
__device__ __forceinline__ float masked_score(float x, int row, int col, const ScoreScale& sc,
                                              const float* biasb, long long bias_rs, int s,
                                              int t, bool need_mask, int off, int causal,
                                              int window) {
  if (sc.first) x *= sc.log2;
  if (HAS_BIAS && row < s && col < t)
    x = fmaxf(x + biasb[(long long)row * bias_rs + col] * LOG2E, SCORE_FLOOR);
  if (need_mask && !visible(col, row + off, t, causal, window)) x = -INFINITY;
  return x;
}

template <typename T, int D, bool HAS_BIAS, bool PACKED = false>
__device__ __forceinline__ void fwd(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, const float* __restrict__ bias,
                                    T* __restrict__ o, float* __restrict__ lse, int hq, int hkv,
                                    int s, int t, float scale, int causal, int window,
                                    long long bias_bs, long long bias_hs, long long bias_rs,
                                    int o_bshd, const unsigned int* t_dev,
                                    const unsigned int* seqs, int nseq, Strides qst,
                                    Strides kvst) {
  using C = FwdCfg<D, HAS_BIAS>;
  constexpr int BM = C::BM, BN = C::BN, NT = 32 * C::WARPS, LD = Pad<D>::LD;
  extern __shared__ __align__(16) unsigned char smem[];
  if (dynamic_smem_size() < (uint32_t)C::SMEM) __trap();
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * LD;
  T* sV = sK + BN * LD;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int h = blockIdx.y, hk = h / (hq / hkv);
  const FwdBlock fb =
      fwd_block<BM, BN, PACKED>(h, hk, hq, s, t, t_dev, seqs, nseq, qst, kvst, causal, window);
  s = fb.s;
  t = fb.t;
  const int m0 = fb.m0, bi = fb.bi, off = fb.off, n_begin = fb.n_begin, n_hi = fb.n_hi;
  const size_t q_row0 = fb.q_row0, o_tok0 = fb.o_tok0;
  const long long q_el0 = fb.q_el0, kv_el0 = fb.kv_el0;
  const T* qb = q + q_el0 + m0 * qst.r;
  const T* kb = k + kv_el0;
  const T* vb = v + kv_el0;
  const int krs = kvst.r;
  const float* biasb = HAS_BIAS ? bias + bi * bias_bs + h * bias_hs : nullptr;
  const ScoreScale sc = score_scale<HAS_BIAS>(scale);
  // Row sums of P, accumulated by the tensor cores: P (as packed for P·V)
  // times a k16 x n8 block of ones gives every column the sum of its row's
  // 16 weights, already reduced over the quad. That replaces 32 FADDs per
  // tile and thread with 4 mma.sync (the fast path was issue-bound: about
  // 350 instructions per warp and key tile at d = 32), and normalizes by the
  // sum of the very weights P·V used (bf16/f16-rounded).
  float m_r[2] = {-INFINITY, -INFINITY}, lacc[4] = {0.f, 0.f, 0.f, 0.f};
  float oacc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.f;
  uint32_t qf[D / 16][4];

  constexpr bool TWO = C::STAGES == 2;
  load_tile<T, BM, D, NT>(sQ, qb, s - m0, tid, qst.r);
  if (n_begin < n_hi) load_tile<T, BN, D, NT>(sK, kb + n_begin * krs, t - n_begin, tid, krs);
  if (!TWO) cp_async_commit();
  if (n_begin < n_hi) load_tile<T, BN, D, NT>(sV, vb + n_begin * krs, t - n_begin, tid, krs);
  cp_async_commit();

  // With two stages, stage `stage` holds this tile's K then V (sK, sV for
  // stage 0) and the other stage takes the next tile's.
  int stage = 0;
  for (int n0 = n_begin; n0 < n_hi; n0 += BN, stage ^= 1) {
    const T* cK = sK + (TWO ? stage * 2 * BN * LD : 0);
    const T* cV = cK + BN * LD;
    if constexpr (TWO) {
      cp_async_wait<0>();
      __syncthreads();  // this tile is in; every warp is done with the other stage
      if (n0 + BN < n_hi) {
        T* nK = sK + (stage ^ 1) * 2 * BN * LD;
        load_tile<T, BN, D, NT>(nK, kb + (n0 + BN) * krs, t - n0 - BN, tid, krs);
        load_tile<T, BN, D, NT>(nK + BN * LD, vb + (n0 + BN) * krs, t - n0 - BN, tid, krs);
      }
      cp_async_commit();
    } else {
      cp_async_wait<1>();
      __syncthreads();
    }
    if (n0 == n_begin) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldsm_x4(qf[kk], sQ + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
    }
    // S = Q Kᵀ for this warp's 16 rows and the tile's BN keys.
    float sacc[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t b[4];
        ldsm_x4(b, cK + (nn * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
        mma<T>(sacc[2 * nn], qf[kk], b[0], b[1]);
        mma<T>(sacc[2 * nn + 1], qf[kk], b[2], b[3]);
      }
    }
    // Scores in log2 units, bias added, invisible keys at -inf. Only tiles
    // that cross the end of the keys, the causal diagonal or the window edge
    // need the per-element test. Without a bias the scores stay unscaled
    // here and the scale joins the exponent's subtraction as one FMA
    // (`sc.first` false); a bias is added in log2 units, so it scales first.
    const bool need_mask = tile_needs_mask<BM, BN>(n0, m0, off, t, causal, window);
    if (!sc.first && need_mask && !causal && window <= 0) {
      // Bidirectional without a window (encoders: the last tile of every
      // packed sequence): only keys past the end are masked, one compare
      // per score instead of the general test (about 500 instructions).
      const int lim = t - n0 - 2 * tq;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (nt * 8 + (e & 1) >= lim) sacc[nt][e] = -INFINITY;
    } else if (sc.first || need_mask) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + warp * 16 + g + (e >> 1) * 8;
          const int col = n0 + nt * 8 + 2 * tq + (e & 1);
          sacc[nt][e] = masked_score<HAS_BIAS>(sacc[nt][e], row, col, sc, biasb, bias_rs, s, t,
                                               need_mask, off, causal, window);
        }
      }
    }
    // Online softmax: each row lives in the 4 lanes of a quad.
    float mu[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
      if constexpr (D >= 64) {
        // A tree instead of a chain of 2 * BN / 8 dependent FMNMX: 0.5% at
        // d = 64, 1.5% at d = 128; at d = 32 3.5% slower (more registers
        // live; flash_check, H200, 2026-11-29).
        float tm[BN / 8];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) tm[nt] = fmaxf(sacc[nt][2 * r], sacc[nt][2 * r + 1]);
#pragma unroll
        for (int w = BN / 16; w > 0; w /= 2)
#pragma unroll
          for (int i = 0; i < w; ++i) tm[i] = fmaxf(tm[i], tm[i + w]);
        mx = tm[0];
      } else {
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(sacc[nt][2 * r], sacc[nt][2 * r + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float m_new = fmaxf(m_r[r], mx * sc.in_exp);
      // A row with nothing visible yet keeps max -inf; subtract 0 instead so
      // exp2 gives 0 rather than NaN.
      mu[r] = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = ex2(m_r[r] - mu[r]);
      m_r[r] = m_new;
      lacc[2 * r] *= alpha;
      lacc[2 * r + 1] *= alpha;
#pragma unroll
      for (int nn = 0; nn < D / 8; ++nn) {
        oacc[nn][2 * r] *= alpha;
        oacc[nn][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sacc[nt][e] = ex2(fmaf(sacc[nt][e], sc.in_exp, -mu[e >> 1]));
      }
    }
    if constexpr (!TWO) {
      cp_async_wait<0>();
      __syncthreads();  // V ready; every warp is done with this K tile
      if (n0 + BN < n_hi) load_tile<T, BN, D, NT>(sK, kb + (n0 + BN) * krs, t - n0 - BN, tid, krs);
      cp_async_commit();
    }
    // O += P V, P straight from the S accumulators.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(sacc[2 * kk][0], sacc[2 * kk][1]),
                             pack2<T>(sacc[2 * kk][2], sacc[2 * kk][3]),
                             pack2<T>(sacc[2 * kk + 1][0], sacc[2 * kk + 1][1]),
                             pack2<T>(sacc[2 * kk + 1][2], sacc[2 * kk + 1][3])};
      mma<T>(lacc, a, ones2<T>(), ones2<T>());
#pragma unroll
      for (int nn = 0; nn < D / 16; ++nn) {
        uint32_t b[4];
        ldsm_x4_t(b, cV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nn * 16 + (lane >> 4) * 8);
        mma<T>(oacc[2 * nn], a, b[0], b[1]);
        mma<T>(oacc[2 * nn + 1], a, b[2], b[3]);
      }
    }
    if constexpr (!TWO) {
      __syncthreads();  // every warp is done with this V tile
      if (n0 + BN < n_hi) load_tile<T, BN, D, NT>(sV, vb + (n0 + BN) * krs, t - n0 - BN, tid, krs);
      cp_async_commit();
    }
  }

  float inv[2], l_r[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_r[r] = lacc[2 * r];
    inv[r] = l_r[r] > 0.f ? 1.f / l_r[r] : 0.f;
  }
  // Stage this warp's rows of O in sQ (free since the first tile) for
  // 16-byte coalesced stores. With no key tile at all the Q load may still be
  // in flight: wait for it first.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int nn = 0; nn < D / 8; ++nn)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(sQ + (warp * 16 + g + 8 * r) * LD + nn * 8 + 2 * tq) =
          pack2<T>(oacc[nn][2 * r] * inv[r], oacc[nn][2 * r + 1] * inv[r]);
  __syncwarp();
  // O as [b, hq, s, D], or with o_bshd as [b, s, hq, D] (heads merged for
  // the output projection without a transposing copy).
  const size_t o_row = o_bshd ? (size_t)hq * D : D;
  T* ob = o_bshd ? o + ((o_tok0 + m0 + warp * 16) * hq + h) * D
                 : o + (q_row0 + m0 + warp * 16) * D;
#pragma unroll
  for (int c = lane; c < 16 * D / 8; c += 32) {
    const int r = c / (D / 8), col = (c % (D / 8)) * 8;
    if (m0 + warp * 16 + r < s)
      *reinterpret_cast<uint4*>(ob + (size_t)r * o_row + col) =
          *reinterpret_cast<const uint4*>(sQ + (warp * 16 + r) * LD + col);
  }
  if (tq == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp * 16 + g + 8 * r;
      if (row < s) lse[q_row0 + row] = l_r[r] > 0.f ? (m_r[r] + log2f(l_r[r])) * LN2 : INFINITY;
    }
  }
}

// ------------------------------------------------------------ f32 forward --

// f32 (f32 encoders: PyTorch's f32 attention also runs plain FMAs, and the
// composed path wrote, scaled, softmaxed and read back the [b, h, s, t]
// scores: the scale alone 9.0 ms and the softmax 7.0 ms of MiniLM's 60.4 ms
// of GPU time at b128 x 512 on an H200): the blocks, masks, bias, packing
// and outputs of the half-precision forward above, with IEEE f32 FMAs
// instead of tensor cores. A block's 128 threads are 16 row groups x 8 key
// groups: thread (rg, cg) owns query rows rg + 16i (i < 4), for S = Q Kᵀ
// keys cg + 8j (j < 8), for O columns 4cg + 32c (c < D / 32, a float4 each).
// Q, K and V tiles sit in shared memory row-major with rows padded by 4
// floats, so the float4 reads of a warp's rows (8 keys or 4 query rows,
// consecutive) fall in distinct 16-byte bank groups; a float4 of K feeds 16
// FMAs (4 rows), one of Q 32 (8 keys). A row's 64 scores span the 8 lanes
// of its row group (max by shuffles; the sum stays per lane until the end).
// P goes through shared memory for P·V (rows padded by 8 floats: the scalar
// stores of a warp's 4 row groups and 8 key groups hit 32 banks).
template <int D> struct FwdCfgF32 {
  static constexpr int BM = 64, BN = 64, NT = 128, LD = D + 4, LDP = BN + 8;
  static constexpr int SMEM = ((BM + 2 * BN) * LD + BM * LDP) * 4;
};

template <int D, bool HAS_BIAS, bool PACKED>
__device__ __forceinline__ void fwd_f32(const float* __restrict__ q, const float* __restrict__ k,
                                        const float* __restrict__ v,
                                        const float* __restrict__ bias, float* __restrict__ o,
                                        float* __restrict__ lse, int hq, int hkv, int s, int t,
                                        float scale, int causal, int window, long long bias_bs,
                                        long long bias_hs, long long bias_rs, int o_bshd,
                                        const unsigned int* t_dev, const unsigned int* seqs,
                                        int nseq, Strides qst, Strides kvst) {
  using C = FwdCfgF32<D>;
  constexpr int BM = C::BM, BN = C::BN, NT = C::NT, LD = C::LD, LDP = C::LDP, OC = D / 32;
  static_assert(D % 32 == 0 && NT == 16 * 8 && BM == 4 * 16 && BN == 8 * 8, "thread layout");
  extern __shared__ __align__(16) unsigned char smem[];
  if (dynamic_smem_size() < (uint32_t)C::SMEM) __trap();
  float* sQ = reinterpret_cast<float*>(smem);
  float* sK = sQ + BM * LD;
  float* sV = sK + BN * LD;
  float* sP = sV + BN * LD;

  const int tid = threadIdx.x, rg = tid / 8, cg = tid % 8;
  const int h = blockIdx.y, hk = h / (hq / hkv);
  const FwdBlock fb =
      fwd_block<BM, BN, PACKED>(h, hk, hq, s, t, t_dev, seqs, nseq, qst, kvst, causal, window);
  s = fb.s;
  t = fb.t;
  const int m0 = fb.m0, off = fb.off, n_begin = fb.n_begin, n_hi = fb.n_hi;
  const float* qb = q + fb.q_el0 + (long long)m0 * qst.r;
  const float* kb = k + fb.kv_el0;
  const float* vb = v + fb.kv_el0;
  const int krs = kvst.r;
  const float* biasb = HAS_BIAS ? bias + fb.bi * bias_bs + h * bias_hs : nullptr;
  const ScoreScale sc = score_scale<HAS_BIAS>(scale);

  float m_r[4], l_r[4], oacc[4][OC][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m_r[i] = -INFINITY;
    l_r[i] = 0.f;
#pragma unroll
    for (int c = 0; c < OC; ++c) oacc[i][c][0] = oacc[i][c][1] = oacc[i][c][2] = oacc[i][c][3] = 0.f;
  }

  // The next K tile loads during P·V, the next V tile during Q·Kᵀ.
  load_tile<float, BM, D, NT, LD>(sQ, qb, s - m0, tid, qst.r);
  if (n_begin < n_hi) load_tile<float, BN, D, NT, LD>(sK, kb + (long long)n_begin * krs, t - n_begin, tid, krs);
  cp_async_commit();
  if (n_begin < n_hi) load_tile<float, BN, D, NT, LD>(sV, vb + (long long)n_begin * krs, t - n_begin, tid, krs);
  cp_async_commit();

  for (int n0 = n_begin; n0 < n_hi; n0 += BN) {
    cp_async_wait<1>();
    __syncthreads();  // Q and this K tile are in
    float sacc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) sacc[i][j] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D; kk += 4) {
      float4 qv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) qv[i] = *reinterpret_cast<const float4*>(sQ + (rg + 16 * i) * LD + kk);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float4 kv = *reinterpret_cast<const float4*>(sK + (cg + 8 * j) * LD + kk);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          sacc[i][j] = fmaf(qv[i].x, kv.x, sacc[i][j]);
          sacc[i][j] = fmaf(qv[i].y, kv.y, sacc[i][j]);
          sacc[i][j] = fmaf(qv[i].z, kv.z, sacc[i][j]);
          sacc[i][j] = fmaf(qv[i].w, kv.w, sacc[i][j]);
        }
      }
    }
    // Scores in log2 units, bias added, invisible keys at -inf (as above).
    const bool need_mask = tile_needs_mask<BM, BN>(n0, m0, off, t, causal, window);
    if (sc.first || need_mask) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
          sacc[i][j] = masked_score<HAS_BIAS>(sacc[i][j], m0 + rg + 16 * i, n0 + cg + 8 * j, sc,
                                              biasb, bias_rs, s, t, need_mask, off, causal, window);
    }
    // Online softmax; P to shared memory.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float mx = sacc[i][0];
#pragma unroll
      for (int j = 1; j < 8; ++j) mx = fmaxf(mx, sacc[i][j]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 4));
      const float m_new = fmaxf(m_r[i], mx * sc.in_exp);
      const float mu = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = ex2(m_r[i] - mu);
      m_r[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float p = ex2(fmaf(sacc[i][j], sc.in_exp, -mu));
        sum += p;
        sP[(rg + 16 * i) * LDP + cg + 8 * j] = p;
      }
      l_r[i] = fmaf(l_r[i], alpha, sum);
#pragma unroll
      for (int c = 0; c < OC; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) oacc[i][c][e] *= alpha;
    }
    cp_async_wait<0>();
    __syncthreads();  // V is in, P is written, every thread is done with K
    if (n0 + BN < n_hi)
      load_tile<float, BN, D, NT, LD>(sK, kb + (long long)(n0 + BN) * krs, t - n0 - BN, tid, krs);
    cp_async_commit();
    // O += P V.
#pragma unroll 4
    for (int kk = 0; kk < BN; kk += 4) {
      float4 pv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) pv[i] = *reinterpret_cast<const float4*>(sP + (rg + 16 * i) * LDP + kk);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int c = 0; c < OC; ++c) {
          const float4 vv = *reinterpret_cast<const float4*>(sV + (kk + u) * LD + 4 * cg + 32 * c);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float p = u == 0 ? pv[i].x : u == 1 ? pv[i].y : u == 2 ? pv[i].z : pv[i].w;
            oacc[i][c][0] = fmaf(p, vv.x, oacc[i][c][0]);
            oacc[i][c][1] = fmaf(p, vv.y, oacc[i][c][1]);
            oacc[i][c][2] = fmaf(p, vv.z, oacc[i][c][2]);
            oacc[i][c][3] = fmaf(p, vv.w, oacc[i][c][3]);
          }
        }
      }
    }
    __syncthreads();  // every thread is done with V and P
    if (n0 + BN < n_hi)
      load_tile<float, BN, D, NT, LD>(sV, vb + (long long)(n0 + BN) * krs, t - n0 - BN, tid, krs);
    cp_async_commit();
  }
  // With no key tile at all the Q load may still be in flight.
  cp_async_wait<0>();

  // Row sums over the row group's lanes; O (as [b, hq, s, D], or with
  // o_bshd [b, s, hq, D]) and lse (natural log, +inf for a row that saw no key).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float l = l_r[i];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    l += __shfl_xor_sync(0xffffffff, l, 4);
    const int row = m0 + rg + 16 * i;
    if (row >= s) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* orow = o_bshd ? o + ((fb.o_tok0 + row) * hq + h) * D : o + (fb.q_row0 + row) * D;
#pragma unroll
    for (int c = 0; c < OC; ++c)
      *reinterpret_cast<float4*>(orow + 4 * cg + 32 * c) =
          make_float4(oacc[i][c][0] * inv, oacc[i][c][1] * inv, oacc[i][c][2] * inv, oacc[i][c][3] * inv);
    if (cg == 0) lse[fb.q_row0 + row] = l > 0.f ? (m_r[i] + log2f(l)) * LN2 : INFINITY;
  }
}

// --------------------------------------------------------------- backward --

// dsum[row] = Σ_d dO[row, d]·O[row, d], D/8 threads per row (16 bytes each).
template <typename T, int D>
__device__ __forceinline__ void bwd_dot(const T* __restrict__ o, const T* __restrict__ dout,
                                        float* __restrict__ dsum, size_t rows) {
  constexpr int G = D / 8;
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t row = idx / G;
  const int part = idx % G;
  float acc = 0.f;
  if (row < rows) {
    const uint4 a = *reinterpret_cast<const uint4*>(o + row * D + part * 8);
    const uint4 b = *reinterpret_cast<const uint4*>(dout + row * D + part * 8);
    const T* ae = reinterpret_cast<const T*>(&a);
    const T* be = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += to_f(ae[i]) * to_f(be[i]);
  }
  // Groups of G lanes are aligned within the warp; every lane takes part.
#pragma unroll
  for (int w = G / 2; w > 0; w >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, w);
  if (part == 0 && row < rows) dsum[row] = acc;
}

template <int D> struct BwdCfg {
  static constexpr int WARPS = 4;
  static constexpr int BN = 16 * WARPS;  // keys per block, 16 per warp
  // Query rows per step: 32 at d = 128 keeps the four [16 x BM] and two
  // [16 x d] accumulators within the register file.
  static constexpr int BM = D <= 64 ? 64 : 32;
  // K/V A-fragments kept in registers across query tiles (d <= 64 only).
  static constexpr bool KV_REGS = D <= 64;
  static constexpr int LDS = BM + 8;
  static constexpr int SMEM = (2 * BN + 4 * BM) * Pad<D>::LD * 2 + BN * LDS * 2 + 4 * BM * 4;
};

template <typename T, int D, bool HAS_BIAS>
__device__ __forceinline__ void bwd(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, const T* __restrict__ dout,
                                    const float* __restrict__ lse, const float* __restrict__ dsum,
                                    const float* __restrict__ bias, float* __restrict__ dq_acc,
                                    T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ dk_acc,
                                    float* __restrict__ dv_acc, int hq, int hkv, int s, int t,
                                    float scale, int causal, int window, long long bias_bs,
                                    long long bias_hs, long long bias_rs) {
  using C = BwdCfg<D>;
  constexpr int BN = C::BN, BM = C::BM, NT = 32 * C::WARPS, LD = Pad<D>::LD, LDS = C::LDS;
  extern __shared__ __align__(16) unsigned char smem[];
  if (dynamic_smem_size() < (uint32_t)C::SMEM) __trap();
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + BN * LD;
  T* sQ = sV + BN * LD;     // [2][BM * LD]
  T* sdO = sQ + 2 * BM * LD;  // [2][BM * LD]
  T* sdS = sdO + 2 * BM * LD;  // [BN][LDS]: dSᵀ, keys by queries
  float* sL = reinterpret_cast<float*>(sdS + BN * LDS);  // [2][BM]: lse in log2 units
  float* sDs = sL + 2 * BM;                               // [2][BM]: dsum

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int n0 = blockIdx.x * BN;  // low key tiles (most work under a causal mask) first
  const int h = blockIdx.y, bi = blockIdx.z, rep = hq / hkv, hk = h / rep;
  const size_t bh = (size_t)bi * hq + h;
  const size_t bhk = (size_t)bi * hkv + hk;
  const T* qb = q + bh * s * D;
  const T* dob = dout + bh * s * D;
  const float* lseb = lse + bh * s;
  const float* dsb = dsum + bh * s;
  float* dqb = dq_acc + bh * s * D;
  const float* biasb = HAS_BIAS ? bias + bi * bias_bs + h * bias_hs : nullptr;
  const int off = t - s;

  // Query rows that can see any key of this tile.
  int m_lo = 0, m_hi = s;
  if (causal) m_lo = max(0, n0 - off);
  if (window > 0) m_hi = min(s, n0 + BN - 1 + window - off);
  const int m_begin = (m_lo / BM) * BM;

  auto load_q = [&](int m, int st) {
    load_tile<T, BM, D, NT>(sQ + st * BM * LD, qb + (size_t)m * D, s - m, tid);
    load_tile<T, BM, D, NT>(sdO + st * BM * LD, dob + (size_t)m * D, s - m, tid);
    for (int i = tid; i < BM; i += NT) {
      const int row = m + i;
      // Rows past the end get lse = +inf, so their probabilities are 0.
      sL[st * BM + i] = row < s ? lseb[row] * LOG2E : INFINITY;
      sDs[st * BM + i] = row < s ? dsb[row] : 0.f;
    }
  };

  load_tile<T, BN, D, NT>(sK, k + (bhk * t + n0) * D, t - n0, tid);
  load_tile<T, BN, D, NT>(sV, v + (bhk * t + n0) * D, t - n0, tid);
  if (m_begin < m_hi) load_q(m_begin, 0);
  cp_async_commit();

  const float scale_log2 = scale * LOG2E;
  float dkacc[D / 8][4], dvacc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dkacc[i][e] = dvacc[i][e] = 0.f;
  uint32_t kf[C::KV_REGS ? D / 16 : 1][4], vf[C::KV_REGS ? D / 16 : 1][4];

  // dQ tiling: BM/16 row groups, the warps of a row group split d.
  constexpr int RG = BM / 16, DSPLIT = C::WARPS / RG, DW = D / DSPLIT;
  const int rg = warp % RG, dc = (warp / RG) * DW;

  int st = 0;
  for (int m0 = m_begin; m0 < m_hi; m0 += BM, st ^= 1) {
    cp_async_wait<0>();
    __syncthreads();
    if (C::KV_REGS && m0 == m_begin) {
#pragma unroll
      for (int kk = 0; kk < (C::KV_REGS ? D / 16 : 0); ++kk) {
        ldsm_x4(kf[kk], sK + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
        ldsm_x4(vf[kk], sV + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
      }
    }
    // Prefetch the next query tile into the other buffer (last read before
    // the barrier above).
    if (m0 + BM < m_hi) load_q(m0 + BM, st ^ 1);
    cp_async_commit();
    const T* cQ = sQ + st * BM * LD;
    const T* cdO = sdO + st * BM * LD;
    const float* cL = sL + st * BM;
    const float* cD = sDs + st * BM;

    // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: this warp's 16 keys by BM queries.
    float sacc[BM / 8][4], dpacc[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) sacc[i][e] = dpacc[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      if constexpr (C::KV_REGS) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ka[e] = kf[kk][e];
          va[e] = vf[kk][e];
        }
      } else {
        ldsm_x4(ka, sK + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
        ldsm_x4(va, sV + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
      }
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        const int boff = (nn * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t b[4];
        ldsm_x4(b, cQ + boff);
        mma<T>(sacc[2 * nn], ka, b[0], b[1]);
        mma<T>(sacc[2 * nn + 1], ka, b[2], b[3]);
        ldsm_x4(b, cdO + boff);
        mma<T>(dpacc[2 * nn], va, b[0], b[1]);
        mma<T>(dpacc[2 * nn + 1], va, b[2], b[3]);
      }
    }
    // Pᵀ = exp(Sᵀ·scale + bias − lse), dSᵀ = Pᵀ∘(dPᵀ − dsum).
    const bool need_mask = n0 + BN > t || (causal && n0 + BN - 1 > m0 + off) ||
                           (window > 0 && n0 < m0 + BM - 1 + off - window + 1);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + warp * 16 + g + (e >> 1) * 8;
        const int ql = nt * 8 + 2 * tq + (e & 1);
        const int qi = m0 + ql;
        float x = sacc[nt][e] * scale_log2;
        if (HAS_BIAS && qi < s && key < t)
          x = fmaxf(x + biasb[(long long)qi * bias_rs + key] * LOG2E, SCORE_FLOOR);
        float p = exp2f(x - cL[ql]);
        if (need_mask && !visible(key, qi + off, t, causal, window)) p = 0.f;
        sacc[nt][e] = p;
        dpacc[nt][e] = p * (dpacc[nt][e] - cD[ql]);
      }
    }
    // dV += Pᵀ dO, dK += dSᵀ Q (A operands straight from the accumulators).
#pragma unroll
    for (int kq = 0; kq < BM / 16; ++kq) {
      const uint32_t pa[4] = {pack2<T>(sacc[2 * kq][0], sacc[2 * kq][1]),
                              pack2<T>(sacc[2 * kq][2], sacc[2 * kq][3]),
                              pack2<T>(sacc[2 * kq + 1][0], sacc[2 * kq + 1][1]),
                              pack2<T>(sacc[2 * kq + 1][2], sacc[2 * kq + 1][3])};
      const uint32_t da[4] = {pack2<T>(dpacc[2 * kq][0], dpacc[2 * kq][1]),
                              pack2<T>(dpacc[2 * kq][2], dpacc[2 * kq][3]),
                              pack2<T>(dpacc[2 * kq + 1][0], dpacc[2 * kq + 1][1]),
                              pack2<T>(dpacc[2 * kq + 1][2], dpacc[2 * kq + 1][3])};
#pragma unroll
      for (int nn = 0; nn < D / 16; ++nn) {
        const int boff = (kq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nn * 16 + (lane >> 4) * 8;
        uint32_t b[4];
        ldsm_x4_t(b, cdO + boff);
        mma<T>(dvacc[2 * nn], pa, b[0], b[1]);
        mma<T>(dvacc[2 * nn + 1], pa, b[2], b[3]);
        ldsm_x4_t(b, cQ + boff);
        mma<T>(dkacc[2 * nn], da, b[0], b[1]);
        mma<T>(dkacc[2 * nn + 1], da, b[2], b[3]);
      }
    }
    // dSᵀ to shared memory: dQ needs dS with queries as rows, across warps.
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8 * r) * LDS + nt * 8 + 2 * tq) =
            pack2<T>(dpacc[nt][2 * r], dpacc[nt][2 * r + 1]);
    __syncthreads();
    // dQ[rg rows, dc..dc+DW) += dS K, summed into dq_acc with f32 atomics
    // (other key tiles add to the same rows).
    float dqacc[DW / 8][4];
#pragma unroll
    for (int i = 0; i < DW / 8; ++i) dqacc[i][0] = dqacc[i][1] = dqacc[i][2] = dqacc[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4_t(a, sdS + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + rg * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int nn = 0; nn < DW / 16; ++nn) {
        uint32_t b[4];
        ldsm_x4_t(b, sK + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dc + nn * 16 + (lane >> 4) * 8);
        mma<T>(dqacc[2 * nn], a, b[0], b[1]);
        mma<T>(dqacc[2 * nn + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + rg * 16 + g + 8 * r;
      if (row < s) {
#pragma unroll
        for (int nt = 0; nt < DW / 8; ++nt) {
          float* dst = dqb + (size_t)row * D + dc + nt * 8 + 2 * tq;
#if __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float2*>(dst), make_float2(dqacc[nt][2 * r], dqacc[nt][2 * r + 1]));
#else
          atomicAdd(dst, dqacc[nt][2 * r]);
          atomicAdd(dst + 1, dqacc[nt][2 * r + 1]);
#endif
        }
      }
    }
    // No barrier here: the next iteration's loads go to the other buffer and
    // its sdS writes come after its own barrier.
  }
  cp_async_wait<0>();  // nothing may be in flight when the block exits

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + warp * 16 + g + 8 * r;
    if (key >= t) continue;
#pragma unroll
    for (int nn = 0; nn < D / 8; ++nn) {
      const size_t idx = (bhk * t + key) * D + nn * 8 + 2 * tq;
      const float k0 = dkacc[nn][2 * r] * scale, k1 = dkacc[nn][2 * r + 1] * scale;
      const float v0 = dvacc[nn][2 * r], v1 = dvacc[nn][2 * r + 1];
      if (rep == 1) {
        *reinterpret_cast<uint32_t*>(dk + idx) = pack2<T>(k0, k1);
        *reinterpret_cast<uint32_t*>(dv + idx) = pack2<T>(v0, v1);
      } else {
#if __CUDA_ARCH__ >= 900
        atomicAdd(reinterpret_cast<float2*>(dk_acc + idx), make_float2(k0, k1));
        atomicAdd(reinterpret_cast<float2*>(dv_acc + idx), make_float2(v0, v1));
#else
        atomicAdd(dk_acc + idx, k0);
        atomicAdd(dk_acc + idx + 1, k1);
        atomicAdd(dv_acc + idx, v0);
        atomicAdd(dv_acc + idx + 1, v1);
#endif
      }
    }
  }
}


// ----------------------------------------------------------------- decode --
//
// One query row per (batch, query head) over many keys (a decode step):
// the forward above would run one 64-row tile per head, most rows empty,
// one block walking every key (at 2,048 cached keys and 14 heads: 14 blocks
// on a 132-SM card, 1.1 ms of a 2.4 ms token). Flash-decoding instead:
// decode_split runs one block per (DEC_CH keys, key/value head, batch) for
// all G = hq / hkv query heads that share the head (K/V read once per
// group), and writes each head's unnormalised partial O with its max and
// sum (log2 units); decode_combine merges the splits of a row into O (input
// dtype; for s = 1 the [b, s, hq, d] and [b, hq, s, d] layouts coincide)
// and lse. The query sits at position t - 1 and sees keys
// [max(0, t - window), t) (window 0: all). With t_dev the key count comes
// from the device and the grid covers t_rows (a captured step replays at
// every length; splits past the count write an empty partial).
// Measured on an H200 (Qwen2.5-0.5B shape, bf16, b1, CUDA graph): 2,048
// cached keys 425 -> 538 tok/s; but at a 289-row cache 768 -> 586 (two
// launches instead of one, and the P·V loop below reads V from global
// memory one key at a time; staging V in shared memory is the next step),
// so flash_attn.rs takes these kernels from 512 key rows on.
constexpr int DEC_CH = 128;   // keys per split = threads per split block
constexpr int DEC_GMAX = 16;  // query heads per key/value head, at most

template <typename T, int D>
__device__ __forceinline__ void decode_split(const T* __restrict__ q, const T* __restrict__ k,
                                             const T* __restrict__ v, float* __restrict__ part_o,
                                             float* __restrict__ part_ml, int hq, int hkv,
                                             int t_rows, int t, int window, float scale,
                                             const unsigned int* t_dev) {
  if (t_dev != nullptr) t = (int)*t_dev;
  __shared__ float sq[DEC_GMAX][D];
  __shared__ float sp[DEC_GMAX][DEC_CH];
  __shared__ __align__(16) T sv[DEC_CH][D];
  const int split = blockIdx.x, hk = blockIdx.y, bi = blockIdx.z, splits = gridDim.x;
  const int G = hq / hkv, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int j0 = split * DEC_CH;
  const int begin = max(j0, window > 0 ? max(0, t - window) : 0), end = min(j0 + DEC_CH, t);
  // Partial row of query head hk * G + g: ((bi * hq + hk * G + g) * splits + split).
  const size_t row0 = ((size_t)bi * hq + (size_t)hk * G) * splits + split;
  if (begin >= end) {
    if (tid < G) {
      part_ml[(row0 + (size_t)tid * splits) * 2] = -INFINITY;
      part_ml[(row0 + (size_t)tid * splits) * 2 + 1] = 0.f;
    }
    return;
  }
  const float scale_log2 = scale * LOG2E;
  const size_t kv0 = ((size_t)bi * hkv + hk) * t_rows * D;
  // The split's V rows start loading now (16-byte async copies, all in
  // flight at once) and land while the scores are computed.
  {
    const T* vb = v + kv0;
    for (int c = tid; c < DEC_CH * D / 8; c += DEC_CH) {
      const int r = c / (D / 8), col = (c % (D / 8)) * 8;
      const int j = j0 + r;
      const bool ok = j >= begin && j < end;
      cp_async16(&sv[r][col], vb + (ok ? (size_t)j * D + col : 0), ok);
    }
    cp_async_commit();
  }
  const T* qb = q + ((size_t)bi * hq + (size_t)hk * G) * D;
  for (int i = tid; i < G * D; i += DEC_CH) sq[i / D][i % D] = to_f(qb[i]) * scale_log2;
  __syncthreads();
  // Scores: one key per thread, every query head of the group.
  {
    const int j = j0 + tid;
    float acc[DEC_GMAX];
#pragma unroll
    for (int g = 0; g < DEC_GMAX; ++g) acc[g] = 0.f;
    if (j >= begin && j < end) {
      const T* kr = k + kv0 + (size_t)j * D;
#pragma unroll
      for (int c = 0; c < D; c += 8) {
        float kf[8];
        load16(kr + c, kf);
#pragma unroll
        for (int g = 0; g < DEC_GMAX; ++g)
          if (g < G)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g] += sq[g][c + e] * kf[e];
      }
    } else {
#pragma unroll
      for (int g = 0; g < DEC_GMAX; ++g) acc[g] = -INFINITY;
    }
#pragma unroll
    for (int g = 0; g < DEC_GMAX; ++g)
      if (g < G) sp[g][tid] = acc[g];
  }
  __syncthreads();
  // Per head: max and sum over the split's keys, probabilities in place.
  for (int g = warp; g < G; g += DEC_CH / 32) {
    float x[DEC_CH / 32];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < DEC_CH / 32; ++i) {
      x[i] = sp[g][lane + 32 * i];
      mx = fmaxf(mx, x[i]);
    }
#pragma unroll
    for (int w = 16; w > 0; w >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, w));
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < DEC_CH / 32; ++i) {
      const float p = exp2f(x[i] - mx);  // x = -inf (hidden) gives 0
      sp[g][lane + 32 * i] = p;
      sum += p;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      part_ml[(row0 + (size_t)g * splits) * 2] = mx;
      part_ml[(row0 + (size_t)g * splits) * 2 + 1] = sum;
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  // Partial O = P V from shared memory: thread per (head, column).
  for (int i = tid; i < G * D; i += DEC_CH) {
    const int g = i / D, c = i % D;
    float acc = 0.f;
#pragma unroll 8
    for (int j = begin; j < end; ++j) acc += sp[g][j - j0] * to_f(sv[j - j0][c]);
    part_o[(row0 + (size_t)g * splits) * D + c] = acc;
  }
}

// One block of D threads per (batch, query head) row: merges the splits.
template <typename T, int D>
__device__ __forceinline__ void decode_combine(const float* __restrict__ part_o,
                                               const float* __restrict__ part_ml, T* __restrict__ o,
                                               float* __restrict__ lse, int splits) {
  const size_t row = blockIdx.x;
  const int c = threadIdx.x;
  const float* ml = part_ml + row * splits * 2;
  float mx = -INFINITY;
  for (int i = 0; i < splits; ++i) mx = fmaxf(mx, ml[2 * i]);
  float l = 0.f, acc = 0.f;
  if (mx != -INFINITY) {
    for (int i = 0; i < splits; ++i) {
      const float w = exp2f(ml[2 * i] - mx);  // an empty split has -inf: 0
      if (w == 0.f) continue;
      l += ml[2 * i + 1] * w;
      acc += part_o[(row * splits + i) * D + c] * w;
    }
  }
  o[row * D + c] = from_f<T>(l > 0.f ? acc / l : 0.f);
  if (c == 0) lse[row] = l > 0.f ? (mx + log2f(l)) * LN2 : INFINITY;
}

}  // namespace flash

// Entry points, `{name}_d{32|64|128}_{bf16|f16}`; the bias flag picks a
// specialisation so unbiased attention carries no bias code. Launch:
//   fwd:  grid (ceil(s / 64), hq, b), 128 threads, FwdCfg<D>::SMEM bytes
//         (fwd_nb: the same, bias ignored; seqs null); fwd_packed(_nb):
//         seqs non-null, grid (total tiles, hq, 1), b = 1, o_bshd = 1
//   bwd:  grid (ceil(t / 64), hq, b), 128 threads, BwdCfg<D>::SMEM bytes;
//         dq_acc zeroed; dk_acc/dv_acc zeroed when hq != hkv
//   dot:  rows * D / 8 threads, any block size that is a multiple of 32
//   decode: grid (ceil(t_rows / 128), hkv, b), 128 threads, s = 1, no bias,
//           hq / hkv <= 16; combine: grid b * hq, D threads
// Blocks per SM the no-bias forward is register-capped for: 6 at d = 32
// (80 registers, 32 bytes of spill stores), 4 at d = 64 (128 registers,
// 12 bytes), none at d = 128 (a cap spills 432 bytes); ptxas, sm_90.
#define FWD_NB_MIN_BLOCKS(D) ((D) == 32 ? 6 : (D) == 64 ? 4 : 1)
// The forward's parameters and arguments, shared by its four entries.
#define FLASH_FWD_PARAMS(T)                                                                        \
  const T* q, const T* k, const T* v, const float* bias, T* o, float* lse, int hq, int hkv, int s, \
      int t, float scale, int causal, int window, long long bias_bs, long long bias_hs,            \
      long long bias_rs, int o_bshd, const unsigned int* t_dev, const unsigned int* seqs,          \
      int nseq, flash::Strides qst, flash::Strides kvst
#define FLASH_FWD_ARGS(BIAS)                                                                       \
  q, k, v, BIAS, o, lse, hq, hkv, s, t, scale, causal, window, bias_bs, bias_hs, bias_rs, o_bshd,  \
      t_dev, seqs, nseq, qst, kvst
// `NAME` (bias picked at run time) and `NAME_nb` (no bias, at a register cap
// that fits more blocks per SM: the combined entry's bias path needs 125
// registers at d = 32, 4 blocks); PACKED: seqs non-null.
#define FLASH_FWD_ENTRIES(T, SUFFIX, D, NAME, PACKED)                                              \
  extern "C" __global__ void __launch_bounds__(128)                                                \
      flash_attn_##NAME##_d##D##_##SUFFIX(FLASH_FWD_PARAMS(T)) {                                   \
    if (bias)                                                                                      \
      flash::fwd<T, D, true, PACKED>(FLASH_FWD_ARGS(bias));                                        \
    else                                                                                           \
      flash::fwd<T, D, false, PACKED>(FLASH_FWD_ARGS(bias));                                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(128, FWD_NB_MIN_BLOCKS(D))                          \
      flash_attn_##NAME##_nb_d##D##_##SUFFIX(FLASH_FWD_PARAMS(T)) {                                \
    flash::fwd<T, D, false, PACKED>(FLASH_FWD_ARGS(nullptr));                                      \
  }
#define FLASH_ATTN_OPS(T, SUFFIX, D)                                                               \
  FLASH_FWD_ENTRIES(T, SUFFIX, D, fwd, false)                                                      \
  FLASH_FWD_ENTRIES(T, SUFFIX, D, fwd_packed, true)                                                \
  extern "C" __global__ void __launch_bounds__(128) flash_attn_bwd_d##D##_##SUFFIX(              \
      const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dsum,    \
      const float* bias, float* dq_acc, T* dk, T* dv, float* dk_acc, float* dv_acc, int hq,      \
      int hkv, int s, int t, float scale, int causal, int window, long long bias_bs,             \
      long long bias_hs, long long bias_rs) {                                                     \
    if (bias)                                                                                     \
      flash::bwd<T, D, true>(q, k, v, dout, lse, dsum, bias, dq_acc, dk, dv, dk_acc, dv_acc, hq, \
                             hkv, s, t, scale, causal, window, bias_bs, bias_hs, bias_rs);        \
    else                                                                                          \
      flash::bwd<T, D, false>(q, k, v, dout, lse, dsum, bias, dq_acc, dk, dv, dk_acc, dv_acc,    \
                              hq, hkv, s, t, scale, causal, window, bias_bs, bias_hs, bias_rs);   \
  }                                                                                               \
  extern "C" __global__ void flash_attn_bwd_dot_d##D##_##SUFFIX(const T* o, const T* dout,       \
                                                                 float* dsum, size_t rows) {      \
    flash::bwd_dot<T, D>(o, dout, dsum, rows);                                                    \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(flash::DEC_CH) flash_decode_d##D##_##SUFFIX(      \
      const T* q, const T* k, const T* v, float* part_o, float* part_ml, int hq, int hkv,         \
      int t_rows, int t, int window, float scale, const unsigned int* t_dev) {                    \
    flash::decode_split<T, D>(q, k, v, part_o, part_ml, hq, hkv, t_rows, t, window, scale,       \
                              t_dev);                                                             \
  }                                                                                               \
  extern "C" __global__ void flash_decode_combine_d##D##_##SUFFIX(                               \
      const float* part_o, const float* part_ml, T* o, float* lse, int splits) {                  \
    flash::decode_combine<T, D>(part_o, part_ml, o, lse, splits);                                 \
  }

#define FLASH_ATTN_DTYPE(T, SUFFIX) \
  FLASH_ATTN_OPS(T, SUFFIX, 32)     \
  FLASH_ATTN_OPS(T, SUFFIX, 64)     \
  FLASH_ATTN_OPS(T, SUFFIX, 128)    \
  extern "C" __global__ void flash_attn_convert_##SUFFIX(const float* src, T* dst, size_t n,      \
                                                         float scale) {                          \
    FOR_EACH_ELEMENT(i, n) dst[i] = from_f<T>(src[i] * scale);                                    \
  }

FLASH_ATTN_DTYPE(__nv_bfloat16, bf16)
FLASH_ATTN_DTYPE(__half, f16)

// f32: the forward only (inference), head dims 32 and 64 (the encoders'),
// under the half-precision forward's names and arguments. BOUNDS: ptxas
// gives the unbiased d = 32 entries 128 registers without spills from
// (128) (with a minimum of 1 or 3 blocks per SM it takes 168; 4 spilled
// 4-76 bytes), and at d = 64 the unbiased ones 128 with 64 bytes of spills
// unless (128, 3) lets them have 168.
#define FLASH_FWD_F32_ENTRIES(D, NAME, PACKED, BOUNDS)                                             \
  extern "C" __global__ void __launch_bounds__ BOUNDS                                              \
      flash_attn_##NAME##_d##D##_f32(FLASH_FWD_PARAMS(float)) {                                    \
    if (bias)                                                                                      \
      flash::fwd_f32<D, true, PACKED>(FLASH_FWD_ARGS(bias));                                       \
    else                                                                                           \
      flash::fwd_f32<D, false, PACKED>(FLASH_FWD_ARGS(bias));                                      \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__ BOUNDS                                              \
      flash_attn_##NAME##_nb_d##D##_f32(FLASH_FWD_PARAMS(float)) {                                 \
    flash::fwd_f32<D, false, PACKED>(FLASH_FWD_ARGS(nullptr));                                     \
  }
FLASH_FWD_F32_ENTRIES(32, fwd, false, (128))
FLASH_FWD_F32_ENTRIES(32, fwd_packed, true, (128))
FLASH_FWD_F32_ENTRIES(64, fwd, false, (128, 3))
FLASH_FWD_F32_ENTRIES(64, fwd_packed, true, (128, 3))
