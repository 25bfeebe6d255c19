//! [`EmbeddingModel`]: a sentence-transformers model (tokenizer, BERT or
//! MPNet encoder, pooling, normalisation) that gives the vectors
//! sentence-transformers gives.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::pooling::{normalize, Pooling};
use crate::error::{Error, Result};
use crate::io::{ModelLoader, ModelRepo};
use crate::layers::PackedSeqs;
use crate::models::bert::{BertConfig, BertModel};
use crate::models::mpnet::{MpnetConfig, MpnetModel, PADDING_IDX};

/// Texts per forward pass unless [`EmbeddingModel::set_batch_size`] says otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// The BGE English v1.5 instruction for retrieval queries (documents get none).
const BGE_QUERY_INSTRUCTION: &str = "Represent this sentence for searching relevant passages: ";

/// Well-known sentence embedding models, by their Hugging Face repo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EmbeddingModelType {
    /// `sentence-transformers/all-MiniLM-L6-v2`: 384 dims, mean pooling, normalised.
    AllMiniLmL6V2,
    /// `sentence-transformers/all-MiniLM-L12-v2`: 384 dims, mean pooling, normalised.
    AllMiniLmL12V2,
    /// `intfloat/e5-small-v2`: 384 dims; prefixes `query: ` / `passage: `.
    E5SmallV2,
    /// `intfloat/e5-base-v2`: 768 dims; prefixes `query: ` / `passage: `.
    E5BaseV2,
    /// `intfloat/e5-large-v2`: 1024 dims; prefixes `query: ` / `passage: `.
    E5LargeV2,
    /// `BAAI/bge-small-en-v1.5`: 384 dims, CLS pooling; query instruction.
    BgeSmallEnV15,
    /// `BAAI/bge-base-en-v1.5`: 768 dims, CLS pooling; query instruction.
    BgeBaseEnV15,
    /// `BAAI/bge-large-en-v1.5`: 1024 dims, CLS pooling; query instruction.
    BgeLargeEnV15,
    /// `sentence-transformers/all-mpnet-base-v2`: 768 dims, MPNet, mean pooling, normalised.
    AllMpnetBaseV2,
}

impl EmbeddingModelType {
    /// Every known model.
    pub const ALL: [Self; 9] = [
        Self::AllMiniLmL6V2,
        Self::AllMiniLmL12V2,
        Self::E5SmallV2,
        Self::E5BaseV2,
        Self::E5LargeV2,
        Self::BgeSmallEnV15,
        Self::BgeBaseEnV15,
        Self::BgeLargeEnV15,
        Self::AllMpnetBaseV2,
    ];

    /// The Hugging Face repo id.
    #[must_use]
    pub fn repo_id(self) -> &'static str {
        match self {
            Self::AllMiniLmL6V2 => "sentence-transformers/all-MiniLM-L6-v2",
            Self::AllMiniLmL12V2 => "sentence-transformers/all-MiniLM-L12-v2",
            Self::E5SmallV2 => "intfloat/e5-small-v2",
            Self::E5BaseV2 => "intfloat/e5-base-v2",
            Self::E5LargeV2 => "intfloat/e5-large-v2",
            Self::BgeSmallEnV15 => "BAAI/bge-small-en-v1.5",
            Self::BgeBaseEnV15 => "BAAI/bge-base-en-v1.5",
            Self::BgeLargeEnV15 => "BAAI/bge-large-en-v1.5",
            Self::AllMpnetBaseV2 => "sentence-transformers/all-mpnet-base-v2",
        }
    }

    /// The short name (`all-minilm-l6-v2`, `e5-small-v2`, `bge-small-en-v1.5`, ...):
    /// the repo name, lower-cased.
    #[must_use]
    pub fn name(self) -> String {
        self.repo_id()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_lowercase()
    }

    /// The known model stored at `repo_id` (case-insensitive), if any.
    #[must_use]
    pub fn from_repo_id(repo_id: &str) -> Option<Self> {
        let id = repo_id.split('@').next().unwrap_or(repo_id);
        Self::ALL
            .into_iter()
            .find(|t| t.repo_id().eq_ignore_ascii_case(id))
    }

    /// What [`EmbeddingModel::encode_queries`] prepends: `query: ` for E5,
    /// BGE's retrieval instruction for BGE, nothing for the others.
    #[must_use]
    pub fn query_prefix(self) -> Option<&'static str> {
        match self {
            Self::E5SmallV2 | Self::E5BaseV2 | Self::E5LargeV2 => Some("query: "),
            Self::BgeSmallEnV15 | Self::BgeBaseEnV15 | Self::BgeLargeEnV15 => {
                Some(BGE_QUERY_INSTRUCTION)
            }
            _ => None,
        }
    }

    /// What [`EmbeddingModel::encode_documents`] prepends: `passage: ` for
    /// E5, nothing for the others.
    #[must_use]
    pub fn document_prefix(self) -> Option<&'static str> {
        match self {
            Self::E5SmallV2 | Self::E5BaseV2 | Self::E5LargeV2 => Some("passage: "),
            _ => None,
        }
    }
}

