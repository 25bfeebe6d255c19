//! LoRA beyond one forward pass: our adapters loaded by peft (and peft's
//! by us), merging, the adapter registry, exact resume, and the NaN guard.
//! References: scripts/fixtures/lora.py.

use std::path::Path;

use candle_core::{DType, Tensor};
use metal_candle::models::{load_decoder, CausalLm};
use metal_candle::training::{
    load_peft_adapter, save_peft_adapter, AdamWConfig, AdapterRegistry, Dataset, TrainingMetrics,
};
use metal_candle::training::{
    LRScheduler, LoRAAdapter, LoRAAdapterConfig, TargetModule, Trainer, TrainingConfig,
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

fn all_modules(rank: usize, alpha: f64) -> LoRAAdapterConfig {
    LoRAAdapterConfig {
        rank,
        alpha,
        dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    }
}

/// Logits at the real tokens of the fixture batch, as one `[n, vocab]` tensor.
fn real_logits(model: &dyn CausalLm) -> Tensor {
    let r = crate::common::reference("lora");
    let dev = crate::common::device();
    let ids = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let mask = r["attention_mask"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let logits = model
        .forward(&ids, Some(&mask), None)
        .unwrap()
        .to_device(&candle_core::Device::Cpu)
        .unwrap();
    real_rows(&logits, &r["attention_mask"])
}

fn real_rows(logits: &Tensor, mask: &Tensor) -> Tensor {
    let rows = mask.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let parts: Vec<Tensor> = rows
        .iter()
        .enumerate()
        .map(|(b, row)| {
            let n = row.iter().filter(|&&m| m == 1).count();
            logits.get(b).unwrap().narrow(0, 0, n).unwrap()
        })
        .collect();
    Tensor::cat(&parts, 0).unwrap()
}

/// Our adapter with deterministic non-zero weights (seeded A; B from a
/// fixed formula, since fresh B is zero and would make the test trivial).
fn our_adapter(model: &dyn CausalLm) -> LoRAAdapter {
    let adapter =
        LoRAAdapter::new(all_modules(4, 8.0), model, &crate::common::device(), 1234).unwrap();
    for (i, (_, l)) in adapter.layers().iter().enumerate() {
        let n = l.b().elem_count();
        let b = (Tensor::arange(0u32, n as u32, &crate::common::device())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            * (0.37 + i as f64 * 0.01))
            .unwrap()
            .sin()
            .unwrap()
            * 0.1;
        l.b()
            .set(&b.unwrap().reshape(l.b().dims()).unwrap())
            .unwrap();
    }
    adapter
}

/// Interop, our side: the adapter in tests/fixtures/lora-ours is exactly
/// what the code writes now (METAL_CANDLE_WRITE_FIXTURES=1 rewrites it; then
/// rerun `python3 scripts/make_fixtures.py lora` for peft's logits), and
/// peft's logits for it equal ours.
#[test]
fn our_adapter_loads_in_peft_with_the_same_logits() {
    let model = tiny_model();
    let adapter = our_adapter(&model);
    let fixture = crate::common::fixture("lora-ours");
    let tmp = tempfile::tempdir().unwrap();
    save_peft_adapter(&adapter, tmp.path(), Some("tests/fixtures/qwen2-tiny")).unwrap();
    if std::env::var("METAL_CANDLE_WRITE_FIXTURES").is_ok_and(|v| v == "1") {
        save_peft_adapter(&adapter, &fixture, Some("tests/fixtures/qwen2-tiny")).unwrap();
    }
    let on_cpu = crate::common::device().is_cpu();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let now = std::fs::read(tmp.path().join(f)).unwrap();
        let committed = std::fs::read(fixture.join(f)).unwrap();
        if on_cpu || f.ends_with(".json") {
            assert!(now == committed, "{f} differs from the committed fixture");
        } else {
            // The GPU's sin() rounds differently in the last bit: same
            // tensors, not the same bytes.
            let load = |p: &std::path::Path| {
                candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap()
            };
            let (a, b) = (load(&tmp.path().join(f)), load(&fixture.join(f)));
            assert_eq!(a.len(), b.len());
            for (name, t) in &a {
                let d = crate::common::max_abs_diff(t, &b[name]);
                assert!(
                    d <= 1e-6,
                    "{name} differs from the committed fixture by {d}"
                );
            }
        }
    }
    let peft_logits = &crate::common::reference("lora-ours")["logits"];
    let mut m = tiny_model();
    load_peft_adapter(&fixture, &crate::common::device())
        .unwrap()
        .attach(&mut m)
        .unwrap();
    let ours = real_logits(&m);
    let theirs = real_rows(
        peft_logits,
        &crate::common::reference("lora")["attention_mask"],
    );
    let d = crate::common::rel_diff(&ours, &theirs);
    let base = crate::common::rel_diff(&real_logits(&model), &theirs);
    println!("ours-saved adapter: logits rel diff vs peft {d:e} (base model differs by {base:e})");
    assert!(d < 1e-4);
    assert!(
        base > 1e-2,
        "the adapter must change the logits for the test to mean anything"
    );
}

#[test]
fn merged_weights_equal_the_attached_adapter() {
    let adapter = load_peft_adapter(
        &crate::common::fixture("lora-peft"),
        &crate::common::device(),
    )
    .unwrap();
    let mut with_adapter = tiny_model();
    adapter.attach(&mut with_adapter).unwrap();
    let want = real_logits(&with_adapter);
    let mut merged = tiny_model();
    adapter.merge_into(&mut merged).unwrap();
    assert!(merged
        .linear_layers()
        .iter()
        .all(|(_, l)| l.adapter().is_none()));
    let d = crate::common::rel_diff(&real_logits(&merged), &want);
    println!("merged vs attached: rel diff {d:e}");
    assert!(d < 1e-5);
    assert!(crate::common::rel_diff(&real_logits(&tiny_model()), &want) > 1e-2);
}

#[test]
fn registry_switches_adapters_on_one_base() {
    let mut model = tiny_model();
    let base = real_logits(&model);
    let peft = load_peft_adapter(
        &crate::common::fixture("lora-peft"),
        &crate::common::device(),
    )
    .unwrap();
    let ours = our_adapter(&model);
    let mut reg = AdapterRegistry::new();
    reg.insert("peft", peft.clone());
    reg.insert("ours", ours.clone());
    assert_eq!(reg.names(), vec!["ours", "peft"]);

    let alone = |a: &LoRAAdapter| {
        let mut m = tiny_model();
        a.attach(&mut m).unwrap();
        real_logits(&m)
    };
    reg.activate("peft", &mut model).unwrap();
    assert_eq!(
        crate::common::max_abs_diff(&real_logits(&model), &alone(&peft)),
        0.0
    );
    reg.activate("ours", &mut model).unwrap();
    assert_eq!(reg.active(), Some("ours"));
    assert_eq!(
        crate::common::max_abs_diff(&real_logits(&model), &alone(&ours)),
        0.0
    );
    reg.deactivate(&mut model);
    assert_eq!(
        crate::common::max_abs_diff(&real_logits(&model), &base),
        0.0
    );
    assert!(reg.activate("missing", &mut model).is_err());
}

/// Random-token examples of 6..=10 tokens with a masked "prompt" of 2.
fn synthetic_dataset(n: usize, seed: u64) -> Dataset {
    crate::common::random_dataset(n, seed, |i| 6 + i % 5)
}

fn training_config(max_steps: usize, out: &Path) -> TrainingConfig {
    TrainingConfig {
        max_steps: Some(max_steps),
        batch_size: 3,
        grad_accum_steps: 2,
        lr_schedule: LRScheduler::WarmupCosine {
            lr: 1e-2,
            warmup_steps: 2,
            total_steps: 8,
        },
        optimizer: AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        max_grad_norm: Some(0.5),
        eval_every: Some(4),
        output_dir: Some(out.to_path_buf()),
        seed: 9,
        progress: false,
        ..TrainingConfig::default()
    }
}

fn losses(m: &TrainingMetrics) -> Vec<f64> {
    m.steps.iter().map(|s| s.loss).collect()
}

#[test]
fn resume_continues_exactly() {
    let data = synthetic_dataset(10, 1);
    let eval = synthetic_dataset(4, 2);
    // Dropout on: its masks must resume identically too.
    let cfg = LoRAAdapterConfig {
        dropout: 0.1,
        ..all_modules(4, 8.0)
    };

    let dir_a = tempfile::tempdir().unwrap();
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(cfg.clone(), &m, &crate::common::device(), 5).unwrap();
    let straight = Trainer::new(&mut m, &adapter, training_config(8, dir_a.path()))
        .unwrap()
        .train(&data, Some(&eval))
        .unwrap();
    assert_eq!(straight.steps.len(), 8);
    assert!(
        std::fs::read_to_string(dir_a.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
            == 8
    );

    let dir_b = tempfile::tempdir().unwrap();
    let mut m1 = tiny_model();
    let a1 = LoRAAdapter::new(cfg.clone(), &m1, &crate::common::device(), 5).unwrap();
    let mut t1 = Trainer::new(&mut m1, &a1, training_config(4, dir_b.path())).unwrap();
    t1.train(&data, Some(&eval)).unwrap();
    let ckpt = dir_b.path().join("checkpoint-4");
    t1.save_checkpoint(&ckpt).unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).exists(), "{f}");
    }
    // A fresh process: other initial weights, which resuming must overwrite.
    let mut m2 = tiny_model();
    let a2 = LoRAAdapter::new(cfg, &m2, &crate::common::device(), 77).unwrap();
    let mut t2 = Trainer::new(&mut m2, &a2, training_config(8, dir_b.path())).unwrap();
    t2.resume_from(&ckpt).unwrap();
    assert_eq!(t2.step(), 4);
    let resumed = t2.train(&data, Some(&eval)).unwrap();

    let (a, b) = (losses(&straight), losses(&resumed));
    println!("straight {a:?}\nresumed  {b:?}");
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
    }
    assert!((straight.final_eval_loss.unwrap() - resumed.final_eval_loss.unwrap()).abs() < 1e-6);
    for ((n, v1), (_, v2)) in adapter.named_vars().iter().zip(a2.named_vars()) {
        assert!(
            crate::common::max_abs_diff(v1.as_tensor(), v2.as_tensor()) < 1e-6,
            "{n}"
        );
    }
    // The loss falls on this (memorisable) data, and eval is recorded.
    assert!(a[7] < a[0], "loss {} -> {}", a[0], a[7]);
    assert!(straight.initial_eval_loss.is_some());
}

