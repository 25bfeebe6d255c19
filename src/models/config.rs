//! [`DecoderConfig`]: the hyper-parameters of a Llama-family decoder, with
//! everything that differs between families (q/k/v bias, tied embeddings,
//! RoPE scaling, sliding windows, per-head q/k norms, explicit head width)
//! resolved from `config.json` or GGUF metadata.

use serde::Deserialize;

use crate::layers::RopeScaling;

/// A decoder's hyper-parameters, resolved: no field depends on the family
/// any more (family defaults were applied when it was read).
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// `model_type` of `config.json` (or the GGUF architecture).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Per-head width (Qwen3 and Mistral set it explicitly).
    pub head_dim: usize,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// The output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2).
    pub attention_bias: bool,
    /// MLP projections have biases.
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Per layer: the sliding window in key positions, or `None` for full
    /// attention.
    pub sliding_windows: Vec<Option<usize>>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s) (may be empty).
    pub eos_token_ids: Vec<u32>,
}

/// The most decoder layers a config may ask for. The largest released
/// decoders have ~130; a config's layer count sizes per-layer tables before
/// any weight is read, so an absurd one must fail here rather than as an
/// allocation the machine cannot make.
pub(crate) const MAX_LAYERS: usize = 4096;

/// Upper bounds of the other sizes, for the same reason (they size the
/// RoPE tables, KV cache and weight checks): far above any real model.
const MAX_WIDTH: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;
const MAX_HEADS: usize = 1 << 12;

impl DecoderConfig {
    /// The most positions the model handles: `max_position_embeddings`, or
    /// `factor` times that with dynamic-NTK RoPE, which exists to stretch
    /// the context (transformers sets no limit; this one keeps the scaled
    /// frequencies within the range the rule was made for).
    #[must_use]
    pub fn context_length(&self) -> usize {
        match self.rope_scaling {
            RopeScaling::Dynamic { factor, .. } if factor > 1.0 => {
                (self.max_position_embeddings as f64 * factor) as usize
            }
            _ => self.max_position_embeddings,
        }
    }

    /// Checks the values are consistent and supported.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_WIDTH),
        ] {
            if v > max {
                return Err(format!("{name} {v} is larger than supported ({max})"));
            }
        }
        // Beyond this the position tables and masks stop being meaningful
        // (and `u32` positions overflow).
        if self.max_position_embeddings > 1 << 24 {
            return Err(format!(
                "max_position_embeddings {} is larger than supported (16M)",
                self.max_position_embeddings
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.sliding_windows.len() != self.num_hidden_layers {
            return Err(format!(
                "{} layer types for {} layers",
                self.sliding_windows.len(),
                self.num_hidden_layers
            ));
        }
        if self.sliding_windows.contains(&Some(0)) {
            return Err("sliding_window must be positive".into());
        }
        // The decoder builds one window mask per forward for all windowed
        // layers (every supported family has a single window size).
        let mut windows = self.sliding_windows.iter().flatten();
        if let Some(first) = windows.next() {
            if windows.any(|w| w != first) {
                return Err("layers with different sliding windows are not supported".into());
            }
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return Err("rms_norm_eps and rope_theta must be positive".into());
        }
        let factor_ok = match &self.rope_scaling {
            RopeScaling::None => true,
            RopeScaling::Divisors(d) => {
                d.len() == self.head_dim / 2 && d.iter().all(|&v| positive(v))
            }
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor, .. } => {
                positive(*factor)
            }
            RopeScaling::Yarn {
                factor,
                beta_fast,
                beta_slow,
                attention_factor,
                original_max,
                ..
            } => {
                positive(*factor)
                    && positive(*beta_fast)
                    && positive(*beta_slow)
                    && positive(*attention_factor)
                    && *original_max > 0
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max,
            } => {
                positive(*factor)
                    && positive(*low_freq_factor)
                    && high_freq_factor > low_freq_factor
                    && *original_max > 0
            }
        };
        if !factor_ok {
            return Err(format!(
                "RoPE scaling parameters are invalid: {:?}",
                self.rope_scaling
            ));
        }
        Ok(())
    }
}

/// `config.json` as written by transformers, before family defaults.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers ≥ 5 puts `rope_theta` and the scaling here.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Qwen2/Qwen3: windows only when this is true.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: layers from this index on use the window.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Newer configs spell the per-layer attention out.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_act() -> String {
    "silu".into()
}

/// Ids from an `eos_token_id` that is a number or a list.
pub(crate) fn eos_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// Parses transformers' `rope_scaling` / `rope_parameters` object.
///
/// # Errors
/// An unknown RoPE type or a missing parameter.
pub(crate) fn rope_scaling_from_json(
    v: &serde_json::Value,
    max_position_embeddings: usize,
) -> std::result::Result<RopeScaling, String> {
    if v.is_null() {
        return Ok(RopeScaling::None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    let float = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    let need = |k: &str| float(k).ok_or_else(|| format!("rope_scaling `{kind}` needs `{k}`"));
    let original_max = v
        .get("original_max_position_embeddings")
        .and_then(serde_json::Value::as_u64)
        .map_or(max_position_embeddings, |n| n as usize);
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: need("factor")?,
            // transformers measures "beyond the trained context" against
            // max_position_embeddings itself.
            original_max: max_position_embeddings,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max: v
                .get("original_max_position_embeddings")
                .and_then(serde_json::Value::as_u64)
                .ok_or("rope_scaling `llama3` needs `original_max_position_embeddings`")?
                as usize,
        },
        "yarn" => {
            // transformers 5 reads `factor` as given (only a missing one
            // falls back to the ratio of the two context lengths).
            let factor = match float("factor") {
                Some(f) => f,
                None => max_position_embeddings as f64 / original_max.max(1) as f64,
            };
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (
                float("attention_factor"),
                float("mscale"),
                float("mscale_all_dim"),
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale(factor, m) / mscale(factor, all)
                }
                _ => mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_max,
                beta_fast: float("beta_fast").unwrap_or(32.0),
                beta_slow: float("beta_slow").unwrap_or(1.0),
                attention_factor,
                truncate: v
                    .get("truncate")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(true),
            }
        }
        other => {
            return Err(format!(
                "RoPE scaling `{other}` is not supported (default, linear, dynamic, yarn, llama3)"
            ))
        }
    })
}
