//! The pieces under the Generator, step by step: tokenize, prefill with
//! `forward_last` into a KV cache, process the logits (penalties,
//! temperature, filters), draw, decode incrementally; then the same through
//! `Generator`, and a batch.
//!
//! ```text
//! HF_HUB_OFFLINE=1 cargo run --example inference_demo -- --max-tokens 16
//! ```

mod common;

use candle_core::Tensor;
use clap::Parser;
use metal_candle::inference::{IncrementalDecoder, Sampler};

/// Show tokenization, KV-cached decoding and sampling step by step.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    gen: common::GenArgs,
    /// How many candidate tokens to print per step.
    #[arg(long, default_value_t = 5)]
    show_top: usize,
}

fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let cli = Cli::parse();
    let mut gen = cli.gen.generator()?;
    let ids = cli.gen.prompt_ids(&gen)?;
    let tok = gen.tokenizer();
    println!("prompt: {:?}", tok.decode(&ids, false)?);
    println!("{} tokens: {ids:?}", ids.len());

    let model = gen.model();
    let device = model.device().clone();
    let mut cache = model.new_cache();
    let config = gen.config().clone();
    let mut sampler = Sampler::new(config.logits_processor(), config.seed.unwrap_or(0));
    let eos = tok.eos_token_ids().to_vec();
    let mut decoder = IncrementalDecoder::new(true);
    let mut tokens = ids.clone();
    let mut text = String::new();

    let start = std::time::Instant::now();
    let mut logits = model.forward_last(
        &Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?,
        None,
        Some(&mut cache),
    )?;
    println!(
        "prefill: {} positions cached in {:.2?}",
        cache.len(),
        start.elapsed()
    );
    let start = std::time::Instant::now();
    for step in 0..config.max_tokens {
        let row = logits.squeeze(0)?;
        // What the processor keeps, most likely first.
        let processed = sampler
            .processor()
            .process(&row, &tokens, &tokens[ids.len()..])?
            .to_vec1::<f32>()?;
        let mut top: Vec<(usize, f32)> = processed
            .iter()
            .copied()
            .enumerate()
            .filter(|x| x.1.is_finite())
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        let next = sampler.sample(&row, &tokens, &tokens[ids.len()..])?;
        tokens.push(next);
        let piece = decoder.push(tok, next)?;
        text.push_str(&piece);
        let shown: Vec<String> = top
            .iter()
            .take(cli.show_top)
            .map(|(t, l)| {
                format!(
                    "{:?}={l:.2}",
                    tok.decode(&[*t as u32], false).unwrap_or_default()
                )
            })
            .collect();
        println!(
            "step {step:>3}: token {next:>6} {:<12} cache {:>4}  candidates {} [{}]",
            format!("{piece:?}"),
            cache.len(),
            top.len(),
            shown.join(", ")
        );
        if eos.contains(&next) {
            break;
        }
        logits = model.forward_last(&Tensor::new(&[[next]], &device)?, None, Some(&mut cache))?;
    }
    text.push_str(&decoder.flush(tok)?);
    let n = tokens.len() - ids.len();
    let secs = start.elapsed().as_secs_f64();
    println!("text: {text:?}");
    println!(
        "{n} tokens in {secs:.2} s ({:.1} tokens/s, including the printing)",
        n as f64 / secs
    );

    // The same through the Generator (same config and seed: same tokens).
    let out = gen.generate_tokens(&ids)?;
    println!(
        "Generator::generate: {:?} ({:?})",
        out.text, out.finish_reason
    );
    let batch = gen.generate_batch(&[cli.gen.prompt.as_str(), "Hello"])?;
    println!("Generator::generate_batch: {batch:?}");
    Ok(())
}
