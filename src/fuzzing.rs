//! Entry points of the fuzz targets in `fuzz/` (`cargo +nightly fuzz`;
//! CONTRIBUTING.md says how). Not part of the API: hidden from the docs,
//! no stability promise. Each takes untrusted bytes, runs one of the
//! library's parsers on them and ignores the (expected) errors: a panic,
//! an abort or a runaway allocation is the bug a target looks for.

use std::io::Cursor;
use std::path::Path;

use candle_core::{DType, Device};

use crate::inference::{Message, TextTokenizer};
use crate::io::gguf::GgufFile;
use crate::models::bert::{BertConfig, BertModel};
use crate::models::mpnet::{MpnetConfig, MpnetModel};
use crate::models::{build_decoder, load_gguf_from, parse_decoder_config};
use crate::training::{Dataset, DatasetConfig};

/// For the targets that reach tokenizer.json (gguf, tokenizer): the
/// library parses it under `catch_unwind` because the tokenizers crate
/// panics on some malformed files (src/io/tokenizer_json.rs), but
/// libFuzzer's panic hook aborts even on a caught panic. This hook lets
/// panics raised inside that crate through to the library's
/// `catch_unwind` (one that escapes it still aborts: libfuzzer-sys catches
/// it around the target) and keeps aborting on any panic elsewhere.
/// Installed once.
pub fn tolerate_caught_tokenizers_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tokenizers = info
                .location()
                .is_some_and(|l| l.file().contains("/tokenizers-"));
            if !in_tokenizers {
                abort(info);
            }
        }));
    });
}

/// The safetensors header reader (names, dtypes, shapes and offsets
/// checked against the file size), then Candle's loader on what passed.
pub fn safetensors(data: &[u8]) {
    if crate::io::parse_safetensors_bytes(data).is_ok() {
        let _ = candle_core::safetensors::load_buffer(data, &Device::Cpu);
    }
}

/// A GGUF file: header and metadata, the decoder config its metadata
/// describes, every tensor (dequantized, q/k un-permuted), the model built
/// from them, and the tokenizer and chat template in its metadata.
pub fn gguf(data: &[u8]) {
    let path = Path::new("fuzz.gguf");
    let Ok(file) = GgufFile::from_reader(Cursor::new(data), path) else {
        return;
    };
    let _ = TextTokenizer::from_gguf_metadata(file.metadata());
    if let Ok((config, weights, _)) = load_gguf_from(file, path, DType::F32, &Device::Cpu, true) {
        let _ = build_decoder(&config, &weights);
    }
}

/// `config.json` of every architecture (decoders, BERT, MPNet) and the
/// sentence-transformers files, from the same text. A config that parses
/// is built against an empty checkpoint: that must fail on the first
/// missing tensor, not allocate what the config asks for.
pub fn configs(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let empty =
        || crate::io::Weights::from_tensors(Default::default(), DType::F32, &Device::Cpu, "fuzz");
    if let Ok(cfg) = parse_decoder_config(text, "config.json") {
        let _ = build_decoder(&cfg, &empty());
    }
    if let Ok(cfg) =
        crate::io::parse_config::<BertConfig>(text, "config.json", BertConfig::validate)
    {
        let _ = BertModel::new(&cfg, &empty());
    }
    if let Ok(cfg) =
        crate::io::parse_config::<MpnetConfig>(text, "config.json", MpnetConfig::validate)
    {
        let _ = MpnetModel::new(&cfg, &empty());
    }
    crate::embeddings::fuzz_sentence_transformers_files(text);
}

/// Splits `data` at the first NUL byte: `(before, after)`.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// `tokenizer.json` NUL `tokenizer_config.json` (chat template, special
/// tokens): loaded, then a short conversation rendered and encoded.
pub fn tokenizer(data: &[u8]) {
    let (tok, cfg) = split(data);
    let (Ok(tok), Ok(cfg)) = (std::str::from_utf8(tok), std::str::from_utf8(cfg)) else {
        return;
    };
    let cfg = (!cfg.is_empty()).then_some(cfg);
    let Ok(t) = TextTokenizer::from_json_texts(tok, cfg) else {
        return;
    };
    let messages = [
        Message::system("s"),
        Message::user("hi"),
        Message::assistant("ok"),
    ];
    if let Ok(text) = t.apply_chat_template(&messages) {
        if let Ok(ids) = t.encode(&text) {
            let _ = t.decode(&ids, true);
        }
    }
}

/// A tokenizer for [`jsonl`] (from `tokenizer.json` and
/// `tokenizer_config.json` texts, e.g. a fixture's).
///
/// # Errors
/// See [`TextTokenizer::from_repo`].
pub fn jsonl_tokenizer(tokenizer: &str, config: Option<&str>) -> crate::Result<TextTokenizer> {
    TextTokenizer::from_json_texts(tokenizer, config)
}

/// A JSONL training file (text, prompt/completion and chat lines),
/// tokenised with `tokenizer`, then batched.
pub fn jsonl(tokenizer: &TextTokenizer, data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = DatasetConfig {
        max_len: 64,
        add_eos: true,
    };
    if let Ok(ds) = Dataset::from_jsonl_str(text, tokenizer, &config) {
        let idx = ds.batch_indices(4, 0, 0, true, 1);
        let _ = ds.collate(&idx, 0, &Device::Cpu);
        let _ = ds.split(0.5, 1);
    }
}

/// A peft adapter: `adapter_config.json` NUL `adapter_model.safetensors`.
pub fn peft(data: &[u8]) {
    let (cfg, weights) = split(data);
    let Ok(cfg) = std::str::from_utf8(cfg) else {
        return;
    };
    let dir = Path::new("fuzz-adapter");
    let Ok(config) = crate::training::parse_peft_config(cfg, dir) else {
        return;
    };
    let Ok(tensors) = candle_core::safetensors::load_buffer(weights, &Device::Cpu) else {
        return;
    };
    let _ = crate::training::adapter_from_tensors(config, tensors, &dir.join("weights"));
}
