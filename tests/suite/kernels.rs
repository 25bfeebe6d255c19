//! Our fused kernels against compositions of Candle's differentiable ops, as
//! one table: each row names a kernel, its fused function, the composed
//! reference and the shapes to try; every row runs in f32, bf16 and f16,
//! forward values and the gradients with respect to every input, on
//! `device()` (CUDA with METAL_CANDLE_TEST_DEVICE=cuda, so the GPU tier runs
//! the same table). Adding a kernel is adding a row.

use crate::common::{abs_max, device, rel_diff};
use candle_core::{DType, Device, Tensor, Var, D};
use metal_candle::backend::kernels::{
    add_layer_norm, add_rms_norm, bias_act, embed_sum, flash_attention, flash_attention_merged,
    gemm_bias_act, layer_norm, rms_norm, split_heads, swiglu, Activation, Heads,
};
use metal_candle::layers::{attention, attention_packed, composed_attention, Mask, PackedSeqs};

type Op = fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// One kernel under test.
struct Row {
    name: &'static str,
    /// Our fused op, on the inputs in order.
    fused: Op,
    /// The same function composed of Candle's differentiable ops.
    composed: Op,
    /// Random inputs for one shape (the first input's, unless the row says
    /// otherwise) and dtype.
    inputs: fn(&[usize], DType, &Device) -> Vec<Tensor>,
    shapes: &'static [&'static [usize]],
    /// The first `grads` inputs are differentiated; the rest are constants
    /// (an attention bias).
    grads: usize,
    /// Whether the fused op runs for this dtype on this device (the CUDA
    /// attention kernel takes bf16/f16 only; f32 takes the composed path).
    runs_on: fn(DType, &Device) -> bool,
    /// `(dtype, forward, backward)` bounds, see [`TOLERANCES`].
    tolerances: &'static [(DType, f32, f32)],
}

fn everywhere(_: DType, _: &Device) -> bool {
    true
}

/// The flash-attention kernel on CUDA takes half precision only.
fn flash_runs_on(dtype: DType, dev: &Device) -> bool {
    !dev.is_cuda() || dtype != DType::F32
}

const EPS: f32 = 1e-6;

