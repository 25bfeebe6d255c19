//! The shared layers: a `Linear` holds dense or quantized weights with the
//! adapter hook on both, and gradients flow through a quantized base.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor, Var};
use metal_candle::layers::{Linear, LinearAdapter};

use crate::common::{abs_max, device, max_abs_diff};

/// Adds a constant, to see the hook run.
#[derive(Debug)]
struct Plus(f64);

impl LinearAdapter for Plus {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        Tensor::ones((b, s, 48), x.dtype(), x.device())? * self.0
    }
}

fn weights() -> (Tensor, Tensor) {
    let dev = device();
    let w = Tensor::randn(0f32, 0.5, (48, 64), &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap();
    (w, x)
}

#[test]
fn quantized_linear_matches_its_dequantized_dense_twin() {
    let (w, x) = weights();
    // A QTensor made elsewhere goes in as it is.
    let q = Arc::new(
        QTensor::quantize(
            &w.to_device(&candle_core::Device::Cpu).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap(),
    );
    assert!(Linear::quantized(q, None, DType::F32)
        .unwrap()
        .is_quantized());
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        // Q4_K packs 256 values per block: pad the input width to 256.
        let (w, x) = if dtype == GgmlDType::Q4K {
            (
                w.pad_with_zeros(1, 0, 192).unwrap(),
                x.pad_with_zeros(2, 0, 192).unwrap(),
            )
        } else {
            (w.clone(), x.clone())
        };
        let bias = Tensor::randn(0f32, 0.1, 48, &device()).unwrap();
        let mut ql = Linear::quantize(&w, Some(bias.clone()), dtype).unwrap();
        assert!(ql.is_quantized());
        assert_eq!(
            (ql.in_features(), ql.out_features()),
            (w.dim(1).unwrap(), 48)
        );
        let dense = Linear::new(ql.dense_weight(DType::F32).unwrap(), Some(bias));
        let (yq, yd) = (ql.forward(&x).unwrap(), dense.forward(&x).unwrap());
        // Candle's quantized kernels also quantize the activations (Q8 per
        // block), so the product differs from the dequantized dense one by
        // that rounding: on these random inputs up to 1.4% of the output
        // scale (100 runs; 1% failed CI once), so 3%. A wrong layout or
        // scale is off by the whole scale.
        let scale = abs_max(&yd);
        let d = max_abs_diff(&yq, &yd);
        assert!(d <= 0.03 * scale, "{dtype:?}: {d} vs scale {scale}");
        // The adapter hook works on a quantized base.
        ql.set_adapter(Some(Arc::new(Plus(2.0))));
        let with = ql.forward(&x).unwrap();
        assert!(max_abs_diff(&(with - 2.0).unwrap(), &yq) < 1e-5);
        // Merging into a quantized base is refused, not silently re-quantized.
        assert!(ql
            .add_to_weight(&Tensor::zeros((48, w.dim(1).unwrap()), DType::F32, &device()).unwrap())
            .is_err());
    }
}

/// QLoRA's premise: adapters below a quantized layer get gradients, so the
/// quantized matmul must pass gradients to its input (Candle's has no
/// backward). Checked against the dense twin: dx = dy · W.
#[test]
fn gradients_flow_through_a_quantized_base() {
    let (w, few) = weights();
    let ql = Linear::quantize(&w, None, GgmlDType::Q8_0).unwrap();
    let dense = Linear::new(ql.dense_weight(DType::F32).unwrap(), None);
    // 6 rows take Candle's quantized kernels, 80 rows the dequantized
    // dense matmul.
    let many = Tensor::randn(0f32, 1.0, (2, 40, 64), &device()).unwrap();
    for x in [few, many] {
        let xv = Var::from_tensor(&x).unwrap();
        let (yq, yd) = (
            ql.forward(xv.as_tensor()).unwrap(),
            dense.forward(xv.as_tensor()).unwrap(),
        );
        if x.dim(1).unwrap() == 40 {
            // Many rows: exactly the dequantized model's product.
            let d = max_abs_diff(&yq, &yd);
            assert!(d <= 1e-5 * abs_max(&yd), "dequantized path: {d}");
        }
        let gq = yq.sum_all().unwrap().backward().unwrap();
        let gd = yd.sum_all().unwrap().backward().unwrap();
        let (gq, gd) = (
            gq.get(xv.as_tensor()).unwrap(),
            gd.get(xv.as_tensor()).unwrap(),
        );
        let d = max_abs_diff(gq, gd);
        assert!(
            d <= 1e-4,
            "input gradient through the quantized matmul: {d}"
        );
    }
}

/// A low-rank adapter `scale · (x Aᵀ) Bᵀ`, composed in Candle's ops;
/// `fuse` says whether it offers itself to the layer as a low-rank update
/// (the one-node training path) or not (the composed path).
#[derive(Debug)]
struct LowRankAdapter {
    a: Var,
    b: Var,
    scale: f64,
    fuse: bool,
}

impl LinearAdapter for LowRankAdapter {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (a, b) = (
            self.a.as_tensor().to_dtype(dtype)?,
            self.b.as_tensor().to_dtype(dtype)?,
        );
        let h = (x.broadcast_matmul(&a.t()?)? * self.scale)?;
        h.broadcast_matmul(&b.t()?)
    }

    fn low_rank(&self) -> Option<metal_candle::layers::LowRank> {
        self.fuse.then(|| metal_candle::layers::LowRank {
            a: self.a.as_tensor().clone(),
            b: self.b.as_tensor().clone(),
            scale: self.scale,
        })
    }
}

/// The training path that runs a frozen layer and its low-rank adapter as
/// one graph node gives the composed layer's output and gradients (x, A,
/// B): f32 within 1e-5 of scale, bf16 within 2e-2 (products in bf16 on
/// both paths, rounded in a different order).
#[test]
fn a_low_rank_adapter_as_one_node_equals_the_composed_layer() {
    let dev = device();
    for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
        let w = Tensor::randn(0f32, 0.5, (48, 64), &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.5, 48, &dev).unwrap();
        let a = Tensor::randn(0f32, 0.3, (4, 64), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, (48, 4), &dev).unwrap();
        let x0 = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (2, 3, 48), &dev).unwrap();
        let run = |fuse: bool| {
            let mut layer = Linear::new(
                w.to_dtype(dtype).unwrap(),
                Some(bias.to_dtype(dtype).unwrap()),
            );
            let adapter = LowRankAdapter {
                a: Var::from_tensor(&a).unwrap(),
                b: Var::from_tensor(&b).unwrap(),
                scale: 2.0,
                fuse,
            };
            let (va, vb) = (adapter.a.clone(), adapter.b.clone());
            layer.set_adapter(Some(Arc::new(adapter)));
            let x = Var::from_tensor(&x0.to_dtype(dtype).unwrap()).unwrap();
            let y = layer.forward(x.as_tensor()).unwrap();
            let loss = (y.to_dtype(DType::F32).unwrap() * &dy)
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let grad = |v: &Var| {
                g.get(v.as_tensor())
                    .expect("a gradient")
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            [
                y.to_dtype(DType::F32).unwrap(),
                grad(&x),
                grad(&va),
                grad(&vb),
            ]
        };
        let (fused, composed) = (run(true), run(false));
        for (name, (f, c)) in ["output", "dx", "dA", "dB"]
            .iter()
            .zip(fused.iter().zip(&composed))
        {
            let d = max_abs_diff(f, c) / abs_max(c);
            assert!(d <= tol, "{dtype:?} {name}: fused vs composed {d}");
        }
    }
}
