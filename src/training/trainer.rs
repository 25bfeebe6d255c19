//! The LoRA training loop: batches, next-token loss, gradient accumulation,
//! clipping, AdamW with a schedule, evaluation, metrics and checkpoints.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::checkpoint::{read_safetensors, safetensors_bytes, write_atomic, write_dir_atomic};
use super::dataset::{Batch, Dataset};
use super::lora::LoRAAdapter;
use super::loss::shifted_causal_lm_loss;
use super::optimizer::{clip_grad_norm, AdamW, AdamWConfig};
use super::peft::{load_peft_adapter, save_peft_adapter};
use super::scheduler::LRScheduler;
use crate::error::{Error, Result};
use crate::models::CausalLm;

/// Training hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingConfig {
    /// Passes over the training set (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Optimizer steps to take; overrides `epochs`.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (their gradients are summed,
    /// weighted by target tokens, so the step equals one big batch).
    pub grad_accum_steps: usize,
    /// Learning rate per step.
    pub lr_schedule: LRScheduler,
    /// AdamW betas, eps, weight decay (its `lr` is set by the schedule).
    pub optimizer: AdamWConfig,
    /// Clip gradients to this global L2 norm.
    pub max_grad_norm: Option<f64>,
    /// Evaluate every N optimizer steps (and at the end) when an eval set is given.
    pub eval_every: Option<usize>,
    /// Save `output_dir/checkpoint-{step}` every N steps.
    pub save_every: Option<usize>,
    /// Where checkpoints, the final adapter and `metrics.jsonl` go.
    pub output_dir: Option<PathBuf>,
    /// Shuffle the training set each epoch (seeded).
    pub shuffle: bool,
    /// Seed for shuffling.
    pub seed: u64,
    /// Draw a progress bar on the terminal (off by default: the library
    /// prints nothing unless asked).
    pub progress: bool,
    /// Recorded as `base_model_name_or_path` in saved adapters.
    pub base_model: Option<String>,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum_steps: 1,
            lr_schedule: LRScheduler::Constant { lr: 1e-4 },
            optimizer: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            eval_every: None,
            save_every: None,
            output_dir: None,
            shuffle: true,
            seed: 42,
            progress: false,
            base_model: None,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: usize,
    /// Epoch (0-based) of the step's first micro-batch.
    pub epoch: usize,
    /// Mean next-token loss over the step's target tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens processed per second.
    pub tokens_per_sec: f64,
    /// Eval loss, when evaluated after this step.
    pub eval_loss: Option<f64>,
}

/// The result of [`Trainer::train`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingMetrics {
    /// Every step so far (including those before a resume).
    pub steps: Vec<StepMetrics>,
    /// Eval loss before training (when an eval set was given and training started at step 0).
    pub initial_eval_loss: Option<f64>,
    /// Eval loss after the last step.
    pub final_eval_loss: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    config: TrainingConfig,
    metrics: TrainingMetrics,
}

/// Trains a [`LoRAAdapter`] on a model. The base weights are plain tensors
/// and get no gradients; only the adapter's `A`/`B` are updated.
#[derive(Debug)]
pub struct Trainer<'a> {
    model: &'a mut dyn CausalLm,
    adapter: LoRAAdapter,
    config: TrainingConfig,
    optimizer: AdamW,
    step: usize,
    metrics: TrainingMetrics,
    pad_id: u32,
}

impl<'a> Trainer<'a> {
    /// Attaches `adapter` to `model`. The adapter shares its weights with
    /// the caller's copy, which sees every update; the model's ops take
    /// their differentiable paths by themselves, since the adapter's
    /// weights track gradients.
    ///
    /// # Errors
    /// Invalid config, or an adapter that does not fit the model.
    pub fn new(
        model: &'a mut dyn CausalLm,
        adapter: &LoRAAdapter,
        config: TrainingConfig,
    ) -> Result<Self> {
        if config.batch_size == 0 || config.grad_accum_steps == 0 {
            return Err(Error::config(
                "training config",
                "batch size and accumulation steps must be at least 1",
            ));
        }
        if config.max_steps.is_none() && config.epochs == 0 {
            return Err(Error::config("training config", "set epochs or max_steps"));
        }
        adapter.attach(model)?;
        let optimizer = AdamW::new(adapter.trainable_vars(), config.optimizer)?;
        Ok(Self {
            model,
            adapter: adapter.clone(),
            config,
            optimizer,
            step: 0,
            metrics: TrainingMetrics::default(),
            pad_id: 0,
        })
    }

    /// Optimizer steps taken (including those restored by [`Self::resume_from`]).
    #[must_use]
    pub fn step(&self) -> usize {
        self.step
    }

    /// The model being trained.
    #[must_use]
    pub fn model(&self) -> &dyn CausalLm {
        &*self.model
    }

    /// The adapter.
    #[must_use]
    pub fn adapter(&self) -> &LoRAAdapter {
        &self.adapter
    }

