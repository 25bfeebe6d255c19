//! LoRA adapters (Hu et al., 2021) attached to a model's linear layers
//! through the [`LinearAdapter`] hook, initialised and scaled as Hugging
//! Face peft does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layers::LinearAdapter;
use crate::models::CausalLm;

/// A linear layer of the decoder that LoRA can adapt (peft's module names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TargetModule {
    /// Attention query projection.
    #[serde(rename = "q_proj")]
    QProj,
    /// Attention key projection (`[kv_heads * head_dim, hidden]` under GQA).
    #[serde(rename = "k_proj")]
    KProj,
    /// Attention value projection (`[kv_heads * head_dim, hidden]` under GQA).
    #[serde(rename = "v_proj")]
    VProj,
    /// Attention output projection.
    #[serde(rename = "o_proj")]
    OProj,
    /// MLP gate projection.
    #[serde(rename = "gate_proj")]
    GateProj,
    /// MLP up projection.
    #[serde(rename = "up_proj")]
    UpProj,
    /// MLP down projection.
    #[serde(rename = "down_proj")]
    DownProj,
}

impl TargetModule {
    /// All seven modules.
    pub const ALL: [TargetModule; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The peft / transformers module name (`q_proj`, …).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    /// Parses a peft module name.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an unknown name.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                Error::config("LoRA config", format!(
                    "unknown LoRA target module `{name}` (known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                ))
            })
    }

    /// The module a layer path such as `model.layers.3.self_attn.q_proj` ends in.
    fn of_path(path: &str) -> Option<Self> {
        let last = path.rsplit('.').next()?;
        Self::ALL.into_iter().find(|m| m.name() == last)
    }
}

/// LoRA hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoRAAdapterConfig {
    /// Rank `r` of the update `B A`.
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / r`
    /// (`alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Dropout probability on the LoRA input, applied in training mode only.
    pub dropout: f64,
    /// Which linear layers get an adapter.
    pub target_modules: Vec<TargetModule>,
    /// Rank-stabilised scaling `alpha / sqrt(r)` (Kalajdzievski, 2023).
    pub use_rslora: bool,
}

impl Default for LoRAAdapterConfig {
    /// r = 8, alpha = 16, no dropout, the attention q/v projections (peft's
    /// default targets for Qwen2).
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec![TargetModule::QProj, TargetModule::VProj],
            use_rslora: false,
        }
    }
}

impl LoRAAdapterConfig {
    /// The factor the update `B A x` is multiplied by.
    #[must_use]
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field: rank 0, a dropout
    /// outside [0, 1), an alpha that is not finite and positive, or no
    /// target module.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("LoRA config", "rank must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                "LoRA config",
                format!("dropout must be in [0, 1), got {}", self.dropout),
            ));
        }
        // alpha = 0 scales the update by 0: B gets no gradient and the run
        // trains nothing; a negative alpha flips the update's sign.
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::config(
                "LoRA config",
                format!("alpha must be finite and > 0, got {}", self.alpha),
            ));
        }
        if self.target_modules.is_empty() {
            return Err(Error::config(
                "LoRA config",
                "target_modules must name at least one module",
            ));
        }
        Ok(())
    }
}

/// State all layers of one adapter share: training mode and the dropout seed.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    training: AtomicBool,
    dropout_seed: AtomicU64,
}

/// One low-rank update `scale · B A x` for a linear layer.
///
/// `a` is `[r, in]`, `b` is `[out, r]`, both f32 [`Var`]s (trainable); the
/// base weight is not touched.
#[derive(Debug)]
pub struct LoRALayer {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    /// Position in the adapter, to give each layer its own dropout mask.
    index: u64,
    shared: Arc<Shared>,
}

impl LoRALayer {
    /// A layer from given `a` `[r, in]` and `b` `[out, r]` (converted to f32 Vars).
    fn from_tensors(
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        dropout: f32,
        index: u64,
        shared: Arc<Shared>,
    ) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if r != rb {
            return Err(Error::ShapeMismatch {
                name: "lora_B".into(),
                expected: vec![b.dims()[0], r],
                actual: b.dims().to_vec(),
            });
        }
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
            dropout,
            index,
            shared,
        })
    }

    /// Inverted dropout with a mask drawn from (adapter seed, layer index):
    /// reproducible, so a resumed run sees the same masks. On a GPU the
    /// mask is drawn there (the device generator seeded the same way),
    /// not on the host and copied over.
    fn dropout(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.dropout;
        let seed = self.shared.dropout_seed.load(Ordering::Relaxed)
            ^ self.index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let keep = 1.0 / (1.0 - p);
        if !x.device().is_cpu() {
            x.device().set_seed(seed)?;
            let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
            let mask = (u.ge(f64::from(p))?.to_dtype(x.dtype())? * f64::from(keep))?;
            return x.mul(&mask);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
            .collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }

    /// `A` (`[r, in]`).
    #[must_use]
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// `B` (`[out, r]`).
    #[must_use]
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// The scaling factor.
    #[must_use]
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `scale · B A` (`[out, in]`, f32): what merging adds to the base weight.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}

