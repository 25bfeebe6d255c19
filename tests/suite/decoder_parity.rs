//! Every supported decoder family against Hugging Face transformers on tiny
//! random checkpoints (scripts/fixtures/qwen2.py and decoders.py): logits of
//! prefill, the KV cache, padded batches, long prompts (sliding windows and
//! RoPE scaling at work), greedy generation; causality and errors.

use crate::common::{abs_max, device, fixture, max_abs_diff, reference};
use candle_core::{DType, IndexOp, Tensor};
use metal_candle::inference::{Generator, GeneratorConfig, TextTokenizer};
use metal_candle::models::{load_decoder, CausalLm};

const TOL: f32 = 1e-4;

/// Qwen2 (biases; tied and untied), Llama 3 (llama3 RoPE, tied), Llama with
/// linear / dynamic-NTK / YaRN RoPE, Mistral (sliding window 4), Qwen3
/// (per-head q/k norm, head_dim 32 ≠ hidden/heads), Qwen2 with a window on
/// its second layer only.
const FAMILIES: &[&str] = &[
    "qwen2-tiny",
    "qwen2-tiny-tied",
    "llama3-tiny",
    "llama-tiny-linear",
    "llama-tiny-dynamic",
    "llama-tiny-yarn",
    "mistral-tiny",
    "qwen3-tiny",
    "qwen2-tiny-window",
];

fn load(name: &str) -> Box<dyn CausalLm> {
    load_decoder(fixture(name).to_str().unwrap(), Some(DType::F32), &device())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32)
        .unwrap()
        .to_device(&device())
        .unwrap()
}

fn id_rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

#[test]
fn prefill_logits_match_transformers() {
    for name in FAMILIES {
        let r = reference(name);
        let m = load(name);
        let logits = m.forward(&ids(&r["input_ids"]), None, None).unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d <= TOL, "{name}: max abs diff {d}");
    }
}

/// Prefill `first` tokens of `input`, then one token at a time.
fn cached_logits(m: &dyn CausalLm, input: &Tensor, first: usize) -> Tensor {
    let mut cache = m.new_cache();
    let mut parts = vec![m
        .forward(&input.narrow(1, 0, first).unwrap(), None, Some(&mut cache))
        .unwrap()];
    for t in first..input.dim(1).unwrap() {
        parts.push(
            m.forward(&input.narrow(1, t, 1).unwrap(), None, Some(&mut cache))
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), input.dim(1).unwrap());
    Tensor::cat(&parts, 1).unwrap()
}

#[test]
fn token_by_token_with_kv_cache_matches_transformers() {
    for name in FAMILIES {
        let r = reference(name);
        let m = load(name);
        let logits = cached_logits(&*m, &ids(&r["input_ids"]), 3);
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d <= TOL, "{name}: cached decoding max abs diff {d}");
    }
}

/// 20-token prompts: beyond Mistral's and windowed Qwen2's sliding window,
/// beyond the dynamic-NTK model's trained context (16), and where the RoPE
/// scalings differ from plain RoPE. The dynamic model's cached run differs
/// from its full forward in transformers too (cached keys keep the rotation
/// they were made with): that run is its own reference.
#[test]
fn long_prompts_match_transformers_full_and_cached() {
    for name in FAMILIES
        .iter()
        .filter(|n| reference(n).contains_key("long_logits"))
    {
        let r = reference(name);
        let m = load(name);
        let input = ids(&r["long_input_ids"]);
        let full = m.forward(&input, None, None).unwrap();
        let d = max_abs_diff(&full, &r["long_logits"]);
        assert!(d <= TOL, "{name}: long prompt max abs diff {d}");
        let cached = cached_logits(&*m, &input, 3);
        let want = r.get("long_logits_stepwise").unwrap_or(&r["long_logits"]);
        let d = max_abs_diff(&cached, want);
        assert!(
            d <= TOL,
            "{name}: long prompt with the cache, max abs diff {d}"
        );
    }
}

