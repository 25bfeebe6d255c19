//! Fuzz target: see metal_candle::fuzzing::gguf (and
//! `tolerate_caught_tokenizers_panics` for why panics inside the tokenizers
//! crate do not abort).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    metal_candle::fuzzing::tolerate_caught_tokenizers_panics();
    metal_candle::fuzzing::gguf(data)
});
