//! metal-candle: LoRA fine-tuning, text generation and sentence embeddings
//! in pure Rust, on [Candle](https://github.com/huggingface/candle).
//!
//! - [`models`]: loading (directory, Hugging Face cache, GGUF) and the Qwen2 decoder.
//! - [`inference`]: generation with a KV cache, sampling and streaming.
//! - [`training`]: LoRA adapters, optimizer, datasets and the trainer.
//! - [`embeddings`]: BERT-family and MPNet sentence embeddings.
//! - [`backend`]: devices, dtype policy and custom kernels.

pub mod backend;
pub mod embeddings;
pub mod error;
pub mod inference;
pub mod models;
pub mod training;

pub use backend::Device;
pub use embeddings::{EmbeddingModel, EmbeddingModelType};
pub use error::{Error, Result};
pub use inference::{Generator, GeneratorConfig, SamplingStrategy};
pub use training::{
    LRScheduler, LoRAAdapter, LoRAAdapterConfig, TargetModule, Trainer, TrainingConfig,
};

/// The README's code blocks compile as doctests, so they cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
