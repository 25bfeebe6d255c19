//! GGUF checkpoints (llama.cpp's format) read with Candle's GGUF reader and
//! dequantized into ordinary tensors with Hugging Face names, so they run
//! through the same model code as safetensors checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::hub::ModelRepo;
use super::loader::Weights;
use super::qwen2::Qwen2Config;
use crate::error::{Error, Result};

/// A GGUF model: its config, dequantized weights and metadata (tokenizer,
/// chat template).
pub struct GgufModel {
    /// Config rebuilt from the GGUF metadata.
    pub config: Qwen2Config,
    /// Tensors under Hugging Face names.
    pub weights: Weights,
    /// All metadata key/values.
    pub metadata: HashMap<String, Value>,
}

/// Resolves `source` to a GGUF file when it names one: a local `.gguf` path,
/// `org/repo/file.gguf` (Hub cache or download), or a directory / repo whose
/// only weights file is a single `.gguf`. `Ok(None)` otherwise.
///
/// # Errors
/// Fails when the named file cannot be found.
pub fn resolve_gguf(source: &str) -> Result<Option<PathBuf>> {
    let path = Path::new(source);
    if path.is_file() {
        return Ok(is_gguf(source).then(|| path.to_path_buf()));
    }
    if is_gguf(source) {
        return match source.rsplit_once('/') {
            Some((repo, file)) if !Path::new(repo).is_dir() && repo.contains('/') => {
                ModelRepo::open(repo)?.get(file).map(Some)
            }
            _ => Err(Error::ModelNotFound(format!(
                "GGUF file {source} does not exist"
            ))),
        };
    }
    let repo = ModelRepo::open(source)?;
    if repo.get_optional("config.json")?.is_some() {
        return Ok(None);
    }
    let ggufs: Vec<&String> = repo.list_files()?.iter().filter(|f| is_gguf(f)).collect();
    match ggufs.as_slice() {
        [one] => repo.get(one).map(Some),
        [] => Ok(None),
        many => Err(Error::InvalidInput(format!(
            "{} holds several GGUF files ({}); name one as {source}/FILE.gguf",
            repo.describe(),
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn is_gguf(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".gguf")
}

impl GgufModel {
    /// Reads a `qwen2`- or `llama`-architecture GGUF file, dequantizing
    /// every tensor to `dtype` on `device`.
    ///
    /// # Errors
    /// Unreadable file, unsupported architecture, missing metadata.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let bad = |message: String| Error::InvalidCheckpoint {
            path: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content =
            Content::read(&mut file).map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
        let config = config_from_metadata(&content).map_err(|message| Error::InvalidConfig {
            path: path.to_path_buf(),
            message,
        })?;
        let llama = config.model_type == "llama";
        let mut tensors = HashMap::new();
        for name in content.tensor_infos.keys() {
            let Some(hf) = hf_name(name) else {
                tracing::debug!("skipping GGUF tensor {name}");
                continue;
            };
            let q = content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let mut t = q.dequantize(&Device::Cpu)?;
            // llama.cpp permutes llama q/k rows for interleaved RoPE; undo it
            // for our NEOX-style rotary. (Qwen2 GGUFs are stored unpermuted.)
            if llama && (hf.contains("q_proj") || hf.contains("k_proj")) {
                let heads = if hf.contains("q_proj") {
                    config.num_attention_heads
                } else {
                    config.num_key_value_heads
                };
                t = unpermute_rows(&t, heads)?;
            }
            tensors.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
        }
        tracing::info!("read {} tensors from {}", tensors.len(), path.display());
        Ok(Self {
            config,
            weights: Weights::from_tensors(tensors, dtype, device, &path.display().to_string()),
            metadata: content.metadata,
        })
    }
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows grouped per head as
/// `[head, half, 2]` go back to `[head, 2, half]`.
fn unpermute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

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
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

fn config_from_metadata(c: &Content) -> std::result::Result<Qwen2Config, String> {
    let md = &c.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or("missing general.architecture")?
        .clone();
    if arch != "qwen2" && arch != "llama" {
        return Err(format!(
            "architecture `{arch}` is not supported (qwen2, llama)"
        ));
    }
    let get = |k: &str| -> std::result::Result<&Value, String> {
        md.get(&format!("{arch}.{k}"))
            .ok_or(format!("missing {arch}.{k}"))
    };
    let num = |k: &str| -> std::result::Result<usize, String> {
        let v = get(k)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| format!("{arch}.{k}: {e}"))
    };
    let float = |k: &str| -> std::result::Result<f64, String> {
        let v = get(k)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|e| format!("{arch}.{k}: {e}"))
    };
    let embd = c
        .tensor_infos
        .get("token_embd.weight")
        .ok_or("missing tensor token_embd.weight")?;
    let hidden = num("embedding_length")?;
    let heads = num("attention.head_count")?;
    let eos = md
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok())
        .map(|e| serde_json::json!(e));
    let cfg = Qwen2Config {
        model_type: arch.clone(),
        vocab_size: embd.shape.dims()[0],
        hidden_size: hidden,
        intermediate_size: num("feed_forward_length")?,
        num_hidden_layers: num("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: num("attention.head_count_kv").unwrap_or(heads),
        head_dim: None,
        max_position_embeddings: num("context_length")?,
        rope_theta: Some(float("rope.freq_base").unwrap_or(10_000.0)),
        rope_parameters: None,
        rope_scaling: None,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")?,
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: Some(c.tensor_infos.contains_key("blk.0.attn_q.bias")),
        hidden_act: "silu".into(),
        use_sliding_window: false,
        bos_token_id: md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok()),
        eos_token_id: eos,
    };
    cfg.validate()?;
    Ok(cfg)
}
