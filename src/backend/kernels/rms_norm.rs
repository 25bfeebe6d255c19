//! Fused RMSNorm with a backward pass.
//!
//! Candle's `candle_nn::ops::rms_norm` is fused but has no backward, so a
//! training graph built on it silently loses its gradients. This op is fused
//! in both directions: forward `y = w * to_dtype(x * rsqrt(mean(x²) + eps))`
//! (transformers' rounding), backward
//! `dx = r·g − x·r³·Σ(g·x)/n` with `g = dy·w`, `r = rsqrt(mean(x²) + eps)`
//! (one kernel), and `dw = Σ_rows dy · x·r` (composed reduction).

use candle_core::{backend::BackendStorage, CpuStorage, DType, Layout, Shape, Tensor, D};

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

struct RmsNorm {
    eps: f32,
}

struct RmsNormBackward {
    eps: f32,
}

/// Rows of `x`'s storage as a contiguous slice, with the row length.
fn rows<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<(&'a [T], usize)> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("rms_norm: input must be contiguous".into()))?;
    let n = *l.dims().last().unwrap_or(&1);
    Ok((&s[a..b], n))
}

trait Float: candle_core::WithDType + Copy + Send + Sync {
    fn f(self) -> f32;
    fn from(v: f32) -> Self;
}
impl Float for f32 {
    fn f(self) -> f32 {
        self
    }
    fn from(v: f32) -> Self {
        v
    }
}
impl Float for half::bf16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn from(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}
impl Float for half::f16 {
    fn f(self) -> f32 {
        self.to_f32()
    }
    fn from(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

fn rstd<T: Float>(row: &[T], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v.f() * v.f()).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

fn cpu_forward<T: Float>(x: &[T], w: &[T], n: usize, eps: f32) -> Vec<T> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(n) {
        let r = rstd(row, eps);
        y.extend(
            row.iter()
                .zip(w)
                .map(|(v, w)| T::from(T::from(v.f() * r).f() * w.f())),
        );
    }
    y
}

fn cpu_backward<T: Float>(x: &[T], w: &[T], dy: &[T], n: usize, eps: f32) -> Vec<T> {
    let mut dx = Vec::with_capacity(x.len());
    for (row, drow) in x.chunks(n).zip(dy.chunks(n)) {
        let r = rstd(row, eps);
        let dot: f32 = row
            .iter()
            .zip(drow)
            .zip(w)
            .map(|((x, d), w)| d.f() * w.f() * x.f())
            .sum();
        let c = r * r * r * dot / n as f32;
        dx.extend(
            row.iter()
                .zip(drow)
                .zip(w)
                .map(|((x, d), w)| T::from(r * d.f() * w.f() - x.f() * c)),
        );
    }
    dx
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
        let shape = l1.shape().clone();
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let ((x, n), (w, _)) = (rows(x, l1)?, rows(w, l2)?);
                CpuStorage::F32(cpu_forward(x, w, n, self.eps))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                let ((x, n), (w, _)) = (rows(x, l1)?, rows(w, l2)?);
                CpuStorage::BF16(cpu_forward(x, w, n, self.eps))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                let ((x, n), (w, _)) = (rows(x, l1)?, rows(w, l2)?);
                CpuStorage::F16(cpu_forward(x, w, n, self.eps))
            }
            _ => candle_core::bail!("rms_norm: unsupported dtype {:?}", s1.dtype()),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::launch("fwd", &[(s1, l1), (s2, l2)], self.eps)
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
        let shape = l1.shape().clone();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(dy)) => {
                let ((x, n), (w, _), (dy, _)) = (rows(x, l1)?, rows(w, l2)?, rows(dy, l3)?);
                CpuStorage::F32(cpu_backward(x, w, dy, n, self.eps))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w), CpuStorage::BF16(dy)) => {
                let ((x, n), (w, _), (dy, _)) = (rows(x, l1)?, rows(w, l2)?, rows(dy, l3)?);
                CpuStorage::BF16(cpu_backward(x, w, dy, n, self.eps))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w), CpuStorage::F16(dy)) => {
                let ((x, n), (w, _), (dy, _)) = (rows(x, l1)?, rows(w, l2)?, rows(dy, l3)?);
                CpuStorage::F16(cpu_backward(x, w, dy, n, self.eps))
            }
            _ => candle_core::bail!("rms_norm backward: unsupported dtype {:?}", s1.dtype()),
        };
        Ok((out, shape))
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
        cuda::launch("bwd", &[(s1, l1), (s2, l2), (s3, l3)], self.eps)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));

    /// Launches `rms_norm_{fwd|bwd}_{dtype}`: inputs x, w (and dy), output
    /// shaped like x. One block per row.
    pub(super) fn launch(
        which: &str,
        inputs: &[(&CudaStorage, &Layout)],
        eps: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let (x, xl) = inputs[0];
        let dev = x.device.clone();
        let shape = xl.shape().clone();
        let n = *shape.dims().last().unwrap_or(&1);
        let rows = shape.elem_count() / n.max(1);
        // One warp per row below 1024 columns (many rows in flight, no
        // shared-memory round trip), a full block above, as Candle's kernel.
        let block: u32 = if n < 1024 { 32 } else { 1024 };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        fn slice<'a, T: DeviceRepr>(
            s: &'a CudaSlice<T>,
            l: &Layout,
        ) -> candle_core::Result<cudarc::driver::CudaView<'a, T>> {
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(s.slice(a..b)),
                None => candle_core::bail!("rms_norm: input must be contiguous"),
            }
        }
        macro_rules! run {
            ($variant:ident, $t:ty, $suffix:literal) => {{
                let mut views = Vec::new();
                for (s, l) in inputs {
                    match &s.slice {
                        S::$variant(v) => views.push(slice(v, l)?),
                        _ => candle_core::bail!("rms_norm: mixed dtypes"),
                    }
                }
                let name = format!("rms_norm_{which}_{}", $suffix);
                let func = dev.get_or_load_custom_func(&name, "metal_candle_rms_norm", PTX)?;
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<$t>(shape.elem_count())? };
                let mut b = func.builder();
                for v in &views {
                    b.arg(v);
                }
                b.arg(&out);
                let n = n as i32;
                b.arg(&n);
                b.arg(&eps);
                // SAFETY: argument list matches the kernel signature in rms_norm.cu.
                unsafe { b.launch(cfg) }.w()?;
                S::$variant(out)
            }};
        }
        let out = match &x.slice {
            S::F32(_) => run!(F32, f32, "f32"),
            S::BF16(_) => run!(BF16, half::bf16, "bf16"),
            S::F16(_) => run!(F16, half::f16, "f16"),
            _ => candle_core::bail!("rms_norm: unsupported dtype"),
        };
        Ok((
            CudaStorage {
                slice: out,
                device: dev,
            },
            shape,
        ))
    }
}
