//! Training losses.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::backend::autograd::with_backward;
use crate::backend::kernels::{cross_entropy_grad, cross_entropy_stats};
use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::models::CausalLm;

/// Label value that excludes a position from the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Softmax cross-entropy over `logits` `[n, vocab]` against `labels` `[n]`
/// (`-100` = [`IGNORE_INDEX`] is ignored), mean over kept labels.
/// Differentiable.
///
/// # Errors
/// Fails when no label is kept, or on shape errors.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let (keep, targets) = kept_labels(labels, n, v, logits.device())?;
    let k = targets.len();
    let targets = Tensor::from_vec(targets, k, logits.device())?;
    let logits = logits.index_select(&keep, 0)?.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.neg()?.mean_all()?)
}

/// The rows of `labels` (`[n]`) that are not [`IGNORE_INDEX`] (a u32
/// tensor on `device`) and their labels.
fn kept_labels(
    labels: &Tensor,
    n: usize,
    v: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Vec<u32>)> {
    let labels = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if labels.len() != n {
        return Err(Error::InvalidInput(format!(
            "{} labels for {n} logit rows",
            labels.len()
        )));
    }
    selected_labels(&labels, v, device)
}

/// Checks `labels`: at least one kept (not [`IGNORE_INDEX`]), each kept one
/// inside a vocabulary of `v`. Returns how many are kept.
fn check_labels(labels: &[i64], v: usize) -> Result<usize> {
    let kept = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if kept == 0 {
        return Err(Error::InvalidInput("every label is masked (-100)".into()));
    }
    if let Some(&bad) = labels
        .iter()
        .find(|&&l| l != IGNORE_INDEX && (l < 0 || l >= v as i64))
    {
        return Err(Error::InvalidInput(format!(
            "label {bad} is outside the vocabulary ({v})"
        )));
    }
    Ok(kept)
}

/// The indices of the kept rows of `labels` (a u32 tensor on `device`)
/// and their labels, checked ([`check_labels`]).
fn selected_labels(
    labels: &[i64],
    v: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Vec<u32>)> {
    let k = check_labels(labels, v)?;
    let keep: Vec<u32> = (0..labels.len() as u32)
        .filter(|&i| labels[i as usize] != IGNORE_INDEX)
        .collect();
    let targets: Vec<u32> = keep.iter().map(|&i| labels[i as usize] as u32).collect();
    Ok((Tensor::from_vec(keep, k, device)?, targets))
}

/// Rows of the head (words) the loss multiplies by at once. A quantized
/// head is dequantized this many rows at a time (Candle's row lookup
/// kernels), never whole: Qwen2.5-0.5B's 151,936-word head is 272 MB in
/// bf16, more than its Q4 base layers together.
const HEAD_SLICE_ROWS: usize = 8192;

/// Logit elements one block of [`linear_cross_entropy`] forms at once
/// (2²⁶ = 8,192 positions × one slice of 8,192 words; 128 MiB in bf16).
const BLOCK_ELEMENTS: usize = 1 << 26;

/// Rows `start..start + len` of the head's `[vocab, h]` weight in `dtype`:
/// a view of a dense weight, or that slice of a quantized one dequantized.
fn head_rows(
    head: &Linear,
    ids: Option<&Tensor>,
    (start, len): (usize, usize),
    dtype: DType,
) -> Result<Tensor> {
    Ok(match (head.quantized_weight(), ids) {
        (Some(q), Some(ids)) => q.embedding(ids)?.to_dtype(dtype)?,
        _ => head.dense_weight(dtype)?.narrow(0, start, len)?,
    })
}

