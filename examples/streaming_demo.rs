//! Streams generated text to the terminal as it comes, first with a callback,
//! then (with --iterator) with the token iterator.
//!
//! ```text
//! HF_HUB_OFFLINE=1 cargo run --example streaming_demo -- --chat \
//!     --prompt "Say hello in Japanese and add an emoji."
//! ```

mod common;

use std::io::Write;

use clap::Parser;

/// Stream generated text token by token (whole characters only).
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    gen: common::GenArgs,
    /// Use the iterator API instead of the callback.
    #[arg(long)]
    iterator: bool,
    /// Print each token id with its text instead of plain text.
    #[arg(long)]
    show_tokens: bool,
}

fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let cli = Cli::parse();
    let mut gen = cli.gen.generator()?;
    let ids = cli.gen.prompt_ids(&gen)?;
    let show = cli.show_tokens;
    let print = move |e: &metal_candle::inference::TokenEvent| {
        if show {
            println!("{:>4} {:>7} {:?}", e.index, e.token, e.text);
        } else {
            print!("{}", e.text);
            let _ = std::io::stdout().flush();
        }
    };
    let start = std::time::Instant::now();
    let out = if cli.iterator {
        let mut stream = gen.stream_tokens(&ids)?;
        for event in stream.by_ref() {
            print(&event?);
        }
        stream.into_output()?
    } else {
        gen.generate_tokens_stream(&ids, |e| {
            print(e);
            true
        })?
    };
    let secs = start.elapsed().as_secs_f64();
    println!();
    eprintln!(
        "{} tokens in {secs:.2} s ({:.1} tokens/s), finished: {:?}",
        out.tokens.len(),
        out.tokens.len() as f64 / secs,
        out.finish_reason
    );
    Ok(())
}
