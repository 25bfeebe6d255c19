//! Load a model and print its config and parameter count.
//!
//!     cargo run --release --example load_model -- --model tests/fixtures/qwen2-tiny
//!     cargo run --release --example load_model -- \
//!         --model Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
//!
//! `--model` is a directory, a Hugging Face repo id (resolved through the HF
//! cache; downloaded unless HF_HUB_OFFLINE=1), or a GGUF file.

use anyhow::Result;
use clap::Parser;
use metal_candle::backend::{parse_device, parse_dtype};
use metal_candle::io::resolve_gguf;
use metal_candle::io::{ModelLoader, ModelRepo};
use metal_candle::models::{load_decoder, read_decoder_config};

#[derive(Parser)]
#[command(about = "Load a model and print its config and parameter count")]
struct Args {
    /// Model directory, Hub repo id (org/name), or GGUF file (path or org/repo/file.gguf).
    #[arg(long, default_value = "tests/fixtures/qwen2-tiny")]
    model: String,
    /// Device: cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight dtype (f32, f16, bf16); default: f32 on CPU, bf16 on CUDA.
    #[arg(long)]
    dtype: Option<String>,
    /// Also list every tensor (safetensors checkpoints).
    #[arg(long)]
    tensors: bool,
    /// Only read the headers (safetensors checkpoints): no weights loaded.
    #[arg(long)]
    inspect_only: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    let dtype = args.dtype.as_deref().map(parse_dtype).transpose()?;

    if resolve_gguf(&args.model)?.is_none() {
        let repo = ModelRepo::open(&args.model)?;
        let config = read_decoder_config(&repo.get("config.json")?)?;
        let info = ModelLoader::inspect(&repo)?;
        println!("model: {}", repo.describe());
        println!("config: {config:#?}");
        println!("files: {}", info.files.len());
        println!("tensors: {}", info.tensors.len());
        println!("parameters (from headers): {}", info.parameter_count());
        if args.tensors {
            for t in &info.tensors {
                println!("  {:60} {:5} {:?}", t.name, t.dtype, t.shape);
            }
        }
        if args.inspect_only {
            return Ok(());
        }
    }
    let start = std::time::Instant::now();
    let model = load_decoder(&args.model, dtype, &device)?;
    if resolve_gguf(&args.model)?.is_some() {
        println!("config (from GGUF metadata): {:#?}", model.config());
    }
    println!(
        "loaded in {:.2?} as {:?} on {:?}: {} parameters",
        start.elapsed(),
        model.dtype(),
        model.device(),
        model.parameter_count()
    );
    Ok(())
}
