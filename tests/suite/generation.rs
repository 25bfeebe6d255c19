//! Generation against transformers on the tiny Qwen2 checkpoints: greedy
//! `generate` token for token (with and without repetition penalty, with an
//! EOS that is hit, batched with left padding), the logits warpers on fixed
//! logits, the chat template, plus seeding, stop conditions and streaming.
//! References: scripts/fixtures/generation.py -> tests/fixtures/generation.

use std::collections::HashMap;

use crate::common::{device, fixture, reference};
use candle_core::{DType, IndexOp, Tensor};
use metal_candle::inference::{
    FinishReason, GenerationOutput, Generator, GeneratorConfig, IncrementalDecoder, LanguageModel,
    LogitsProcessor, Message, SamplingStrategy, TokenEvent,
};
use metal_candle::Error;

const MODELS: [&str; 2] = ["qwen2-tiny", "qwen2-tiny-tied"];

fn refs() -> HashMap<String, Tensor> {
    reference("generation")
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap()
}

fn generator(name: &str, config: GeneratorConfig) -> Generator {
    let lm = LanguageModel::from_pretrained(
        fixture(name).to_str().unwrap(),
        Some(DType::F32),
        &device(),
    )
    .unwrap();
    Generator::new(lm, config).unwrap()
}

fn greedy_config() -> GeneratorConfig {
    GeneratorConfig {
        max_tokens: 32,
        stop_on_eos: false,
        ..GeneratorConfig::default()
    }
}

#[test]
fn greedy_generation_equals_transformers() {
    let r = refs();
    for name in MODELS {
        // One generator for every prompt: the KV cache must reset in between.
        let mut gen = generator(name, greedy_config());
        for i in 0..3 {
            let prompt = ids(&r[&format!("{name}.prompt{i}")]);
            let out = gen.generate_tokens(&prompt).unwrap();
            assert_eq!(
                out.tokens,
                ids(&r[&format!("{name}.prompt{i}_greedy")]),
                "{name} prompt {i}"
            );
            assert_eq!(out.finish_reason, FinishReason::MaxTokens);
            assert_eq!(out.prompt_tokens, prompt.len());
        }
        gen.set_config(GeneratorConfig {
            repetition_penalty: 1.3,
            ..greedy_config()
        })
        .unwrap();
        for i in 0..3 {
            let prompt = ids(&r[&format!("{name}.prompt{i}")]);
            let out = gen.generate_tokens(&prompt).unwrap();
            assert_eq!(
                out.tokens,
                ids(&r[&format!("{name}.prompt{i}_greedy_rp1.3")]),
                "{name} prompt {i} with repetition penalty"
            );
        }
    }
}

#[test]
fn greedy_generation_stops_at_eos_like_transformers() {
    let r = refs();
    for name in MODELS {
        let mut gen = generator(name, greedy_config());
        for i in 0..3 {
            let eos = ids(&r[&format!("{name}.prompt{i}_eos")]);
            gen.set_config(GeneratorConfig {
                stop_on_eos: true,
                eos_token_ids: Some(eos.clone()),
                ..greedy_config()
            })
            .unwrap();
            let prompt = ids(&r[&format!("{name}.prompt{i}")]);
            let out = gen.generate_tokens(&prompt).unwrap();
            let expected = ids(&r[&format!("{name}.prompt{i}_greedy_eos")]);
            assert_eq!(out.tokens, expected, "{name} prompt {i}");
            assert!(expected.len() < 32);
            assert_eq!(out.finish_reason, FinishReason::Eos);
            // The EOS token is not part of the text.
            let text = gen
                .tokenizer()
                .decode(&expected[..expected.len() - 1], true)
                .unwrap();
            assert_eq!(out.text, text);
        }
    }
}

