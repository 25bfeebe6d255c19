//! Command-line options shared by the generation examples.
#![allow(dead_code)]

use clap::Args;
use metal_candle::inference::{Generator, GeneratorConfig, SamplingStrategy, TextTokenizer};
use metal_candle::models::CausalLm;

/// The real model the examples default to (fetched by scripts/fetch-models.sh).
pub const DEFAULT_MODEL: &str =
    "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// Model, prompt and sampling options.
#[derive(Debug, Args)]
pub struct GenArgs {
    /// Model: a directory, a Hugging Face repo id, or a GGUF file
    /// (`path/x.gguf` or `org/repo/x.gguf`). Works offline with HF_HUB_OFFLINE=1
    /// once the files are in the Hugging Face cache.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// The prompt (a user message with --chat).
    #[arg(long, default_value = "def fibonacci(n):")]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 (the default) decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens when sampling.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens whose mass reaches p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep tokens at least p times as likely as the best one.
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Repetition penalty (transformers semantics; 1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the sampler (same seed, same text).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this string appears (may repeat).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights dtype: f32, f16 or bf16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// `as-stored` (a GGUF file runs quantized), `dense`, or a format to
    /// quantize a safetensors model to at load (`q8_0`, `q4_k`, …).
    #[arg(long, default_value = "as-stored")]
    pub quantize: String,
}

impl GenArgs {
    /// The generator configuration these options describe.
    pub fn config(&self) -> GeneratorConfig {
        let filters = self.top_k.is_some() || self.top_p.is_some() || self.min_p.is_some();
        if self.temperature == 0.0 && filters {
            tracing::warn!(
                "--top-k/--top-p/--min-p only apply with --temperature > 0; decoding greedily"
            );
        }
        let sampling = if self.temperature == 0.0 {
            SamplingStrategy::Greedy
        } else {
            SamplingStrategy::Combined {
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
            }
        };
        GeneratorConfig {
            max_tokens: self.max_tokens,
            sampling,
            temperature: self.temperature,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_strings: self.stop.clone(),
            ..GeneratorConfig::default()
        }
    }

    /// Loads the model and tokenizer.
    pub fn generator(&self) -> anyhow::Result<Generator> {
        let device = metal_candle::backend::parse_device(&self.device)?;
        let dtype = self
            .dtype
            .as_deref()
            .map(metal_candle::backend::parse_dtype)
            .transpose()?;
        let start = std::time::Instant::now();
        let options = metal_candle::models::LoadOptions {
            dtype,
            quantization: self.quantize.parse()?,
        };
        let lm = metal_candle::inference::LanguageModel::from_pretrained_with(
            &self.model,
            &device,
            &options,
        )?;
        let gen = Generator::new(lm, self.config())?;
        tracing::info!("loaded {} in {:.1?}", self.model, start.elapsed());
        Ok(gen)
    }

    /// Prompt token ids (chat-templated with --chat).
    pub fn prompt_ids(&self, gen: &Generator) -> anyhow::Result<Vec<u32>> {
        Ok(if self.chat {
            gen.encode_chat(&[metal_candle::inference::Message::user(&self.prompt)])?
        } else {
            gen.encode(&self.prompt)?
        })
    }
}

/// Logs to stderr, `RUST_LOG` controls the level (default info).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Greedy continuation of `prompt` (at most `n` tokens) with a borrowed model.
///
/// # Errors
/// Generation failures.
pub fn greedy(
    model: &dyn CausalLm,
    tok: &TextTokenizer,
    prompt: &str,
    n: usize,
) -> metal_candle::Result<String> {
    let config = GeneratorConfig {
        max_tokens: n,
        ..GeneratorConfig::default()
    };
    Ok(Generator::with_model(model, tok.clone(), config)?
        .generate(prompt)?
        .text)
}
