//! Issue 15: nothing lost, nothing silent. One test per defect found by the
//! hostile-user probe: training settings validated up front, no non-finite
//! adapter ever written or returned, resume checked and all-or-nothing,
//! loading that never leaves the model folder nor accepts mismatched or
//! non-finite adapters, and clean messages.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use metal_candle::models::{load_decoder, CausalLm};
use metal_candle::training::{
    load_peft_adapter, save_peft_adapter, AdamWConfig, Dataset, LRScheduler, LoRAAdapter,
    LoRAAdapterConfig, TargetModule, Trainer, TrainingConfig,
};
use metal_candle::Error;

use crate::common::{device, fixture};

fn tiny_model() -> Box<dyn CausalLm> {
    load_decoder(
        fixture("qwen2-tiny").to_str().unwrap(),
        Some(DType::F32),
        &device(),
    )
    .unwrap()
}

fn lora(alpha: f64) -> LoRAAdapterConfig {
    LoRAAdapterConfig {
        rank: 2,
        alpha,
        dropout: 0.0,
        target_modules: vec![TargetModule::QProj, TargetModule::VProj],
        use_rslora: false,
    }
}

/// `n` examples of `len` pseudo-random tokens (first two masked).
fn dataset(n: usize, len: usize, seed: u64) -> Dataset {
    crate::common::random_dataset(n, seed, |_| len)
}

fn config(max_steps: usize, out: Option<&Path>) -> TrainingConfig {
    TrainingConfig {
        max_steps: Some(max_steps),
        batch_size: 2,
        lr_schedule: LRScheduler::Constant { lr: 1e-2 },
        output_dir: out.map(Path::to_path_buf),
        shuffle: false,
        ..TrainingConfig::default()
    }
}

fn all_finite(adapter: &LoRAAdapter) -> bool {
    adapter.named_vars().iter().all(|(_, v)| {
        v.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite())
    })
}

fn snapshot(adapter: &LoRAAdapter) -> Vec<Vec<f32>> {
    adapter
        .named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

/// Runs `cfg` on a fresh adapter; returns the result and the adapter.
fn train_with(
    cfg: TrainingConfig,
    lora_cfg: LoRAAdapterConfig,
) -> (metal_candle::Result<usize>, LoRAAdapter) {
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(lora_cfg, &m, &device(), 1).unwrap();
    let data = dataset(4, 8, 1);
    let r = Trainer::new(&mut m, &adapter, cfg).and_then(|mut t| {
        t.train(&data, None)?;
        Ok(t.step())
    });
    (r, adapter)
}

fn expect_config_error(r: metal_candle::Result<usize>, field: &str) {
    match r {
        Err(e @ Error::InvalidConfig { .. }) => {
            assert!(e.to_string().contains(field), "`{field}` not named: {e}");
        }
        other => panic!("expected InvalidConfig naming `{field}`, got {other:?}"),
    }
}

#[test]
fn nonfinite_or_negative_training_settings_are_rejected_naming_the_field() {
    let base = || config(1, None);
    let cases: Vec<(TrainingConfig, &str)> = vec![
        (
            TrainingConfig {
                lr_schedule: LRScheduler::Constant { lr: f64::NAN },
                ..base()
            },
            "lr",
        ),
        (
            TrainingConfig {
                lr_schedule: LRScheduler::WarmupCosine {
                    lr: f64::INFINITY,
                    warmup_steps: 1,
                    total_steps: 4,
                },
                ..base()
            },
            "lr",
        ),
        (
            TrainingConfig {
                lr_schedule: LRScheduler::LinearDecay {
                    lr: -1e-3,
                    total_steps: 4,
                },
                ..base()
            },
            "lr",
        ),
        (
            TrainingConfig {
                optimizer: AdamWConfig {
                    eps: f64::NAN,
                    ..AdamWConfig::default()
                },
                ..base()
            },
            "eps",
        ),
        (
            TrainingConfig {
                optimizer: AdamWConfig {
                    weight_decay: f64::NAN,
                    ..AdamWConfig::default()
                },
                ..base()
            },
            "weight_decay",
        ),
        (
            TrainingConfig {
                optimizer: AdamWConfig {
                    beta1: f64::NAN,
                    ..AdamWConfig::default()
                },
                ..base()
            },
            "beta1",
        ),
        (
            TrainingConfig {
                max_grad_norm: Some(-1.0),
                ..base()
            },
            "max_grad_norm",
        ),
        (
            TrainingConfig {
                max_grad_norm: Some(f64::NAN),
                ..base()
            },
            "max_grad_norm",
        ),
    ];
    for (cfg, field) in cases {
        let (r, adapter) = train_with(cfg, lora(4.0));
        expect_config_error(r, field);
        assert!(all_finite(&adapter));
    }
    // alpha = 0 would train nothing (the update is scaled by 0).
    let m = tiny_model();
    for alpha in [0.0, -2.0, f64::NAN] {
        let err = LoRAAdapter::new(lora(alpha), &m, &device(), 1).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { .. }) && err.to_string().contains("alpha"),
            "{err}"
        );
    }
}

