//! Embeds texts with a sentence-transformers model and prints the vectors,
//! or ranks the texts against a query.
//!
//! ```text
//! cargo run --example embeddings_demo -- "A sentence." "Another one."
//! cargo run --example embeddings_demo -- --model e5-small-v2 --file texts.txt --query "cats" --json
//! cargo run --example embeddings_demo -- --model ./my-st-model --device cuda "text"
//! ```
//! `--model` takes a known name (all-minilm-l6-v2, all-minilm-l12-v2,
//! e5-small-v2, e5-base-v2, e5-large-v2, bge-small-en-v1.5, bge-base-en-v1.5,
//! bge-large-en-v1.5, all-mpnet-base-v2), a Hub repo id or a local folder.
//! Set HF_HUB_OFFLINE=1 to use only the Hugging Face cache.

use anyhow::{bail, Context, Result};
use clap::Parser;
use metal_candle::backend;
use metal_candle::embeddings::top_k;
use metal_candle::embeddings::{EmbeddingModel, EmbeddingModelType};

#[derive(Parser)]
#[command(about = "Sentence embeddings equal to sentence-transformers'")]
struct Args {
    /// Known model name, Hub repo id, or local sentence-transformers folder.
    #[arg(long, default_value = "all-minilm-l6-v2")]
    model: String,
    /// Read the texts from this file, one per line.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Rank the texts (as documents) against this query instead of printing vectors.
    #[arg(long)]
    query: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights dtype (f32, f16, bf16); default: f32 on CPU, bf16 on CUDA.
    #[arg(long)]
    dtype: Option<String>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// How many results to show with --query.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Texts to embed (when no --file).
    texts: Vec<String>,
}

fn load(args: &Args) -> Result<EmbeddingModel> {
    let device = backend::parse_device(&args.device)?;
    let known = args.model.parse::<EmbeddingModelType>().ok();
    let source = known.map_or(args.model.clone(), |k| k.repo_id().to_string());
    let repo = metal_candle::io::ModelRepo::open(&source)?;
    let dtype = args
        .dtype
        .as_deref()
        .map(backend::parse_dtype)
        .transpose()?;
    let mut model = EmbeddingModel::load(&repo, dtype, &device)?;
    if let Some(k) = known.or_else(|| EmbeddingModelType::from_repo_id(&source)) {
        model.set_prefixes(k.query_prefix(), k.document_prefix());
    }
    model.set_batch_size(args.batch_size);
    Ok(model)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let texts: Vec<String> = match &args.file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .map(str::to_string)
            .collect(),
        None => args.texts.clone(),
    };
    if texts.is_empty() {
        bail!("no texts: pass them as arguments or with --file");
    }
    let model = load(&args)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();

    if let Some(query) = &args.query {
        let corpus = model.encode_documents(&refs)?;
        let q = model.encode_queries(&[query.as_str()])?;
        let hits = top_k(&q, &corpus, args.top)?;
        if args.json {
            let results: Vec<_> = hits
                .iter()
                .map(|h| serde_json::json!({"index": h.index, "score": h.score, "text": texts[h.index]}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"model": model.source(), "query": query, "results": results})
            );
        } else {
            println!("query: {query}");
            for h in hits {
                println!("{:>8.4}  [{}] {}", h.score, h.index, texts[h.index]);
            }
        }
        return Ok(());
    }

    let vectors = model.encode_to_vecs(&refs)?;
    if args.json {
        let items: Vec<_> = texts
            .iter()
            .zip(&vectors)
            .map(|(t, v)| serde_json::json!({"text": t, "embedding": v}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"model": model.source(), "dim": model.dim(), "embeddings": items})
        );
    } else {
        println!(
            "{} texts, dim {} ({})",
            texts.len(),
            model.dim(),
            model.source()
        );
        for (t, v) in texts.iter().zip(&vectors) {
            let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.4}")).collect();
            println!("[{} ...]  {t}", head.join(", "));
        }
    }
    Ok(())
}
