//! The supported decoder architectures, looked up by `model_type`
//! (`config.json`) or `general.architecture` (GGUF). Each entry says how
//! its config and GGUF files map onto a [`DecoderConfig`] and which model
//! builds it; loading anything else is an error that names the
//! architecture and lists these.

use std::collections::HashMap;
use std::path::Path;

use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device};

use super::config::{eos_ids, rope_scaling_from_json, DecoderConfig, RawConfig, MAX_LAYERS};
use super::decoder::CausalLm;
use super::llama::Llama;
use crate::error::{Error, Result};
use crate::io::gguf::{resolve_gguf, GgufFile};
use crate::io::{ModelLoader, ModelRepo, Weights};
use crate::layers::RopeScaling;

/// How an architecture's sliding window is switched on in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Windows {
    /// No sliding window.
    Never,
    /// Every layer, when `sliding_window` is set (Mistral).
    WhenSet,
    /// Layers from `max_window_layers` on, when `use_sliding_window` (Qwen).
    Qwen,
}

/// One supported architecture.
#[derive(Debug)]
pub(crate) struct Architecture {
    /// `model_type` values of `config.json`.
    model_types: &'static [&'static str],
    /// `general.architecture` values of GGUF files.
    gguf: &'static [&'static str],
    /// q/k/v biases when the config does not say.
    attention_bias: bool,
    /// Per-head q/k RMSNorm.
    qk_norm: bool,
    windows: Windows,
    /// llama.cpp stores q/k rows permuted for interleaved RoPE.
    gguf_permuted_qk: bool,
    /// Builds the model.
    build: fn(&DecoderConfig, &Weights) -> Result<Box<dyn CausalLm>>,
}

fn build_llama(config: &DecoderConfig, w: &Weights) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(Llama::new(config, w)?))
}

/// Every supported decoder architecture.
const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        model_types: &["llama"],
        gguf: &["llama"],
        attention_bias: false,
        qk_norm: false,
        windows: Windows::Never,
        gguf_permuted_qk: true,
        build: build_llama,
    },
    Architecture {
        model_types: &["mistral"],
        gguf: &["mistral"],
        attention_bias: false,
        qk_norm: false,
        windows: Windows::WhenSet,
        gguf_permuted_qk: true,
        build: build_llama,
    },
    Architecture {
        model_types: &["qwen2"],
        gguf: &["qwen2"],
        attention_bias: true,
        qk_norm: false,
        windows: Windows::Qwen,
        gguf_permuted_qk: false,
        build: build_llama,
    },
    Architecture {
        model_types: &["qwen3"],
        gguf: &["qwen3"],
        attention_bias: false,
        qk_norm: true,
        windows: Windows::Qwen,
        gguf_permuted_qk: false,
        build: build_llama,
    },
];

/// The `model_type`s that load, for error messages.
#[must_use]
pub fn supported_architectures() -> Vec<&'static str> {
    ARCHITECTURES
        .iter()
        .flat_map(|a| a.model_types.iter().copied())
        .collect()
}

fn unsupported(name: &str) -> Error {
    Error::UnsupportedArchitecture {
        name: name.to_string(),
        supported: supported_architectures().join(", "),
    }
}

fn by_model_type(name: &str) -> Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.model_types.contains(&name))
        .ok_or_else(|| unsupported(name))
}

fn by_gguf(name: &str) -> Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.gguf.contains(&name))
        .ok_or_else(|| unsupported(name))
}

