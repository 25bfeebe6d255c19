//! The next token of every row of a batch, sampled on the GPU (`sample.cu`):
//! penalties, temperature, top-k, top-p, min-p and the draw in one launch
//! (a cluster of 8 blocks per row on sm_90 and later), one small upload
//! (penalty entries and the rows' uniform draws) and one copy of the ids
//! back.
//!
//! Unlike the other kernels this one has no CPU path and no backward: on
//! the CPU the host filters in `inference::sampling` do the same work on
//! the same row (the kernel follows their semantics token for token, which
//! the GPU tier checks), and sampling is never differentiated. The module
//! exists only with the `cuda` feature.

/// The token a row's kernel returns when every logit is -inf or NaN.
pub(crate) const NO_FINITE: u32 = 0xFFFF_FFFE;
/// The token a row's kernel returns when a logit is +inf.
pub(crate) const POS_INF: u32 = 0xFFFF_FFFF;

/// The filters and penalties every row shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SampleParams {
    pub(crate) repetition_penalty: f32,
    pub(crate) temperature: f32,
    /// 0: off.
    pub(crate) top_k: usize,
    /// 1: off.
    pub(crate) top_p: f32,
    /// 0: off.
    pub(crate) min_p: f32,
}

/// One row's penalty entries: distinct token ids, whether the repetition
/// penalty applies to each, and what is then subtracted from its logit.
#[derive(Debug, Clone, Default)]
pub(crate) struct RowPenalties {
    pub(crate) ids: Vec<u32>,
    pub(crate) repeat: Vec<bool>,
    pub(crate) sub: Vec<f32>,
}

/// Samples one token per row of `logits` (`[rows, vocab]`, f32/bf16/f16, on
/// a CUDA device), row `r` drawing with the uniform `u[r]` in `[0, 1)` and
/// penalised by `penalties[r]` (ids `< vocab`, checked by the caller).
/// Returns the ids, or [`NO_FINITE`] / [`POS_INF`] for rows that cannot be
/// sampled.
///
/// # Errors
/// Shapes that do not fit, a vocabulary beyond `i32`, CUDA errors.
pub(crate) fn sample_rows(
    logits: &candle_core::Tensor,
    u: &[f64],
    penalties: &[RowPenalties],
    params: SampleParams,
) -> candle_core::Result<Vec<u32>> {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Storage};

    use super::launch::{ptx, view};

    let (rows, vocab) = logits.dims2()?;
    if u.len() != rows || penalties.len() != rows {
        candle_core::bail!(
            "sample: {rows} rows, {} draws and {} penalty lists",
            u.len(),
            penalties.len()
        );
    }
    let v = i32::try_from(vocab)
        .map_err(|_| candle_core::Error::Msg("sample: vocabulary too large".into()))?;
    // A cluster of 8 blocks per row where the PTX was built for sm_90 or
    // later (sample.cu's CL), one block before.
    let per_row: usize = match env!("METAL_CANDLE_CUDA_CAP").parse::<u32>() {
        Ok(cap) if cap >= 90 => 8,
        _ => 1,
    };
    let too_many = || candle_core::Error::Msg(format!("sample: {rows} rows"));
    let rows_i = i32::try_from(rows).map_err(|_| too_many())?;
    let grid = rows
        .checked_mul(per_row)
        .and_then(|g| u32::try_from(g).ok())
        .filter(|&g| g > 0 && g <= i32::MAX as u32)
        .ok_or_else(too_many)?;
    let top_k = i32::try_from(params.top_k).unwrap_or(i32::MAX);

    // meta: the draws as f64 bits first (8-byte aligned at the start of the
    // allocation), then offsets, ids, flags and subtractions (sample.cu).
    let n: usize = penalties.iter().map(|p| p.ids.len()).sum();
    let mut meta: Vec<u32> = Vec::with_capacity(2 * rows + rows + 1 + 3 * n);
    for &x in u {
        let b = x.to_bits();
        // Little-endian halves: the device reads them back as one f64.
        meta.push(b as u32);
        meta.push((b >> 32) as u32);
    }
    let mut acc = 0u32;
    meta.push(0);
    for p in penalties {
        acc += u32::try_from(p.ids.len())
            .map_err(|_| candle_core::Error::Msg("sample: too many penalty entries".into()))?;
        meta.push(acc);
    }
    for p in penalties {
        meta.extend_from_slice(&p.ids);
    }
    for p in penalties {
        meta.extend(p.repeat.iter().map(|&r| u32::from(r)));
    }
    for p in penalties {
        meta.extend(p.sub.iter().map(|s| s.to_bits()));
    }

    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cuda(x) = &*storage else {
        candle_core::bail!("sample: the logits are not on a CUDA device");
    };
    let dev = &x.device;
    let meta = dev.clone_htod(meta.as_slice())?;
    // SAFETY: the kernel writes every element of its row before reading it.
    let scratch = unsafe { dev.alloc::<f32>(rows * vocab)? };
    // SAFETY: the kernel writes one id per row.
    let out = unsafe { dev.alloc::<u32>(rows)? };
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let m = &ptx::SAMPLE;
    macro_rules! run {
        ($t:ty) => {{
            let xs = view::<$t>(x, layout, "sample: logits")?;
            let func = dev.get_or_load_custom_func(
                &format!("sample_rows_{}", <$t as super::cpu::Float>::SUFFIX),
                m.name,
                m.ptx,
            )?;
            let mut b = func.builder();
            b.arg(&xs);
            b.arg(&meta);
            b.arg(&scratch);
            b.arg(&out);
            b.arg(&v);
            b.arg(&rows_i);
            b.arg(&params.repetition_penalty);
            b.arg(&params.temperature);
            b.arg(&top_k);
            b.arg(&params.top_p);
            b.arg(&params.min_p);
            // SAFETY: arguments in the order and C types of `sample_rows_*`.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match x.dtype() {
        DType::F32 => run!(f32),
        DType::BF16 => run!(half::bf16),
        DType::F16 => run!(half::f16),
        other => candle_core::bail!("sample: unsupported dtype {other:?}"),
    }
    dev.clone_dtoh(&out)
}
