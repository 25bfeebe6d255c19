//! RMSNorm (decoders) and LayerNorm (encoders).
//!
//! Candle's fused `rms_norm` and `layer_norm` have no backward pass. Where an
//! input tracks gradients (training), RMSNorm runs our fused kernel, which
//! has one; otherwise Candle's. Nobody sets a mode: the tensors say it.

use candle_core::Tensor;

use crate::backend::autograd::needs_grad;
use crate::error::Result;
use crate::io::Weights;

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
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Ours on CUDA (few rows get more threads: Candle's took 24 µs for
        // a decoding row of 896 on an H200, Nsight Compute) and for
        // training (Candle's has no backward); Candle's on the CPU for
        // inference. Switching the CPU too (one formula per model) moved
        // SmolLM2 Q4_1's decode-path perplexity from 148.1 to 150.6 (250
        // tokens, the real tier's check) through Candle's 8-bit activation
        // rounding: kept.
        if needs_grad(&[x, &self.weight]) || x.device().is_cuda() {
            crate::backend::kernels::rms_norm(x, &self.weight, self.eps as f32)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
        }
    }
}

impl RmsNorm {
    /// The norm through our kernel on every device (the rounding training
    /// differentiates), outside the autograd graph: the forward of a layer
    /// whose backward is written by hand ([`Self::backward_taped`]).
    pub(crate) fn forward_taped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::backend::kernels::rms_norm(&x.detach(), &self.weight, self.eps as f32)
    }

    /// The input gradient of the norm at `x` for the output gradient `dy`
    /// (the weight is frozen: no gradient for it).
    pub(crate) fn backward_taped(&self, x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        crate::backend::kernels::rms_norm_backward(x, &self.weight, dy, self.eps as f32)
    }

    /// Whether the weight is frozen (what [`Self::backward_taped`] assumes).
    pub(crate) fn frozen(&self) -> bool {
        !self.weight.track_op()
    }

    /// `(x + delta, self(x + delta))`: a residual add and this norm after
    /// it, fused for inference ([`crate::backend::kernels::add_rms_norm`]).
    ///
    /// # Errors
    /// Tensor errors.
    pub(crate) fn add_forward(
        &self,
        x: &Tensor,
        delta: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        crate::backend::kernels::add_rms_norm(x, delta, &self.weight, self.eps as f32)
    }
}

/// Layer normalisation with a weight and a bias (BERT, MPNet).
///
/// Encoders are inference-only here. On a GPU this is our one-pass kernel
/// (`backend::kernels::layer_norm`, centred variance in f32 like
/// transformers); elsewhere, and for gradient-tracking inputs, Candle's
/// (variance as `E[x²] − E[x]²` in f32; its fused kernel has no backward).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `[2, dim]`: the weight and the bias, stacked as the GPU kernel takes them.
    params: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both of shape `[dim]`.
    ///
    /// # Errors
    /// Missing tensor or wrong shape.
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[dim])?;
        let bias = w.get(&format!("{prefix}.bias"), &[dim])?;
        Ok(Self {
            params: Tensor::stack(&[&weight, &bias], 0)?,
            eps,
        })
    }

    /// The weight and bias, `[2, dim]`.
    pub(crate) fn params(&self) -> &Tensor {
        &self.params
    }

    /// Normalises over the last dimension.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cuda() && x.dtype() == self.params.dtype() && !needs_grad(&[x]) {
            return crate::backend::kernels::layer_norm(x, &self.params, self.eps as f32);
        }
        let (weight, bias) = (self.params.get(0)?, self.params.get(1)?);
        candle_nn::ops::layer_norm(&x.contiguous()?, &weight, &bias, self.eps as f32)
    }
}