impl Architecture {
    /// Resolves `config.json` (already parsed) with this family's defaults.
    fn resolve(
        &self,
        model_type: &str,
        raw: RawConfig,
    ) -> std::result::Result<DecoderConfig, String> {
        if raw.num_attention_heads == 0 {
            return Err("num_attention_heads must be positive".into());
        }
        if raw.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported (only silu)",
                raw.hidden_act
            ));
        }
        if raw.head_dim.is_none() && !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                raw.hidden_size, raw.num_attention_heads
            ));
        }
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                raw.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(serde_json::Value::as_f64)
            })
            .unwrap_or(10_000.0);
        let mut rope_scaling = RopeScaling::None;
        for v in [&raw.rope_scaling, &raw.rope_parameters]
            .into_iter()
            .flatten()
        {
            let s = rope_scaling_from_json(v, raw.max_position_embeddings)?;
            if s != RopeScaling::None {
                rope_scaling = s;
            }
        }
        let layers = raw.num_hidden_layers;
        // Checked before the per-layer list below is allocated.
        if layers > MAX_LAYERS {
            return Err(format!(
                "num_hidden_layers {layers} is larger than supported ({MAX_LAYERS})"
            ));
        }
        let sliding_windows = match (&raw.layer_types, self.windows) {
            (_, Windows::Never) => vec![None; layers],
            (Some(types), _) => types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => raw.sliding_window.map(Some).ok_or_else(|| {
                        "a sliding_attention layer needs sliding_window".to_string()
                    }),
                    other => Err(format!("layer type `{other}` is not supported")),
                })
                .collect::<std::result::Result<Vec<_>, String>>()?,
            (None, Windows::WhenSet) => vec![raw.sliding_window; layers],
            (None, Windows::Qwen) => {
                let on = raw.use_sliding_window.unwrap_or(false);
                let from = raw.max_window_layers.unwrap_or(layers);
                (0..layers)
                    .map(|i| (on && i >= from).then_some(raw.sliding_window).flatten())
                    .collect()
            }
        };
        let cfg = DecoderConfig {
            model_type: model_type.to_string(),
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads),
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rope_scaling,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(self.attention_bias),
            mlp_bias: raw.mlp_bias,
            qk_norm: self.qk_norm,
            sliding_windows,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: eos_ids(raw.eos_token_id.as_ref()),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Reads and resolves a decoder's `config.json`.
///
/// # Errors
/// [`Error::UnsupportedArchitecture`] for an unknown `model_type`;
/// [`Error::InvalidConfig`] naming the file and the problem.
pub fn read_decoder_config(path: &Path) -> Result<DecoderConfig> {
    Ok(read_config_with_arch(path)?.0)
}

fn read_config_with_arch(path: &Path) -> Result<(DecoderConfig, &'static Architecture)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_with_arch(&text, &path.display().to_string())
}

/// Parses and resolves a decoder config given as JSON text (what
/// `config.json` holds); `origin` names it in errors.
///
/// # Errors
/// See [`read_decoder_config`].
pub fn parse_decoder_config(json: &str, origin: &str) -> Result<DecoderConfig> {
    Ok(parse_with_arch(json, origin)?.0)
}

fn parse_with_arch(text: &str, origin: &str) -> Result<(DecoderConfig, &'static Architecture)> {
    let invalid = |message: String| Error::config(origin, message);
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
    // The architecture first: a config of another family should say so,
    // not complain about a field it does not have.
    let model_type = value
        .get("model_type")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| invalid("missing `model_type`".into()))?
        .to_string();
    let arch = by_model_type(&model_type)?;
    let raw: RawConfig = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    let cfg = arch.resolve(&model_type, raw).map_err(invalid)?;
    Ok((cfg, arch))
}

/// How a decoder's weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// As the file stores them: a GGUF file's linear weights stay in their
    /// block format (Candle's quantized matmuls run them, as llama.cpp
    /// does); safetensors stay dense.
    #[default]
    AsStored,
    /// Every weight dense in the load dtype (GGUF dequantized at load).
    Dense,
    /// Dense linear weights quantized to this format at load (in-situ
    /// quantization of a safetensors model; a GGUF file's quantized
    /// weights are kept as stored). Layers whose input width is not a
    /// whole number of blocks stay dense.
    To(GgmlDType),
}

impl std::str::FromStr for Quantization {
    type Err = Error;

    /// `none`/`as-stored`, `dense`, or a GGUF format (`q4_0`, `q4_1`,
    /// `q5_0`, `q5_1`, `q8_0`, `q2k` … `q6k`, also written `q4_k`).
    fn from_str(s: &str) -> Result<Self> {
        let f = match s.to_ascii_lowercase().replace(['_', '-'], "").as_str() {
            "none" | "asstored" => return Ok(Self::AsStored),
            "dense" => return Ok(Self::Dense),
            "q40" => GgmlDType::Q4_0,
            "q41" => GgmlDType::Q4_1,
            "q50" => GgmlDType::Q5_0,
            "q51" => GgmlDType::Q5_1,
            "q80" => GgmlDType::Q8_0,
            "q2k" => GgmlDType::Q2K,
            "q3k" => GgmlDType::Q3K,
            "q4k" => GgmlDType::Q4K,
            "q5k" => GgmlDType::Q5K,
            "q6k" => GgmlDType::Q6K,
            _ => {
                return Err(Error::config(
                    "quantization",
                    format!(
                        "unknown quantization `{s}` (as-stored, dense, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k)"
                    ),
                ))
            }
        };
        Ok(Self::To(f))
    }
}

