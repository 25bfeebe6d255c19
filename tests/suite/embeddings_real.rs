//! REAL-MODEL tier: the real all-MiniLM-L6-v2 and all-mpnet-base-v2 against
//! sentence-transformers' vectors (tests/fixtures/embed-real-*, made by
//! scripts/fixtures/embeddings.py). Runs only with METAL_CANDLE_REAL_MODELS=1
//! after scripts/fetch-models.sh; the models are read from the Hugging Face
//! cache (run with HF_HUB_OFFLINE=1 on machines without network).

use crate::common::{device, json_strings, max_abs_diff, real_models, reference, reference_json};
use candle_core::{DType, IndexOp, Tensor};
use metal_candle::embeddings::SemanticIndex;
use metal_candle::embeddings::{EmbeddingModel, EmbeddingModelType};
use metal_candle::io::ModelRepo;

const MIN_COSINE: f32 = 0.99999;

fn load(kind: EmbeddingModelType) -> EmbeddingModel {
    // f32 on every device: the tolerance is sentence-transformers' f32.
    EmbeddingModel::load(
        &ModelRepo::open(kind.repo_id()).unwrap(),
        Some(DType::F32),
        &device(),
    )
    .unwrap()
}

/// Row-wise cosine similarities of two `[n, d]` tensors.
fn cosines(a: &Tensor, b: &Tensor) -> Vec<f32> {
    let a = a.to_vec2::<f32>().unwrap();
    let b = b.to_vec2::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| metal_candle::embeddings::cosine_similarity(x, y).unwrap())
        .collect()
}

fn check_model(kind: EmbeddingModelType, name: &str) {
    let mut m = load(kind);
    let r = reference(name);
    let j = reference_json(name);
    let sentences = json_strings(&j["sentences"]);
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    assert_eq!(
        m.max_seq_length() as u64,
        j["max_seq_length"].as_u64().unwrap()
    );

    // Same tokens as sentence-transformers (the long text is truncated at max_seq_length).
    let ids = m.tokenize(&texts).unwrap();
    for (i, theirs) in j["input_ids"].as_array().unwrap().iter().enumerate() {
        let theirs: Vec<u32> = theirs
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids[i], theirs, "{name}: tokens of sentence {i}");
    }
    assert!(ids.iter().any(|r| r.len() == m.max_seq_length()));

    // Each sentence alone.
    let alone: Vec<Tensor> = texts.iter().map(|t| m.encode(&[t]).unwrap()).collect();
    let alone = Tensor::cat(&alone, 0).unwrap();
    for (i, c) in cosines(&alone, &r["alone"]).iter().enumerate() {
        assert!(*c >= MIN_COSINE, "{name}: sentence {i} alone: cosine {c}");
    }
    let worst_alone = cosines(&alone, &r["alone"])
        .into_iter()
        .fold(1f32, f32::min);
    let diff_alone = max_abs_diff(&alone, &r["alone"]);

    // Mixed in padded batches of several sizes.
    let mut worst_batch = 1f32;
    let mut diff_batch = 0f32;
    let mut diff_alone_batch = 0f32;
    for bs in [3, 32] {
        m.set_batch_size(bs);
        let batched = m.encode(&texts).unwrap();
        for (i, c) in cosines(&batched, &r["batched"]).iter().enumerate() {
            assert!(
                *c >= MIN_COSINE,
                "{name}: sentence {i} in batches of {bs}: cosine {c}"
            );
            worst_batch = worst_batch.min(*c);
        }
        diff_batch = diff_batch.max(max_abs_diff(&batched, &r["batched"]));
        // The same text alone and inside a padded batch.
        for i in 0..texts.len() {
            let d = max_abs_diff(&alone.i(i).unwrap(), &batched.i(i).unwrap());
            assert!(
                d <= 1e-5,
                "{name}: sentence {i}: alone vs batch of {bs}: max abs diff {d}"
            );
            diff_alone_batch = diff_alone_batch.max(d);
        }
    }
    // Packed end to end (no padding) instead of padded: the same vectors.
    m.set_packed_batches(Some(true));
    let packed = m.encode(&texts).unwrap();
    for (i, c) in cosines(&packed, &r["batched"]).iter().enumerate() {
        assert!(*c >= MIN_COSINE, "{name}: sentence {i} packed: cosine {c}");
    }
    let diff_packed = max_abs_diff(&packed, &r["batched"]);
    eprintln!("{name}: packed batches vs sentence-transformers: max abs diff {diff_packed:.2e}");
    eprintln!(
        "{name}: vs sentence-transformers: worst cosine alone {worst_alone:.9} (max abs diff \
         {diff_alone:.2e}), batched {worst_batch:.9} ({diff_batch:.2e}); ours alone vs batched: \
         max abs diff {diff_alone_batch:.2e}"
    );
}

#[test]
fn all_minilm_l6_v2_matches_sentence_transformers() {
    if !real_models() {
        eprintln!("skipped: set METAL_CANDLE_REAL_MODELS=1 (after scripts/fetch-models.sh)");
        return;
    }
    check_model(EmbeddingModelType::AllMiniLmL6V2, "embed-real-minilm-l6");
}

#[test]
fn all_mpnet_base_v2_matches_sentence_transformers() {
    if !real_models() {
        eprintln!("skipped: set METAL_CANDLE_REAL_MODELS=1 (after scripts/fetch-models.sh)");
        return;
    }
    check_model(EmbeddingModelType::AllMpnetBaseV2, "embed-real-mpnet");
}

/// The example of docs/semantic-search.md (and examples/semantic_search.rs).
#[test]
fn semantic_search_finds_the_right_neighbour_with_minilm() {
    if !real_models() {
        eprintln!("skipped: set METAL_CANDLE_REAL_MODELS=1 (after scripts/fetch-models.sh)");
        return;
    }
    let name = "embed-real-minilm-l6";
    let j = reference_json(name);
    let r = reference(name);
    let corpus = json_strings(&j["search_corpus"]);
    let queries = json_strings(&j["search_queries"]);
    let model =
        EmbeddingModel::from_pretrained(EmbeddingModelType::AllMiniLmL6V2, &device()).unwrap();
    let docs: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let index = SemanticIndex::build(&model, &docs).unwrap();
    let st_top1: Vec<usize> = j["search_top1"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    // The neighbours a reader expects: kitty -> cat, instrument -> guitar,
    // French capital -> Paris, data scientists -> Python.
    let expected = [0, 1, 3, 4];
    assert_eq!(st_top1, expected, "sentence-transformers itself disagrees");
    let st_scores = r["search_queries"]
        .matmul(&r["search_corpus"].t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (qi, q) in queries.iter().enumerate() {
        let hits = index.search(&model, q, 3).unwrap();
        assert_eq!(hits[0].index, expected[qi], "query `{q}`: {hits:?}");
        assert_eq!(hits[0].text, corpus[expected[qi]]);
        for h in &hits {
            let d = (h.score - st_scores[qi][h.index]).abs();
            assert!(
                d <= 1e-4,
                "query `{q}` doc {}: score {} vs {}",
                h.index,
                h.score,
                st_scores[qi][h.index]
            );
        }
    }
}
