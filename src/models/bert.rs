//! The BERT encoder (all-MiniLM, E5, BGE and other BERT sentence models):
//! word + absolute position + token-type embeddings, then post-norm
//! encoder layers. Sentence models feed one segment, so token type ids are 0.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::encoder::{
    check_config, check_inputs, check_vocab, padding_bias, parse_activation, Batch, EncoderStack,
    LayerDims, LayerNames, StackSizes,
};
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::layers::PackedSeqs;

/// Hyper-parameters of a BERT encoder, as in `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
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
    /// MLP activation (`gelu` is the exact, erf-based GELU).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Size of the absolute position table.
    pub max_position_embeddings: usize,
    /// Token type (segment) vocabulary size.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Only `absolute` is supported.
    #[serde(default = "default_pos_type")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_pos_type() -> String {
    "absolute".into()
}

impl BertConfig {
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
                ("max_position_embeddings", self.max_position_embeddings),
            ],
            (self.hidden_size, self.num_attention_heads),
            &self.hidden_act,
        )?;
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            ));
        }
        Ok(())
    }
}

const LAYER_NAMES: LayerNames = LayerNames {
    q: "attention.self.query",
    k: "attention.self.key",
    v: "attention.self.value",
    o: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    up: "intermediate.dense",
    down: "output.dense",
    out_norm: "output.LayerNorm",
};

/// Finds the prefix the checkpoint stores the encoder under: none for
/// sentence-transformers exports, `bert.` for `BertFor*` heads.
pub(crate) fn weight_prefix(w: &Weights, candidates: &[&'static str]) -> Result<&'static str> {
    candidates
        .iter()
        .copied()
        .find(|p| w.contains(&format!("{p}embeddings.word_embeddings.weight")))
        .ok_or_else(|| Error::MissingTensor {
            name: "embeddings.word_embeddings.weight".into(),
            location: format!("the checkpoint (tried prefixes {candidates:?})"),
        })
}

/// A BERT encoder returning the last hidden states.
#[derive(Debug, Clone)]
pub struct BertModel {
    /// Its position table has the segment-0 token-type row added at load
    /// (inference embeds segment 0 only): one table for `embed_sum`.
    stack: EncoderStack,
    /// `0..max_position_embeddings` (u32) on the device: one sequence's
    /// position ids are a view of it, no upload.
    position_ids: Tensor,
    config: BertConfig,
}

impl BertModel {
    /// Builds the encoder from `weights` (with or without a `bert.` prefix;
    /// a pooler or MLM head, if present, is ignored).
    ///
    /// # Errors
    /// Invalid config, missing tensors or wrong shapes.
    pub fn new(config: &BertConfig, w: &Weights) -> Result<Self> {
        config
            .validate()
            .map_err(|m| Error::config("BERT config", m))?;
        let p = weight_prefix(w, &["", "bert.", "model."])?;
        let h = config.hidden_size;
        let dims = LayerDims {
            hidden: h,
            heads: config.num_attention_heads,
            intermediate: config.intermediate_size,
            eps: config.layer_norm_eps,
            act: parse_activation(&config.hidden_act)
                .map_err(|m| Error::config("BERT config", m))?,
        };
        let sizes = StackSizes {
            vocab: config.vocab_size,
            max_positions: config.max_position_embeddings,
            layers: config.num_hidden_layers,
        };
        let mut stack = EncoderStack::load(w, p, sizes, &LAYER_NAMES, dims)?;
        if config.type_vocab_size > 0 {
            if let Some(tt) = w.get_opt(
                &format!("{p}embeddings.token_type_embeddings.weight"),
                &[config.type_vocab_size, h],
            )? {
                // Every token is type 0: its row folds into the positions.
                stack.position = stack.position.broadcast_add(&tt.narrow(0, 0, 1)?)?;
            }
        }
        Ok(Self {
            position_ids: Tensor::arange(
                0u32,
                config.max_position_embeddings as u32,
                stack.position.device(),
            )?,
            stack,
            config: config.clone(),
        })
    }

    /// The layers and tables BERT and MPNet share.
    pub(crate) fn stack(&self) -> &EncoderStack {
        &self.stack
    }

    /// The config.
    #[must_use]
    pub fn config(&self) -> &BertConfig {
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
        if s > self.config.max_position_embeddings {
            return Err(Error::ContextLengthExceeded {
                requested: s,
                limit: self.config.max_position_embeddings,
            });
        }
        // Checked where they are: host ids (the `encode` path) need no
        // device round trip. Row maxima first: Candle reduces each row in
        // one block, so a flat max over b x s ids ran in a single block
        // (49 us at b128 x 512 on an H200, ncu).
        let ids = ids.to_dtype(DType::U32)?;
        check_vocab(
            ids.max(1)?.max(0)?.to_scalar::<u32>()?,
            self.config.vocab_size,
        )?;
        let ids = ids.to_device(self.device())?;
        // Copied on the device from the kept 0..max table: built on the
        // host, b x s positions were a vector and an upload before the
        // first kernel could start (the device idle meanwhile).
        let positions = self.position_ids.narrow(0, 0, s)?;
        let positions = if b == 1 {
            positions
        } else {
            positions
                .unsqueeze(0)?
                .broadcast_as((b, s))?
                .contiguous()?
                .flatten_all()?
        };
        let bias = padding_bias(mask, self.device())?;
        self.stack.run(
            &ids.flatten_all()?,
            &positions,
            (b, s),
            Batch::Padded(bias.as_ref()),
        )
    }

    /// Last hidden states `[1, tokens, hidden]` of `seqs` (token ids, each
    /// non-empty) packed end to end with no padding, and their layout.
    ///
    /// # Errors
    /// An empty or too long sequence, or an id outside the vocabulary.
    pub(crate) fn forward_packed(&self, seqs: &[&[u32]]) -> Result<(Tensor, PackedSeqs)> {
        let (ids, packed) = self.stack.pack(seqs, self.config.max_position_embeddings)?;
        let positions: Vec<u32> = seqs.iter().flat_map(|s| 0..s.len() as u32).collect();
        let tokens = positions.len();
        let positions = Tensor::from_vec(positions, tokens, self.device())?;
        let batch = Batch::Packed(&packed, None);
        let x = self.stack.run(&ids, &positions, (1, tokens), batch)?;
        Ok((x, packed))
    }
}
