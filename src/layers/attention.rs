//! Scaled dot-product attention: the one entry point decoders and encoders
//! call, and the additive masks they pass it.
//!
//! [`attention`] picks the implementation by where it runs: today the
//! composed path (matmuls and Candle's fused softmax), with a written
//! backward that recomputes the probabilities when an input tracks
//! gradients; fused attention
//! kernels plug in here, chosen by device, dtype, shape and whether
//! gradients are needed, without touching the models.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::backend::autograd::{needs_grad, with_backward};
use crate::backend::kernels::{
    flash_attention, flash_attention_available, flash_attention_merged, flash_attention_packed,
    flash_attention_supported, flash_attention_taped, flash_forward_available,
    flash_forward_supported, flash_packed_index, FlashTape,
};
use crate::error::{Error, Result};

/// Which keys each query sees in one [`attention`] call.
///
/// `kind` and `bias` describe it for the fused kernel (causal and window
/// masks as flags it skips tiles with; `bias` only for padding or position
/// bias, broadcastable to `[b, heads, s, t]`); `dense` is the same mask as
/// one additive tensor for the composed path (kind and padding together,
/// built once per forward by the caller).
#[derive(Debug, Clone, Copy)]
pub struct Mask<'a> {
    /// Causal, sliding window or bidirectional.
    pub kind: MaskKind,
    /// Additive f32 padding / position bias, without the `kind` part.
    pub bias: Option<&'a Tensor>,
    /// `kind` and `bias` as one additive f32 tensor (`None`: nothing hidden).
    pub dense: Option<&'a Tensor>,
}

impl Mask<'_> {
    /// The composed path reads the dense mask: `s` queries over `t` keys
    /// that this kind hides from some of them need it. A caller skips it
    /// only when it expects the kernel (`dense_mask_needed`): never attend
    /// without it.
    fn check_composed(&self, s: usize, t: usize) -> candle_core::Result<()> {
        if self.kind.hides_keys(s, t) && self.dense.is_none() {
            candle_core::bail!(
                "attention: the composed path needs the dense {:?} mask",
                self.kind
            );
        }
        Ok(())
    }
}

/// `heads` query heads share `kv_heads` key/value heads evenly.
fn check_groups(heads: usize, kv_heads: usize) -> candle_core::Result<()> {
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!("attention: {heads} query heads for {kv_heads} key/value heads");
    }
    Ok(())
}

impl<'a> Mask<'a> {
    /// Bidirectional attention with an optional additive bias (encoders).
    #[must_use]
    pub fn bidirectional(bias: Option<&'a Tensor>) -> Self {
        Self {
            kind: MaskKind::Bidirectional,
            bias,
            dense: bias,
        }
    }
}

/// `softmax(q kᵀ · scale + mask) v`: the one attention entry point.
///
/// `q` is `[b, heads, s, d]`; `k` and `v` are `[b, kv_heads, t, d]` with
/// `heads` a multiple of `kv_heads` (grouped-query attention). The result
/// is `[b, s, heads · d]` (heads merged, ready for the output projection)
/// in `q`'s dtype. Picks the implementation:
///
/// - on CUDA in bf16/f16 with head dim 32, 64 or 128, our FlashAttention-2
///   style kernel (`backend::kernels::flash_attention`, forward and
///   backward; the causal/window part as flags, `mask.bias` as bias); for
///   inference it writes the merged layout itself
///   (`flash_attention_merged`), saving a transposing copy;
/// - on CUDA in f32 with head dim 32 or 64, for inference without a causal
///   or window mask (the encoders), the same kernel's f32 forward;
/// - elsewhere [`composed_attention`] with `mask.dense`.
///
/// A query row whose keys are all padding gets weights that differ
/// between the two (no real token reads it).
///
/// # Errors
/// Shape or dtype mismatches.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask<'_>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let merge = |o: Tensor| o.transpose(1, 2)?.reshape((b, s, heads * d));
    let (causal, window) = mask.kind.kernel_flags();
    if flash_attention_supported(q, k, v) {
        if !needs_grad(&[q, k, v]) {
            return flash_attention_merged(q, k, v, mask.bias, scale, causal, window);
        }
        return merge(flash_attention(q, k, v, mask.bias, scale, causal, window)?);
    }
    // The f32 forward serves the encoders (bidirectional, no window);
    // decoders in f32 keep the composed path.
    if !causal && window.is_none() && !needs_grad(&[q, k, v]) && flash_forward_supported(q, k, v) {
        return flash_attention_merged(q, k, v, mask.bias, scale, false, None);
    }
    mask.check_composed(s, k.dim(2)?)?;
    merge(composed_attention(q, k, v, mask.dense, scale)?)
}