const KERNELS: &[Row] = &[
    Row {
        name: "rms_norm",
        fused: |t| rms_norm(&t[0], &t[1], EPS),
        composed: |t| rms_norm_composed(&t[0], &t[1], f64::from(EPS)),
        inputs: rms_norm_inputs,
        // Rows narrower than a warp, a multiple of it, not a multiple of 32
        // (100, 1500), and at or above one 1024-thread block (1500, 4096).
        shapes: &[
            &[12, 7],
            &[4, 3, 64],
            &[5, 100],
            &[3, 896],
            &[6, 1500],
            &[2, 4096],
            &[40, 1000],
        ],
        grads: 2,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    // Inference-only (grads: 0; with gradient-tracking inputs it takes the
    // composed add and rms_norm): the sum, then the normalised sum.
    Row {
        name: "add_rms_norm",
        fused: |t| {
            let (sum, normed) = add_rms_norm(&t[0], &t[2], &t[1], EPS)?;
            flat(&[sum, normed])
        },
        composed: |t| {
            let sum = (&t[0] + &t[2])?;
            let normed = rms_norm_composed(&sum, &t[1], f64::from(EPS))?;
            flat(&[sum, normed])
        },
        inputs: add_rms_norm_inputs,
        shapes: &[&[12, 7], &[1, 896], &[3, 896], &[2000, 64], &[2, 1500]],
        grads: 0,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    Row {
        name: "swiglu",
        fused: |t| swiglu(&t[0], &t[1]),
        composed: |t| t[0].silu()? * &t[1],
        inputs: swiglu_inputs,
        // Fewer elements than a warp, not a multiple of 32, a Qwen2-0.5B MLP
        // row, and more elements than one elementwise grid covers (1024
        // blocks of 256), so the grid-stride loop runs.
        shapes: &[&[7], &[3, 100], &[4, 2, 896], &[64, 4864]],
        grads: 2,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    Row {
        name: "bias_act (bias add)",
        fused: |t| bias_act(&t[0], &t[1], Activation::None),
        composed: |t| t[0].broadcast_add(&t[1]),
        inputs: bias_inputs,
        shapes: &[&[7], &[3, 100], &[4, 2, 896], &[300, 1536]],
        grads: 2,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    // Inference-only ops (encoders): forward values only (grads: 0). With
    // gradient-tracking inputs they take the composed path themselves.
    Row {
        name: "bias_act (gelu erf)",
        fused: |t| bias_act(&t[0], &t[1], Activation::GeluErf),
        composed: |t| t[0].broadcast_add(&t[1])?.gelu_erf(),
        inputs: bias_inputs,
        // [800, 3000]: more 16-byte chunks than one elementwise grid has
        // threads, so the grid-stride loop and its column step run.
        shapes: &[&[7], &[3, 100], &[300, 1536], &[800, 3000]],
        grads: 0,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    Row {
        name: "bias_act (gelu tanh)",
        fused: |t| bias_act(&t[0], &t[1], Activation::GeluTanh),
        composed: |t| t[0].broadcast_add(&t[1])?.gelu(),
        inputs: bias_inputs,
        shapes: &[&[3, 100], &[64, 384]],
        grads: 0,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    Row {
        name: "add_layer_norm",
        fused: |t| add_layer_norm(&t[0], &t[1], &t[2], EPS),
        composed: |t| add_layer_norm_composed(&t[0], &t[1], &t[2], f64::from(EPS)),
        inputs: add_layer_norm_inputs,
        // Rows narrower than a warp, MiniLM's 384, MPNet's 768, and above
        // one 1024-thread block. Rows of at most 64 16-byte vectors take half
        // a warp each on CUDA, so [7, 384] and [3, 200] end in a warp whose
        // second half has no row. (50 x 768: enough rows for the CPU path's
        // threads.)
        shapes: &[
            &[5, 7],
            &[3, 4, 384],
            &[7, 384],
            &[3, 200],
            &[2, 768],
            &[50, 768],
            &[2, 1500],
        ],
        grads: 0,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    Row {
        name: "layer_norm",
        fused: |t| layer_norm(&t[0], &t[2].narrow(0, 1, 2)?, EPS),
        // The same reference with a zero residual and projection bias.
        composed: |t| {
            let lb = t[2].narrow(0, 0, 1)?.zeros_like()?;
            let p = Tensor::cat(&[&lb, &t[2].narrow(0, 1, 2)?], 0)?;
            add_layer_norm_composed(&t[0], &t[0].zeros_like()?, &p, f64::from(EPS))
        },
        inputs: add_layer_norm_inputs,
        shapes: &[&[5, 7], &[7, 384], &[3, 200], &[50, 768], &[2, 1500]],
        grads: 0,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    // [rows of a, rows of b, ids, width]; inference-only.
    Row {
        name: "embed_sum",
        fused: |t| embed_sum(&t[0], &t[1], &t[2], &t[3]),
        composed: |t| t[0].index_select(&t[1], 0)? + t[2].index_select(&t[3], 0)?,
        inputs: embed_sum_inputs,
        // Widths below and not a multiple of 8 (the scalar path), MiniLM's
        // 384; more ids than one elementwise grid covers.
        shapes: &[
            &[10, 5, 7, 3],
            &[100, 40, 300, 384],
            &[3000, 512, 6000, 384],
        ],
        grads: 0,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    // [b, s, q heads, kv heads, head dim]
    Row {
        name: "split_heads",
        fused: |t| {
            let (q, k, v) = split_heads(&t[0], &t[1], heads_of(&t[0], t[2].dims()))?;
            flat(&[q, k, v])
        },
        composed: split_heads_composed,
        inputs: split_heads_inputs,
        shapes: &[&[2, 3, 4, 4, 8], &[1, 5, 4, 2, 16], &[3, 70, 12, 12, 32]],
        grads: 0,
        runs_on: everywhere,
        tolerances: TOLERANCES,
    },
    // Attention shapes are [b, heads, kv_heads, s, t, d]; the CUDA kernel
    // takes 64 query rows and 64 keys per tile, so s or t of 65..130 cover
    // several tiles and partial ones.
    Row {
        name: "flash_attention",
        fused: |t| flash_attention(&t[0], &t[1], &t[2], None, scale(&t[0]), false, None),
        composed: |t| attention_composed(t, None, false, None),
        inputs: attention_inputs,
        shapes: &[
            &[2, 2, 2, 7, 7, 32],
            &[1, 4, 2, 5, 9, 64],
            &[1, 2, 1, 70, 90, 128],
        ],
        grads: 3,
        runs_on: flash_runs_on,
        tolerances: ATTENTION_TOLERANCES,
    },
    Row {
        name: "flash_attention causal",
        fused: |t| flash_attention(&t[0], &t[1], &t[2], None, scale(&t[0]), true, None),
        composed: |t| attention_composed(t, None, true, None),
        inputs: attention_inputs,
        // GQA 2, 3 and 7; a decode step (s = 1 after 12 cached keys); queries
        // after a cache (s < t); several tiles.
        shapes: &[
            &[1, 4, 2, 9, 9, 32],
            &[2, 6, 2, 3, 11, 64],
            &[1, 7, 1, 1, 13, 128],
            &[1, 2, 1, 130, 130, 64],
        ],
        grads: 3,
        runs_on: flash_runs_on,
        tolerances: ATTENTION_TOLERANCES,
    },
    // Inference's merged-heads output ([b, s, heads * d], written so by the
    // kernel on CUDA): forward only.
    Row {
        name: "flash_attention merged heads",
        fused: |t| flash_attention_merged(&t[0], &t[1], &t[2], None, scale(&t[0]), true, None),
        composed: |t| merge_heads(&attention_composed(t, None, true, None)?),
        inputs: attention_inputs,
        shapes: &[
            &[2, 4, 2, 9, 9, 32],
            &[3, 2, 1, 1, 13, 64],
            &[2, 2, 2, 130, 130, 128],
        ],
        grads: 0,
        runs_on: flash_runs_on,
        tolerances: ATTENTION_TOLERANCES,
    },
    // One query row after many keys: from 512 keys the split-key decode
    // kernels on CUDA (128 keys per split): two keys (the tiled kernel;
    // with one key dq is exactly 0), a partial last split, 16 query heads
    // per key/value head (the most they take) and 17 (tiled again). The
    // lse they leave feeds the backward.
    Row {
        name: "flash_attention decode",
        fused: |t| flash_attention(&t[0], &t[1], &t[2], None, scale(&t[0]), true, None),
        composed: |t| attention_composed(t, None, true, None),
        inputs: decode_attention_inputs,
        shapes: &[
            &[3, 4, 4, 1, 2, 64],
            &[2, 6, 2, 1, 530, 32],
            &[1, 14, 2, 1, 600, 64],
            &[1, 16, 1, 1, 520, 128],
            &[1, 17, 1, 1, 520, 64],
        ],
        grads: 3,
        runs_on: flash_runs_on,
        tolerances: DECODE_TOLERANCES,
    },
    Row {
        name: "flash_attention window",
        fused: |t| flash_attention(&t[0], &t[1], &t[2], None, scale(&t[0]), true, Some(WINDOW)),
        composed: |t| attention_composed(t, None, true, Some(WINDOW)),
        inputs: attention_inputs,
        shapes: &[
            &[1, 4, 2, 12, 12, 32],
            &[1, 2, 1, 5, 20, 64],
            &[1, 2, 2, 100, 100, 64],
            // A decode step (split kernels): the window cuts inside a split.
            &[1, 7, 1, 1, 530, 64],
        ],
        grads: 3,
        runs_on: flash_runs_on,
        tolerances: ATTENTION_TOLERANCES,
    },
    Row {
        name: "flash_attention padding",
        fused: |t| flash_attention(&t[0], &t[1], &t[2], Some(&t[3]), scale(&t[0]), false, None),
        composed: |t| attention_composed(t, Some(&t[3]), false, None),
        inputs: padded_attention_inputs,
        shapes: &[&[2, 4, 2, 6, 6, 64], &[2, 2, 1, 70, 70, 32]],
        grads: 3,
        runs_on: flash_runs_on,
        tolerances: ATTENTION_TOLERANCES,
    },
    Row {
        name: "flash_attention position bias",
        fused: |t| flash_attention(&t[0], &t[1], &t[2], Some(&t[3]), scale(&t[0]), false, None),
        composed: |t| attention_composed(t, Some(&t[3]), false, None),
        inputs: biased_attention_inputs,
        shapes: &[&[2, 4, 4, 9, 9, 64], &[1, 2, 2, 65, 65, 128]],
        grads: 3,
        runs_on: flash_runs_on,
        tolerances: ATTENTION_TOLERANCES,
    },
];

/// Largest relative difference (`rel_diff`: max |fused − composed| /
/// max |composed|) allowed, forward and for each gradient. Measured on the
/// CPU over 65 runs of this table (worst over shapes and inputs):
///
/// - f32: both paths compute in f32 and differ only in summation order and
///   `rsqrt` vs `1/sqrt`: worst 1.3e-6 forward, 1.5e-6 backward.
/// - bf16 (8 mantissa bits, one ulp is 0.4–0.8 % of a value): our kernels
///   round once from f32, the composed ops after every op (Candle's bf16
///   silu rounds its exp, its sum and its quotient; the reference dw sums
///   rows in bf16), so they differ by a few ulps of the largest values:
///   worst 7.8e-3 forward, 2.0e-2 backward (rms_norm's dw; 1.6e-2 for
///   swiglu's d_gate). Bounds 2e-2 and 5e-2 leave 2.5x.
/// - f16 (11 mantissa bits): the same at 1/8 of the ulp: worst 1.3e-3
///   forward, 3.4e-3 backward; bounds 4e-3 and 8e-3.
///
/// On CUDA (an H200, Candle's seeded GPU generator) the worst errors were
/// 1.8e-7 (f32), 1.1e-2 (bf16, swiglu's d_gate) and 1.6e-3 (f16).
///
/// A wrong formula or index shows up as errors of order 1.
const TOLERANCES: &[(DType, f32, f32)] = &[
    // (dtype, forward, backward)
    (DType::F32, 1e-5, 1e-5),
    (DType::BF16, 2e-2, 5e-2),
    (DType::F16, 4e-3, 8e-3),
];

/// Sliding window of the window row.
const WINDOW: usize = 4;

/// Attention against the composed path, which rounds more than the kernel:
/// in bf16/f16 it rounds the scores q·kᵀ to the input dtype before the f32
/// softmax, and its backward rounds after every op, whereas the kernel keeps
/// scores in f32 and rounds only P (and dS) for the tensor-core products.
/// The same bounds as [`TOLERANCES`]; worst over the five attention rows:
///
/// - CPU (the f32 reference path): f32 4.8e-7 forward, 5.5e-7 backward;
///   bf16 1.1e-2 / 1.2e-2; f16 1.5e-3 / 2.0e-3.
/// - CUDA (the kernel, H200): bf16 9.6e-3 forward, 1.6e-2 backward; f16
///   1.6e-3 / 1.8e-3 (f32 is not run there: the kernel takes half precision).
///
/// Against an exact f32 reference (scripts/flash_check) the kernel is within
/// 4.2e-3 (bf16) and 6e-4 (f16) of the largest value, so most of the above
/// is the composed path's rounding.
const ATTENTION_TOLERANCES: &[(DType, f32, f32)] = &[
    (DType::F32, 1e-5, 1e-5),
    (DType::BF16, 2e-2, 5e-2),
    (DType::F16, 4e-3, 8e-3),
];

/// The decode row's bounds: [`ATTENTION_TOLERANCES`] but f16 1.5e-2. One
/// query row sums over 520-600 keys: on the CPU the composed path (f16
/// scores, probabilities and products) differs from the f32 reference the
/// fused op computes by up to 9.3e-3 of the largest value (dq at t = 530);
/// bf16 and f32 stay within the general bounds.
const DECODE_TOLERANCES: &[(DType, f32, f32)] = &[
    (DType::F32, 1e-5, 1e-5),
    (DType::BF16, 2e-2, 5e-2),
    (DType::F16, 1.5e-2, 1.5e-2),
];

/// `[b, h, s, d]` to `[b, s, h * d]`.
fn merge_heads(o: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, s, d) = o.dims4()?;
    o.transpose(1, 2)?.reshape((b, s, h * d))
}

fn scale(q: &Tensor) -> f64 {
    1.0 / (q.dim(3).unwrap() as f64).sqrt()
}

/// q `[b, h, s, d]`, k and v `[b, kv, t, d]` for a shape `[b, h, kv, s, t, d]`.
fn attention_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let &[b, h, kv, s, t, d] = shape else {
        panic!("attention shape is [b, heads, kv_heads, s, t, d], got {shape:?}")
    };
    vec![
        randn(0.0, 1.0, &[b, h, s, d], dtype, dev),
        randn(0.0, 1.0, &[b, kv, t, d], dtype, dev),
        randn(0.0, 1.0, &[b, kv, t, d], dtype, dev),
    ]
}

/// [`attention_inputs`] with values of mean 1 and queries of half the
/// scale: one query row averages hundreds of values, which for zero-mean
/// values leaves an output near 0, against which the composed path's
/// rounding of the scores to bf16/f16 (errors growing with their size)
/// would look large; here the output is O(1), as in a model.
fn decode_attention_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let mut inputs = attention_inputs(shape, dtype, dev);
    inputs[0] = (&inputs[0] * 0.5).unwrap();
    inputs[2] = (&inputs[2] + 1.0).unwrap();
    inputs
}

/// A padding mask `[b, 1, s, t]` (0 or `f32::MIN`, as `attention_mask` makes):
/// batch `i` hides its last `2i` keys, and batch 1's query row 0 hides every
/// key (an all-padding row: finite, uniform weights in both paths).
fn padded_attention_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let mut inputs = attention_inputs(shape, dtype, dev);
    let (b, s, t) = (shape[0], shape[3], shape[4]);
    let mask: Vec<f32> = (0..b * s * t)
        .map(|n| {
            let (bi, i, j) = (n / (s * t), n / t % s, n % t);
            if j + 2 * bi >= t || (bi == 1 && i == 0) {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect();
    inputs.push(Tensor::from_vec(mask, (b, 1, s, t), dev).unwrap());
    inputs
}

/// A relative-position-like bias `[1, h, s, t]` (MPNet), broadcast over the
/// batch.
fn biased_attention_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let mut inputs = attention_inputs(shape, dtype, dev);
    let (h, s, t) = (shape[1], shape[3], shape[4]);
    inputs.push(randn(0.0, 2.0, &[1, h, s, t], DType::F32, dev));
    inputs
}

/// The composed attention with the causal/window flags turned into a mask
/// (`f32::MIN` where hidden, replacing the bias there rather than adding to
/// it, which would overflow to -inf).
fn attention_composed(
    t: &[Tensor],
    bias: Option<&Tensor>,
    causal: bool,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    let (b, h, s, _) = t[0].dims4()?;
    let tk = t[1].dim(2)?;
    let dev = t[0].device();
    let visible: Vec<u8> = (0..s * tk)
        .map(|n| {
            let (i, j) = ((n / tk) as i64, (n % tk) as i64);
            let qpos = i + tk as i64 - s as i64;
            let ok = (!causal || j <= qpos) && window.is_none_or(|w| qpos - j < w as i64);
            u8::from(ok)
        })
        .collect();
    let visible = Tensor::from_vec(visible, (1, 1, s, tk), dev)?.broadcast_as((b, h, s, tk))?;
    let bias = match bias {
        Some(bias) => bias.broadcast_as((b, h, s, tk))?.contiguous()?,
        None => Tensor::zeros((b, h, s, tk), DType::F32, dev)?,
    };
    let hidden = Tensor::full(f32::MIN, (b, h, s, tk), dev)?;
    let bias = visible.where_cond(&bias, &hidden)?;
    composed_attention(&t[0], &t[1], &t[2], Some(&bias), scale(&t[0]))
}

/// transformers' Qwen2RMSNorm, op by op (statistics in f32, the normalised
/// value rounded to the input dtype before the weight).
fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)
}

/// x `[.., n]` and a bias `[n]`.
fn bias_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let n = *shape.last().unwrap();
    vec![
        randn(0.0, 1.5, shape, dtype, dev),
        randn(0.0, 0.5, &[n], dtype, dev),
    ]
}

/// Tables `[va, h]`, `[vb, h]` and ids into each (every row reached).
fn embed_sum_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let &[va, vb, n, h] = shape else {
        panic!("embed_sum shape is [va, vb, n, h], got {shape:?}")
    };
    let ids = |v: usize, mul: u64| {
        let ids: Vec<u32> = (0..n as u64)
            .map(|k| ((k * mul) % v as u64) as u32)
            .collect();
        Tensor::from_vec(ids, n, dev).unwrap()
    };
    vec![
        randn(0.0, 1.0, &[va, h], dtype, dev),
        ids(va, 2_654_435_761),
        randn(0.0, 0.5, &[vb, h], dtype, dev),
        ids(vb, 7),
    ]
}

/// x, residual `[.., n]` and params `[3, n]` (projection bias, weight, bias).
fn add_layer_norm_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let n = *shape.last().unwrap();
    let params = Tensor::stack(
        &[
            randn(0.0, 0.5, &[n], dtype, dev),
            randn(1.0, 0.2, &[n], dtype, dev),
            randn(0.0, 0.2, &[n], dtype, dev),
        ],
        0,
    )
    .unwrap();
    vec![
        randn(0.3, 1.5, shape, dtype, dev),
        randn(0.0, 1.0, shape, dtype, dev),
        params,
    ]
}

/// transformers' LayerNorm after the bias and residual adds (each rounded
/// to the dtype): statistics in f32, centred variance.
fn add_layer_norm_composed(
    x: &Tensor,
    r: &Tensor,
    p: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let v = (x.broadcast_add(&p.get(0)?)? + r)?.to_dtype(DType::F32)?;
    let centred = v.broadcast_sub(&v.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let pf = p.to_dtype(DType::F32)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&pf.get(1)?)?
        .broadcast_add(&pf.get(2)?)?
        .to_dtype(dtype)
}

/// qkv `[b, s, (q + 2 kv) d]`, its bias, and a `[q, kv, d]`-shaped marker
/// carrying the head counts.
fn split_heads_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let &[b, s, q, kv, d] = shape else {
        panic!("split_heads shape is [b, s, q, kv, d], got {shape:?}")
    };
    let w = (q + 2 * kv) * d;
    vec![
        randn(0.0, 1.0, &[b, s, w], dtype, dev),
        randn(0.0, 0.5, &[w], dtype, dev),
        Tensor::zeros((q, kv, d), dtype, dev).unwrap(),
    ]
}

fn heads_of(_qkv: &Tensor, marker: &[usize]) -> Heads {
    Heads {
        q: marker[0],
        kv: marker[1],
        dim: marker[2],
    }
}

/// The tensors flattened and concatenated (to compare several outputs).
fn flat(ts: &[Tensor]) -> candle_core::Result<Tensor> {
    let parts = ts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

fn split_heads_composed(t: &[Tensor]) -> candle_core::Result<Tensor> {
    let (b, s, _) = t[0].dims3()?;
    let h = heads_of(&t[0], t[2].dims());
    let y = t[0].broadcast_add(&t[1])?;
    let part = |start: usize, n: usize| {
        y.narrow(2, start * h.dim, n * h.dim)?
            .reshape((b, s, n, h.dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    flat(&[part(0, h.q)?, part(h.q, h.kv)?, part(h.q + h.kv, h.kv)?])
}

thread_local! {
    /// The input generator's state: [`errors`] reseeds it per row, shape
    /// and dtype, so every case sees the same inputs in every run (Candle's
    /// CPU generator cannot be seeded; unseeded inputs made one f16 decode
    /// row miss its bound in about one run of twelve).
    static RNG: std::cell::Cell<u64> = const { std::cell::Cell::new(0x9e37_79b9_7f4a_7c15) };
}

fn reseed(row: &str, shape: &[usize], dtype: DType) {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: the same seed in every run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (row, shape, dtype.as_str()).hash(&mut h);
    RNG.set(h.finish());
}

/// splitmix64.
fn next_u64() -> u64 {
    let s = RNG.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
    RNG.set(s);
    let mut z = s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Normal samples (Box-Muller) from the seeded generator, made on the host
/// and moved to `dev`.
fn randn(mean: f32, std: f32, shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let uniform = || ((next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        v.push(mean + std * (r * t.cos()) as f32);
        v.push(mean + std * (r * t.sin()) as f32);
    }
    v.truncate(n);
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

fn rms_norm_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let hidden = *shape.last().unwrap();
    vec![
        randn(0.0, 1.5, shape, dtype, dev),
        randn(1.0, 0.2, &[hidden], dtype, dev),
    ]
}

/// x, w (as rms_norm) and a residual like x.
fn add_rms_norm_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let mut inputs = rms_norm_inputs(shape, dtype, dev);
    inputs.push(randn(0.0, 1.0, shape, dtype, dev));
    inputs
}

fn swiglu_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    // Gates spread over silu's curved region and both tails.
    vec![
        randn(0.0, 2.0, shape, dtype, dev),
        randn(0.0, 1.0, shape, dtype, dev),
    ]
}

/// Forward and gradient errors of one row at one shape and dtype:
/// `(forward, [d input 0, d input 1, ...])`.
fn errors(row: &Row, shape: &[usize], dtype: DType) -> (f32, Vec<f32>) {
    let dev = device();
    reseed(row.name, shape, dtype);
    let mut inputs = (row.inputs)(shape, dtype, &dev);
    let vars: Vec<Var> = inputs[..row.grads]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    for (input, var) in inputs.iter_mut().zip(&vars) {
        *input = var.as_tensor().clone();
    }
    let ours = (row.fused)(&inputs).unwrap();
    let theirs = (row.composed)(&inputs).unwrap();
    assert_eq!(ours.dims(), theirs.dims(), "{}: output shape", row.name);
    assert_eq!(ours.dtype(), dtype, "{}: output dtype", row.name);
    let forward = rel_diff(&ours, &theirs);

    // Gradients of a random-weighted sum, both paths through Candle's
    // autograd: the weights are d(loss)/d(output), the same for both.
    let weights = randn(0.0, 1.0, ours.dims(), dtype, &dev);
    let loss = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap();
    let g_ours = loss(ours).backward().unwrap();
    let g_theirs = loss(theirs).backward().unwrap();
    let backward = vars
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let a = g_ours
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient reaches input {i}", row.name));
            let b = g_theirs.get(v.as_tensor()).unwrap();
            assert_eq!(a.dims(), v.dims(), "{}: gradient {i} shape", row.name);
            assert_eq!(a.dtype(), dtype, "{}: gradient {i} dtype", row.name);
            rel_diff(a, b)
        })
        .collect();
    (forward, backward)
}

#[test]
fn fused_kernels_match_their_compositions_forward_and_backward() {
    for row in KERNELS {
        for &(dtype, fwd_tol, bwd_tol) in row.tolerances {
            if !(row.runs_on)(dtype, &device()) {
                continue;
            }
            // Worst case over the row's shapes, printed for BENCHMARKS-style
            // bookkeeping (`-- --nocapture`).
            let mut worst_fwd = 0f32;
            let mut worst_bwd = Vec::new();
            for &shape in row.shapes {
                let (fwd, bwd) = errors(row, shape, dtype);
                let what = format!("{} {dtype:?} {shape:?}", row.name);
                assert!(
                    fwd <= fwd_tol,
                    "{what}: forward differs by {fwd} (relative)"
                );
                for (i, &d) in bwd.iter().enumerate() {
                    assert!(
                        d <= bwd_tol,
                        "{what}: gradient of input {i} differs by {d} (relative)"
                    );
                }
                worst_fwd = worst_fwd.max(fwd);
                worst_bwd.resize(bwd.len(), 0f32);
                for (w, d) in worst_bwd.iter_mut().zip(bwd) {
                    *w = w.max(d);
                }
            }
            let grads: Vec<String> = worst_bwd.iter().map(|d| format!("{d:.2e}")).collect();
            eprintln!(
                "{} {dtype:?}: max relative error forward {worst_fwd:.2e}, gradients [{}]",
                row.name,
                grads.join(", ")
            );
        }
    }
}

#[test]
fn fused_kernels_accept_non_contiguous_inputs() {
    // Transposed views: the public functions make their inputs contiguous.
    let dev = device();
    let gate = randn(0.0, 2.0, &[40, 24], DType::F32, &dev).t().unwrap();
    let up = randn(0.0, 1.0, &[40, 24], DType::F32, &dev).t().unwrap();
    let d = rel_diff(
        &swiglu(&gate, &up).unwrap(),
        &(gate.silu().unwrap() * &up).unwrap(),
    );
    assert!(d <= 1e-5, "swiglu on transposed inputs differs by {d}");

    let x = randn(0.0, 1.5, &[40, 24], DType::F32, &dev).t().unwrap();
    let w = randn(1.0, 0.2, &[40], DType::F32, &dev);
    let d = rel_diff(
        &rms_norm(&x, &w, EPS).unwrap(),
        &rms_norm_composed(&x, &w, f64::from(EPS)).unwrap(),
    );
    assert!(d <= 1e-5, "rms_norm on a transposed input differs by {d}");
}

#[test]
fn rms_norm_rejects_mismatched_inputs() {
    let dev = device();
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    assert!(rms_norm(&x, &Tensor::ones(7, DType::F32, &dev).unwrap(), 1e-6).is_err());
    assert!(rms_norm(&x, &Tensor::ones(8, DType::F16, &dev).unwrap(), 1e-6).is_err());
}

#[test]
fn embed_sum_rejects_bad_inputs_and_never_reads_outside_a_table() {
    let dev = device();
    let table = |rows: usize, dtype| Tensor::ones((rows, 16), dtype, &dev).unwrap();
    let ids = |v: &[u32]| Tensor::new(v, &dev).unwrap();
    let (a, b) = (table(4, DType::F32), table(3, DType::F32));
    assert!(embed_sum(&a, &ids(&[0, 1]), &table(3, DType::F16), &ids(&[0, 1])).is_err());
    assert!(embed_sum(&a, &ids(&[0, 1]), &b, &ids(&[0])).is_err());
    assert!(embed_sum(
        &a,
        &ids(&[0, 1]),
        &Tensor::ones((3, 8), DType::F32, &dev).unwrap(),
        &ids(&[0, 1])
    )
    .is_err());
    // An id past a table: an error on the CPU; NaN rows from the CUDA
    // kernel (which does not copy the ids back to check them).
    match embed_sum(&a, &ids(&[0, 4]), &b, &ids(&[0, 2])) {
        Err(_) => assert!(!dev.is_cuda()),
        Ok(out) => {
            let rows = out.to_vec2::<f32>().unwrap();
            assert!(rows[0].iter().all(|&v| v == 2.0) && rows[1].iter().all(|v| v.is_nan()));
        }
    }
}

#[test]
fn swiglu_rejects_mismatched_inputs() {
    let dev = device();
    let gate = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let up = |shape: (usize, usize), dtype| Tensor::zeros(shape, dtype, &dev).unwrap();
    assert!(swiglu(&gate, &up((2, 7), DType::F32)).is_err());
    assert!(swiglu(&gate, &up((8, 2), DType::F32)).is_err());
    assert!(swiglu(&gate, &up((2, 8), DType::BF16)).is_err());
    // Integer tensors have no kernel.
    let ints = Tensor::zeros((2, 8), DType::U32, &dev).unwrap();
    assert!(swiglu(&ints, &ints).is_err());
}

/// The dtype the attention tests use on `device()`: f32 on the CPU, bf16 on
/// CUDA (the kernel's dtypes).
fn attention_dtype(dev: &Device) -> (DType, f32) {
    if dev.is_cuda() {
        (DType::BF16, 2e-2)
    } else {
        (DType::F32, 1e-5)
    }
}

#[test]
fn flash_attention_accepts_views() {
    // The decoders' layout: [b, s, heads, d] projections transposed to
    // [b, heads, s, d] (not contiguous), and a contiguous view that starts
    // at an odd element (the kernel wants 16-byte aligned rows: copied).
    let dev = device();
    let (dtype, tol) = attention_dtype(&dev);
    let (b, s, h, kv, d) = (2, 11, 4, 2, 64);
    let q = randn(0.0, 1.0, &[b, s, h, d], dtype, &dev)
        .transpose(1, 2)
        .unwrap();
    let k = randn(0.0, 1.0, &[b, s, kv, d], dtype, &dev)
        .transpose(1, 2)
        .unwrap();
    let n = b * kv * s * d;
    let v = randn(0.0, 1.0, &[n + 3], dtype, &dev)
        .narrow(0, 3, n)
        .unwrap()
        .reshape((b, kv, s, d))
        .unwrap();
    let ours = flash_attention(&q, &k, &v, None, 0.125, true, None).unwrap();
    let theirs = attention_composed(&[q, k, v], None, true, None).unwrap();
    let diff = rel_diff(&ours, &theirs);
    assert!(diff <= tol, "flash_attention on views differs by {diff}");
}

/// An encoder's q, k and v as views of its one fused projection
/// `[b, s, 3, h, d]` (what `models::encoder` hands the kernel on CUDA: read
/// in place, no split copy), padded and packed, against the composed
/// attention of contiguous copies in f32; and k, v views with different
/// strides (copied first).
#[test]
fn flash_attention_reads_a_fused_projection_in_place() {
    let dev = device();
    let (dtype, tol) = attention_dtype(&dev);
    let f32_of = |x: &Tensor| x.to_dtype(DType::F32).unwrap().contiguous().unwrap();
    for (b, s, h, d) in [(3, 77, 4, 32), (2, 130, 2, 64)] {
        let qkv = randn(0.0, 1.0, &[b, s, 3, h, d], dtype, &dev);
        let part = |i: usize| {
            qkv.narrow(2, i, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let scale = 1.0 / (d as f64).sqrt();
        let theirs = merge_heads(
            &attention_composed(&[f32_of(&q), f32_of(&k), f32_of(&v)], None, false, None).unwrap(),
        )
        .unwrap();
        let ours = flash_attention_merged(&q, &k, &v, None, scale, false, None).unwrap();
        let diff = rel_diff(&f32_of(&ours), &theirs);
        assert!(
            diff <= tol,
            "fused-projection views b {b} s {s} d {d}: {diff}"
        );
        // v copied out of the fused tensor: k and v strides differ.
        let ours =
            flash_attention_merged(&q, &k, &v.contiguous().unwrap(), None, scale, false, None)
                .unwrap();
        let diff = rel_diff(&f32_of(&ours), &theirs);
        assert!(diff <= tol, "k view, v contiguous, d {d}: {diff}");
        // The same rows packed end to end: [1, tokens, 3, h, d] views.
        let lengths: Vec<usize> = (0..b).map(|i| s - 9 * i).collect();
        let seqs = PackedSeqs::new(&lengths, &dev, dtype, d).unwrap();
        let rows: Vec<Tensor> = lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| qkv.get(i).unwrap().narrow(0, 0, n).unwrap())
            .collect();
        let packed = Tensor::cat(&rows, 0).unwrap().unsqueeze(0).unwrap();
        let ppart = |i: usize| {
            packed
                .narrow(2, i, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let ours = attention_packed(&ppart(0), &ppart(1), &ppart(2), &seqs, None, scale).unwrap();
        for (i, w) in seqs.offsets().windows(2).enumerate() {
            let n = w[1] - w[0];
            let one = |x: &Tensor| f32_of(&x.narrow(0, i, 1).unwrap().narrow(2, 0, n).unwrap());
            let want = merge_heads(
                &attention_composed(&[one(&q), one(&k), one(&v)], None, false, None).unwrap(),
            )
            .unwrap();
            let got = f32_of(&ours.narrow(1, w[0], n).unwrap());
            let diff = rel_diff(&got, &want);
            assert!(
                diff <= tol,
                "packed fused-projection views, sequence {i}, d {d}: {diff}"
            );
        }
    }
}

/// `gemm_bias_act` (cuBLASLt with the bias and activation in the epilogue;
/// CUDA, bf16/f16, f32 without GELU) against `act(x Wᵀ + b)` composed in
/// f32 from the same values: bf16/f16 within 1e-2 relative (the erf GELU
/// runs in the epilogue's tanh form, at most 4.7e-4 apart), f32 within
/// 1e-5, at 600 rows, at 5 and 1 (a single
/// query's tokens), 4,096 and 3,000 (algorithms timed for their row
/// bucket, then reused), each shape twice with different biases (the plan
/// made for a shape is reused with the next call's bias) and without one;
/// `None` wherever the path does not apply, so callers fall back to their
/// own GEMM.
#[test]
fn gemm_epilogue_matches_composed() {
    let dev = device();
    let f32_of = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let w = randn(0.0, 0.2, &[200, 96], dtype, &dev);
        // 4,096 and 3,000 rows: timed algorithms, the second reusing the
        // first's bucket (4,096).
        for shape in [
            &[2, 300, 96][..],
            &[1, 5, 96],
            &[1, 96],
            &[4096, 96],
            &[3000, 96],
        ] {
            let x = randn(0.0, 1.0, shape, dtype, &dev);
            for bias_mean in [Some(0.0), Some(2.0), None] {
                let bias = bias_mean.map(|m| randn(m, 1.0, &[200], dtype, &dev));
                let prod = f32_of(&x)
                    .broadcast_matmul(&f32_of(&w).t().unwrap())
                    .unwrap();
                let pre = match &bias {
                    Some(b) => prod.broadcast_add(&f32_of(b)).unwrap(),
                    None => prod,
                };
                for act in [
                    Activation::None,
                    Activation::Relu,
                    Activation::GeluErf,
                    Activation::GeluTanh,
                ] {
                    let ours = gemm_bias_act(&x, &w, bias.as_ref(), act).unwrap();
                    let gelu = matches!(act, Activation::GeluErf | Activation::GeluTanh);
                    if !dev.is_cuda() || (dtype == DType::F32 && gelu) {
                        assert!(
                            ours.is_none(),
                            "gemm_bias_act ran on {dev:?} {dtype:?} {act:?}"
                        );
                        continue;
                    }
                    let ours = ours.unwrap_or_else(|| {
                        panic!("no epilogue path for {dtype:?} {act:?} {shape:?}")
                    });
                    assert_eq!(ours.dims(), pre.dims());
                    let theirs = match act {
                        Activation::None => pre.clone(),
                        Activation::Relu => pre.relu().unwrap(),
                        Activation::GeluErf => pre.gelu_erf().unwrap(),
                        _ => pre.gelu().unwrap(),
                    };
                    let diff = rel_diff(&f32_of(&ours), &theirs);
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                    assert!(
                        diff <= tol,
                        "gemm_bias_act {dtype:?} {act:?} {shape:?}: relative diff {diff}"
                    );
                }
            }
        }
    }
    // Not taken: SiLU (no such epilogue).
    let x = randn(0.0, 1.0, &[600, 96], DType::F32, &dev);
    let w = randn(0.0, 0.2, &[200, 96], DType::F32, &dev);
    let bias = randn(0.0, 1.0, &[200], DType::F32, &dev);
    let (xb, wb, bb) = (
        x.to_dtype(DType::BF16).unwrap(),
        w.to_dtype(DType::BF16).unwrap(),
        bias.to_dtype(DType::BF16).unwrap(),
    );
    assert!(gemm_bias_act(&xb, &wb, Some(&bb), Activation::Silu)
        .unwrap()
        .is_none());
    if dev.is_cuda() {
        // A bias of the wrong width is an error, not a wrong answer.
        let short = bb.narrow(0, 0, 100).unwrap();
        assert!(gemm_bias_act(&xb, &wb, Some(&short), Activation::None).is_err());
    }
}

#[test]
fn flash_attention_rows_that_see_no_key_are_zero() {
    // Causal with more queries than keys: query 0 sits at position -1 and
    // sees nothing. Its output is 0 and every gradient stays finite.
    let dev = device();
    let (dtype, _) = attention_dtype(&dev);
    let q = Var::from_tensor(&randn(0.0, 1.0, &[1, 2, 3, 32], dtype, &dev)).unwrap();
    let k = Var::from_tensor(&randn(0.0, 1.0, &[1, 1, 2, 32], dtype, &dev)).unwrap();
    let v = Var::from_tensor(&randn(0.0, 1.0, &[1, 1, 2, 32], dtype, &dev)).unwrap();
    let out = flash_attention(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        None,
        0.2,
        true,
        None,
    )
    .unwrap();
    let out32 = out.to_dtype(DType::F32).unwrap();
    let first = out32
        .narrow(2, 0, 1)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(first.to_scalar::<f32>().unwrap(), 0.0);
    let grads = out32.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for var in [&q, &k, &v] {
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let finite = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(finite.iter().all(|x| x.is_finite()), "non-finite gradient");
    }
}

/// Sequences packed end to end (`layers::attention_packed`: the packed
/// kernel on CUDA in bf16, a loop over sequences elsewhere) against each
/// sequence's attention alone, composed in f32 from the same values:
/// lengths crossing the kernel's 64-row tiles, one of a single token, head
/// dims 32 and 64, grouped heads, with and without a position-like bias
/// `[1, h, n, n]` larger than the longest sequence.
#[test]
fn packed_attention_equals_each_sequence_alone() {
    let dev = device();
    let (dtype, tol) = attention_dtype(&dev);
    let lengths = [130usize, 64, 65, 1, 37];
    let tokens: usize = lengths.iter().sum();
    // On CUDA the f32 kernel too (head dims 32 and 64), within 1e-5.
    let mut cases = vec![
        ((4, 4, 32, false), dtype, tol),
        ((4, 4, 32, true), dtype, tol),
        ((4, 2, 64, true), dtype, tol),
    ];
    if dev.is_cuda() {
        cases.extend([
            ((4, 4, 32, false), DType::F32, 1e-5),
            ((4, 4, 32, true), DType::F32, 1e-5),
            ((4, 2, 64, true), DType::F32, 1e-5),
        ]);
    }
    for ((h, kv, d, biased), dtype, tol) in cases {
        let seqs = PackedSeqs::new(&lengths, &dev, dtype, d).unwrap();
        assert_eq!(seqs.offsets().last(), Some(&tokens));
        let q = randn(0.0, 1.0, &[1, h, tokens, d], dtype, &dev);
        let k = randn(0.0, 1.0, &[1, kv, tokens, d], dtype, &dev);
        let v = randn(0.0, 1.0, &[1, kv, tokens, d], dtype, &dev);
        let n = 140;
        let bias = biased.then(|| randn(0.0, 2.0, &[1, h, n, n], DType::F32, &dev));
        let scale = 1.0 / (d as f64).sqrt();
        let ours = attention_packed(&q, &k, &v, &seqs, bias.as_ref(), scale).unwrap();
        assert_eq!(ours.dims(), [1, tokens, h * d]);
        let f32_of = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let mut parts = Vec::new();
        for w in seqs.offsets().windows(2) {
            let (start, len) = (w[0], w[1] - w[0]);
            let part = |x: &Tensor| f32_of(&x.narrow(2, start, len).unwrap());
            let b = bias
                .as_ref()
                .map(|b| b.narrow(2, 0, len).unwrap().narrow(3, 0, len).unwrap());
            let o = attention_composed(&[part(&q), part(&k), part(&v)], b.as_ref(), false, None)
                .unwrap();
            parts.push(merge_heads(&o).unwrap());
        }
        let theirs = Tensor::cat(&parts, 1).unwrap();
        let diff = rel_diff(&f32_of(&ours), &theirs);
        assert!(
            diff <= tol,
            "packed attention h {h} kv {kv} d {d} bias {biased}: relative diff {diff}"
        );
        eprintln!("packed attention h {h} kv {kv} d {d} bias {biased} {dtype:?}: {diff:.2e}");
    }
    // Bad input: offsets past the tokens, a bias smaller than a sequence.
    let (dtype, _) = attention_dtype(&dev);
    let seqs = PackedSeqs::new(&[3, 4], &dev, dtype, 32).unwrap();
    let q = randn(0.0, 1.0, &[1, 2, 6, 32], dtype, &dev);
    assert!(attention_packed(&q, &q, &q, &seqs, None, 1.0).is_err());
    let q = randn(0.0, 1.0, &[1, 2, 7, 32], dtype, &dev);
    let small = Tensor::zeros((1, 2, 3, 3), DType::F32, &dev).unwrap();
    assert!(attention_packed(&q, &q, &q, &seqs, Some(&small), 1.0).is_err());
    assert!(PackedSeqs::new(&[3, 0], &dev, dtype, 32).is_err());
    assert!(PackedSeqs::new(&[], &dev, dtype, 32).is_err());
}

/// f32 attention for inference through [`attention`] (on CUDA the fused
/// kernel's f32 forward at head dims 32 and 64: the encoders' padded
/// batches) against the composed path in f32, within 1e-5 relative: a
/// padding mask (batch `i` hides its last `2i` keys), MPNet's kind of
/// position bias, none; grouped heads; 130 and 77 rows (a partial last
/// tile); the fused q/k/v projection's views read in place; and the
/// merged forward's causal and window masks.
#[test]
fn f32_attention_forward_matches_composed() {
    let dev = device();
    for (b, h, kv, s, d) in [(3, 4, 4, 130, 32), (2, 4, 2, 77, 64), (1, 2, 2, 64, 32)] {
        let qkv = randn(0.0, 1.0, &[b, s, 3, h, d], DType::F32, &dev);
        let part = |i: usize, heads: usize| {
            qkv.narrow(2, i, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .narrow(2, 0, heads)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let (q, k, v) = (part(0, h), part(1, kv), part(2, kv));
        let padding: Vec<f32> = (0..b * s)
            .map(|n| {
                if n % s + 2 * (n / s) >= s {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let padding = Tensor::from_vec(padding, (b, 1, 1, s), &dev).unwrap();
        let position = randn(0.0, 2.0, &[1, h, s, s], DType::F32, &dev);
        for (what, bias) in [
            ("padding", Some(&padding)),
            ("position", Some(&position)),
            ("none", None),
        ] {
            let ours = attention(&q, &k, &v, &Mask::bidirectional(bias), scale(&q)).unwrap();
            let inputs = [
                q.contiguous().unwrap(),
                k.contiguous().unwrap(),
                v.contiguous().unwrap(),
            ];
            let theirs =
                merge_heads(&attention_composed(&inputs, bias, false, None).unwrap()).unwrap();
            let diff = rel_diff(&ours, &theirs);
            assert!(
                diff <= 1e-5,
                "f32 attention b {b} h {h}/{kv} s {s} d {d} {what}: {diff}"
            );
        }
    }
    // The kernel's causal and window masks in f32 (decoders keep the
    // composed path, but the merged forward takes them).
    let x = attention_inputs(&[2, 4, 2, 130, 130, 32], DType::F32, &dev);
    for window in [None, Some(7)] {
        let ours =
            flash_attention_merged(&x[0], &x[1], &x[2], None, scale(&x[0]), true, window).unwrap();
        let theirs = merge_heads(&attention_composed(&x, None, true, window).unwrap()).unwrap();
        let diff = rel_diff(&ours, &theirs);
        assert!(
            diff <= 1e-5,
            "f32 causal attention window {window:?}: {diff}"
        );
    }
    if dev.is_cuda() {
        // No f32 kernel at head dim 128, nor with gradients: the merged
        // forward refuses, `attention` takes the composed path.
        let x = randn(0.0, 1.0, &[1, 2, 5, 128], DType::F32, &dev);
        assert!(flash_attention_merged(&x, &x, &x, None, 1.0, false, None).is_err());
    }
}

#[test]
fn flash_attention_rejects_mismatched_inputs() {
    let dev = device();
    let (f, _) = attention_dtype(&dev);
    let z = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &dev).unwrap();
    let attn =
        |q: &Tensor, k: &Tensor, v: &Tensor| flash_attention(q, k, v, None, 1.0, false, None);
    let (q, k) = (z(&[1, 4, 3, 32], f), z(&[1, 2, 5, 32], f));
    assert!(attn(&q, &k, &k).is_ok());
    // 4 query heads for 3 kv heads; head dims differ; batch differs.
    let k3 = z(&[1, 3, 5, 32], f);
    assert!(attn(&q, &k3, &k3).is_err());
    let k16 = z(&[1, 2, 5, 16], f);
    assert!(attn(&q, &k16, &k16).is_err());
    let kb = z(&[2, 2, 5, 32], f);
    assert!(attn(&q, &kb, &kb).is_err());
    // v unlike k; mixed dtypes; a window of 0; a bias that does not broadcast.
    assert!(attn(&q, &k, &z(&[1, 2, 4, 32], f)).is_err());
    assert!(attn(&q, &k, &z(&[1, 2, 5, 32], DType::F16)).is_err());
    assert!(flash_attention(&q, &k, &k, None, 1.0, true, Some(0)).is_err());
    let bias = z(&[1, 1, 3, 4], DType::F32);
    assert!(flash_attention(&q, &k, &k, Some(&bias), 1.0, false, None).is_err());
    if dev.is_cuda() {
        // f32 and head dims without a kernel take the composed path instead.
        let q32 = z(&[1, 4, 3, 32], DType::F32);
        let k32 = z(&[1, 2, 5, 32], DType::F32);
        assert!(attn(&q32, &k32, &k32).is_err());
        let (q48, k48) = (z(&[1, 4, 3, 48], f), z(&[1, 2, 5, 48], f));
        assert!(attn(&q48, &k48, &k48).is_err());
    }
}

/// `kv_write` puts a step's rows at the device-held position of a
/// preallocated cache and leaves every other row alone, as a slice
/// assignment at that offset does; rows past the capacity are skipped.
#[test]
fn kv_write_writes_rows_at_the_held_position() {
    let dev = device();
    for dtype in [DType::F32, DType::BF16] {
        let cache = Tensor::randn(0f32, 1.0, (2, 3, 10, 8), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let rows = Tensor::randn(0f32, 1.0, (2, 3, 2, 8), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let want = cache.copy().unwrap();
        want.slice_set(&rows, 2, 4).unwrap();
        let pos = Tensor::new(&[4u32], &dev).unwrap();
        metal_candle::backend::kernels::kv_write(&cache, &rows, &pos).unwrap();
        let diff = abs_max(
            &(cache.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap()).unwrap(),
        );
        assert_eq!(diff, 0.0, "{dtype:?}");
        // At the last position only the first row fits.
        let want = cache.copy().unwrap();
        let last = Tensor::new(&[9u32], &dev).unwrap();
        metal_candle::backend::kernels::kv_write(&cache, &rows, &last).unwrap();
        want.slice_set(&rows.narrow(2, 0, 1).unwrap().contiguous().unwrap(), 2, 9)
            .unwrap();
        let diff = abs_max(
            &(cache.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap()).unwrap(),
        );
        assert_eq!(diff, 0.0, "{dtype:?} at the end");
    }
}