impl fmt::Display for EmbeddingModelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for EmbeddingModelType {
    type Err = Error;

    /// Parses a short name (`all-minilm-l6-v2`, `bge-base-en-v1.5`, ...) or a
    /// known repo id, case-insensitively.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_lowercase();
        Self::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .or_else(|| Self::from_repo_id(s))
            .ok_or_else(|| {
                let names: Vec<String> = Self::ALL.iter().map(|t| t.name()).collect();
                Error::InvalidInput(format!(
                    "unknown embedding model `{s}` (known: {})",
                    names.join(", ")
                ))
            })
    }
}

#[derive(Debug, Clone)]
enum Backbone {
    Bert(BertModel),
    Mpnet(MpnetModel),
}

impl Backbone {
    fn forward_rows(&self, ids: &Tensor, mask: &[Vec<u32>]) -> Result<Tensor> {
        match self {
            Self::Bert(m) => m.forward_rows(ids, mask),
            Self::Mpnet(m) => m.forward_rows(ids, mask),
        }
    }

    fn forward_packed(&self, seqs: &[&[u32]]) -> Result<(Tensor, PackedSeqs)> {
        match self {
            Self::Bert(m) => m.forward_packed(seqs),
            Self::Mpnet(m) => m.forward_packed(seqs),
        }
    }

    /// Whether the packed attention kernel runs for this model where it is
    /// (CUDA, bf16/f16, head dim 32/64/128).
    fn packed_kernel(&self) -> bool {
        match self {
            Self::Bert(m) => m.stack().packed_kernel(),
            Self::Mpnet(m) => m.stack().packed_kernel(),
        }
    }
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize, Default)]
struct SbertConfig {
    #[serde(default)]
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Deserialize, Default)]
struct StConfig {
    #[serde(default)]
    prompts: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct ModelType {
    model_type: String,
}

/// What `modules.json` asks for: the Pooling module's folder and whether
/// a Normalize module follows.
fn modules_plan(text: &str) -> std::result::Result<(String, bool), String> {
    let modules: Vec<ModuleEntry> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut pooling = None;
    let mut normalize = false;
    for m in &modules {
        let kind = m.kind.rsplit('.').next().unwrap_or_default();
        match kind {
            "Transformer" if m.path.is_empty() => {}
            "Transformer" => {
                return Err(format!(
                    "the transformer in subfolder `{}` is not supported (only the repo root)",
                    m.path
                ))
            }
            "Pooling" => pooling = Some(m.path.clone()),
            "Normalize" => normalize = true,
            other => {
                return Err(format!(
                    "sentence-transformers module `{other}` ({}) is not supported",
                    m.kind
                ))
            }
        }
    }
    let pooling = pooling.ok_or("no Pooling module")?;
    Ok((pooling, normalize))
}

/// The fuzz target of the sentence-transformers files: `modules.json`,
/// `sentence_bert_config.json`, `config_sentence_transformers.json` and a
/// pooling config, all parsed from `text`.
pub(crate) fn fuzz_sentence_transformers_files(text: &str) {
    let _ = modules_plan(text);
    let _ = serde_json::from_str::<SbertConfig>(text);
    let _ = serde_json::from_str::<StConfig>(text);
    let _ = Pooling::from_json(text);
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
        origin: path.display().to_string(),
        message: e.to_string(),
    })
}

