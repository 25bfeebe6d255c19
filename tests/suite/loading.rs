//! Checkpoint loading: sharded vs single file, header inspection, the Hugging
//! Face cache layout and offline mode, and clear errors for broken inputs.

use std::collections::HashMap;
use std::path::Path;

use crate::common::{fixture, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use metal_candle::io::{ModelLoader, ModelRepo};
use metal_candle::models::{load_decoder, CausalLm};
use metal_candle::Error;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load(dir: &Path) -> metal_candle::Result<Box<dyn CausalLm>> {
    load_decoder(dir.to_str().unwrap(), Some(DType::F32), &Device::Cpu)
}

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 17, 999, 0, 512]], &Device::Cpu).unwrap()
}

#[test]
fn sharded_and_single_file_checkpoints_give_equal_outputs() {
    let single = load(&fixture("qwen2-tiny")).unwrap();
    let sharded = load(&fixture("qwen2-tiny-sharded")).unwrap();
    let files = ModelLoader::safetensors_files(&ModelRepo::from_dir(fixture("qwen2-tiny-sharded")))
        .unwrap();
    assert_eq!(files.len(), 5, "the fixture really is sharded");
    let a = single.forward(&ids(), None, None).unwrap();
    let b = sharded.forward(&ids(), None, None).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn inspect_reads_headers_and_counts_parameters_like_transformers() {
    for name in ["qwen2-tiny", "qwen2-tiny-tied", "qwen2-tiny-sharded"] {
        let info = ModelLoader::inspect(&ModelRepo::from_dir(fixture(name))).unwrap();
        let reference_name = if name == "qwen2-tiny-sharded" {
            "qwen2-tiny"
        } else {
            name
        };
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(reference_name).join("reference.json")).unwrap(),
        )
        .unwrap();
        let expected = r["num_parameters"].as_u64().unwrap() as usize;
        assert_eq!(info.parameter_count(), expected, "{name}");
        let model = load(&fixture(name)).unwrap();
        assert_eq!(model.parameter_count(), expected, "{name}: model count");
        let q = info
            .tensors
            .iter()
            .find(|t| t.name == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        assert_eq!(q.shape, vec![32, 64]);
        assert_eq!(q.dtype, "F32");
    }
}

/// Writes the tiny model's tensors with `edit` applied into a new folder.
fn edited_checkpoint(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    copy_dir(&fixture("qwen2-tiny"), dir);
    let mut t = candle_core::safetensors::load(
        fixture("qwen2-tiny").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

#[test]
fn wrong_shape_is_a_shape_mismatch_error() {
    let tmp = tempfile::tempdir().unwrap();
    edited_checkpoint(tmp.path(), |t| {
        t.insert(
            "model.layers.1.mlp.up_proj.weight".into(),
            Tensor::zeros((95, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match load(tmp.path()) {
        Err(Error::ShapeMismatch {
            name,
            expected,
            actual,
        }) => {
            assert_eq!(name, "model.layers.1.mlp.up_proj.weight");
            assert_eq!(expected, vec![96, 64]);
            assert_eq!(actual, vec![95, 64]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn missing_tensor_is_a_missing_tensor_error() {
    let tmp = tempfile::tempdir().unwrap();
    edited_checkpoint(tmp.path(), |t| {
        t.remove("model.layers.0.self_attn.v_proj.bias");
    });
    match load(tmp.path()) {
        Err(e @ Error::MissingTensor { .. }) => {
            assert!(
                e.to_string()
                    .contains("model.layers.0.self_attn.v_proj.bias"),
                "{e}"
            );
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn malformed_config_is_an_invalid_config_error() {
    let cases = [
        ("{ not json", "key must be a string"),
        (r#"{"vocab_size": 1001}"#, "missing `model_type`"),
        (
            r#"{"model_type": "qwen2", "vocab_size": 1001}"#,
            "missing field",
        ),
        ("", "EOF"),
    ];
    for (text, needle) in cases {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&fixture("qwen2-tiny"), tmp.path());
        std::fs::write(tmp.path().join("config.json"), text).unwrap();
        match load(tmp.path()) {
            Err(e @ Error::InvalidConfig { .. }) => {
                assert!(e.to_string().contains("config.json"), "{e}");
                assert!(e.to_string().contains(needle), "{e}");
            }
            other => panic!("expected InvalidConfig for {text:?}, got {other:?}"),
        }
    }
    // Semantically wrong values are caught too.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("qwen2-tiny"), tmp.path());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    cfg["num_key_value_heads"] = 3.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load(tmp.path()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { .. })
            && err.to_string().contains("num_key_value_heads"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_is_an_invalid_checkpoint_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("qwen2-tiny"), tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 100, 1000, 4] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        match load(tmp.path()) {
            Err(e @ Error::InvalidCheckpoint { .. }) => {
                assert!(e.to_string().contains("model.safetensors"), "{e}");
            }
            other => panic!("expected InvalidCheckpoint when cut to {keep} bytes, got {other:?}"),
        }
    }
}

#[test]
fn hub_repo_ids_resolve_through_the_hugging_face_cache_offline() {
    // Lay the tiny model out as the Hub cache does and resolve it by repo id,
    // offline, through the same code path as a downloaded model.
    let home = tempfile::tempdir().unwrap();
    let repo_dir = home.path().join("hub").join("models--tiny-org--qwen2-tiny");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(
        &fixture("qwen2-tiny"),
        &repo_dir.join("snapshots").join(rev),
    );
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), rev).unwrap();

    // Environment changes are process-wide: run the checks in a child process
    // so parallel tests are unaffected.
    if std::env::var("METAL_CANDLE_HUB_CHILD").is_err() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "loading::hub_repo_ids_resolve_through_the_hugging_face_cache_offline",
                "--nocapture",
            ])
            .env("METAL_CANDLE_HUB_CHILD", home.path())
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HUB_CACHE")
            .status()
            .unwrap();
        assert!(status.success());
        // The child leaves a mark, so a filter that matched nothing fails here.
        assert!(
            home.path().join("child-ran").exists(),
            "the offline child test did not run"
        );
        return;
    }
    let home = std::path::PathBuf::from(std::env::var("METAL_CANDLE_HUB_CHILD").unwrap());
    let cached = load_decoder("tiny-org/qwen2-tiny", Some(DType::F32), &Device::Cpu).unwrap();
    let direct = load(&fixture("qwen2-tiny")).unwrap();
    assert_eq!(
        max_abs_diff(
            &cached.forward(&ids(), None, None).unwrap(),
            &direct.forward(&ids(), None, None).unwrap()
        ),
        0.0
    );
    let err = load_decoder("tiny-org/not-there", None, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::ModelNotFound(_)), "{msg}");
    assert!(
        msg.contains("tiny-org/not-there") && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
    assert!(
        msg.contains(&home.join("hub").display().to_string()),
        "names the cache folder: {msg}"
    );
    std::fs::write(home.join("child-ran"), "").unwrap();
}

#[test]
fn nonexistent_sources_are_clear_errors() {
    let err = load_decoder("/definitely/not/a/dir", None, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound(_)), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let err = load(tmp.path()).unwrap_err();
    assert!(
        matches!(err, Error::ModelNotFound(_)) && err.to_string().contains("config.json"),
        "{err}"
    );
}