/// A step that overflows the weights (a finite but absurd learning rate)
/// stops training naming the step, and leaves the adapter at its last
/// finite values: nothing non-finite is returned or written.
#[test]
fn a_nonfinite_update_stops_training_and_writes_nothing() {
    let out = tempfile::tempdir().unwrap();
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(lora(4.0), &m, &device(), 1).unwrap();
    let before = snapshot(&adapter);
    let cfg = TrainingConfig {
        lr_schedule: LRScheduler::Constant { lr: 1e39 },
        save_every: Some(1),
        ..config(3, Some(out.path()))
    };
    let data = dataset(4, 8, 1);
    let mut t = Trainer::new(&mut m, &adapter, cfg).unwrap();
    let err = t.train(&data, None).unwrap_err();
    assert!(err.to_string().contains("step 1"), "{err}");
    assert_eq!(t.step(), 0, "the failed step is not counted");
    drop(t);
    assert!(all_finite(&adapter));
    assert_eq!(snapshot(&adapter), before, "the adapter is left as it was");
    let written: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint") || n.starts_with("adapter"))
        .collect();
    assert!(written.is_empty(), "{written:?}");
}

/// An example longer than the model's context (128 positions) is found
/// before step 1, not when its batch comes up.
#[test]
fn examples_longer_than_the_context_fail_before_the_first_step() {
    let mut examples = dataset(5, 8, 2).examples().to_vec();
    let long = dataset(1, 200, 3).examples()[0].clone();
    examples.push(long);
    let data = Dataset::from_examples(examples).unwrap();
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(lora(4.0), &m, &device(), 1).unwrap();
    let cfg = TrainingConfig {
        batch_size: 1,
        ..config(6, None)
    };
    let mut t = Trainer::new(&mut m, &adapter, cfg).unwrap();
    let err = t.train(&data, None).unwrap_err();
    assert_eq!(t.step(), 0, "no step was taken: {err}");
    let msg = err.to_string();
    assert!(msg.contains("200") && msg.contains("128"), "{msg}");
}

/// Trains 2 steps with a checkpoint after each into `out`.
fn checkpointed_run(out: &Path, lora_cfg: LoRAAdapterConfig) -> PathBuf {
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(lora_cfg, &m, &device(), 1).unwrap();
    let cfg = TrainingConfig {
        save_every: Some(1),
        ..config(2, Some(out))
    };
    Trainer::new(&mut m, &adapter, cfg)
        .unwrap()
        .train(&dataset(4, 8, 1), None)
        .unwrap();
    out.join("checkpoint-2")
}