/// A sentence embedding model: BERT-family or MPNet weights with the
/// tokenizer, pooling, normalisation and `max_seq_length` of their
/// sentence-transformers files.
///
/// Texts are tokenized without the padding baked into some `tokenizer.json`
/// files, truncated at `max_seq_length` tokens, sorted by length into
/// batches padded to their longest text, and returned in input order.
///
/// ```no_run
/// use metal_candle::embeddings::{EmbeddingModel, EmbeddingModelType};
/// # fn main() -> metal_candle::Result<()> {
/// let model = EmbeddingModel::from_pretrained(EmbeddingModelType::AllMiniLmL6V2, &metal_candle::backend::cpu())?;
/// let v = model.encode(&["A sentence.", "Another one."])?; // [2, 384], unit rows
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddingModel {
    backbone: Backbone,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
    do_lower_case: bool,
    pad_id: u32,
    hidden_size: usize,
    query_prefix: Option<String>,
    document_prefix: Option<String>,
    batch_size: usize,
    /// Draw a progress bar for long `encode` calls (off: the library
    /// prints nothing unless asked).
    progress: bool,
    /// Whether `encode` packs each batch end to end (no padding); `None`:
    /// where the packed attention kernel runs.
    packed: Option<bool>,
    source: String,
    device: Device,
}

impl EmbeddingModel {
    /// Loads a known model from the Hugging Face cache (downloading it when
    /// allowed), in [`crate::backend::default_dtype`] for `device`.
    ///
    /// # Errors
    /// Missing files (offline and not cached), invalid files.
    pub fn from_pretrained(kind: EmbeddingModelType, device: &Device) -> Result<Self> {
        let mut m = Self::load(&ModelRepo::open(kind.repo_id())?, None, device)?;
        m.set_prefixes(kind.query_prefix(), kind.document_prefix());
        Ok(m)
    }

    /// Loads a BERT or MPNet sentence-transformers model from a directory
    /// or a Hub repo id (`org/name`, optionally `@revision`). A repo id of
    /// an [`EmbeddingModelType`] gets that model's query/document prefixes.
    ///
    /// # Errors
    /// Unknown source, missing or invalid files, unsupported architecture.
    pub fn from_pretrained_repo(source: &str, device: &Device) -> Result<Self> {
        let mut m = Self::load(&ModelRepo::open(source)?, None, device)?;
        if let Some(kind) = EmbeddingModelType::from_repo_id(source) {
            m.set_prefixes(kind.query_prefix(), kind.document_prefix());
        }
        Ok(m)
    }

