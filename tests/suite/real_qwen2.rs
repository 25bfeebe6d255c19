//! Real-model tier: Qwen2.5-Coder-0.5B-Instruct (GGUF, dequantized by Candle's
//! reader) through our model and tokenizer, against transformers on the same
//! file (tests/fixtures/qwen2.5-coder-0.5b, scripts/fixtures/qwen2_real.py).
//! Runs with METAL_CANDLE_REAL_MODELS=1 after scripts/fetch-models.sh.

use crate::common::{device, real_models, reference};
use candle_core::{DType, IndexOp};
use metal_candle::inference::{LanguageModel, TextTokenizer};
use metal_candle::models::{LoadOptions, Quantization};

pub const QWEN_CODER: &str =
    "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

#[test]
fn qwen_coder_gguf_matches_transformers() {
    if !real_models() {
        eprintln!("skipped: set METAL_CANDLE_REAL_MODELS=1 (after scripts/fetch-models.sh)");
        return;
    }
    let lm = LanguageModel::from_pretrained_with(QWEN_CODER, &device(), &dense_f32()).unwrap();
    let r = reference("qwen2.5-coder-0.5b");
    let meta = crate::common::reference_json("qwen2.5-coder-0.5b");

    // Tokenizer built from the GGUF metadata == transformers' tokenizer.
    for (text, ids) in meta["tokenizer_texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(meta["tokenizer_ids"].as_array().unwrap())
    {
        let ours = lm.tokenizer.encode(text.as_str().unwrap()).unwrap();
        let theirs: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ours, theirs, "token ids of {text}");
        let back = lm.tokenizer.decode(&ours, false).unwrap();
        assert_eq!(back, text.as_str().unwrap(), "round trip");
    }

    for i in 0..meta["prompts"].as_array().unwrap().len() {
        let ids = r[&format!("prompt{i}_ids")].to_dtype(DType::U32).unwrap();
        let prompt = meta["prompts"][i].as_str().unwrap();
        assert_eq!(
            lm.tokenizer.encode(prompt).unwrap(),
            ids.to_vec1::<u32>().unwrap()
        );
        let logits = lm
            .model
            .forward_last(
                &ids.unsqueeze(0).unwrap().to_device(&device()).unwrap(),
                None,
                None,
            )
            .unwrap()
            .i(0)
            .unwrap()
            .to_device(&candle_core::Device::Cpu)
            .unwrap();
        let top_ids = r[&format!("prompt{i}_top_ids")]
            .to_dtype(DType::U32)
            .unwrap();
        let ours_top = logits.index_select(&top_ids, 0).unwrap();
        let d = crate::common::max_abs_diff(&ours_top, &r[&format!("prompt{i}_top_logits")]);
        // Same dequantized weights in f32; the difference is summation order.
        assert!(d < 2e-3, "prompt {i}: top-20 logits differ by {d}");
        let argmax = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(
            argmax,
            top_ids.i(0).unwrap().to_scalar::<u32>().unwrap(),
            "prompt {i} greedy token"
        );
    }
}

#[test]
fn gguf_tokenizer_equals_the_qwen_tokenizer_json() {
    let json = dirs_data().join("qwen-tokenizer").join("tokenizer.json");
    if !real_models() || !json.exists() {
        eprintln!("skipped: set METAL_CANDLE_REAL_MODELS=1 (after scripts/fetch-models.sh)");
        return;
    }
    let lm_tok = {
        let path = metal_candle::io::resolve_gguf(QWEN_CODER).unwrap().unwrap();
        let mut f = std::fs::File::open(path).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        TextTokenizer::from_gguf_metadata(&c.metadata).unwrap()
    };
    let hf = TextTokenizer::from_file(&json).unwrap();
    let shakespeare = std::fs::read_dir(dirs_data().join("shakespeare"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text: String = std::fs::read_to_string(shakespeare)
        .unwrap()
        .chars()
        .take(20_000)
        .collect();
    let samples = [
        text.as_str(),
        "混合 text with 数字 123 and emoji 👩‍💻 and <|im_start|>user\nhi<|im_end|>",
        "    def f(x):\r\n\t\treturn x**2  # spaces   \n\n\n",
    ];
    for s in samples {
        assert_eq!(lm_tok.encode(s).unwrap(), hf.encode(s).unwrap());
    }
}

fn dirs_data() -> std::path::PathBuf {
    std::env::var_os("METAL_CANDLE_DATA").map_or_else(
        || std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/metal-candle"),
        std::path::PathBuf::from,
    )
}

/// transformers dequantizes a GGUF file to f32 weights: compare on the same.
fn dense_f32() -> LoadOptions {
    LoadOptions {
        dtype: Some(DType::F32),
        quantization: Quantization::Dense,
    }
}
