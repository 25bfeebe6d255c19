//! Softmax cross-entropy over rows of logits in their own dtype, forward
//! statistics and gradient, for the loss fused with the output projection
//! (`training::lm_loss`).
//!
//! Composed in Candle, one chunk of 256 positions × 151,936 words took a
//! cast to f32, a max, a broadcast subtract, an exp, a sum and a log going
//! forward, and as many again going back: 3.6 ms of the chunk's 3.9 ms on an
//! H200 (Nsight Compute), the matmul being the rest. Here each direction is
//! one pass over the bf16 logits.

use candle_core::{CpuStorage, Layout, Shape, Tensor};

use super::cpu::{contiguous, Float};
use candle_core::backend::BackendStorage;

/// Per row of `logits` (`[n, v]`, f32/bf16/f16): its log-sum-exp and the
/// logit of its target (`targets`, u32 `[n]`, each `< v`), as `[n, 2]` f32.
///
/// # Errors
/// Shapes or dtypes that do not fit.
pub(crate) fn cross_entropy_stats(
    logits: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<Tensor> {
    check(logits, targets)?;
    logits
        .contiguous()?
        .apply_op2_no_bwd(&targets.contiguous()?, &Stats)
}

/// `(softmax(logits) − onehot(targets)) · g` in `logits`' dtype: the
/// gradient of `g · Σ cross-entropy` with respect to the logits, given the
/// rows' log-sum-exp `lse` (`[n]`, f32, from [`cross_entropy_stats`]) and
/// `g` (a scalar f32 tensor, read on the device). A target `>= v` matches
/// no column: that row has no one-hot here (a slice of the vocabulary
/// without the row's word, `training::loss`); the lse may be the whole
/// row's, taken over more columns than `logits` has.
///
/// # Errors
/// Shapes or dtypes that do not fit.
pub(crate) fn cross_entropy_grad(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    g: &Tensor,
) -> candle_core::Result<Tensor> {
    check(logits, targets)?;
    // One f32 input `[n + 1]`: the row statistics, then g.
    let lse_g = Tensor::cat(
        &[
            lse.to_dtype(candle_core::DType::F32)?,
            g.to_dtype(candle_core::DType::F32)?.reshape(1)?,
        ],
        0,
    )?;
    logits
        .contiguous()?
        .apply_op3_no_bwd(&targets.contiguous()?, &lse_g, &Grad)
}

fn check(logits: &Tensor, targets: &Tensor) -> candle_core::Result<()> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] || targets.dtype() != candle_core::DType::U32 {
        candle_core::bail!(
            "cross_entropy: targets must be u32 [{n}], got {:?} {:?}",
            targets.dtype(),
            targets.dims()
        );
    }
    Ok(())
}

struct Stats;
struct Grad;

fn stats_cpu<T: Float>(x: &[T], t: &[u32], v: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(2 * t.len());
    for (row, &target) in x.chunks(v).zip(t) {
        let m = row
            .iter()
            .map(|x| x.to_f32())
            .fold(f32::NEG_INFINITY, f32::max);
        let s: f32 = row.iter().map(|x| (x.to_f32() - m).exp()).sum();
        out.push(m + s.ln());
        out.push(row[target as usize].to_f32());
    }
    out
}

fn grad_cpu<T: Float>(x: &[T], t: &[u32], lse_g: &[f32], v: usize) -> Vec<T> {
    let g = lse_g[t.len()];
    let mut d = Vec::with_capacity(x.len());
    for (r, (row, &target)) in x.chunks(v).zip(t).enumerate() {
        for (j, x) in row.iter().enumerate() {
            let mut p = (x.to_f32() - lse_g[r]).exp();
            if j == target as usize {
                p -= 1.0;
            }
            d.push(T::from_f32(p * g));
        }
    }
    d
}

