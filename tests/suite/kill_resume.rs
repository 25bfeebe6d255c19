//! Training that is killed (SIGKILL) at random moments, including during
//! checkpoint and metrics writes, and resumed with `resume_from_latest`
//! continues onto exactly the loss curve of an uninterrupted run; Ctrl-C
//! (SIGINT) finishes the step, writes a checkpoint and exits cleanly.
//!
//! The training runs in a child process: this test binary re-invoked on
//! `kill_resume::child_trainer` with `METAL_CANDLE_TRAIN_CHILD` set to the
//! output folder (without it, that test does nothing). The kill loop runs
//! for `METAL_CANDLE_KILL_SECS` seconds (20 by default, for CI; set more by
//! hand for a longer soak).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::DType;
use metal_candle::models::load_decoder;
use metal_candle::training::{
    Dataset, Example, LRScheduler, LoRAAdapter, LoRAAdapterConfig, StepMetrics, TargetModule,
    Trainer, TrainingConfig,
};

const CHILD_ENV: &str = "METAL_CANDLE_TRAIN_CHILD";
const CTRL_C_ENV: &str = "METAL_CANDLE_TRAIN_CHILD_CTRL_C";
const STEPS: usize = 30;

fn dataset() -> Dataset {
    let mut state = 11u64;
    let examples = (0..8)
        .map(|i| {
            let ids: Vec<u32> = (0..6 + i % 4)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % 1001) as u32
                })
                .collect();
            let labels = ids.iter().map(|&t| i64::from(t)).collect();
            Example {
                input_ids: ids,
                labels,
            }
        })
        .collect();
    Dataset::from_examples(examples).unwrap()
}

/// The run every child does: resume from the newest checkpoint in `out`
/// (if any), train to `STEPS`, checkpoint after every step.
fn run(out: &Path, ctrl_c: bool) -> metal_candle::training::TrainingMetrics {
    let mut model = load_decoder(
        crate::common::fixture("qwen2-tiny").to_str().unwrap(),
        Some(DType::F32),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let cfg = LoRAAdapterConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    };
    let adapter = LoRAAdapter::new(cfg, &model, &candle_core::Device::Cpu, 3).unwrap();
    let config = TrainingConfig {
        max_steps: Some(STEPS),
        batch_size: 2,
        grad_accum_steps: 2,
        lr_schedule: LRScheduler::WarmupCosine {
            lr: 5e-3,
            warmup_steps: 3,
            total_steps: STEPS,
        },
        save_every: Some(1),
        save_total_limit: Some(2),
        output_dir: Some(out.to_path_buf()),
        seed: 5,
        stop_on_ctrl_c: ctrl_c,
        ..TrainingConfig::default()
    };
    let mut trainer = Trainer::new(&mut model, &adapter, config).unwrap();
    trainer.resume_from_latest(out).unwrap();
    trainer.train(&dataset(), None).unwrap()
}

/// The child side: does nothing unless spawned by the tests below.
#[test]
fn child_trainer() {
    let Some(out) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let metrics = run(Path::new(&out), std::env::var_os(CTRL_C_ENV).is_some());
    if metrics.stopped_early {
        std::fs::write(
            Path::new(&out).join("stopped"),
            metrics.steps.len().to_string(),
        )
        .unwrap();
    }
    #[cfg(unix)]
    {
        // After `train`, SIGINT is handled as before it (the default here).
        // SAFETY: reads the current action only.
        let restored = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGINT, std::ptr::null(), &mut old);
            old.sa_sigaction == libc::SIG_DFL
        };
        std::fs::write(
            Path::new(&out).join("sigint_after_train"),
            if restored { "default" } else { "still ours" },
        )
        .unwrap();
    }
}

fn spawn(out: &Path, ctrl_c: bool) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "kill_resume::child_trainer",
        "--test-threads=1",
        "--nocapture",
    ])
    .env(CHILD_ENV, out)
    .env_remove("RUST_BACKTRACE")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if ctrl_c {
        cmd.env(CTRL_C_ENV, "1");
    }
    cmd.spawn().unwrap()
}

