//! Our side of the side-by-side benchmark (scripts/bench.sh runs it and
//! scripts/peers.py on the same machine in one go, then prints one table).
//!
//! Weights are random with the real models' shapes (same shapes as the
//! peer's). Each row: warm-up runs excluded, the device synchronized before
//! every clock read, the median of `--repeats` runs. Output: one JSON object
//! per row on stdout.
//!
//!     cargo run --release --example bench_compare -- --device cpu --suite generation --quick
//!
//! `--gguf FILE` (repeatable) times a real GGUF file instead, loaded as
//! stored (quantized): prefill of `--prompts` tokens and greedy decoding of
//! `--new-tokens` tokens at batch 1, the shapes of llama-bench's ppN / tgN
//! (scripts/peers/bench-llama-cpp.sh runs both back to back). CPU threads:
//! `RAYON_NUM_THREADS` (Candle's CPU kernels run on rayon's pool).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use metal_candle::backend::{parse_device, parse_dtype, synchronize};
use metal_candle::io::Weights;
use metal_candle::models::{build_decoder, CausalLm, DecoderConfig};

#[path = "common/random_model.rs"]
mod random_model;

#[derive(Parser)]
#[command(about = "metal-candle's side of the benchmark table (JSON lines on stdout)")]
struct Args {
    /// cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Which rows: generation, latency, kernels, lora, embeddings, quantized, all;
    /// embeddings-corpus (encode of `--texts`, not in all); or a profile:
    /// lora-profile, decode-profile, prefill-profile, embeddings-profile
    /// (`--embed-names`' first model, shape `--profile-shape`); lora-dp
    /// (data-parallel, under examples/launch.rs).
    #[arg(long, default_value = "all")]
    suite: String,
    /// Timed repeats per row (median reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Smaller shapes and fewer tokens (for a CPU smoke run).
    #[arg(long)]
    quick: bool,
    /// dtype for the generation rows (default bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// New tokens per decode row (default 256; 16 with --quick).
    #[arg(long)]
    new_tokens: Option<usize>,
    /// Prompt lengths of the prefill rows (default 128,1024; 32 with --quick).
    #[arg(long, value_delimiter = ',')]
    prompts: Option<Vec<usize>>,
    /// Decode rows as BATCHxPROMPT (default 1x32,8x32).
    #[arg(long, value_delimiter = ',')]
    decode: Option<Vec<String>>,
    /// Random-weight embedding models written by `scripts/peers.py --prepare-only`
    /// (both sides load the same files).
    #[arg(long, default_value = ".dev/bench-models")]
    embed_models: String,
    /// Comma-separated embedding models (default: all of EMBED_MODELS).
    #[arg(long)]
    embed_names: Option<String>,
    /// The embeddings-corpus suite's texts (scripts/make_bench_inputs.py).
    #[arg(long, default_value = ".dev/bench-texts.jsonl")]
    texts: String,
    /// The embeddings-profile shape, BATCHxSEQ.
    #[arg(long, default_value = "512x128")]
    profile_shape: String,
    /// Only the first N rows of the LoRA suite (e.g. 1 with many repeats).
    #[arg(long)]
    lora_rows: Option<usize>,
    /// Only these rows of the LoRA suite, by index (0-based, comma-separated).
    #[arg(long, value_delimiter = ',')]
    lora_only: Vec<usize>,
    /// The `lora-dp` and `lora-profile` suites' shape: 0.5B (b8 x 512 per
    /// process) or 1.5B (b4 x 1024 per process), as the LoRA rows.
    #[arg(long, default_value = "0.5B")]
    dp_model: String,
    /// LoRA rows: also time each row with the decoder layers differentiated
    /// op by op (Candle's autograd) instead of their written backward.
    #[arg(long)]
    composed_backward: bool,
    /// Time these GGUF files (quantized as stored) instead of a suite:
    /// prefill of `--prompts` (default 128) and decode of `--new-tokens`
    /// (default 128) from an empty cache, batch 1. With `--suite
    /// quantized`: these files instead of the random Q4_0/Q8_0 ones, against
    /// stock Candle's quantized Qwen2 (Qwen2 files only).
    #[arg(long)]
    gguf: Vec<String>,
}

/// scripts/peers.py's EMBED_MODELS: BGE and E5 are BERT at the base and
/// large shapes (CLS and mean pooling, read from the folders).
const EMBED_MODELS: [&str; 6] = [
    "all-MiniLM-L6-v2",
    "all-mpnet-base-v2",
    "bge-base-en-v1.5",
    "bge-large-en-v1.5",
    "e5-base-v2",
    "e5-large-v2",
];

/// The models with encode and single-query latency rows (and the corpus
/// rows), with their real `max_seq_length`; the others have forward+pool
/// rows only.
const FULL_ROWS: [(&str, usize); 2] = [("all-MiniLM-L6-v2", 256), ("all-mpnet-base-v2", 384)];

/// The corpus rows' models with the real models' `max_seq_length` (BGE and
/// E5: 512).
const CORPUS_MAX_SEQ: [(&str, usize); 6] = [
    FULL_ROWS[0],
    FULL_ROWS[1],
    ("bge-base-en-v1.5", 512),
    ("bge-large-en-v1.5", 512),
    ("e5-base-v2", 512),
    ("e5-large-v2", 512),
];

/// The embedding models `--embed-names` picks (default: all).
fn embed_names(args: &Args) -> Result<Vec<&'static str>> {
    let Some(list) = &args.embed_names else {
        return Ok(EMBED_MODELS.to_vec());
    };
    list.split(',')
        .map(|n| {
            EMBED_MODELS
                .iter()
                .find(|m| **m == n)
                .copied()
                .ok_or_else(|| {
                    anyhow::anyhow!("unknown --embed-names `{n}` (known: {EMBED_MODELS:?})")
                })
        })
        .collect()
}

/// The same texts as scripts/peers.py's TEXTS.
const TEXTS: [&str; 8] = [
    "The quick brown fox jumps over the lazy dog.",
    "Retrieval-augmented generation grounds answers in documents.",
    "Rust gives memory safety without a garbage collector, and Candle brings tensors to it.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Sentence embeddings map text to vectors so that similar meanings land close together.",
    "A short one.",
    "GPU kernels must be synchronized before a clock is read, or the numbers mean nothing.",
    "Mean pooling averages token vectors where the attention mask is one.",
];

