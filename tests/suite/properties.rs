//! Property tests (proptest): the sampling filters' invariants over random
//! logits and settings, and UTF-8-safe streaming over random text that
//! byte-level BPE splits inside characters.

use std::sync::OnceLock;

use metal_candle::inference::{
    IncrementalDecoder, LogitsProcessor, Sampler, SamplingStrategy, StopConditions, TextTokenizer,
};
use metal_candle::io::ModelRepo;
use proptest::prelude::*;

/// Logits with a few `-inf` (masked) entries.
fn logits() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![9 => -30f32..30f32, 1 => Just(f32::NEG_INFINITY)],
        1..300,
    )
}

fn strategy() -> impl Strategy<Value = SamplingStrategy> {
    (
        prop::option::of(1usize..50),
        prop::option::of(0.01f32..=1.0),
        prop::option::of(0f32..=1.0),
    )
        .prop_map(|(top_k, top_p, min_p)| SamplingStrategy::Combined {
            top_k,
            top_p,
            min_p,
        })
}

/// Probabilities of `logits` (softmax over the finite ones).
fn softmax(l: &[f32]) -> Vec<f64> {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = l.iter().map(|&x| f64::from(x - max).exp()).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|x| x / total).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the filters: a token with a finite logit survives, the
    /// survivors keep their logits, and the draw picks a survivor.
    #[test]
    fn candidates_are_never_empty_and_draws_are_candidates(l in logits(), s in strategy(), seed in any::<u64>()) {
        let p = LogitsProcessor::new(s);
        let c = p.candidates(&l);
        let finite = l.iter().filter(|x| x.is_finite()).count();
        prop_assert_eq!(c.tokens.is_empty(), finite == 0);
        for &(id, v) in &c.tokens {
            prop_assert_eq!(l[id as usize], v);
            prop_assert!(v.is_finite());
        }
        // The most likely token always survives.
        if let Some(best) = l.iter().copied().filter(|x| x.is_finite()).reduce(f32::max) {
            prop_assert!(c.tokens.iter().any(|&(_, v)| v == best));
            let id = Sampler::new(p.clone(), seed).draw(&c).unwrap();
            prop_assert!(c.tokens.iter().any(|&(t, _)| t == id));
            // Seeded: the same draw again.
            prop_assert_eq!(Sampler::new(p, seed).draw(&c).unwrap(), id);
        }
    }

    /// Top-k keeps the k best (and ties with the k-th), nothing worse.
    #[test]
    fn top_k_keeps_exactly_the_best(l in logits(), k in 1usize..40) {
        let c = LogitsProcessor::new(SamplingStrategy::TopK(k)).candidates(&l);
        let mut finite: Vec<f32> = l.iter().copied().filter(|x| x.is_finite()).collect();
        finite.sort_by(|a, b| b.total_cmp(a));
        if finite.is_empty() {
            return Ok(());
        }
        let kth = finite[k.min(finite.len()) - 1];
        let expected = finite.iter().filter(|&&x| x >= kth).count();
        prop_assert_eq!(c.tokens.len(), expected);
        prop_assert!(c.tokens.iter().all(|&(_, v)| v >= kth));
    }

    /// Top-p keeps the most likely tokens until their mass reaches p: the
    /// mass before the least likely kept token is below p, and every token
    /// left out is no more likely than every token kept.
    #[test]
    fn top_p_keeps_the_smallest_nucleus(l in logits(), top_p in 0.01f32..1.0) {
        let c = LogitsProcessor::new(SamplingStrategy::TopP(top_p)).candidates(&l);
        if c.tokens.is_empty() {
            return Ok(());
        }
        let probs = softmax(&l);
        let mut kept: Vec<f64> = c.tokens.iter().map(|&(t, _)| probs[t as usize]).collect();
        kept.sort_by(|a, b| b.total_cmp(a));
        let before_last: f64 = kept[..kept.len() - 1].iter().sum();
        prop_assert!(before_last < f64::from(top_p) + 1e-9, "{before_last} >= {top_p}");
        let min_kept = c.tokens.iter().map(|&(_, v)| v).fold(f32::INFINITY, f32::min);
        let ids: std::collections::HashSet<u32> = c.tokens.iter().map(|&(t, _)| t).collect();
        for (i, &v) in l.iter().enumerate() {
            if !ids.contains(&(i as u32)) {
                prop_assert!(v <= min_kept);
            }
        }
    }

    /// Min-p keeps exactly the tokens at least min_p times as likely as the best.
    #[test]
    fn min_p_threshold(l in logits(), m in 0f32..=1.0) {
        let c = LogitsProcessor::new(SamplingStrategy::MinP(m)).candidates(&l);
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return Ok(());
        }
        let expected = l
            .iter()
            .filter(|&&x| x.is_finite() && (x - max).exp() >= m)
            .count();
        prop_assert_eq!(c.tokens.len(), expected.max(1));
    }

    /// Greedy sampling is the argmax.
    #[test]
    fn greedy_is_the_argmax(l in prop::collection::vec(-30f32..30f32, 1..300)) {
        let t = candle_core::Tensor::new(l.as_slice(), &candle_core::Device::Cpu).unwrap();
        let id = Sampler::new(LogitsProcessor::new(SamplingStrategy::Greedy), 0)
            .sample(&t, &[], &[])
            .unwrap();
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        prop_assert_eq!(l[id as usize], max);
    }

    /// What is held back for a stop string ends on a character boundary,
    /// and only a real prefix of a stop string is held back.
    #[test]
    fn stop_string_holdback_is_a_char_boundary(text in "\\PC{0,20}", stop in "\\PC{1,6}") {
        let s = StopConditions::new(vec![], vec![], vec![stop.clone()]).unwrap();
        let h = s.string_holdback(&text);
        prop_assert!(h <= text.len());
        prop_assert!(text.is_char_boundary(text.len() - h));
        let tail = &text[text.len() - h..];
        prop_assert!(stop.starts_with(tail) && (h == 0 || tail.len() < stop.len()));
        prop_assert_eq!(s.find_string(&text, 0), text.find(stop.as_str()));
    }
}