#[test]
fn batched_greedy_equals_transformers_and_one_by_one() {
    let r = refs();
    for name in MODELS {
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|i| ids(&r[&format!("{name}.prompt{i}")]))
            .collect();
        let mut gen = generator(
            name,
            GeneratorConfig {
                pad_token_id: Some(0),
                ..greedy_config()
            },
        );
        let batch = gen.generate_batch_tokens(&prompts).unwrap();
        let theirs = r[&format!("{name}.batch_greedy")]
            .to_dtype(DType::U32)
            .unwrap();
        for (i, out) in batch.iter().enumerate() {
            assert_eq!(
                out.tokens,
                theirs.i(i).unwrap().to_vec1::<u32>().unwrap(),
                "{name} row {i} vs transformers"
            );
            let single = gen.generate_tokens(&prompts[i]).unwrap();
            assert_eq!(out, &single, "{name} row {i} vs one by one");
        }

        // Per-sequence stop: row 0 hits its EOS, the others run to 32.
        let eos = ids(&r[&format!("{name}.prompt0_eos")]);
        gen.set_config(GeneratorConfig {
            pad_token_id: Some(0),
            stop_on_eos: true,
            eos_token_ids: Some(eos.clone()),
            ..greedy_config()
        })
        .unwrap();
        let batch = gen.generate_batch_tokens(&prompts).unwrap();
        let theirs = r[&format!("{name}.batch_greedy_eos")]
            .to_dtype(DType::U32)
            .unwrap();
        for (i, out) in batch.iter().enumerate() {
            let row = theirs.i(i).unwrap().to_vec1::<u32>().unwrap();
            // transformers pads a finished row; ours stops at its EOS.
            let end = row
                .iter()
                .position(|t| eos.contains(t))
                .map_or(row.len(), |p| p + 1);
            assert_eq!(out.tokens, row[..end], "{name} row {i} with EOS");
            let single = gen.generate_tokens(&prompts[i]).unwrap();
            assert_eq!(out, &single, "{name} row {i} with EOS vs one by one");
        }
        assert_eq!(batch[0].finish_reason, FinishReason::Eos);

        // Text prompts through the tokenizer, the same both ways.
        gen.set_config(greedy_config()).unwrap();
        let texts = ["Hello world", "日本語のテキスト 🦀", "fn"];
        let batch = gen.generate_batch(&texts).unwrap();
        for (t, b) in texts.iter().zip(&batch) {
            assert_eq!(b, &gen.generate(t).unwrap().text);
        }
    }
}

fn assert_same_logits(ours: &Tensor, theirs: &Tensor, what: &str) {
    let a = ours.to_vec1::<f32>().unwrap();
    let b = theirs.to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let mut kept = 0;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x.is_finite(),
            y.is_finite(),
            "{what}: token {i} filtered differently ({x} vs {y})"
        );
        if y.is_finite() {
            kept += 1;
            assert!((x - y).abs() <= 1e-6, "{what}: token {i}: {x} vs {y}");
        }
    }
    assert!(kept > 0);
}

#[test]
fn logits_processors_equal_transformers_warpers() {
    let r = refs();
    let logits = &r["logits"];
    let history = r["history"].to_dtype(DType::U32).unwrap();
    let sample = |s: SamplingStrategy| LogitsProcessor::new(s);
    let with = |f: &dyn Fn(&mut LogitsProcessor), s: SamplingStrategy| {
        let mut p = LogitsProcessor::new(s);
        f(&mut p);
        p
    };
    let cases: Vec<(&str, LogitsProcessor)> = vec![
        (
            "temperature0.7",
            with(&|p| p.temperature = 0.7, SamplingStrategy::Temperature),
        ),
        (
            "temperature1.5",
            with(&|p| p.temperature = 1.5, SamplingStrategy::Temperature),
        ),
        ("top_k1", sample(SamplingStrategy::TopK(1))),
        ("top_k50", sample(SamplingStrategy::TopK(50))),
        ("top_p0.9", sample(SamplingStrategy::TopP(0.9))),
        ("top_p0.3", sample(SamplingStrategy::TopP(0.3))),
        ("min_p0.05", sample(SamplingStrategy::MinP(0.05))),
        ("min_p0.2", sample(SamplingStrategy::MinP(0.2))),
        (
            "rep1.3",
            with(&|p| p.repetition_penalty = 1.3, SamplingStrategy::Greedy),
        ),
        (
            "rep0.8",
            with(&|p| p.repetition_penalty = 0.8, SamplingStrategy::Greedy),
        ),
        (
            "combined",
            with(
                &|p| {
                    p.repetition_penalty = 1.2;
                    p.temperature = 0.8;
                },
                SamplingStrategy::Combined {
                    top_k: Some(100),
                    top_p: Some(0.9),
                    min_p: Some(0.02),
                },
            ),
        ),
        (
            "combined_no_topk",
            with(
                &|p| p.temperature = 1.3,
                SamplingStrategy::Combined {
                    top_k: None,
                    top_p: Some(0.8),
                    min_p: Some(0.01),
                },
            ),
        ),
        (
            "freq0.5_pres0.3",
            with(
                &|p| {
                    p.frequency_penalty = 0.5;
                    p.presence_penalty = 0.3;
                },
                SamplingStrategy::Greedy,
            ),
        ),
    ];
    let dev = device();
    for (name, proc) in cases {
        let theirs = &r[&format!("warp.{name}")];
        for row in 0..logits.dim(0).unwrap() {
            let h = history.i(row).unwrap().to_vec1::<u32>().unwrap();
            let l = logits.i(row).unwrap().to_device(&dev).unwrap();
            let ours = proc
                .process(&l, &h, &h)
                .unwrap()
                .to_device(&candle_core::Device::Cpu)
                .unwrap();
            assert_same_logits(&ours, &theirs.i(row).unwrap(), &format!("{name} row {row}"));
        }
    }
}

