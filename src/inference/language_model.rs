//! A causal language model together with its tokenizer, loaded from one
//! source (directory, Hub repo id, or GGUF file).

use candle_core::{DType, Device};

use super::tokenizer::TextTokenizer;
use crate::error::Result;
use crate::models::{load_with_source, CausalLm, LoadOptions, LoadedFrom};

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
    /// `dtype` defaults to [`crate::backend::default_dtype`]; a GGUF file's
    /// weights stay quantized (see [`Self::from_pretrained_with`]).
    ///
    /// # Errors
    /// Missing or malformed files, an unsupported architecture.
    pub fn from_pretrained(source: &str, dtype: Option<DType>, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(
            source,
            device,
            &LoadOptions {
                dtype,
                ..LoadOptions::default()
            },
        )
    }

    /// [`Self::from_pretrained`] with the weights kept dense or quantized as
    /// `options` say.
    ///
    /// # Errors
    /// See [`Self::from_pretrained`].
    pub fn from_pretrained_with(
        source: &str,
        device: &Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        let (model, from) = load_with_source(source, device, options)?;
        let mut tokenizer = match from {
            LoadedFrom::Gguf(metadata) => TextTokenizer::from_gguf_metadata(&metadata)?,
            LoadedFrom::Repo(repo) => TextTokenizer::from_repo(&repo)?,
        };
        if tokenizer.eos_token_ids().is_empty() {
            tokenizer.set_eos_token_ids(model.config().eos_token_ids.clone());
        }
        Ok(Self { model, tokenizer })
    }
}