fn bench_embeddings(args: &Args, device: &Device) -> Result<()> {
    use metal_candle::embeddings::{normalize, EmbeddingModel};
    use metal_candle::io::ModelRepo;
    let dtypes: &[DType] = if device.is_cuda() {
        &[DType::F32, DType::BF16]
    } else {
        &[DType::F32]
    };
    let shapes: &[(usize, usize)] = if args.quick {
        &[(1, 128), (32, 128)]
    } else {
        &[(1, 128), (32, 128), (512, 128), (128, 512)]
    };
    let peer = stock_device(device)?;
    for name in embed_names(args)? {
        let dir = std::path::Path::new(&args.embed_models).join(name);
        if !dir.join("model.safetensors").exists() {
            anyhow::bail!(
                "{} missing: run scripts/peers.py --prepare-only first",
                dir.display()
            );
        }
        for &dtype in dtypes {
            let model = EmbeddingModel::load(&ModelRepo::from_dir(&dir), Some(dtype), device)?;
            // Stock candle-transformers BERT on the same file (it has no MPNet).
            let stock_bert = if name.contains("MiniLM") {
                let cfg: candle_transformers::models::bert::Config =
                    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
                // SAFETY: read-only mapping of a file nobody modifies meanwhile.
                let vb = unsafe {
                    candle_nn::VarBuilder::from_mmaped_safetensors(
                        &[dir.join("model.safetensors")],
                        dtype,
                        &peer,
                    )?
                };
                Some(candle_transformers::models::bert::BertModel::load(
                    vb, &cfg,
                )?)
            } else {
                None
            };
            for &(b, s) in shapes {
                if !device.is_cuda() && b * s > 32 * 128 {
                    continue;
                }
                let first = if name.contains("mpnet") { 0 } else { 101 };
                let mut v: Vec<u32> = (0..b * s)
                    .map(|k| ((k as u64 * 2_654_435_761) % 2600) as u32)
                    .collect();
                for row in 0..b {
                    v[row * s] = first;
                }
                let ids = Tensor::from_vec(v, (b, s), device)?;
                let mask = Tensor::ones((b, s), DType::U32, device)?;
                let rows = vec![vec![1u32; s]; b];
                let secs = time(device, args.repeats, || {
                    let tokens = model.forward_tokens(&ids, &mask)?;
                    normalize(&model.pooling().pool(&tokens, &rows)?)?;
                    Ok(())
                })?;
                let row = format!("{name} forward+pool");
                emit(
                    "embeddings",
                    &row,
                    &format!("b{b} s{s}"),
                    dtype,
                    b as f64 / secs,
                    "docs/s",
                );
                if let Some(bert) = &stock_bert {
                    let (ids, mask) = (ids.to_device(&peer)?, mask.to_device(&peer)?);
                    let types = ids.zeros_like()?;
                    let secs = time(&peer, args.repeats, || {
                        let h = bert.forward(&ids, &types, Some(&mask))?;
                        let m = mask.to_dtype(h.dtype())?.unsqueeze(2)?;
                        let e = (h.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?))?
                            .to_dtype(DType::F32)?;
                        e.broadcast_div(&e.sqr()?.sum_keepdim(1)?.sqrt()?)?;
                        Ok(())
                    })?;
                    let shape = format!("b{b} s{s}");
                    emit_as(
                        STOCK,
                        "embeddings",
                        &row,
                        &shape,
                        dtype,
                        b as f64 / secs,
                        "docs/s",
                    );
                }
            }
            if !FULL_ROWS.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let texts: Vec<&str> = TEXTS.iter().cycle().take(512).copied().collect();
            let secs = time(device, args.repeats, || {
                model.encode(&texts)?;
                Ok(())
            })?;
            let row = format!("{name} encode (tokenize+embed)");
            emit(
                "embeddings",
                &row,
                "512 texts b32",
                dtype,
                texts.len() as f64 / secs,
                "docs/s",
            );
            // A search query at a time, as a user's request would:
            // tokenize, embed, the vector back on the host.
            let queries = if args.quick { 50 } else { 500 };
            model.encode_to_vecs(&TEXTS[..1])?;
            let mut each: Vec<f64> = TEXTS
                .iter()
                .cycle()
                .take(queries)
                .map(|q| {
                    let start = Instant::now();
                    model.encode_to_vecs(&[q])?;
                    Ok(start.elapsed().as_secs_f64())
                })
                .collect::<Result<_>>()?;
            each.sort_by(f64::total_cmp);
            let pct = |q: f64| each[((each.len() - 1) as f64 * q).round() as usize] * 1e3;
            let shape = format!("{queries} queries, one at a time");
            for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
                let row = format!("{name} single-query encode latency {label}");
                emit("embeddings", &row, &shape, dtype, pct(q), "ms");
            }
        }
    }
    Ok(())
}

/// scripts/peers.py's CORPUS_BATCHES.
const CORPUS_BATCHES: [usize; 3] = [32, 128, 512];

/// `EmbeddingModel::encode` of the real-text set (`--texts`, written by
/// scripts/make_bench_inputs.py) with the real models' `max_seq_length`,
/// the vectors on the host, for each dtype and batch size; then the best
/// batch per dtype (as scripts/peers.py times `SentenceTransformer.encode`).
fn bench_embeddings_corpus(args: &Args, device: &Device) -> Result<()> {
    use metal_candle::embeddings::EmbeddingModel;
    use metal_candle::io::ModelRepo;
    let texts: Vec<String> = std::fs::read_to_string(&args.texts)
        .map_err(|e| anyhow::anyhow!("{}: {e} (run scripts/make_bench_inputs.py)", args.texts))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let dtypes: Vec<DType> = match &args.dtype {
        Some(d) => vec![parse_dtype(d)?],
        None if device.is_cuda() => vec![DType::F32, DType::F16, DType::BF16],
        None => vec![DType::F32],
    };
    let batches = if args.quick {
        &CORPUS_BATCHES[..1]
    } else {
        &CORPUS_BATCHES[..]
    };
    for name in embed_names(args)? {
        let Some(&(_, max_seq)) = CORPUS_MAX_SEQ.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let dir = std::path::Path::new(&args.embed_models).join(name);
        for (n, &dtype) in dtypes.iter().enumerate() {
            let mut model = EmbeddingModel::load(&ModelRepo::from_dir(&dir), Some(dtype), device)?;
            model.set_max_seq_length(max_seq)?;
            if n == 0 {
                // What `encode` spends on the host before any embedding
                // (overlapped with the device's work on a GPU).
                let secs = time(device, args.repeats, || {
                    model.tokenize(&texts)?;
                    Ok(())
                })?;
                let row = format!("{name} tokenize {} real texts (no embedding)", texts.len());
                emit(
                    "embeddings",
                    &row,
                    "all at once",
                    dtype,
                    texts.len() as f64 / secs,
                    "docs/s",
                );
            }
            // The default (packed batches where the packed attention kernel
            // runs: CUDA, every encoder here), and padded batches as an A/B
            // on a GPU.
            let modes: &[Option<bool>] = if device.is_cuda() {
                &[None, Some(false)]
            } else {
                &[None]
            };
            for &packed in modes {
                model.set_packed_batches(packed);
                let n = texts.len();
                let row = match packed {
                    None => format!("{name} encode {n} real texts"),
                    Some(false) => format!("{name} encode {n} real texts, padded batches (A/B)"),
                    Some(true) => format!("{name} encode {n} real texts, packed batches (A/B)"),
                };
                let mut best = 0f64;
                for &bs in batches {
                    model.set_batch_size(bs);
                    let secs = time(device, args.repeats, || {
                        model.encode_to_vecs(&texts)?;
                        Ok(())
                    })?;
                    let rate = texts.len() as f64 / secs;
                    best = best.max(rate);
                    emit("embeddings", &row, &format!("b{bs}"), dtype, rate, "docs/s");
                }
                emit("embeddings", &row, "best batch", dtype, best, "docs/s");
            }
        }
    }
    Ok(())
}