    /// Loads a model from a local sentence-transformers folder.
    ///
    /// # Errors
    /// Missing or invalid files, unsupported architecture.
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load(&ModelRepo::from_dir(dir.as_ref()), None, device)
    }

    /// Loads a model from `repo` with weights in `dtype` (default: the
    /// device's [`crate::backend::default_dtype`]). Pooling and
    /// normalisation always run in f32.
    ///
    /// Reads `config.json` (`model_type` `bert` or `mpnet`), the weights,
    /// `tokenizer.json`, and when present `modules.json` (Transformer,
    /// Pooling, Normalize; without it: mean pooling, no normalisation),
    /// `1_Pooling/config.json`, `sentence_bert_config.json`
    /// (`max_seq_length`, `do_lower_case`), `tokenizer_config.json`
    /// (`model_max_length`, the fallback for `max_seq_length`) and
    /// `config_sentence_transformers.json` (`prompts.query` /
    /// `prompts.document` become the query/document prefixes).
    ///
    /// # Errors
    /// Missing or invalid files, an unsupported architecture or module.
    pub fn load(repo: &ModelRepo, dtype: Option<DType>, device: &Device) -> Result<Self> {
        crate::backend::prepare_device(device);
        let dtype = dtype.unwrap_or_else(|| crate::backend::default_dtype(device));
        let config_path = repo.get("config.json")?;

        let (pooling, normalize) = Self::read_modules(repo)?;
        let sbert: SbertConfig = match repo.get_optional("sentence_bert_config.json")? {
            Some(p) => read_json(&p)?,
            None => SbertConfig::default(),
        };
        let tokenizer_max = match repo.get_optional("tokenizer_config.json")? {
            Some(p) => read_json::<serde_json::Value>(&p)?
                .get("model_max_length")
                .and_then(serde_json::Value::as_f64)
                .filter(|v| (1.0..1e9).contains(v))
                .map(|v| v as usize),
            None => None,
        };
        let prompts: StConfig = match repo.get_optional("config_sentence_transformers.json")? {
            Some(p) => read_json(&p)?,
            None => StConfig::default(),
        };

        let files = ModelLoader::safetensors_files(repo)?;
        let weights = ModelLoader::load_safetensors(&files, dtype, device)?;
        let model_type: ModelType = read_json(&config_path)?;
        let (backbone, hidden_size, model_limit, pad_id) = match model_type.model_type.as_str() {
            "bert" => {
                let cfg = BertConfig::from_file(&config_path)?;
                let m = BertModel::new(&cfg, &weights)?;
                let pad = cfg.pad_token_id.unwrap_or(0);
                (
                    Backbone::Bert(m),
                    cfg.hidden_size,
                    cfg.max_position_embeddings,
                    pad,
                )
            }
            "mpnet" => {
                let cfg = MpnetConfig::from_file(&config_path)?;
                let m = MpnetModel::new(&cfg, &weights)?;
                (
                    Backbone::Mpnet(m),
                    cfg.hidden_size,
                    cfg.max_tokens(),
                    PADDING_IDX,
                )
            }
            other => {
                return Err(Error::UnsupportedArchitecture {
                    name: other.to_string(),
                    supported: "bert, mpnet (embeddings)".into(),
                })
            }
        };

        // sentence-transformers: sentence_bert_config's max_seq_length, else
        // the tokenizer's model_max_length capped by the position table.
        let mut max_seq_length = sbert
            .max_seq_length
            .or(tokenizer_max)
            .unwrap_or(model_limit);
        if max_seq_length > model_limit {
            tracing::warn!(
                "max_seq_length {max_seq_length} exceeds the model's {model_limit} positions; using {model_limit}"
            );
            max_seq_length = model_limit;
        }

        let tokenizer_path = repo.get("tokenizer.json")?;
        let tokenizer = crate::io::read_tokenizer_json(&tokenizer_path)?;

        let mut model = Self {
            backbone,
            tokenizer,
            pooling,
            normalize,
            max_seq_length,
            do_lower_case: sbert.do_lower_case,
            pad_id,
            hidden_size,
            query_prefix: None,
            document_prefix: None,
            batch_size: DEFAULT_BATCH_SIZE,
            progress: false,
            packed: None,
            source: repo.describe(),
            device: device.clone(),
        };
        model.set_max_seq_length(max_seq_length)?;
        let p = &prompts.prompts;
        model.set_prefixes(
            p.get("query").map(String::as_str),
            p.get("document")
                .or_else(|| p.get("passage"))
                .map(String::as_str),
        );
        tracing::info!(
            "loaded embedding model {} ({}, dim {}, max_seq_length {}, pooling {:?}, normalize {}) as {dtype:?} on {device:?}",
            model.source,
            model_type.model_type,
            model.dim(),
            model.max_seq_length,
            model.pooling.modes,
            model.normalize
        );
        Ok(model)
    }

    /// Pooling and normalisation from `modules.json`.
    fn read_modules(repo: &ModelRepo) -> Result<(Pooling, bool)> {
        let Some(path) = repo.get_optional("modules.json")? else {
            tracing::warn!(
                "{} has no modules.json: using mean pooling without normalisation",
                repo.describe()
            );
            return Ok((Pooling::default(), false));
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let (pooling_dir, normalize) =
            modules_plan(&text).map_err(|message| Error::InvalidConfig {
                origin: path.display().to_string(),
                message,
            })?;
        // `repo.get` refuses a folder outside the model (`../..`).
        let pooling = Pooling::from_file(&repo.get(&format!("{pooling_dir}/config.json"))?)?;
        Ok((pooling, normalize))
    }

    /// Where the model was loaded from.
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The embedding width (hidden size × number of pooling modes).
    #[must_use]
    pub fn dim(&self) -> usize {
        self.hidden_size * self.pooling.modes.len()
    }

    /// The device the model runs on.
    #[must_use]
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The pooling in use.
    #[must_use]
    pub fn pooling(&self) -> &Pooling {
        &self.pooling
    }

    /// Whether embeddings are L2-normalised (a `Normalize` module).
    #[must_use]
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Longest input in tokens (special tokens included); longer texts are truncated.
    #[must_use]
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Changes the truncation length.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when it is 0, or above the position table.
    pub fn set_max_seq_length(&mut self, max_seq_length: usize) -> Result<()> {
        let limit = match &self.backbone {
            Backbone::Bert(m) => m.config().max_position_embeddings,
            Backbone::Mpnet(m) => m.config().max_tokens(),
        };
        if max_seq_length < 2 || max_seq_length > limit {
            return Err(Error::InvalidInput(format!(
                "max_seq_length must be in 2..={limit}, got {max_seq_length}"
            )));
        }
        self.max_seq_length = max_seq_length;
        // The shipped tokenizer.json files of MiniLM/MPNet pad every text to
        // 128 and truncate at 128: sentence-transformers pads per batch and
        // truncates at max_seq_length instead.
        self.tokenizer.with_padding(None);
        self.tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(())
    }

    /// Texts per forward pass.
    #[must_use]
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Sets the texts per forward pass (at least 1).
    pub fn set_batch_size(&mut self, batch_size: usize) {
        self.batch_size = batch_size.max(1);
    }

    /// The prefix [`Self::encode_queries`] prepends, if any.
    #[must_use]
    pub fn query_prefix(&self) -> Option<&str> {
        self.query_prefix.as_deref()
    }

    /// The prefix [`Self::encode_documents`] prepends, if any.
    #[must_use]
    pub fn document_prefix(&self) -> Option<&str> {
        self.document_prefix.as_deref()
    }

    /// Draws a progress bar on the terminal while `encode` runs over many
    /// batches (off by default).
    pub fn set_progress(&mut self, on: bool) {
        self.progress = on;
    }

    /// Whether `encode` runs each batch packed end to end, with no padding
    /// (text-embeddings-inference's variable-length batches; attention
    /// stays within each text), or padded to the batch's longest text.
    /// `None` (the default): packed where the packed attention kernel runs
    /// (CUDA in bf16/f16), padded elsewhere: in f32 on an H200 packed
    /// batches, whose attention runs on padded rows gathered from the
    /// packed ones, were 10% slower (BENCHMARKS.md). Both give the same
    /// vectors; this is for tests and A/B runs.
    #[doc(hidden)]
    pub fn set_packed_batches(&mut self, packed: Option<bool>) {
        self.packed = packed;
    }

    /// Sets the query and document prefixes (`None` or `""`: no prefix).
    pub fn set_prefixes(&mut self, query: Option<&str>, document: Option<&str>) {
        let own = |p: Option<&str>| p.filter(|p| !p.is_empty()).map(str::to_string);
        self.query_prefix = own(query);
        self.document_prefix = own(document);
    }

    /// Token ids of each text as the model sees them: special tokens added,
    /// truncated at [`Self::max_seq_length`], not padded.
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<String> = texts
            .iter()
            .map(|t| {
                if self.do_lower_case {
                    t.to_lowercase()
                } else {
                    (*t).to_string()
                }
            })
            .collect();
        let enc = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Embeds `texts` as they are: `[n, dim]` f32 on the model's device, in
    /// input order (an empty slice gives `[0, dim]`).
    ///
    /// # Errors
    /// Tokenizer or tensor failures.
    pub fn encode(&self, texts: &[&str]) -> Result<Tensor> {
        self.encode_prefixed(texts, None)
    }

    /// [`Self::encode`] as one `Vec<f32>` per text.
    ///
    /// # Errors
    /// Tokenizer or tensor failures.
    pub fn encode_to_vecs(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        Ok(self.encode(texts)?.to_vec2::<f32>()?)
    }

    /// Embeds search queries: prepends the query prefix first — `query: `
    /// for E5, `Represent this sentence for searching relevant passages: `
    /// for BGE, the `query` prompt of `config_sentence_transformers.json`,
    /// or what [`Self::set_prefixes`] set; nothing for models without one
    /// (MiniLM, MPNet). Use it for the query side of retrieval.
    ///
    /// # Errors
    /// Tokenizer or tensor failures.
    pub fn encode_queries(&self, queries: &[&str]) -> Result<Tensor> {
        self.encode_prefixed(queries, self.query_prefix.as_deref())
    }

    /// Embeds documents (passages) to search in: prepends the document
    /// prefix first — `passage: ` for E5, nothing for BGE, MiniLM and MPNet.
    ///
    /// # Errors
    /// Tokenizer or tensor failures.
    pub fn encode_documents(&self, documents: &[&str]) -> Result<Tensor> {
        self.encode_prefixed(documents, self.document_prefix.as_deref())
    }

    /// Token embeddings `[b, s, hidden]` (model dtype) of already tokenized,
    /// padded input (`ids` `[b, s]`, `attention_mask` `[b, s]` 1 = token).
    ///
    /// # Errors
    /// Bad shapes or ids.
    pub fn forward_tokens(&self, ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let mask = crate::layers::mask_rows(attention_mask)?;
        self.backbone.forward_rows(ids, &mask)
    }

    fn encode_prefixed(&self, texts: &[&str], prefix: Option<&str>) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), DType::F32, &self.device)?);
        }
        let tokenize = |part: &[&str]| match prefix {
            Some(p) => {
                let joined: Vec<String> = part.iter().map(|t| format!("{p}{t}")).collect();
                let refs: Vec<&str> = joined.iter().map(String::as_str).collect();
                self.tokenize(&refs)
            }
            None => self.tokenize(part),
        };
        // Tokens of the prompt left out of pooling when the Pooling module
        // says so: the prompt's tokens without its closing special token.
        let prompt_len = match prefix {
            Some(p) if !self.pooling.include_prompt => {
                let both = self.tokenize(&[p, ""])?;
                let (with, empty) = (&both[0], &both[1]);
                let trailing_special = empty.len() >= 2 && with.last() == empty.last();
                with.len() - usize::from(trailing_special)
            }
            _ => 0,
        };
        let packed = self.packed.unwrap_or_else(|| self.backbone.packed_kernel());
        // On a GPU the host tokenizes the next chunk of texts on another
        // thread while the device embeds this one (kernel launches return
        // at once), so tokenizing no longer adds to the device's time. The
        // texts are first ordered by length in characters, longest first
        // (as sentence-transformers orders them), so that each chunk's
        // batches, sorted by tokens within the chunk, stay as tightly
        // padded as a sort of all texts by tokens would make them. The
        // first chunk is one batch, so the device starts early. On the CPU
        // tokenizing and embedding would share the cores: one chunk.
        let ahead = self.device.is_cuda() && tokenize_ahead() && texts.len() > self.batch_size;
        let mut by_chars: Vec<usize> = (0..texts.len()).collect();
        let mut chunks = vec![0];
        if ahead {
            by_chars.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
            let mut end = self.batch_size;
            while end < texts.len() {
                chunks.push(end);
                end += self.batch_size * TOKENIZE_AHEAD_BATCHES;
            }
        }
        chunks.push(texts.len());
        let progress = if self.progress && texts.len() >= 8 * self.batch_size {
            let pb = indicatif::ProgressBar::new(texts.len() as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "embedding {bar:40} {pos}/{len} texts {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut order: Vec<usize> = Vec::with_capacity(texts.len());
        let mut pooled = Vec::with_capacity(texts.len().div_ceil(self.batch_size));
        let mut embed_chunk = |members: &[usize], ids: &[Vec<u32>]| -> Result<()> {
            // Longest first, so each batch is padded to similar lengths
            // (packed batches carry no padding; sorted, their sizes in
            // tokens stay alike).
            let mut local: Vec<usize> = (0..ids.len()).collect();
            local.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
            for batch in local.chunks(self.batch_size) {
                pooled.push(self.embed_batch(ids, batch, packed, prompt_len)?);
                progress.inc(batch.len() as u64);
            }
            order.extend(local.iter().map(|&i| members[i]));
            Ok(())
        };
        if !ahead {
            embed_chunk(&by_chars, &tokenize(texts)?)?;
        } else {
            std::thread::scope(|scope| -> Result<()> {
                let spawn = |k: usize| {
                    let members = &by_chars[chunks[k]..chunks[k + 1]];
                    let tokenize = &tokenize;
                    let part: Vec<&str> = members.iter().map(|&i| texts[i]).collect();
                    (members, scope.spawn(move || tokenize(&part)))
                };
                let mut next = Some(spawn(0));
                for k in 1..chunks.len() {
                    let Some((members, handle)) = next.take() else {
                        break;
                    };
                    let ids = handle
                        .join()
                        .map_err(|_| Error::Tokenizer("the tokenizing thread panicked".into()))??;
                    if k + 1 < chunks.len() {
                        next = Some(spawn(k));
                    }
                    embed_chunk(members, &ids)?;
                }
                Ok(())
            })?;
        }
        progress.finish_and_clear();
        let sorted = Tensor::cat(&pooled, 0)?;
        if order.iter().enumerate().all(|(k, &i)| k == i) {
            return Ok(sorted);
        }
        // Row k of `sorted` is text order[k]: invert the permutation.
        let mut inverse = vec![0u32; order.len()];
        for (k, &i) in order.iter().enumerate() {
            inverse[i] = k as u32;
        }
        let inverse = Tensor::from_vec(inverse, order.len(), &self.device)?;
        Ok(sorted.index_select(&inverse, 0)?)
    }

    /// The pooled (and normalised) vectors `[batch.len(), dim]` of texts
    /// `batch` (indices into `ids`), packed end to end or padded.
    fn embed_batch(
        &self,
        ids: &[Vec<u32>],
        batch: &[usize],
        packed: bool,
        prompt_len: usize,
    ) -> Result<Tensor> {
        let s = batch.iter().map(|&i| ids[i].len()).max().unwrap_or(0);
        let mut mask = Vec::with_capacity(batch.len());
        for &i in batch {
            let mut m = vec![1u32; ids[i].len()];
            m.resize(s, 0);
            mask.push(m);
        }
        let hidden = if packed {
            let rows: Vec<&[u32]> = batch.iter().map(|&i| ids[i].as_slice()).collect();
            let (hidden, seqs) = self.backbone.forward_packed(&rows)?;
            // Right-padded for pooling (one gather; the forward's matmuls and
            // attention never saw the padding).
            seqs.to_padded_rows(&hidden, s)?
        } else {
            let mut flat = Vec::with_capacity(batch.len() * s);
            for &i in batch {
                flat.extend_from_slice(&ids[i]);
                flat.extend(std::iter::repeat_n(self.pad_id, s - ids[i].len()));
            }
            // On the host: the backbone checks the ids there before it
            // uploads them (no device round trip per batch).
            let input = Tensor::from_vec(flat, (batch.len(), s), &Device::Cpu)?;
            self.backbone.forward_rows(&input, &mask)?
        };
        if prompt_len > 0 {
            for m in &mut mask {
                let n = prompt_len.min(m.len());
                m[..n].fill(0);
            }
        }
        let mut v = self.pooling.pool(&hidden, &mask)?;
        if self.normalize {
            v = normalize(&v)?;
        }
        Ok(v)
    }
}

/// Batches per chunk (after the first, of one batch) a GPU `encode`
/// tokenizes ahead.
const TOKENIZE_AHEAD_BATCHES: usize = 4;

/// Whether a GPU `encode` tokenizes ahead on another thread;
/// `METAL_CANDLE_TOKENIZE_AHEAD=0` tokenizes everything first (A/B runs).
fn tokenize_ahead() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("METAL_CANDLE_TOKENIZE_AHEAD").as_deref() != Ok("0"))
}
