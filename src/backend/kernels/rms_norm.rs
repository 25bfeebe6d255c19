//! Fused RMSNorm with a backward pass.
//!
//! Candle's `candle_nn::ops::rms_norm` is fused but has no backward, so a
//! training graph built on it silently loses its gradients. This op is fused
//! in both directions: forward `y = w * to_dtype(x * rsqrt(mean(x²) + eps))`
//! (transformers' rounding), backward
//! `dx = r·g − x·r³·Σ(g·x)/n` with `g = dy·w`, `r = rsqrt(mean(x²) + eps)`
//! (one kernel), and `dw = Σ_rows dy · x·r` (composed reduction).

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, D};

use super::cpu::{cpu_map, for_rows, stacked, CpuOp, Float};

/// RMSNorm over the last dimension of `x` with weight `w` (`[hidden]`).
/// Differentiable with respect to both.
///
/// # Errors
/// Shape or dtype mismatch (f32, bf16 and f16 are supported).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let hidden = x.dim(D::Minus1)?;
    if w.dims() != [hidden] {
        candle_core::bail!(
            "rms_norm: weight {:?} does not match hidden size {hidden}",
            w.dims()
        );
    }
    if x.dtype() != w.dtype() {
        candle_core::bail!("rms_norm: x is {:?} but w is {:?}", x.dtype(), w.dtype());
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

/// `(x + r, rms_norm(x + r, w))`: a residual add and the RMSNorm after it,
/// one pass for inference (the sum rounded to the dtype, as the composed
/// add rounds it). With gradient-tracking inputs, the composed add and
/// [`rms_norm`] (both differentiable).
///
/// # Errors
/// Shape or dtype mismatch.
pub fn add_rms_norm(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    if x.dims() != r.dims() || x.dtype() != r.dtype() {
        candle_core::bail!(
            "add_rms_norm: x {:?} {:?} and r {:?} {:?} differ",
            x.dims(),
            x.dtype(),
            r.dims(),
            r.dtype()
        );
    }
    if crate::backend::autograd::needs_grad(&[x, r, w]) {
        let sum = (x + r)?;
        let normed = rms_norm(&sum, w, eps)?;
        return Ok((sum, normed));
    }
    let hidden = x.dim(D::Minus1)?;
    if w.dims() != [hidden] || w.dtype() != x.dtype() {
        candle_core::bail!("add_rms_norm: weight {:?} does not match x", w.dims());
    }
    let out = x.contiguous()?.apply_op3_no_bwd(
        &r.contiguous()?,
        &w.contiguous()?,
        &AddRmsNorm { eps },
    )?;
    Ok((out.get(0)?, out.get(1)?))
}

/// The input gradient of [`rms_norm`] (`x` and `dy` `[.., hidden]`, `w`
/// `[hidden]`, one kernel), for backward passes written by hand; the
/// weight's gradient is not formed.
///
/// # Errors
/// Shape or dtype mismatch.
pub(crate) fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &w.contiguous()?,
        &dy.contiguous()?,
        &RmsNormBackward { eps },
    )
}

struct RmsNorm {
    eps: f32,
}

struct AddRmsNorm {
    eps: f32,
}

impl CpuOp for AddRmsNorm {
    const NAME: &'static str = "add_rms_norm";

    /// Inputs `[x, r, w]`; output `[sum; normed]`.
    fn run<T: Float>(&self, inputs: &[&[T]], layout: &Layout) -> candle_core::Result<Vec<T>> {
        let &[x, r, w] = inputs else {
            candle_core::bail!("add_rms_norm: expected x, r and w");
        };
        let n = row_len(layout);
        // Rows of the output: the sums, then the normalised sums.
        let rows = x.len() / n;
        let mut out = vec![T::from_f32(0.0); 2 * x.len()];
        for_rows(&mut out, n, |i, o| {
            let src = i % rows * n;
            let sum = x[src..src + n]
                .iter()
                .zip(&r[src..src + n])
                .map(|(a, b)| T::from_f32(a.to_f32() + b.to_f32()));
            if i < rows {
                o.iter_mut().zip(sum).for_each(|(oi, v)| *oi = v);
            } else {
                let row: Vec<T> = sum.collect();
                let rs = rstd(&row, self.eps);
                for ((oi, v), wv) in o.iter_mut().zip(&row).zip(w) {
                    *oi = T::from_f32(T::from_f32(v.to_f32() * rs).to_f32() * wv.to_f32());
                }
            }
        });
        Ok(out)
    }
}

impl candle_core::CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "metal-candle-add-rms-norm"
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
        let out = cpu_map(self, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((out, stacked(l1)))
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
        use super::launch::{launch, ptx, rows_config, Arg};
        let n = row_len(l1);
        let rows = l1.shape().elem_count() / n;
        let Ok(n_arg) = i32::try_from(n) else {
            candle_core::bail!("add_rms_norm: rows of {n} elements are too long");
        };
        let args = [Arg::I32(n_arg), Arg::F32(self.eps), Arg::U64(rows as u64)];
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let cfg = rows_config(rows, n)?;
        let out = launch(
            &ptx::RMS_NORM,
            "add_rms_norm",
            &inputs,
            2 * rows * n,
            cfg,
            &args,
        )?;
        Ok((out, stacked(l1)))
    }
}

