//! Our Qwen2 against Hugging Face transformers on the tiny fixtures
//! (scripts/make_fixtures.py): logits, padding, the KV cache, causality.

use crate::common::{device, fixture, max_abs_diff, reference};
use candle_core::{DType, IndexOp, Tensor};
use metal_candle::models::{OpsMode, Qwen2Model};

const TOL: f32 = 1e-4;

fn load(name: &str) -> Qwen2Model {
    Qwen2Model::from_pretrained(fixture(name).to_str().unwrap(), Some(DType::F32), &device())
        .unwrap()
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32)
        .unwrap()
        .to_device(&device())
        .unwrap()
}

#[test]
fn prefill_logits_match_transformers() {
    for name in ["qwen2-tiny", "qwen2-tiny-tied"] {
        let r = reference(name);
        for mode in [OpsMode::Fused, OpsMode::Differentiable] {
            let mut m = load(name);
            m.set_ops_mode(mode);
            let logits = m.forward(&ids(&r["input_ids"]), None, None).unwrap();
            let d = max_abs_diff(&logits, &r["logits"]);
            assert!(d <= TOL, "{name} {mode:?}: max abs diff {d}");
        }
    }
}

#[test]
fn token_by_token_with_kv_cache_matches_transformers() {
    for name in ["qwen2-tiny", "qwen2-tiny-tied"] {
        let r = reference(name);
        let m = load(name);
        let input = ids(&r["input_ids"]);
        let mut cache = m.new_cache();
        // Prefill 3 tokens, then one at a time.
        let first = m
            .forward(&input.narrow(1, 0, 3).unwrap(), None, Some(&mut cache))
            .unwrap();
        let mut parts = vec![first];
        for t in 3..input.dim(1).unwrap() {
            let step = m
                .forward(&input.narrow(1, t, 1).unwrap(), None, Some(&mut cache))
                .unwrap();
            parts.push(step);
        }
        let logits = Tensor::cat(&parts, 1).unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d <= TOL, "{name}: cached decoding max abs diff {d}");
        assert_eq!(cache.len(), input.dim(1).unwrap());
    }
}

/// Compares logits at the positions where `mask` is 1.
fn assert_close_where_real(ours: &Tensor, theirs: &Tensor, mask: &Tensor, what: &str) {
    let mask = mask.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    for (b, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                let d = max_abs_diff(&ours.i((b, t)).unwrap(), &theirs.i((b, t)).unwrap());
                assert!(d <= TOL, "{what}: batch {b} position {t}: max abs diff {d}");
            }
        }
    }
}

#[test]
fn padded_batches_match_transformers_left_and_right() {
    let r = reference("qwen2-tiny");
    let m = load("qwen2-tiny");
    for side in ["left", "right"] {
        let input = ids(&r[&format!("input_ids_{side}")]);
        let mask = r[&format!("attention_mask_{side}")]
            .to_device(&device())
            .unwrap();
        let logits = m.forward(&input, Some(&mask), None).unwrap();
        assert_close_where_real(&logits, &r[&format!("logits_{side}")], &mask, side);
    }
    // Padding must not change what a real token sees: the left-padded short
    // row equals the unpadded row's first 4 positions.
    let d = max_abs_diff(
        &r["logits_left"].i((1, 5..9)).unwrap(),
        &r["logits"].i((1, 0..4)).unwrap(),
    );
    assert!(d <= TOL, "reference itself: padded vs unpadded {d}");
}

