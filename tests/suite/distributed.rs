//! Data-parallel training (`ProcessGroup`): ranks as threads of this test
//! joined over loopback TCP, as separate processes would be. On the CPU
//! (and the one-GPU tier) the sums go over TCP; with
//! `METAL_CANDLE_TEST_GPUS=N` (N >= 2) each rank takes its own GPU and the
//! group uses NCCL (the multi-GPU tier).

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device};
use metal_candle::models::{load_decoder, CausalLm};
use metal_candle::training::{
    Dataset, GroupConfig, LRScheduler, LoRAAdapter, LoRAAdapterConfig, ProcessGroup, TargetModule,
    Trainer, TrainingConfig, TrainingMetrics,
};

/// Rank `r`'s device: GPU `r` on the multi-GPU tier, else the CPU (two
/// NCCL ranks cannot share one GPU).
fn rank_device(rank: usize, world: usize) -> Device {
    let gpus: usize = std::env::var("METAL_CANDLE_TEST_GPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if world > 1 && gpus >= world || world == 1 && gpus >= 2 {
        metal_candle::backend::cuda(rank).expect("CUDA device")
    } else {
        Device::Cpu
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn group_config(rank: usize, world_size: usize, port: u16) -> GroupConfig {
    GroupConfig {
        rank,
        world_size,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(60),
    }
}

fn tiny_model(device: &Device, dtype: DType) -> Box<dyn CausalLm> {
    let dir = crate::common::fixture("qwen2-tiny");
    load_decoder(dir.to_str().unwrap(), Some(dtype), device).unwrap()
}

/// Random-token examples of 6..=12 tokens, the first 2 masked.
fn dataset(n: usize) -> Dataset {
    crate::common::random_dataset(n, 11, |i| 6 + i % 7)
}

fn config(batch_size: usize, max_steps: usize, out: Option<&Path>) -> TrainingConfig {
    TrainingConfig {
        max_steps: Some(max_steps),
        batch_size,
        lr_schedule: LRScheduler::Constant { lr: 1e-2 },
        max_grad_norm: Some(1.0),
        save_every: out.map(|_| 5),
        output_dir: out.map(Path::to_path_buf),
        seed: 3,
        ..TrainingConfig::default()
    }
}

fn lora() -> LoRAAdapterConfig {
    LoRAAdapterConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    }
}

/// One rank's run: `world` ranks of `batch_size` each (1: no group),
/// optionally resuming from `resume`. The adapter seed differs by rank, so
/// equal results also show every rank started from rank 0's weights.
#[allow(clippy::too_many_arguments)]
fn run_rank(
    dtype: DType,
    rank: usize,
    world: usize,
    port: u16,
    batch_size: usize,
    steps: usize,
    out: Option<&Path>,
    resume: Option<&Path>,
) -> (TrainingMetrics, Vec<(String, Vec<f32>)>) {
    let device = rank_device(rank, world);
    let mut model = tiny_model(&device, dtype);
    let adapter = LoRAAdapter::new(lora(), &*model, &device, 5 + rank as u64).unwrap();
    let mut trainer = Trainer::new(&mut *model, &adapter, config(batch_size, steps, out)).unwrap();
    if world > 1 {
        let group = ProcessGroup::connect(&group_config(rank, world, port), &device).unwrap();
        trainer.set_process_group(group).unwrap();
    }
    if let Some(dir) = resume {
        trainer.resume_from(dir).unwrap();
    }
    let metrics = trainer.train(&dataset(40), Some(&dataset(12))).unwrap();
    let weights = adapter
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            let t = v.as_tensor().flatten_all().unwrap();
            (n, t.to_dtype(DType::F32).unwrap().to_vec1().unwrap())
        })
        .collect();
    (metrics, weights)
}

