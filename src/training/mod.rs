//! LoRA fine-tuning: adapters ([`lora`]), peft-format files ([`peft`]),
//! AdamW ([`optimizer`]), learning-rate schedules ([`scheduler`]), JSONL
//! datasets ([`dataset`]), the training loop ([`trainer`]), atomic
//! checkpoints ([`checkpoint`]) and an adapter registry ([`registry`]).

mod checkpoint;
mod dataset;
mod lora;
mod loss;
mod optimizer;
mod peft;
mod registry;
mod scheduler;
mod trainer;

pub use dataset::{Batch, Dataset, DatasetConfig, Example};
pub use lora::{LoRAAdapter, LoRAAdapterConfig, LoRALayer, TargetModule};
pub use loss::{causal_lm_loss, shifted_causal_lm_loss, IGNORE_INDEX};
pub use optimizer::{clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
pub use peft::{load_peft_adapter, save_peft_adapter};
pub use registry::AdapterRegistry;
pub use scheduler::LRScheduler;
pub use trainer::{StepMetrics, Trainer, TrainingConfig, TrainingMetrics};
