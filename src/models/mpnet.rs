//! The MPNet encoder (all-mpnet-base-v2), which Candle does not have.
//!
//! Differences from BERT, following transformers' `modeling_mpnet.py`:
//! - no token type embeddings;
//! - RoBERTa-style positions: padding id 1, real tokens numbered from 2
//!   (`position = cumsum(ids != 1) * (ids != 1) + 1`);
//! - a T5-style relative attention bias: `relative_position - bucket` tables
//!   (32 buckets, max distance 128), computed once from the first layer's
//!   shared table and added to every layer's attention scores.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::bert::weight_prefix;
use super::encoder::{
    check_config, check_inputs, check_vocab, padding_bias, parse_activation, Batch, EncoderStack,
    LayerDims, LayerNames, StackSizes,
};
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::layers::PackedSeqs;

/// MPNet's padding id, hard-coded in transformers' `MPNetEmbeddings` (it
/// also anchors the position ids).
pub const PADDING_IDX: u32 = 1;

/// transformers computes the buckets with these defaults whatever the config says.
const NUM_BUCKETS: usize = 32;
const MAX_DISTANCE: usize = 128;

/// Hyper-parameters of an MPNet encoder, as in `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MpnetConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Size of the position table (positions start at 2, so 514 holds 512 tokens).
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Rows of the relative attention bias table.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_buckets() -> usize {
    NUM_BUCKETS
}

impl MpnetConfig {
    /// Reads and validates `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::InvalidConfig`].
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::io::read_config(path, Self::validate)
    }

    /// Checks the values are consistent and supported.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> std::result::Result<(), String> {
        check_config(
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
            ],
            (self.hidden_size, self.num_attention_heads),
            &self.hidden_act,
        )?;
        if self.max_position_embeddings <= PADDING_IDX as usize + 1 {
            return Err(format!(
                "max_position_embeddings {} leaves no room for tokens",
                self.max_position_embeddings
            ));
        }
        if self.relative_attention_num_buckets < NUM_BUCKETS {
            return Err(format!(
                "relative_attention_num_buckets {} is below the {NUM_BUCKETS} buckets MPNet uses",
                self.relative_attention_num_buckets
            ));
        }
        Ok(())
    }

    /// The longest sequence the position table holds.
    #[must_use]
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - PADDING_IDX as usize - 1
    }
}

/// The bucket of a relative position `key - query`, as transformers'
/// `MPNetEncoder.relative_position_bucket`: half the buckets for each
/// direction, exact below `num_buckets / 4`, logarithmic up to
/// `max_distance`. The logarithm is taken in f32 like PyTorch does.
#[must_use]
pub fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let half = (num_buckets / 2) as i64;
    let n = -relative_position;
    let mut bucket = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln()
            / (max_distance as f32 / max_exact as f32).ln()
            * (half - max_exact) as f32;
        // `as i64` truncates towards zero, like `.to(torch.long)`.
        bucket += (max_exact + ratio as i64).min(half - 1);
    }
    bucket as usize
}

const LAYER_NAMES: LayerNames = LayerNames {
    q: "attention.attn.q",
    k: "attention.attn.k",
    v: "attention.attn.v",
    o: "attention.attn.o",
    attn_norm: "attention.LayerNorm",
    up: "intermediate.dense",
    down: "output.dense",
    out_norm: "output.LayerNorm",
};

/// Position ids of each row, flat, like transformers'
/// `create_position_ids_from_input_ids`: padding tokens get
/// [`PADDING_IDX`], the others count up from `PADDING_IDX + 1`.
fn positions(rows: &[&[u32]]) -> Vec<u32> {
    let mut positions = Vec::with_capacity(rows.iter().map(|r| r.len()).sum());
    for row in rows {
        let mut count = 0;
        for &id in *row {
            if id == PADDING_IDX {
                positions.push(PADDING_IDX);
            } else {
                count += 1;
                positions.push(count + PADDING_IDX);
            }
        }
    }
    positions
}

/// An MPNet encoder returning the last hidden states.
#[derive(Debug, Clone)]
pub struct MpnetModel {
    stack: EncoderStack,
    /// `[num_buckets, heads]`, f32.
    relative_bias: Tensor,
    config: MpnetConfig,
}