/// How [`load_decoder_with`] loads a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Dtype of dense weights and activations (default
    /// [`crate::backend::default_dtype`]).
    pub dtype: Option<DType>,
    /// Dense or quantized weights.
    pub quantization: Quantization,
}

/// Builds the model `config` describes from `weights` (HF tensor names).
///
/// # Errors
/// Unsupported architecture, invalid config, missing or misshapen tensors.
pub fn build_decoder(config: &DecoderConfig, weights: &Weights) -> Result<Box<dyn CausalLm>> {
    crate::backend::prepare_device(weights.device());
    (by_model_type(&config.model_type)?.build)(config, weights)
}

/// Loads a decoder from a directory, a Hub repo id, or a GGUF file
/// (`path/to/model.gguf`, or `org/repo/file.gguf` in the Hub cache), in
/// `dtype` (default [`crate::backend::default_dtype`]).
///
/// # Errors
/// Missing files, unsupported architecture, malformed config or checkpoint,
/// wrong shapes.
pub fn load_decoder(
    source: &str,
    dtype: Option<DType>,
    device: &Device,
) -> Result<Box<dyn CausalLm>> {
    load_decoder_with(
        source,
        device,
        &LoadOptions {
            dtype,
            ..LoadOptions::default()
        },
    )
}

/// [`load_decoder`] with the weights kept dense or quantized as `options`
/// say (by default a GGUF file stays quantized).
///
/// # Errors
/// See [`load_decoder`].
pub fn load_decoder_with(
    source: &str,
    device: &Device,
    options: &LoadOptions,
) -> Result<Box<dyn CausalLm>> {
    Ok(load_with_source(source, device, options)?.0)
}

/// A GGUF file's metadata (tokenizer, chat template, …).
pub(crate) type GgufMetadata = HashMap<String, Value>;

/// Where a loaded decoder came from: what its tokenizer is read from.
pub(crate) enum LoadedFrom {
    /// A GGUF file: its metadata holds the tokenizer and chat template.
    Gguf(GgufMetadata),
    /// A directory or Hub repo with `tokenizer.json`.
    Repo(ModelRepo),
}

/// The decoder, and where it came from.
pub(crate) fn load_with_source(
    source: &str,
    device: &Device,
    options: &LoadOptions,
) -> Result<(Box<dyn CausalLm>, LoadedFrom)> {
    let dtype = options
        .dtype
        .unwrap_or_else(|| crate::backend::default_dtype(device));
    let keep_quantized = options.quantization != Quantization::Dense;
    let quantize_to = match options.quantization {
        Quantization::To(f) => Some(f),
        _ => None,
    };
    if let Some(path) = resolve_gguf(source)? {
        let (config, weights, metadata) = load_gguf(&path, dtype, device, keep_quantized)?;
        let model = build_decoder(&config, &weights.quantize_linears(quantize_to))?;
        return Ok((model, LoadedFrom::Gguf(metadata)));
    }
    let repo = ModelRepo::open(source)?;
    let (config, arch) = read_config_with_arch(&repo.get("config.json")?)?;
    let files = ModelLoader::safetensors_files(&repo)?;
    let weights =
        ModelLoader::load_safetensors(&files, dtype, device)?.quantize_linears(quantize_to);
    tracing::info!(
        "loaded {} ({}, {} layers, hidden {}) as {dtype:?}{} on {device:?}",
        repo.describe(),
        config.model_type,
        config.num_hidden_layers,
        config.hidden_size,
        quantize_to
            .map(|f| format!(", linears {f:?}"))
            .unwrap_or_default()
    );
    Ok(((arch.build)(&config, &weights)?, LoadedFrom::Repo(repo)))
}

/// Reads a GGUF decoder: its config from the metadata, its tensors under
/// Hugging Face names, and the metadata (tokenizer, chat template). With
/// `keep_quantized`, linear weights and the embedding table stay in their
/// block format (Candle's quantized matmuls and row lookups run them);
/// everything else is dequantized to `dtype`.
///
/// # Errors
/// Unreadable file, unsupported architecture, missing metadata.
pub(crate) fn load_gguf(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep_quantized: bool,
) -> Result<(DecoderConfig, Weights, GgufMetadata)> {
    load_gguf_from(GgufFile::open(path)?, path, dtype, device, keep_quantized)
}

