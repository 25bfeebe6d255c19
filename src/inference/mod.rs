//! Text generation: tokenizer and chat template, KV cache, sampling, stop
//! conditions, streaming and the [`Generator`] that ties them together.

pub mod chat;
pub mod generator;
pub mod kv_cache;
pub mod language_model;
pub mod sampling;
pub mod stop;
pub mod streaming;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use generator::{CausalLm, GenerationOutput, Generator, GeneratorConfig};
pub use kv_cache::KvCache;
pub use language_model::LanguageModel;
pub use sampling::{Candidates, LogitsProcessor, Sampler, SamplingStrategy};
pub use stop::{FinishReason, StopConditions};
pub use streaming::{IncrementalDecoder, TokenEvent, TokenStream};
pub use tokenizer::TextTokenizer;