/// Sequences packed end to end (text-embeddings-inference's variable-length
/// batches): sequence `i` holds tokens `offsets[i]..offsets[i + 1]` of a
/// `[tokens, ...]` tensor, so a batch of mixed lengths carries no padding.
/// Made once per batch; [`attention_packed`] reads it in every layer.
#[derive(Debug, Clone)]
pub struct PackedSeqs {
    offsets: Vec<usize>,
    /// The kernel's device index, when the packed kernel can run here.
    index: Option<Tensor>,
    /// Where the kernel does not run: the gathers between the packed and
    /// a padded layout, made on first use.
    padded: std::sync::OnceLock<PaddedLayout>,
}

/// The gathers [`attention_packed`] runs attention through where its kernel
/// does not: `[tokens]` rows to `[n, s]` slots (a padding slot repeats its
/// sequence's first token) and back, and the padding bias `[n, 1, 1, s]`.
#[derive(Debug, Clone)]
struct PaddedLayout {
    to_padded: Tensor,
    to_packed: Tensor,
    bias: Tensor,
}

impl PackedSeqs {
    /// Sequences of `lengths` tokens (each at least 1), for attention with
    /// `head_dim`-wide heads in `dtype` on `device`.
    ///
    /// # Errors
    /// No sequences, an empty one, or the index upload failing.
    pub fn new(lengths: &[usize], device: &Device, dtype: DType, head_dim: usize) -> Result<Self> {
        if lengths.is_empty() || lengths.contains(&0) {
            return Err(Error::InvalidInput(
                "packed sequences: need at least one sequence and no empty one".into(),
            ));
        }
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0);
        for &n in lengths {
            offsets.push(offsets[offsets.len() - 1] + n);
        }
        let index = if flash_forward_available(device, dtype, head_dim) {
            Some(flash_packed_index(&offsets, device)?)
        } else {
            None
        };
        Ok(Self {
            offsets,
            index,
            padded: std::sync::OnceLock::new(),
        })
    }

    /// The [`PaddedLayout`] on `device`, made the first time.
    fn padded(&self, device: &Device) -> Result<&PaddedLayout> {
        if let Some(p) = self.padded.get() {
            return Ok(p);
        }
        let (n, s) = (self.len(), self.max_len());
        let to_padded = self.padded_index(s);
        let mut to_packed = Vec::with_capacity(self.tokens());
        let mut mask = Vec::with_capacity(n);
        for (i, w) in self.offsets.windows(2).enumerate() {
            let len = w[1] - w[0];
            to_packed.extend((0..len).map(|j| (i * s + j) as u32));
            let mut m = vec![1u32; len];
            m.resize(s, 0);
            mask.push(m);
        }
        let bias = match padding_bias(Some(&mask), device)? {
            Some(b) => b,
            None => Tensor::zeros((n, 1, 1, s), DType::F32, device)?,
        };
        let layout = PaddedLayout {
            to_padded: Tensor::from_vec(to_padded, n * s, device)?,
            to_packed: Tensor::from_vec(to_packed, self.tokens(), device)?,
            bias,
        };
        Ok(self.padded.get_or_init(|| layout))
    }

    /// For each sequence, `s` indices into the packed tokens: its own, then
    /// its first token again for each padding slot.
    fn padded_index(&self, s: usize) -> Vec<u32> {
        let mut index = Vec::with_capacity(self.len() * s);
        for w in self.offsets.windows(2) {
            let (start, len) = (w[0], w[1] - w[0]);
            index.extend((0..s).map(|j| (start + if j < len { j } else { 0 }) as u32));
        }
        index
    }

    /// Packed rows `[1, tokens, h]` as right-padded rows `[n, s, h]` (`s` at
    /// least the longest sequence), e.g. for pooling: a padding slot repeats
    /// its sequence's first token, which a padding mask leaves out.
    ///
    /// # Errors
    /// `x` not `[1, tokens, h]`, or `s` shorter than a sequence.
    pub fn to_padded_rows(&self, x: &Tensor, s: usize) -> Result<Tensor> {
        let (one, tokens, h) = x.dims3()?;
        if one != 1 || tokens != self.tokens() || s < self.max_len() {
            return Err(Error::InvalidInput(format!(
                "packed rows {:?} for {} tokens padded to {s} (longest {})",
                x.dims(),
                self.tokens(),
                self.max_len()
            )));
        }
        let index = Tensor::from_vec(self.padded_index(s), self.len() * s, x.device())?;
        Ok(x.squeeze(0)?
            .index_select(&index, 0)?
            .reshape((self.len(), s, h))?)
    }

    /// Token offsets: one more than there are sequences, from 0 to [`Self::tokens`].
    #[must_use]
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// How many sequences.
    #[must_use]
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Always false: [`Self::new`] refuses an empty batch.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens of all sequences together.
    #[must_use]
    pub fn tokens(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }

    /// The longest sequence's length.
    #[must_use]
    pub fn max_len(&self) -> usize {
        self.offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }
}