/// All ranks of a group, as threads; rank 0's result.
fn run_group(
    dtype: DType,
    world: usize,
    batch_size: usize,
    steps: usize,
    out: Option<&Path>,
    resume: Option<&Path>,
) -> (TrainingMetrics, Vec<(String, Vec<f32>)>) {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                s.spawn(move || run_rank(dtype, r, world, port, batch_size, steps, out, resume))
            })
            .collect();
        let mut results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        // Every rank ends with the same adapter.
        for other in &results[1..] {
            assert_eq!(other.1, results[0].1, "ranks ended with different adapters");
        }
        results.swap_remove(0)
    })
}

fn assert_close(a: &TrainingMetrics, b: &TrainingMetrics, what: &str) {
    assert_close_within(a, b, 1e-5, what)
}

fn assert_close_within(a: &TrainingMetrics, b: &TrainingMetrics, tol: f64, what: &str) {
    assert_eq!(a.steps.len(), b.steps.len(), "{what}: step counts");
    let mut worst = 0f64;
    for (x, y) in a.steps.iter().zip(&b.steps) {
        let rel = (x.loss - y.loss).abs() / y.loss.abs().max(1e-12);
        worst = worst.max(rel);
        assert!(
            rel <= tol,
            "{what}: step {} loss {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
    }
    let (ea, eb) = (a.final_eval_loss.unwrap(), b.final_eval_loss.unwrap());
    assert!((ea - eb).abs() / eb <= tol, "{what}: eval {ea} vs {eb}");
    println!("{what}: worst relative loss difference over the steps {worst:.1e}");
}

fn assert_weights_close(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], what: &str) {
    for ((n, x), (_, y)) in a.iter().zip(b) {
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff / scale <= 1e-4,
            "{what}: {n} differs by {diff} (of {scale})"
        );
    }
}

/// The equivalence: 2 ranks x batch 4 give 1 rank x batch 8's loss
/// curve (f32, 1e-5 relative, 20 steps), eval loss and adapter.
#[test]
fn two_ranks_of_four_equal_one_rank_of_eight() {
    let (one, w1) = run_group(DType::F32, 1, 8, 20, None, None);
    let (two, w2) = run_group(DType::F32, 2, 4, 20, None, None);
    assert_close(&two, &one, "2 x 4 vs 1 x 8");
    assert_weights_close(&w2, &w1, "2 x 4 vs 1 x 8");
}

/// The same in bf16 (the dtype GPU training runs in): the ranks' partial
/// sums round differently from one batch's (bf16 keeps 8 bits), so the
/// loss curves agree to 1e-2 relative over 20 steps, not to f32's 1e-5.
/// AdamW turns a gradient's rounding into a step of up to `lr` per element,
/// so the adapters are compared as a whole (relative L2 distance).
#[test]
fn two_ranks_of_four_follow_one_rank_of_eight_in_bf16() {
    let (one, w1) = run_group(DType::BF16, 1, 8, 20, None, None);
    let (two, w2) = run_group(DType::BF16, 2, 4, 20, None, None);
    assert_close_within(&two, &one, 1e-2, "bf16 2 x 4 vs 1 x 8");
    let (mut d2, mut n2) = (0f64, 0f64);
    for ((_, x), (_, y)) in w2.iter().zip(&w1) {
        for (p, q) in x.iter().zip(y) {
            d2 += f64::from(p - q).powi(2);
            n2 += f64::from(*q).powi(2);
        }
    }
    let rel = (d2 / n2).sqrt();
    println!("bf16 2 x 4 vs 1 x 8: adapters' relative L2 distance {rel:.1e}");
    assert!(rel <= 5e-2, "bf16 adapters differ by {rel} (relative L2)");
}

/// A run on 2 ranks checkpointed at step 5 continues on 1 rank (same
/// global batch) onto the uninterrupted curve; only rank 0 wrote files.
#[test]
fn a_checkpoint_of_two_ranks_resumes_on_one() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, w_straight) = run_group(DType::F32, 2, 4, 10, Some(dir.path()), None);
    let ckpt = dir.path().join("checkpoint-5");
    assert!(ckpt.join("trainer_state.json").exists());
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count(),
        10,
        "one metrics line per step, from rank 0 alone"
    );

    let dir_b = tempfile::tempdir().unwrap();
    let (resumed, w_resumed) = run_group(DType::F32, 1, 8, 10, Some(dir_b.path()), Some(&ckpt));
    assert_close(&resumed, &straight, "resumed on 1 rank");
    assert_weights_close(&w_resumed, &w_straight, "resumed on 1 rank");
}