fn sampling_config(seed: u64) -> GeneratorConfig {
    GeneratorConfig {
        max_tokens: 32,
        stop_on_eos: false,
        sampling: SamplingStrategy::Combined {
            top_k: Some(200),
            top_p: Some(0.95),
            min_p: Some(0.01),
        },
        temperature: 1.5,
        seed: Some(seed),
        ..GeneratorConfig::default()
    }
}

#[test]
fn same_seed_same_output() {
    let r = refs();
    let prompt = ids(&r["qwen2-tiny.prompt1"]);
    let greedy = ids(&r["qwen2-tiny.prompt1_greedy"]);
    let mut gen = generator("qwen2-tiny", sampling_config(7));
    let a = gen.generate_tokens(&prompt).unwrap();
    let b = gen.generate_tokens(&prompt).unwrap();
    assert_eq!(a, b, "same seed, same generator");
    let c = generator("qwen2-tiny", sampling_config(7))
        .generate_tokens(&prompt)
        .unwrap();
    assert_eq!(a, c, "same seed, new generator");
    gen.set_config(sampling_config(8)).unwrap();
    let d = gen.generate_tokens(&prompt).unwrap();
    assert_ne!(a.tokens, d.tokens, "another seed");
    assert_ne!(a.tokens, greedy, "sampling is not greedy here");

    // Filters that leave one token reduce sampling to greedy.
    for s in [SamplingStrategy::TopK(1), SamplingStrategy::MinP(1.0)] {
        gen.set_config(GeneratorConfig {
            sampling: s,
            temperature: 0.7,
            seed: Some(3),
            ..greedy_config()
        })
        .unwrap();
        assert_eq!(
            gen.generate_tokens(&prompt).unwrap().tokens,
            greedy,
            "{s:?}"
        );
    }
    // Temperature 0 is greedy.
    gen.set_config(GeneratorConfig {
        temperature: 0.0,
        ..sampling_config(1)
    })
    .unwrap();
    assert_eq!(gen.generate_tokens(&prompt).unwrap().tokens, greedy);
}

fn collect_stream(gen: &mut Generator, prompt: &str) -> (Vec<TokenEvent>, GenerationOutput) {
    let mut stream = gen.stream(prompt).unwrap();
    let events: Vec<TokenEvent> = stream.by_ref().map(Result::unwrap).collect();
    (events, stream.into_output().unwrap())
}

fn concat(events: &[TokenEvent]) -> String {
    events.iter().map(|e| e.text.as_str()).collect()
}

