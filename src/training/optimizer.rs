//! AdamW with decoupled weight decay, as `torch.optim.AdamW`, and gradient
//! clipping by global norm, as `torch.nn.utils.clip_grad_norm_`.

use candle_core::{backprop::GradStore, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::backend::kernels::{adamw_update, AdamWStep};
use crate::error::{Error, Result};

/// AdamW hyperparameters. The defaults are torch's: betas (0.9, 0.999),
/// eps 1e-8, weight decay 0.01; lr 1e-3.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate (a scheduler may override it per step).
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator for stability.
    pub eps: f64,
    /// Decoupled weight decay (`p -= lr · wd · p` before the Adam update).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Checks every value: betas in [0, 1), `lr`, `eps` and
    /// `weight_decay` finite and non-negative. NaN fails every check (a NaN
    /// `eps` or `weight_decay` would turn every weight into NaN).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(
                    "optimizer config",
                    format!("AdamW {name} must be in [0, 1), got {v}"),
                ));
            }
        }
        for (name, v) in [
            ("lr", self.lr),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(
                    "optimizer config",
                    format!("AdamW {name} must be finite and >= 0, got {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// Checked optimizer moments, from [`AdamW::check_state`], packed as the
/// optimizer keeps them.
#[derive(Debug)]
pub(crate) struct Moments {
    mv: Vec<Option<Tensor>>,
}

/// AdamW over a fixed list of [`Var`]s, with per-parameter moments.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    vars: Vec<Var>,
    /// First and second moments of each parameter, created on its first
    /// update: `[2, n]`, m over v, flat (the fused update's layout).
    mv: Vec<Option<Tensor>>,
    /// Optimizer steps taken (drives bias correction).
    step: usize,
}

impl AdamW {
    /// An optimizer for `vars`.
    ///
    /// # Errors
    /// See [`AdamWConfig::validate`].
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let n = vars.len();
        Ok(Self {
            config,
            vars,
            mv: vec![None; n],
            step: 0,
        })
    }

    /// The hyperparameters.
    #[must_use]
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Sets the learning rate for the next steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The optimized variables.
    #[must_use]
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One update with `grads[i]` for `vars[i]`; a `None` gradient leaves
    /// that parameter (and its moments) untouched, like torch.
    ///
    /// # Errors
    /// [`Error::NonFiniteWeights`] when the update would make a weight NaN
    /// or infinite (nothing is changed then); wrong number of gradients,
    /// shape or tensor errors.
    pub fn step_with(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::InvalidInput(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.vars.len()
            )));
        }
        let c = self.config;
        let t = i32::try_from(self.step + 1).unwrap_or(i32::MAX);
        let step_size = c.lr / (1.0 - c.beta1.powi(t));
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let fused = AdamWStep {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            decay: (1.0 - c.lr * c.weight_decay) as f32,
            step_size: step_size as f32,
            bc2_sqrt: bc2_sqrt as f32,
        };
        // Compute every update first, apply none until all are finite: a
        // step that overflows (or meets a NaN gradient) leaves the weights
        // and moments as they were. Each update is `[3, n]`: the new
        // parameter (flat) over the new m and v.
        let mut updates = Vec::with_capacity(grads.len());
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let p = self.vars[i].as_tensor();
            let n = p.elem_count();
            let mv = match &self.mv[i] {
                Some(mv) => mv.clone(),
                None => Tensor::zeros((2, n), p.dtype(), p.device())?,
            };
            // One launch for the dozen composed ops of an AdamW update;
            // moments are kept in the parameter's dtype (restored ones are
            // cast to it), as is its gradient.
            let out = adamw_update(p, &g.to_dtype(p.dtype())?, &mv, fused)?;
            updates.push((i, out));
        }
        let new: Vec<&Tensor> = updates.iter().map(|(_, out)| out).collect();
        if !all_finite(&new)? {
            return Err(Error::NonFiniteWeights {
                step: self.step + 1,
            });
        }
        for (i, out) in updates {
            let p = self.vars[i].as_tensor();
            let new_p = out.get(0)?.reshape(p.shape())?;
            self.vars[i].set(&new_p)?;
            self.mv[i] = Some(out.narrow(0, 1, 2)?);
        }
        self.step += 1;
        Ok(())
    }

    /// The moments as named tensors (`{i}.exp_avg`, `{i}.exp_avg_sq`, each
    /// in its parameter's shape) for a checkpoint; the step count is stored
    /// separately.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, mv) in self.mv.iter().enumerate() {
            if let Some(mv) = mv {
                let shape = self.vars[i].as_tensor().shape();
                out.push((format!("{i}.exp_avg"), mv.get(0)?.reshape(shape)?));
                out.push((format!("{i}.exp_avg_sq"), mv.get(1)?.reshape(shape)?));
            }
        }
        Ok(out)
    }

    /// Restores moments saved by [`Self::state_tensors`] and the step count.
    /// Nothing changes unless every tensor is valid.
    ///
    /// # Errors
    /// An unknown name, a shape that differs from its parameter, a missing
    /// partner moment, or non-finite values.
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: usize,
    ) -> Result<()> {
        let moments = self.check_state(tensors)?;
        self.set_state(moments, step);
        Ok(())
    }

    /// Checks moments saved by [`Self::state_tensors`] against the
    /// parameters (names, shapes, finite values, both moments of a
    /// parameter present) without changing anything; [`Self::set_state`]
    /// applies the result.
    ///
    /// # Errors
    /// An unknown name, a shape that differs from its parameter, a missing
    /// partner moment, or non-finite values.
    pub(crate) fn check_state(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<Moments> {
        let mut m = vec![None; self.vars.len()];
        let mut v = vec![None; self.vars.len()];
        for (name, t) in tensors {
            let (idx, kind) = name
                .split_once('.')
                .and_then(|(i, k)| Some((i.parse::<usize>().ok()?, k)))
                .filter(|(i, _)| *i < self.vars.len())
                .ok_or_else(|| {
                    Error::InvalidInput(format!("unknown optimizer state tensor `{name}`"))
                })?;
            if t.dims() != self.vars[idx].as_tensor().dims() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: self.vars[idx].as_tensor().dims().to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
            if !all_finite(&[t])? {
                return Err(Error::InvalidInput(format!(
                    "optimizer state `{name}` holds NaN or infinite values"
                )));
            }
            let var = self.vars[idx].as_tensor();
            let t = t.to_device(var.device())?.to_dtype(var.dtype())?;
            match kind {
                "exp_avg" => m[idx] = Some(t),
                "exp_avg_sq" => v[idx] = Some(t),
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "unknown optimizer state tensor `{name}`"
                    )))
                }
            }
        }
        if let Some(i) = (0..m.len()).find(|&i| m[i].is_some() != v[i].is_some()) {
            return Err(Error::InvalidInput(format!(
                "optimizer state of parameter {i} has only one of exp_avg / exp_avg_sq"
            )));
        }
        let mv = m
            .into_iter()
            .zip(v)
            .map(|pair| match pair {
                (Some(m), Some(v)) => Ok(Some(Tensor::stack(
                    &[m.flatten_all()?, v.flatten_all()?],
                    0,
                )?)),
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(Moments { mv })
    }

    /// Applies moments from [`Self::check_state`] and the step count.
    pub(crate) fn set_state(&mut self, moments: Moments, step: usize) {
        self.mv = moments.mv;
        self.step = step;
    }

    /// The gradients of this optimizer's vars in `grads`, in var order.
    ///
    /// # Errors
    /// `grads` came from Candle's `Tensor::backward`, which misses the
    /// adapter gradients of decoder layers with written backward passes:
    /// use [`crate::training::backward`].
    pub fn collect_grads(&self, grads: &GradStore) -> Result<Vec<Option<Tensor>>> {
        if crate::backend::autograd::deferred_waiting() {
            return Err(Error::InvalidInput(
                "adapter gradients were left out of this gradient store: compute it with \
                 metal_candle::training::backward(&loss), not loss.backward()"
                    .into(),
            ));
        }
        Ok(self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect())
    }
}