    /// The config.
    #[must_use]
    pub fn config(&self) -> &TrainingConfig {
        &self.config
    }

    /// Optimizer steps [`Self::train`] runs to in total for `train`.
    #[must_use]
    pub fn total_steps(&self, train: &Dataset) -> usize {
        self.config.max_steps.unwrap_or_else(|| {
            (self.config.epochs * train.num_batches(self.config.batch_size))
                .div_ceil(self.config.grad_accum_steps)
        })
    }

    /// Micro-batch `u` of the endless, per-epoch-shuffled stream.
    fn micro_batch(&self, train: &Dataset, u: usize) -> Result<(usize, Batch)> {
        let nb = train.num_batches(self.config.batch_size);
        let (epoch, index) = (u / nb, u % nb);
        let idx = train.batch_indices(
            self.config.batch_size,
            epoch,
            index,
            self.config.shuffle,
            self.config.seed,
        );
        Ok((
            epoch,
            train.collate(&idx, self.pad_id, self.model.device())?,
        ))
    }

    fn batch_loss(&self, b: &Batch) -> Result<(Tensor, usize)> {
        let logits = self
            .model
            .forward(&b.input_ids, Some(&b.attention_mask), None)?;
        shifted_causal_lm_loss(&logits, &b.labels)
    }

