//! Our fused kernels against compositions of Candle's differentiable ops:
//! forward values and gradients (runs on CUDA too: METAL_CANDLE_TEST_DEVICE=cuda).

use crate::common::{device, max_abs_diff, rel_diff};
use candle_core::{DType, Tensor, Var, D};
use metal_candle::backend::kernels::rms_norm;

/// The reference composition (transformers' Qwen2RMSNorm, op by op).
fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32).unwrap();
    let var = xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let normed = xf
        .broadcast_mul(&(var + eps).unwrap().sqrt().unwrap().recip().unwrap())
        .unwrap();
    normed.to_dtype(dtype).unwrap().broadcast_mul(w).unwrap()
}

fn inputs(rows: usize, hidden: usize, dtype: DType) -> (Var, Var, Tensor) {
    let dev = device();
    let x = (Tensor::randn(0f32, 1.5, (rows / 3, 3, hidden), &dev).unwrap())
        .to_dtype(dtype)
        .unwrap();
    let w = (Tensor::randn(1f32, 0.2, hidden, &dev).unwrap())
        .to_dtype(dtype)
        .unwrap();
    let dy = Tensor::randn(0f32, 1.0, (rows / 3, 3, hidden), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&w).unwrap(),
        dy,
    )
}

#[test]
fn rms_norm_forward_and_gradients_match_the_composition_f32() {
    // Hidden sizes below, at and above one warp / one block of threads.
    for hidden in [7, 64, 896, 1500] {
        let (x, w, dy) = inputs(12, hidden, DType::F32);
        let ours = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        let theirs = rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-6);
        let d = max_abs_diff(&ours, &theirs);
        assert!(d < 1e-5, "hidden {hidden}: forward differs by {d}");

        // Gradients of sum(y * dy): both paths through candle's autograd.
        let g_ours = (ours * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("w", &w)] {
            let a = g_ours
                .get(v.as_tensor())
                .expect("gradient reaches the input");
            let b = g_theirs.get(v.as_tensor()).unwrap();
            let d = rel_diff(a, b);
            assert!(
                d < 1e-5,
                "hidden {hidden}: d{name} differs by {d} (relative)"
            );
        }
    }
}

#[test]
fn rms_norm_half_precision_matches_the_composition() {
    // bf16/f16 keep 8/11 mantissa bits: the output is compared at the
    // dtype's resolution (a few ulps of values of magnitude ~3), gradients
    // relative to their scale.
    for (dtype, tol) in [(DType::BF16, 3e-2), (DType::F16, 4e-3)] {
        let (x, w, dy) = inputs(9, 896, dtype);
        let ours = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        let theirs = rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-6);
        let d = max_abs_diff(&ours, &theirs);
        assert!(d <= tol, "{dtype:?}: forward differs by {d}");
        let g = (ours * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (theirs * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let a = g.get(x.as_tensor()).unwrap();
        let b = gt.get(x.as_tensor()).unwrap();
        let d = rel_diff(a, b);
        assert!(d < 2e-2, "{dtype:?}: dx differs by {d} (relative)");
    }
}

#[test]
fn rms_norm_rejects_mismatched_inputs() {
    let dev = device();
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    assert!(rms_norm(&x, &Tensor::ones(7, DType::F32, &dev).unwrap(), 1e-6).is_err());
    assert!(rms_norm(&x, &Tensor::ones(8, DType::F16, &dev).unwrap(), 1e-6).is_err());
}
