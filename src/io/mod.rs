//! Getting model files and tensors: where files come from ([`ModelRepo`]:
//! directory, Hugging Face cache, Hub), safetensors checkpoints
//! ([`ModelLoader`], [`Weights`]) and GGUF files. Knows nothing of any
//! architecture: models decide what the tensors mean.

pub(crate) mod gguf;
pub use gguf::resolve_gguf;
mod hub;
mod loader;
mod tokenizer_json;

pub use hub::ModelRepo;
pub(crate) use loader::{parse_config, parse_safetensors_bytes, read_config};
pub use loader::{CheckpointInfo, ModelLoader, TensorInfo, Weights};
pub(crate) use tokenizer_json::{parse_tokenizer_json, read_tokenizer_json};
