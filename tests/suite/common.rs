//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `tests/fixtures/<name>` (`METAL_CANDLE_FIXTURES` overrides the folder, for
/// a test binary run from another checkout, e.g. on the GPU machine).
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("METAL_CANDLE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join("fixtures")
        })
        .join(name)
}

/// Loads a fixture's `reference.safetensors` (written by scripts/make_fixtures.py).
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .expect("reference fixture")
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    // References live on the CPU; results may be on the GPU.
    let a = a
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let b = b
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Device for the tests: CUDA when the `cuda` feature is on and
/// `METAL_CANDLE_TEST_DEVICE=cuda`, else the CPU.
pub fn device() -> Device {
    match std::env::var("METAL_CANDLE_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("CUDA device"),
        _ => Device::Cpu,
    }
}

/// True when the real-model tier is enabled (`METAL_CANDLE_REAL_MODELS=1`).
/// Those tests need `scripts/fetch-models.sh` to have run.
pub fn real_models() -> bool {
    std::env::var("METAL_CANDLE_REAL_MODELS").is_ok_and(|v| v == "1")
}

/// A fixture's `reference.json` (written by scripts/make_fixtures.py).
pub fn reference_json(name: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixture(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json is JSON")
}

/// A JSON array of strings.
pub fn json_strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// `max |t|` (any float dtype, any device): the scale tolerances are
/// stated against.
pub fn abs_max(t: &Tensor) -> f32 {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max |ours - theirs| / max |theirs|`, the relative difference the
/// gradient and logit tolerances are stated in.
pub fn rel_diff(ours: &Tensor, theirs: &Tensor) -> f32 {
    max_abs_diff(ours, theirs) / abs_max(theirs)
}

/// `n` examples of pseudo-random token ids below 1001 (a fixed LCG from
/// `seed`, so runs and processes agree), example `i` `len(i)` tokens long,
/// its first two tokens masked out of the loss (a "prompt").
pub fn random_dataset(
    n: usize,
    seed: u64,
    len: impl Fn(usize) -> usize,
) -> metal_candle::training::Dataset {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % 1001) as u32
    };
    let examples = (0..n)
        .map(|i| {
            let ids: Vec<u32> = (0..len(i)).map(|_| next()).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < 2 { -100 } else { i64::from(id) })
                .collect();
            metal_candle::training::Example {
                input_ids: ids,
                labels,
            }
        })
        .collect();
    metal_candle::training::Dataset::from_examples(examples).unwrap()
}
