//! `a[ia] + b[ib]`: an encoder's input embeddings (word rows plus position
//! rows) gathered and summed in one pass, for inference. On an H200
//! Candle's `index_select` of 65,536 MiniLM rows took 0.24 ms and the add a
//! second pass (Nsight Compute, BENCHMARKS.md); this kernel reads each row
//! once and writes the sum once.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

use super::cpu::{contiguous, Float};

/// `[n, h]`: row `r` is `a[ia[r]] + b[ib[r]]`, for tables `a` `[va, h]`
/// and `b` `[vb, h]` of one dtype and u32 ids `ia`, `ib` of `n` each.
/// Inference only: a table that tracks gradients takes Candle's
/// differentiable `index_select` and add instead.
///
/// The caller checks the ids (`models::bert::check_vocab`, positions it
/// made): the CUDA kernel does not copy them back to check, and gives NaN
/// rows for ids outside a table instead of reading out of bounds; the CPU
/// path errors.
///
/// # Errors
/// Shape or dtype mismatch; on the CPU an id outside its table.
pub fn embed_sum(a: &Tensor, ia: &Tensor, b: &Tensor, ib: &Tensor) -> candle_core::Result<Tensor> {
    let ((_, h), (_, hb)) = (a.dims2()?, b.dims2()?);
    if h != hb || a.dtype() != b.dtype() {
        candle_core::bail!(
            "embed_sum: tables {:?} {:?} and {:?} {:?} differ",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        );
    }
    let n = ia.dims1()?;
    if ib.dims1()? != n || ia.dtype() != DType::U32 || ib.dtype() != DType::U32 {
        candle_core::bail!("embed_sum: ids must be two u32 vectors of one length");
    }
    if crate::backend::autograd::needs_grad(&[a, b]) {
        return a.index_select(ia, 0)? + b.index_select(ib, 0)?;
    }
    let ids = Tensor::stack(&[ia, ib], 0)?;
    a.contiguous()?.apply_op3(&ids, &b.contiguous()?, EmbedSum)
}

struct EmbedSum;

impl EmbedSum {
    fn cpu<T: Float>(a: &[T], ids: &[u32], b: &[T], h: usize) -> candle_core::Result<Vec<T>> {
        let n = ids.len() / 2;
        let (ia, ib) = ids.split_at(n);
        let mut out = Vec::with_capacity(n * h);
        for (&i, &j) in ia.iter().zip(ib) {
            let (i, j) = (i as usize * h, j as usize * h);
            let (Some(ra), Some(rb)) = (a.get(i..i + h), b.get(j..j + h)) else {
                candle_core::bail!("embed_sum: an id is outside its table");
            };
            out.extend(
                ra.iter()
                    .zip(rb)
                    .map(|(x, y)| T::from_f32(x.to_f32() + y.to_f32())),
            );
        }
        Ok(out)
    }
}

impl candle_core::CustomOp3 for EmbedSum {
    fn name(&self) -> &'static str {
        "metal-candle-embed-sum"
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
        let h = l1.dims()[1];
        let ids = contiguous::<u32>(s2, l2, "embed_sum")?;
        let n = ids.len() / 2;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(Self::cpu(
                contiguous::<f32>(s1, l1, "embed_sum")?,
                ids,
                contiguous::<f32>(s3, l3, "embed_sum")?,
                h,
            )?),
            CpuStorage::BF16(_) => CpuStorage::BF16(Self::cpu(
                contiguous::<half::bf16>(s1, l1, "embed_sum")?,
                ids,
                contiguous::<half::bf16>(s3, l3, "embed_sum")?,
                h,
            )?),
            CpuStorage::F16(_) => CpuStorage::F16(Self::cpu(
                contiguous::<half::f16>(s1, l1, "embed_sum")?,
                ids,
                contiguous::<half::f16>(s3, l3, "embed_sum")?,
                h,
            )?),
            _ => candle_core::bail!("embed_sum: f32, bf16 or f16 tables only"),
        };
        Ok((out, Shape::from((n, h))))
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
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        use super::launch::{elementwise_config, ptx, view};

        let (va, h) = (l1.dims()[0], l1.dims()[1]);
        let vb = l3.dims()[0];
        let n = l2.dims()[1];
        let Ok(hi) = i32::try_from(h) else {
            candle_core::bail!("embed_sum: rows of {h} elements are too long");
        };
        let err = |_| candle_core::Error::Msg("embed_sum: table too large".into());
        let (va, vb) = (
            u32::try_from(va).map_err(err)?,
            u32::try_from(vb).map_err(err)?,
        );
        let ids = view::<u32>(s2, l2, "embed_sum: ids")?;
        let dev = s1.device.clone();
        let (ia, ib) = (ids.slice(..n), ids.slice(n..));
        let rows = n as u64;
        macro_rules! go {
            ($t:ty) => {{
                let a = view::<$t>(s1, l1, "embed_sum: a")?;
                let b = view::<$t>(s3, l3, "embed_sum: b")?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>((n * h).max(1))? };
                if n * h > 0 {
                    let m = &ptx::EMBED_SUM;
                    let func = dev.get_or_load_custom_func(
                        &format!("embed_sum_{}", <$t as Float>::SUFFIX),
                        m.name,
                        m.ptx,
                    )?;
                    let mut k = func.builder();
                    k.arg(&a);
                    k.arg(&ia);
                    k.arg(&b);
                    k.arg(&ib);
                    k.arg(&out);
                    k.arg(&rows);
                    k.arg(&hi);
                    k.arg(&va);
                    k.arg(&vb);
                    // SAFETY: arguments in the order and C types of
                    // `embed_sum_*`; the kernel reads only rows below va / vb.
                    unsafe { k.launch(elementwise_config((n * h).div_ceil(8))) }.w()?;
                }
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s1.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            DType::F16 => go!(half::f16),
            other => candle_core::bail!("embed_sum: unsupported dtype {other:?}"),
        };
        Ok((out, Shape::from((n, h))))
    }
}
