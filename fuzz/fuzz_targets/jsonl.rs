//! Fuzz target: see metal_candle::fuzzing::jsonl. The tokenizer (with its
//! chat template) is the tiny Qwen2 fixture's, built once.
#![no_main]

use std::sync::OnceLock;

use metal_candle::inference::TextTokenizer;

fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        metal_candle::fuzzing::jsonl_tokenizer(
            include_str!("../../tests/fixtures/qwen2-tiny/tokenizer.json"),
            Some(include_str!(
                "../../tests/fixtures/qwen2-tiny/tokenizer_config.json"
            )),
        )
        .expect("the fixture's tokenizer loads")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| metal_candle::fuzzing::jsonl(tokenizer(), data));