impl MpnetModel {
    /// Builds the encoder from `weights` (with or without an `mpnet.` prefix;
    /// a pooler or MLM head, if present, is ignored).
    ///
    /// # Errors
    /// Invalid config, missing tensors or wrong shapes.
    pub fn new(config: &MpnetConfig, w: &Weights) -> Result<Self> {
        config
            .validate()
            .map_err(|m| Error::config("MPNet config", m))?;
        let p = weight_prefix(w, &["", "mpnet.", "model."])?;
        let h = config.hidden_size;
        let dims = LayerDims {
            hidden: h,
            heads: config.num_attention_heads,
            intermediate: config.intermediate_size,
            eps: config.layer_norm_eps,
            act: parse_activation(&config.hidden_act)
                .map_err(|m| Error::config("MPNet config", m))?,
        };
        let sizes = StackSizes {
            vocab: config.vocab_size,
            max_positions: config.max_position_embeddings,
            layers: config.num_hidden_layers,
        };
        Ok(Self {
            stack: EncoderStack::load(w, p, sizes, &LAYER_NAMES, dims)?,
            relative_bias: w
                .get(
                    &format!("{p}encoder.relative_attention_bias.weight"),
                    &[
                        config.relative_attention_num_buckets,
                        config.num_attention_heads,
                    ],
                )?
                .to_dtype(DType::F32)?,
            config: config.clone(),
        })
    }

    /// The layers and tables BERT and MPNet share.
    pub(crate) fn stack(&self) -> &EncoderStack {
        &self.stack
    }

    /// The config.
    #[must_use]
    pub fn config(&self) -> &MpnetConfig {
        &self.config
    }

    /// The device the weights live on.
    #[must_use]
    pub fn device(&self) -> &Device {
        self.stack.word.device()
    }

    /// Last hidden states `[b, s, hidden]` (model dtype) for `ids` (`[b, s]`)
    /// under the padding `mask` rows (1 = token, 0 = padding).
    ///
    /// # Errors
    /// Bad shapes, a sequence longer than the position table, or an id
    /// outside the vocabulary.
    pub(crate) fn forward_rows(&self, ids: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
        let (b, s) = check_inputs(ids, mask)?;
        if s > self.config.max_tokens() {
            return Err(Error::ContextLengthExceeded {
                requested: s,
                limit: self.config.max_tokens(),
            });
        }
        let ids = ids.to_dtype(DType::U32)?;
        let id_rows = ids.to_vec2::<u32>()?;
        // On the host rows already read for the positions: one pass.
        let max = id_rows.iter().flatten().copied().max().unwrap_or(0);
        check_vocab(max, self.config.vocab_size)?;
        let ids = ids.to_device(self.device())?;
        let rows: Vec<&[u32]> = id_rows.iter().map(Vec::as_slice).collect();
        let positions = Tensor::from_vec(positions(&rows), b * s, self.device())?;
        let bias = self.position_bias(s)?;
        let bias = match padding_bias(mask, self.device())? {
            Some(mask) => bias.broadcast_add(&mask)?,
            None => bias,
        };
        self.stack.run(
            &ids.flatten_all()?,
            &positions,
            (b, s),
            Batch::Padded(Some(&bias)),
        )
    }

    /// Last hidden states `[1, tokens, hidden]` of `seqs` (token ids, each
    /// non-empty) packed end to end with no padding, and their layout.
    ///
    /// # Errors
    /// An empty or too long sequence, or an id outside the vocabulary.
    pub(crate) fn forward_packed(&self, seqs: &[&[u32]]) -> Result<(Tensor, PackedSeqs)> {
        let (ids, packed) = self.stack.pack(seqs, self.config.max_tokens())?;
        let positions = positions(seqs);
        let tokens = positions.len();
        let positions = Tensor::from_vec(positions, tokens, self.device())?;
        // One bias for every sequence: it depends on relative positions only.
        let bias = self.position_bias(packed.max_len())?;
        let batch = Batch::Packed(&packed, Some(&bias));
        let x = self.stack.run(&ids, &positions, (1, tokens), batch)?;
        Ok((x, packed))
    }

    /// The relative attention bias `[1, heads, s, s]` (f32).
    fn position_bias(&self, s: usize) -> Result<Tensor> {
        let mut buckets = Vec::with_capacity(s * s);
        for q in 0..s as i64 {
            for k in 0..s as i64 {
                buckets.push(relative_position_bucket(k - q, NUM_BUCKETS, MAX_DISTANCE) as u32);
            }
        }
        let buckets = Tensor::from_vec(buckets, s * s, self.device())?;
        let heads = self.config.num_attention_heads;
        Ok(self
            .relative_bias
            .index_select(&buckets, 0)?
            .reshape((s, s, heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }
}
