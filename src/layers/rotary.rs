//! Rotary position embeddings, "NEOX" layout (rotate halves) as in
//! Llama/Qwen/Mistral in transformers, with the RoPE scaling variants of
//! transformers' `modeling_rope_utils.py`.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::backend::autograd::{needs_grad, with_backward};
use crate::error::Result;

/// How RoPE frequencies are scaled for contexts beyond the trained one
/// (`rope_scaling` / `rope_parameters` in `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Dynamic NTK: beyond `original_max` positions the base grows with the
    /// sequence length.
    Dynamic {
        /// Scale factor.
        factor: f64,
        /// Context length the model was trained with.
        original_max: usize,
    },
    /// YaRN: frequencies blended between interpolation and extrapolation
    /// by a ramp, cos/sin scaled by an attention factor.
    Yarn {
        /// Scale factor.
        factor: f64,
        /// Context length the model was trained with.
        original_max: usize,
        /// Rotations where extrapolation ends (default 32).
        beta_fast: f64,
        /// Rotations where interpolation begins (default 1).
        beta_slow: f64,
        /// Multiplier of cos and sin.
        attention_factor: f64,
        /// Round the ramp bounds to whole dimensions (transformers' default).
        truncate: bool,
    },
    /// Llama 3.1's rule: low frequencies divided by `factor`, high ones
    /// kept, a smooth blend between.
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// Wavelengths longer than `original_max / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original_max / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was trained with.
        original_max: usize,
    },
    /// Each frequency divided by its own factor: how llama.cpp's GGUF files
    /// store Llama 3.1's scaling (`rope_freqs.weight`, one per dimension
    /// pair).
    Divisors(Vec<f64>),
}

/// Frequencies for rotary embeddings of `head_dim` dimensions.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    /// `[1, head_dim / 2]` f32, for positions within the trained context.
    inv_freq: Tensor,
    attention_factor: f64,
}

/// transformers' `1 / base^(2i/d)`, in f32 like `torch.arange(...).float()`.
fn default_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let exponent = f64::from((2 * i) as f32 / head_dim as f32);
            1.0 / theta.powf(exponent)
        })
        .collect()
}

fn scaled_inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> (Vec<f64>, f64) {
    let base = default_inv_freq(head_dim, theta);
    match *scaling {
        RopeScaling::None | RopeScaling::Dynamic { .. } => (base, 1.0),
        RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
        RopeScaling::Divisors(ref d) => (base.iter().zip(d).map(|(f, d)| f / d).collect(), 1.0),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max,
        } => {
            let old = original_max as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let freqs = base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (freqs, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        } => {
            let dim = head_dim as f64;
            let correction_dim = |rotations: f64| {
                dim * (original_max as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            let freqs = base
                .iter()
                .enumerate()
                .map(|(i, &extrapolation)| {
                    let interpolation = extrapolation / factor;
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation_weight = 1.0 - ramp;
                    interpolation * (1.0 - extrapolation_weight)
                        + extrapolation * extrapolation_weight
                })
                .collect();
            (freqs, attention_factor)
        }
    }
}

fn to_tensor(freqs: &[f64], device: &Device) -> Result<Tensor> {
    let f: Vec<f32> = freqs.iter().map(|&v| v as f32).collect();
    Ok(Tensor::from_vec(f, (1, freqs.len()), device)?)
}

impl RotaryEmbedding {
    /// Frequencies for `head_dim` (even) with base `theta`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling, device: &Device) -> Result<Self> {
        let (freqs, attention_factor) = scaled_inv_freq(head_dim, theta, &scaling);
        Ok(Self {
            head_dim,
            theta,
            inv_freq: to_tensor(&freqs, device)?,
            scaling,
            attention_factor,
        })
    }

    /// cos/sin for `positions` (row-major `[b, s]`), each `[b, s, head_dim/2]`
    /// in `dtype`, computed in f32 as transformers does.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn tables(
        &self,
        positions: &[u32],
        (b, s): (usize, usize),
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let device = self.inv_freq.device();
        let inv_freq = match self.scaling {
            // transformers grows the base once the longest position exceeds
            // the trained context (`dynamic_rope_update`).
            RopeScaling::Dynamic {
                factor,
                original_max,
            } => {
                let seq_len = positions.iter().max().map_or(0, |&p| p as usize + 1);
                if seq_len > original_max {
                    let d = self.head_dim as f64;
                    let ratio = factor * seq_len as f64 / original_max as f64 - (factor - 1.0);
                    let theta = self.theta * ratio.powf(d / (d - 2.0));
                    to_tensor(&default_inv_freq(self.head_dim, theta), device)?
                } else {
                    self.inv_freq.clone()
                }
            }
            _ => self.inv_freq.clone(),
        };
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (b * s, 1), device)?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        let half = self.head_dim / 2;
        let (mut cos, mut sin) = (freqs.cos()?, freqs.sin()?);
        if self.attention_factor != 1.0 {
            cos = (cos * self.attention_factor)?;
            sin = (sin * self.attention_factor)?;
        }
        Ok((
            cos.reshape((b, s, half))?.to_dtype(dtype)?,
            sin.reshape((b, s, half))?.to_dtype(dtype)?,
        ))
    }

    /// Rotates `x` (`[b, heads, s, head_dim]`) by the tables from
    /// [`Self::tables`] with Candle's fused kernel. When `x` tracks
    /// gradients the rotation is one graph node whose backward is the
    /// inverse rotation (the same kernel with `-sin`): the fused kernel has
    /// no backward, and the composed form kept half a dozen activation-sized
    /// intermediates per layer.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        if !needs_grad(&[x]) {
            return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
        }
        let y = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
        let (cos, neg_sin) = (cos.detach(), sin.detach().neg()?);
        let backward = move |_: &[&Tensor], _: &Tensor, dy: &Tensor| {
            Ok(vec![Some(candle_nn::rotary_emb::rope(
                &dy.contiguous()?,
                &cos,
                &neg_sin,
            )?)])
        };
        with_backward(&[x], &y, Arc::new(backward))
    }
}
