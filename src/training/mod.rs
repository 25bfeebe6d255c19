//! LoRA fine-tuning.

pub mod loss;

pub use loss::{causal_lm_loss, IGNORE_INDEX};
