//! metal-candle: LoRA fine-tuning, text generation and sentence embeddings
//! in pure Rust, on [Candle](https://github.com/huggingface/candle).
//!
//! The jobs:
//! - [`inference`]: generation with a KV cache, sampling, streaming, chat.
//! - [`training`]: LoRA adapters, optimizer, datasets and the trainer.
//! - [`embeddings`]: sentence embeddings (BERT family, MPNet) and search.
//!
//! What they are built on:
//! - [`models`]: the decoder trait and architectures, the encoders.
//! - [`layers`]: linear (dense or quantized, with the adapter hook), norms,
//!   rotary embeddings, attention.
//! - [`io`]: model files (directory, Hugging Face cache, Hub), safetensors
//!   and GGUF.
//! - [`backend`]: devices, dtype policy and our own kernels.
//!
//! Every fallible function returns [`Result`] with the one [`Error`] type.

pub mod backend;
pub mod embeddings;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod inference;
pub mod io;
pub mod layers;
pub mod models;
pub mod training;

pub use error::{Error, Result};

/// The README's code blocks compile as doctests, so they cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// So do the guides' in docs/.
#[doc = include_str!("../docs/semantic-search.md")]
#[cfg(doctest)]
pub struct SemanticSearchDoctests;
