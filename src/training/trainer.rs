//! The LoRA training loop: batches, next-token loss, gradient accumulation,
//! clipping, AdamW with a schedule, evaluation, metrics and checkpoints.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::checkpoint::{
    clean_stale_temporaries, list_checkpoints, prune_checkpoints, read_safetensors,
    safetensors_bytes, write_atomic, write_dir_atomic,
};
use super::dataset::{Batch, Dataset};
use super::distributed::ProcessGroup;
use super::interrupt::{ctrl_c_requested, CtrlCGuard, StopHandle};
use super::lora::{LoRAAdapter, LoRAAdapterConfig};
use super::loss::lm_loss;
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
    /// Keep only the newest N checkpoints, deleting older ones after each
    /// save (transformers' `save_total_limit`); `None` keeps all.
    #[serde(default)]
    pub save_total_limit: Option<usize>,
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
    /// Handle Ctrl-C (SIGINT) during [`Trainer::train`]: finish the
    /// current step, write a checkpoint, return `Ok` with
    /// [`TrainingMetrics::stopped_early`]. Off by default, so the library
    /// never takes over an application's signal handling silently; the
    /// handler is installed for the run only and the previous one restored.
    /// A second Ctrl-C terminates as usual. Unix only;
    /// [`Trainer::stop_handle`] works everywhere.
    #[serde(default)]
    pub stop_on_ctrl_c: bool,
    /// Recompute each decoder layer's activations in the backward pass
    /// instead of keeping them (transformers' `gradient_checkpointing`):
    /// much less memory for about a third more compute per step.
    #[serde(default)]
    pub gradient_checkpointing: bool,
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
            save_total_limit: None,
            output_dir: None,
            shuffle: true,
            seed: 42,
            progress: false,
            base_model: None,
            stop_on_ctrl_c: false,
            gradient_checkpointing: false,
        }
    }
}

impl TrainingConfig {
    /// Checks every setting, so a bad one fails before step 1 rather than
    /// as NaN weights later: sizes at least 1, a step count, a finite
    /// positive `max_grad_norm` (a negative one would flip the gradients),
    /// and the schedule and optimizer ([`LRScheduler::validate`],
    /// [`AdamWConfig::validate`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config("training config", m));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if self.grad_accum_steps == 0 {
            return bad("grad_accum_steps must be at least 1".into());
        }
        match self.max_steps {
            Some(0) => return bad("max_steps must be at least 1".into()),
            None if self.epochs == 0 => return bad("set epochs or max_steps".into()),
            _ => {}
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad(format!("max_grad_norm must be finite and > 0, got {n}"));
            }
        }
        for (name, v) in [
            ("eval_every", self.eval_every),
            ("save_every", self.save_every),
            ("save_total_limit", self.save_total_limit),
        ] {
            if v == Some(0) {
                return bad(format!("{name} must be at least 1 (or None)"));
            }
        }
        if self.save_every.is_some() && self.output_dir.is_none() {
            return bad("save_every needs an output_dir".into());
        }
        self.lr_schedule.validate()?;
        self.optimizer.validate()?;
        Ok(())
    }

    /// The settings that shape the trajectory: a resumed run continues the
    /// saved one exactly only when these are equal. `(name, saved, ours)`
    /// for each that differs.
    /// `(saved_world, world)`: the processes of the saved run and of
    /// this one; what must match is the global batch (a run on 2 GPUs x 4
    /// continues one on 1 GPU x 8 exactly).
    fn trajectory_differences(
        &self,
        saved: &TrainingConfig,
        (saved_world, world): (usize, usize),
    ) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                out.push((name.to_string(), a, b));
            }
        };
        let global = |bs: usize, w: usize| {
            let n = bs.saturating_mul(w);
            if w == 1 {
                n.to_string()
            } else {
                format!("{n} ({bs} x {w} processes)")
            }
        };
        let (a, b) = (
            global(saved.batch_size, saved_world),
            global(self.batch_size, world),
        );
        if saved.batch_size.saturating_mul(saved_world) != self.batch_size.saturating_mul(world) {
            cmp("batch_size x processes", a, b);
        }
        cmp(
            "grad_accum_steps",
            saved.grad_accum_steps.to_string(),
            self.grad_accum_steps.to_string(),
        );
        cmp(
            "lr_schedule",
            format!("{:?}", saved.lr_schedule),
            format!("{:?}", self.lr_schedule),
        );
        let (o, p) = (&saved.optimizer, &self.optimizer);
        for (name, a, b) in [
            ("optimizer.beta1", o.beta1, p.beta1),
            ("optimizer.beta2", o.beta2, p.beta2),
            ("optimizer.eps", o.eps, p.eps),
            ("optimizer.weight_decay", o.weight_decay, p.weight_decay),
        ] {
            cmp(name, a.to_string(), b.to_string());
        }
        cmp(
            "max_grad_norm",
            format!("{:?}", saved.max_grad_norm),
            format!("{:?}", self.max_grad_norm),
        );
        cmp(
            "shuffle",
            saved.shuffle.to_string(),
            self.shuffle.to_string(),
        );
        cmp("seed", saved.seed.to_string(), self.seed.to_string());
        out
    }
}

