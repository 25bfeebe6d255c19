//! Text generation: tokenizer and chat template, KV cache, and (see
//! `generator`) sampling and streaming.

pub mod chat;
pub mod kv_cache;
pub mod language_model;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use kv_cache::KvCache;
pub use language_model::LanguageModel;
pub use tokenizer::TextTokenizer;