    /// Mean next-token loss over `data` (weighted by target tokens), dropout off.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn evaluate(&self, data: &Dataset) -> Result<f64> {
        let was = self.adapter.is_training();
        self.adapter.set_training(false);
        let (mut sum, mut n) = (0f64, 0usize);
        let bs = self.config.batch_size;
        for i in 0..data.num_batches(bs) {
            let idx = data.batch_indices(bs, 0, i, false, 0);
            let b = data.collate(&idx, self.pad_id, self.model.device())?;
            if b.num_targets == 0 {
                continue;
            }
            let (loss, k) = self.batch_loss(&b)?;
            sum +=
                f64::from(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?) * k as f64;
            n += k;
        }
        self.adapter.set_training(was);
        if n == 0 {
            return Err(Error::Dataset("the eval set has no target tokens".into()));
        }
        Ok(sum / n as f64)
    }

    /// One optimizer step over `grad_accum_steps` micro-batches.
    fn train_step(&mut self, train: &Dataset) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let accum = self.config.grad_accum_steps;
        let mut batches = Vec::with_capacity(accum);
        for j in 0..accum {
            batches.push(self.micro_batch(train, self.step * accum + j)?);
        }
        let epoch = batches[0].0;
        let total_targets: usize = batches.iter().map(|(_, b)| b.num_targets).sum();
        if total_targets == 0 {
            return Err(Error::Dataset(
                "a training step has no target tokens".into(),
            ));
        }
        self.adapter.set_training(true);
        let mut grads: Vec<Option<Tensor>> = vec![None; self.optimizer.vars().len()];
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        for (j, (_, b)) in batches.iter().enumerate() {
            tokens += b.num_tokens;
            // Dropout masks depend only on the seed and the micro-batch.
            let u = (self.step * accum + j) as u64;
            self.adapter
                .set_dropout_seed(self.config.seed ^ u.wrapping_mul(0xD1B5_4A32_D192_ED03));
            if b.num_targets == 0 {
                continue;
            }
            let (loss, k) = self.batch_loss(b)?;
            let value = f64::from(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
            if !value.is_finite() {
                self.adapter.set_training(false);
                return Err(Error::NonFiniteLoss {
                    step: self.step + 1,
                    loss: value as f32,
                });
            }
            loss_sum += value * k as f64;
            // Token weighting makes accumulated micro-batches equal one batch.
            let weighted = (loss * (k as f64 / total_targets as f64))?;
            let store = weighted.backward()?;
            for (g, new) in grads.iter_mut().zip(self.optimizer.collect_grads(&store)) {
                *g = match (g.take(), new) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                };
            }
        }
        self.adapter.set_training(false);
        let grad_norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => super::optimizer::global_grad_norm(&grads)?,
        };
        let lr = self.config.lr_schedule.lr_at(self.step);
        self.optimizer.set_lr(lr);
        self.optimizer.step_with(&grads)?;
        self.step += 1;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        Ok(StepMetrics {
            step: self.step,
            epoch,
            loss: loss_sum / total_targets as f64,
            lr,
            grad_norm,
            tokens_per_sec: tokens as f64 / secs,
            eval_loss: None,
        })
    }

    /// Trains until [`Self::total_steps`], evaluating on `eval` every
    /// `eval_every` steps and at the end, saving checkpoints every
    /// `save_every` steps and the final adapter (peft format) plus
    /// `metrics.jsonl` into `output_dir`.
    ///
    /// # Errors
    /// [`Error::NonFiniteLoss`] when the loss becomes NaN/inf; I/O and
    /// tensor errors.
    pub fn train(&mut self, train: &Dataset, eval: Option<&Dataset>) -> Result<TrainingMetrics> {
        let total = self.total_steps(train);
        let mut metrics_file = match &self.config.output_dir {
            Some(dir) => Some(self.open_metrics(dir)?),
            None => None,
        };
        if self.step == 0 {
            if let Some(e) = eval {
                self.metrics.initial_eval_loss = Some(self.evaluate(e)?);
            }
        }
        let bar = if self.config.progress {
            indicatif::ProgressBar::new(total as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(self.step as u64);
        while self.step < total {
            let mut m = self.train_step(train)?;
            let last = self.step == total;
            if let Some(e) = eval {
                if last
                    || self
                        .config
                        .eval_every
                        .is_some_and(|n| n > 0 && self.step % n == 0)
                {
                    m.eval_loss = Some(self.evaluate(e)?);
                }
            }
            tracing::debug!(step = m.step, loss = m.loss, lr = m.lr, "train step");
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s{}",
                m.loss,
                m.lr,
                m.tokens_per_sec,
                m.eval_loss
                    .map(|l| format!(" eval {l:.4}"))
                    .unwrap_or_default()
            ));
            bar.inc(1);
            if let Some(f) = metrics_file.as_mut() {
                write_metrics_line(f, &m)?;
            }
            if m.eval_loss.is_some() {
                self.metrics.final_eval_loss = m.eval_loss;
            }
            self.metrics.steps.push(m);
            if let (Some(dir), Some(n)) = (&self.config.output_dir, self.config.save_every) {
                if n > 0 && self.step % n == 0 {
                    let d = dir.join(format!("checkpoint-{}", self.step));
                    self.save_checkpoint(&d)?;
                }
            }
        }
        bar.finish_and_clear();
        if let Some(dir) = &self.config.output_dir {
            save_peft_adapter(&self.adapter, dir, self.config.base_model.as_deref())?;
        }
        Ok(self.metrics.clone())
    }

    /// Rewrites `metrics.jsonl` with the steps so far (a resumed run
    /// continues it) and opens it for appending.
    fn open_metrics(&self, dir: &Path) -> Result<std::fs::File> {
        let path = dir.join("metrics.jsonl");
        let mut text = String::new();
        for m in &self.metrics.steps {
            text.push_str(
                &serde_json::to_string(m).map_err(|e| Error::InvalidInput(e.to_string()))?,
            );
            text.push('\n');
        }
        write_atomic(&path, text.as_bytes())?;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))
    }

    /// Saves the adapter (peft format), the optimizer moments
    /// (`optimizer.safetensors`) and `trainer_state.json` (step, config,
    /// metrics) into `dir`, atomically.
    ///
    /// # Errors
    /// I/O or tensor errors.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let state = TrainerState {
            step: self.step,
            config: self.config.clone(),
            metrics: self.metrics.clone(),
        };
        let json =
            serde_json::to_string_pretty(&state).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let opt = safetensors_bytes(&self.optimizer.state_tensors(), None)?;
        write_dir_atomic(dir, |tmp| {
            save_peft_adapter(&self.adapter, tmp, self.config.base_model.as_deref())?;
            write_atomic(&tmp.join("optimizer.safetensors"), &opt)?;
            write_atomic(&tmp.join("trainer_state.json"), json.as_bytes())
        })?;
        tracing::info!("saved checkpoint {}", dir.display());
        Ok(())
    }

    /// Restores a checkpoint written by [`Self::save_checkpoint`]: adapter
    /// weights, optimizer moments, step and metrics. Training then
    /// continues exactly where it stopped (batches are recomputed from the
    /// step and seed).
    ///
    /// # Errors
    /// Missing or malformed files, or an adapter of other layers/shapes.
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| Error::InvalidCheckpoint {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let saved = load_peft_adapter(dir, self.model.device())?;
        let ours: HashMap<String, candle_core::Var> =
            self.adapter.named_vars().into_iter().collect();
        let theirs = saved.named_vars();
        if theirs.len() != ours.len() {
            return Err(Error::InvalidCheckpoint {
                path: dir.to_path_buf(),
                message: format!(
                    "{} LoRA tensors, the adapter has {}",
                    theirs.len(),
                    ours.len()
                ),
            });
        }
        for (name, v) in &theirs {
            let mine = ours.get(name).ok_or_else(|| Error::InvalidCheckpoint {
                path: dir.to_path_buf(),
                message: format!("`{name}` is not in the adapter being trained"),
            })?;
            mine.set(v.as_tensor())?;
        }
        let opt = read_safetensors(&dir.join("optimizer.safetensors"), self.model.device())?;
        self.optimizer.load_state(&opt, state.step)?;
        self.step = state.step;
        self.metrics = state.metrics;
        tracing::info!("resumed from {} at step {}", dir.display(), self.step);
        Ok(())
    }
}

fn write_metrics_line(f: &mut std::fs::File, m: &StepMetrics) -> Result<()> {
    let line = serde_json::to_string(m).map_err(|e| Error::InvalidInput(e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| Error::io("metrics.jsonl", e))
}
