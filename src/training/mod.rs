//! LoRA fine-tuning: adapters ([`LoRAAdapter`], found by name in any
//! [`crate::models::CausalLm`]), peft-format files ([`save_peft_adapter`],
//! [`load_peft_adapter`]), [`AdamW`], learning-rate schedules
//! ([`LRScheduler`]), JSONL datasets ([`Dataset`]), the training loop
//! ([`Trainer`]: accumulation, eval, metrics, atomic checkpoints, resume)
//! and an [`AdapterRegistry`]. [`ProcessGroup`] makes the trainer
//! data-parallel over processes (NCCL on GPUs, torchrun's variables).

mod checkpoint;
mod dataset;
mod distributed;
mod interrupt;
mod lora;
mod loss;
mod optimizer;
mod peft;
mod registry;
mod scheduler;
mod trainer;

pub use dataset::{Batch, Dataset, DatasetConfig, Example};
pub use distributed::{GroupConfig, ProcessGroup};
pub use interrupt::StopHandle;
pub use lora::{LoRAAdapter, LoRAAdapterConfig, LoRALayer, TargetModule};
pub use loss::{causal_lm_loss, lm_loss, shifted_causal_lm_loss, IGNORE_INDEX};
pub use optimizer::{clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
pub(crate) use peft::{adapter_from_tensors, parse_peft_config};
pub use peft::{load_peft_adapter, save_peft_adapter};
pub use registry::AdapterRegistry;
pub use scheduler::LRScheduler;
pub use trainer::{SettingsCheck, StepMetrics, Trainer, TrainingConfig, TrainingMetrics};

/// `loss.backward()`, plus the adapter gradients that decoder layers with
/// written backward passes hand over (each layer is one autograd node in
/// training, its adapters' gradients set aside, also when it is
/// recomputed: [`crate::models::CausalLm::set_gradient_checkpointing`]).
/// Call this instead of `loss.backward()`, which would miss them (and
/// which [`AdamW::collect_grads`] then refuses).
///
/// # Errors
/// Tensor errors.
pub fn backward(
    loss: &candle_core::Tensor,
) -> crate::error::Result<candle_core::backprop::GradStore> {
    Ok(crate::backend::autograd::backward(loss)?)
}