/// What [`Trainer::resume_with`] does when the checkpoint's adapter or
/// training settings differ from the trainer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SettingsCheck {
    /// Refuse, naming the first field that differs (the resumed run would
    /// not continue the saved one exactly).
    #[default]
    Strict,
    /// Resume anyway with the trainer's settings; each difference is
    /// logged (`tracing` warning). Shapes and names must still match.
    AllowChanges,
}

/// Adapter settings that shape the trajectory, `(name, saved, ours)` for
/// each that differs.
fn adapter_differences(
    saved: &LoRAAdapterConfig,
    ours: &LoRAAdapterConfig,
) -> Vec<(String, String, String)> {
    let sorted = |c: &LoRAAdapterConfig| {
        let mut m: Vec<&str> = c.target_modules.iter().map(|m| m.name()).collect();
        m.sort_unstable();
        m.dedup();
        m.join(",")
    };
    let fields = [
        ("rank", saved.rank.to_string(), ours.rank.to_string()),
        ("alpha", saved.alpha.to_string(), ours.alpha.to_string()),
        (
            "dropout",
            saved.dropout.to_string(),
            ours.dropout.to_string(),
        ),
        (
            "use_rslora",
            saved.use_rslora.to_string(),
            ours.use_rslora.to_string(),
        ),
        ("target_modules", sorted(saved), sorted(ours)),
    ];
    fields
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(n, a, b)| (format!("adapter {n}"), a, b))
        .collect()
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
    /// The run stopped before its last step because a stop was requested
    /// ([`Trainer::stop_handle`] or Ctrl-C with
    /// [`TrainingConfig::stop_on_ctrl_c`]); a checkpoint of the last step
    /// was written when there is an output folder.
    #[serde(default)]
    pub stopped_early: bool,
}

fn one() -> usize {
    1
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    /// Processes that trained it (data-parallel); 1 for older checkpoints.
    #[serde(default = "one")]
    world_size: usize,
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
    stop: StopHandle,
    /// Data-parallel: the processes training together.
    group: Option<ProcessGroup>,
}

