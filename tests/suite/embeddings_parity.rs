//! Our embedding models against transformers / sentence-transformers on tiny
//! random checkpoints saved as full sentence-transformers folders
//! (scripts/fixtures/embeddings.py): MiniLM-, E5- and BGE-like BERT configs,
//! MPNet, and a max-pooling model without Normalize.

use crate::common::{device, fixture, json_strings, max_abs_diff, reference, reference_json};
use candle_core::{DType, IndexOp, Tensor};
use metal_candle::embeddings::{cosine_similarity, top_k};
use metal_candle::embeddings::{EmbeddingModel, EmbeddingModelType, Pooling, PoolingMode};
use metal_candle::io::ModelRepo;
use metal_candle::models::relative_position_bucket;

const TOL: f32 = 1e-5;
const TINY: [&str; 5] = [
    "embed-tiny-minilm",
    "embed-tiny-e5",
    "embed-tiny-bge",
    "embed-tiny-mpnet",
    "embed-tiny-bert-max",
];

fn load(name: &str) -> EmbeddingModel {
    EmbeddingModel::load(
        &ModelRepo::from_dir(fixture(name)),
        Some(DType::F32),
        &device(),
    )
    .unwrap()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn configs_are_read_from_the_sentence_transformers_files() {
    for name in TINY {
        let m = load(name);
        let j = reference_json(name);
        assert_eq!(
            m.max_seq_length() as u64,
            j["max_seq_length"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(m.normalizes(), j["normalize"].as_bool().unwrap(), "{name}");
        let mode = PoolingMode::parse(j["pooling"].as_str().unwrap()).unwrap();
        assert_eq!(m.pooling().modes, vec![mode], "{name}");
        let prompt = |k: &str| {
            j["prompts"]
                .get(k)
                .and_then(|p| p.as_str())
                .filter(|p| !p.is_empty())
        };
        assert_eq!(m.query_prefix(), prompt("query"), "{name}");
        assert_eq!(m.document_prefix(), prompt("document"), "{name}");
    }
}

#[test]
fn tokenization_matches_sentence_transformers() {
    // The fixtures' tokenizer.json has a fixed padding to 40 and truncation
    // at 40 baked in, like the real MiniLM/MPNet files: both must be off,
    // and truncation at max_seq_length (24) instead.
    for name in TINY {
        let m = load(name);
        let r = reference(name);
        let sentences = json_strings(&reference_json(name)["sentences"]);
        let ours = m.tokenize(&refs(&sentences)).unwrap();
        let ids = r["input_ids"].to_vec2::<i64>().unwrap();
        let mask = r["attention_mask"].to_vec2::<i64>().unwrap();
        for (i, row) in ours.iter().enumerate() {
            let n = mask[i].iter().filter(|&&v| v == 1).count();
            let theirs: Vec<u32> = ids[i][..n].iter().map(|&v| v as u32).collect();
            assert_eq!(row, &theirs, "{name}: sentence {i}");
        }
        assert!(
            ours.iter().any(|r| r.len() == m.max_seq_length()),
            "{name}: nothing truncated"
        );
    }
}

#[test]
fn token_embeddings_match_transformers() {
    for name in TINY {
        let m = load(name);
        let r = reference(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let out = m.forward_tokens(&ids, &r["attention_mask"]).unwrap();
        let d = max_abs_diff(&out, &r["token_embeddings"]);
        assert!(d <= TOL, "{name}: token embeddings max abs diff {d}");
        eprintln!("{name}: token embeddings max abs diff {d:.2e}");
    }
}

#[test]
fn sentence_embeddings_match_sentence_transformers() {
    for name in TINY {
        let mut m = load(name);
        let r = reference(name);
        let sentences = json_strings(&reference_json(name)["sentences"]);
        // Several batch sizes: sorting, padding per batch and restoring the order.
        for bs in [1, 2, 32] {
            m.set_batch_size(bs);
            let ours = m.encode(&refs(&sentences)).unwrap();
            let d = max_abs_diff(&ours, &r["sentence_embeddings"]);
            assert!(d <= TOL, "{name} batch {bs}: max abs diff {d}");
            eprintln!("{name} batch {bs}: sentence embeddings max abs diff {d:.2e}");
        }
        let vecs = m.encode_to_vecs(&refs(&sentences)).unwrap();
        let theirs = r["sentence_embeddings"].to_vec2::<f32>().unwrap();
        assert_eq!(vecs.len(), theirs.len());
        for (a, b) in vecs.iter().zip(&theirs) {
            assert!(cosine_similarity(a, b).unwrap() > 0.99999, "{name}");
        }
    }
}

#[test]
fn query_and_document_prefixes_match_sentence_transformers_prompts() {
    for name in ["embed-tiny-e5", "embed-tiny-bge"] {
        let m = load(name);
        let r = reference(name);
        let j = reference_json(name);
        let q = m
            .encode_queries(&refs(&json_strings(&j["queries"])))
            .unwrap();
        let d = max_abs_diff(&q, &r["query_embeddings"]);
        assert!(d <= TOL, "{name} queries: max abs diff {d}");
        let docs = m
            .encode_documents(&refs(&json_strings(&j["documents"])))
            .unwrap();
        let d = max_abs_diff(&docs, &r["document_embeddings"]);
        assert!(d <= TOL, "{name} documents: max abs diff {d}");
        // The prefix must matter, or this test proves nothing.
        let plain = m.encode(&refs(&json_strings(&j["queries"]))).unwrap();
        assert!(
            max_abs_diff(&plain, &r["query_embeddings"]) > 1e-3,
            "{name}"
        );
    }
}

#[test]
fn known_model_types_use_their_prefix_conventions() {
    let mut m = load("embed-tiny-minilm");
    assert_eq!(m.query_prefix(), None);
    for t in EmbeddingModelType::ALL {
        m.set_prefixes(t.query_prefix(), t.document_prefix());
        let q = m.encode_queries(&["what is a cat"]).unwrap();
        let prefixed = format!("{}what is a cat", t.query_prefix().unwrap_or(""));
        let expected = m.encode(&[prefixed.as_str()]).unwrap();
        assert!(max_abs_diff(&q, &expected) <= 1e-6, "{t}");
        assert_eq!(t.name().parse::<EmbeddingModelType>().unwrap(), t);
        assert_eq!(t.repo_id().parse::<EmbeddingModelType>().unwrap(), t);
    }
    assert_eq!(
        EmbeddingModelType::E5SmallV2.query_prefix(),
        Some("query: ")
    );
    assert_eq!(
        EmbeddingModelType::E5BaseV2.document_prefix(),
        Some("passage: ")
    );
    assert_eq!(
        EmbeddingModelType::BgeLargeEnV15.query_prefix(),
        Some("Represent this sentence for searching relevant passages: ")
    );
    assert_eq!(EmbeddingModelType::BgeSmallEnV15.document_prefix(), None);
    assert_eq!(EmbeddingModelType::AllMiniLmL6V2.name(), "all-minilm-l6-v2");
    assert!("no-such-model".parse::<EmbeddingModelType>().is_err());
}

#[test]
fn a_text_alone_equals_the_same_text_in_a_padded_batch() {
    for name in TINY {
        let m = load(name);
        let sentences = json_strings(&reference_json(name)["sentences"]);
        let batch = m.encode(&refs(&sentences)).unwrap();
        for (i, s) in sentences.iter().enumerate() {
            let alone = m.encode(&[s.as_str()]).unwrap();
            let d = max_abs_diff(&alone.i(0).unwrap(), &batch.i(i).unwrap());
            assert!(
                d <= 1e-5,
                "{name} sentence {i}: alone vs batch max abs diff {d}"
            );
        }
    }
}

#[test]
fn mpnet_relative_position_buckets_match_transformers() {
    let r = reference("embed-tiny-mpnet");
    let rel = r["relative_positions"].to_vec1::<i64>().unwrap();
    let buckets = r["relative_buckets"].to_vec1::<i64>().unwrap();
    for (p, b) in rel.iter().zip(&buckets) {
        assert_eq!(
            relative_position_bucket(*p, 32, 128) as i64,
            *b,
            "relative position {p}"
        );
    }
}

#[test]
fn empty_inputs_and_bad_sources() {
    let m = load("embed-tiny-minilm");
    let e = m.encode(&[]).unwrap();
    assert_eq!(e.dims(), &[0, m.dim()]);
    // The empty string is [CLS] [SEP].
    assert_eq!(m.tokenize(&[""]).unwrap()[0].len(), 2);
    assert!(EmbeddingModel::from_dir(fixture("no-such-model"), &device()).is_err());
    // A decoder is not an embedding model: a clear error, not a panic.
    let err = EmbeddingModel::from_dir(fixture("qwen2-tiny"), &device()).unwrap_err();
    assert!(err.to_string().contains("qwen2"), "{err}");
    let mut m = m;
    assert!(m.set_max_seq_length(100_000).is_err());
    let bad = Tensor::new(&[[0u32, 5000]], &device()).unwrap();
    let mask = Tensor::new(&[[1u32, 1]], &device()).unwrap();
    assert!(m.forward_tokens(&bad, &mask).is_err());
}

#[test]
fn top_k_ranks_by_cosine_similarity() {
    let m = load("embed-tiny-e5");
    let docs = [
        "the cat sat on the mat",
        "a man is playing music",
        "hello",
        "one two three",
    ];
    let corpus = m.encode_documents(&docs).unwrap();
    let q = m.encode_queries(&["where is the cat"]).unwrap();
    let hits = top_k(&q, &corpus, 3).unwrap();
    assert_eq!(hits.len(), 3);
    let qv = q.to_vec2::<f32>().unwrap().remove(0);
    let cv = corpus.to_vec2::<f32>().unwrap();
    let mut expected: Vec<(usize, f32)> = cv
        .iter()
        .enumerate()
        .map(|(i, c)| (i, cosine_similarity(&qv, c).unwrap()))
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (h, (i, s)) in hits.iter().zip(&expected) {
        assert_eq!(h.index, *i);
        assert!((h.score - s).abs() <= 1e-5);
    }
    assert!(top_k(&q, &corpus, 10).unwrap().len() == docs.len());
    let wrong = Tensor::zeros(7, DType::F32, &device()).unwrap();
    assert!(top_k(&wrong, &corpus, 1).is_err());
}

#[test]
fn every_pooling_mode_matches_sentence_transformers_pooling() {
    // cls, max, mean, mean_sqrt_len_tokens, weightedmean and lasttoken,
    // concatenated, on transformers' token embeddings of a padded batch.
    let name = "embed-tiny-bert-max";
    let r = reference(name);
    let modes = reference_json(name)["all_pooling_modes"].clone();
    let pooling =
        Pooling::from_json(&serde_json::json!({ "pooling_mode": modes }).to_string()).unwrap();
    assert_eq!(pooling.modes.len(), 6);
    let mask: Vec<Vec<u32>> = r["attention_mask"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|v| v as u32).collect())
        .collect();
    let tokens = r["token_embeddings"].to_device(&device()).unwrap();
    let ours = pooling.pool(&tokens, &mask).unwrap();
    let d = max_abs_diff(&ours, &r["all_modes_pooled"]);
    assert!(d <= 1e-5, "all pooling modes: max abs diff {d}");
    // The legacy boolean format gives the same modes in the same order.
    let legacy = Pooling::from_json(
        r#"{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true,
            "pooling_mode_mean_tokens": true, "pooling_mode_mean_sqrt_len_tokens": true,
            "pooling_mode_weightedmean_tokens": true, "pooling_mode_lasttoken": true}"#,
    )
    .unwrap();
    assert_eq!(legacy, pooling);
    assert!(Pooling::from_json(r#"{"pooling_mode": "nope"}"#).is_err());
    assert!(Pooling::from_json(r#"{"pooling_mode_mean_tokens": false}"#).is_err());
}

#[test]
fn half_precision_weights_stay_close() {
    // bf16/f16 weights (the CUDA default is bf16) with attention softmax,
    // pooling and normalisation in f32: close to the f32 reference.
    for name in TINY {
        let r = reference(name);
        let sentences = json_strings(&reference_json(name)["sentences"]);
        for dtype in [DType::BF16, DType::F16] {
            let m =
                EmbeddingModel::load(&ModelRepo::from_dir(fixture(name)), Some(dtype), &device())
                    .unwrap();
            let ours = m.encode(&refs(&sentences)).unwrap();
            assert_eq!(ours.dtype(), DType::F32);
            let a = ours.to_vec2::<f32>().unwrap();
            let b = r["sentence_embeddings"].to_vec2::<f32>().unwrap();
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                let c = cosine_similarity(x, y).unwrap();
                assert!(c >= 0.999, "{name} {dtype:?} sentence {i}: cosine {c}");
            }
        }
    }
}

/// Texts of mixed lengths: the fixture's sentences and one at the model's
/// longest (truncated).
fn mixed_texts(name: &str) -> Vec<String> {
    let mut texts = json_strings(&reference_json(name)["sentences"]);
    let long = texts.iter().max_by_key(|t| t.len()).cloned().unwrap();
    texts.push([long.as_str(); 4].join(" "));
    texts
}

#[test]
fn packed_batches_equal_padded_batches() {
    // Each batch packed end to end without padding (attention within each
    // text) against padded to its longest text, f32, on `device()`.
    for name in TINY {
        let mut m = load(name);
        let texts = mixed_texts(name);
        for bs in [3, 32] {
            m.set_batch_size(bs);
            m.set_packed_batches(Some(false));
            let padded = m.encode(&refs(&texts)).unwrap();
            m.set_packed_batches(Some(true));
            let packed = m.encode(&refs(&texts)).unwrap();
            let d = max_abs_diff(&packed, &padded);
            assert!(d <= 1e-5, "{name} batch {bs}: packed vs padded {d}");
        }
        let r = reference(name);
        let sentences = json_strings(&reference_json(name)["sentences"]);
        let ours = m.encode(&refs(&sentences)).unwrap();
        let d = max_abs_diff(&ours, &r["sentence_embeddings"]);
        assert!(
            d <= TOL,
            "{name} packed: max abs diff {d} to sentence-transformers"
        );
    }
}

/// A copy of fixture `name` with one attention head (head dim 32, which
/// the CUDA attention kernels take; MPNet keeps the first head's relative
/// position bias).
fn one_head_copy(name: &str) -> tempfile::TempDir {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), &target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture(name), dir.path());
    let config = dir.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["num_attention_heads"] = 1.into();
    std::fs::write(&config, c.to_string()).unwrap();
    let weights = dir.path().join("model.safetensors");
    let mut w = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    for (key, t) in w.iter_mut() {
        if key.ends_with("relative_attention_bias.weight") {
            *t = t.narrow(1, 0, 1).unwrap().contiguous().unwrap();
        }
    }
    candle_core::safetensors::save(&w, &weights).unwrap();
    dir
}

/// 64 texts of up to 64 tokens from `name`'s fixture texts (batches of 32
/// reach the 512 rows from which the linears run on cuBLASLt).
fn head_dim_32_texts(name: &str) -> Vec<String> {
    let base = mixed_texts(name);
    let n = base.len();
    (0..64)
        .map(|i| format!("{} {}", base[i % n], base[(i * 7 + 3) % n]))
        .collect()
}

#[test]
fn batches_at_head_dim_32_match_the_cpu() {
    // Head dim 32: on CUDA the packed and padded attention kernels run
    // (bf16 and f32, MPNet's bias inside the kernel, q/k/v read as views of
    // their fused product); the reference is the same weights in f32 on the
    // CPU (composed attention, padded). Batches of 32 reach the 512 rows
    // from which the linears run on cuBLASLt (bias and GELU in the epilogue
    // in bf16, the bias alone in f32). bf16: cosine >= 0.999; f32: within
    // 1e-5, the tolerance to sentence-transformers.
    let cpu = candle_core::Device::Cpu;
    for name in ["embed-tiny-minilm", "embed-tiny-mpnet"] {
        let dir = one_head_copy(name);
        let repo = ModelRepo::from_dir(dir.path());
        let texts = head_dim_32_texts(name);
        let reference = EmbeddingModel::load(&repo, Some(DType::F32), &cpu)
            .unwrap()
            .encode(&refs(&texts))
            .unwrap();
        for dtype in [DType::BF16, DType::F32] {
            let mut m = EmbeddingModel::load(&repo, Some(dtype), &device()).unwrap();
            for packed in [None, Some(true), Some(false)] {
                m.set_packed_batches(packed);
                let ours = m.encode(&refs(&texts)).unwrap().to_device(&cpu).unwrap();
                if dtype == DType::F32 {
                    let d = max_abs_diff(&ours, &reference);
                    assert!(d <= 1e-5, "{name} f32 packed {packed:?}: max abs diff {d}");
                    continue;
                }
                let a = ours.to_vec2::<f32>().unwrap();
                let b = reference.to_vec2::<f32>().unwrap();
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    let c = cosine_similarity(x, y).unwrap();
                    assert!(
                        c >= 0.999,
                        "{name} {dtype:?} packed {packed:?} text {i}: cosine {c}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_long_list_equals_its_parts() {
    // More texts than one tokenizing chunk (on a GPU the next chunk is
    // tokenized while this one is embedded; order restored across chunks).
    let name = "embed-tiny-minilm";
    let mut m = load(name);
    m.set_batch_size(64);
    let base = mixed_texts(name);
    let texts: Vec<String> = (0..1500)
        .map(|i| format!("{} {i}", base[i % base.len()]))
        .collect();
    let all = m.encode(&refs(&texts)).unwrap();
    let parts: Vec<Tensor> = texts
        .chunks(100)
        .map(|c| m.encode(&refs(c)).unwrap())
        .collect();
    let d = max_abs_diff(&all, &Tensor::cat(&parts, 0).unwrap());
    assert!(d <= 1e-5, "1,500 texts at once vs in parts of 100: {d}");
}
