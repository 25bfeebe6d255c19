//! A causal language model together with its tokenizer, loaded from one
//! source (directory, Hub repo id, or GGUF file).

use candle_core::{DType, Device};

use super::tokenizer::TextTokenizer;
use crate::error::Result;
use crate::models::gguf::{resolve_gguf, GgufModel};
use crate::models::hub::ModelRepo;
use crate::models::Qwen2Model;

/// A model and its tokenizer.
#[derive(Debug)]
pub struct LanguageModel {
    /// The decoder.
    pub model: Qwen2Model,
    /// Its tokenizer, special tokens and chat template.
    pub tokenizer: TextTokenizer,
}

impl LanguageModel {
    /// Loads both from `source`: a directory or Hub repo with `config.json`,
    /// safetensors and `tokenizer.json`; or a GGUF file (`path/x.gguf`,
    /// `org/repo/x.gguf`) whose metadata carries the tokenizer.
    /// `dtype` defaults to [`crate::backend::default_dtype`].
    ///
    /// # Errors
    /// Missing or malformed files.
    pub fn from_pretrained(source: &str, dtype: Option<DType>, device: &Device) -> Result<Self> {
        let dtype = dtype.unwrap_or_else(|| crate::backend::default_dtype(device));
        if let Some(path) = resolve_gguf(source)? {
            let g = GgufModel::load(&path, dtype, device)?;
            let mut tokenizer = TextTokenizer::from_gguf_metadata(&g.metadata)?;
            if tokenizer.eos_token_ids().is_empty() {
                tokenizer.set_eos_token_ids(g.config.eos_token_ids());
            }
            return Ok(Self {
                model: Qwen2Model::new(&g.config, &g.weights)?,
                tokenizer,
            });
        }
        let repo = ModelRepo::open(source)?;
        let model = Qwen2Model::from_repo(&repo, dtype, device)?;
        let mut tokenizer = TextTokenizer::from_repo(&repo)?;
        if tokenizer.eos_token_ids().is_empty() {
            tokenizer.set_eos_token_ids(model.config().eos_token_ids());
        }
        Ok(Self { model, tokenizer })
    }
}
