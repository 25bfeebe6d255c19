//! A causal language model together with its tokenizer, loaded from one
//! source (directory, Hub repo id, or GGUF file).

use candle_core::{DType, Device};

use super::tokenizer::TextTokenizer;
use crate::error::Result;
use crate::io::gguf::resolve_gguf;
use crate::io::ModelRepo;
use crate::models::{build_decoder, load_from_repo, load_gguf, CausalLm};

/// A model and its tokenizer.
#[derive(Debug)]
pub struct LanguageModel {
    /// The decoder, whatever its architecture.
    pub model: Box<dyn CausalLm>,
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
    /// Missing or malformed files, an unsupported architecture.
    pub fn from_pretrained(source: &str, dtype: Option<DType>, device: &Device) -> Result<Self> {
        let dtype = dtype.unwrap_or_else(|| crate::backend::default_dtype(device));
        let (model, mut tokenizer) = match resolve_gguf(source)? {
            Some(path) => {
                let (config, weights, metadata) = load_gguf(&path, dtype, device)?;
                (
                    build_decoder(&config, &weights)?,
                    TextTokenizer::from_gguf_metadata(&metadata)?,
                )
            }
            None => {
                let repo = ModelRepo::open(source)?;
                (
                    load_from_repo(&repo, dtype, device)?,
                    TextTokenizer::from_repo(&repo)?,
                )
            }
        };
        if tokenizer.eos_token_ids().is_empty() {
            tokenizer.set_eos_token_ids(model.config().eos_token_ids.clone());
        }
        Ok(Self { model, tokenizer })
    }
}
