//! The post-norm transformer encoder layer BERT and MPNet share: self
//! attention with an additive bias (padding mask, and MPNet's relative
//! position bias), residual + LayerNorm, a GELU MLP, residual + LayerNorm.
//! Only the tensor names differ between the two, see [`LayerNames`].

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::io::Weights;
use crate::layers::{attention, attention_mask, LayerNorm, Linear, Mask, MaskKind};

/// The activation of the MLP, from `hidden_act` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// Exact GELU (erf), transformers' `gelu`.
    GeluErf,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(format!("unsupported hidden_act `{other}`")),
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// Tensor names of one layer, relative to the layer's prefix.
pub(crate) struct LayerNames {
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub o: &'static str,
    pub attn_norm: &'static str,
    pub up: &'static str,
    pub down: &'static str,
    pub out_norm: &'static str,
}

/// Sizes shared by every layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerDims {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub eps: f64,
    pub act: Activation,
}

/// One encoder layer.
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    act: Activation,
}

impl EncoderLayer {
    pub(crate) fn load(w: &Weights, prefix: &str, n: &LayerNames, d: LayerDims) -> Result<Self> {
        if d.heads == 0 || d.hidden % d.heads != 0 {
            return Err(Error::config(
                "encoder config",
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    d.hidden, d.heads
                ),
            ));
        }
        let lin = |name: &str, i, o| Linear::load(w, &format!("{prefix}.{name}"), i, o, true);
        Ok(Self {
            q: lin(n.q, d.hidden, d.hidden)?,
            k: lin(n.k, d.hidden, d.hidden)?,
            v: lin(n.v, d.hidden, d.hidden)?,
            o: lin(n.o, d.hidden, d.hidden)?,
            attn_norm: LayerNorm::load(w, &format!("{prefix}.{}", n.attn_norm), d.hidden, d.eps)?,
            up: lin(n.up, d.hidden, d.intermediate)?,
            down: lin(n.down, d.intermediate, d.hidden)?,
            out_norm: LayerNorm::load(w, &format!("{prefix}.{}", n.out_norm), d.hidden, d.eps)?,
            heads: d.heads,
            head_dim: d.hidden / d.heads,
            act: d.act,
        })
    }

    /// `x`: `[b, s, hidden]`; `bias`: additive f32 attention bias
    /// broadcastable to `[b, heads, s, s]`.
    pub(crate) fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, s, hidden) = x.dims3()?;
        let split = |t: Tensor| {
            t.reshape((b, s, self.heads, self.head_dim))?
                .transpose(1, 2)
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let ctx = attention(&q, &k, &v, &Mask::bidirectional(bias), scale)?
            .transpose(1, 2)?
            .reshape((b, s, hidden))?;
        let attn = self.attn_norm.forward(&(self.o.forward(&ctx)? + x)?)?;
        let mlp = self
            .down
            .forward(&self.act.apply(&self.up.forward(&attn)?)?)?;
        self.out_norm.forward(&(mlp + attn)?)
    }
}

/// Checks `ids` is `[b, s]` and `mask` has the same shape; returns `(b, s)`.
pub(crate) fn check_inputs(ids: &Tensor, mask: &[Vec<u32>]) -> Result<(usize, usize)> {
    let (b, s) = ids.dims2().map_err(|_| {
        Error::InvalidInput(format!(
            "input ids must be [batch, seq], got {:?}",
            ids.dims()
        ))
    })?;
    if mask.len() != b || mask.iter().any(|r| r.len() != s) {
        return Err(Error::InvalidInput(format!(
            "attention mask must be [{b}, {s}], got [{}, {}]",
            mask.len(),
            mask.first().map_or(0, Vec::len)
        )));
    }
    if s == 0 {
        return Err(Error::InvalidInput("empty token sequence".into()));
    }
    Ok((b, s))
}

/// The additive attention bias `[b, 1, s, s]` hiding padding keys, `None`
/// when nothing is padded (bidirectional: no causal part).
pub(crate) fn padding_bias(
    mask: &[Vec<u32>],
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let b = mask.len();
    let s = mask.first().map_or(0, Vec::len);
    attention_mask(b, s, 0, Some(mask), MaskKind::Bidirectional, device)
}

/// What every encoder config must satisfy: each of `sizes` positive, the
/// width a multiple of the head count, a supported activation.
pub(crate) fn check_config(
    sizes: &[(&str, usize)],
    (hidden, heads): (usize, usize),
    hidden_act: &str,
) -> std::result::Result<(), String> {
    if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
        return Err(format!("{name} must be > 0"));
    }
    if heads == 0 || hidden % heads != 0 {
        return Err(format!(
            "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        ));
    }
    Activation::parse(hidden_act).map(|_| ())
}