#[test]
fn resuming_with_other_adapter_or_training_settings_names_the_field() {
    let out = tempfile::tempdir().unwrap();
    let ckpt = checkpointed_run(out.path(), lora(4.0));
    let cases: Vec<(LoRAAdapterConfig, TrainingConfig, &str)> = vec![
        (lora(8.0), config(4, None), "alpha"),
        (
            LoRAAdapterConfig {
                use_rslora: true,
                ..lora(4.0)
            },
            config(4, None),
            "use_rslora",
        ),
        (
            LoRAAdapterConfig {
                dropout: 0.1,
                ..lora(4.0)
            },
            config(4, None),
            "dropout",
        ),
        (
            lora(4.0),
            TrainingConfig {
                lr_schedule: LRScheduler::Constant { lr: 5e-3 },
                ..config(4, None)
            },
            "lr_schedule",
        ),
        (
            lora(4.0),
            TrainingConfig {
                seed: 7,
                ..config(4, None)
            },
            "seed",
        ),
        (
            lora(4.0),
            TrainingConfig {
                batch_size: 3,
                ..config(4, None)
            },
            "batch_size",
        ),
    ];
    for (lc, tc, field) in cases {
        let mut m = tiny_model();
        let adapter = LoRAAdapter::new(lc, &m, &device(), 9).unwrap();
        let before = snapshot(&adapter);
        let mut t = Trainer::new(&mut m, &adapter, tc).unwrap();
        let err = t.resume_from(&ckpt).unwrap_err();
        assert!(err.to_string().contains(field), "`{field}`: {err}");
        assert_eq!(t.step(), 0);
        drop(t);
        assert_eq!(snapshot(&adapter), before, "nothing restored");
    }
    // Settings that do not change the trajectory may differ (a longer run).
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(lora(4.0), &m, &device(), 9).unwrap();
    let mut t = Trainer::new(&mut m, &adapter, config(4, None)).unwrap();
    t.resume_from(&ckpt).unwrap();
    assert_eq!(t.step(), 2);
}

#[test]
fn a_broken_optimizer_file_fails_the_resume_before_anything_changes() {
    let out = tempfile::tempdir().unwrap();
    let ckpt = checkpointed_run(out.path(), lora(4.0));
    let opt = ckpt.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    for (what, content) in [
        ("missing", None),
        ("truncated", Some(bytes[..bytes.len() / 2].to_vec())),
    ] {
        match &content {
            None => std::fs::remove_file(&opt).unwrap(),
            Some(b) => std::fs::write(&opt, b).unwrap(),
        }
        let mut m = tiny_model();
        let adapter = LoRAAdapter::new(lora(4.0), &m, &device(), 9).unwrap();
        let before = snapshot(&adapter);
        let mut t = Trainer::new(&mut m, &adapter, config(4, None)).unwrap();
        let err = t.resume_from(&ckpt).unwrap_err();
        assert!(err.to_string().contains("optimizer"), "{what}: {err}");
        assert_eq!(t.step(), 0, "{what}");
        drop(t);
        assert_eq!(snapshot(&adapter), before, "{what}: adapter overwritten");
    }
}

