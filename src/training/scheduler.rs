//! Learning-rate schedules, equal to transformers' `get_*_schedule*`
//! `LambdaLR` multipliers times the base learning rate.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A learning-rate schedule; [`LRScheduler::lr_at`] gives the rate for the
/// optimizer step with index `step` (0 for the first), as a `LambdaLR`
/// stepped after every optimizer step does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LRScheduler {
    /// `get_constant_schedule`: always `lr`.
    Constant {
        /// The rate.
        lr: f64,
    },
    /// `get_linear_schedule_with_warmup` with no warmup: `lr` down to 0 at `total_steps`.
    LinearDecay {
        /// Peak rate.
        lr: f64,
        /// Steps until the rate reaches 0.
        total_steps: usize,
    },
    /// `get_cosine_schedule_with_warmup` with no warmup (half a cosine).
    Cosine {
        /// Peak rate.
        lr: f64,
        /// Steps of the half cosine.
        total_steps: usize,
    },
    /// Linear warmup from 0 over `warmup_steps`, then half a cosine to 0
    /// at `total_steps` (`get_cosine_schedule_with_warmup`).
    WarmupCosine {
        /// Peak rate.
        lr: f64,
        /// Warmup steps.
        warmup_steps: usize,
        /// Total steps.
        total_steps: usize,
    },
    /// Linear warmup, then linear decay to 0 at `total_steps`
    /// (`get_linear_schedule_with_warmup`).
    WarmupLinear {
        /// Peak rate.
        lr: f64,
        /// Warmup steps.
        warmup_steps: usize,
        /// Total steps.
        total_steps: usize,
    },
}

impl LRScheduler {
    /// The peak (base) learning rate.
    #[must_use]
    pub fn base_lr(&self) -> f64 {
        match *self {
            Self::Constant { lr }
            | Self::LinearDecay { lr, .. }
            | Self::Cosine { lr, .. }
            | Self::WarmupCosine { lr, .. }
            | Self::WarmupLinear { lr, .. } => lr,
        }
    }

    /// Checks the schedule: a finite, non-negative `lr`, at least one step
    /// for schedules that decay, and warmup no longer than the run.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config("learning-rate schedule", m));
        let lr = self.base_lr();
        // `!(lr >= 0)` also catches NaN, which every comparison lets through.
        if !(lr.is_finite() && lr >= 0.0) {
            return bad(format!("lr must be finite and >= 0, got {lr}"));
        }
        match *self {
            Self::Constant { .. } => {}
            Self::LinearDecay { total_steps, .. } | Self::Cosine { total_steps, .. } => {
                if total_steps == 0 {
                    return bad("total_steps must be at least 1".into());
                }
            }
            Self::WarmupCosine {
                warmup_steps,
                total_steps,
                ..
            }
            | Self::WarmupLinear {
                warmup_steps,
                total_steps,
                ..
            } => {
                if total_steps == 0 {
                    return bad("total_steps must be at least 1".into());
                }
                if warmup_steps > total_steps {
                    return bad(format!(
                        "warmup_steps {warmup_steps} is more than total_steps {total_steps}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based).
    #[must_use]
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr() * self.multiplier(step)
    }

    /// The `LambdaLR` multiplier at `step`.
    #[must_use]
    pub fn multiplier(&self, step: usize) -> f64 {
        let s = step as f64;
        let warmup = |w: usize| s / (w.max(1) as f64);
        match *self {
            Self::Constant { .. } => 1.0,
            Self::LinearDecay { total_steps, .. } => linear(s, 0, total_steps),
            Self::Cosine { total_steps, .. } => cosine(s, 0, total_steps),
            Self::WarmupLinear {
                warmup_steps,
                total_steps,
                ..
            } => {
                if step < warmup_steps {
                    warmup(warmup_steps)
                } else {
                    linear(s, warmup_steps, total_steps)
                }
            }
            Self::WarmupCosine {
                warmup_steps,
                total_steps,
                ..
            } => {
                if step < warmup_steps {
                    warmup(warmup_steps)
                } else {
                    cosine(s, warmup_steps, total_steps)
                }
            }
        }
    }
}

fn linear(s: f64, warmup: usize, total: usize) -> f64 {
    (0f64).max((total as f64 - s) / (total.saturating_sub(warmup).max(1) as f64))
}

/// transformers' cosine with `num_cycles = 0.5`; past `total` it rises
/// again exactly as theirs does.
fn cosine(s: f64, warmup: usize, total: usize) -> f64 {
    let progress = (s - warmup as f64) / (total.saturating_sub(warmup).max(1) as f64);
    (0f64).max(0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos()))
}
