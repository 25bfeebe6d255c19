//! Writing a step's keys or values into a preallocated cache at a position
//! held on the device (`kv_write.cu`), in place: what lets a decode step be
//! captured once in a CUDA graph and replayed at every length.

use candle_core::{CpuStorage, DType, Layout, Tensor};

/// `cache[:, :, pos .. pos + s, :] = x` in place, `cache` `[b, heads,
/// capacity, d]`, `x` `[b, heads, s, d]` of the same dtype, `pos` a u32
/// `[1]` tensor read when the write runs (rows past the capacity are
/// skipped: check room first). Inference only (no gradient).
///
/// # Errors
/// Shapes, dtypes or devices that do not fit.
pub fn kv_write(cache: &Tensor, x: &Tensor, pos: &Tensor) -> candle_core::Result<()> {
    let (b, h, _, d) = cache.dims4()?;
    let (bx, hx, _, dx) = x.dims4()?;
    if (b, h, d) != (bx, hx, dx) || x.dtype() != cache.dtype() {
        candle_core::bail!(
            "kv_write: rows {:?} {:?} do not fit the cache {:?} {:?}",
            x.dims(),
            x.dtype(),
            cache.dims(),
            cache.dtype()
        );
    }
    if pos.dtype() != DType::U32 || pos.dims() != [1] {
        candle_core::bail!("kv_write: the position must be a u32 [1] tensor");
    }
    if !cache.is_contiguous() {
        candle_core::bail!("kv_write: the cache must be contiguous");
    }
    cache.inplace_op3(&x.contiguous()?, &pos.contiguous()?, &KvWrite)
}

struct KvWrite;

fn write_cpu<T: Copy>(cache: &mut [T], x: &[T], pos: usize, s: usize, d: usize, cap: usize) {
    for (row, src) in x.chunks(d).enumerate() {
        let (bh, r) = (row / s, row % s);
        if pos + r < cap {
            let at = (bh * cap + pos + r) * d;
            cache[at..at + d].copy_from_slice(src);
        }
    }
}

impl candle_core::InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "metal-candle-kv-write"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        use super::cpu::contiguous;
        let (_, _, cap, d) = l1.shape().dims4()?;
        let s = l2.shape().dims4()?.2;
        let pos = contiguous::<u32>(s3, l3, "kv_write")?[0] as usize;
        let start = l1.start_offset();
        macro_rules! go {
            ($v:ident, $t:ty) => {{
                let x = contiguous::<$t>(s2, l2, "kv_write")?;
                let n = l1.shape().elem_count();
                write_cpu(&mut $v[start..start + n], x, pos, s, d, cap);
            }};
        }
        match s1 {
            CpuStorage::F32(v) => go!(v, f32),
            CpuStorage::BF16(v) => go!(v, half::bf16),
            CpuStorage::F16(v) => go!(v, half::f16),
            other => candle_core::bail!(
                "kv_write: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(&*other)
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        use super::cpu::Float;
        use super::launch::{elementwise_config, ptx, view};

        let (_, _, cap, d) = l1.shape().dims4()?;
        let s = l2.shape().dims4()?.2;
        let n = l2.shape().elem_count();
        if n == 0 {
            return Ok(());
        }
        let err = |_| candle_core::Error::Msg("kv_write: too large".into());
        let (si, di, ci) = (
            i32::try_from(s).map_err(err)?,
            i32::try_from(d).map_err(err)?,
            i32::try_from(cap).map_err(err)?,
        );
        let dev = s1.device.clone();
        let pos = view::<u32>(s3, l3, "kv_write: position")?;
        let m = &ptx::KV_WRITE;
        let start = l1.start_offset();
        let len = l1.shape().elem_count();
        macro_rules! go {
            ($t:ty) => {{
                let x = view::<$t>(s2, l2, "kv_write: rows")?;
                let func = dev.get_or_load_custom_func(
                    &format!("kv_write_{}", <$t as Float>::SUFFIX),
                    m.name,
                    m.ptx,
                )?;
                let slice = s1.as_cuda_slice_mut::<$t>()?;
                let Some(mut cache) = slice.try_slice_mut(start..start + len) else {
                    candle_core::bail!("kv_write: the cache is outside its storage");
                };
                let mut b = func.builder();
                b.arg(&mut cache);
                b.arg(&x);
                b.arg(&pos);
                b.arg(&si);
                b.arg(&di);
                b.arg(&ci);
                b.arg(&n);
                // SAFETY: arguments in the order and C types of `kv_write_*`;
                // the kernel writes only inside the cache's view.
                unsafe { b.launch(elementwise_config(n)) }.w()?;
            }};
        }
        match s1.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            DType::F16 => go!(half::f16),
            other => candle_core::bail!("kv_write: unsupported dtype {other:?}"),
        }
        Ok(())
    }
}
