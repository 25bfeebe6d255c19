//! `y = x Wᵀ` for a Q8_0 or Q4_1 weight and a few f32 rows on x86-64 with
//! AVX-512 VNNI: the decode-time products of a quantized model on the CPU.
//!
//! Candle 0.11's x86 kernels for Q8_0 are an AVX2 dot product per output
//! value (two scale conversions through `half` per 32-value block, no
//! sharing of work between rows) and AVX-512 VNNI tiles that need rows of
//! whole 256-value superblocks and quantize the activations per 256 values;
//! for Q4_1 it has only the scalar reference loop. Qwen2.5-0.5B's rows are
//! 896 values, so its decode ran on the AVX2 loop (half of the decode time,
//! `perf`), and SmolLM2's Q4_1 file on the scalar one. These kernels give
//! **Candle's numbers bit for bit** (and llama.cpp's up to f32 summation
//! order): the activations quantized exactly as Candle's `from_float`
//! (Q8_0 for Q8_0 weights, Q8_1 for Q4_1: scale `max|x| / 127` rounded to
//! f16, integers `round(x / scale)`), exact integer block sums, and the
//! same f32 operations in the same order:
//!
//! - Q8_0, as Candle's AVX2 loop and llama.cpp's AVX-512 path: `|w|` and
//!   `x` with `w`'s sign into one `vpdpbusd` (8 lanes of exact partial
//!   sums, the lanes Candle's `maddubs`/`madd` pair forms), converted and
//!   accumulated with the block's scale by one FMA per block, summed
//!   across lanes at the end. (Offsetting `w` by +128 and cancelling
//!   128·Σx in one lane was exact in integers but left lanes ~100× larger
//!   than the sum; their f32 rounding moved the real Qwen2.5-Coder's logits
//!   by ~0.1, and greedy text equal to llama.cpp's fell from 128 to 84 of
//!   128 positions.)
//! - Q4_1, as Candle's scalar loop: the nibbles (unsigned) times `x` in one
//!   `vpdpbusd`, the lanes summed to the block's integer, then Candle's
//!   `Σi·d_w·d_x + m_w·s_x` in f32.
//!
//! Rows are read in address order with the next rows prefetched (four rows
//! interleaved per block streamed a 145 MB LM head at two thirds of the
//! bandwidth), on Candle's own worker pool.

use half::f16;

/// Values per block (Q8_0, Q4_1 and their activations).
pub(crate) const BLOCK: usize = 32;

/// The weight formats these kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// f16 scale, 32 signed bytes.
    Q8_0,
    /// f16 scale and minimum, 32 nibbles.
    Q4_1,
}

impl Format {
    /// Bytes of one block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_1 => 20,
        }
    }
}

/// Whether this CPU runs the kernel (AVX-512 F/BW/VL with VNNI, and F16C).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
/// One activation row quantized as Candle's `BlockQ8_0::from_float` (and
/// `BlockQ8_1::from_float`, which adds `s`): per block the f16-rounded
/// scale as f32, the 32 integers, and (Q8_1) `f16(Σq) · d` as f32.
struct QuantRow {
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<[i8; BLOCK]>,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn quantize_row(x: &[f32]) -> QuantRow {
    let blocks = x.len() / BLOCK;
    let mut row = QuantRow {
        d: Vec::with_capacity(blocks),
        s: Vec::with_capacity(blocks),
        qs: Vec::with_capacity(blocks),
    };
    for xb in x.chunks_exact(BLOCK) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; BLOCK];
        let mut sum = 0i32;
        for (qi, &v) in q.iter_mut().zip(xb) {
            // As Candle and ggml: round half away from zero, then to i8.
            *qi = (v * id).round() as i8;
            sum += i32::from(*qi);
        }
        let dh = f16::from_f32(d);
        row.d.push(dh.to_f32());
        // Candle's Q8_1: `f16::from_f32(sum as f32) * d`, an f16 product.
        row.s.push((f16::from_f32(sum as f32) * dh).to_f32());
        row.qs.push(q);
    }
    row
}

/// `dst[r * n + j] = Σ_k x[r, k] · W[j, k]` for `x` `[m, k]` (f32) and `w`
/// the `n × k/32` blocks of `W` (`[n, k]`) in `format`, on Candle's CPU
/// worker pool (the threads its own matmuls use: a second pool beside its
/// spinning workers halved the decode speed on 2 cores). `k` must be a
/// multiple of 32 and [`available`] true.
#[cfg(target_arch = "x86_64")]
pub(crate) fn matmul(
    x: &[f32],
    m: usize,
    k: usize,
    (w, format): (&[u8], Format),
    n: usize,
) -> Vec<f32> {
    use std::sync::Mutex;
    let blocks = k / BLOCK;
    debug_assert!(
        k.is_multiple_of(BLOCK) && w.len() == n * blocks * format.block_bytes() && x.len() == m * k
    );
    let rows: Vec<QuantRow> = x.chunks_exact(k).map(quantize_row).collect();
    // Output values transposed ([n, m]) so a task owns whole weight rows:
    // 64 weight rows per task, enough tasks for the threads and each long
    // enough to amortise the hand-off.
    const ROWS_PER_TASK: usize = 64;
    let row_bytes = blocks * format.block_bytes();
    let mut out_t = vec![0f32; n * m];
    let tasks: Vec<Mutex<&mut [f32]>> = out_t
        .chunks_mut(ROWS_PER_TASK * m.max(1))
        .map(Mutex::new)
        .collect();
    let run = |t: usize| {
        let Ok(mut out) = tasks[t].lock() else {
            return;
        };
        let out: &mut [f32] = &mut out;
        let j0 = t * ROWS_PER_TASK;
        let nj = out.len() / m;
        let wt = &w[j0 * row_bytes..(j0 + nj) * row_bytes];
        for (r, row) in rows.iter().enumerate() {
            let mut j = 0;
            while j < nj {
                let count = (nj - j).min(4);
                let d = dot4(
                    row,
                    (&wt[j * row_bytes..(j + count) * row_bytes], format),
                    row_bytes,
                    count,
                );
                for (i, v) in d.into_iter().take(count).enumerate() {
                    out[(j + i) * m + r] = v;
                }
                j += count;
            }
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        for t in range {
            run(t);
        }
    });
    drop(tasks);
    if m == 1 {
        return out_t;
    }
    let mut dst = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (r, v) in col.iter().enumerate() {
            dst[r * n + j] = *v;
        }
    }
    dst
}

