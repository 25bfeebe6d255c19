//! Scaled dot-product attention: the one entry point decoders and encoders
//! call, and the additive masks they pass it.
//!
//! [`attention`] picks the implementation by where it runs: today the
//! composed path (matmuls, with Candle's fused softmax for inference and a
//! differentiable softmax when an input tracks gradients); fused attention
//! kernels plug in here, chosen by device, dtype, shape and whether
//! gradients are needed, without touching the models.

use candle_core::{DType, Device, Tensor, D};

use super::norm::needs_grad;
use crate::error::{Error, Result};

/// `softmax(q kᵀ · scale + bias) v`.
///
/// `q` is `[b, heads, s, d]`; `k` and `v` are `[b, kv_heads, t, d]` with
/// `heads` a multiple of `kv_heads` (grouped-query attention); `bias` is an
/// additive f32 mask or position bias broadcastable to `[b, heads, s, t]`.
/// Scores and softmax are computed in f32 whatever the input dtype, like
/// transformers' eager attention; the result is `[b, heads, s, d]` in `q`'s
/// dtype.
///
/// # Errors
/// Shape or dtype mismatches.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (heads, kv_heads) = (q.dim(1)?, k.dim(1)?);
    if kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!("attention: {heads} query heads for {kv_heads} key/value heads");
    }
    let rep = heads / kv_heads;
    let k = repeat_kv(k, rep)?.contiguous()?;
    let v = repeat_kv(v, rep)?.contiguous()?;
    let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    softmax_last_dim(&scores)?.to_dtype(v.dtype())?.matmul(&v)
}

/// Softmax over the last dimension: Candle's fused kernel, or a composition
/// of differentiable ops when `x` tracks gradients (the fused kernel has no
/// backward).
///
/// # Errors
/// Tensor errors.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !needs_grad(&[x]) {
        return candle_nn::ops::softmax_last_dim(x);
    }
    // The max only stabilises; softmax is shift-invariant, so it needs no
    // gradient.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Repeats key/value heads `n_rep` times for grouped-query attention:
/// `[b, kv_heads, s, d]` → `[b, kv_heads * n_rep, s, d]`.
fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, s, d))?
        .reshape((b, kv * n_rep, s, d))
}

/// Which keys a query may see (the masks decoders and encoders pass to
/// [`attention`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// Every key (encoders).
    Bidirectional,
    /// Keys at or before the query (decoders).
    Causal,
    /// Causal, and only the last `n` keys including the query's own
    /// (Mistral / Qwen sliding-window layers). Counted in key slots,
    /// padding included, as transformers does.
    SlidingWindow(usize),
}

/// The additive attention mask `[b, 1, q_len, past + q_len]` (f32, 0 or a
/// large negative) for `q_len` new queries after `past` cached positions,
/// hiding keys by `kind` and where `padding` (`[b, past + q_len]`,
/// 1 = token, 0 = padding) is 0. `None` when nothing needs masking.
///
/// A large negative rather than -inf keeps rows that are all padding finite.
///
/// # Errors
/// Fails when `padding` has the wrong shape.
pub(crate) fn attention_mask(
    b: usize,
    q_len: usize,
    past: usize,
    padding: Option<&[Vec<u32>]>,
    kind: MaskKind,
    device: &Device,
) -> Result<Option<Tensor>> {
    let kv_len = past + q_len;
    if let Some(p) = padding {
        if p.len() != b || p.iter().any(|row| row.len() != kv_len) {
            return Err(Error::InvalidInput(format!(
                "attention mask must be [{b}, {kv_len}], got [{}, {}]",
                p.len(),
                p.first().map_or(0, Vec::len)
            )));
        }
    }
    let any_padding = padding.is_some_and(|p| p.iter().flatten().any(|&m| m == 0));
    let hides_keys = match kind {
        MaskKind::Bidirectional => false,
        MaskKind::Causal => q_len > 1,
        MaskKind::SlidingWindow(w) => q_len > 1 || kv_len > w,
    };
    if !any_padding && !hides_keys {
        return Ok(None);
    }
    let mut mask = vec![0f32; b * q_len * kv_len];
    for bi in 0..b {
        for i in 0..q_len {
            let query = past + i;
            let row = &mut mask[(bi * q_len + i) * kv_len..(bi * q_len + i + 1) * kv_len];
            for (j, m) in row.iter_mut().enumerate() {
                let hidden_by_kind = match kind {
                    MaskKind::Bidirectional => false,
                    MaskKind::Causal => j > query,
                    MaskKind::SlidingWindow(w) => j > query || query - j >= w,
                };
                let hidden_by_padding = padding.is_some_and(|p| p[bi][j] == 0);
                if hidden_by_kind || hidden_by_padding {
                    *m = f32::MIN;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(mask, (b, 1, q_len, kv_len), device)?))
}

/// Reads a `[b, n]` 0/1 mask tensor into rows of u32.
///
/// # Errors
/// Fails when it is not 2-D.
pub(crate) fn mask_rows(mask: &Tensor) -> Result<Vec<Vec<u32>>> {
    Ok(mask.to_dtype(DType::U32)?.to_vec2::<u32>()?)
}
