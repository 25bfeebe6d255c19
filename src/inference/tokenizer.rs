//! Text tokenizers for the language models: a Hugging Face `tokenizer.json`,
//! or the byte-level BPE vocabulary stored in a GGUF file's metadata, plus
//! the model's special tokens and chat template.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use super::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::io::ModelRepo;

/// Qwen2's pre-tokenizer split (tokenizer.json of Qwen2/2.5; llama.cpp `qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the model's special tokens and chat template.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    eos_token_ids: Vec<u32>,
    bos_token_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<ChatTemplate>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// A GGUF metadata value of the wrong type (Candle's error, backtrace dropped).
fn md_err(e: candle_core::Error) -> Error {
    Error::Tokenizer(format!(
        "GGUF tokenizer metadata: {}",
        crate::error::candle_message(e)
    ))
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json`
    /// (chat template, eos/bos tokens) and `generation_config.json` (eos ids)
    /// from a model repo or directory.
    ///
    /// # Errors
    /// Missing or malformed `tokenizer.json`.
    pub fn from_repo(repo: &ModelRepo) -> Result<Self> {
        let path = repo.get("tokenizer.json")?;
        let inner = crate::io::read_tokenizer_json(&path)?;
        let mut tok = Self::wrap(inner);
        if let Some(cfg) = repo.get_optional("tokenizer_config.json")? {
            tok.apply_tokenizer_config(&cfg)?;
        }
        if let Some(gen) = repo.get_optional("generation_config.json")? {
            let v = read_json(&gen)?;
            let ids = json_ids(v.get("eos_token_id"));
            if !ids.is_empty() {
                tok.eos_token_ids = ids;
            }
        }
        Ok(tok)
    }

    /// Loads a bare `tokenizer.json` file.
    ///
    /// # Errors
    /// Missing or malformed file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = crate::io::read_tokenizer_json(path)?;
        Ok(Self::wrap(inner))
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            eos_token_ids: Vec::new(),
            bos_token_id: None,
            add_bos: false,
            chat_template: None,
        }
    }

    fn apply_tokenizer_config(&mut self, path: &Path) -> Result<()> {
        let v = read_json(path)?;
        self.apply_tokenizer_config_value(&v)
    }

    /// A tokenizer from the text of `tokenizer.json` and, optionally,
    /// `tokenizer_config.json` (the fuzz targets' entry point).
    pub(crate) fn from_json_texts(tokenizer: &str, config: Option<&str>) -> Result<Self> {
        let inner = crate::io::parse_tokenizer_json(tokenizer, "tokenizer.json")?;
        let mut tok = Self::wrap(inner);
        if let Some(c) = config {
            let v: serde_json::Value = serde_json::from_str(c)
                .map_err(|e| Error::config("tokenizer_config.json", e.to_string()))?;
            tok.apply_tokenizer_config_value(&v)?;
        }
        Ok(tok)
    }

    fn apply_tokenizer_config_value(&mut self, v: &serde_json::Value) -> Result<()> {
        let token_text = |key: &str| -> Option<String> {
            match v.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                obj => obj.get("content")?.as_str().map(str::to_string),
            }
        };
        let eos = token_text("eos_token");
        let bos = token_text("bos_token");
        if let Some(id) = eos.as_deref().and_then(|t| self.inner.token_to_id(t)) {
            self.eos_token_ids = vec![id];
        }
        self.bos_token_id = bos.as_deref().and_then(|t| self.inner.token_to_id(t));
        if let Some(src) = v.get("chat_template").and_then(|t| t.as_str()) {
            self.chat_template = Some(ChatTemplate::new(
                src,
                bos.as_deref().unwrap_or(""),
                eos.as_deref().unwrap_or(""),
            )?);
        }
        Ok(())
    }

    /// Builds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`,
    /// byte-level BPE as in llama.cpp's `gpt2` model), with its special
    /// tokens and `tokenizer.chat_template`.
    ///
    /// # Errors
    /// Missing keys, or an unsupported tokenizer model / pre-tokenizer.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| tok_err(format!("GGUF metadata lacks {k}")))
        };
        let model = get("tokenizer.ggml.model")?.to_string().map_err(md_err)?;
        if model != "gpt2" {
            return Err(tok_err(format!(
                "GGUF tokenizer model `{model}` is not supported (gpt2 BPE only)"
            )));
        }
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map_or("default", String::as_str);
        let tokens = get("tokenizer.ggml.tokens")?.to_vec().map_err(md_err)?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(md_err)?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let merges: Vec<String> = get("tokenizer.ggml.merges")?
            .to_vec()
            .map_err(md_err)?
            .iter()
            .map(|m| m.to_string().cloned().map_err(md_err))
            .collect::<Result<_>>()?;
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            let text = t.to_string().map_err(md_err)?;
            // llama.cpp token types: 1 normal, 3 control, 4 user-defined, 5 unused.
            match types.get(id).copied().unwrap_or(1) {
                5 => continue,
                ty @ (3 | 4) => added.push(json!({
                    "id": id, "content": text, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3,
                })),
                _ => {}
            }
            vocab.insert(text.clone(), json!(id));
        }
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let (normalizer, pre_tokenizer) = match pre {
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                    byte_level,
                ]}),
            ),
            // SmolLM2's tokenizer.json: single digits, then GPT-2's byte-level regex.
            "smollm" => (
                serde_json::Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
                ]}),
            ),
            other => {
                return Err(tok_err(format!(
                    "GGUF pre-tokenizer `{other}` is not supported (qwen2, smollm); use a tokenizer.json"
                )))
            }
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let inner = crate::io::parse_tokenizer_json(&spec.to_string(), "GGUF tokenizer")?;
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let token = |i: Option<u32>| {
            i.and_then(|i| tokens.get(i as usize))
                .and_then(|t| t.to_string().ok().cloned())
                .unwrap_or_default()
        };
        let eos = id("tokenizer.ggml.eos_token_id");
        let bos = id("tokenizer.ggml.bos_token_id");
        let chat_template = match md.get("tokenizer.chat_template") {
            Some(t) => Some(ChatTemplate::new(
                t.to_string().map_err(md_err)?,
                &token(bos),
                &token(eos),
            )?),
            None => None,
        };
        Ok(Self {
            inner,
            eos_token_ids: eos.into_iter().collect(),
            bos_token_id: bos,
            add_bos: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            chat_template,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (e.g.
    /// `<|im_start|>`) are recognised; a BOS token is prepended only when the
    /// model asks for it.
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos_token_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special_tokens`.
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// The underlying `tokenizers` tokenizer.
    #[must_use]
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// End-of-sequence ids (may be several).
    #[must_use]
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Overrides the end-of-sequence ids.
    pub fn set_eos_token_ids(&mut self, ids: Vec<u32>) {
        self.eos_token_ids = ids;
    }

    /// The beginning-of-sequence id, if any.
    #[must_use]
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The id of a token string, if it is in the vocabulary.
    #[must_use]
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The model's chat template, if it has one.
    #[must_use]
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Renders `messages` with the chat template (generation prompt added).
    ///
    /// # Errors
    /// No template, or the template fails.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| Error::Tokenizer("this model has no chat template".into()))?
            .render(messages, true)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
        origin: path.display().to_string(),
        message: e.to_string(),
    })
}

fn json_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}