#[test]
fn stale_temporary_checkpoint_folders_are_removed_at_start() {
    let out = tempfile::tempdir().unwrap();
    let stale = out.path().join(".checkpoint-3.tmp-999999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("adapter_model.safetensors"), b"partial").unwrap();
    let stale_file = out.path().join(".metrics.jsonl.tmp-999999");
    std::fs::write(&stale_file, b"partial").unwrap();
    checkpointed_run(out.path(), lora(4.0));
    assert!(!stale.exists() && !stale_file.exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A shard index naming a file outside the model folder is refused, even
/// when that file exists and would load.
#[test]
fn shard_paths_outside_the_model_folder_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture("qwen2-tiny-sharded"), &model);
    let shard = "model-00001-of-00005.safetensors";
    std::fs::rename(model.join(shard), tmp.path().join(shard)).unwrap();
    let index_path = model.join("model.safetensors.index.json");
    let index = std::fs::read_to_string(&index_path)
        .unwrap()
        .replace(&format!("\"{shard}\""), &format!("\"../{shard}\""));
    std::fs::write(&index_path, index).unwrap();
    let err = load_decoder(model.to_str().unwrap(), Some(DType::F32), &device()).unwrap_err();
    assert!(
        err.to_string().contains("outside") && err.to_string().contains(shard),
        "{err}"
    );
    for bad in ["/etc/passwd", "a/../../b.safetensors", "..\\x.safetensors"] {
        let repo = metal_candle::io::ModelRepo::from_dir(&model);
        let err = repo.get(bad).unwrap_err();
        assert!(err.to_string().contains("outside"), "{bad}: {err}");
    }
}

fn peft_copy(tmp: &Path) -> PathBuf {
    let dir = tmp.join("adapter");
    copy_dir(&fixture("lora-peft"), &dir);
    dir
}

#[test]
fn peft_target_modules_must_match_the_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = peft_copy(tmp.path());
    let path = dir.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // Tensors for all seven modules, a config naming two.
    cfg["target_modules"] = serde_json::json!(["q_proj", "v_proj"]);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load_peft_adapter(&dir, &device()).unwrap_err();
    // The first tensor (in name order) of a module the config does not name.
    assert!(
        err.to_string().contains("target_modules")
            && err.to_string().contains("down_proj")
            && err.to_string().contains("(q_proj, v_proj)"),
        "{err}"
    );
    // And the other way round: a module named with no tensors.
    let dir2 = tmp.path().join("two");
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(lora(4.0), &m, &device(), 1).unwrap();
    adapter.attach(&mut m).unwrap();
    save_peft_adapter(&adapter, &dir2, None).unwrap();
    let p2 = dir2.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p2).unwrap()).unwrap();
    cfg["target_modules"] = serde_json::json!(["q_proj", "up_proj", "v_proj"]);
    std::fs::write(&p2, cfg.to_string()).unwrap();
    let err = load_peft_adapter(&dir2, &device()).unwrap_err();
    assert!(err.to_string().contains("up_proj"), "{err}");
}

#[test]
fn nonfinite_adapter_weights_are_rejected_on_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = peft_copy(tmp.path());
    let path = dir.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let name = tensors
        .keys()
        .find(|k| k.contains("lora_A"))
        .unwrap()
        .clone();
    let t = &tensors[&name];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[3] = f32::NAN;
    let bad = Tensor::from_vec(v, t.shape(), &candle_core::Device::Cpu).unwrap();
    tensors.insert(name.clone(), bad);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_peft_adapter(&dir, &device()).unwrap_err();
    let layer = name.strip_prefix("base_model.model.").unwrap();
    assert!(
        err.to_string().contains(layer) && err.to_string().contains("finite"),
        "{err}"
    );
}

/// +inf logits are not "all -inf or NaN".
#[test]
fn infinite_logits_are_named_as_such() {
    use metal_candle::inference::{LogitsProcessor, Sampler, SamplingStrategy};
    let mut s = Sampler::new(LogitsProcessor::new(SamplingStrategy::Temperature), 0);
    let logits = Tensor::new(&[0f32, f32::INFINITY, 1.0], &candle_core::Device::Cpu).unwrap();
    let err = s.sample(&logits, &[], &[]).unwrap_err().to_string();
    assert!(
        err.contains("+inf") && !err.contains("-inf or NaN"),
        "{err}"
    );
    let logits = Tensor::new(&[f32::NAN, f32::NEG_INFINITY], &candle_core::Device::Cpu).unwrap();
    let err = s.sample(&logits, &[], &[]).unwrap_err().to_string();
    assert!(err.contains("-inf or NaN"), "{err}");
}

/// With RUST_BACKTRACE=1 Candle attaches a backtrace to its errors; ours
/// carry the message only.
#[test]
fn candle_backtraces_stay_out_of_our_messages() {
    let inner = candle_core::Error::Msg("shape mismatch in matmul".into());
    let with_bt = candle_core::Error::WithBacktrace {
        inner: Box::new(inner.context("while loading")),
        backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
    };
    let ours = Error::from(with_bt);
    assert_eq!(
        ours.to_string(),
        "while loading\nshape mismatch in matmul".replace('\n', ": ")
    );
}

/// A `max_position_embeddings` far beyond what positions can address is a
/// config error naming the field (no tensor is ever sized by it).
#[test]
fn huge_max_position_embeddings_is_a_config_error() {
    let text = std::fs::read_to_string(fixture("qwen2-tiny").join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["max_position_embeddings"] = serde_json::json!(1_000_000_000_000u64);
    let err =
        metal_candle::models::parse_decoder_config(&cfg.to_string(), "config.json").unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { .. })
            && err.to_string().contains("max_position_embeddings"),
        "{err}"
    );
}

