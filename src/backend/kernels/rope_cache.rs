//! The static-cache decode step's attention inputs in one kernel
//! (`rope_cache.cu`): bias, RoPE at the device-held position, q out, k and
//! v written into the preallocated caches. CUDA only: the step it serves
//! runs only there (`models::StaticCache`); inference only.

use candle_core::Tensor;

use super::split_heads::Heads;

/// q (`[b, heads.q, s, dim]`) from the fused projection output `qkv`
/// (`[b, s, (q + 2 kv) dim]`) and its `bias`, rotated by the rows of the
/// RoPE tables `cos`/`sin` (`[capacity, dim / 2]`) at `pos` (a u32 `[1]`
/// tensor) onwards; k (rotated) and v are written into `kc`/`vc` (`[b,
/// kv, capacity, dim]`, contiguous) at those positions. All on one CUDA
/// device, one dtype.
///
/// # Errors
/// Shapes, dtypes or devices that do not fit; CUDA errors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qkv_rope_cache(
    qkv: &Tensor,
    bias: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    pos: &Tensor,
    kc: &Tensor,
    vc: &Tensor,
    heads: Heads,
) -> candle_core::Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Storage};

    use super::cpu::Float;
    use super::launch::{elementwise_config, ptx, view};

    let (b, s, width) = qkv.dims3()?;
    let Heads { q, kv, dim } = heads;
    let (bk, hk, cap, dk) = kc.dims4()?;
    let fits = width == (q + 2 * kv) * dim
        && bias.dims() == [width]
        && (bk, hk, dk) == (b, kv, dim)
        && vc.dims() == kc.dims()
        && cos.dims() == [cap, dim / 2]
        && sin.dims() == cos.dims()
        && pos.dims() == [1]
        && pos.dtype() == DType::U32
        && dim % 2 == 0
        && [bias, cos, sin, kc, vc]
            .iter()
            .all(|t| t.dtype() == qkv.dtype())
        && kc.is_contiguous()
        && vc.is_contiguous();
    if !fits {
        candle_core::bail!(
            "qkv_rope_cache: qkv {:?}, bias {:?}, tables {:?}, caches {:?} do not fit {q} + 2 x {kv} heads of {dim}",
            qkv.dims(),
            bias.dims(),
            cos.dims(),
            kc.dims()
        );
    }
    let qkv = qkv.contiguous()?;
    let (bias, cos, sin, pos) = (
        bias.contiguous()?,
        cos.contiguous()?,
        sin.contiguous()?,
        pos.contiguous()?,
    );
    let guards = [&qkv, &bias, &cos, &sin, &pos, kc, vc].map(Tensor::storage_and_layout);
    let mut cuda = Vec::with_capacity(guards.len());
    for (st, l) in &guards {
        let Storage::Cuda(c) = &**st else {
            candle_core::bail!("qkv_rope_cache: every input must be on the CUDA device");
        };
        cuda.push((c, *l));
    }
    let dev = cuda[0].0.device.clone();
    let n = b * s * (q + 2 * kv) * (dim / 2);
    let err = |_| candle_core::Error::Msg("qkv_rope_cache: too large".into());
    let ints = [s, q, kv, dim, cap].map(i32::try_from);
    let mut args = [0i32; 5];
    for (a, v) in args.iter_mut().zip(ints) {
        *a = v.map_err(err)?;
    }
    let m = &ptx::ROPE_CACHE;
    macro_rules! go {
        ($t:ty) => {{
            let v = |i: usize, what: &str| view::<$t>(cuda[i].0, cuda[i].1, what);
            let (x, bi, c, sn) = (v(0, "qkv")?, v(1, "bias")?, v(2, "cos")?, v(3, "sin")?);
            let p = view::<u32>(cuda[4].0, cuda[4].1, "pos")?;
            let (kv_k, kv_v) = (v(5, "k cache")?, v(6, "v cache")?);
            // SAFETY: the kernel writes every element of q.
            let out = unsafe { dev.alloc::<$t>((b * q * s * dim).max(1))? };
            if n > 0 {
                let func = dev.get_or_load_custom_func(
                    &format!("qkv_rope_cache_{}", <$t as Float>::SUFFIX),
                    m.name,
                    m.ptx,
                )?;
                let mut l = func.builder();
                l.arg(&x).arg(&bi).arg(&c).arg(&sn).arg(&p).arg(&out);
                // The caches are written in place through their views: the
                // step owns them (models::StaticCache) and nothing reads
                // them on the host.
                l.arg(&kv_k).arg(&kv_v);
                for a in &args {
                    l.arg(a);
                }
                l.arg(&n);
                // SAFETY: arguments in the order and C types of
                // `qkv_rope_cache_*`; writes stay inside q and the caches.
                unsafe { l.launch(elementwise_config(n)) }.w()?;
            }
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match qkv.dtype() {
        DType::F32 => go!(f32),
        DType::BF16 => go!(half::bf16),
        DType::F16 => go!(half::f16),
        other => candle_core::bail!("qkv_rope_cache: unsupported dtype {other:?}"),
    };
    drop(guards);
    Ok(Tensor::from_storage(
        Storage::Cuda(out),
        (b, q, s, dim),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}
