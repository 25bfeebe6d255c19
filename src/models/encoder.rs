//! The post-norm transformer encoder layer BERT and MPNet share: self
//! attention with an additive bias (padding mask, and MPNet's relative
//! position bias), residual + LayerNorm, a GELU MLP, residual + LayerNorm.
//! Only the tensor names differ between the two, see [`LayerNames`].

use candle_core::{Tensor, D};

use crate::backend::kernels::{
    add_layer_norm, embed_sum, flash_forward_available, split_heads, Activation, Heads,
};
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::layers::{attention, attention_packed, LayerNorm, Linear, Mask, PackedSeqs};

/// How a batch is laid out for the encoder layers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Batch<'a> {
    /// `[b, s, hidden]`, rows padded to one length; the additive f32
    /// attention bias (padding mask, position bias) broadcasts to
    /// `[b, heads, s, s]`.
    Padded(Option<&'a Tensor>),
    /// `[1, tokens, hidden]`, sequences packed end to end (no padding);
    /// the bias (position bias only) broadcasts to `[1, heads, n, n]` and is
    /// read within each sequence.
    Packed(&'a PackedSeqs, Option<&'a Tensor>),
}

/// The MLP's activation from `hidden_act` in `config.json`.
pub(crate) fn parse_activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "gelu" => Ok(Activation::GeluErf),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "relu" => Ok(Activation::Relu),
        "silu" | "swish" => Ok(Activation::Silu),
        other => Err(format!("unsupported hidden_act `{other}`")),
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

/// One encoder layer, laid out for its fused ops (as text-embeddings-
/// inference loads BERT): q, k and v as one projection (weights stacked at
/// load); each residual + LayerNorm with the projection bias before it as
/// one [`add_layer_norm`]; the MLP's bias and activation fused with its
/// first product ([`Linear::forward_act`]). Where the fused attention
/// kernel runs (CUDA, bf16/f16), the q/k/v product carries its bias in the
/// GEMM's epilogue and the kernel reads q, k and v as views of it; elsewhere
/// [`split_heads`] adds the bias and copies them into heads. On an H200
/// (MiniLM, b512 × 128, bf16) that is 7 kernels a layer instead of about
/// 25 (BENCHMARKS.md).
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    /// The stacked q/k/v projection (no bias); three projections if a
    /// weight is quantized (their outputs are concatenated instead).
    qkv: Vec<Linear>,
    /// `[3 · hidden]`: the q, k and v biases.
    qkv_bias: Tensor,
    /// The stacked projection with its bias, when it is one dense product
    /// (the views path).
    qkv_biased: Option<Linear>,
    o: Linear,
    /// `[3, hidden]`: o's bias, the attention LayerNorm's weight and bias.
    attn_norm: Tensor,
    /// With its bias (applied with the activation).
    up: Linear,
    down: Linear,
    /// `[3, hidden]`: down's bias, the output LayerNorm's weight and bias.
    out_norm: Tensor,
    heads: usize,
    head_dim: usize,
    eps: f32,
    act: Activation,
}

impl EncoderLayer {
    pub(crate) fn load(w: &Weights, prefix: &str, n: &LayerNames, d: LayerDims) -> Result<Self> {
        if d.heads == 0 || !d.hidden.is_multiple_of(d.heads) {
            return Err(Error::config(
                "encoder config",
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    d.hidden, d.heads
                ),
            ));
        }
        let lin = |name: &str, i, o| Linear::load(w, &format!("{prefix}.{name}"), i, o, true);
        let (mut q, mut k, mut v) = (
            lin(n.q, d.hidden, d.hidden)?,
            lin(n.k, d.hidden, d.hidden)?,
            lin(n.v, d.hidden, d.hidden)?,
        );
        let (dtype, dev) = (w.dtype(), w.device());
        let qkv_bias = Linear::stacked_bias(&[&q, &k, &v], dtype, dev)?;
        let (qkv, qkv_biased) = match Linear::stack_shared(&mut [&mut q, &mut k, &mut v])? {
            Some(fused) => {
                let biased = fused.clone().with_bias(qkv_bias.clone());
                (vec![fused], Some(biased))
            }
            None => (vec![q, k, v], None),
        };
        let o = lin(n.o, d.hidden, d.hidden)?;
        let up = lin(n.up, d.hidden, d.intermediate)?;
        let down = lin(n.down, d.intermediate, d.hidden)?;
        let norm = |name: &str, proj: &Linear| -> Result<Tensor> {
            let ln = LayerNorm::load(w, &format!("{prefix}.{name}"), d.hidden, d.eps)?;
            let lin_bias = Linear::stacked_bias(&[proj], dtype, dev)?.unsqueeze(0)?;
            Ok(Tensor::cat(&[&lin_bias, ln.params()], 0)?)
        };
        Ok(Self {
            qkv,
            qkv_bias,
            attn_norm: norm(n.attn_norm, &o)?,
            out_norm: norm(n.out_norm, &down)?,
            qkv_biased,
            o: o.without_bias(),
            up,
            down: down.without_bias(),
            heads: d.heads,
            head_dim: d.hidden / d.heads,
            eps: d.eps as f32,
            act: d.act,
        })
    }

    /// `x`: `[b, s, hidden]` laid out as `batch` says.
    pub(crate) fn forward(&self, x: &Tensor, batch: Batch<'_>) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.qkv(x)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let ctx = match batch {
            Batch::Padded(bias) => attention(&q, &k, &v, &Mask::bidirectional(bias), scale)?,
            Batch::Packed(seqs, bias) => attention_packed(&q, &k, &v, seqs, bias, scale)?,
        };
        let attn = add_layer_norm(&self.o.forward(&ctx)?, x, &self.attn_norm, self.eps)?;
        let up = self.up.forward_act(&attn, self.act)?;
        add_layer_norm(&self.down.forward(&up)?, &attn, &self.out_norm, self.eps)
    }

    /// q, k, v `[b, heads, s, d]` (biases added) from `x` `[b, s, hidden]`:
    /// views of one product where the fused attention kernel reads them in
    /// place, else split into heads by [`split_heads`].
    fn qkv(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        if let Some(fused) = &self.qkv_biased {
            if flash_forward_available(x.device(), x.dtype(), self.head_dim) {
                let qkv = fused.forward_act(x, Activation::None)?.reshape((
                    b,
                    s,
                    3,
                    self.heads,
                    self.head_dim,
                ))?;
                let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
                return Ok((part(0)?, part(1)?, part(2)?));
            }
        }
        let qkv = match self.qkv.as_slice() {
            [fused] => fused.forward(x)?,
            parts => {
                let outs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&outs, D::Minus1)?
            }
        };
        let heads = Heads {
            q: self.heads,
            kv: self.heads,
            dim: self.head_dim,
        };
        split_heads(&qkv, &self.qkv_bias, heads)
    }
}

