//! Semantic search: the top-k texts of a corpus by cosine similarity to a
//! query.
//!
//! ```no_run
//! use metal_candle::embeddings::{EmbeddingModel, EmbeddingModelType, SemanticIndex};
//! # fn main() -> metal_candle::Result<()> {
//! let model = EmbeddingModel::from_pretrained(EmbeddingModelType::AllMiniLmL6V2, &metal_candle::backend::cpu())?;
//! let index = SemanticIndex::build(&model, &["The cat sits on the mat.", "Paris is in France."])?;
//! let hits = index.search(&model, "Where is the kitty?", 1)?;
//! assert_eq!(hits[0].index, 0);
//! # Ok(()) }
//! ```

use candle_core::{DType, Tensor};

use super::model::EmbeddingModel;
use super::pooling::normalize;
use crate::error::{Error, Result};

/// One result: the corpus row and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Row of the corpus.
    pub index: usize,
    /// Cosine similarity in [-1, 1].
    pub score: f32,
}

/// Cosine similarity of two vectors (0 when one of them is zero).
///
/// # Errors
/// [`Error::InvalidInput`] when the lengths differ.
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> Result<f32> {
    if a.len() != b.len() {
        return Err(Error::InvalidInput(format!(
            "vectors differ in length: {} and {}",
            a.len(),
            b.len()
        )));
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += f64::from(x) * f64::from(y);
        na += f64::from(x) * f64::from(x);
        nb += f64::from(y) * f64::from(y);
    }
    let den = (na.sqrt() * nb.sqrt()).max(1e-12);
    Ok((dot / den) as f32)
}

/// The `k` rows of `corpus` (`[n, d]`) most similar to `query` (`[d]` or
/// `[1, d]`) by cosine similarity, best first (fewer when `n < k`).
///
/// # Errors
/// [`Error::InvalidInput`] on mismatched shapes.
pub fn top_k(query: &Tensor, corpus: &Tensor, k: usize) -> Result<Vec<Hit>> {
    let (n, d) = corpus.dims2().map_err(|_| {
        Error::InvalidInput(format!("corpus must be [n, d], got {:?}", corpus.dims()))
    })?;
    let q = query.to_dtype(DType::F32)?.reshape(((), d)).map_err(|_| {
        Error::InvalidInput(format!(
            "query {:?} does not match corpus width {d}",
            query.dims()
        ))
    })?;
    if q.dim(0)? != 1 {
        return Err(Error::InvalidInput("top_k takes one query".into()));
    }
    if n == 0 || k == 0 {
        return Ok(Vec::new());
    }
    let corpus = normalize(&corpus.to_dtype(DType::F32)?.to_device(q.device())?)?;
    let scores = normalize(&q)?
        .matmul(&corpus.t()?)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    Ok(rank(&scores, k))
}

/// The `k` best of `scores`, best first; NaN ranks last.
fn rank(scores: &[f32], k: usize) -> Vec<Hit> {
    let mut hits: Vec<Hit> = scores
        .iter()
        .enumerate()
        .map(|(index, &score)| Hit { index, score })
        .collect();
    hits.sort_by(|a, b| {
        let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
        key(b.score)
            .total_cmp(&key(a.score))
            .then(a.index.cmp(&b.index))
    });
    hits.truncate(k);
    hits
}

/// A corpus embedded once, searched by queries.
#[derive(Debug, Clone)]
pub struct SemanticIndex {
    /// `[n, d]` unit rows, f32.
    embeddings: Tensor,
    texts: Vec<String>,
}

/// A [`Hit`] with its text.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult {
    /// Row of the corpus.
    pub index: usize,
    /// Cosine similarity in [-1, 1].
    pub score: f32,
    /// The corpus text.
    pub text: String,
}

impl SemanticIndex {
    /// Embeds `documents` with [`EmbeddingModel::encode_documents`].
    ///
    /// # Errors
    /// Embedding failures.
    pub fn build(model: &EmbeddingModel, documents: &[&str]) -> Result<Self> {
        let embeddings = normalize(&model.encode_documents(documents)?)?;
        Ok(Self {
            embeddings,
            texts: documents.iter().map(|t| (*t).to_string()).collect(),
        })
    }

    /// Number of documents.
    #[must_use]
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether the index holds no documents.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The `[n, d]` document embeddings (unit rows).
    #[must_use]
    pub fn embeddings(&self) -> &Tensor {
        &self.embeddings
    }

    /// The `k` documents closest to `query`, embedded with
    /// [`EmbeddingModel::encode_queries`], best first.
    ///
    /// # Errors
    /// Embedding failures.
    pub fn search(
        &self,
        model: &EmbeddingModel,
        query: &str,
        k: usize,
    ) -> Result<Vec<SearchResult>> {
        let q = model.encode_queries(&[query])?;
        self.search_embedding(&q, k)
    }

    /// The `k` documents closest to an embedded query (`[d]` or `[1, d]`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] on a width mismatch.
    pub fn search_embedding(&self, query: &Tensor, k: usize) -> Result<Vec<SearchResult>> {
        Ok(top_k(query, &self.embeddings, k)?
            .into_iter()
            .map(|h| SearchResult {
                index: h.index,
                score: h.score,
                text: self.texts[h.index].clone(),
            })
            .collect())
    }
}