impl candle_nn::Optimizer for AdamW {
    type Config = AdamWConfig;

    fn new(vars: Vec<Var>, config: AdamWConfig) -> candle_core::Result<Self> {
        AdamW::new(vars, config).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let g = self
            .collect_grads(grads)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        self.step_with(&g)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// Through [`crate::training::backward`], which also collects the
    /// adapter gradients of layers with written backward passes.
    fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = crate::backend::autograd::backward(loss)?;
        self.step(&grads)
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}

/// Whether every value of `tensors` is finite. One reduction per tensor
/// on its device and one copy of the totals to the host; only when a total
/// overflows (huge but finite values) are the values themselves looked at.
///
/// # Errors
/// Tensor errors.
pub(crate) fn all_finite(tensors: &[&Tensor]) -> Result<bool> {
    if tensors.is_empty() {
        return Ok(true);
    }
    let sums = tensors
        .iter()
        .map(|t| t.to_dtype(candle_core::DType::F32)?.abs()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let totals = Tensor::stack(&sums, 0)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    for (t, total) in tensors.iter().zip(totals) {
        if total.is_finite() {
            continue;
        }
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if !v.iter().all(|x| x.is_finite()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The global L2 norm of all gradients (f32 sums, like torch).
///
/// # Errors
/// Tensor errors.
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    // One sum of squares per gradient on its device, stacked, and one copy
    // of the totals to the host (not one host sync per gradient).
    let sums = grads
        .iter()
        .flatten()
        .map(|g| g.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let total: f64 = Tensor::stack(&sums, 0)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?
        .iter()
        .map(|&s| f64::from(s))
        .sum();
    Ok(total.sqrt())
}

/// Scales `grads` so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`: the factor is
/// `max_norm / (norm + 1e-6)`, applied only when below 1. Returns the norm
/// before clipping.
///
/// # Errors
/// [`Error::InvalidConfig`] for a `max_norm` that is not finite and
/// positive; tensor errors.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    // A negative bound would flip the gradients (gradient ascent), NaN
    // would turn them into NaN.
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::config(
            "gradient clipping",
            format!("max_grad_norm must be finite and > 0, got {max_norm}"),
        ));
    }
    let norm = global_grad_norm(grads)?;
    clip_to_norm(grads, norm, max_norm)?;
    Ok(norm)
}

/// [`clip_grad_norm`]'s scaling for gradients whose global norm `norm` is
/// already known (a data-parallel step reads it with the step's sums);
/// `max_norm` checked by the caller.
pub(crate) fn clip_to_norm(grads: &mut [Option<Tensor>], norm: f64, max_norm: f64) -> Result<()> {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}