/// What BERT and MPNet share after their position ids: the word and
/// position tables (summed by [`embed_sum`]), the embedding LayerNorm and
/// the layers.
#[derive(Debug, Clone)]
pub(crate) struct EncoderStack {
    pub word: Tensor,
    pub position: Tensor,
    pub norm: LayerNorm,
    pub layers: Vec<EncoderLayer>,
    pub heads: usize,
}

/// What [`EncoderStack::load`] reads beyond the layer sizes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StackSizes {
    pub vocab: usize,
    pub max_positions: usize,
    pub layers: usize,
}

impl EncoderStack {
    /// The tables, embedding LayerNorm and layers under `prefix` in the
    /// names BERT and MPNet share (`embeddings.word_embeddings`,
    /// `embeddings.position_embeddings`, `embeddings.LayerNorm`,
    /// `encoder.layer.{i}` with `names` inside).
    ///
    /// # Errors
    /// Missing tensors or wrong shapes.
    pub(crate) fn load(
        w: &Weights,
        prefix: &str,
        sizes: StackSizes,
        names: &LayerNames,
        dims: LayerDims,
    ) -> Result<Self> {
        let p = prefix;
        let h = dims.hidden;
        let layers = (0..sizes.layers)
            .map(|i| EncoderLayer::load(w, &format!("{p}encoder.layer.{i}"), names, dims))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: w.get(
                &format!("{p}embeddings.word_embeddings.weight"),
                &[sizes.vocab, h],
            )?,
            position: w.get(
                &format!("{p}embeddings.position_embeddings.weight"),
                &[sizes.max_positions, h],
            )?,
            norm: LayerNorm::load(w, &format!("{p}embeddings.LayerNorm"), h, dims.eps)?,
            layers,
            heads: dims.heads,
        })
    }

    /// Last hidden states `[b, s, hidden]`: `ids` and `positions` flat on
    /// the device, `(b, s)` the layout `batch` describes.
    pub(crate) fn run(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        (b, s): (usize, usize),
        batch: Batch<'_>,
    ) -> Result<Tensor> {
        let h = self.word.dim(1)?;
        let x = embed_sum(&self.word, ids, &self.position, positions)?.reshape((b, s, h))?;
        let mut x = self.norm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, batch)?;
        }
        Ok(x)
    }

    /// Width of one attention head.
    fn head_dim(&self) -> usize {
        self.word.dims().get(1).copied().unwrap_or(0) / self.heads.max(1)
    }

    /// Whether packed batches take the packed attention kernel here (the
    /// model's device and dtype, its head width), as [`Self::pack`]'s
    /// [`PackedSeqs`] decides.
    pub(crate) fn packed_kernel(&self) -> bool {
        flash_forward_available(self.word.device(), self.word.dtype(), self.head_dim())
    }

    /// `seqs` (token ids, each non-empty, at most `limit` long) packed end
    /// to end: the ids on the device and their [`PackedSeqs`].
    ///
    /// # Errors
    /// An empty or too long sequence, or an id outside the vocabulary.
    pub(crate) fn pack(&self, seqs: &[&[u32]], limit: usize) -> Result<(Tensor, PackedSeqs)> {
        let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        if longest > limit {
            return Err(Error::ContextLengthExceeded {
                requested: longest,
                limit,
            });
        }
        let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let packed = PackedSeqs::new(
            &lengths,
            self.word.device(),
            self.word.dtype(),
            self.head_dim(),
        )?;
        let ids = seqs.concat();
        check_vocab(ids.iter().copied().max().unwrap_or(0), self.word.dim(0)?)?;
        let tokens = ids.len();
        Ok((Tensor::from_vec(ids, tokens, self.word.device())?, packed))
    }
}

/// Fails with a clear error (instead of an index panic or garbage) when
/// `max` (a batch's largest token id) is outside the embedding table.
pub(crate) fn check_vocab(max: u32, vocab: usize) -> Result<()> {
    if max as usize >= vocab {
        return Err(Error::InvalidInput(format!(
            "token id {max} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
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

/// The additive attention bias `[b, 1, 1, s]` hiding padding keys (it
/// broadcasts over heads and queries: no `s × s` mask made on the host),
/// `None` when nothing is padded (bidirectional: no causal part).
pub(crate) fn padding_bias(
    mask: &[Vec<u32>],
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    crate::layers::padding_bias(Some(mask), device)
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
    parse_activation(hidden_act).map(|_| ())
}
