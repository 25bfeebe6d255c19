//! Our fused kernels against compositions of Candle's differentiable ops, as
//! one table: each row names a kernel, its fused function, the composed
//! reference and the shapes to try; every row runs in f32, bf16 and f16,
//! forward values and the gradients with respect to every input, on
//! `device()` (CUDA with METAL_CANDLE_TEST_DEVICE=cuda, so the GPU tier runs
//! the same table). Adding a kernel is adding a row.

use crate::common::{device, rel_diff};
use candle_core::{DType, Device, Tensor, Var, D};
use metal_candle::backend::kernels::{rms_norm, swiglu};

type Op = fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// One kernel under test.
struct Row {
    name: &'static str,
    /// Our fused op, on the inputs in order.
    fused: Op,
    /// The same function composed of Candle's differentiable ops.
    composed: Op,
    /// Random inputs for one shape (the first input's) and dtype.
    inputs: fn(&[usize], DType, &Device) -> Vec<Tensor>,
    shapes: &'static [&'static [usize]],
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
        ],
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

/// transformers' Qwen2RMSNorm, op by op (statistics in f32, the normalised
/// value rounded to the input dtype before the weight).
fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)
}

fn randn(mean: f32, std: f32, shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::randn(mean, std, shape, dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn rms_norm_inputs(shape: &[usize], dtype: DType, dev: &Device) -> Vec<Tensor> {
    let hidden = *shape.last().unwrap();
    vec![
        randn(0.0, 1.5, shape, dtype, dev),
        randn(1.0, 0.2, &[hidden], dtype, dev),
    ]
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
    let vars: Vec<Var> = (row.inputs)(shape, dtype, &dev)
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
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
        for &(dtype, fwd_tol, bwd_tol) in TOLERANCES {
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