/// Bidirectional attention over [`PackedSeqs`]: `q`, `k`, `v` are `[1,
/// heads, tokens, d]` (`heads` a multiple of `k`'s heads), each sequence
/// attending to its own tokens only; `bias` (optional, f32) broadcasts to
/// `[1, heads, n, n]` with `n` at least the longest sequence and is read by
/// row and column within the sequence (MPNet's relative position bias).
/// Returns `[1, tokens, heads · d]`. On CUDA in bf16/f16 with head dim 32,
/// 64 or 128 (f32: 32 or 64) the packed kernel ([`crate::backend::kernels::flash_attention_packed`])
/// runs all sequences in one launch; elsewhere the sequences are gathered
/// into padded rows for [`attention`] (with a padding mask) and back.
/// Inference only (no backward).
///
/// # Errors
/// Shape or dtype mismatches.
pub fn attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &PackedSeqs,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, heads, tokens, d) = q.dims4()?;
    if b != 1 || tokens != seqs.tokens() {
        candle_core::bail!(
            "attention_packed: q {:?} is not [1, heads, {}, d]",
            q.dims(),
            seqs.tokens()
        );
    }
    if let Some(index) = &seqs.index {
        if flash_forward_supported(q, k, v) {
            return flash_attention_packed(q, k, v, &seqs.offsets, index, bias, scale)?.reshape((
                1,
                tokens,
                heads * d,
            ));
        }
    }
    // Elsewhere the sequences are gathered into padded rows for
    // [`attention`] and the real rows gathered back: the projections and
    // the MLP around it still see no padding.
    let dev = q.device();
    let pad = seqs
        .padded(dev)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let (n, s) = (seqs.len(), seqs.max_len());
    let padded = |x: &Tensor| -> candle_core::Result<Tensor> {
        let h = x.dim(1)?;
        x.contiguous()?
            .index_select(&pad.to_padded, 2)?
            .reshape((h, n, s, d))?
            .transpose(0, 1)?
            .contiguous()
    };
    let bias = match bias {
        Some(b) => pad
            .bias
            .broadcast_add(&b.narrow(2, 0, s)?.narrow(3, 0, s)?.to_dtype(DType::F32)?)?,
        None => pad.bias.clone(),
    };
    let out = attention(
        &padded(q)?,
        &padded(k)?,
        &padded(v)?,
        &Mask::bidirectional(Some(&bias)),
        scale,
    )?;
    out.reshape((n * s, heads * d))?
        .index_select(&pad.to_packed, 0)?
        .reshape((1, tokens, heads * d))
}

/// What [`attention_taped`]'s backward needs.
pub(crate) enum AttentionTape {
    /// The fused kernel (which kept its log-sum-exp).
    Flash(FlashTape),
    /// The composed path: its inputs, output (`[b, heads, s, d]`) and mask.
    Composed {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        bias: Option<Tensor>,
        scale: f64,
    },
}

