//! Fuzz target: see metal_candle::fuzzing::gguf.
//!
//! The library parses tokenizer.json under `catch_unwind` because the
//! tokenizers crate panics on some malformed files (see
//! src/io/tokenizer_json.rs). libFuzzer's panic hook aborts even on a
//! caught panic, so panics raised inside that crate are let through to the
//! library's `catch_unwind`; one that escapes it still aborts (libfuzzer-sys
//! catches it around the target), as does any panic elsewhere.
#![no_main]

fn tolerate_caught_tokenizers_panics() {
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

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tolerate_caught_tokenizers_panics();
    metal_candle::fuzzing::gguf(data)
});