struct RmsNormBackward {
    eps: f32,
}

/// Row length: the last dimension of `x`, at least 1 (an empty row means an
/// empty tensor, which `chunks` would refuse).
fn row_len(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

fn rstd<T: Float>(row: &[T], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v.to_f32() * v.to_f32()).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CpuOp for RmsNorm {
    const NAME: &'static str = "rms_norm";

    /// Inputs `[x, w]`.
    fn run<T: Float>(&self, inputs: &[&[T]], layout: &Layout) -> candle_core::Result<Vec<T>> {
        let &[x, w] = inputs else {
            candle_core::bail!("rms_norm: expected x and w");
        };
        let n = row_len(layout);
        let mut y = vec![T::from_f32(0.0); x.len()];
        for_rows(&mut y, n, |i, o| {
            let row = &x[i * n..(i + 1) * n];
            let r = rstd(row, self.eps);
            for ((oi, v), wv) in o.iter_mut().zip(row).zip(w) {
                *oi = T::from_f32(T::from_f32(v.to_f32() * r).to_f32() * wv.to_f32());
            }
        });
        Ok(y)
    }
}

impl CpuOp for RmsNormBackward {
    const NAME: &'static str = "rms_norm backward";

    /// Inputs `[x, w, dy]`; output dx.
    fn run<T: Float>(&self, inputs: &[&[T]], layout: &Layout) -> candle_core::Result<Vec<T>> {
        let &[x, w, dy] = inputs else {
            candle_core::bail!("rms_norm backward: expected x, w and dy");
        };
        let n = row_len(layout);
        let mut dx = Vec::with_capacity(x.len());
        for (row, drow) in x.chunks(n).zip(dy.chunks(n)) {
            let r = rstd(row, self.eps);
            let dot: f32 = row
                .iter()
                .zip(drow)
                .zip(w)
                .map(|((x, d), w)| d.to_f32() * w.to_f32() * x.to_f32())
                .sum();
            let c = r * r * r * dot / n as f32;
            dx.extend(
                row.iter()
                    .zip(drow)
                    .zip(w)
                    .map(|((x, d), w)| T::from_f32(r * d.to_f32() * w.to_f32() - x.to_f32() * c)),
            );
        }
        Ok(dx)
    }
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "metal-candle-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((cpu_map(self, &[(s1, l1), (s2, l2)])?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::launch_rows("rms_norm_fwd", &[(s1, l1), (s2, l2)], self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormBackward { eps: self.eps })?;
        // A frozen weight (every norm under LoRA) needs no gradient: its
        // reduction was ten launches and four f32 activation-sized
        // temporaries per norm, thrown away.
        if !w.track_op() {
            return Ok((Some(dx), None));
        }
        // dw = Σ_rows dy · x̂, in f32.
        let hidden = w.dim(0)?;
        let xf = x.to_dtype(DType::F32)?.reshape(((), hidden))?;
        let r = (xf.sqr()?.mean_keepdim(1)? + f64::from(self.eps))?
            .sqrt()?
            .recip()?;
        let xhat = xf.broadcast_mul(&r)?;
        let dyf = dy.to_dtype(DType::F32)?.reshape(((), hidden))?;
        let dw = (dyf * xhat)?.sum(0)?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

impl candle_core::CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "metal-candle-rms-norm-backward"
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
        let dx = cpu_map(self, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((dx, l1.shape().clone()))
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
        cuda::launch_rows("rms_norm_bwd", &[(s1, l1), (s2, l2), (s3, l3)], self.eps)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::launch::{launch, ptx, rows_config, Arg};
    use candle_core::{CudaStorage, Layout, Shape};

    /// `rms_norm_{fwd|bwd}`: inputs x, w (and dy), output shaped like x, one
    /// block per row.
    pub(super) fn launch_rows(
        base: &str,
        inputs: &[(&CudaStorage, &Layout)],
        eps: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some(&(_, xl)) = inputs.first() else {
            candle_core::bail!("{base}: no inputs");
        };
        let shape = xl.shape().clone();
        let n = super::row_len(xl);
        let rows = shape.elem_count() / n;
        let Ok(n_arg) = i32::try_from(n) else {
            candle_core::bail!("{base}: rows of {n} elements are too long");
        };
        let cfg = rows_config(rows, n)?;
        let args = [Arg::I32(n_arg), Arg::F32(eps)];
        let out = launch(&ptx::RMS_NORM, base, inputs, shape.elem_count(), cfg, &args)?;
        Ok((out, shape))
    }
}
