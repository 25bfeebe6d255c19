//! Model architectures.
//!
//! Decoders: the [`CausalLm`] trait that every job takes, one Llama-family
//! implementation ([`Llama`]: Llama 2/3.x, SmolLM2, Qwen2/2.5, Qwen3,
//! Mistral) whose [`DecoderConfig`] carries what differs between families,
//! and the architecture table that [`load_decoder`] looks `model_type` /
//! GGUF `general.architecture` up in. Encoders: BERT (MiniLM, E5, BGE) and
//! MPNet, built from one shared encoder layer.

mod architectures;
pub(crate) mod bert;
mod config;
mod decoder;
mod encoder;
mod kv_cache;
mod llama;
pub(crate) mod mpnet;

pub(crate) use architectures::load_gguf_from;
pub use architectures::{
    build_decoder, load_decoder, load_decoder_with, parse_decoder_config, read_decoder_config,
    supported_architectures, LoadOptions, Quantization,
};
pub(crate) use architectures::{load_with_source, LoadedFrom};
pub use config::DecoderConfig;
pub use decoder::CausalLm;
pub use kv_cache::{KvCache, StaticCache};
pub use llama::Llama;
pub use mpnet::relative_position_bucket;