#[test]
fn nonfinite_loss_stops_with_a_clear_error() {
    let data = synthetic_dataset(6, 3);
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(all_modules(2, 4.0), &m, &crate::common::device(), 0).unwrap();
    let (_, l) = &adapter.layers()[0];
    l.b()
        .set(&(l.b().as_tensor().ones_like().unwrap() * f64::NAN).unwrap())
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = Trainer::new(&mut m, &adapter, training_config(2, out.path()))
        .unwrap()
        .train(&data, None)
        .unwrap_err();
    assert!(
        matches!(err, metal_candle::Error::NonFiniteLoss { step: 1, .. }),
        "{err}"
    );
}

/// Two micro-batches of 2 accumulated equal one batch of 4 (token-weighted
/// loss), since both read the same seeded order.
#[test]
fn gradient_accumulation_equals_a_larger_batch() {
    let data = synthetic_dataset(8, 4);
    let run = |batch_size: usize, accum: usize| {
        let mut m = tiny_model();
        let adapter =
            LoRAAdapter::new(all_modules(4, 8.0), &m, &crate::common::device(), 3).unwrap();
        let cfg = TrainingConfig {
            max_steps: Some(3),
            batch_size,
            grad_accum_steps: accum,
            lr_schedule: LRScheduler::Constant { lr: 1e-2 },
            max_grad_norm: Some(1.0),
            progress: false,
            ..TrainingConfig::default()
        };
        let metrics = Trainer::new(&mut m, &adapter, cfg)
            .unwrap()
            .train(&data, None)
            .unwrap();
        (losses(&metrics), adapter)
    };
    let (l1, a1) = run(4, 1);
    let (l2, a2) = run(2, 2);
    println!("batch 4: {l1:?}\n2 x 2:   {l2:?}");
    for (x, y) in l1.iter().zip(&l2) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    for ((n, v1), (_, v2)) in a1.named_vars().iter().zip(a2.named_vars()) {
        assert!(
            crate::common::max_abs_diff(v1.as_tensor(), v2.as_tensor()) < 1e-5,
            "{n}"
        );
    }
}

#[test]
fn dropout_only_in_training_mode() {
    let mut m = tiny_model();
    let cfg = LoRAAdapterConfig {
        dropout: 0.5,
        ..all_modules(4, 8.0)
    };
    let adapter = our_adapter_with(&m, cfg);
    adapter.attach(&mut m).unwrap();
    let eval1 = real_logits(&m);
    let eval2 = real_logits(&m);
    assert_eq!(
        crate::common::max_abs_diff(&eval1, &eval2),
        0.0,
        "no dropout in inference mode"
    );
    adapter.set_training(true);
    let train = real_logits(&m);
    adapter.set_training(false);
    assert!(
        crate::common::max_abs_diff(&eval1, &train) > 1e-3,
        "dropout active in training mode"
    );
}

fn our_adapter_with(model: &dyn CausalLm, cfg: LoRAAdapterConfig) -> LoRAAdapter {
    let adapter = LoRAAdapter::new(cfg, model, &crate::common::device(), 8).unwrap();
    for (_, l) in adapter.layers() {
        l.b()
            .set(&(l.b().as_tensor().ones_like().unwrap() * 0.05).unwrap())
            .unwrap();
    }
    adapter
}
