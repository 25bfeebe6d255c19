//! Transformer parts shared by our models: linear layers with an adapter
//! hook, RMSNorm, LayerNorm, rotary embeddings, attention masks and softmax.
//!
//! Candle's fused `rms_norm`, `softmax_last_dim` and `rope` kernels have no
//! backward pass: gradients silently stop at them. Every part here therefore
//! has two paths selected by [`OpsMode`]: fused kernels for inference, and
//! compositions of differentiable primitives for training.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};

use super::loader::Weights;
use crate::error::Result;

/// Which implementation of the normalisation/softmax/rotary ops to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpsMode {
    /// Candle's fused kernels: fastest, but no gradients flow through them.
    #[default]
    Fused,
    /// Compositions of differentiable primitives, for training.
    Differentiable,
}

/// Something that adds to a linear layer's output, e.g. a LoRA adapter.
///
/// The layer computes `base(x) + adapter.forward(x)`.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// The adapter's contribution for input `x` (`[..., in]` → `[..., out]`).
    ///
    /// # Errors
    /// Tensor errors (shape, device, dtype).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

/// A linear layer `y = x Wᵀ + b` with an optional adapter hook.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

impl Linear {
    /// A layer from a `[out, in]` weight and an optional `[out]` bias.
    #[must_use]
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
            adapter: None,
        }
    }

    /// Loads `{prefix}.weight` (`[out, in]`) and, if `bias`, `{prefix}.bias`.
    ///
    /// # Errors
    /// Missing tensor or wrong shape.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// The `[out, in]` weight.
    #[must_use]
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias, if any.
    #[must_use]
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Input features.
    #[must_use]
    pub fn in_features(&self) -> usize {
        self.weight().dims()[1]
    }

    /// Output features.
    #[must_use]
    pub fn out_features(&self) -> usize {
        self.weight().dims()[0]
    }

    /// The attached adapter, if any.
    #[must_use]
    pub fn adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        self.adapter.as_ref()
    }

    /// Attaches (`Some`) or detaches (`None`) an adapter.
    pub fn set_adapter(&mut self, adapter: Option<Arc<dyn LinearAdapter>>) {
        self.adapter = adapter;
    }

    /// Replaces the base weight (same shape), e.g. to merge an adapter in.
    ///
    /// # Errors
    /// Fails on a shape mismatch.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        if weight.dims() != self.weight().dims() {
            return Err(crate::Error::ShapeMismatch {
                name: "linear weight".into(),
                expected: self.weight().dims().to_vec(),
                actual: weight.dims().to_vec(),
            });
        }
        self.inner = candle_nn::Linear::new(weight, self.inner.bias().cloned());
        Ok(())
    }

    /// Applies the layer (and its adapter).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.inner.forward(x)?;
        match &self.adapter {
            Some(a) => y + a.forward(x)?,
            None => Ok(y),
        }
    }
}

/// Root-mean-square layer norm, statistics in f32 like transformers.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `{name}` of shape `[dim]`.
    ///
    /// # Errors
    /// Missing tensor or wrong shape.
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(name, &[dim])?,
            eps,
        })
    }

    /// Applies the norm over the last dimension.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward(&self, x: &Tensor, mode: OpsMode) -> candle_core::Result<Tensor> {
        match mode {
            OpsMode::Fused => candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32),
            // Our fused kernel has a backward pass (Candle's has none).
            OpsMode::Differentiable => {
                crate::backend::kernels::rms_norm(x, &self.weight, self.eps as f32)
            }
        }
    }
}

/// Layer normalisation with a weight and a bias (BERT, MPNet).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both of shape `[dim]`.
    ///
    /// # Errors
    /// Missing tensor or wrong shape.
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{prefix}.weight"), &[dim])?,
            bias: w.get(&format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }

    /// Normalises over the last dimension.
    ///
    /// The fused kernel computes the variance as E[x²] − E[x]² in f32; the
    /// differentiable path subtracts the mean first (two passes, in f32 for
    /// half-precision inputs) like PyTorch.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward(&self, x: &Tensor, mode: OpsMode) -> candle_core::Result<Tensor> {
        match mode {
            OpsMode::Fused => candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            ),
            OpsMode::Differentiable => {
                let dtype = x.dtype();
                let x = x.to_dtype(DType::F32)?;
                let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = centered.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
                normed
                    .to_dtype(dtype)?
                    .broadcast_mul(&self.weight)?
                    .broadcast_add(&self.bias)
            }
        }
    }
}