const STOCK: &str = "candle-transformers (stock Candle)";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` once to warm up, then `repeats` times; median seconds.
fn time(device: &Device, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    synchronize(device)?;
    let mut t = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        synchronize(device)?;
        let start = Instant::now();
        f()?;
        synchronize(device)?;
        t.push(start.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// Decode steps after a prefill as the Generator takes them: replaying a
/// captured CUDA graph over a static cache on CUDA (`DecodeGraph`), else
/// eagerly with the growing KV cache.
enum Steps {
    Eager(metal_candle::models::KvCache),
    Graph(metal_candle::inference::DecodeGraph),
}

impl Steps {
    /// Prefills `prompt` (`[b, s]`) and returns its last logits and the
    /// steps after it (room for `capacity` positions in all).
    fn start(model: &dyn CausalLm, prompt: &Tensor, capacity: usize) -> Result<(Tensor, Self)> {
        let mut cache = model.new_cache();
        let logits = model.forward_last(prompt, None, Some(&mut cache))?;
        let steps = match metal_candle::inference::DecodeGraph::new(model, &cache, capacity)? {
            Some(g) => Steps::Graph(g),
            None => Steps::Eager(cache),
        };
        Ok((logits, steps))
    }

    /// Prefills `prompt` and takes `steps` greedy steps after its first
    /// token (ids back to the host each step, as a generation needs them).
    fn greedy(
        model: &dyn CausalLm,
        prompt: &Tensor,
        capacity: usize,
        steps: usize,
    ) -> Result<Self> {
        let (logits, mut state) = Self::start(model, prompt, capacity)?;
        let mut ids: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        for _ in 0..steps {
            ids = state.step(model, &ids)?.argmax(1)?.to_vec1()?;
        }
        Ok(state)
    }

    /// Logits `[b, vocab]` after one token per row.
    fn step(&mut self, model: &dyn CausalLm, ids: &[u32]) -> Result<Tensor> {
        Ok(match self {
            Steps::Eager(cache) => {
                let input = Tensor::new(ids, model.device())?.unsqueeze(1)?;
                model.forward_last(&input, None, Some(cache))?
            }
            Steps::Graph(g) => g.step(model, ids)?,
        })
    }
}

fn emit(job: &str, row: &str, shape: &str, dtype: DType, value: f64, unit: &str) {
    emit_as("metal-candle", job, row, shape, dtype, value, unit);
}

/// A row measured for another Rust implementation (stock Candle ops or
/// candle-transformers models) in the same run.
fn emit_as(imp: &str, job: &str, row: &str, shape: &str, dtype: DType, value: f64, unit: &str) {
    println!(
        "{}",
        serde_json::json!({"impl": imp, "job": job, "row": row, "shape": shape,
            "dtype": format!("{dtype:?}").to_lowercase(), "value": value, "unit": unit})
    );
}

/// Qwen2.5-0.5B's shape (tied embeddings).
fn qwen05b_config(quick: bool) -> DecoderConfig {
    qwen05b_layers(if quick { 4 } else { 24 })
}

/// Qwen2.5-0.5B's shape with `layers` decoder layers.
fn qwen05b_layers(layers: usize) -> DecoderConfig {
    metal_candle::models::parse_decoder_config(
        &serde_json::json!({
            "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": layers, "num_attention_heads": 14, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true,
        })
        .to_string(),
        "benchmark config",
    )
    .expect("static config")
}

/// Random N(0, 0.02) weights (norms 1) for every tensor `config` needs.
fn random_qwen2_tensors(
    config: &DecoderConfig,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    Ok(random_model::random_weights(config, 0.02, dtype, device)?)
}

/// candle-transformers' Qwen2 on the same weights: the stock-Candle peer.
fn candle_transformers_qwen2(
    cfg: &DecoderConfig,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<candle_transformers::models::qwen2::ModelForCausalLM> {
    use candle_transformers::models::qwen2::{Config, ModelForCausalLM};
    let c = Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        max_position_embeddings: cfg.max_position_embeddings,
        sliding_window: cfg.max_position_embeddings,
        max_window_layers: cfg.num_hidden_layers,
        tie_word_embeddings: cfg.tie_word_embeddings,
        rope_theta: cfg.rope_theta,
        rms_norm_eps: cfg.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, device);
    Ok(ModelForCausalLM::new(&c, vb)?)
}

/// The device the stock-Candle peers run on: the same GPU opened again, as
/// a Candle user opens it, so our [`metal_candle::backend::prepare_device`]
/// settings on `device` (no per-tensor CUDA events) do not speed the peer
/// up. (The memory pool setting is the driver's, per GPU: shared.)
fn stock_device(device: &Device) -> Result<Device> {
    Ok(match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Device::new_cuda(gpu_id)?,
        _ => device.clone(),
    })
}

/// The Qwen2.5-0.5B shape (4 layers with `--quick`) with random weights in
/// the device's default dtype: the model the latency and profile rows run.
fn random_qwen05b(args: &Args, device: &Device) -> Result<(DecoderConfig, Box<dyn CausalLm>)> {
    let dtype = metal_candle::backend::default_dtype(device);
    let cfg = qwen05b_config(args.quick);
    let tensors = random_qwen2_tensors(&cfg, dtype, device)?;
    let model = build_decoder(
        &cfg,
        &Weights::from_tensors(tensors, dtype, device, "random"),
    )?;
    Ok((cfg, model))
}

fn random_ids(b: usize, s: usize, vocab: usize, device: &Device) -> Result<Tensor> {
    let ids: Vec<u32> = (0..b * s)
        .map(|k| ((k as u64 * 2_654_435_761) % vocab as u64) as u32)
        .collect();
    Ok(Tensor::from_vec(ids, (b, s), device)?)
}

fn bench_generation(args: &Args, device: &Device) -> Result<()> {
    let dtype = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None => metal_candle::backend::default_dtype(device),
    };
    let cfg = qwen05b_config(args.quick);
    let tensors = random_qwen2_tensors(&cfg, dtype, device)?;
    let model = build_decoder(
        &cfg,
        &Weights::from_tensors(tensors.clone(), dtype, device, "random"),
    )?;
    let peer = stock_device(device)?;
    let mut stock = candle_transformers_qwen2(&cfg, tensors, dtype, &peer)?;
    let prompts = args.prompts.clone().unwrap_or_else(|| {
        if args.quick {
            vec![32]
        } else {
            vec![128, 1024]
        }
    });
    for &p in &prompts {
        let ids = random_ids(1, p, cfg.vocab_size, device)?;
        let secs = time(device, args.repeats, || {
            let mut cache = model.new_cache();
            model.forward_last(&ids, None, Some(&mut cache))?;
            Ok(())
        })?;
        let shape = format!("b1 prompt{p}");
        emit(
            "generation",
            "prefill",
            &shape,
            dtype,
            p as f64 / secs,
            "tok/s",
        );
        let ids = ids.to_device(&peer)?;
        let secs = time(&peer, args.repeats, || {
            stock.clear_kv_cache();
            stock.forward(&ids, 0)?;
            Ok(())
        })?;
        emit_as(
            STOCK,
            "generation",
            "prefill",
            &shape,
            dtype,
            p as f64 / secs,
            "tok/s",
        );
    }
    let new_tokens = args.new_tokens.unwrap_or(if args.quick { 16 } else { 256 });
    let shapes: Vec<(usize, usize)> = match &args.decode {
        None => vec![(1, 32), (8, 32)],
        Some(list) => list
            .iter()
            .map(|x| {
                let (b, p) = x
                    .split_once('x')
                    .ok_or_else(|| anyhow::anyhow!("--decode takes BATCHxPROMPT, got {x}"))?;
                Ok((b.parse()?, p.parse()?))
            })
            .collect::<Result<_>>()?,
    };
    for (b, plen) in shapes {
        let prompt = random_ids(b, plen, cfg.vocab_size, device)?;
        let secs = time(device, args.repeats.min(3), || {
            // Greedy decoding with the KV cache: argmax stays on the device.
            let mut cache = model.new_cache();
            let mut next = model
                .forward_last(&prompt, None, Some(&mut cache))?
                .argmax_keepdim(1)?;
            for _ in 1..new_tokens {
                next = model
                    .forward_last(&next, None, Some(&mut cache))?
                    .argmax_keepdim(1)?;
            }
            Ok(())
        })?;
        let shape = format!("b{b} prompt{plen} new{new_tokens}");
        // On CUDA the Generator replays a captured step (the "decode" row
        // below); these eager steps are the path without CUDA graphs.
        let eager_row = if device.is_cuda() {
            "decode, eager steps (no CUDA graph)"
        } else {
            "decode"
        };
        emit(
            "generation",
            eager_row,
            &shape,
            dtype,
            (b * new_tokens) as f64 / secs,
            "tok/s",
        );
        if device.is_cuda() {
            // The Generator's path on CUDA: one captured step replayed
            // (each id comes back to the host, as a generation needs).
            let secs = time(device, args.repeats.min(3), || {
                Steps::greedy(&*model, &prompt, plen + new_tokens + 1, new_tokens - 1)?;
                Ok(())
            })?;
            emit(
                "generation",
                "decode",
                &shape,
                dtype,
                (b * new_tokens) as f64 / secs,
                "tok/s",
            );
            // Launches per decoded token under the graph: the kernels one
            // replay runs (the eager count comes from the Nsight census).
            if let Steps::Graph(g) = Steps::greedy(&*model, &prompt, plen + 4, 2)? {
                if let Some(k) = g.captured_kernels()? {
                    emit(
                        "generation",
                        "kernels per decoded token (CUDA graph)",
                        &shape,
                        dtype,
                        k as f64,
                        "kernels",
                    );
                }
            }
        }
        let prompt = prompt.to_device(&peer)?;
        let secs = time(&peer, args.repeats.min(3), || {
            stock.clear_kv_cache();
            let mut next = stock.forward(&prompt, 0)?.squeeze(1)?.argmax_keepdim(1)?;
            for t in 1..new_tokens {
                next = stock
                    .forward(&next, plen + t - 1)?
                    .squeeze(1)?
                    .argmax_keepdim(1)?;
            }
            Ok(())
        })?;
        emit_as(
            STOCK,
            "generation",
            "decode",
            &shape,
            dtype,
            (b * new_tokens) as f64 / secs,
            "tok/s",
        );
    }
    Ok(())
}

fn bench_kernels(args: &Args, device: &Device) -> Result<()> {
    // RMSNorm over Qwen2.5-0.5B activations: batch 8 x 512 tokens x 896.
    let dtype = metal_candle::backend::default_dtype(device);
    let x = Tensor::randn(0f32, 1.0, (8, 512, 896), device)?.to_dtype(dtype)?;
    let w = Tensor::randn(1f32, 0.1, 896, device)?.to_dtype(dtype)?;
    let n = 50;
    let ours = time(device, args.repeats, || {
        for _ in 0..n {
            metal_candle::backend::kernels::rms_norm(&x, &w, 1e-6)?;
        }
        Ok(())
    })?;
    emit(
        "kernels",
        "rms_norm fwd",
        "8x512x896",
        dtype,
        ours / n as f64 * 1e6,
        "us",
    );
    let fused = time(device, args.repeats, || {
        for _ in 0..n {
            candle_nn::ops::rms_norm(&x, &w, 1e-6)?;
        }
        Ok(())
    })?;
    emit_as(
        "candle fused (no backward)",
        "kernels",
        "rms_norm fwd",
        "8x512x896",
        dtype,
        fused / n as f64 * 1e6,
        "us",
    );
    let composed = time(device, args.repeats, || {
        for _ in 0..n {
            let xf = x.to_dtype(DType::F32)?;
            let r = (xf.sqr()?.mean_keepdim(2)? + 1e-6)?.sqrt()?.recip()?;
            xf.broadcast_mul(&r)?.to_dtype(dtype)?.broadcast_mul(&w)?;
        }
        Ok(())
    })?;
    emit_as(
        "candle composed ops",
        "kernels",
        "rms_norm fwd",
        "8x512x896",
        dtype,
        composed / n as f64 * 1e6,
        "us",
    );
    // Forward + backward, ours vs composed.
    let xv = candle_core::Var::from_tensor(&x)?;
    let fb_ours = time(device, args.repeats, || {
        for _ in 0..n / 5 {
            metal_candle::backend::kernels::rms_norm(xv.as_tensor(), &w, 1e-6)?
                .sum_all()?
                .backward()?;
        }
        Ok(())
    })?;
    emit(
        "kernels",
        "rms_norm fwd+bwd",
        "8x512x896",
        dtype,
        fb_ours / (n / 5) as f64 * 1e6,
        "us",
    );
    let fb_comp = time(device, args.repeats, || {
        for _ in 0..n / 5 {
            let xf = xv.as_tensor().to_dtype(DType::F32)?;
            let r = (xf.sqr()?.mean_keepdim(2)? + 1e-6)?.sqrt()?.recip()?;
            xf.broadcast_mul(&r)?
                .to_dtype(dtype)?
                .broadcast_mul(&w)?
                .sum_all()?
                .backward()?;
        }
        Ok(())
    })?;
    emit_as(
        "candle composed ops",
        "kernels",
        "rms_norm fwd+bwd",
        "8x512x896",
        dtype,
        fb_comp / (n / 5) as f64 * 1e6,
        "us",
    );
    Ok(())
}

/// Polls the device's used memory (cuMemGetInfo: the whole device, the same
/// measure scripts/peers.py takes with torch.cuda.mem_get_info) every 2 ms
/// while `f` runs; returns `f`'s result, the peak and the memory in use
/// before `f` (the process's CUDA context, libraries' workspaces), in bytes.
fn with_peak_memory<T>(
    device: &Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, usize, usize)> {
    // Memory the pool kept from an earlier row would count as in use.
    let idle = used_memory(device)?;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let poller = {
        let (stop, peak, device) = (stop.clone(), peak.clone(), device.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some((free, total))) = metal_candle::backend::device_memory(&device) {
                    peak.fetch_max(total - free, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let out = f();
    synchronize(device)?;
    stop.store(true, Ordering::Relaxed);
    let _ = poller.join();
    Ok((out?, peak.load(Ordering::Relaxed), idle))
}

/// Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 heads / 2 KV heads).
fn qwen15b_config(quick: bool) -> DecoderConfig {
    qwen15b_layers(if quick { 4 } else { 28 })
}

/// [`qwen15b_config`] with `layers` decoder layers.
fn qwen15b_layers(layers: usize) -> DecoderConfig {
    metal_candle::models::parse_decoder_config(
        &serde_json::json!({
            "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
            "num_hidden_layers": layers, "num_attention_heads": 12, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true,
        })
        .to_string(),
        "benchmark config",
    )
    .expect("static config")
}

/// One LoRA benchmark row (scripts/peers.py's LORA_ROWS has the same).
struct LoraRow {
    model: &'static str,
    batch: usize,
    seq: usize,
    rank: usize,
    all_modules: bool,
    quantize: Option<candle_core::quantized::GgmlDType>,
    checkpointing: bool,
}

fn lora_rows(quick: bool) -> Vec<LoraRow> {
    use candle_core::quantized::GgmlDType;
    let row = |model, batch, seq, rank, all_modules, quantize, checkpointing| LoraRow {
        model,
        batch,
        seq,
        rank,
        all_modules,
        quantize,
        checkpointing,
    };
    if quick {
        return vec![
            row("0.5B", 2, 64, 8, false, None, false),
            row("0.5B", 2, 64, 8, false, Some(GgmlDType::Q4_0), false),
            row("0.5B", 2, 64, 8, false, None, true),
        ];
    }
    vec![
        row("0.5B", 8, 512, 8, false, None, false),
        row("0.5B", 8, 512, 16, true, None, false),
        row("1.5B", 4, 1024, 8, false, None, false),
        row("0.5B", 8, 512, 8, false, Some(GgmlDType::Q4_0), false),
        row("0.5B", 8, 512, 8, false, None, true),
        row("0.5B", 8, 512, 8, false, Some(GgmlDType::Q4_0), true),
        row("1.5B", 4, 1024, 8, false, None, true),
    ]
}

fn bench_lora(args: &Args, device: &Device) -> Result<()> {
    use metal_candle::training::lm_loss;
    use metal_candle::training::{AdamW, AdamWConfig};
    use metal_candle::training::{LoRAAdapter, LoRAAdapterConfig, TargetModule};
    let dtype = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None => metal_candle::backend::default_dtype(device),
    };
    let mut rows = lora_rows(args.quick);
    rows.truncate(args.lora_rows.unwrap_or(usize::MAX));
    if !args.lora_only.is_empty() {
        rows = rows
            .into_iter()
            .enumerate()
            .filter(|(i, _)| args.lora_only.contains(i))
            .map(|(_, r)| r)
            .collect();
    }
    let modes: &[bool] = if args.composed_backward {
        &[false, true]
    } else {
        &[false]
    };
    for (row, composed) in rows.iter().flat_map(|r| modes.iter().map(move |&c| (r, c))) {
        let cfg = match row.model {
            "1.5B" => qwen15b_config(args.quick),
            _ => qwen05b_config(args.quick),
        };
        let (b, s) = (row.batch, row.seq);
        let (result, peak, idle) = with_peak_memory(device, || {
            // QLoRA's base is made on the CPU and quantized layer by layer
            // as it moves to the device, so the dense copy never sits there.
            let made_on = if row.quantize.is_some() {
                &Device::Cpu
            } else {
                device
            };
            let tensors = random_qwen2_tensors(&cfg, dtype, made_on)?;
            let mut model = build_decoder(
                &cfg,
                &Weights::from_tensors(tensors, dtype, device, "random")
                    .quantize_linears(row.quantize),
            )?;
            let lora = LoRAAdapterConfig {
                rank: row.rank,
                alpha: 2.0 * row.rank as f64,
                dropout: 0.0,
                target_modules: if row.all_modules {
                    TargetModule::ALL.to_vec()
                } else {
                    vec![TargetModule::QProj, TargetModule::VProj]
                },
                use_rslora: false,
            };
            let adapter = LoRAAdapter::new(lora, &model, device, 0)?;
            adapter.attach(&mut model)?;
            adapter.set_training(true);
            model.set_gradient_checkpointing(row.checkpointing);
            model.set_composed_backward(composed);
            let mut opt = AdamW::new(
                adapter.trainable_vars(),
                AdamWConfig {
                    lr: 1e-4,
                    ..Default::default()
                },
            )?;
            let ids = random_ids(b, s, cfg.vocab_size, device)?;
            let labels = ids.to_dtype(DType::I64)?;
            let secs = time(device, args.repeats, || {
                let (loss, _) = lm_loss(&model, &ids, None, &labels)?;
                let grads = metal_candle::training::backward(&loss)?;
                let g = opt.collect_grads(&grads)?;
                opt.step_with(&g)?;
                Ok(())
            })?;
            // Where the step's time goes: the forward (with the loss) alone.
            let fwd = time(device, args.repeats, || {
                lm_loss(&model, &ids, None, &labels)?;
                Ok(())
            })?;
            Ok((secs, fwd))
        })?;
        let (result, fwd) = result;
        let mut shape = format!(
            "{} b{b} s{s} r{} {}",
            row.model,
            row.rank,
            if row.all_modules { "all7" } else { "q,v" }
        );
        if let Some(f) = row.quantize {
            shape.push_str(&format!(" base {f:?} (QLoRA)"));
        }
        if row.checkpointing {
            shape.push_str(" ckpt");
        }
        if composed {
            shape.push_str(" (composed backward)");
        }
        emit(
            "lora",
            "train step (fwd+bwd+AdamW)",
            &shape,
            dtype,
            (b * s) as f64 / result,
            "tok/s",
        );
        emit(
            "lora",
            "forward + loss only",
            &shape,
            dtype,
            fwd * 1e3,
            "ms",
        );
        if peak > 0 {
            emit(
                "lora",
                "peak device memory",
                &shape,
                dtype,
                peak as f64 / (1 << 20) as f64,
                "MiB",
            );
            // The step's own memory: what a QLoRA base saves shows here
            // undiluted by the CUDA context both sides pay.
            emit(
                "lora",
                "peak device memory above idle",
                &shape,
                dtype,
                peak.saturating_sub(idle) as f64 / (1 << 20) as f64,
                "MiB",
            );
        }
    }
    Ok(())
}

/// One LoRA training step (0.5B shape, 2 layers, b8 × 512, r8 q,v) and
/// nothing else, for a profiler (`ncu`) to count and time its kernels; then
/// the step's wall time over a few repeats.
fn profile_lora_step(args: &Args, device: &Device) -> Result<()> {
    use metal_candle::training::{lm_loss, LoRAAdapter, LoRAAdapterConfig};
    let dtype = metal_candle::backend::default_dtype(device);
    // Two layers of the `--dp-model` shape at its LoRA row's batch.
    let (cfg, b, s) = match args.dp_model.as_str() {
        "1.5B" => (qwen15b_layers(2), 4, 1024),
        _ => (qwen05b_layers(2), 8, 512),
    };
    let tensors = random_qwen2_tensors(&cfg, dtype, device)?;
    let mut model = build_decoder(
        &cfg,
        &Weights::from_tensors(tensors, dtype, device, "random"),
    )?;
    let adapter = LoRAAdapter::new(LoRAAdapterConfig::default(), &model, device, 0)?;
    adapter.attach(&mut model)?;
    let ids = random_ids(b, s, cfg.vocab_size, device)?;
    let labels = ids.to_dtype(DType::I64)?;
    let mut step = || -> Result<()> {
        let (loss, _) = lm_loss(&model, &ids, None, &labels)?;
        metal_candle::training::backward(&loss)?;
        Ok(())
    };
    step()?;
    synchronize(device)?;
    if std::env::var_os("PROFILE_ONCE").is_some() {
        return Ok(());
    }
    let secs = time(device, args.repeats, &mut step)?;
    let fwd = time(device, args.repeats, || {
        lm_loss(&model, &ids, None, &labels)?;
        Ok(())
    })?;
    eprintln!(
        "2-layer step {:.1} ms, forward+loss {:.1} ms",
        secs * 1e3,
        fwd * 1e3
    );
    Ok(())
}

/// What a streaming user feels, through the library's `Sampler` with one
/// device-to-host copy per token (the id, or the logits row when
/// sampling): time to first token of a 1,024-token prompt; per-token
/// latency p50/p99 over 1,024 greedy tokens; and greedy against sampling
/// (temperature 0.8, top-p 0.9, repetition penalty 1.1) at b1 and b8.
fn bench_latency(args: &Args, device: &Device) -> Result<()> {
    use metal_candle::inference::{LogitsProcessor, Sampler, SamplingStrategy};
    let dtype = metal_candle::backend::default_dtype(device);
    let (cfg, model) = random_qwen05b(args, device)?;
    let (prompt_len, gen_len) = if args.quick { (64, 32) } else { (1024, 1024) };
    let prompt = random_ids(1, prompt_len, cfg.vocab_size, device)?;
    let mut greedy = Sampler::new(LogitsProcessor::new(SamplingStrategy::Greedy), 0);
    // Time to first token: prefill and the first id on the host.
    let ttft = time(device, args.repeats, || {
        let mut cache = model.new_cache();
        let logits = model.forward_last(&prompt, None, Some(&mut cache))?;
        greedy.sample(&logits.get(0)?, &[], &[])?;
        Ok(())
    })?;
    let shape = format!("b1 prompt{prompt_len}");
    emit(
        "latency",
        "time to first token",
        &shape,
        dtype,
        ttft * 1e3,
        "ms",
    );
    // Per-token latency over a long generation (host clock per token; the
    // id copy synchronises).
    // The steps the Generator takes (a replayed CUDA graph on CUDA).
    let (logits, mut steps) = Steps::start(&*model, &prompt, prompt_len + gen_len + 1)?;
    let mut next = greedy.sample(&logits.get(0)?, &[], &[])?;
    let mut per_token = Vec::with_capacity(gen_len);
    for _ in 0..gen_len {
        let start = Instant::now();
        let logits = steps.step(&*model, &[next])?;
        next = greedy.sample(&logits.get(0)?, &[], &[])?;
        per_token.push(start.elapsed().as_secs_f64());
    }
    per_token.sort_by(f64::total_cmp);
    let pct = |q: f64| per_token[((per_token.len() - 1) as f64 * q).round() as usize] * 1e3;
    let shape = format!("b1 prompt{prompt_len} new{gen_len}");
    emit(
        "latency",
        "per-token latency p50",
        &shape,
        dtype,
        pct(0.5),
        "ms",
    );
    emit(
        "latency",
        "per-token latency p99",
        &shape,
        dtype,
        pct(0.99),
        "ms",
    );
    // Where a sampled token's time goes (one row, host clock, synchronised).
    if std::env::var_os("SAMPLING_BREAKDOWN").is_some() {
        let mut processor = LogitsProcessor::new(SamplingStrategy::TopP(0.9));
        processor.temperature = 0.8;
        processor.repetition_penalty = 1.1;
        let mut cache = model.new_cache();
        let row = model
            .forward_last(&prompt, None, Some(&mut cache))?
            .get(0)?;
        let history: Vec<u32> = prompt.flatten_all()?.to_vec1()?;
        let mut sampler = Sampler::new(processor.clone(), 0);
        let mut t = [0f64; 6];
        for _ in 0..20 {
            synchronize(device)?;
            let s0 = Instant::now();
            let l = row.to_dtype(DType::F32)?;
            synchronize(device)?;
            let s1 = Instant::now();
            let l = processor.apply_penalties(&l, &history, &[])?;
            synchronize(device)?;
            let s2 = Instant::now();
            let l = processor.apply_temperature(&l)?;
            synchronize(device)?;
            let s3 = Instant::now();
            let host = l.to_vec1::<f32>()?;
            let s4 = Instant::now();
            let c = processor.candidates(&host);
            let s5 = Instant::now();
            sampler.draw(&c)?;
            let s6 = Instant::now();
            for (k, (a, b)) in [(s0, s1), (s1, s2), (s2, s3), (s3, s4), (s4, s5), (s5, s6)]
                .iter()
                .enumerate()
            {
                t[k] += (*b - *a).as_secs_f64() * 1e3 / 20.0;
            }
        }
        // The whole call as decoding makes it (on CUDA: the sampling kernel).
        let mut whole = 0f64;
        for _ in 0..20 {
            synchronize(device)?;
            let s0 = Instant::now();
            sampler.sample(&row, &history, &[])?;
            whole += s0.elapsed().as_secs_f64() * 1e3 / 20.0;
        }
        eprintln!(
            "sampling breakdown (ms): to_f32 {:.3} penalties {:.3} temperature {:.3} to_host {:.3} candidates {:.3} draw {:.3}; Sampler::sample {:.3}",
            t[0], t[1], t[2], t[3], t[4], t[5], whole
        );
    }
    // Greedy against sampling through one Sampler over the batch (as the
    // Generator uses it), in alternating rounds so drift between them (the
    // host-bound decode moves 20-30% between calls) lands on both: the
    // median of each.
    let new = args.new_tokens.unwrap_or(if args.quick { 16 } else { 128 });
    for b in [1usize, 8] {
        let prompt = random_ids(b, 32, cfg.vocab_size, device)?;
        let context: Vec<Vec<u32>> = prompt.to_vec2()?;
        let run = |sampled: bool| -> Result<f64> {
            let mut processor = LogitsProcessor::new(if sampled {
                SamplingStrategy::TopP(0.9)
            } else {
                SamplingStrategy::Greedy
            });
            if sampled {
                processor.temperature = 0.8;
                processor.repetition_penalty = 1.1;
            }
            let mut sampler = Sampler::new(processor, 0);
            time(device, 1, || {
                let mut history = context.clone();
                let (mut logits, mut steps) = Steps::start(&*model, &prompt, 32 + new + 1)?;
                for _ in 0..new {
                    let rows: Vec<Option<(&[u32], &[u32])>> =
                        history.iter().map(|h| Some((&h[..], &[][..]))).collect();
                    let next = sampler.sample_batch(&logits, &rows)?;
                    let mut ids = Vec::with_capacity(b);
                    for (h, id) in history.iter_mut().zip(next) {
                        let id = id.unwrap_or(0);
                        h.push(id);
                        ids.push(id);
                    }
                    logits = steps.step(&*model, &ids)?;
                }
                Ok(())
            })
        };
        let (mut greedy, mut sampled) = (Vec::new(), Vec::new());
        for _ in 0..args.repeats.clamp(3, 7) {
            greedy.push(run(false)?);
            sampled.push(run(true)?);
        }
        let shape = format!("b{b} prompt32 new{new}");
        for (row, secs) in [
            ("decode greedy through the Sampler", median(greedy)),
            (
                "decode sampled (T 0.8, top-p 0.9, rep 1.1)",
                median(sampled),
            ),
        ] {
            emit(
                "latency",
                row,
                &shape,
                dtype,
                (b * new) as f64 / secs,
                "tok/s",
            );
        }
    }
    Ok(())
}

/// Kernel census of greedy decoding (scripts/profile/ncu-kernels.sh): a
/// one-token prompt then `--new-tokens` - 1 steps (default 16 in all) at
/// batch 1, so the census divided by that is the launches per decoded token. Without `PROFILE_ONCE` it also times 128
/// steps (host clock, synchronised) and prints ms per token.
fn profile_decode(args: &Args, device: &Device) -> Result<()> {
    let (cfg, model) = random_qwen05b(args, device)?;
    let first = random_ids(1, 1, cfg.vocab_size, device)?;
    let run = |steps: usize| -> Result<()> {
        let mut cache = model.new_cache();
        let mut next = first.clone();
        for _ in 0..steps {
            next = model
                .forward_last(&next, None, Some(&mut cache))?
                .argmax_keepdim(1)?;
        }
        Ok(())
    };
    run(args.new_tokens.unwrap_or(16))?;
    synchronize(device)?;
    if std::env::var_os("PROFILE_ONCE").is_some() {
        return Ok(());
    }
    let secs = time(device, args.repeats, || run(128))?;
    eprintln!("decode b1: {:.3} ms/token", secs * 1e3 / 128.0);
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // A/B of prepare_device's event setting: Candle's default back on.
        // SAFETY: one stream; enabling only adds events to new tensors.
        unsafe { d.cuda_stream().context().enable_event_tracking() };
        let secs = time(device, args.repeats, || run(128))?;
        eprintln!(
            "decode b1 with per-tensor events (Candle's default): {:.3} ms/token",
            secs * 1e3 / 128.0
        );
        unsafe { d.disable_event_tracking() };
    }
    Ok(())
}

/// Data-parallel LoRA training (one process per GPU under
/// `examples/launch.rs`; alone without it): the LoRA suite's r8 q,v step
/// at `--dp-model`'s shape and per-process batch, run through `Trainer`
/// (what users run: batches collated on the host, gradients summed over
/// the group each step). Rank 0 prints the global tokens/s, the median
/// step after 2 warm-up steps of `--repeats` + 2.
fn bench_lora_dp(args: &Args, device: &Device) -> Result<()> {
    // RUST_LOG=metal_candle::training=debug: each step's phases on stderr.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    }
    use metal_candle::training::{
        Dataset, Example, GroupConfig, LRScheduler, LoRAAdapter, LoRAAdapterConfig, ProcessGroup,
        TargetModule, Trainer, TrainingConfig,
    };
    let group_cfg = GroupConfig::from_env()?;
    let device = match &group_cfg {
        Some(g) if device.is_cuda() => metal_candle::backend::cuda(g.local_rank)?,
        _ => device.clone(),
    };
    let world = group_cfg.as_ref().map_or(1, |g| g.world_size);
    let dtype = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None => metal_candle::backend::default_dtype(&device),
    };
    let (cfg, b, s) = match args.dp_model.as_str() {
        "1.5B" => (qwen15b_config(args.quick), 4, 1024),
        _ => (qwen05b_config(args.quick), 8, 512),
    };
    let (b, s) = if args.quick { (2, 64) } else { (b, s) };
    let steps = args.repeats + 2;
    let tensors = random_qwen2_tensors(&cfg, dtype, &device)?;
    let mut model = build_decoder(
        &cfg,
        &Weights::from_tensors(tensors, dtype, &device, "random"),
    )?;
    let lora = LoRAAdapterConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: vec![TargetModule::QProj, TargetModule::VProj],
        use_rslora: false,
    };
    let adapter = LoRAAdapter::new(lora, &*model, &device, 0)?;
    let vocab = cfg.vocab_size as u64;
    let examples = (0..b * world * steps)
        .map(|e| {
            let ids: Vec<u32> = (0..s)
                .map(|k| (((e * s + k) as u64 * 2_654_435_761) % vocab) as u32)
                .collect();
            let labels = ids.iter().map(|&i| i64::from(i)).collect();
            Example {
                input_ids: ids,
                labels,
            }
        })
        .collect();
    let config = TrainingConfig {
        max_steps: Some(steps),
        batch_size: b,
        lr_schedule: LRScheduler::Constant { lr: 1e-4 },
        max_grad_norm: None,
        shuffle: false,
        ..TrainingConfig::default()
    };
    let mut trainer = Trainer::new(&mut *model, &adapter, config)?;
    if let Some(g) = &group_cfg {
        let group = ProcessGroup::connect(g, &device)?;
        // The step's one sum on its own: the adapter's gradients (and 4
        // more values), timed after the device is synchronized.
        let n: usize = adapter
            .named_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let grads = Tensor::ones(n + 4, DType::F32, &device)?;
        let mut times = Vec::new();
        for i in 0..12 {
            device.synchronize()?;
            let t = Instant::now();
            let sum = group.all_reduce_sum(&grads)?;
            device.synchronize()?;
            drop(sum);
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        eprintln!(
            "rank {}: all-reduce of {} f32: median {:.0} us",
            g.rank,
            n + 4,
            median(times)
        );
        trainer.set_process_group(group)?;
    }
    let metrics = trainer.train(&Dataset::from_examples(examples)?, None)?;
    // Each rank's step times: a slow rank sets the pace of all.
    let ms: Vec<String> = metrics
        .steps
        .iter()
        .map(|m| format!("{:.1}", 1e3 * (b * s * world) as f64 / m.tokens_per_sec))
        .collect();
    eprintln!(
        "rank {}: step ms (tokens/s-derived) {}",
        group_cfg.as_ref().map_or(0, |g| g.rank),
        ms.join(" ")
    );
    if group_cfg.as_ref().is_none_or(|g| g.rank == 0) {
        let rates: Vec<f64> = metrics.steps[2..]
            .iter()
            .map(|m| m.tokens_per_sec)
            .collect();
        emit(
            "lora",
            "data-parallel train step",
            &format!(
                "{} b{b}/process s{s} r8 q,v, {world} process{}",
                args.dp_model,
                if world == 1 { "" } else { "es" }
            ),
            dtype,
            median(rates),
            "tok/s",
        );
    }
    Ok(())
}

/// Kernel census of one prefill of `--prompts`' first length (default
/// 4096) at batch 1, last-position logits (the Generator's prefill).
fn profile_prefill(args: &Args, device: &Device) -> Result<()> {
    let (cfg, model) = random_qwen05b(args, device)?;
    let len = args
        .prompts
        .as_ref()
        .and_then(|p| p.first().copied())
        .unwrap_or(4096);
    let prompt = random_ids(1, len, cfg.vocab_size, device)?;
    let run = || -> Result<()> {
        let mut cache = model.new_cache();
        model.forward_last(&prompt, None, Some(&mut cache))?;
        Ok(())
    };
    run()?;
    synchronize(device)?;
    if std::env::var_os("PROFILE_ONCE").is_some() {
        return Ok(());
    }
    let secs = time(device, args.repeats, run)?;
    eprintln!("prefill {len}: {:.3} ms", secs * 1e3);
    Ok(())
}

/// Kernel census of one MiniLM forward + pool at b512 x 128 in bf16 (the
/// embeddings row furthest behind); without `PROFILE_ONCE` it also times
/// the forward alone and with pooling.
fn profile_embeddings(args: &Args, device: &Device) -> Result<()> {
    use metal_candle::embeddings::{normalize, EmbeddingModel};
    use metal_candle::io::ModelRepo;
    let name = embed_names(args)?[0];
    let dir = std::path::Path::new(&args.embed_models).join(name);
    let dtype = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None => DType::BF16,
    };
    let model = EmbeddingModel::load(&ModelRepo::from_dir(&dir), Some(dtype), device)?;
    let (b, s) = args
        .profile_shape
        .split_once('x')
        .and_then(|(b, s)| Some((b.parse::<usize>().ok()?, s.parse::<usize>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--profile-shape: BATCHxSEQ, e.g. 128x512"))?;
    let v: Vec<u32> = (0..b * s)
        .map(|k| ((k as u64 * 2_654_435_761) % 2600) as u32)
        .collect();
    let ids = Tensor::from_vec(v, (b, s), device)?;
    let mask = Tensor::ones((b, s), DType::U32, device)?;
    let rows = vec![vec![1u32; s]; b];
    let full = || -> Result<()> {
        let tokens = model.forward_tokens(&ids, &mask)?;
        normalize(&model.pooling().pool(&tokens, &rows)?)?;
        Ok(())
    };
    full()?;
    synchronize(device)?;
    if std::env::var_os("PROFILE_ONCE").is_some() {
        // A second forward for the profiler: the first times cuBLASLt's
        // candidate algorithms for each new shape.
        full()?;
        synchronize(device)?;
        return Ok(());
    }
    let fwd = time(device, args.repeats, || {
        model.forward_tokens(&ids, &mask)?;
        Ok(())
    })?;
    let all = time(device, args.repeats, full)?;
    eprintln!(
        "{name} b{b} s{s} {dtype:?}: forward {:.2} ms, forward+pool {:.2} ms",
        fwd * 1e3,
        all * 1e3
    );
    Ok(())
}

/// Device memory in use (bytes), or 0 on the CPU.
fn used_memory(device: &Device) -> Result<usize> {
    // Only what is held, not what the pool keeps for reuse.
    metal_candle::backend::release_freed_memory(device)?;
    Ok(metal_candle::backend::device_memory(device)?.map_or(0, |(free, total)| total - free))
}

/// Greedy decoding of `new` tokens after `prompt` with stock Candle's
/// quantized Qwen2 (argmax on the device, as ours).
fn stock_quantized_decode(
    stock: &mut candle_transformers::models::quantized_qwen2::ModelWeights,
    prompt: &Tensor,
    new: usize,
) -> Result<()> {
    stock.clear_kv_cache();
    let p = prompt.dim(1)?;
    let mut next = stock.forward(prompt, 0)?.argmax_keepdim(1)?;
    for t in 1..new {
        next = stock.forward(&next, p + t - 1)?.argmax_keepdim(1)?;
    }
    Ok(())
}

/// Quantized decoding: a GGUF file at Qwen2.5-0.5B's shape (random weights,
/// linear weights in Q4_0 and Q8_0: 896 columns are not whole Q4_K blocks,
/// as in the real Q4_K_M file where llama.cpp falls back for them; the
/// embedding table in the same format, as llama.cpp writes it), or the
/// `--gguf` files, loaded as stored by us and by stock Candle's quantized
/// Qwen2; device memory taken by the loaded model, and greedy decoding
/// speed.
fn bench_quantized(args: &Args, device: &Device) -> Result<()> {
    use candle_core::quantized::GgmlDType;
    use metal_candle::models::{load_decoder_with, LoadOptions, Quantization};
    let cfg = qwen05b_config(args.quick);
    let new_tokens = args.new_tokens.unwrap_or(if args.quick { 16 } else { 128 });
    let prompt = random_ids(1, 32, cfg.vocab_size, device)?;
    let mut files = Vec::new();
    for path in &args.gguf {
        let name = std::path::Path::new(path)
            .file_name()
            .map_or_else(|| path.clone(), |f| f.to_string_lossy().into_owned());
        files.push((std::path::PathBuf::from(path), name));
    }
    if files.is_empty() {
        for format in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
            let path = std::env::temp_dir().join(format!(
                "metal-candle-bench-{}l-{format:?}-v2.gguf",
                cfg.num_hidden_layers
            ));
            if !path.exists() {
                let t = random_model::random_weights(&cfg, 0.02, DType::F32, &Device::Cpu)?;
                random_model::write_gguf(&t, &cfg, format, &path)?;
            }
            files.push((path, format!("{format:?}")));
        }
    }
    for (path, label) in files {
        let shape = format!("b1 prompt32 new{new_tokens} {label}");
        // Ours: dense parts (embeddings, norms) in --dtype (default: bf16
        // on CUDA).
        let dtype = match &args.dtype {
            Some(d) => parse_dtype(d)?,
            None => metal_candle::backend::default_dtype(device),
        };
        let before = used_memory(device)?;
        let ours = load_decoder_with(
            path.to_str().unwrap_or_default(),
            device,
            &LoadOptions {
                dtype: Some(dtype),
                quantization: Quantization::AsStored,
            },
        )?;
        let resident = used_memory(device)?.saturating_sub(before);
        // Stock Candle: f32 activations and embeddings (its only choice).
        let before = used_memory(device)?;
        let mut file = std::fs::File::open(&path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
        let peer = stock_device(device)?;
        let mut stock = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
            content, &mut file, &peer,
        )?;
        let stock_resident = used_memory(device)?.saturating_sub(before);
        let stock_prompt = prompt.to_device(&peer)?;
        let mut ours_run = || -> Result<()> {
            let mut cache = ours.new_cache();
            let mut next = ours
                .forward_last(&prompt, None, Some(&mut cache))?
                .argmax_keepdim(1)?;
            for _ in 1..new_tokens {
                next = ours
                    .forward_last(&next, None, Some(&mut cache))?
                    .argmax_keepdim(1)?;
            }
            Ok(())
        };
        // Both decoders take turns, one timed decode each per round (median
        // over rounds): decoding is host-bound and the machine's host speed
        // drifts, so timing one side's repeats after the other's compared
        // different moments (stock Candle moved 1.5x between runs).
        let (mut t_ours, mut t_stock) = (Vec::new(), Vec::new());
        for _ in 0..args.repeats.max(3) {
            t_ours.push(time(device, 1, &mut ours_run)?);
            t_stock.push(time(&peer, 1, || {
                stock_quantized_decode(&mut stock, &stock_prompt, new_tokens)
            })?);
        }
        emit(
            "quantized",
            "decode",
            &shape,
            dtype,
            new_tokens as f64 / median(t_ours),
            "tok/s",
        );
        if resident > 0 {
            emit(
                "quantized",
                "model memory",
                &shape,
                dtype,
                resident as f64 / (1 << 20) as f64,
                "MiB",
            );
        }
        emit_as(
            STOCK,
            "quantized",
            "decode",
            &shape,
            DType::F32,
            new_tokens as f64 / median(t_stock),
            "tok/s",
        );
        let resident = stock_resident;
        if resident > 0 {
            emit_as(
                STOCK,
                "quantized",
                "model memory",
                &shape,
                DType::F32,
                resident as f64 / (1 << 20) as f64,
                "MiB",
            );
        }
    }
    Ok(())
}

/// A real GGUF file as stored (quantized linear weights, dense parts in
/// `--dtype`): llama-bench's ppN (one forward over N tokens, empty cache)
/// and tgN (N single-token greedy steps from an empty cache, argmax fed
/// back), in tokens/s. Rows are labelled by the file name.
fn bench_gguf(args: &Args, device: &Device) -> Result<()> {
    use metal_candle::models::{load_decoder_with, LoadOptions, Quantization};
    let dtype = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None => metal_candle::backend::default_dtype(device),
    };
    let prompts = args.prompts.clone().unwrap_or_else(|| vec![128]);
    let new_tokens = args.new_tokens.unwrap_or(128);
    for path in &args.gguf {
        let file = std::path::Path::new(path)
            .file_name()
            .map_or_else(|| path.clone(), |f| f.to_string_lossy().into_owned());
        let model = load_decoder_with(
            path,
            device,
            &LoadOptions {
                dtype: Some(dtype),
                quantization: Quantization::AsStored,
            },
        )?;
        let vocab = model.config().vocab_size;
        for &p in &prompts {
            let ids = random_ids(1, p, vocab, device)?;
            let secs = time(device, args.repeats, || {
                let mut cache = model.new_cache();
                model.forward_last(&ids, None, Some(&mut cache))?;
                Ok(())
            })?;
            emit(
                "gguf",
                "prefill",
                &format!("pp{p} {file}"),
                dtype,
                p as f64 / secs,
                "tok/s",
            );
        }
        let first = random_ids(1, 1, vocab, device)?;
        let secs = time(device, args.repeats, || {
            let mut cache = model.new_cache();
            let mut next = first.clone();
            for _ in 0..new_tokens {
                next = model
                    .forward_last(&next, None, Some(&mut cache))?
                    .argmax_keepdim(1)?;
            }
            Ok(())
        })?;
        emit(
            "gguf",
            "decode",
            &format!("tg{new_tokens} {file}"),
            dtype,
            new_tokens as f64 / secs,
            "tok/s",
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    if !args.gguf.is_empty() && args.suite != "quantized" {
        return bench_gguf(&args, &device);
    }
    let all = args.suite == "all";
    if all || args.suite == "kernels" {
        bench_kernels(&args, &device)?;
    }
    if all || args.suite == "embeddings" {
        bench_embeddings(&args, &device)?;
    }
    if args.suite == "lora-profile" {
        profile_lora_step(&args, &device)?;
    }
    if args.suite == "lora-dp" {
        bench_lora_dp(&args, &device)?;
    }
    if all || args.suite == "latency" {
        bench_latency(&args, &device)?;
    }
    if args.suite == "prefill-profile" {
        profile_prefill(&args, &device)?;
        return Ok(());
    }
    if args.suite == "decode-profile" {
        profile_decode(&args, &device)?;
    }
    if args.suite == "embeddings-corpus" {
        bench_embeddings_corpus(&args, &device)?;
    }
    if args.suite == "embeddings-profile" {
        profile_embeddings(&args, &device)?;
    }
    if all || args.suite == "lora" {
        bench_lora(&args, &device)?;
    }
    if all || args.suite == "generation" {
        bench_generation(&args, &device)?;
    }
    if all || args.suite == "quantized" {
        bench_quantized(&args, &device)?;
    }
    Ok(())
}