/// [`attention`] outside the autograd graph, for a layer that writes its
/// own backward: the result (`[b, s, heads · d]`) and the tape for
/// [`AttentionTape::backward`]. Same implementation choice as
/// [`attention`].
///
/// # Errors
/// As [`attention`].
pub(crate) fn attention_taped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask<'_>,
    scale: f64,
) -> candle_core::Result<(Tensor, AttentionTape)> {
    let (b, heads, s, d) = q.dims4()?;
    let merge = |o: &Tensor| o.transpose(1, 2)?.reshape((b, s, heads * d));
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    if flash_attention_supported(&q, &k, &v) {
        let (causal, window) = mask.kind.kernel_flags();
        let (o, tape) = flash_attention_taped(&q, &k, &v, mask.bias, scale, causal, window)?;
        return Ok((merge(&o)?, AttentionTape::Flash(tape)));
    }
    check_groups(heads, k.dim(1)?)?;
    mask.check_composed(s, k.dim(2)?)?;
    let bias = mask.dense.map(Tensor::detach);
    let out = composed(&q, &k, &v, bias.as_ref(), scale)?;
    let merged = merge(&out)?;
    Ok((
        merged,
        AttentionTape::Composed {
            q,
            k,
            v,
            out,
            bias,
            scale,
        },
    ))
}

impl AttentionTape {
    /// `(dq, dk, dv)` (shaped as q, k and v) for the gradient of the merged
    /// output (`[b, s, heads · d]`).
    ///
    /// # Errors
    /// Shape mismatch, backend errors.
    pub(crate) fn backward(
        &self,
        d_merged: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let split = |shape: &[usize]| -> candle_core::Result<Tensor> {
            let &[b, h, s, d] = shape else {
                candle_core::bail!("attention backward: q is not 4-D");
            };
            d_merged
                .reshape((b, s, h, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        match self {
            Self::Flash(tape) => tape.backward(&split(tape.q_dims())?),
            Self::Composed {
                q,
                k,
                v,
                out,
                bias,
                scale,
            } => attention_backward(q, k, v, out, &split(q.dims())?, bias.as_ref(), *scale),
        }
    }
}

/// Whether attention over q/k/v of this device, dtype and head width takes
/// the composed path, which reads [`Mask::dense`]; the fused kernel masks
/// by kind and needs only the padding bias, so a model skips building the
/// `s × t` dense mask (on the host) when this is false.
#[must_use]
pub(crate) fn dense_mask_needed(
    device: &candle_core::Device,
    dtype: candle_core::DType,
    head_dim: usize,
) -> bool {
    !flash_attention_available(device, dtype, head_dim)
}

/// `softmax(q kᵀ · scale + bias) v` from matmuls and Candle's fused softmax
/// (the path [`attention`] takes off CUDA, and the reference for the fused
/// kernel). `bias` is an additive f32 mask or position bias broadcastable
/// to `[b, heads, s, t]`; scores and softmax are f32, like transformers'
/// eager attention.
///
/// When an input tracks gradients the op is one graph node with a written
/// backward that recomputes the probabilities (as FlashAttention does)
/// instead of keeping the f32 scores and probabilities of every layer until
/// the backward pass: at the LoRA benchmark's shape (b8 × 512, 14 heads,
/// 24 layers) those were about 18 GB. No gradient flows to `bias`.
///
/// # Errors
/// Shape or dtype mismatches.
pub fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    check_groups(q.dim(1)?, k.dim(1)?)?;
    if !needs_grad(&[q, k, v]) {
        return composed(q, k, v, bias, scale);
    }
    let bias = bias.map(Tensor::detach);
    let out = composed(&q.detach(), &k.detach(), &v.detach(), bias.as_ref(), scale)?;
    let backward = move |args: &[&Tensor], out: &Tensor, dout: &Tensor| {
        let &[q, k, v] = args else {
            candle_core::bail!("attention backward: expected q, k and v");
        };
        let (dq, dk, dv) = attention_backward(q, k, v, out, dout, bias.as_ref(), scale)?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    };
    with_backward(&[q, k, v], &out, Arc::new(backward))
}

/// The forward: matmuls and Candle's fused softmax.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let rep = q.dim(1)? / k.dim(1)?;
    let k = repeat_kv(k, rep)?.contiguous()?;
    let v = repeat_kv(v, rep)?.contiguous()?;
    let probs = probabilities(&q.contiguous()?, &k, bias, scale)?;
    probs.to_dtype(v.dtype())?.matmul(&v)
}

/// `softmax(q kᵀ · scale + bias)` in f32, `k` already repeated to `q`'s heads.
fn probabilities(
    q: &Tensor,
    k: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)
}