/// `count` (1 to 4) weight rows (`count · row_bytes` bytes) against one
/// quantized row; the first `count` values are theirs.
#[cfg(target_arch = "x86_64")]
fn dot4(row: &QuantRow, (w, format): (&[u8], Format), row_bytes: usize, count: usize) -> [f32; 4] {
    // SAFETY: `available()` was checked by the caller (the public entry's
    // contract); `w` holds `count` rows of whole blocks.
    unsafe {
        match format {
            Format::Q8_0 => avx512::dot4_q8_0(row, w, row_bytes, count),
            Format::Q4_1 => avx512::dot4_q4_1(row, w, row_bytes, count),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::QuantRow;
    use half::f16;
    use std::arch::x86_64::*;

    const Q8_0_BYTES: usize = 34;
    const Q4_1_BYTES: usize = 20;

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/VNNI and F16C; `w` holds `count` (at
    /// most 4) rows of `row_bytes` (whole blocks, as many as `row.d`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub(super) unsafe fn dot4_q8_0(
        row: &QuantRow,
        w: &[u8],
        row_bytes: usize,
        count: usize,
    ) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let p = w.as_ptr();
        // Row by row: each row's blocks are read in address order (with the
        // four rows interleaved per block, the LM head's 136 MB streamed at
        // two thirds of the bandwidth). The activation blocks stay in L1.
        for (r, a) in acc.iter_mut().enumerate().take(count) {
            let rp = unsafe { p.add(r * row_bytes) };
            for b in 0..row.d.len() {
                // SAFETY: block b of row r lies inside `w`.
                let blk = unsafe { rp.add(b * Q8_0_BYTES) };
                // Four rows ahead (the end of `w` is past the last task's
                // rows; prefetches never fault).
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(4 * row_bytes).cast());
                let x = unsafe { _mm256_loadu_si256(row.qs[b].as_ptr().cast()) };
                let wq = unsafe { _mm256_loadu_si256(blk.add(2).cast()) };
                // |w| (unsigned) times x with w's sign, as llama.cpp does:
                // each lane is an exact partial sum of w·x, small, so the
                // f32 sums that follow round like Candle's and llama.cpp's.
                // (Offsetting w by +128 and cancelling 128·Σx in one lane
                // left lanes ~100x larger than the sum, and the f32
                // rounding of their cancellation moved the real model's
                // logits by ~0.1: greedy text equal to llama.cpp's fell
                // from 128 to 84 of 128 positions.)
                let s = _mm256_dpbusd_epi32(
                    _mm256_setzero_si256(),
                    _mm256_sign_epi8(wq, wq),
                    _mm256_sign_epi8(x, wq),
                );
                let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                    u16::from_le_bytes(unsafe { [*blk, *blk.add(1)] }),
                ))));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * row.d[b]), *a);
            }
        }
        acc.map(|a| {
            let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
        })
    }

    /// # Safety
    /// As [`dot4_q8_0`], with Q4_1 blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub(super) unsafe fn dot4_q4_1(
        row: &QuantRow,
        w: &[u8],
        row_bytes: usize,
        count: usize,
    ) -> [f32; 4] {
        let low = _mm_set1_epi8(0x0F);
        let mut out = [0f32; 4];
        let p = w.as_ptr();
        for (r, o) in out.iter_mut().enumerate().take(count) {
            let rp = unsafe { p.add(r * row_bytes) };
            let mut acc = 0f32;
            for b in 0..row.d.len() {
                // SAFETY: block b of row r lies inside `w`.
                let blk = unsafe { rp.add(b * Q4_1_BYTES) };
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(4 * row_bytes).cast());
                let q = unsafe { _mm_loadu_si128(blk.add(4).cast()) };
                // Values 0..16 are the low nibbles, 16..32 the high ones.
                let nib = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16::<4>(q), low),
                    _mm_and_si128(q, low),
                );
                let x = unsafe { _mm256_loadu_si256(row.qs[b].as_ptr().cast()) };
                let s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), nib, x);
                let t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
                let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t));
                let sumi = _mm_cvtsi128_si32(t);
                let (dw, mw) = unsafe {
                    (
                        f16::from_le_bytes([*blk, *blk.add(1)]).to_f32(),
                        f16::from_le_bytes([*blk.add(2), *blk.add(3)]).to_f32(),
                    )
                };
                // Candle's scalar loop, operation for operation.
                acc += sumi as f32 * dw * row.d[b] + mw * row.s[b];
            }
            *o = acc;
        }
        out
    }
}