#[test]
fn save_total_limit_keeps_the_newest_checkpoints_and_resume_from_latest_picks_the_last() {
    let out = tempfile::tempdir().unwrap();
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(lora(4.0), &m, &device(), 1).unwrap();
    let cfg = TrainingConfig {
        save_every: Some(1),
        save_total_limit: Some(2),
        ..config(5, Some(out.path()))
    };
    let straight = Trainer::new(&mut m, &adapter, cfg.clone())
        .unwrap()
        .train(&dataset(4, 8, 1), None)
        .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("checkpoint"))
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint-4", "checkpoint-5"]);

    let mut m2 = tiny_model();
    let a2 = LoRAAdapter::new(lora(4.0), &m2, &device(), 1).unwrap();
    let mut t2 = Trainer::new(&mut m2, &a2, cfg.clone()).unwrap();
    assert_eq!(t2.resume_from_latest(out.path()).unwrap(), Some(5));
    assert_eq!(t2.step(), 5);
    same_curve(&t2.train(&dataset(4, 8, 1), None).unwrap(), &straight);
    drop(t2);
    assert_eq!(snapshot(&a2), snapshot(&adapter));
    // An empty folder has nothing to resume.
    let empty = tempfile::tempdir().unwrap();
    let mut m3 = tiny_model();
    let a3 = LoRAAdapter::new(lora(4.0), &m3, &device(), 1).unwrap();
    let mut t3 = Trainer::new(&mut m3, &a3, cfg).unwrap();
    assert_eq!(t3.resume_from_latest(empty.path()).unwrap(), None);
    assert_eq!(t3.step(), 0);
}

/// A stop request ends the run after the current step with a checkpoint;
/// resuming from it gives the uninterrupted run's losses.
#[test]
fn a_stop_request_checkpoints_and_the_run_resumes_exactly() {
    let data = dataset(6, 8, 4);
    let straight_dir = tempfile::tempdir().unwrap();
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(lora(4.0), &m, &device(), 1).unwrap();
    let straight = Trainer::new(&mut m, &adapter, config(12, Some(straight_dir.path())))
        .unwrap()
        .train(&data, None)
        .unwrap();
    assert!(!straight.stopped_early);

    let out = tempfile::tempdir().unwrap();
    let mut m1 = tiny_model();
    let a1 = LoRAAdapter::new(lora(4.0), &m1, &device(), 1).unwrap();
    let mut t1 = Trainer::new(&mut m1, &a1, config(12, Some(out.path()))).unwrap();
    // A request made before the run is honoured after its first step.
    t1.stop_handle().request_stop();
    let partial = t1.train(&data, None).unwrap();
    assert!(partial.stopped_early);
    let steps = partial.steps.len();
    assert_eq!(steps, 1);
    assert!(!t1.stop_handle().is_requested(), "the request is consumed");
    assert!(out.path().join(format!("checkpoint-{steps}")).is_dir());
    assert!(
        !out.path().join("adapter_model.safetensors").exists(),
        "no final adapter for a stopped run"
    );
    drop(t1);

    let mut m2 = tiny_model();
    let a2 = LoRAAdapter::new(lora(4.0), &m2, &device(), 2).unwrap();
    let mut t2 = Trainer::new(&mut m2, &a2, config(12, Some(out.path()))).unwrap();
    assert_eq!(t2.resume_from_latest(out.path()).unwrap(), Some(steps));
    let resumed = t2.train(&data, None).unwrap();
    same_curve(&resumed, &straight);
}