impl LinearAdapter for LoRALayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // A and B stay f32 (the trained weights, like peft's); the matmuls
        // run in the input's dtype, as peft's do under autocast (bf16
        // training in transformers' Trainer): on a bf16 model that is two
        // tensor-core matmuls instead of f32 ones around an f32 copy of the
        // input (measured on an H200: a third of the LoRA step's adapter
        // time). 2-D matmuls: a batched matmul against broadcast A/B is
        // slower and, under autograd, keeps batch-sized copies of them. The
        // scale goes on the rank-r intermediate, not the output.
        let dims = x.dims().to_vec();
        let Some((&features, lead)) = dims.split_last() else {
            candle_core::bail!("LoRA input must have at least 1 dim");
        };
        let rows: usize = lead.iter().product();
        let dtype = x.dtype();
        let mut h = x.reshape((rows, features))?;
        if self.dropout > 0.0 && self.shared.training.load(Ordering::Relaxed) {
            h = self.dropout(&h)?;
        }
        let a = self.a.as_tensor().to_dtype(dtype)?;
        let b = self.b.as_tensor().to_dtype(dtype)?;
        let h = (h.matmul(&a.t()?)? * self.scale)?.matmul(&b.t()?)?;
        let mut out = lead.to_vec();
        out.push(h.dim(1)?);
        h.reshape(out)
    }

    fn parameters(&self) -> Vec<Tensor> {
        vec![self.a.as_tensor().clone(), self.b.as_tensor().clone()]
    }

    fn low_rank(&self) -> Option<crate::layers::LowRank> {
        // A dropout mask makes the update depend on more than x, A and B.
        if self.dropout > 0.0 && self.shared.training.load(Ordering::Relaxed) {
            return None;
        }
        Some(crate::layers::LowRank {
            a: self.a.as_tensor().clone(),
            b: self.b.as_tensor().clone(),
            scale: self.scale,
        })
    }
}

/// LoRA layers for every targeted linear layer of a model.
#[derive(Debug, Clone)]
pub struct LoRAAdapter {
    config: LoRAAdapterConfig,
    /// `(layer path such as model.layers.0.self_attn.q_proj, layer)`, in model order.
    layers: Vec<(String, Arc<LoRALayer>)>,
    shared: Arc<Shared>,
}

