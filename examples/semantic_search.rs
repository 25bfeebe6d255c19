//! The semantic-search example of the README: embed a small corpus with
//! all-MiniLM-L6-v2 (or `--model`) and find each query's nearest sentence.
//!
//! ```text
//! HF_HUB_OFFLINE=1 cargo run --example semantic_search -- --query "Who plays music?"
//! ```

use clap::Parser;
use metal_candle::backend::parse_device;
use metal_candle::embeddings::SemanticIndex;
use metal_candle::embeddings::{EmbeddingModel, EmbeddingModelType};

#[derive(Parser)]
#[command(about = "Semantic search over a small built-in corpus (or --corpus FILE)")]
struct Args {
    /// Embedding model: a directory or Hub repo id (default all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<String>,
    /// A file with one document per line instead of the built-in corpus.
    #[arg(long)]
    corpus: Option<std::path::PathBuf>,
    /// Queries (default: four built-in ones).
    #[arg(long)]
    query: Vec<String>,
    /// Results per query.
    #[arg(long, default_value_t = 1)]
    top: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    let model = match &args.model {
        Some(source) => EmbeddingModel::from_pretrained_repo(source, &device)?,
        None => EmbeddingModel::from_pretrained(EmbeddingModelType::AllMiniLmL6V2, &device)?,
    };
    let corpus: Vec<String> = match &args.corpus {
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect(),
        None => [
            "The cat sits outside on the mat.",
            "A man is playing the guitar.",
            "The new movie is awesome and everyone loves it.",
            "Paris is the capital and largest city of France.",
            "Python is a popular programming language for data science.",
            "The stock market fell sharply on Monday.",
        ]
        .map(String::from)
        .to_vec(),
    };
    let docs: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let index = SemanticIndex::build(&model, &docs)?;
    let queries = if args.query.is_empty() {
        [
            "Where is the kitty sitting?",
            "Someone plays an instrument.",
            "Which city is the French capital?",
            "What language do data scientists code in?",
        ]
        .map(String::from)
        .to_vec()
    } else {
        args.query.clone()
    };
    for query in &queries {
        println!("{query}");
        for hit in index.search(&model, query, args.top)? {
            println!("  -> {} (cosine {:.3})", hit.text, hit.score);
        }
    }
    Ok(())
}