#[test]
fn streaming_equals_non_streaming() {
    let prompts = ["Hello world", "日本語のテキスト 🦀🚀 emoji", "fn main() {"];
    let configs = [
        greedy_config(),
        sampling_config(5),
        GeneratorConfig {
            stop_on_eos: true,
            ..sampling_config(11)
        },
    ];
    for name in MODELS {
        let mut gen = generator(name, greedy_config());
        for config in &configs {
            gen.set_config(config.clone()).unwrap();
            for p in prompts {
                let full = gen.generate(p).unwrap();
                let (events, out) = collect_stream(&mut gen, p);
                assert_eq!(out, full, "{name} {p:?}: iterator result");
                assert_eq!(concat(&events), full.text, "{name} {p:?}: iterator text");
                let toks: Vec<u32> = events.iter().map(|e| e.token).collect();
                assert_eq!(toks, full.tokens);
                assert!(events.iter().enumerate().all(|(i, e)| e.index == i));
                let last = events.last().unwrap();
                assert_eq!(last.finish_reason, Some(full.finish_reason));

                let mut pieces = String::new();
                let out = gen
                    .generate_stream(p, |e| {
                        pieces.push_str(&e.text);
                        true
                    })
                    .unwrap();
                assert_eq!(out, full);
                assert_eq!(pieces, full.text, "{name} {p:?}: callback text");
            }
        }
    }
}

#[test]
fn callback_returning_false_stops() {
    let mut gen = generator("qwen2-tiny", greedy_config());
    let mut n = 0;
    let out = gen
        .generate_stream("Hello", |_| {
            n += 1;
            n < 3
        })
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(out.tokens.len(), 3);
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    let full = gen.generate("Hello").unwrap();
    assert_eq!(out.tokens, full.tokens[..3]);
}

#[test]
fn incremental_decoding_keeps_multibyte_characters_whole() {
    let lm = LanguageModel::from_pretrained(
        fixture("qwen2-tiny").to_str().unwrap(),
        Some(DType::F32),
        &device(),
    )
    .unwrap();
    let tok = &lm.tokenizer;
    let text = "日本語のテキスト 🦀🚀 emoji 你好，世界！ 👩‍💻 café";
    let ids = tok.encode(text).unwrap();
    // The tiny tokenizer splits some characters across tokens.
    let split = ids
        .iter()
        .filter(|&&t| tok.decode(&[t], false).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(split >= 4, "only {split} tokens hold partial characters");
    let mut dec = IncrementalDecoder::new(true);
    let mut out = String::new();
    let mut held = 0;
    for &t in &ids {
        let piece = dec.push(tok, t).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "piece {piece:?} splits a character"
        );
        held += usize::from(piece.is_empty());
        out.push_str(&piece);
        assert!(text.starts_with(&out));
    }
    out.push_str(&dec.flush(tok).unwrap());
    assert_eq!(out, text);
    assert!(held > 0, "nothing was held back");
}

#[test]
fn stop_strings_and_sequences() {
    for name in MODELS {
        let mut gen = generator(name, greedy_config());
        let prompt = "The quick brown fox";
        let full = gen.generate(prompt).unwrap();
        let chars: Vec<char> = full.text.chars().collect();
        assert!(chars.len() > 12, "{name}: {:?}", full.text);
        // A stop string from the middle of the text, and one that never occurs.
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
        let cut = full.text.find(&stop).unwrap();
        gen.set_config(GeneratorConfig {
            stop_strings: vec!["never in this text \u{0}".into(), stop.clone()],
            ..greedy_config()
        })
        .unwrap();
        let out = gen.generate(prompt).unwrap();
        assert_eq!(out.finish_reason, FinishReason::StopString);
        assert_eq!(out.text, full.text[..cut], "{name}: stop string {stop:?}");
        assert!(!out.text.contains(&stop));
        assert!(out.tokens.len() < full.tokens.len());
        assert_eq!(out.tokens, full.tokens[..out.tokens.len()]);
        let (events, _) = collect_stream(&mut gen, prompt);
        assert_eq!(
            concat(&events),
            out.text,
            "{name}: streamed with stop string"
        );

        // A token sequence from the middle of the generation.
        let seq = full.tokens[8..10].to_vec();
        let first = full.tokens.windows(2).position(|w| w == seq).unwrap();
        gen.set_config(GeneratorConfig {
            stop_sequences: vec![vec![1000, 999, 998], seq],
            ..greedy_config()
        })
        .unwrap();
        let out = gen.generate(prompt).unwrap();
        assert_eq!(out.finish_reason, FinishReason::StopSequence);
        assert_eq!(out.tokens, full.tokens[..first + 2]);
        assert_eq!(
            out.text,
            gen.tokenizer().decode(&full.tokens[..first], true).unwrap()
        );
        let (events, _) = collect_stream(&mut gen, prompt);
        assert_eq!(
            concat(&events),
            out.text,
            "{name}: streamed with stop sequence"
        );
    }
}

