//! Text generation: tokenizer and chat template, KV cache, sampling, stop
//! conditions, streaming and the [`Generator`] that ties them together.

mod chat;
mod decode_graph;
mod generator;
mod language_model;
mod sampling;
mod stop;
mod streaming;
mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use decode_graph::DecodeGraph;
pub use generator::{Generator, GeneratorConfig, TokenStream};
pub use language_model::LanguageModel;
pub use sampling::{Candidates, LogitsProcessor, Sampler, SamplingStrategy};
pub use stop::{FinishReason, StopConditions};
pub use streaming::{GenerationOutput, IncrementalDecoder, TokenEvent};
pub use tokenizer::TextTokenizer;
