//! sentence-transformers' `Pooling` and `Normalize` modules: token
//! embeddings `[b, s, h]` and the attention mask to one vector per text.
//!
//! `1_Pooling/config.json` comes in two formats, both read here: the legacy
//! booleans (`pooling_mode_mean_tokens: true`, ...) and sentence-transformers
//! ≥ 6's `pooling_mode: "mean"` (or a list). Several modes are concatenated
//! in the order given (legacy: cls, max, mean, mean_sqrt_len, weightedmean,
//! lasttoken), as sentence-transformers does.

use std::path::Path;

use candle_core::{DType, Tensor, D};
use serde::Deserialize;

use crate::error::{Error, Result};

/// One pooling strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token (`[CLS]` / `<s>`).
    Cls,
    /// Mean of the tokens (padding excluded).
    Mean,
    /// Element-wise max of the tokens (padding excluded).
    Max,
    /// Sum of the tokens divided by √(number of tokens).
    MeanSqrtLen,
    /// Mean weighted by position (1, 2, 3, ...).
    WeightedMean,
    /// The last real token.
    LastToken,
}

impl PoolingMode {
    /// Parses sentence-transformers' name for the mode.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] on an unknown name.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "cls" => Self::Cls,
            "mean" => Self::Mean,
            "max" => Self::Max,
            "mean_sqrt_len_tokens" => Self::MeanSqrtLen,
            "weightedmean" => Self::WeightedMean,
            "lasttoken" => Self::LastToken,
            other => {
                return Err(Error::InvalidInput(format!(
                    "unknown pooling mode `{other}` (expected cls, mean, max, \
                     mean_sqrt_len_tokens, weightedmean or lasttoken)"
                )))
            }
        })
    }
}

/// The pooling of a sentence-transformers model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pooling {
    /// Modes, concatenated in this order.
    pub modes: Vec<PoolingMode>,
    /// Whether prompt (prefix) tokens take part in the pooling.
    pub include_prompt: bool,
}

impl Default for Pooling {
    /// Mean pooling, what sentence-transformers uses for a plain transformers checkpoint.
    fn default() -> Self {
        Self {
            modes: vec![PoolingMode::Mean],
            include_prompt: true,
        }
    }
}

#[derive(Deserialize)]
struct RawPooling {
    #[serde(default)]
    pooling_mode: Option<serde_json::Value>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default = "yes")]
    include_prompt: bool,
}

fn yes() -> bool {
    true
}