#[test]
fn chat_template_and_tokenizer_equal_transformers() {
    let meta = crate::common::reference_json("generation");
    let chats: Vec<Vec<Message>> = serde_json::from_value(meta["chats"].clone()).unwrap();
    for name in MODELS {
        let mut gen = generator(name, greedy_config());
        let m = &meta[name];
        for (chat, expected) in chats.iter().zip(m["chat"].as_array().unwrap()) {
            let ours = gen.tokenizer().apply_chat_template(chat).unwrap();
            assert_eq!(ours, expected.as_str().unwrap());
        }
        for (text, expected) in m["texts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(m["ids"].as_array().unwrap())
        {
            let expected: Vec<u32> = serde_json::from_value(expected.clone()).unwrap();
            assert_eq!(
                gen.tokenizer().encode(text.as_str().unwrap()).unwrap(),
                expected
            );
        }
        assert_eq!(
            gen.tokenizer().eos_token_ids(),
            [m["eos_token_id"].as_u64().unwrap() as u32]
        );
        // generate_chat = the rendered prompt through generate.
        let out = gen.generate_chat(&chats[1]).unwrap();
        let rendered = m["chat"][1].as_str().unwrap();
        assert_eq!(out, gen.generate(rendered).unwrap());
        assert_eq!(
            out.prompt_tokens,
            gen.tokenizer().encode(rendered).unwrap().len()
        );
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let mut gen = generator("qwen2-tiny", greedy_config());
    assert!(matches!(gen.generate(""), Err(Error::InvalidInput(_))));
    assert!(matches!(
        gen.generate_tokens(&[]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        gen.generate_batch_tokens(&[]),
        Err(Error::InvalidInput(_))
    ));
    // Context 128: a 100-token prompt leaves no room for 32 new tokens.
    let long = vec![5u32; 100];
    match gen.generate_tokens(&long) {
        Err(Error::ContextLengthExceeded { requested, limit }) => {
            assert_eq!((requested, limit), (132, 128));
        }
        other => panic!("expected ContextLengthExceeded, got {other:?}"),
    }
    assert!(matches!(
        gen.generate_tokens(&[5u32; 300]),
        Err(Error::ContextLengthExceeded { .. })
    ));
    assert!(gen.generate_tokens(&[5u32; 96]).is_ok(), "96 + 32 fits");
    assert!(matches!(
        gen.generate_tokens(&[5000]),
        Err(Error::InvalidInput(_))
    ));

    let bad = [
        GeneratorConfig {
            max_tokens: 0,
            ..greedy_config()
        },
        GeneratorConfig {
            temperature: -1.0,
            ..greedy_config()
        },
        GeneratorConfig {
            temperature: f32::NAN,
            ..greedy_config()
        },
        GeneratorConfig {
            repetition_penalty: 0.0,
            ..greedy_config()
        },
        GeneratorConfig {
            sampling: SamplingStrategy::TopK(0),
            ..greedy_config()
        },
        GeneratorConfig {
            sampling: SamplingStrategy::TopP(0.0),
            ..greedy_config()
        },
        GeneratorConfig {
            sampling: SamplingStrategy::TopP(1.5),
            ..greedy_config()
        },
        GeneratorConfig {
            sampling: SamplingStrategy::MinP(2.0),
            ..greedy_config()
        },
        GeneratorConfig {
            stop_strings: vec![String::new()],
            ..greedy_config()
        },
        GeneratorConfig {
            stop_sequences: vec![vec![]],
            ..greedy_config()
        },
        GeneratorConfig {
            frequency_penalty: f32::INFINITY,
            ..greedy_config()
        },
    ];
    for c in bad {
        assert!(
            matches!(c.validate(), Err(Error::InvalidConfig { .. })),
            "{c:?}"
        );
        assert!(gen.set_config(c).is_err());
    }
    assert_eq!(
        gen.config(),
        &greedy_config(),
        "a bad config is not applied"
    );
    assert!(GeneratorConfig::default().validate().is_ok());
}

#[test]
fn text_that_may_start_a_stop_string_is_held_then_released() {
    let mut gen = generator("qwen2-tiny", greedy_config());
    let prompt = "The quick brown fox";
    let full = gen.generate(prompt).unwrap();
    let chars: Vec<char> = full.text.chars().collect();
    // Every 2-character window of the text starts a stop string that never
    // completes: each is held back, then released when it does not match.
    let stops: Vec<String> = (0..chars.len() - 1)
        .map(|i| chars[i..i + 2].iter().collect::<String>() + "\u{0}")
        .collect();
    gen.set_config(GeneratorConfig {
        stop_strings: stops,
        ..greedy_config()
    })
    .unwrap();
    let (events, out) = collect_stream(&mut gen, prompt);
    assert_eq!(out.text, full.text);
    assert_eq!(out.finish_reason, FinishReason::MaxTokens);
    assert_eq!(concat(&events), full.text);
    let last = &events.last().unwrap().text;
    assert!(
        !last.is_empty(),
        "the held-back tail comes with the last event"
    );
}

#[test]
fn stop_condition_hold_back_is_character_safe() {
    use metal_candle::inference::StopConditions;
    let s = StopConditions::new(
        vec![],
        vec![vec![7, 8, 9]],
        vec!["<|end|>".into(), "日本".into()],
    )
    .unwrap();
    assert_eq!(s.string_holdback("abc<|e"), "<|e".len());
    assert_eq!(s.string_holdback("abc 日"), "日".len());
    assert_eq!(s.string_holdback("abc 本"), 0);
    assert_eq!(s.find_string("x 日本 <|end|>", 0), Some(2));
    assert_eq!(s.sequence_holdback(&[1, 7, 8]), 2);
    assert_eq!(s.sequence_holdback(&[7, 8, 1]), 0);
    assert_eq!(s.sequence_match(&[1, 7, 8, 9]), Some(3));
}

#[test]
fn presence_and_frequency_penalties_are_applied_when_generating() {
    let r = refs();
    let prompt = ids(&r["qwen2-tiny.prompt0"]);
    let greedy = ids(&r["qwen2-tiny.prompt0_greedy"]);
    let distinct = |t: &[u32]| t.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct(&greedy) < greedy.len(), "plain greedy repeats");
    for (presence, frequency) in [(1e4, 0.0), (0.0, 1e4)] {
        let mut gen = generator(
            "qwen2-tiny",
            GeneratorConfig {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..greedy_config()
            },
        );
        let out = gen.generate_tokens(&prompt).unwrap();
        // A penalty far above any logit gap forbids every generated token.
        assert_eq!(
            distinct(&out.tokens),
            out.tokens.len(),
            "{presence} {frequency}"
        );
        assert_eq!(out.tokens[0], greedy[0]);
    }
}

/// Top-p over a large vocabulary (the binned path, above 4,096 candidates)
/// keeps exactly what transformers' full sort keeps, on flat and peaked
/// distributions.
#[test]
fn top_p_on_a_large_vocabulary_matches_a_full_sort() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for (spread, p) in [
        (0.05f32, 0.9f32),
        (1.0, 0.9),
        (4.0, 0.3),
        (8.0, 0.99),
        (1.0, 0.5),
    ] {
        let logits: Vec<f32> = (0..50_000)
            .map(|i| {
                // A few exact ties, as bf16 logits have.
                let v: f32 = rng.random::<f32>() * spread * 10.0;
                if i % 7 == 0 {
                    (v * 4.0).round() / 4.0
                } else {
                    v
                }
            })
            .collect();
        let proc = LogitsProcessor::new(SamplingStrategy::TopP(p));
        let mut ours: Vec<u32> = proc
            .candidates(&logits)
            .tokens
            .iter()
            .map(|t| t.0)
            .collect();
        // Reference: sort everything (most likely first, ties by id) and keep
        // a token while the mass ahead of it is < p.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let mut before = 0.0f64;
        let mut theirs = Vec::new();
        for &t in &order {
            if !theirs.is_empty() && before >= f64::from(p) {
                break;
            }
            theirs.push(t);
            before += f64::from((logits[t as usize] - max).exp()) / total;
        }
        ours.sort_unstable();
        theirs.sort_unstable();
        assert_eq!(
            ours.len(),
            theirs.len(),
            "spread {spread}, p {p}: nucleus size"
        );
        assert_eq!(ours, theirs, "spread {spread}, p {p}");
    }
}

/// Sampling on the test device (one kernel for all rows on CUDA) gives the
/// tokens the host filters give on the CPU for the same seed, for every
/// filter with penalties and temperature, in f32 and bf16 (whose rounding
/// makes ties), and the batched call equals row-by-row calls with finished
/// rows skipped.
#[test]
fn sampling_on_the_device_equals_the_host_filters() {
    use metal_candle::inference::Sampler;
    use rand::{Rng, SeedableRng};
    let dev = device();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let vocab = 50_000usize;
    let strategies = [
        SamplingStrategy::Temperature,
        SamplingStrategy::TopK(40),
        SamplingStrategy::TopP(0.9),
        SamplingStrategy::TopP(0.3),
        SamplingStrategy::MinP(0.05),
        SamplingStrategy::Combined {
            top_k: Some(2_000),
            top_p: Some(0.8),
            min_p: Some(0.01),
        },
    ];
    let context: Vec<u32> = (0..300)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let generated: Vec<u32> = context[200..].to_vec();
    for spread in [0.3f32, 3.0, 12.0] {
        let rows: Vec<f32> = (0..3 * vocab)
            .map(|_| (rng.random::<f32>() - 0.5) * spread)
            .collect();
        let host = Tensor::from_vec(rows, (3, vocab), &candle_core::Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let host = host.to_dtype(dtype).unwrap();
            let ours = host.to_device(&dev).unwrap();
            for strategy in strategies {
                let mut p = LogitsProcessor::new(strategy);
                p.temperature = 0.7;
                p.repetition_penalty = 1.3;
                p.frequency_penalty = 0.5;
                p.presence_penalty = 0.2;
                let what = format!("{strategy:?}, spread {spread}, {dtype:?}");
                let (mut a, mut b) = (Sampler::new(p.clone(), 5), Sampler::new(p.clone(), 5));
                for step in 0..8 {
                    let r = step % 3;
                    let want = a
                        .sample(&host.get(r).unwrap(), &context, &generated)
                        .unwrap();
                    let got = b
                        .sample(&ours.get(r).unwrap(), &context, &generated)
                        .unwrap();
                    assert_eq!(got, want, "{what}, step {step}");
                }
                // Batched, the middle row finished: equal to the rows one by one.
                let histories = [
                    Some((&context[..], &generated[..])),
                    None,
                    Some((&context[..100], &[][..])),
                ];
                let (mut a, mut b) = (Sampler::new(p.clone(), 9), Sampler::new(p, 9));
                let got = b.sample_batch(&ours, &histories).unwrap();
                let want = vec![
                    Some(
                        a.sample(&host.get(0).unwrap(), &context, &generated)
                            .unwrap(),
                    ),
                    None,
                    Some(
                        a.sample(&host.get(2).unwrap(), &context[..100], &[])
                            .unwrap(),
                    ),
                ];
                assert_eq!(got, want, "{what}, batched");
            }
        }
    }
    // Rows that cannot be sampled are errors on every device.
    let p = LogitsProcessor::new(SamplingStrategy::TopP(0.9));
    for (bad, msg) in [
        (f32::NEG_INFINITY, "all -inf or NaN"),
        (f32::NAN, "all -inf or NaN"),
    ] {
        let row = Tensor::full(bad, 1000, &dev).unwrap();
        let e = Sampler::new(p.clone(), 0)
            .sample(&row, &[], &[])
            .unwrap_err();
        assert!(e.to_string().contains(msg), "{e}");
    }
    let mut row = vec![0f32; 1000];
    row[7] = f32::INFINITY;
    let row = Tensor::new(row, &dev).unwrap();
    let e = Sampler::new(p, 0).sample(&row, &[], &[]).unwrap_err();
    assert!(e.to_string().contains("+inf"), "{e}");
}

/// Greedy ids of eager decoding (the growing KV cache) after `prompt`, how
/// many of them were chosen by a top-two gap above bf16 noise, and the
/// check that [`DecodeGraph`] steps fed the same ids give the same logits
/// (bf16 tolerance) and replay a captured graph from the second step on.
/// `None` where no static cache is made (off CUDA).
fn check_decode_graph(
    model: &dyn metal_candle::models::CausalLm,
    prompt: &[u32],
    steps: usize,
) -> Option<(Vec<u32>, usize)> {
    use metal_candle::inference::DecodeGraph;
    let dev = model.device().clone();
    let input = Tensor::new(prompt, &dev).unwrap().unsqueeze(0).unwrap();
    let mut cache = model.new_cache();
    let mut logits = model.forward_last(&input, None, Some(&mut cache)).unwrap();
    let (mut want_ids, mut want_logits) = (Vec::new(), Vec::new());
    let mut clear = steps;
    for step in 0..steps {
        let row: Vec<f32> = logits.get(0).unwrap().to_vec1().unwrap();
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] < 0.1 {
            clear = clear.min(step);
        }
        let id = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
        want_ids.push(id);
        logits = model
            .forward_last(&Tensor::new(&[[id]], &dev).unwrap(), None, Some(&mut cache))
            .unwrap();
        want_logits.push(logits.clone());
    }
    let mut cache = model.new_cache();
    model.forward_last(&input, None, Some(&mut cache)).unwrap();
    let mut graph = DecodeGraph::new(model, &cache, prompt.len() + steps).unwrap()?;
    for (i, (&id, want)) in want_ids.iter().zip(&want_logits).enumerate() {
        let got = graph.step(model, &[id]).unwrap();
        let diff = crate::common::abs_max(&(&got - want).unwrap());
        let scale = crate::common::abs_max(want);
        // bf16 activations: the two paths round differently (a fused bias +
        // RoPE + cache write against separate ops, one preallocated cache
        // against a concatenated one).
        assert!(
            diff <= 0.03 * scale.max(1.0),
            "step {i}: max diff {diff} (scale {scale})"
        );
        if i >= 1 {
            assert!(
                graph.is_captured(),
                "step {i} did not replay a captured graph"
            );
        }
    }
    assert_eq!(graph.len(), prompt.len() + steps);
    Some((want_ids, clear))
}