/// The complete lines of `metrics.jsonl` (a torn last line is skipped).
fn metrics_lines(out: &Path) -> Vec<StepMetrics> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Every recorded step equals the reference's step (bit for bit).
fn check_prefix(out: &Path, reference: &[StepMetrics], context: &str) -> usize {
    let lines = metrics_lines(out);
    assert!(lines.len() <= reference.len(), "{context}: too many steps");
    for (i, (m, r)) in lines.iter().zip(reference).enumerate() {
        assert_eq!(m.step, i + 1, "{context}: step numbering");
        assert_eq!(
            (m.loss, m.lr),
            (r.loss, r.lr),
            "{context}: step {} left the reference curve",
            i + 1
        );
    }
    lines.len()
}

fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter_model.safetensors")).unwrap()
}

/// Deterministic pseudo-random numbers (no dependency).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn reference() -> (tempfile::TempDir, Vec<StepMetrics>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let status = spawn(dir.path(), false).wait().unwrap();
    let took = t0.elapsed();
    assert!(status.success());
    let steps = metrics_lines(dir.path());
    assert_eq!(steps.len(), STEPS);
    (dir, steps, took)
}

#[test]
fn killed_training_resumes_onto_the_same_loss_curve() {
    let budget = Duration::from_secs(
        std::env::var("METAL_CANDLE_KILL_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let (ref_dir, reference, full) = reference();
    let ref_adapter = adapter_bytes(ref_dir.path());
    let t0 = Instant::now();
    let mut rng = Lcg(t0.elapsed().as_nanos() as u64 ^ 0x5eed);
    let (mut kills, mut during_write, mut completed, mut resumes) = (0, 0, 0, 0);
    let mut round_dir = tempfile::tempdir().unwrap();
    while t0.elapsed() < budget {
        let out: PathBuf = round_dir.path().to_path_buf();
        let before = check_prefix(&out, &reference, "before spawn");
        if before > 0 {
            resumes += 1;
        }
        let mut child = spawn(&out, false);
        // Anywhere in the first half of a full run's time, startup
        // included: several kills per run, at every stage of it.
        let window = full.as_micros() as u64 / 2;
        std::thread::sleep(Duration::from_micros(rng.below(window)));
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "child failed");
        } else {
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
            // A temporary file or folder left, or a torn metrics line.
            let interrupted_write = std::fs::read_dir(&out)
                .map(|d| {
                    d.filter_map(|e| e.ok()).any(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n.contains(".tmp-") || n.contains(".old-") || n.contains(".del-")
                    })
                })
                .unwrap_or(false)
                || std::fs::read_to_string(out.join("metrics.jsonl"))
                    .is_ok_and(|t| !t.is_empty() && !t.ends_with('\n'));
            if interrupted_write {
                during_write += 1;
            }
        }
        let after = check_prefix(&out, &reference, &format!("after kill {kills}"));
        if after == STEPS && out.join("adapter_model.safetensors").exists() {
            assert_eq!(adapter_bytes(&out), ref_adapter, "final adapter differs");
            completed += 1;
            round_dir = tempfile::tempdir().unwrap();
        }
    }
    // Finish the last round without killing.
    let out = round_dir.path();
    assert!(spawn(out, false).wait().unwrap().success());
    assert_eq!(check_prefix(out, &reference, "final"), STEPS);
    assert_eq!(adapter_bytes(out), ref_adapter, "final adapter differs");
    println!(
        "{kills} kills ({during_write} during a checkpoint or metrics write), {resumes} resumes, \
         {completed} runs completed under fire, in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(kills >= 5, "only {kills} kills in {budget:?}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_finishes_the_step_checkpoints_and_exits_cleanly() {
    let (_ref_dir, reference, _) = reference();
    let out = tempfile::tempdir().unwrap();
    let mut child = spawn(out.path(), true);
    let t0 = Instant::now();
    while metrics_lines(out.path()).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success(), "exit after Ctrl-C");
    let stopped: usize = std::fs::read_to_string(out.path().join("stopped"))
        .expect("train returned Ok with stopped_early")
        .parse()
        .unwrap();
    assert!((2..STEPS).contains(&stopped), "{stopped}");
    assert!(out.path().join(format!("checkpoint-{stopped}")).is_dir());
    assert_eq!(
        std::fs::read_to_string(out.path().join("sigint_after_train")).unwrap(),
        "default",
        "the SIGINT handler is removed after train"
    );
    assert!(!out.path().join("adapter_model.safetensors").exists());
    assert_eq!(
        check_prefix(out.path(), &reference, "after Ctrl-C"),
        stopped
    );
    // Resuming finishes the same curve.
    assert!(spawn(out.path(), true).wait().unwrap().success());
    assert_eq!(check_prefix(out.path(), &reference, "resumed"), STEPS);
}
