//! `LayerNorm(x + lin_bias + residual)` in one pass: what closes each half
//! of a post-norm encoder layer (BERT, MPNet), the projection's bias, the
//! residual add and the normalisation.
//!
//! Composed in Candle that is a broadcast add (the slowest kernel of an
//! encoder forward on an H200), an add and its `layer_norm` kernel, with two
//! full-size intermediates. Encoders are inference-only here and this op has
//! no backward: [`add_layer_norm`] takes Candle's differentiable ops when an
//! input tracks gradients, so no gradient is lost.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, D};

use super::cpu::{cpu_map, for_rows, CpuOp, Float};

/// `LayerNorm(x + lin_bias + residual)` over the last dimension, with
/// `params` = `[3, n]`: the projection bias, the norm's weight and its bias
/// (stacked once at load: a custom op takes at most three inputs).
///
/// # Errors
/// Shape or dtype mismatch (f32, bf16 and f16 are supported).
pub fn add_layer_norm(
    x: &Tensor,
    residual: &Tensor,
    params: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    if residual.dims() != x.dims() || params.dims() != [3, n] {
        candle_core::bail!(
            "add_layer_norm: x {:?}, residual {:?} and params {:?} (want [3, {n}]) disagree",
            x.dims(),
            residual.dims(),
            params.dims()
        );
    }
    if residual.dtype() != x.dtype() || params.dtype() != x.dtype() {
        candle_core::bail!("add_layer_norm: x, residual and params must share a dtype");
    }
    if crate::backend::autograd::needs_grad(&[x, residual, params]) {
        return composed(x, residual, params, eps);
    }
    x.contiguous()?.apply_op3_no_bwd(
        &residual.contiguous()?,
        &params.contiguous()?,
        &AddLayerNorm { eps },
    )
}

/// `LayerNorm(x)` over the last dimension with `params` = `[2, n]` (the
/// weight and bias) in one pass of the same kernel, without the residual
/// and projection bias: the encoders' embedding LayerNorm on the GPU, where
/// Candle's `layer_norm` took 115 us for MiniLM's b128 x 512 (H200, ncu),
/// about twice this kernel's time. Inference only: no backward, and
/// callers keep Candle's differentiable ops for gradient-tracking inputs.
///
/// # Errors
/// Shape or dtype mismatch (f32, bf16 and f16 are supported).
pub fn layer_norm(x: &Tensor, params: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    if params.dims() != [2, n] || params.dtype() != x.dtype() {
        candle_core::bail!(
            "layer_norm: x {:?} {:?} and params {:?} {:?} (want [2, {n}], same dtype) disagree",
            x.dims(),
            x.dtype(),
            params.dims(),
            params.dtype()
        );
    }
    x.contiguous()?
        .apply_op2_no_bwd(&params.contiguous()?, &AddLayerNorm { eps })
}

/// The same with Candle's differentiable ops (transformers' LayerNorm:
/// statistics in f32, centred variance).
fn composed(
    x: &Tensor,
    residual: &Tensor,
    params: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let v = (x.broadcast_add(&params.get(0)?)? + residual)?.to_dtype(DType::F32)?;
    let centred = v.broadcast_sub(&v.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + f64::from(eps))?.sqrt()?)?;
    let p = params.to_dtype(DType::F32)?;
    normed
        .broadcast_mul(&p.get(1)?)?
        .broadcast_add(&p.get(2)?)?
        .to_dtype(dtype)
}

/// As a three-input op: x, residual, params `[3, n]`; as a two-input op
/// (`layer_norm`): x, params `[2, n]` (no residual or projection bias).
struct AddLayerNorm {
    eps: f32,
}

impl CpuOp for AddLayerNorm {
    const NAME: &'static str = "add_layer_norm";

    fn run<T: Float>(&self, inputs: &[&[T]], layout: &Layout) -> candle_core::Result<Vec<T>> {
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let (x, r, lb, w, b) = match *inputs {
            [x, r, p] => {
                let (lb, rest) = p.split_at(n);
                let (w, b) = rest.split_at(n);
                (x, Some(r), lb, w, b)
            }
            [x, p] => {
                let (w, b) = p.split_at(n);
                (x, None, &[][..], w, b)
            }
            _ => candle_core::bail!("add_layer_norm: expected x, (residual,) params"),
        };
        let mut out = vec![T::from_f32(0.0); x.len()];
        for_rows(&mut out, n, |row, o| {
            let xr = &x[row * n..(row + 1) * n];
            let v: Vec<f32> = match r {
                Some(r) => {
                    let rr = &r[row * n..(row + 1) * n];
                    (0..n)
                        .map(|i| {
                            let s = T::from_f32(xr[i].to_f32() + lb[i].to_f32()).to_f32();
                            T::from_f32(s + rr[i].to_f32()).to_f32()
                        })
                        .collect()
                }
                None => xr.iter().map(|a| a.to_f32()).collect(),
            };
            let mean = v.iter().sum::<f32>() / n as f32;
            let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / n as f32;
            let rstd = 1.0 / (var + self.eps).sqrt();
            for (i, (oi, a)) in o.iter_mut().zip(&v).enumerate() {
                *oi = T::from_f32((a - mean) * rstd * w[i].to_f32() + b[i].to_f32());
            }
        });
        Ok(out)
    }
}

impl candle_core::CustomOp3 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "metal-candle-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = cpu_map(self, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((y, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_run(&[(s1, l1), (s2, l2), (s3, l3)])
    }
}

impl candle_core::CustomOp2 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "metal-candle-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = cpu_map(self, &[(s1, l1), (s2, l2)])?;
        Ok((y, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_run(&[(s1, l1), (s2, l2)])
    }
}

#[cfg(feature = "cuda")]
impl AddLayerNorm {
    /// Either kernel: `add_layer_norm_*` (x, residual, params) or
    /// `layer_norm_*` (x, params).
    fn cuda_run(
        &self,
        inputs: &[(&candle_core::CudaStorage, &Layout)],
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{launch, ptx, Arg};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let Some(&(s1, l1)) = inputs.first() else {
            candle_core::bail!("add_layer_norm: no inputs");
        };
        let shape = l1.shape().clone();
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let rows = shape.elem_count() / n;
        let (Ok(n_arg), Ok(rows_arg)) = (i32::try_from(n), i32::try_from(rows)) else {
            candle_core::bail!("add_layer_norm: {rows} rows of {n} elements are too many");
        };
        // Half a warp per row for rows of at most 64 16-byte vectors (the
        // .cu says why), else a warp; 128 threads a block.
        let lanes: usize = if n * s1.dtype().size_in_bytes() <= 64 * 16 {
            16
        } else {
            32
        };
        let args = [
            Arg::I32(rows_arg),
            Arg::I32(n_arg),
            Arg::F32(self.eps),
            Arg::I32(lanes as i32),
        ];
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(128 / lanes).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let base = if inputs.len() == 3 {
            "add_layer_norm"
        } else {
            "layer_norm"
        };
        let out = launch(
            &ptx::ADD_LAYER_NORM,
            base,
            inputs,
            shape.elem_count(),
            cfg,
            &args,
        )?;
        Ok((out, shape))
    }
}