#[test]
fn resume_with_allow_changes_accepts_other_settings() {
    use metal_candle::training::SettingsCheck;
    let out = tempfile::tempdir().unwrap();
    let ckpt = checkpointed_run(out.path(), lora(4.0));
    let mut m = tiny_model();
    let adapter = LoRAAdapter::new(lora(8.0), &m, &device(), 9).unwrap();
    let cfg = TrainingConfig {
        lr_schedule: LRScheduler::Constant { lr: 1e-3 },
        ..config(4, None)
    };
    let mut t = Trainer::new(&mut m, &adapter, cfg).unwrap();
    t.resume_with(&ckpt, SettingsCheck::AllowChanges).unwrap();
    assert_eq!(t.step(), 2);
}

/// Same steps, losses, learning rates and gradient norms (the latter went
/// through JSON in a checkpoint: equal to 1e-12); timings differ.
fn same_curve(
    a: &metal_candle::training::TrainingMetrics,
    b: &metal_candle::training::TrainingMetrics,
) {
    assert_eq!(a.steps.len(), b.steps.len());
    for (x, y) in a.steps.iter().zip(&b.steps) {
        assert_eq!(
            (x.step, x.epoch, x.loss, x.lr),
            (y.step, y.epoch, y.loss, y.lr)
        );
        assert!((x.grad_norm - y.grad_norm).abs() <= 1e-12 * x.grad_norm.max(1.0));
        assert_eq!(x.eval_loss, y.eval_loss);
    }
    assert_eq!(a.stopped_early, b.stopped_early);
}

/// A seed of the GGUF fuzz target (fuzz/make_seeds.py): a tiny valid
/// llama-architecture file with a gpt2 tokenizer and a chat template.
fn gguf_seed(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds/gguf")
            .join(name),
    )
    .unwrap()
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

fn load_gguf_bytes(bytes: &[u8]) -> metal_candle::Result<metal_candle::inference::LanguageModel> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    metal_candle::inference::LanguageModel::from_pretrained(
        path.to_str().unwrap(),
        Some(DType::F32),
        &candle_core::Device::Cpu,
    )
}

#[test]
fn the_gguf_fuzz_seed_loads_and_generates() {
    use metal_candle::inference::{Generator, GeneratorConfig};
    let lm = load_gguf_bytes(&gguf_seed("tiny_llama")).unwrap();
    assert_eq!(lm.model.config().vocab_size, 8);
    let mut g = Generator::new(
        lm,
        GeneratorConfig {
            max_tokens: 3,
            stop_on_eos: false,
            ..GeneratorConfig::default()
        },
    )
    .unwrap();
    assert_eq!(g.generate("ab").unwrap().tokens.len(), 3);
}

/// Crafted GGUF files are errors naming the problem, never panics or
/// allocations the file cannot back.
#[test]
fn crafted_gguf_files_are_errors_not_panics() {
    let seed = gguf_seed("tiny_llama");
    // A tensor whose dims multiply past usize (and far past the file).
    let mut huge = seed.clone();
    let at = find(&huge, b"token_embd.weight") + "token_embd.weight".len();
    // n_dims (u32) then the first dim (u64).
    huge[at + 4..at + 12].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let err = load_gguf_bytes(&huge).unwrap_err().to_string();
    assert!(
        err.contains("token_embd.weight") && err.contains("overflow"),
        "{err}"
    );
    // Large but representable: must not be allocated.
    huge[at + 4..at + 12].copy_from_slice(&(1u64 << 34).to_le_bytes());
    let err = load_gguf_bytes(&huge).unwrap_err().to_string();
    assert!(err.contains("do not fit the file"), "{err}");
    // A tensor with a zero dimension.
    let mut zero = seed.clone();
    zero[at + 4..at + 12].copy_from_slice(&0u64.to_le_bytes());
    let err = load_gguf_bytes(&zero).unwrap_err().to_string();
    assert!(err.contains("no elements"), "{err}");
    // general.alignment = 0: Candle's reader divides by it.
    let mut align = gguf_seed("metadata_only");
    let at = find(&align, b"general.alignment") + "general.alignment".len();
    align[at + 4..at + 8].copy_from_slice(&0u32.to_le_bytes());
    let err = load_gguf_bytes(&align).unwrap_err().to_string();
    assert!(err.contains("general.alignment is 0"), "{err}");
    // Truncated anywhere.
    for cut in (0..seed.len()).step_by(97) {
        assert!(load_gguf_bytes(&seed[..cut]).is_err(), "cut at {cut}");
    }
    // The fuzz entry point runs the same code from memory.
    metal_candle::fuzzing::gguf(&align);
    metal_candle::fuzzing::gguf(&huge);
}