/// transformers' greedy `generate` (12 new tokens), with and without
/// repetition penalty, alone and as a left-padded batch.
#[test]
fn greedy_generation_matches_transformers() {
    for name in FAMILIES
        .iter()
        .filter(|n| reference(n).contains_key("greedy"))
    {
        let r = reference(name);
        let m = load(name);
        let tok = TextTokenizer::from_file(&fixture(name).join("tokenizer.json")).unwrap();
        let prompt = id_rows(&r["greedy_prompt"]).remove(0);
        for (key, penalty) in [("greedy", 1.0), ("greedy_rep", 1.3)] {
            let config = GeneratorConfig {
                max_tokens: 12,
                repetition_penalty: penalty,
                stop_on_eos: false,
                ..GeneratorConfig::default()
            };
            let mut g = Generator::with_model(&*m, tok.clone(), config).unwrap();
            let out = g.generate_tokens(&prompt).unwrap();
            assert_eq!(out.tokens, id_rows(&r[key])[0], "{name} {key}");
        }
        let config = GeneratorConfig {
            max_tokens: 12,
            stop_on_eos: false,
            pad_token_id: Some(0),
            ..GeneratorConfig::default()
        };
        let mut g = Generator::with_model(&*m, tok.clone(), config).unwrap();
        let masks = id_rows(&r["batch_attention_mask"]);
        let prompts: Vec<Vec<u32>> = id_rows(&r["batch_input_ids"])
            .into_iter()
            .zip(&masks)
            .map(|(row, mask)| {
                row.into_iter()
                    .zip(mask)
                    .filter(|(_, &m)| m == 1)
                    .map(|(t, _)| t)
                    .collect()
            })
            .collect();
        let outs = g.generate_batch_tokens(&prompts).unwrap();
        let want = id_rows(&r["batch_greedy"]);
        for (i, o) in outs.iter().enumerate() {
            assert_eq!(o.tokens, want[i], "{name} batch row {i}");
        }
    }
}

#[test]
fn unsupported_architectures_are_named_with_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "vocab_size": 100}"#,
    )
    .unwrap();
    let err = load_decoder(dir.path().to_str().unwrap(), None, &device()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, metal_candle::Error::UnsupportedArchitecture { .. }),
        "{msg}"
    );
    for name in ["gpt2", "llama", "mistral", "qwen2", "qwen3"] {
        assert!(msg.contains(name), "{msg}");
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
    for name in FAMILIES {
        let r = reference(name);
        let m = load(name);
        for side in ["left", "right"] {
            let input = ids(&r[&format!("input_ids_{side}")]);
            let mask = r[&format!("attention_mask_{side}")]
                .to_device(&device())
                .unwrap();
            let logits = m.forward(&input, Some(&mask), None).unwrap();
            assert_close_where_real(
                &logits,
                &r[&format!("logits_{side}")],
                &mask,
                &format!("{name} {side}"),
            );
        }
        // Padding must not change what a real token sees: the left-padded short
        // row equals the unpadded row's first 4 positions.
        let d = max_abs_diff(
            &r["logits_left"].i((1, 5..9)).unwrap(),
            &r["logits"].i((1, 0..4)).unwrap(),
        );
        assert!(d <= TOL, "{name} reference itself: padded vs unpadded {d}");
    }
}

#[test]
fn left_padded_decoding_with_cache_matches_transformers() {
    for name in FAMILIES {
        let r = reference(name);
        let m = load(name);
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
        assert_close_where_real(
            &logits,
            &r["logits_left"],
            &mask,
            &format!("{name} left-padded cached"),
        );
    }
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
    for name in FAMILIES {
        let r = reference(name);
        let m = load_decoder(
            fixture(name).to_str().unwrap(),
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
        let scale = abs_max(reference);
        let d = max_abs_diff(&logits, reference);
        assert!(
            d <= 0.05 * scale,
            "{name}: bf16 max abs diff {d} vs logit scale {scale}"
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
                    "{name} position {i}: greedy token differs despite a clear margin"
                );
            }
        }
        eprintln!("{name} bf16: max abs diff {d:.4} (logit scale {scale:.2})");
    }
}
