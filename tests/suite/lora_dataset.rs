//! JSONL datasets: the three formats, label masking, truncation, padding,
//! seeded shuffling and the eval split, on a small word-level tokenizer with
//! a ChatML template (written into a temp dir).

use std::path::Path;

use metal_candle::inference::TextTokenizer;
use metal_candle::io::ModelRepo;
use metal_candle::training::{Dataset, DatasetConfig, IGNORE_INDEX};

const WORDS: [&str; 18] = [
    "<|im_start|>",
    "<|im_end|>",
    "<unk>",
    "user",
    "assistant",
    "system",
    "hi",
    "hello",
    "there",
    "how",
    "are",
    "you",
    "fine",
    "the",
    "cat",
    "sat",
    "tell",
    "me",
];

fn tokenizer(dir: &Path) -> TextTokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let added: Vec<serde_json::Value> = WORDS[..2]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            serde_json::json!({"id": i, "content": w, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let template =
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                    {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let cfg = serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>"});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    TextTokenizer::from_repo(&ModelRepo::from_dir(dir)).unwrap()
}

fn load(lines: &str, max_len: usize) -> metal_candle::Result<Dataset> {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let path = dir.path().join("data.jsonl");
    std::fs::write(&path, lines).unwrap();
    Dataset::from_jsonl(
        &path,
        &tok,
        &DatasetConfig {
            max_len,
            ..DatasetConfig::default()
        },
    )
}

const M: i64 = IGNORE_INDEX;

#[test]
fn three_formats_with_masked_prompts() {
    let d = load(
        concat!(
            "{\"text\": \"the cat sat\"}\n",
            "\n",
            "{\"prompt\": \"tell me\", \"completion\": \"the cat\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello there\"},",
            " {\"role\": \"user\", \"content\": \"how are you\"}, {\"role\": \"assistant\", \"content\": \"fine\"}]}\n"
        ),
        64,
    )
    .unwrap();
    let e = d.examples();
    assert_eq!(e.len(), 3);
    // text: all tokens, EOS appended.
    assert_eq!(e[0].input_ids, vec![13, 14, 15, 1]);
    assert_eq!(e[0].labels, vec![13, 14, 15, 1]);
    // prompt/completion: the prompt is masked.
    assert_eq!(e[1].input_ids, vec![16, 17, 13, 14, 1]);
    assert_eq!(e[1].labels, vec![M, M, 13, 14, 1]);
    // chat: only the assistant replies (and their end-of-turn token) are trained.
    assert_eq!(
        e[2].input_ids,
        vec![0, 3, 6, 1, 0, 4, 7, 8, 1, 0, 3, 9, 10, 11, 1, 0, 4, 12, 1]
    );
    assert_eq!(
        e[2].labels,
        vec![M, M, M, M, M, M, 7, 8, 1, M, M, M, M, M, M, M, M, 12, 1]
    );
}

#[test]
fn malformed_lines_and_empty_files_are_clear_errors() {
    let err = load("{\"text\": \"the cat\"}\n{\"text\": 1}\n", 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2"), "{err}");
    let err = load("{\"text\": \"hi\"}\nnot json\n", 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2") && err.contains("JSON"), "{err}");
    let err = load("{\"foo\": \"hi\"}\n", 64).unwrap_err().to_string();
    assert!(err.contains("line 1"), "{err}");
    assert!(load("", 64).is_err());
    // A prompt that fills max_len leaves nothing to train on: skipped, then empty.
    assert!(load(
        "{\"prompt\": \"tell me the cat\", \"completion\": \"sat\"}\n",
        3
    )
    .is_err());
}

#[test]
fn truncation_padding_shuffling_and_split() {
    let lines: String = (0..10)
        .map(|i| {
            format!(
                "{{\"text\": \"{}\"}}\n",
                ["the cat sat", "hi", "hello there you"][i % 3]
            )
        })
        .collect();
    let d = load(&lines, 3).unwrap();
    assert!(d.examples().iter().all(|e| e.input_ids.len() <= 3));
    assert_eq!(d.examples()[0].input_ids, vec![13, 14, 15]);

    let b = d.collate(&[1, 0], 99, &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        b.input_ids.to_vec2::<u32>().unwrap(),
        vec![vec![6, 1, 99], vec![13, 14, 15]]
    );
    assert_eq!(
        b.attention_mask.to_vec2::<u32>().unwrap(),
        vec![vec![1, 1, 0], vec![1, 1, 1]]
    );
    assert_eq!(
        b.labels.to_vec2::<i64>().unwrap(),
        vec![vec![6, 1, M], vec![13, 14, 15]]
    );
    assert_eq!((b.num_tokens, b.num_targets), (5, 3));

    let epoch = |e: usize, seed: u64| -> Vec<usize> {
        (0..d.num_batches(4))
            .flat_map(|i| d.batch_indices(4, e, i, true, seed))
            .collect()
    };
    let mut sorted = epoch(0, 1);
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..10).collect::<Vec<_>>(),
        "an epoch covers every example once"
    );
    assert_eq!(epoch(0, 1), epoch(0, 1), "seeded");
    assert_ne!(epoch(0, 1), epoch(1, 1), "reshuffled per epoch");
    assert_ne!(epoch(0, 1), epoch(0, 2));

    let (train, eval) = d.split(0.2, 3).unwrap();
    assert_eq!((train.len(), eval.len()), (8, 2));
}
