//! The semantic-search example of docs/semantic-search.md: embed a small
//! corpus with all-MiniLM-L6-v2 and find each query's nearest sentence.
//!
//! ```text
//! HF_HUB_OFFLINE=1 cargo run --example semantic_search
//! ```

use metal_candle::embeddings::SemanticIndex;
use metal_candle::{backend, EmbeddingModel, EmbeddingModelType};

fn main() -> metal_candle::Result<()> {
    let model =
        EmbeddingModel::from_pretrained(EmbeddingModelType::AllMiniLmL6V2, &backend::cpu())?;
    let corpus = [
        "The cat sits outside on the mat.",
        "A man is playing the guitar.",
        "The new movie is awesome and everyone loves it.",
        "Paris is the capital and largest city of France.",
        "Python is a popular programming language for data science.",
        "The stock market fell sharply on Monday.",
    ];
    let index = SemanticIndex::build(&model, &corpus)?;
    for query in [
        "Where is the kitty sitting?",
        "Someone plays an instrument.",
        "Which city is the French capital?",
        "What language do data scientists code in?",
    ] {
        let best = &index.search(&model, query, 1)?[0];
        println!("{query}\n  -> {} (cosine {:.3})", best.text, best.score);
    }
    Ok(())
}
