//! Generates text from a prompt in one call and prints it.
//!
//! ```text
//! HF_HUB_OFFLINE=1 cargo run --example generate_text -- --prompt "def fibonacci(n):"
//! cargo run --example generate_text -- --chat --prompt "Write a haiku about Rust." \
//!     --temperature 0.7 --top-p 0.9 --seed 42
//! ```

mod common;

use clap::Parser;

/// Generate text with a causal language model (greedy by default).
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    gen: common::GenArgs,
}

fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let cli = Cli::parse();
    let mut gen = cli.gen.generator()?;
    let ids = cli.gen.prompt_ids(&gen)?;
    let start = std::time::Instant::now();
    let out = gen.generate_tokens(&ids)?;
    let secs = start.elapsed().as_secs_f64();
    println!("{}", out.text);
    eprintln!(
        "{} prompt tokens, {} generated in {secs:.2} s ({:.1} tokens/s), finished: {:?}",
        out.prompt_tokens,
        out.tokens.len(),
        out.tokens.len() as f64 / secs,
        out.finish_reason
    );
    Ok(())
}