/// Mean softmax cross-entropy of `lm_head(hidden)` (`hidden` `[.., h]`,
/// `n` rows) against `targets` (`[n]`, on the host), without keeping the
/// `[n, vocab]` logits or a dense copy of a quantized head: the forward
/// forms the logits a block of rows by a slice of words at a time and keeps
/// only each row's log-sum-exp (the slices' merged) and its target's logit;
/// the backward forms each block again, turns it into `softmax − onehot`
/// and multiplies by the slice of the weight, summing the slices in f32.
/// At the LoRA benchmark's shape (4,096 positions, 151,936 words) the
/// composed loss kept about 12 GB of f32 logits and their derivatives.
///
/// With `mask` (`[n]` f32, 1 for a kept row, 0 for an ignored one whose
/// target is any valid id) ignored rows add nothing to the loss and get a
/// zero gradient; the mean is over `count` kept rows.
///
/// Math in f32 over logits in the head's dtype, as [`causal_lm_loss`], one
/// kernel pass over each block each way (`backend::kernels::cross_entropy`).
/// The gradient flows to `hidden` only (the head is frozen).
fn linear_cross_entropy(
    hidden: &Tensor,
    lm_head: &Linear,
    targets: &[u32],
    mask: Option<&Tensor>,
    count: usize,
) -> Result<Tensor> {
    let shape = hidden.shape().clone();
    let width = hidden.dim(D::Minus1)?;
    let n = hidden.elem_count() / width.max(1);
    let vocab = lm_head.out_features();
    if targets.len() != n {
        return Err(Error::InvalidInput(format!(
            "{} targets for {n} rows",
            targets.len()
        )));
    }
    let device = hidden.device().clone();
    let h = hidden.detach().reshape((n, width))?;
    let dtype = h.dtype();
    let mask = mask.map(|m| m.reshape((n, 1))).transpose()?;
    let slices: Vec<(usize, usize)> = (0..vocab)
        .step_by(HEAD_SLICE_ROWS)
        .map(|s| (s, HEAD_SLICE_ROWS.min(vocab - s)))
        .collect();
    let block = (BLOCK_ELEMENTS / HEAD_SLICE_ROWS.min(vocab).max(1)).max(1);
    // Per slice, each row's target inside it (`picks`: 0 when outside, a
    // valid index for the statistics kernel; `hits`: 1 when inside) and
    // for the gradient kernel the same with `len` when outside (no column
    // matches it: no one-hot in that slice). One upload each, [slices, n].
    let (mut picks, mut grads, mut hits) = (Vec::new(), Vec::new(), Vec::new());
    for &(s0, len) in &slices {
        for &t in targets {
            let t = t as usize;
            let inside = t >= s0 && t < s0 + len;
            picks.push(if inside { (t - s0) as u32 } else { 0 });
            grads.push(if inside { (t - s0) as u32 } else { len as u32 });
            hits.push(f32::from(u8::from(inside)));
        }
    }
    let k = slices.len();
    let picks = Tensor::from_vec(picks, (k, n), &device)?;
    let grads = Tensor::from_vec(grads, (k, n), &device)?;
    let hits = Tensor::from_vec(hits, (k, n), &device)?;
    // A quantized head's slices are read by id (the row lookup kernels).
    let ids: Vec<Option<Tensor>> = match lm_head.quantized_weight() {
        Some(_) => slices
            .iter()
            .map(|&(s0, len)| Tensor::arange(s0 as u32, (s0 + len) as u32, &device).map(Some))
            .collect::<candle_core::Result<_>>()?,
        None => vec![None; k],
    };
    let row_blocks: Vec<(usize, usize)> = (0..n)
        .step_by(block)
        .map(|r| (r, block.min(n - r)))
        .collect();
    // Forward: per block of rows, every slice's log-sum-exp and picked
    // logit, merged over slices.
    let mut lse_blocks = Vec::with_capacity(row_blocks.len());
    let mut picked_blocks = Vec::with_capacity(row_blocks.len());
    for &(r0, rn) in &row_blocks {
        let hb = h.narrow(0, r0, rn)?;
        let (mut lses, mut pickeds) = (Vec::with_capacity(k), Vec::with_capacity(k));
        for (i, &slice) in slices.iter().enumerate() {
            let w = head_rows(lm_head, ids[i].as_ref(), slice, dtype)?;
            let logits = hb.matmul(&w.t()?)?;
            let local = picks.get(i)?.narrow(0, r0, rn)?;
            let stats = cross_entropy_stats(&logits, &local)?;
            lses.push(stats.narrow(1, 0, 1)?);
            pickeds.push(stats.narrow(1, 1, 1)?);
        }
        // log Σ_slices exp(lse_slice), from the largest.
        let lses = Tensor::cat(&lses, 1)?;
        let top = lses.max_keepdim(1)?;
        let lse = (lses.broadcast_sub(&top)?.exp()?.sum_keepdim(1)?.log()? + top)?;
        let inside = hits.narrow(1, r0, rn)?.t()?;
        let picked = (Tensor::cat(&pickeds, 1)? * inside)?.sum_keepdim(1)?;
        lse_blocks.push(lse);
        picked_blocks.push(picked);
    }
    let lse = Tensor::cat(&lse_blocks, 0)?;
    let mut nll = (&lse - Tensor::cat(&picked_blocks, 0)?)?;
    if let Some(m) = &mask {
        nll = (nll * m)?;
    }
    let loss = (nll.sum_all()? / count as f64)?;
    if !hidden.track_op() {
        return Ok(loss);
    }
    let lse = lse.squeeze(1)?;
    let head = lm_head.clone();
    let backward = move |_: &[&Tensor], _: &Tensor, grad: &Tensor| {
        let g = (grad.to_dtype(DType::F32)? / count as f64)?;
        let mut dh = Vec::with_capacity(row_blocks.len());
        for &(r0, rn) in &row_blocks {
            let hb = h.narrow(0, r0, rn)?;
            let lse_b = lse.narrow(0, r0, rn)?;
            let mut sum: Option<Tensor> = None;
            for (i, &slice) in slices.iter().enumerate() {
                let w = head_rows(&head, ids[i].as_ref(), slice, dtype)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let logits = hb.matmul(&w.t()?)?;
                let local = grads.get(i)?.narrow(0, r0, rn)?;
                let dlogits = cross_entropy_grad(&logits, &local, &lse_b, &g)?;
                let d = dlogits.matmul(&w)?.to_dtype(DType::F32)?;
                sum = Some(match sum {
                    Some(s) => (s + d)?,
                    None => d,
                });
            }
            let Some(mut d) = sum else {
                candle_core::bail!("linear cross-entropy: a head with no rows");
            };
            if let Some(m) = &mask {
                d = d.broadcast_mul(&m.narrow(0, r0, rn)?)?;
            }
            dh.push(d.to_dtype(dtype)?);
        }
        Ok(vec![Some(Tensor::cat(&dh, 0)?.reshape(&shape)?)])
    };
    Ok(with_backward(&[hidden], &loss, Arc::new(backward))?)
}

