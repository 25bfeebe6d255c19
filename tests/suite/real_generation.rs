//! Real-model tier: greedy generation on Qwen2.5-Coder-0.5B-Instruct (GGUF)
//! equals transformers' `generate(do_sample=False)` for the prompts of
//! tests/fixtures/qwen2.5-coder-0.5b (with and without repetition penalty, and
//! as one left-padded batch), stopping at the GGUF's EOS as transformers does;
//! the chat template equals transformers' `apply_chat_template`, and
//! streaming CJK / emoji text equals the non-streaming text.
//! Runs with METAL_CANDLE_REAL_MODELS=1 (HF_HUB_OFFLINE=1 works) after
//! scripts/fetch-models.sh.

use crate::common::{device, fixture, real_models, reference};
use candle_core::DType;
use metal_candle::inference::{
    FinishReason, Generator, GeneratorConfig, IncrementalDecoder, LanguageModel, Message,
};
use metal_candle::models::{LoadOptions, Quantization};

const QWEN_CODER: &str =
    "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

fn json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn generator() -> Generator {
    let lm = LanguageModel::from_pretrained_with(QWEN_CODER, &device(), &dense_f32()).unwrap();
    Generator::new(lm, GeneratorConfig::default()).unwrap()
}

#[test]
fn qwen_coder_greedy_generation_equals_transformers() {
    if !real_models() {
        eprintln!("skipped: set METAL_CANDLE_REAL_MODELS=1 (after scripts/fetch-models.sh)");
        return;
    }
    let mut gen = generator();
    let r = reference("qwen2.5-coder-0.5b");
    let prompts = json("qwen2.5-coder-0.5b")["prompts"].clone();
    for (suffix, penalty) in [("greedy", 1.0), ("greedy_rp1.3", 1.3)] {
        gen.set_config(GeneratorConfig {
            max_tokens: 32,
            repetition_penalty: penalty,
            ..GeneratorConfig::default()
        })
        .unwrap();
        for (i, p) in prompts.as_array().unwrap().iter().enumerate() {
            let expected = r[&format!("prompt{i}_{suffix}")]
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            let out = gen.generate(p.as_str().unwrap()).unwrap();
            assert_eq!(out.tokens, expected, "prompt {i} {suffix}: {:?}", out.text);
            let reason = if expected.len() < 32 {
                FinishReason::Eos
            } else {
                FinishReason::MaxTokens
            };
            assert_eq!(out.finish_reason, reason, "prompt {i} {suffix}");
        }
    }
    // The four prompts as one left-padded batch, each stopping on its own.
    gen.set_config(GeneratorConfig {
        max_tokens: 32,
        ..GeneratorConfig::default()
    })
    .unwrap();
    let texts: Vec<&str> = prompts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| gen.encode(t).unwrap()).collect();
    let batch = gen.generate_batch_tokens(&ids).unwrap();
    for (i, out) in batch.iter().enumerate() {
        let expected = r[&format!("prompt{i}_greedy")]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(out.tokens, expected, "batched prompt {i}");
    }
}

#[test]
fn qwen_coder_chat_template_and_streaming() {
    if !real_models() {
        eprintln!("skipped: set METAL_CANDLE_REAL_MODELS=1 (after scripts/fetch-models.sh)");
        return;
    }
    let mut gen = generator();
    let meta = json("generation");
    let chats: Vec<Vec<Message>> = serde_json::from_value(meta["chats"].clone()).unwrap();
    let expected = meta["qwen2.5-coder-0.5b"]["chat"].as_array().unwrap();
    for (chat, e) in chats.iter().zip(expected) {
        assert_eq!(
            gen.tokenizer().apply_chat_template(chat).unwrap(),
            e.as_str().unwrap()
        );
    }

    // Qwen's byte-level BPE splits emoji and rare CJK characters over tokens.
    let text = "🦀🚀 日本語のテキスト 鱻 👩‍💻";
    let ids = gen.tokenizer().encode(text).unwrap();
    let mut dec = IncrementalDecoder::new(true);
    let mut out = String::new();
    for &t in &ids {
        let piece = dec.push(gen.tokenizer(), t).unwrap();
        assert!(!piece.contains('\u{FFFD}'));
        out.push_str(&piece);
    }
    out.push_str(&dec.flush(gen.tokenizer()).unwrap());
    assert_eq!(out, text);

    gen.set_config(GeneratorConfig {
        max_tokens: 24,
        ..GeneratorConfig::default()
    })
    .unwrap();
    let chat = [Message::user(
        "Repeat exactly, nothing else: 你好，世界！🦀🚀 こんにちは 👩‍💻",
    )];
    let full = gen.generate_chat(&chat).unwrap();
    let mut streamed = String::new();
    let out = gen
        .generate_tokens_stream(&gen.encode_chat(&chat).unwrap(), |e| {
            streamed.push_str(&e.text);
            true
        })
        .unwrap();
    assert_eq!(out, full);
    assert_eq!(streamed, full.text);
    assert!(
        !full.text.is_ascii(),
        "expected CJK/emoji in {:?}",
        full.text
    );
    eprintln!("chat reply: {:?}", full.text);
}

/// transformers dequantizes a GGUF file to f32 weights: compare on the same.
fn dense_f32() -> LoadOptions {
    LoadOptions {
        dtype: Some(DType::F32),
        quantization: Quantization::Dense,
    }
}