impl Pooling {
    /// Reads a `1_Pooling/config.json`.
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::InvalidConfig`] when no mode is set or a
    /// mode is unknown.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| Error::InvalidConfig {
            origin: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Parses the JSON of a pooling config.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when no mode is set or a mode is unknown.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawPooling =
            serde_json::from_str(text).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let modes = match &raw.pooling_mode {
            Some(serde_json::Value::String(m)) => vec![PoolingMode::parse(m)?],
            Some(serde_json::Value::Array(ms)) => ms
                .iter()
                .map(|m| {
                    m.as_str()
                        .ok_or_else(|| Error::InvalidInput(format!("bad pooling mode {m}")))
                        .and_then(PoolingMode::parse)
                })
                .collect::<Result<Vec<_>>>()?,
            Some(other) => return Err(Error::InvalidInput(format!("bad pooling_mode {other}"))),
            None => [
                (raw.pooling_mode_cls_token, PoolingMode::Cls),
                (raw.pooling_mode_max_tokens, PoolingMode::Max),
                (raw.pooling_mode_mean_tokens, PoolingMode::Mean),
                (
                    raw.pooling_mode_mean_sqrt_len_tokens,
                    PoolingMode::MeanSqrtLen,
                ),
                (
                    raw.pooling_mode_weightedmean_tokens,
                    PoolingMode::WeightedMean,
                ),
                (raw.pooling_mode_lasttoken, PoolingMode::LastToken),
            ]
            .into_iter()
            .filter_map(|(on, m)| on.then_some(m))
            .collect(),
        };
        if modes.is_empty() {
            return Err(Error::InvalidInput("no pooling mode is enabled".into()));
        }
        Ok(Self {
            modes,
            include_prompt: raw.include_prompt,
        })
    }

    /// Pools `tokens` (`[b, s, h]`, any float dtype; computed in f32) with
    /// `mask` (`[b, s]`, 1 = token; right padding) into `[b, h × modes]` f32.
    ///
    /// # Errors
    /// Tensor errors, or a mask of the wrong shape.
    pub fn pool(&self, tokens: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, s, h) = tokens.dims3()?;
        if mask.len() != b || mask.iter().any(|r| r.len() != s) {
            return Err(Error::InvalidInput(format!(
                "pooling mask must be [{b}, {s}]"
            )));
        }
        let dev = tokens.device();
        // f32 copies of the tokens only for the modes that need them (CLS
        // converts the rows it gathers, mean pooling is one matmul).
        let x_f32 = std::cell::OnceCell::new();
        let x = || lazy(&x_f32, || Ok(tokens.to_dtype(DType::F32)?));
        // Nothing padded (one text, or a batch of equal lengths): the
        // masks are all ones and need no upload.
        let unpadded = mask.iter().flatten().all(|&m| m != 0);
        let m_f32 = std::cell::OnceCell::new();
        let m = || {
            lazy(&m_f32, || {
                let flat: Vec<f32> = mask.iter().flatten().map(|&v| f32::from(v != 0)).collect();
                Ok(Tensor::from_vec(flat, (b, s, 1), dev)?)
            })
        };
        let lengths: Vec<usize> = mask
            .iter()
            .map(|r| r.iter().filter(|&&v| v != 0).count())
            .collect();
        let mut outs = Vec::with_capacity(self.modes.len());
        for mode in &self.modes {
            let v = match mode {
                PoolingMode::Cls => {
                    // The first real token (position 0 with right padding).
                    let first: Vec<u32> = mask
                        .iter()
                        .map(|r| r.iter().position(|&v| v != 0).unwrap_or(0) as u32)
                        .collect();
                    gather_rows(tokens, &first)?.to_dtype(DType::F32)?
                }
                PoolingMode::LastToken => {
                    let last: Vec<u32> = mask
                        .iter()
                        .map(|r| r.iter().rposition(|&v| v != 0).unwrap_or(s - 1) as u32)
                        .collect();
                    gather_rows(&x()?.broadcast_mul(m()?)?, &last)?
                }
                PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
                    // Σ_s mask·x as one batched matmul ([b, 1, s] × [b, s, h])
                    // in the tokens' dtype, accumulated in f32 by the matmul
                    // and rounded once, as sentence-transformers sums in the
                    // model's dtype: a multiply and a sum over an f32 copy
                    // of every token took 14% of a MiniLM forward + pool at
                    // b512 × 128 in bf16 on an H200.
                    let mt = if unpadded {
                        Tensor::ones((b, 1, s), tokens.dtype(), dev)?
                    } else {
                        m()?.to_dtype(tokens.dtype())?
                            .transpose(1, 2)?
                            .contiguous()?
                    };
                    let sum = mt
                        .matmul(&tokens.contiguous()?)?
                        .squeeze(1)?
                        .to_dtype(DType::F32)?;
                    let den = |n: usize| {
                        let n = (n as f32).max(1e-9);
                        if *mode == PoolingMode::Mean {
                            n
                        } else {
                            n.sqrt()
                        }
                    };
                    if unpadded {
                        sum.affine(1.0 / f64::from(den(s)), 0.0)?
                    } else {
                        let den: Vec<f32> = lengths.iter().map(|&n| den(n)).collect();
                        sum.broadcast_div(&Tensor::from_vec(den, (b, 1), dev)?)?
                    }
                }
                PoolingMode::Max => {
                    let keep = m()?.broadcast_as((b, s, h))?.to_dtype(DType::U8)?;
                    let neg = Tensor::full(f32::NEG_INFINITY, (b, s, h), dev)?;
                    keep.where_cond(x()?, &neg)?.max(1)?
                }
                PoolingMode::WeightedMean => {
                    // Weights 1..s; with right padding the first token is at 0.
                    let w = Tensor::arange(1f32, s as f32 + 1.0, dev)?.reshape((1, s, 1))?;
                    let wm = m()?.broadcast_mul(&w)?;
                    let sum = x()?.broadcast_mul(&wm)?.sum(1)?;
                    sum.broadcast_div(&wm.sum(1)?.clamp(1e-9, f32::MAX)?)?
                }
            };
            outs.push(v);
        }
        Ok(Tensor::cat(&outs, 1)?)
    }
}

/// Rows `x[i, idx[i], :]` of `[b, s, h]` as `[b, h]`.
/// The tensor in `cell`, made by `make` the first time (a tensor only some
/// pooling modes need).
fn lazy(
    cell: &std::cell::OnceCell<Tensor>,
    make: impl FnOnce() -> Result<Tensor>,
) -> Result<&Tensor> {
    if cell.get().is_none() {
        let _ = cell.set(make()?);
    }
    cell.get()
        .ok_or_else(|| Error::InvalidInput("pooling: a lazily made tensor is missing".into()))
}

fn gather_rows(x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    let (b, s, h) = x.dims3()?;
    let flat: Vec<u32> = idx
        .iter()
        .enumerate()
        .map(|(i, &j)| i as u32 * s as u32 + j)
        .collect();
    let flat = Tensor::from_vec(flat, b, x.device())?;
    Ok(x.reshape((b * s, h))?.index_select(&flat, 0)?)
}

/// L2-normalises the rows of `x` (`[n, d]`), like `torch.nn.functional.normalize`
/// (a zero row stays zero): `x / sqrt(‖x‖² + 1e-24)`, which equals torch's
/// `x / max(‖x‖, 1e-12)` except for norms within a few orders of 1e-12.
/// One fused RMSNorm launch with weight `1/√d` (`rms(x)·√d = ‖x‖`) instead
/// of five composed ops: a single-query `encode` is launch-bound.
///
/// # Errors
/// Tensor errors.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if d == 0 {
        return Ok(x.clone());
    }
    let w = Tensor::full((1.0 / (d as f64).sqrt()) as f32, d, x.device())?.to_dtype(x.dtype())?;
    Ok(crate::backend::kernels::rms_norm(
        x,
        &w,
        (1e-24 / d as f64) as f32,
    )?)
}