/// Gradients of [`attention`] with respect to `q`, `k` and `v`, the
/// probabilities recomputed from `q` and `k`:
/// `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`,
/// `dQ = dS K · scale`, `dK = dSᵀ Q · scale`, key/value gradients summed over
/// the query heads that share them.
fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    dout: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let dtype = q.dtype();
    let rep = q.dim(1)? / k.dim(1)?;
    let q = q.detach().contiguous()?;
    let kr = repeat_kv(&k.detach(), rep)?.contiguous()?;
    let vr = repeat_kv(&v.detach(), rep)?.contiguous()?;
    let dout = dout.contiguous()?;
    let p = probabilities(&q, &kr, bias, scale)?;
    let dv = p.to_dtype(dtype)?.t()?.matmul(&dout)?;
    let dp = dout.matmul(&vr.t()?)?.to_dtype(DType::F32)?;
    // rowsum(dP ∘ P) = rowsum(dO ∘ O), which is s × d instead of s × t.
    let delta = (dout.to_dtype(DType::F32)? * out.detach().to_dtype(DType::F32)?)?
        .sum_keepdim(D::Minus1)?;
    let ds = ((p * dp.broadcast_sub(&delta)?)? * scale)?.to_dtype(dtype)?;
    let dq = ds.matmul(&kr)?;
    let dk = ds.t()?.matmul(&q)?;
    Ok((dq, sum_groups(&dk, rep)?, sum_groups(&dv, rep)?))
}

/// Sums the `n_rep` query heads of each key/value head:
/// `[b, kv_heads * n_rep, t, d]` → `[b, kv_heads, t, d]` (the backward of
/// [`repeat_kv`]).
fn sum_groups(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.reshape((b, h / n_rep, n_rep, t, d))?.sum(2)
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

impl MaskKind {
    /// The fused kernel's flags for this kind: causal, and the window.
    fn kernel_flags(self) -> (bool, Option<usize>) {
        match self {
            MaskKind::Bidirectional => (false, None),
            MaskKind::Causal => (true, None),
            MaskKind::SlidingWindow(w) => (true, Some(w)),
        }
    }

    /// Whether `q_len` queries, the last of `kv_len` positions, have keys
    /// this kind hides from some of them (so the composed path needs a
    /// dense mask).
    fn hides_keys(self, q_len: usize, kv_len: usize) -> bool {
        match self {
            MaskKind::Bidirectional => false,
            MaskKind::Causal => q_len > 1,
            MaskKind::SlidingWindow(w) => q_len > 1 || kv_len > w,
        }
    }
}

/// The additive attention mask `[b, 1, q_len, past + q_len]` (`[1, 1, …]`
/// when nothing is padded; f32, 0 or a large negative) for `q_len` new queries after `past` cached positions,
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
    if !any_padding && !kind.hides_keys(q_len, kv_len) {
        return Ok(None);
    }
    // Without padding every row of the batch has the same mask: build one
    // and let it broadcast.
    let b = if any_padding { b } else { 1 };
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

/// The additive padding bias `[b, 1, 1, n]` (0 for a token, `f32::MIN`
/// for padding) of `padding` rows (`[b, n]`, 1 = token), for the fused
/// kernel; `None` when nothing is padded.
///
/// # Errors
/// Tensor errors.
pub(crate) fn padding_bias(
    padding: Option<&[Vec<u32>]>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let Some(rows) = padding.filter(|p| p.iter().flatten().any(|&m| m == 0)) else {
        return Ok(None);
    };
    let (b, n) = (rows.len(), rows.first().map_or(0, Vec::len));
    let bias: Vec<f32> = rows
        .iter()
        .flatten()
        .map(|&m| if m == 0 { f32::MIN } else { 0.0 })
        .collect();
    Ok(Some(Tensor::from_vec(bias, (b, 1, 1, n), device)?))
}

/// Reads a `[b, n]` 0/1 mask tensor into rows of u32.
///
/// # Errors
/// Fails when it is not 2-D.
pub(crate) fn mask_rows(mask: &Tensor) -> Result<Vec<Vec<u32>>> {
    Ok(mask.to_dtype(DType::U32)?.to_vec2::<u32>()?)
}
