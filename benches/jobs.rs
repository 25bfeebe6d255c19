//! `cargo bench`: CPU micro-benchmarks of the three jobs and the hot ops, on
//! small random models and the tiny embedding fixture (shapes in each name). For side-by-side numbers
//! against peers see scripts/bench.sh and BENCHMARKS.md.

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use metal_candle::backend::kernels::rms_norm;
use metal_candle::models::CausalLm;

#[path = "../examples/common/random_model.rs"]
mod random_model;

fn small_qwen2(device: &Device) -> Box<dyn CausalLm> {
    let config = serde_json::json!({
        "model_type": "qwen2",
        "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true
    });
    random_model::random_decoder(&config, 0.05, DType::F32, device)
        .unwrap()
        .1
}

fn kernels(c: &mut Criterion) {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (4, 128, 896), &dev).unwrap();
    let w = Tensor::randn(1f32, 0.1, 896, &dev).unwrap();
    c.bench_function("rms_norm fwd ours 4x128x896 f32", |b| {
        b.iter(|| rms_norm(&x, &w, 1e-6).unwrap())
    });
    c.bench_function("rms_norm fwd candle-fused 4x128x896 f32", |b| {
        b.iter(|| candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap())
    });
    let xv = Var::from_tensor(&x).unwrap();
    c.bench_function("rms_norm fwd+bwd ours 4x128x896 f32", |b| {
        b.iter(|| {
            rms_norm(xv.as_tensor(), &w, 1e-6)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
}

fn generation(c: &mut Criterion) {
    let dev = Device::Cpu;
    let model = small_qwen2(&dev);
    let prompt = Tensor::arange(0u32, 64, &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    c.bench_function("qwen2 small (4L h256) prefill 64 tokens", |b| {
        b.iter(|| {
            let mut cache = model.new_cache();
            model.forward_last(&prompt, None, Some(&mut cache)).unwrap()
        })
    });
    let mut cache = model.new_cache();
    model.forward_last(&prompt, None, Some(&mut cache)).unwrap();
    let next = Tensor::new(&[[7u32]], &dev).unwrap();
    c.bench_function("qwen2 small (4L h256) decode step after 64", |b| {
        b.iter_batched(
            || cache.clone(),
            |mut c| model.forward_last(&next, None, Some(&mut c)).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
}

fn embeddings(c: &mut Criterion) {
    use metal_candle::embeddings::EmbeddingModel;
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/embed-tiny-minilm"
    );
    let model = EmbeddingModel::from_dir(dir, &Device::Cpu).unwrap();
    let texts: Vec<String> = (0..32)
        .map(|i| format!("sentence number {i} about search, retrieval and vectors"))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    c.bench_function("embeddings tiny BERT (2L h32) encode 32 texts", |b| {
        b.iter(|| model.encode(&refs).unwrap())
    });
}

fn lora(c: &mut Criterion) {
    use metal_candle::training::{lm_loss, AdamW, AdamWConfig};
    use metal_candle::training::{LoRAAdapter, LoRAAdapterConfig, TargetModule};
    let dev = Device::Cpu;
    let mut model = small_qwen2(&dev);
    let config = LoRAAdapterConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: vec![TargetModule::QProj, TargetModule::VProj],
        use_rslora: false,
    };
    let adapter = LoRAAdapter::new(config, &model, &dev, 0).unwrap();
    adapter.attach(&mut model).unwrap();
    let mut opt = AdamW::new(adapter.trainable_vars(), AdamWConfig::default()).unwrap();
    let ids = Tensor::arange(0u32, 256, &dev)
        .unwrap()
        .reshape((2, 128))
        .unwrap();
    let labels = ids.to_dtype(DType::I64).unwrap();
    c.bench_function("lora r8 q,v train step qwen2 small (4L h256) 2x128", |b| {
        b.iter(|| {
            let (loss, _) = lm_loss(&model, &ids, None, &labels).unwrap();
            let grads = metal_candle::training::backward(&loss).unwrap();
            let g = opt.collect_grads(&grads).unwrap();
            opt.step_with(&g).unwrap();
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = kernels, generation, embeddings, lora
}
criterion_main!(benches);