#[test]
fn left_padded_decoding_with_cache_matches_transformers() {
    let r = reference("qwen2-tiny");
    let m = load("qwen2-tiny");
    let input = ids(&r["input_ids_left"]);
    let mask = r["attention_mask_left"].to_device(&device()).unwrap();
    let mut cache = m.new_cache();
    let mut parts = vec![m
        .forward(
            &input.narrow(1, 0, 6).unwrap(),
            Some(&mask.narrow(1, 0, 6).unwrap()),
            Some(&mut cache),
        )
        .unwrap()];
    for t in 6..9 {
        let step_mask = mask.narrow(1, 0, t + 1).unwrap();
        parts.push(
            m.forward(
                &input.narrow(1, t, 1).unwrap(),
                Some(&step_mask),
                Some(&mut cache),
            )
            .unwrap(),
        );
    }
    let logits = Tensor::cat(&parts, 1).unwrap();
    assert_close_where_real(&logits, &r["logits_left"], &mask, "left-padded cached");
}

#[test]
fn appending_tokens_never_changes_earlier_logits() {
    let m = load("qwen2-tiny");
    let all: Vec<u32> = (0..12).map(|i| (i * 83 + 5) % 1001).collect();
    let full = m
        .forward(
            &Tensor::new(&all[..], &device())
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
            None,
        )
        .unwrap();
    for k in [1, 4, 11] {
        let prefix = Tensor::new(&all[..k], &device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let part = m.forward(&prefix, None, None).unwrap();
        let d = max_abs_diff(&part, &full.narrow(1, 0, k).unwrap());
        assert!(d <= 1e-5, "prefix {k}: earlier logits moved by {d}");
    }
    // And the model is not trivially position-blind: a different later token
    // changes the last logits.
    let mut other = all.clone();
    other[0] = (other[0] + 1) % 1001;
    let changed = m
        .forward(
            &Tensor::new(&other[..], &device())
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
            None,
        )
        .unwrap();
    assert!(max_abs_diff(&changed.i((0, 11)).unwrap(), &full.i((0, 11)).unwrap()) > 1e-3);
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let m = load("qwen2-tiny");
    let too_long = Tensor::zeros((1, 129), DType::U32, &device()).unwrap();
    let err = m.forward(&too_long, None, None).unwrap_err();
    assert!(
        matches!(
            err,
            metal_candle::Error::ContextLengthExceeded {
                requested: 129,
                limit: 128
            }
        ),
        "{err}"
    );
    let bad_token = Tensor::new(&[[5u32, 1001]], &device()).unwrap();
    assert!(matches!(
        m.forward(&bad_token, None, None).unwrap_err(),
        metal_candle::Error::InvalidInput(_)
    ));
}

/// bf16 (the CUDA default) against transformers' f32 logits. bf16 keeps 8
/// mantissa bits (relative rounding 2^-9 ≈ 0.2%) and rounds the weights and
/// every activation, so after 2 layers the logits (magnitude up to ~`scale`)
/// drift by a few percent of their scale: the bound is 5% of the largest
/// logit, and the greedy token must agree wherever the f32 top-2 margin is
/// wider than that bound.
#[test]
fn bf16_logits_stay_within_bf16_resolution_of_transformers_f32() {
    let r = reference("qwen2-tiny");
    let m = Qwen2Model::from_pretrained(
        fixture("qwen2-tiny").to_str().unwrap(),
        Some(DType::BF16),
        &device(),
    )
    .unwrap();
    let logits = m
        .forward(&ids(&r["input_ids"]), None, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let reference = &r["logits"];
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_abs_diff(&logits, reference);
    assert!(
        d <= 0.05 * scale,
        "bf16 max abs diff {d} vs logit scale {scale}"
    );
    let ours = logits
        .argmax(2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let theirs_sorted = reference
        .to_device(&candle_core::Device::Cpu)
        .unwrap()
        .flatten_to(1)
        .unwrap();
    let rows = theirs_sorted.to_vec2::<f32>().unwrap();
    for (i, row) in rows.iter().enumerate() {
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let best = row.iter().position(|&v| v == sorted[0]).unwrap() as u32;
        if sorted[0] - sorted[1] > 0.05 * scale {
            assert_eq!(
                ours[i], best,
                "position {i}: greedy token differs despite a clear margin"
            );
        }
    }
    eprintln!("bf16: max abs diff {d:.4} (logit scale {scale:.2})");
}