/// Softmax over the last dimension.
///
/// # Errors
/// Tensor errors.
pub fn softmax_last_dim(x: &Tensor, mode: OpsMode) -> candle_core::Result<Tensor> {
    match mode {
        OpsMode::Fused => candle_nn::ops::softmax_last_dim(x),
        OpsMode::Differentiable => {
            // The max only stabilises; softmax is shift-invariant, so it
            // needs no gradient.
            let max = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        }
    }
}

/// Rotary position embeddings, "NEOX" layout (rotate halves), as in
/// Qwen2/Llama in transformers.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, head_dim / 2]`, f32.
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Tables for `max_positions` positions.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let t = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = t.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// Number of positions the tables cover.
    #[must_use]
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// cos/sin for `positions` (`[b, s]` u32), each `[b, s, head_dim/2]` in `dtype`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn tables(
        &self,
        positions: &Tensor,
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, s) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dims()[1];
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, s, half))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, s, half))?;
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }

    /// Rotates `x` (`[b, heads, s, head_dim]`) by the tables from [`Self::tables`].
    ///
    /// # Errors
    /// Tensor errors.
    pub fn apply(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mode: OpsMode,
    ) -> candle_core::Result<Tensor> {
        match mode {
            OpsMode::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
            OpsMode::Differentiable => {
                let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
                let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
                let half = x.dim(D::Minus1)? / 2;
                let x1 = x.narrow(D::Minus1, 0, half)?;
                let x2 = x.narrow(D::Minus1, half, half)?;
                let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
            }
        }
    }
}

/// Repeats key/value heads `n_rep` times for grouped-query attention:
/// `[b, kv_heads, s, d]` → `[b, kv_heads * n_rep, s, d]`.
///
/// # Errors
/// Tensor errors.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, s, d))?
        .reshape((b, kv * n_rep, s, d))
}

/// The additive attention mask `[b, 1, q_len, kv_len]` (f32, 0 or a large
/// negative) for `q_len` new queries after `past` cached positions: causal,
/// and hiding keys where `padding` (`[b, past + q_len]`, 1 = token,
/// 0 = padding) is 0. `None` when nothing needs masking.
///
/// A large negative rather than -inf keeps rows that are all padding finite.
///
/// # Errors
/// Fails when `padding` has the wrong shape.
pub fn attention_mask(
    b: usize,
    q_len: usize,
    past: usize,
    padding: Option<&[Vec<u32>]>,
    causal: bool,
    device: &Device,
) -> Result<Option<Tensor>> {
    let kv_len = past + q_len;
    if let Some(p) = padding {
        if p.len() != b || p.iter().any(|row| row.len() != kv_len) {
            return Err(crate::Error::InvalidInput(format!(
                "attention mask must be [{b}, {kv_len}], got [{}, {}]",
                p.len(),
                p.first().map_or(0, Vec::len)
            )));
        }
    }
    let any_padding = padding.is_some_and(|p| p.iter().flatten().any(|&m| m == 0));
    if !any_padding && (!causal || q_len == 1) {
        return Ok(None);
    }
    let mut mask = vec![0f32; b * q_len * kv_len];
    for bi in 0..b {
        for i in 0..q_len {
            let row = &mut mask[(bi * q_len + i) * kv_len..(bi * q_len + i + 1) * kv_len];
            for (j, m) in row.iter_mut().enumerate() {
                let hidden_by_causality = causal && j > past + i;
                let hidden_by_padding = padding.is_some_and(|p| p[bi][j] == 0);
                if hidden_by_causality || hidden_by_padding {
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
pub fn mask_rows(mask: &Tensor) -> Result<Vec<Vec<u32>>> {
    Ok(mask.to_dtype(DType::U32)?.to_vec2::<u32>()?)
}
