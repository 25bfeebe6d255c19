//! Training losses.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

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
    let labels = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if labels.len() != n {
        return Err(Error::InvalidInput(format!(
            "{} labels for {n} logit rows",
            labels.len()
        )));
    }
    let keep: Vec<u32> = (0..n as u32)
        .filter(|&i| labels[i as usize] != IGNORE_INDEX)
        .collect();
    if keep.is_empty() {
        return Err(Error::InvalidInput("every label is masked (-100)".into()));
    }
    if let Some(&bad) = keep
        .iter()
        .map(|&i| &labels[i as usize])
        .find(|&&l| l < 0 || l >= v as i64)
    {
        return Err(Error::InvalidInput(format!(
            "label {bad} is outside the vocabulary ({v})"
        )));
    }
    let targets: Vec<u32> = keep.iter().map(|&i| labels[i as usize] as u32).collect();
    let device = logits.device();
    let keep_t = Tensor::from_vec(keep.clone(), keep.len(), device)?;
    let targets = Tensor::from_vec(targets, keep.len(), device)?;
    let logits = logits.index_select(&keep_t, 0)?.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.neg()?.mean_all()?)
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
