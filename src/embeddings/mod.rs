//! Sentence embeddings equal to sentence-transformers': BERT-family models
//! (all-MiniLM, E5, BGE, any BERT sentence-transformers model) and MPNet
//! (all-mpnet-base-v2), on CPU or GPU.
//!
//! - [`EmbeddingModel`] (loading, tokenization, batching, `encode`,
//!   `encode_queries` / `encode_documents`) and [`EmbeddingModelType`].
//! - [`Pooling`], [`normalize`]: sentence-transformers' Pooling and
//!   Normalize modules.
//! - [`SemanticIndex`], [`top_k`]: search by cosine similarity.
//!
//! The encoders themselves (BERT, MPNet) live in `models`.
//!
//! # Query and document prefixes
//! Some models were trained with prefixes and give their best retrieval
//! results only with them. [`EmbeddingModel::encode`] embeds texts as they
//! are; [`EmbeddingModel::encode_queries`] and
//! [`EmbeddingModel::encode_documents`] prepend the model's prefixes:
//!
//! | model | query prefix | document prefix |
//! | --- | --- | --- |
//! | E5 v2 | `query: ` | `passage: ` |
//! | BGE en v1.5 | `Represent this sentence for searching relevant passages: ` | none |
//! | all-MiniLM, all-mpnet | none | none |
//!
//! Models loaded from a folder or another repo take theirs from the
//! `prompts` of `config_sentence_transformers.json`;
//! [`EmbeddingModel::set_prefixes`] overrides them.

mod model;
mod pooling;
mod search;

pub(crate) use model::fuzz_sentence_transformers_files;
pub use model::{EmbeddingModel, EmbeddingModelType};
pub use pooling::{normalize, Pooling, PoolingMode};
pub use search::{cosine_similarity, top_k, Hit, SemanticIndex};
