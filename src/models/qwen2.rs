//! The Qwen2 / Qwen2.5 decoder: grouped-query attention with q/k/v biases,
//! rotary position embeddings, RMSNorm and a SwiGLU MLP.
//!
//! Llama-architecture checkpoints (SmolLM2) are the same graph without the
//! q/k/v biases and load into the same model (`attention_bias = false`).
//!
//! One implementation serves inference (with a [`KvCache`], fused kernels)
//! and training ([`OpsMode::Differentiable`], every op has a backward). Every
//! linear layer is a [`Linear`] with an adapter hook, which is where LoRA
//! plugs in.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::hub::ModelRepo;
use super::layers::{
    attention_mask as build_mask, mask_rows, repeat_kv, softmax_last_dim, Linear, OpsMode, RmsNorm,
    RotaryEmbedding,
};
use super::loader::{ModelLoader, Weights};
use crate::error::{Error, Result};
use crate::inference::KvCache;

/// Hyper-parameters of a Qwen2 (or Llama) decoder, as in `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Qwen2Config {
    /// `qwen2` or `llama`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Per-head width; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Longest context (rotary table size).
    pub max_position_embeddings: usize,
    /// RoPE base (older configs: top level; newer: inside `rope_parameters`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers ≥ 5 puts `rope_theta` here.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Must be absent/null or of type `default`: scaled RoPE is not implemented.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// q/k/v biases; absent means "yes" for qwen2 and "no" for llama.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Activation; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Sliding-window attention is not implemented and must be off.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_model_type() -> String {
    "qwen2".into()
}
fn default_act() -> String {
    "silu".into()
}

impl Qwen2Config {
    /// Reads and validates `config.json`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the file and the problem.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::models::loader::read_config(path, Self::validate)
    }

    /// Checks the values are consistent and supported.
    ///
    /// # Errors
    /// A description of the first problem found.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !matches!(self.model_type.as_str(), "qwen2" | "llama") {
            return Err(format!(
                "model_type `{}` is not qwen2 or llama",
                self.model_type
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            ));
        }
        if self.use_sliding_window {
            return Err("use_sliding_window = true is not supported".into());
        }
        let rope_type = |v: &serde_json::Value| {
            v.get("rope_type")
                .or_else(|| v.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default")
                .to_string()
        };
        for v in [&self.rope_scaling, &self.rope_parameters]
            .into_iter()
            .flatten()
        {
            if !v.is_null() && rope_type(v) != "default" {
                return Err(format!("RoPE scaling `{}` is not supported", rope_type(v)));
            }
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta()) {
            return Err("rms_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    /// Per-head width.
    #[must_use]
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE base frequency.
    #[must_use]
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(serde_json::Value::as_f64)
            })
            .unwrap_or(10_000.0)
    }

    /// Whether q/k/v projections have biases.
    #[must_use]
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }

    /// End-of-sequence ids from the config (may be empty).
    #[must_use]
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|n| n as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|n| n as u32))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Random tensors for every weight of a `config` model, under the names
/// [`Qwen2Model::new`] reads: N(0, `std`) matrices and biases, norm weights 1.
/// For benchmarks and tests at real shapes without a checkpoint.
///
/// # Errors
/// Tensor allocation failures.
pub fn random_weights(
    config: &Qwen2Config,
    std: f32,
    dtype: DType,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let (h, i, d) = (
        config.hidden_size,
        config.intermediate_size,
        config.head_dim(),
    );
    let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![config.vocab_size, h],
        ),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !config.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![config.vocab_size, h]));
    }
    for l in 0..config.num_hidden_layers {
        let mut layer = vec![
            ("self_attn.q_proj.weight", vec![nh * d, h]),
            ("self_attn.k_proj.weight", vec![nkv * d, h]),
            ("self_attn.v_proj.weight", vec![nkv * d, h]),
            ("self_attn.o_proj.weight", vec![h, nh * d]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ];
        if config.qkv_bias() {
            layer.push(("self_attn.q_proj.bias", vec![nh * d]));
            layer.push(("self_attn.k_proj.bias", vec![nkv * d]));
            layer.push(("self_attn.v_proj.bias", vec![nkv * d]));
        }
        shapes.extend(
            layer
                .into_iter()
                .map(|(n, s)| (format!("model.layers.{l}.{n}"), s)),
        );
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape, dtype, device)?
            } else {
                Tensor::randn(0f32, std, shape, device)?.to_dtype(dtype)?
            };
            Ok((name, t))
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(cfg: &Qwen2Config, w: &Weights, p: &str) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.qkv_bias();
        Ok(Self {
            q_proj: Linear::load(w, &format!("{p}.q_proj"), h, nh * d, bias)?,
            k_proj: Linear::load(w, &format!("{p}.k_proj"), h, nkv * d, bias)?,
            v_proj: Linear::load(w, &format!("{p}.v_proj"), h, nkv * d, bias)?,
            o_proj: Linear::load(w, &format!("{p}.o_proj"), nh * d, h, false)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut LayerCtx<'_>, layer: usize) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, s, n, self.head_dim))?.transpose(1, 2)
        };
        let q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let q = RotaryEmbedding::apply(&q, ctx.cos, ctx.sin, ctx.mode)?;
        let k = RotaryEmbedding::apply(&k, ctx.cos, ctx.sin, ctx.mode)?;
        let (k, v) = match ctx.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, &k, &v)?,
            None => (k, v.contiguous()?),
        };
        let rep = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(&k, rep)?.contiguous()?;
        let v = repeat_kv(&v, rep)?.contiguous()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Scores and softmax in f32, like transformers' eager attention.
        let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match ctx.mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores, ctx.mode)?.to_dtype(v.dtype())?;
        let out =
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, s, self.num_heads * self.head_dim))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(cfg: &Qwen2Config, w: &Weights, p: &str) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(w, &format!("{p}.gate_proj"), h, i, false)?,
            up_proj: Linear::load(w, &format!("{p}.up_proj"), h, i, false)?,
            down_proj: Linear::load(w, &format!("{p}.down_proj"), i, h, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// Per-forward state every layer reads.
struct LayerCtx<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: Option<&'a Tensor>,
    cache: Option<&'a mut KvCache>,
    mode: OpsMode,
}

