//! Fuzz target: see metal_candle::fuzzing::safetensors.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| metal_candle::fuzzing::safetensors(data));