/// A world size that differs between ranks fails both, naming it.
#[test]
fn mismatched_world_sizes_fail_every_rank() {
    let port = free_port();
    let errs: Vec<String> = std::thread::scope(|s| {
        let a = s.spawn(|| ProcessGroup::connect(&group_config(0, 2, port), &Device::Cpu));
        let b = s.spawn(|| ProcessGroup::connect(&group_config(1, 3, port), &Device::Cpu));
        [a.join().unwrap(), b.join().unwrap()]
            .into_iter()
            .map(|r| r.unwrap_err().to_string())
            .collect()
    });
    for e in &errs {
        assert!(e.contains("WORLD_SIZE=3"), "{e}");
    }
}

/// A rank that never comes, or one that leaves, ends the others with an
/// error instead of a hang.
#[test]
fn a_missing_or_departed_rank_is_an_error_not_a_hang() {
    let port = free_port();
    let cfg = GroupConfig {
        timeout: Duration::from_millis(500),
        ..group_config(0, 2, port)
    };
    let e = ProcessGroup::connect(&cfg, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("did not join"), "{e}");

    let port = free_port();
    let e = std::thread::scope(|s| {
        let left = s.spawn(|| {
            let g = ProcessGroup::connect(&group_config(1, 2, port), &Device::Cpu).unwrap();
            drop(g);
        });
        let g = ProcessGroup::connect(&group_config(0, 2, port), &Device::Cpu).unwrap();
        left.join().unwrap();
        let t = candle_core::Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        g.all_reduce_sum(&t).unwrap_err()
    });
    assert!(e.to_string().contains("rank 1 closed"), "{e}");

    // The same with each rank on its own GPU (NCCL on the multi-GPU tier):
    // the sum that waits on the departed rank is aborted, not left to hang.
    if rank_device(1, 2).is_cuda() {
        let port = free_port();
        let t0 = std::time::Instant::now();
        let e = std::thread::scope(|s| {
            let left = s.spawn(|| {
                let g = ProcessGroup::connect(&group_config(1, 2, port), &rank_device(1, 2));
                drop(g.unwrap());
            });
            let dev = rank_device(0, 2);
            let g = ProcessGroup::connect(&group_config(0, 2, port), &dev).unwrap();
            left.join().unwrap();
            let t = candle_core::Tensor::new(&[1f32, 2.0], &dev).unwrap();
            g.all_reduce_sum(&t).unwrap_err()
        });
        println!("NCCL rank left: {e} (after {:?})", t0.elapsed());
        assert!(e.to_string().contains("rank 1"), "{e}");
    }
}

/// The environment torchrun sets is read as it sets it.
#[test]
fn group_config_reads_torchrun_variables() {
    // Only this test sets these variables (no other test reads them).
    std::env::set_var("WORLD_SIZE", "4");
    std::env::set_var("RANK", "3");
    std::env::set_var("LOCAL_RANK", "1");
    std::env::set_var("MASTER_ADDR", "10.0.0.7");
    std::env::set_var("MASTER_PORT", "29511");
    let cfg = GroupConfig::from_env().unwrap().unwrap();
    assert_eq!(
        (cfg.rank, cfg.world_size, cfg.local_rank, cfg.master_port),
        (3, 4, 1, 29511)
    );
    assert_eq!(cfg.master_addr, "10.0.0.7");
    std::env::set_var("RANK", "4");
    assert!(GroupConfig::from_env().is_err(), "rank outside the world");
    for v in [
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        std::env::remove_var(v);
    }
    assert!(GroupConfig::from_env().unwrap().is_none());
}