impl<'a> Trainer<'a> {
    /// Attaches `adapter` to `model`. The adapter shares its weights with
    /// the caller's copy, which sees every update; the model's ops take
    /// their differentiable paths by themselves, since the adapter's
    /// weights track gradients.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field for an invalid training
    /// or adapter setting ([`TrainingConfig::validate`]), or an adapter
    /// that does not fit the model.
    pub fn new(
        model: &'a mut dyn CausalLm,
        adapter: &LoRAAdapter,
        config: TrainingConfig,
    ) -> Result<Self> {
        config.validate()?;
        adapter.config().validate()?;
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
            stop: StopHandle::default(),
            group: None,
        })
    }

    /// Trains data-parallel with the processes of `group`: each step's
    /// batch is `batch_size` examples per process (the global batch is
    /// `batch_size x world_size`, the same examples in the same order as
    /// one process with that batch size would take), gradients and losses
    /// are summed over the processes, every process takes the same
    /// optimizer step, and only rank 0 writes checkpoints, `metrics.jsonl`
    /// and the adapter. Every process starts from rank 0's adapter
    /// weights (sent now). Every rank must run the same training calls
    /// ([`Self::train`], [`Self::evaluate`]) in the same order.
    ///
    /// # Errors
    /// [`Error::Distributed`] when the group fails; tensor errors.
    pub fn set_process_group(&mut self, group: ProcessGroup) -> Result<()> {
        let vars = self.optimizer.vars().to_vec();
        let flat = flatten(
            &vars
                .iter()
                .map(|v| Some(v.as_tensor().clone()))
                .collect::<Vec<_>>(),
            &vars,
        )?;
        let mine = if group.is_main() {
            flat
        } else {
            flat.zeros_like()?
        };
        let theirs = group.all_reduce_sum(&mine)?;
        for (v, t) in vars.iter().zip(unflatten(&theirs, &vars)?) {
            v.set(&t)?;
        }
        self.group = Some(group);
        Ok(())
    }

    /// The process group, when training data-parallel.
    #[must_use]
    pub fn process_group(&self) -> Option<&ProcessGroup> {
        self.group.as_ref()
    }

    fn world(&self) -> usize {
        self.group.as_ref().map_or(1, ProcessGroup::world_size)
    }

    fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, ProcessGroup::rank)
    }

    /// Whether this process writes files (rank 0, or no group).
    fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// A handle that asks [`Self::train`] to stop after the current step
    /// (from another thread, a signal handler of the application's, …). A
    /// request made before `train` is honoured after its first step; it is
    /// consumed when `train` returns.
    #[must_use]
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
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
            self.config
                .epochs
                .saturating_mul(train.num_batches(self.global_batch()))
                .div_ceil(self.config.grad_accum_steps.max(1))
        })
    }

    /// Examples per step over all processes (per micro-batch).
    fn global_batch(&self) -> usize {
        self.config.batch_size.saturating_mul(self.world())
    }

    /// Micro-batch `u` of the endless, per-epoch-shuffled stream: its
    /// epoch, this process's share (`None` when a short last batch leaves
    /// it nothing) and the target tokens of the whole global micro-batch.
    fn micro_batch(&self, train: &Dataset, u: usize) -> Result<(usize, Option<Batch>, usize)> {
        // `train` is not empty (checked by `train`), so nb >= 1.
        let nb = train.num_batches(self.global_batch()).max(1);
        let (epoch, index) = (u / nb, u % nb);
        let idx = train.batch_indices(
            self.global_batch(),
            epoch,
            index,
            self.config.shuffle,
            self.config.seed,
        );
        let targets = train.targets_of(&idx);
        let mine = idx
            .chunks(self.config.batch_size.max(1))
            .nth(self.rank())
            .map(|share| train.collate(share, self.pad_id, self.model.device()))
            .transpose()?;
        Ok((epoch, mine, targets))
    }

    fn batch_loss(&self, b: &Batch) -> Result<(Tensor, usize)> {
        lm_loss(
            &*self.model,
            &b.input_ids,
            Some(&b.attention_mask),
            &b.labels,
        )
    }

    /// Mean next-token loss over `data` (weighted by target tokens), dropout off.
    /// With a process group the batches are shared out among the ranks
    /// (every rank must call it) and every rank gets the whole set's loss.
    ///
    /// # Errors
    /// Tensor errors; [`Error::Distributed`].
    pub fn evaluate(&self, data: &Dataset) -> Result<f64> {
        let was = self.adapter.is_training();
        self.adapter.set_training(false);
        let (mut sum, mut n) = (0f64, 0usize);
        let bs = self.config.batch_size;
        let (rank, world) = (self.rank(), self.world());
        for i in (rank..data.num_batches(bs)).step_by(world) {
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
        if let Some(g) = &self.group {
            let t = Tensor::new(&[sum as f32, n as f32], self.model.device())?;
            let v: Vec<f32> = g.all_reduce_sum(&t)?.to_vec1()?;
            (sum, n) = (f64::from(v[0]), v[1] as usize);
        }
        if n == 0 {
            return Err(Error::Dataset("the eval set has no target tokens".into()));
        }
        Ok(sum / n as f64)
    }

    /// One optimizer step over `grad_accum_steps` micro-batches; with
    /// whether a stop was asked for by now ([`Self::stop_handle`], Ctrl-C;
    /// in a group, on any rank: every rank then stops after this step).
    fn train_step(&mut self, train: &Dataset) -> Result<(StepMetrics, bool)> {
        let t0 = Instant::now();
        let accum = self.config.grad_accum_steps;
        let mut batches = Vec::with_capacity(accum);
        let mut total_targets = 0;
        for j in 0..accum {
            let (epoch, batch, targets) = self.micro_batch(train, self.step * accum + j)?;
            total_targets += targets;
            batches.push((epoch, batch));
        }
        let epoch = batches.first().map_or(0, |(e, _)| *e);
        // Counted over the global batch: the same on every rank.
        if total_targets == 0 {
            return Err(Error::Dataset(
                "a training step has no target tokens".into(),
            ));
        }
        self.adapter.set_training(true);
        self.model
            .set_gradient_checkpointing(self.config.gradient_checkpointing);
        let mut grads: Vec<Option<Tensor>> = vec![None; self.optimizer.vars().len()];
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        let mut phases = StepPhases::default();
        let mut known_norm = None;
        let mut bad_loss = None;
        let rank = self.rank() as u64;
        for (j, (_, b)) in batches.iter().enumerate() {
            let Some(b) = b else { continue };
            tokens += b.num_tokens;
            // Dropout masks depend only on the seed, the micro-batch and the rank.
            let u = (self.step * accum + j) as u64;
            self.adapter.set_dropout_seed(
                self.config.seed
                    ^ u.wrapping_mul(0xD1B5_4A32_D192_ED03)
                    ^ rank.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            if b.num_targets == 0 {
                continue;
            }
            let (loss, k) = self.batch_loss(b)?;
            let launched = t0.elapsed();
            let value = f64::from(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
            // With accumulation the forward times are the first
            // micro-batch's; the backward time covers them all.
            if phases.micro_batches == 0 {
                phases.forward = t0.elapsed();
                phases.forward_launched = launched;
            }
            phases.micro_batches += 1;
            if !value.is_finite() {
                bad_loss = Some(value as f32);
                if self.group.is_none() {
                    break;
                }
                // In a group the other ranks learn of it through the sum
                // below and stop at the same step.
                continue;
            }
            loss_sum += value * k as f64;
            // Token weighting makes accumulated micro-batches (and the
            // ranks' shares) equal one batch.
            let weighted = (loss * (k as f64 / total_targets as f64))?;
            let store = super::backward(&weighted)?;
            for (g, new) in grads.iter_mut().zip(self.optimizer.collect_grads(&store)?) {
                *g = match (g.take(), new) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                };
            }
        }
        phases.backward_launched = t0.elapsed();
        self.adapter.set_training(false);
        self.model.set_gradient_checkpointing(false);
        let stop_local =
            self.stop.is_requested() || (self.config.stop_on_ctrl_c && ctrl_c_requested());
        let mut stop = stop_local;
        if let Some(group) = &self.group {
            // One sum per step: every gradient, then the loss, tokens, stop
            // requests and non-finite losses of all ranks.
            let vars = self.optimizer.vars().to_vec();
            let flat = flatten(&grads, &vars)?;
            let extra = Tensor::new(
                &[
                    loss_sum as f32,
                    tokens as f32,
                    f32::from(u8::from(stop_local)),
                    f32::from(u8::from(bad_loss.is_some())),
                ],
                flat.device(),
            )?;
            let n = flat.dim(0)?;
            let sum = group.all_reduce_sum(&Tensor::cat(&[&flat, &extra], 0)?)?;
            grads = unflatten(&sum.narrow(0, 0, n)?, &vars)?
                .into_iter()
                .map(Some)
                .collect();
            phases.reduced = Some(t0.elapsed());
            // The summed gradients' squared norm comes back with the
            // totals: one host sync, not a reduction per gradient and a
            // second one.
            let norm_sq = sum.narrow(0, 0, n)?.sqr()?.sum_all()?.reshape(1)?;
            let totals: Vec<f32> = Tensor::cat(&[&sum.narrow(0, n, 4)?, &norm_sq], 0)?.to_vec1()?;
            known_norm = Some(f64::from(totals[4]).sqrt());
            loss_sum = f64::from(totals[0]);
            tokens = totals[1] as usize;
            stop = totals[2] > 0.0;
            if totals[3] > 0.0 && bad_loss.is_none() {
                bad_loss = Some(f32::NAN);
            }
        }
        if let Some(loss) = bad_loss {
            return Err(Error::NonFiniteLoss {
                step: self.step + 1,
                loss,
            });
        }
        let grad_norm = match (self.config.max_grad_norm, known_norm) {
            (Some(max), Some(norm)) => {
                super::optimizer::clip_to_norm(&mut grads, norm, max)?;
                norm
            }
            (Some(max), None) => clip_grad_norm(&mut grads, max)?,
            (None, Some(norm)) => norm,
            (None, None) => super::optimizer::global_grad_norm(&grads)?,
        };
        phases.grad_norm = t0.elapsed();
        let lr = self.config.lr_schedule.lr_at(self.step);
        self.optimizer.set_lr(lr);
        // The optimizer applies nothing when an update is not finite, so
        // the adapter (shared with the caller) keeps the last good weights.
        self.optimizer.step_with(&grads).map_err(|e| match e {
            Error::NonFiniteWeights { .. } => Error::NonFiniteWeights {
                step: self.step + 1,
            },
            other => other,
        })?;
        self.step += 1;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        // Host-side times into the step (ms): where a step waits, for
        // `RUST_LOG=metal_candle::training=debug`.
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        tracing::debug!(
            step = self.step,
            micro_batches = phases.micro_batches,
            forward_launched = ms(phases.forward_launched),
            forward = ms(phases.forward),
            backward_launched = ms(phases.backward_launched),
            reduced = phases.reduced.map(ms),
            grad_norm = ms(phases.grad_norm),
            optimizer_launched = secs * 1e3,
            "step phases (ms since the step began)"
        );
        Ok((
            StepMetrics {
                step: self.step,
                epoch,
                loss: loss_sum / total_targets as f64,
                lr,
                grad_norm,
                tokens_per_sec: tokens as f64 / secs,
                eval_loss: None,
            },
            stop,
        ))
    }

    /// Trains until [`Self::total_steps`], evaluating on `eval` every
    /// `eval_every` steps and at the end, saving checkpoints every
    /// `save_every` steps (keeping the newest `save_total_limit`) and the
    /// final adapter (peft format) plus `metrics.jsonl` into `output_dir`.
    ///
    /// Before step 1 every example is checked against the model's context
    /// and what interrupted earlier runs left in `output_dir` (temporary
    /// checkpoint folders) is cleaned up. A stop request ([`Self::stop_handle`],
    /// or Ctrl-C with [`TrainingConfig::stop_on_ctrl_c`]) ends the run after
    /// the current step with a checkpoint and `Ok`.
    ///
    /// # Errors
    /// [`Error::Dataset`] for an empty set or an example longer than the
    /// context; [`Error::NonFiniteLoss`] / [`Error::NonFiniteWeights`] when
    /// training diverges (no non-finite adapter or checkpoint is written,
    /// and the adapter keeps its last finite weights); I/O and tensor errors.
    pub fn train(&mut self, train: &Dataset, eval: Option<&Dataset>) -> Result<TrainingMetrics> {
        self.check_lengths(train, "training")?;
        if let Some(e) = eval {
            self.check_lengths(e, "eval")?;
        }
        let main = self.is_main();
        if let Some(dir) = self.config.output_dir.as_ref().filter(|_| main) {
            clean_stale_temporaries(dir)?;
        }
        let _ctrl_c = if self.config.stop_on_ctrl_c {
            Some(CtrlCGuard::install()?)
        } else {
            None
        };
        self.metrics.stopped_early = false;
        let total = self.total_steps(train);
        let mut metrics_file = match &self.config.output_dir {
            Some(dir) if main => Some(self.open_metrics(dir)?),
            _ => None,
        };
        if self.step == 0 {
            if let Some(e) = eval {
                self.metrics.initial_eval_loss = Some(self.evaluate(e)?);
            }
        }
        let bar = if self.config.progress && main {
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
            let (mut m, asked) = self.train_step(train)?;
            let last = self.step == total;
            if let Some(e) = eval {
                if last
                    || self
                        .config
                        .eval_every
                        .is_some_and(|n| n > 0 && self.step.is_multiple_of(n))
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
            let stop = !last && asked;
            let scheduled = self
                .config
                .save_every
                .is_some_and(|n| n > 0 && self.step.is_multiple_of(n));
            if let Some(dir) = self.config.output_dir.clone().filter(|_| main) {
                if scheduled || stop {
                    self.save_checkpoint(&dir.join(format!("checkpoint-{}", self.step)))?;
                    if let Some(keep) = self.config.save_total_limit {
                        prune_checkpoints(&dir, keep)?;
                    }
                }
            }
            if stop {
                tracing::info!("stop requested: stopped after step {}", self.step);
                self.metrics.stopped_early = true;
                // The request is consumed: the next `train` runs on.
                self.stop.reset();
                bar.finish_and_clear();
                return Ok(self.metrics.clone());
            }
        }
        bar.finish_and_clear();
        // A request that came during the last step has nothing left to stop.
        self.stop.reset();
        if let Some(dir) = self.config.output_dir.as_ref().filter(|_| main) {
            save_peft_adapter(&self.adapter, dir, self.config.base_model.as_deref())?;
        }
        Ok(self.metrics.clone())
    }

    /// Every example must fit the model's context: found here, before step
    /// 1, rather than as a failed forward pass when its batch comes up.
    fn check_lengths(&self, data: &Dataset, which: &str) -> Result<()> {
        if data.is_empty() {
            return Err(Error::Dataset(format!("the {which} set is empty")));
        }
        let limit = self.model.context_length();
        if let Some((i, e)) = data
            .examples()
            .iter()
            .enumerate()
            .find(|(_, e)| e.input_ids.len() > limit)
        {
            return Err(Error::Dataset(format!(
                "{which} example {i} has {} tokens, more than the model's context of {limit}; \
                 lower DatasetConfig::max_len to at most {limit}",
                e.input_ids.len()
            )));
        }
        Ok(())
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
            world_size: self.world(),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
        };
        let json =
            serde_json::to_string_pretty(&state).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let opt = safetensors_bytes(&self.optimizer.state_tensors()?, None)?;
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
    /// step and seed). The checkpoint's adapter and training settings must
    /// equal the trainer's ([`SettingsCheck::Strict`]; see
    /// [`Self::resume_with`]). All or nothing: every file is read and
    /// checked before anything of the trainer changes.
    ///
    /// # Errors
    /// Missing, truncated or malformed files, non-finite values, an adapter
    /// of other layers/shapes, or different settings (naming the field).
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        self.resume_with(dir, SettingsCheck::Strict)
    }

    /// Resumes from the newest `checkpoint-N` in `output_dir` after
    /// removing what interrupted writes left there; `Ok(None)` (nothing
    /// changed) when there is no checkpoint. Checkpoints are written
    /// atomically, so the newest is complete.
    ///
    /// # Errors
    /// See [`Self::resume_from`].
    pub fn resume_from_latest(&mut self, output_dir: &Path) -> Result<Option<usize>> {
        // In a group only rank 0 writes (and cleans) the output folder.
        if self.is_main() {
            clean_stale_temporaries(output_dir)?;
        }
        let Some((_, dir)) = list_checkpoints(output_dir)?.pop() else {
            return Ok(None);
        };
        self.resume_from(&dir)?;
        Ok(Some(self.step))
    }

    /// [`Self::resume_from`] with a choice of what to do when the
    /// checkpoint's settings differ from the trainer's.
    ///
    /// # Errors
    /// See [`Self::resume_from`].
    pub fn resume_with(&mut self, dir: &Path, check: SettingsCheck) -> Result<()> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| Error::InvalidCheckpoint {
                path: state_path.clone(),
                message: e.to_string(),
            })?;
        if state.metrics.steps.len() != state.step {
            return Err(Error::InvalidCheckpoint {
                path: state_path,
                message: format!(
                    "step {} with metrics for {} steps",
                    state.step,
                    state.metrics.steps.len()
                ),
            });
        }
        // Pairs, ranks, target modules and finiteness are checked here.
        let saved = load_peft_adapter(dir, self.model.device())?;
        let mut differences = adapter_differences(saved.config(), self.adapter.config());
        differences.extend(
            self.config
                .trajectory_differences(&state.config, (state.world_size, self.world())),
        );
        for (field, theirs, ours) in &differences {
            match check {
                SettingsCheck::Strict => {
                    return Err(Error::config(
                        format!("resume from {}", dir.display()),
                        format!(
                            "`{field}` is {theirs} in the checkpoint but {ours} in this trainer; \
                             the run would not continue the saved one (use the saved settings, \
                             or resume_with(dir, SettingsCheck::AllowChanges))"
                        ),
                    ))
                }
                SettingsCheck::AllowChanges => tracing::warn!(
                    "resuming from {} with `{field}` changed from {theirs} to {ours}",
                    dir.display()
                ),
            }
        }
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
        let mut updates = Vec::with_capacity(theirs.len());
        for (name, v) in &theirs {
            let mine = ours.get(name).ok_or_else(|| Error::InvalidCheckpoint {
                path: dir.to_path_buf(),
                message: format!("`{name}` is not in the adapter being trained"),
            })?;
            if mine.as_tensor().dims() != v.as_tensor().dims() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: mine.as_tensor().dims().to_vec(),
                    actual: v.as_tensor().dims().to_vec(),
                });
            }
            updates.push((mine.clone(), v.as_tensor().clone()));
        }
        let opt_path = dir.join("optimizer.safetensors");
        let opt = read_safetensors(&opt_path, self.model.device())?;
        let moments = self
            .optimizer
            .check_state(&opt)
            .map_err(|e| Error::InvalidCheckpoint {
                path: opt_path,
                message: e.to_string(),
            })?;
        // Everything is read and checked: apply it.
        for (var, value) in updates {
            var.set(&value)?;
        }
        self.optimizer.set_state(moments, state.step);
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

/// The gradients (or values) of `vars` as one f32 vector, in order; a
/// missing gradient counts as zeros (every rank sends the same length).
fn flatten(values: &[Option<Tensor>], vars: &[candle_core::Var]) -> Result<Tensor> {
    let parts = values
        .iter()
        .zip(vars)
        .map(|(g, v)| {
            let t = match g {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            };
            Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Host times into a step (see the debug event in [`Trainer::train_step`]).
#[derive(Default)]
struct StepPhases {
    /// Micro-batches with targets that ran a forward pass.
    micro_batches: usize,
    /// The first micro-batch's forward: launched, and its loss read back.
    forward_launched: std::time::Duration,
    forward: std::time::Duration,
    backward_launched: std::time::Duration,
    reduced: Option<std::time::Duration>,
    grad_norm: std::time::Duration,
}

/// [`flatten`]'s inverse: one tensor per var, in its shape and dtype.
fn unflatten(flat: &Tensor, vars: &[candle_core::Var]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    vars.iter()
        .map(|v| {
            let t = v.as_tensor();
            let n = t.elem_count();
            let part = flat
                .narrow(0, at, n)?
                .reshape(t.shape())?
                .to_dtype(t.dtype())?;
            at += n;
            Ok(part)
        })
        .collect()
}