impl candle_core::CustomOp2 for Stats {
    fn name(&self) -> &'static str {
        "metal-candle-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let t = contiguous::<u32>(s2, l2, "cross_entropy")?;
        let out = match s1 {
            CpuStorage::F32(_) => stats_cpu(contiguous::<f32>(s1, l1, "cross_entropy")?, t, v),
            CpuStorage::BF16(_) => {
                stats_cpu(contiguous::<half::bf16>(s1, l1, "cross_entropy")?, t, v)
            }
            CpuStorage::F16(_) => {
                stats_cpu(contiguous::<half::f16>(s1, l1, "cross_entropy")?, t, v)
            }
            _ => candle_core::bail!("cross_entropy: unsupported dtype {:?}", s1.dtype()),
        };
        Ok((CpuStorage::F32(out), Shape::from((n, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.shape().dims2()?.0;
        Ok((cuda::stats(s1, l1, s2, l2)?, Shape::from((n, 2))))
    }
}

impl candle_core::CustomOp3 for Grad {
    fn name(&self) -> &'static str {
        "metal-candle-cross-entropy-grad"
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
        let (_, v) = l1.shape().dims2()?;
        let t = contiguous::<u32>(s2, l2, "cross_entropy")?;
        let lse_g = contiguous::<f32>(s3, l3, "cross_entropy")?;
        let out = match s1 {
            CpuStorage::F32(_) => {
                CpuStorage::F32(grad_cpu(contiguous(s1, l1, "cross_entropy")?, t, lse_g, v))
            }
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(grad_cpu(contiguous(s1, l1, "cross_entropy")?, t, lse_g, v))
            }
            CpuStorage::F16(_) => {
                CpuStorage::F16(grad_cpu(contiguous(s1, l1, "cross_entropy")?, t, lse_g, v))
            }
            _ => candle_core::bail!("cross_entropy: unsupported dtype {:?}", s1.dtype()),
        };
        Ok((out, l1.shape().clone()))
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
        Ok((cuda::grad(s1, l1, s2, l2, s3, l3)?, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout};

    use super::super::cpu::Float;
    use super::super::launch::{ptx, rows_config, view};

    pub(super) fn stats(
        x: &CudaStorage,
        xl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        match x.dtype() {
            DType::F32 => stats_t::<f32>(x, xl, t, tl),
            DType::BF16 => stats_t::<half::bf16>(x, xl, t, tl),
            DType::F16 => stats_t::<half::f16>(x, xl, t, tl),
            other => candle_core::bail!("cross_entropy: unsupported dtype {other:?}"),
        }
    }

    fn stats_t<T: Float + CudaDType + DeviceRepr>(
        x: &CudaStorage,
        xl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let dev = &x.device;
        let (n, v) = xl.shape().dims2()?;
        let (xs, ts) = (
            view::<T>(x, xl, "cross_entropy: input")?,
            view::<u32>(t, tl, "cross_entropy: input")?,
        );
        // SAFETY: the kernel writes both statistics of every row.
        let out = unsafe { dev.alloc::<f32>(2 * n.max(1))? };
        if n > 0 {
            let m = &ptx::CROSS_ENTROPY;
            let func =
                dev.get_or_load_custom_func(&format!("ce_fwd_{}", T::SUFFIX), m.name, m.ptx)?;
            let vi = i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg("vocabulary too large".into()))?;
            let mut b = func.builder();
            b.arg(&xs);
            b.arg(&ts);
            b.arg(&out);
            b.arg(&vi);
            // SAFETY: arguments in the order and C types of `ce_fwd_*`.
            unsafe { b.launch(rows_config(n, v)?) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    pub(super) fn grad(
        x: &CudaStorage,
        xl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        match x.dtype() {
            DType::F32 => grad_t::<f32>(x, xl, t, tl, g, gl),
            DType::BF16 => grad_t::<half::bf16>(x, xl, t, tl, g, gl),
            DType::F16 => grad_t::<half::f16>(x, xl, t, tl, g, gl),
            other => candle_core::bail!("cross_entropy: unsupported dtype {other:?}"),
        }
    }

    fn grad_t<T: Float + CudaDType + DeviceRepr>(
        x: &CudaStorage,
        xl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let dev = &x.device;
        let (n, v) = xl.shape().dims2()?;
        let (xs, ts, gs) = (
            view::<T>(x, xl, "cross_entropy: input")?,
            view::<u32>(t, tl, "cross_entropy: input")?,
            view::<f32>(g, gl, "cross_entropy: input")?,
        );
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>((n * v).max(1))? };
        if n > 0 {
            let m = &ptx::CROSS_ENTROPY;
            let func =
                dev.get_or_load_custom_func(&format!("ce_bwd_{}", T::SUFFIX), m.name, m.ptx)?;
            let err = |_| candle_core::Error::Msg("cross_entropy: too large".into());
            let (vi, ni) = (
                i32::try_from(v).map_err(err)?,
                i32::try_from(n).map_err(err)?,
            );
            let mut b = func.builder();
            b.arg(&xs);
            b.arg(&ts);
            b.arg(&gs);
            b.arg(&out);
            b.arg(&vi);
            b.arg(&ni);
            // SAFETY: arguments in the order and C types of `ce_bwd_*`.
            unsafe { b.launch(rows_config(n, v)?) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