/// [`load_gguf`] of an opened file (any reader); `path` names it in errors.
pub(crate) fn load_gguf_from<R: std::io::Read + std::io::Seek>(
    mut file: GgufFile<R>,
    path: &Path,
    dtype: DType,
    device: &Device,
    keep_quantized: bool,
) -> Result<(DecoderConfig, Weights, GgufMetadata)> {
    let arch_name = file.architecture()?;
    let arch = by_gguf(&arch_name)?;
    let invalid = |message: String| Error::InvalidConfig {
        origin: path.display().to_string(),
        message,
    };
    let mut config = gguf_config(&file, &arch_name, arch).map_err(invalid)?;
    // llama.cpp stores Llama 3.1's RoPE scaling as per-frequency divisors
    // (`rope_freqs.weight`), not as metadata.
    if file.tensor_dims("rope_freqs.weight").is_some() {
        let divisors = file
            .tensor("rope_freqs.weight", &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        config.rope_scaling = RopeScaling::Divisors(divisors.into_iter().map(f64::from).collect());
        config.validate().map_err(invalid)?;
    }
    let bad = |name: &str, e: candle_core::Error| Error::InvalidCheckpoint {
        path: path.to_path_buf(),
        message: format!("tensor {name}: {}", crate::error::candle_message(e)),
    };
    let mut tensors = HashMap::new();
    let mut quantized = HashMap::new();
    let tied = file.tensor_dims("output.weight").is_none();
    for name in file.tensor_names() {
        let Some(hf) = hf_name(&name) else {
            tracing::debug!("skipping GGUF tensor {name}");
            continue;
        };
        // `tensor` refuses tensors with no dimensions or elements, and
        // sizes that do not fit the file, before reading anything.
        let q = file.tensor(&name, &Device::Cpu)?;
        // llama.cpp permutes llama q/k rows for interleaved RoPE; undo it
        // for our NEOX-style rotary.
        let permuted_heads = (arch.gguf_permuted_qk
            && (hf.contains("q_proj") || hf.contains("k_proj")))
        .then(|| {
            if hf.contains("q_proj") {
                config.num_attention_heads
            } else {
                config.num_key_value_heads
            }
        });
        let q = match permuted_heads {
            Some(heads) => unpermute_rows(&q, heads).map_err(|e| bad(&name, e))?,
            None => q,
        };
        let is_linear = hf.ends_with("_proj.weight") || hf == "lm_head.weight";
        let block_format = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if keep_quantized && is_linear && block_format && q.shape().dims().len() == 2 {
            let q = if device.is_cpu() {
                q
            } else {
                quantized_on(&q, device).map_err(|e| bad(&name, e))?
            };
            quantized.insert(hf, Arc::new(q));
            continue;
        }
        // The embedding table stays quantized too: its rows are
        // dequantized as they are looked up, and a tied output projection
        // multiplies by the same blocks, as llama.cpp does.
        if keep_quantized && hf == "model.embed_tokens.weight" && block_format {
            let on_device = Arc::new(if device.is_cpu() {
                q
            } else {
                quantized_on(&q, device).map_err(|e| bad(&name, e))?
            });
            if tied {
                quantized.insert("lm_head.weight".to_string(), on_device.clone());
            }
            quantized.insert(hf, on_device);
            continue;
        }
        let t = q.dequantize(&Device::Cpu)?;
        tensors.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
    }
    tracing::info!(
        "read {} tensors ({} kept quantized) from {}",
        tensors.len() + quantized.len(),
        quantized.len(),
        path.display()
    );
    let weights = Weights::from_tensors(tensors, dtype, device, &path.display().to_string())
        .with_quantized(quantized);
    Ok((config, weights, file.metadata().clone()))
}

/// `q` (read on the CPU) copied to `device`, still quantized.
fn quantized_on(q: &QTensor, device: &Device) -> candle_core::Result<QTensor> {
    QTensor::new(
        QStorage::from_data(q.data()?, device, q.dtype())?,
        q.shape().clone(),
    )
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows grouped per head as
/// `[head, half, 2]` go back to `[head, 2, half]`. Works on the stored
/// bytes (on the CPU): a row is a whole run of blocks, so quantized values
/// move untouched and a dense file's rows the same way.
fn unpermute_rows(q: &QTensor, heads: usize) -> candle_core::Result<QTensor> {
    let dims = q.shape().dims();
    let Some(&rows) = dims.first() else {
        candle_core::bail!("a q/k projection with no dimensions")
    };
    if heads == 0 || rows % (2 * heads) != 0 {
        candle_core::bail!("{rows} rows do not split into {heads} heads");
    }
    let cols: usize = dims[1..].iter().product();
    let block = q.dtype().block_size();
    if !cols.is_multiple_of(block) {
        candle_core::bail!("{cols} columns are not whole blocks of {block}");
    }
    let data = q.data()?;
    let row_bytes = cols / block * q.dtype().type_size();
    if data.len() != rows * row_bytes {
        candle_core::bail!("{} bytes for {rows} rows of {row_bytes}", data.len());
    }
    let half = rows / heads / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let new = h * 2 * half + j * half + i;
                let old = h * 2 * half + i * 2 + j;
                out[new * row_bytes..(new + 1) * row_bytes]
                    .copy_from_slice(&data[old * row_bytes..(old + 1) * row_bytes]);
            }
        }
    }
    QTensor::new(
        QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, q.dtype())?,
        q.shape().clone(),
    )
}