impl LoRAAdapter {
    /// Fresh adapters for `model`'s targeted layers, initialised like peft:
    /// `A` kaiming-uniform (`a = sqrt(5)`, i.e. uniform in
    /// `±1/sqrt(in_features)`), `B` zeros, so the model is unchanged until
    /// trained. Shapes come from each base layer, so GQA's narrower k/v
    /// projections get matching adapters. `seed` makes `A` reproducible.
    ///
    /// # Errors
    /// Invalid config, or the model has none of the target modules.
    pub fn new(
        config: LoRAAdapterConfig,
        model: &dyn CausalLm,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let shared = Arc::new(Shared::default());
        let mut layers = Vec::new();
        for (path, lin) in model.linear_layers() {
            let Some(m) = TargetModule::of_path(&path) else {
                continue;
            };
            if !config.target_modules.contains(&m) {
                continue;
            }
            let (fan_in, out) = (lin.in_features(), lin.out_features());
            // kaiming_uniform_(a=sqrt(5)): gain = sqrt(2 / (1 + 5)),
            // bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
            let bound = 1.0 / (fan_in as f32).sqrt();
            let a: Vec<f32> = (0..config.rank * fan_in)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, (config.rank, fan_in), device)?;
            let b = Tensor::zeros((out, config.rank), DType::F32, device)?;
            let layer = LoRALayer::from_tensors(
                &a,
                &b,
                config.scale(),
                config.dropout as f32,
                layers.len() as u64,
                shared.clone(),
            )?;
            layers.push((path, Arc::new(layer)));
        }
        if layers.is_empty() {
            return Err(Error::config(
                "LoRA config",
                "the model has none of the LoRA target modules",
            ));
        }
        Ok(Self {
            config,
            layers,
            shared,
        })
    }

    /// An adapter from existing layers (e.g. read from a checkpoint).
    pub(crate) fn from_layers(
        config: LoRAAdapterConfig,
        layers: Vec<(String, Tensor, Tensor)>,
    ) -> Result<Self> {
        config.validate()?;
        let shared = Arc::new(Shared::default());
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, (path, a, b))| {
                let l = LoRALayer::from_tensors(
                    &a,
                    &b,
                    config.scale(),
                    config.dropout as f32,
                    i as u64,
                    shared.clone(),
                )?;
                Ok((path, Arc::new(l)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            layers,
            shared,
        })
    }

    /// The hyperparameters.
    #[must_use]
    pub fn config(&self) -> &LoRAAdapterConfig {
        &self.config
    }

    /// `(layer path, LoRA layer)` pairs in model order.
    #[must_use]
    pub fn layers(&self) -> &[(String, Arc<LoRALayer>)] {
        &self.layers
    }

    /// Training mode turns dropout on; inference mode (the default) off.
    pub fn set_training(&self, training: bool) {
        self.shared.training.store(training, Ordering::Relaxed);
    }

    /// Whether dropout is active.
    #[must_use]
    pub fn is_training(&self) -> bool {
        self.shared.training.load(Ordering::Relaxed)
    }

    /// Seeds the dropout masks of the next forward passes (the trainer sets
    /// it per micro-batch, so runs and resumed runs draw the same masks).
    pub fn set_dropout_seed(&self, seed: u64) {
        self.shared.dropout_seed.store(seed, Ordering::Relaxed);
    }

    /// Hooks every layer into `model` (replacing any adapter there).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when a layer path is not in the model or its
    /// shape does not match (nothing is attached then).
    pub fn attach(&self, model: &mut dyn CausalLm) -> Result<()> {
        let mut linears = model.linear_layers_mut();
        // Check everything before changing anything.
        for (path, l) in &self.layers {
            let lin = linears
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, lin)| &**lin)
                .ok_or_else(|| {
                    Error::InvalidInput(format!("the model has no linear layer `{path}`"))
                })?;
            let (r, fan_in) = l.a.as_tensor().dims2()?;
            let out = l.b.as_tensor().dims()[0];
            if fan_in != lin.in_features() || out != lin.out_features() {
                return Err(Error::ShapeMismatch {
                    name: path.clone(),
                    expected: vec![lin.out_features(), lin.in_features()],
                    actual: vec![out, fan_in, r],
                });
            }
        }
        for (path, l) in &self.layers {
            if let Some((_, lin)) = linears.iter_mut().find(|(p, _)| p == path) {
                lin.set_adapter(Some(l.clone() as Arc<dyn LinearAdapter>));
            }
        }
        Ok(())
    }

    /// Removes every adapter from `model`'s linear layers.
    pub fn detach(model: &mut dyn CausalLm) {
        for (_, lin) in model.linear_layers_mut() {
            lin.set_adapter(None);
        }
    }

    /// Folds `scale · B A` into the base weights of `model` (in the
    /// weights' dtype) and detaches the adapters: inference then costs
    /// nothing extra. The model must not have this adapter's update merged
    /// already.
    ///
    /// # Errors
    /// A layer path missing from the model, shape or tensor errors.
    pub fn merge_into(&self, model: &mut dyn CausalLm) -> Result<()> {
        let mut linears = model.linear_layers_mut();
        for (path, l) in &self.layers {
            let lin = linears
                .iter_mut()
                .find(|(p, _)| p == path)
                .map(|(_, lin)| lin)
                .ok_or_else(|| {
                    Error::InvalidInput(format!("the model has no linear layer `{path}`"))
                })?;
            lin.add_to_weight(&l.delta_weight()?)?;
            lin.set_adapter(None);
        }
        Ok(())
    }

    /// The trainable tensors (`A` and `B` of every layer).
    #[must_use]
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|(_, l)| [l.a.clone(), l.b.clone()])
            .collect()
    }

    /// `(peft-style name without the base_model prefix, var)`:
    /// `model.layers.0.self_attn.q_proj.lora_A.weight`, ….
    #[must_use]
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|(p, l)| {
                [
                    (format!("{p}.lora_A.weight"), l.a.clone()),
                    (format!("{p}.lora_B.weight"), l.b.clone()),
                ]
            })
            .collect()
    }

    /// Number of trainable parameters.
    #[must_use]
    pub fn num_trainable_params(&self) -> usize {
        self.layers
            .iter()
            .map(|(_, l)| l.a.as_tensor().elem_count() + l.b.as_tensor().elem_count())
            .sum()
    }
}