/// Another family's config is an `UnsupportedArchitecture` naming it, for
/// embeddings as for decoders (GPT-2: tests/suite/decoder_parity.rs).
#[test]
fn unsupported_embedding_architectures_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("embed-tiny-bge");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let to = tmp.path().join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["model_type"] = "gpt2".into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err =
        metal_candle::embeddings::EmbeddingModel::from_dir(tmp.path(), &candle_core::Device::Cpu)
            .unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedArchitecture { name, .. } if name == "gpt2"),
        "{err}"
    );
}

/// `layer_types` is indexed per layer: a list of the wrong length is a
/// config error, not an index out of bounds.
#[test]
fn layer_types_of_the_wrong_length_are_a_config_error() {
    let text = std::fs::read_to_string(fixture("qwen2-tiny").join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    for types in [serde_json::json!(["full_attention"]), serde_json::json!([])] {
        cfg["layer_types"] = types;
        let err = metal_candle::models::parse_decoder_config(&cfg.to_string(), "config.json")
            .unwrap_err();
        assert!(
            err.to_string().contains("layer types for 2 layers"),
            "{err}"
        );
    }
}

/// Found by the tokenizer fuzz target: a `tokenizer.json` with a raw
/// control character inside a string made `tokenizers` 0.23 panic
/// (`expect("Helper")` in its decoder deserializer) instead of erroring.
#[test]
fn malformed_tokenizer_json_is_an_error_not_a_panic() {
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds/tokenizer/regression-decoder-expect-panic"),
    )
    .unwrap();
    let json = &seed[..seed.iter().position(|&b| b == 0).unwrap_or(seed.len())];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    let err = metal_candle::inference::TextTokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(err, Error::Tokenizer(_)) && err.to_string().contains("tokenizer.json"),
        "{err}"
    );
    metal_candle::fuzzing::tokenizer(&seed);
}

/// Found by the tokenizer fuzz target (second finding): a BPE model whose
/// merges do not fit its subword prefix/suffix settings makes `tokenizers`
/// 0.23 slice out of bounds while building the merge map. The parse runs
/// under `catch_unwind`: an `Error::Tokenizer`, not a crash.
#[test]
fn tokenizer_json_that_panics_inside_tokenizers_is_an_error() {
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds/tokenizer/regression-bpe-merge-prefix-panic"),
    )
    .unwrap();
    let json = &seed[..seed.iter().position(|&b| b == 0).unwrap_or(seed.len())];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    let err = metal_candle::inference::TextTokenizer::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
}

/// Found by the GGUF fuzz target: a `block_count` of billions made the
/// config reader allocate a per-layer list of that length (an
/// out-of-memory abort); `num_hidden_layers` in config.json did the same.
/// Layer counts (and the other sizes) are bounded before anything is sized
/// by them.
#[test]
fn absurd_layer_counts_are_config_errors_not_allocations() {
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/gguf/regression-huge-block-count"),
    )
    .unwrap();
    let err = load_gguf_bytes(&seed).unwrap_err().to_string();
    assert!(
        err.contains("block_count") && err.contains("larger than supported"),
        "{err}"
    );
    metal_candle::fuzzing::gguf(&seed);

    let text = std::fs::read_to_string(fixture("qwen2-tiny").join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg.as_object_mut().unwrap().remove("layer_types");
    for (field, value) in [
        ("num_hidden_layers", 4_000_000_000u64),
        ("head_dim", 1 << 40),
        ("vocab_size", 1 << 40),
    ] {
        let mut c = cfg.clone();
        c[field] = value.into();
        let err =
            metal_candle::models::parse_decoder_config(&c.to_string(), "config.json").unwrap_err();
        assert!(
            err.to_string().contains(field) && err.to_string().contains("larger than supported"),
            "{field}: {err}"
        );
    }
}