/// llama.cpp's tensor names → Hugging Face names (shared by every
/// architecture here).
fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The [`DecoderConfig`] a GGUF file's metadata describes.
fn gguf_config<R: std::io::Read + std::io::Seek>(
    file: &GgufFile<R>,
    arch_name: &str,
    arch: &Architecture,
) -> std::result::Result<DecoderConfig, String> {
    let md = file.metadata();
    let get = |k: &str| -> std::result::Result<&Value, String> {
        md.get(&format!("{arch_name}.{k}"))
            .ok_or(format!("missing {arch_name}.{k}"))
    };
    let num = |k: &str| -> std::result::Result<usize, String> {
        let v = get(k)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| format!("{arch_name}.{k}: {}", crate::error::candle_message(e)))
    };
    let float = |k: &str| -> std::result::Result<f64, String> {
        let v = get(k)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|e| format!("{arch_name}.{k}: {}", crate::error::candle_message(e)))
    };
    let embd = file
        .tensor_dims("token_embd.weight")
        .ok_or("missing tensor token_embd.weight")?;
    let vocab_size = *embd.first().ok_or("token_embd.weight has no dimensions")?;
    let hidden = num("embedding_length")?;
    let heads = num("attention.head_count")?;
    if heads == 0 {
        return Err(format!("{arch_name}.attention.head_count must be positive"));
    }
    let layers = num("block_count")?;
    // Checked before the per-layer list below is allocated.
    if layers > MAX_LAYERS {
        return Err(format!(
            "{arch_name}.block_count {layers} is larger than supported ({MAX_LAYERS})"
        ));
    }
    let context = num("context_length")?;
    let rope_scaling = match md
        .get(&format!("{arch_name}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
    {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: float("rope.scaling.factor")?,
        },
        Some("yarn") => {
            let factor = float("rope.scaling.factor")?;
            RopeScaling::Yarn {
                factor,
                original_max: num("rope.scaling.original_context_length")?,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                },
                truncate: true,
            }
        }
        Some(other) => return Err(format!("GGUF RoPE scaling `{other}` is not supported")),
    };
    let window = num("attention.sliding_window").ok();
    let sliding_windows = match arch.windows {
        Windows::Never => vec![None; layers],
        _ => vec![window; layers],
    };
    let cfg = DecoderConfig {
        model_type: arch.model_types[0].to_string(),
        vocab_size,
        hidden_size: hidden,
        intermediate_size: num("feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: num("attention.head_count_kv").unwrap_or(heads),
        head_dim: num("attention.key_length").unwrap_or(hidden / heads),
        max_position_embeddings: context,
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?,
        tie_word_embeddings: file.tensor_dims("output.weight").is_none(),
        attention_bias: file.tensor_dims("blk.0.attn_q.bias").is_some(),
        mlp_bias: file.tensor_dims("blk.0.ffn_up.bias").is_some(),
        qk_norm: arch.qk_norm,
        sliding_windows,
        bos_token_id: md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok()),
        eos_token_ids: md
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            .into_iter()
            .collect(),
    };
    cfg.validate()?;
    Ok(cfg)
}