/// Decode steps over a static cache, the second captured as a CUDA graph and
/// replayed after, give the logits of eager decoding with the growing KV
/// cache, in bf16 (the attention kernel's dtype): on Qwen3 tiny (head dim
/// 32, q/k norms: the step's separate RoPE and cache writes) and on a
/// random Qwen2 (head dim 64, q/k/v biases: the fused bias + RoPE + cache
/// write); the Generator, which takes that path on CUDA, generates the same
/// greedy tokens. Off CUDA no static cache is made.
#[test]
fn decode_graph_equals_eager_decoding() {
    let dev = device();
    let prompt: Vec<u32> = vec![5, 17, 99, 3, 250, 11, 42];
    let steps = 24;
    let lm = LanguageModel::from_pretrained(
        fixture("qwen3-tiny").to_str().unwrap(),
        Some(DType::BF16),
        &dev,
    )
    .unwrap();
    let Some((want_ids, clear)) = check_decode_graph(&*lm.model, &prompt, steps) else {
        assert!(!dev.is_cuda(), "no static cache on CUDA for a bf16 Qwen3");
        return;
    };
    let mut gen = Generator::new(lm, greedy_config()).unwrap();
    let out = gen.generate_tokens(&prompt).unwrap();
    assert_eq!(&out.tokens[..clear], &want_ids[..clear]);

    let config = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true,
    });
    let (_, model) = crate::random_model::random_decoder(&config, 0.05, DType::BF16, &dev).unwrap();
    check_decode_graph(&*model, &prompt, steps).expect("a static cache for a bf16 Qwen2 on CUDA");
}

/// A decode loop's state and a token stream can move to another thread
/// with or without the `cuda` feature (a captured graph is Send).
#[test]
fn decode_state_is_send() {
    fn send<T: Send>() {}
    send::<metal_candle::inference::DecodeGraph>();
    send::<metal_candle::inference::TokenStream<'static, Box<dyn metal_candle::models::CausalLm>>>(
    );
}