/// Rows of a next-token batch that an ignored row may share the head's
/// matmul with: when at most one row in this many is ignored, every
/// position runs through the head and ignored ones are masked; more, and
/// the kept rows are selected first (whose backward scatters the rows back
/// with Candle's `index_add`, 2.5 ms of a 1.5B-shape step on an H200).
const MASK_WHEN_ONE_IN: usize = 8;

/// Next-token loss of a batch straight from the model, without forming
/// `[b, s, vocab]` logits: `model`'s final hidden states at position `t`
/// predict `labels[t + 1]` (`labels` `[b, s]`, `-100` on prompt and
/// padding), through its output projection a chunk of positions at a time.
/// Equal to [`shifted_causal_lm_loss`] over `model.forward(..)`'s logits;
/// what training uses. Returns the loss and the number of kept labels.
///
/// A head with an adapter or a bias takes the logits path (the fused
/// backward knows only a plain frozen weight).
///
/// # Errors
/// Shape mismatch, no kept label, a label outside the vocabulary, tensor
/// errors.
pub fn lm_loss(
    model: &dyn CausalLm,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    labels: &Tensor,
) -> Result<(Tensor, usize)> {
    let head = model.lm_head();
    if head.adapter().is_some() || head.bias().is_some() {
        let logits = model.forward(input_ids, attention_mask, None)?;
        return shifted_causal_lm_loss(&logits, labels);
    }
    let hidden = model.forward_hidden(input_ids, attention_mask, None)?;
    let (b, s, h) = hidden.dims3()?;
    check_shift(labels, b, s)?;
    // Each position's next label; the last position of a row has none.
    let rows = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let next: Vec<i64> = rows
        .iter()
        .flat_map(|r| r[1..].iter().copied().chain([IGNORE_INDEX]))
        .collect();
    let ignored = next.iter().filter(|&&l| l == IGNORE_INDEX).count();
    if ignored * MASK_WHEN_ONE_IN <= next.len() {
        let (targets, mask, kept) = masked_labels(&next, head.out_features(), hidden.device())?;
        return Ok((
            linear_cross_entropy(&hidden, head, &targets, Some(&mask), kept)?,
            kept,
        ));
    }
    let hidden = hidden.reshape((b * s, h))?;
    let (keep, targets) = selected_labels(&next, head.out_features(), hidden.device())?;
    let kept = keep.dim(0)?;
    let hidden = hidden.index_select(&keep, 0)?;
    Ok((
        linear_cross_entropy(&hidden, head, &targets, None, kept)?,
        kept,
    ))
}

/// Every row's target (0 for an ignored row), a mask (f32 on `device`, 1
/// for a kept row) and the kept count, checked ([`check_labels`]).
fn masked_labels(
    labels: &[i64],
    v: usize,
    device: &candle_core::Device,
) -> Result<(Vec<u32>, Tensor, usize)> {
    let kept = check_labels(labels, v)?;
    let n = labels.len();
    let targets: Vec<u32> = labels
        .iter()
        .map(|&l| if l == IGNORE_INDEX { 0 } else { l as u32 })
        .collect();
    let mask: Vec<f32> = labels
        .iter()
        .map(|&l| f32::from(u8::from(l != IGNORE_INDEX)))
        .collect();
    Ok((targets, Tensor::from_vec(mask, n, device)?, kept))
}

/// Checks `labels` against `[b, s]` logits for a shifted loss.
fn check_shift(labels: &Tensor, b: usize, s: usize) -> Result<()> {
    if labels.dims() != [b, s] {
        return Err(Error::InvalidInput(format!(
            "labels must be [{b}, {s}], got {:?}",
            labels.dims()
        )));
    }
    if s < 2 {
        return Err(Error::InvalidInput(
            "sequences need at least two tokens for a next-token loss".into(),
        ));
    }
    Ok(())
}

/// Next-token loss of a batch, as transformers' causal LM loss: the
/// logits at position `t` (`[b, s, vocab]`) predict `labels[t + 1]`
/// (`[b, s]`, `-100` on prompt and padding), mean over the kept labels.
/// Returns the loss and the number of kept labels.
///
/// # Errors
/// Shape mismatch, no kept label, tensor errors.
pub fn shifted_causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, s, v) = logits.dims3()?;
    check_shift(labels, b, s)?;
    let logits = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let labels = labels.narrow(1, 1, s - 1)?.flatten_all()?;
    let kept = labels
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .count();
    Ok((causal_lm_loss(&logits, &labels)?, kept))
}