/// A Qwen2 (or Llama) causal language model.
#[derive(Debug, Clone)]
pub struct Qwen2Model {
    config: Qwen2Config,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    mode: OpsMode,
}

impl Qwen2Model {
    /// Builds the model from `config` and HF-named weights
    /// (`model.layers.{i}.self_attn.q_proj.weight`, …).
    ///
    /// # Errors
    /// Invalid config, missing tensor or wrong shape.
    pub fn new(config: &Qwen2Config, w: &Weights) -> Result<Self> {
        config.validate().map_err(|message| Error::InvalidConfig {
            path: "config".into(),
            message,
        })?;
        let h = config.hidden_size;
        let eps = config.rms_norm_eps;
        let embed_tokens = w.get("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                self_attn: Attention::load(config, w, &format!("{p}.self_attn"))?,
                mlp: Mlp::load(config, w, &format!("{p}.mlp"))?,
                input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm.weight"), h, eps)?,
                post_attention_layernorm: RmsNorm::load(
                    w,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    eps,
                )?,
            });
        }
        let lm_head = if config.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None)
        } else {
            Linear::new(w.get("lm_head.weight", &[config.vocab_size, h])?, None)
        };
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm::load(w, "model.norm.weight", h, eps)?,
            lm_head,
            rotary: RotaryEmbedding::new(
                config.head_dim(),
                config.max_position_embeddings,
                config.rope_theta(),
                w.device(),
            )?,
            mode: OpsMode::Fused,
        })
    }

    /// Loads a model from a directory, a Hub repo id, or a GGUF file
    /// (`path/to/model.gguf`, or `org/repo/file.gguf` in the Hub cache).
    /// `dtype` defaults to [`crate::backend::default_dtype`].
    ///
    /// # Errors
    /// Missing files, malformed config or checkpoint, wrong shapes.
    pub fn from_pretrained(source: &str, dtype: Option<DType>, device: &Device) -> Result<Self> {
        let dtype = dtype.unwrap_or_else(|| crate::backend::default_dtype(device));
        if let Some(gguf) = super::gguf::resolve_gguf(source)? {
            let g = super::gguf::GgufModel::load(&gguf, dtype, device)?;
            return Self::new(&g.config, &g.weights);
        }
        Self::from_repo(&ModelRepo::open(source)?, dtype, device)
    }

    /// Loads `config.json` and the safetensors weights of `repo` as `dtype`.
    ///
    /// # Errors
    /// Missing files, malformed config or checkpoint, wrong shapes.
    pub fn from_repo(repo: &ModelRepo, dtype: DType, device: &Device) -> Result<Self> {
        let config = Qwen2Config::from_file(&repo.get("config.json")?)?;
        let files = ModelLoader::safetensors_files(repo)?;
        let weights = ModelLoader::load_safetensors(&files, dtype, device)?;
        tracing::info!(
            "loaded {} ({} layers, hidden {}) as {dtype:?} on {device:?}",
            repo.describe(),
            config.num_hidden_layers,
            config.hidden_size
        );
        Self::new(&config, &weights)
    }

    /// The model's config.
    #[must_use]
    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    /// The device the weights live on.
    #[must_use]
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The weights' dtype.
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Number of parameters of the base model (tied weights counted once).
    #[must_use]
    pub fn parameter_count(&self) -> usize {
        // Embeddings, final norm, two norms per layer, then the linear layers.
        let h = self.config.hidden_size;
        let mut n = self.embed_tokens.elem_count() + h + self.layers.len() * 2 * h;
        if !self.config.tie_word_embeddings {
            n += self.lm_head.weight().elem_count();
        }
        for (_, l) in self.linear_layers() {
            n += l.weight().elem_count() + l.bias().map_or(0, Tensor::elem_count);
        }
        n
    }

    /// Selects fused kernels (inference) or differentiable ops (training).
    pub fn set_ops_mode(&mut self, mode: OpsMode) {
        self.mode = mode;
    }

    /// The current [`OpsMode`].
    #[must_use]
    pub fn ops_mode(&self) -> OpsMode {
        self.mode
    }

    /// A fresh KV cache sized for this model's context window.
    #[must_use]
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.num_hidden_layers,
            self.config.max_position_embeddings,
        )
    }

    /// The decoder's linear layers by their checkpoint name
    /// (`model.layers.{i}.self_attn.q_proj`, …), for adapters.
    pub fn linear_layers_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }

    /// Read-only view of [`Qwen2Model::linear_layers_mut`].
    #[must_use]
    pub fn linear_layers(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let (a, m) = (&l.self_attn, &l.mlp);
            for (n, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.push((format!("{p}.{n}"), lin));
            }
        }
        out
    }

    /// Final hidden states `[b, s, hidden]` (after the last norm).
    ///
    /// `input_ids` is `[b, s]` (u32). `attention_mask` (`[b, past + s]`,
    /// 1 = token, 0 = padding) hides padding, left or right; positions then
    /// count only real tokens, as transformers' `generate` does. With a
    /// `cache`, the new tokens attend to the cached ones and are appended.
    ///
    /// # Errors
    /// Wrong input shapes, context length exceeded, tensor errors.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2().map_err(|_| {
            Error::InvalidInput(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if s == 0 {
            return Err(Error::InvalidInput("input_ids is empty".into()));
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        let limit = self.rotary.max_positions();
        if past + s > limit {
            return Err(Error::ContextLengthExceeded {
                requested: past + s,
                limit,
            });
        }
        if let Some(c) = cache.as_ref() {
            c.check_room(s)?;
        }
        let device = self.device();
        let rows = attention_mask.map(mask_rows).transpose()?;
        let positions: Vec<u32> = match &rows {
            Some(rows) => {
                if rows.len() != b || rows.iter().any(|r| r.len() != past + s) {
                    return Err(Error::InvalidInput(format!(
                        "attention_mask must be [{b}, {}], got {:?}",
                        past + s,
                        attention_mask.map(Tensor::dims)
                    )));
                }
                rows.iter()
                    .flat_map(|r| {
                        let mut seen = 0u32;
                        let all: Vec<u32> = r
                            .iter()
                            .map(|&m| {
                                seen += u32::from(m != 0);
                                seen.saturating_sub(1)
                            })
                            .collect();
                        all[past..].to_vec()
                    })
                    .collect()
            }
            None => (0..b)
                .flat_map(|_| (past as u32)..(past + s) as u32)
                .collect(),
        };
        let positions = Tensor::from_vec(positions, (b, s), device)?;
        let (cos, sin) = self.rotary.tables(&positions, self.dtype())?;
        let mask = build_mask(b, s, past, rows.as_deref(), true, device)?;
        let vocab = self.config.vocab_size as u32;
        let max_id = input_ids
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::U32)?
            .to_scalar::<u32>()?;
        if max_id >= vocab {
            return Err(Error::InvalidInput(format!(
                "token id {max_id} is outside the vocabulary ({vocab})"
            )));
        }
        let mut x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, s, self.config.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let mut ctx = LayerCtx {
                cos: &cos,
                sin: &sin,
                mask: mask.as_ref(),
                cache: cache.as_deref_mut(),
                mode: self.mode,
            };
            let h = layer.input_layernorm.forward(&x, self.mode)?;
            x = (x + layer.self_attn.forward(&h, &mut ctx, i)?)?;
            let h = layer.post_attention_layernorm.forward(&x, self.mode)?;
            x = (x + layer.mlp.forward(&h)?)?;
        }
        if let Some(c) = cache {
            c.advance(s);
        }
        Ok(self.norm.forward(&x, self.mode)?)
    }

    /// Projects hidden states to vocabulary logits.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?)
    }

    /// Logits `[b, s, vocab]` for every position; see [`Self::forward_hidden`].
    ///
    /// # Errors
    /// See [`Self::forward_hidden`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask, cache)?;
        self.logits(&h)
    }

    /// Logits `[b, vocab]` of the last position only (what decoding needs).
    ///
    /// # Errors
    /// See [`Self::forward_hidden`].
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask, cache)?;
        let s = h.dim(1)?;
        // cuBLAS needs the row-strided slice made contiguous (the CPU gemm does not).
        self.logits(&h.narrow(1, s - 1, 1)?.squeeze(1)?.contiguous()?)?
            .to_dtype(DType::F32)
            .map_err(Into::into)
    }
}