/// U+FFFD, what an incomplete UTF-8 sequence decodes to.
const REPLACEMENT: char = '\u{FFFD}';

fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        TextTokenizer::from_repo(&ModelRepo::from_dir(crate::common::fixture("qwen2-tiny")))
            .unwrap()
    })
}

/// Mostly multi-byte characters, which the tiny byte-level BPE splits
/// into several tokens each.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("é"),
            Just("世界"),
            Just("😀"),
            Just("👩‍👩‍👧"),
            Just("ß"),
            Just("the "),
            Just("a"),
            Just("\n"),
            Just("Ω≈ç"),
            Just("<|im_end|>"),
        ],
        1..20,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Streaming releases whole characters only, and the pieces add up to
    /// the full decode, however the tokens split the characters.
    #[test]
    fn streamed_pieces_are_whole_characters_and_add_up(s in text(), skip in any::<bool>()) {
        let tok = tokenizer();
        let ids = tok.encode(&s).unwrap();
        let full = tok.decode(&ids, skip).unwrap();
        let mut dec = IncrementalDecoder::new(skip);
        let mut streamed = String::new();
        for &id in &ids {
            let piece = dec.push(tok, id).unwrap();
            prop_assert!(!piece.contains(REPLACEMENT), "partial character released: {piece:?}");
            streamed.push_str(&piece);
            prop_assert!(full.starts_with(&streamed));
        }
        streamed.push_str(&dec.flush(tok).unwrap());
        prop_assert_eq!(&streamed, &full);
        if !skip {
            prop_assert_eq!(&full, &s);
        }
    }

    /// Cut anywhere (a generation stopped mid-character), the stream never
    /// released a partial character, and the flush ends like a full decode.
    #[test]
    fn streams_cut_mid_character_stay_valid(s in text(), cut in 0usize..64) {
        let tok = tokenizer();
        let ids = tok.encode(&s).unwrap();
        let ids = &ids[..cut.min(ids.len())];
        let mut dec = IncrementalDecoder::new(false);
        let mut streamed = String::new();
        for &id in ids {
            let piece = dec.push(tok, id).unwrap();
            prop_assert!(!piece.contains(REPLACEMENT));
            streamed.push_str(&piece);
        }
        streamed.push_str(&dec.flush(tok).unwrap());
        prop_assert_eq!(streamed, tok.decode(ids, false).unwrap());
    }
}
