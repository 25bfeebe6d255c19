//! Model architectures and loading.
//!
//! - [`hub`]: where files come from (directory, Hugging Face cache, Hub).
//! - [`loader`]: safetensors reading, inspection, [`Weights`].
//! - [`gguf`]: GGUF checkpoints dequantized into the same models.
//! - [`layers`]: shared transformer parts (linear with adapter hook, norms, RoPE, masks).
//! - [`qwen2`]: the Qwen2/Qwen2.5 (and Llama) decoder.

pub mod gguf;
pub mod hub;
pub mod layers;
pub mod loader;
pub mod qwen2;

pub use hub::ModelRepo;
pub use layers::{LayerNorm, Linear, LinearAdapter, OpsMode};
pub use loader::{CheckpointInfo, ModelLoader, TensorInfo, Weights};
pub use qwen2::{Qwen2Config, Qwen2Model};
