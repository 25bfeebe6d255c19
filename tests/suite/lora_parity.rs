//! LoRA against peft on the tiny Qwen2 fixture: loss, logits and every
//! lora_A / lora_B gradient for the same base, adapter and batch; AdamW +
//! schedule + clipping against torch; the schedules against transformers.
//! References: scripts/fixtures/lora.py.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use metal_candle::models::{load_decoder, CausalLm};
use metal_candle::training::{
    clip_grad_norm, lm_loss, load_peft_adapter, AdamW, AdamWConfig, LRScheduler, LoRAAdapter,
};

fn tiny_model() -> Box<dyn CausalLm> {
    let dir = crate::common::fixture("qwen2-tiny");
    load_decoder(
        dir.to_str().unwrap(),
        Some(DType::F32),
        &crate::common::device(),
    )
    .unwrap()
}

struct Batch {
    ids: Tensor,
    mask: Tensor,
    labels: Tensor,
}

fn batch(r: &HashMap<String, Tensor>) -> Batch {
    let dev = crate::common::device();
    Batch {
        ids: r["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_device(&dev)
            .unwrap(),
        mask: r["attention_mask"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_device(&dev)
            .unwrap(),
        labels: r["labels"].to_device(&dev).unwrap(),
    }
}

/// Relative logits difference at real (non-padding) tokens only: padding
/// positions get other (irrelevant) positions here than in transformers.
fn real_token_logits_diff(ours: &Tensor, theirs: &Tensor, mask: &Tensor) -> f32 {
    let rows = mask.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let mut worst = 0f32;
    for (b, row) in rows.iter().enumerate() {
        let n = row.iter().filter(|&&m| m == 1).count();
        let o = ours.get(b).unwrap().narrow(0, 0, n).unwrap();
        let t = theirs.get(b).unwrap().narrow(0, 0, n).unwrap();
        worst = worst.max(crate::common::rel_diff(&o, &t));
    }
    worst
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

/// Loss, logits and gradients with `adapter` attached: the model's ops
/// take their differentiable paths because the adapter's weights track
/// gradients (nobody sets a mode).
fn run(adapter: &LoRAAdapter, b: &Batch) -> (f32, Tensor, candle_core::backprop::GradStore) {
    let mut model = tiny_model();
    adapter.attach(&mut model).unwrap();
    let logits = model.forward(&b.ids, Some(&b.mask), None).unwrap();
    // The training loss: fused with the output projection, chunked.
    let (loss, _) = lm_loss(&model, &b.ids, Some(&b.mask), &b.labels).unwrap();
    let grads = metal_candle::training::backward(&loss).unwrap();
    (scalar(&loss), logits, grads)
}

fn check_against_peft(adapter: &LoRAAdapter, suffix: &str) {
    let r = crate::common::reference("lora");
    let b = batch(&r);
    let (loss, logits, grads) = run(adapter, &b);
    let want = scalar(&r[&format!("loss{suffix}")]);
    let rel = ((loss - want) / want).abs();
    println!("loss{suffix}: ours {loss} peft {want} rel {rel:e}");
    assert!(rel < 1e-5, "loss{suffix} {loss} vs peft {want}");
    let d = real_token_logits_diff(
        &logits,
        &r[&format!("logits{suffix}")],
        &r["attention_mask"],
    );
    println!("logits{suffix} rel diff {d:e}");
    assert!(d < 1e-4);
    let mut worst = 0f32;
    let named = adapter.named_vars();
    assert_eq!(named.len(), 2 * 7 * 2, "7 modules x 2 layers x (A, B)");
    for (name, var) in named {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let theirs = &r[&format!("grad{suffix}.base_model.model.{name}")];
        let d = crate::common::rel_diff(g, theirs);
        assert!(d < 1e-4, "{name}: gradient rel diff {d}");
        worst = worst.max(d);
    }
    println!("worst gradient rel diff{suffix}: {worst:e}");
}

#[test]
fn loss_logits_and_gradients_match_peft() {
    let adapter = load_peft_adapter(
        &crate::common::fixture("lora-peft"),
        &crate::common::device(),
    )
    .unwrap();
    assert!(
        (adapter.layers()[0].1.scale() - 2.0).abs() < 1e-12,
        "alpha/r = 8/4"
    );
    check_against_peft(&adapter, "");
}

#[test]
fn rslora_scale_matches_peft() {
    // The same weights with use_rslora: scale alpha/sqrt(r) = 4.
    let dir = tempfile::tempdir().unwrap();
    let src = crate::common::fixture("lora-peft");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    cfg["use_rslora"] = serde_json::Value::Bool(true);
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let adapter = load_peft_adapter(dir.path(), &crate::common::device()).unwrap();
    assert!((adapter.layers()[0].1.scale() - 4.0).abs() < 1e-12);
    check_against_peft(&adapter, "_rslora");
}

/// Every LoRA layer (7 modules x every decoder layer) gets a non-zero
/// gradient for A and B: no fused op without a backward sits on the path.
fn nonzero_gradient_layers() -> usize {
    let r = crate::common::reference("lora");
    let adapter = load_peft_adapter(
        &crate::common::fixture("lora-peft"),
        &crate::common::device(),
    )
    .unwrap();
    let (_, _, grads) = run(&adapter, &batch(&r));
    adapter
        .layers()
        .iter()
        .filter(|(_, l)| {
            [l.a(), l.b()].iter().all(|v| {
                grads.get(v.as_tensor()).is_some_and(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0
                })
            })
        })
        .count()
}

#[test]
fn every_lora_layer_gets_a_gradient() {
    let n = nonzero_gradient_layers();
    assert_eq!(n, 14, "7 target modules x 2 layers");
}

#[test]
fn fresh_adapter_is_peft_initialised_and_a_no_op() {
    let model = tiny_model();
    let cfg = metal_candle::training::LoRAAdapterConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: metal_candle::training::TargetModule::ALL.to_vec(),
        use_rslora: false,
    };
    let adapter = LoRAAdapter::new(cfg, &model, &crate::common::device(), 0).unwrap();
    // q: 64->64, k/v: 64->32 (2 kv heads x 16), gate/up 64->96, down 96->64.
    let shapes: Vec<(String, Vec<usize>, Vec<usize>)> = adapter
        .layers()
        .iter()
        .take(7)
        .map(|(p, l)| (p.clone(), l.a().dims().to_vec(), l.b().dims().to_vec()))
        .collect();
    let want = [
        ("q_proj", [4, 64], [64, 4]),
        ("k_proj", [4, 64], [32, 4]),
        ("v_proj", [4, 64], [32, 4]),
        ("o_proj", [4, 64], [64, 4]),
        ("gate_proj", [4, 64], [96, 4]),
        ("up_proj", [4, 64], [96, 4]),
        ("down_proj", [4, 96], [64, 4]),
    ];
    for ((p, a, b), (m, wa, wb)) in shapes.iter().zip(want) {
        assert!(p.ends_with(m), "{p}");
        assert_eq!(a.as_slice(), wa, "{p} A");
        assert_eq!(b.as_slice(), wb, "{p} B");
    }
    // r * (in + out) per layer, 2 decoder layers.
    let per_layer: usize = [
        (64, 64),
        (64, 32),
        (64, 32),
        (64, 64),
        (64, 96),
        (64, 96),
        (96, 64),
    ]
    .iter()
    .map(|(i, o)| 4 * (i + o))
    .sum();
    assert_eq!(adapter.num_trainable_params(), 2 * per_layer);
    // A uniform in +-1/sqrt(fan_in) (kaiming_uniform_ with a = sqrt(5)), B zeros.
    for (p, l) in adapter.layers() {
        let a = l
            .a()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bound = 1.0 / (l.a().dims()[1] as f32).sqrt();
        let max = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            max <= bound && max > 0.9 * bound,
            "{p}: max |A| {max}, bound {bound}"
        );
        let b = l
            .b()
            .as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(b, 0.0);
    }
    // B = 0: the adapted model equals the base.
    let r = crate::common::reference("lora");
    let b = batch(&r);
    let base = model.forward(&b.ids, Some(&b.mask), None).unwrap();
    let mut adapted = tiny_model();
    adapter.attach(&mut adapted).unwrap();
    let out = adapted.forward(&b.ids, Some(&b.mask), None).unwrap();
    // With trainable weights attached, softmax/RoPE/RMSNorm take their
    // differentiable compositions instead of the fused kernels, which round
    // differently in the last bits (f32): equal up to that.
    let d = crate::common::max_abs_diff(&base, &out);
    assert!(d <= 1e-5, "adapted vs base {d}");
    // The adapter's own contribution is exactly zero.
    let x = Tensor::ones((1, 3, 64), DType::F32, &crate::common::device()).unwrap();
    for (path, l) in adapter.layers() {
        if path.ends_with("q_proj") {
            let y = metal_candle::layers::LinearAdapter::forward(&**l, &x).unwrap();
            assert_eq!(
                y.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }
}

#[test]
fn adamw_schedule_and_clipping_match_torch() {
    adamw_against_torch(DType::F32, 1e-6);
}

/// The fused update on bf16 parameters (moments in bf16, math in f32)
/// against torch's f32 run: within bf16 rounding of the weights' scale
/// (2e-2 of the largest weight over six steps).
#[test]
fn adamw_in_bf16_follows_torch_f32() {
    adamw_against_torch(DType::BF16, 2e-2);
}

/// AdamW with warmup-cosine and clipping on the fixture's three parameters
/// in `dtype`, each step's weights against torch's (f32) within `tol` of
/// the largest weight (1 for f32's absolute bound).
fn adamw_against_torch(dtype: DType, tol: f32) {
    let r = crate::common::reference("lora");
    let dev = crate::common::device();
    let vars: Vec<candle_core::Var> = (0..3)
        .map(|i| {
            let init = r[&format!("adamw.param{i}.init")].to_dtype(dtype).unwrap();
            candle_core::Var::from_tensor(&init.to_device(&dev).unwrap()).unwrap()
        })
        .collect();
    let sched = LRScheduler::WarmupCosine {
        lr: 0.05,
        warmup_steps: 2,
        total_steps: 6,
    };
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: 0.05,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let lrs = r["adamw.lr"].to_vec1::<f64>().unwrap();
    let mut clipped = 0;
    let mut worst = 0f32;
    for (k, want_lr) in lrs.iter().enumerate() {
        let mut grads: Vec<Option<Tensor>> = (0..3)
            .map(|i| {
                Some(
                    r[&format!("adamw.grad{i}.step{k}")]
                        .to_dtype(dtype)
                        .unwrap()
                        .to_device(&dev)
                        .unwrap(),
                )
            })
            .collect();
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        clipped += usize::from(norm > 1.0);
        let lr = sched.lr_at(k);
        assert!(
            (lr - want_lr).abs() < 1e-12,
            "step {k}: lr {lr} vs {want_lr}"
        );
        opt.set_lr(lr);
        opt.step_with(&grads).unwrap();
        for (i, v) in vars.iter().enumerate() {
            let want = &r[&format!("adamw.param{i}.step{k}")];
            let got = v.as_tensor().to_device(&candle_core::Device::Cpu).unwrap();
            let d = crate::common::max_abs_diff(&got.to_dtype(DType::F32).unwrap(), want);
            let scale = if dtype == DType::F32 {
                1.0
            } else {
                crate::common::abs_max(want)
            };
            worst = worst.max(d / scale);
            assert!(
                d < tol * scale,
                "{dtype:?} step {k} param {i}: max abs diff {d}"
            );
        }
    }
    assert!(
        clipped >= 2 && clipped < lrs.len(),
        "both clipped and unclipped steps are exercised"
    );
    println!("AdamW {dtype:?} vs torch f32: worst difference {worst:.1e}");
}

#[test]
fn schedules_match_transformers() {
    let r = crate::common::reference("lora");
    let cases = [
        ("constant", LRScheduler::Constant { lr: 1.0 }),
        (
            "linear",
            LRScheduler::LinearDecay {
                lr: 1.0,
                total_steps: 10,
            },
        ),
        (
            "cosine",
            LRScheduler::Cosine {
                lr: 1.0,
                total_steps: 10,
            },
        ),
        (
            "warmup_linear",
            LRScheduler::WarmupLinear {
                lr: 1.0,
                warmup_steps: 3,
                total_steps: 10,
            },
        ),
        (
            "warmup_cosine",
            LRScheduler::WarmupCosine {
                lr: 1.0,
                warmup_steps: 3,
                total_steps: 10,
            },
        ),
    ];
    for (name, s) in cases {
        let want = r[&format!("schedule.{name}")].to_vec1::<f64>().unwrap();
        for (k, w) in want.iter().enumerate() {
            assert!(
                (s.lr_at(k) - w).abs() < 1e-12,
                "{name} step {k}: {} vs {w}",
                s.lr_at(k)
            );
        }
    }
}
