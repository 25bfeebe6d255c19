//! The integration test suite, one binary (fast to link, and the single file
//! the GPU tier carries to the GPU machine).
//!
//! Fast tier: tiny models and committed reference fixtures. Real-model tier:
//! modules gated by `common::real_models()` (METAL_CANDLE_REAL_MODELS=1).
//! `METAL_CANDLE_TEST_DEVICE=cuda` runs everything on the GPU.

mod common;

mod decoder_parity;
mod distributed;
mod embeddings_parity;
mod embeddings_real;
mod generation;
mod kernels;
mod kill_resume;
mod layers;
mod loading;
mod lora_dataset;
mod lora_parity;
mod lora_training;
mod properties;
// Random weights at a real model's layout (shared with the benchmarks).
mod quantized;
#[allow(clippy::duplicate_mod)]
#[path = "../../examples/common/random_model.rs"]
mod random_model;
mod real_generation;
mod real_lora;
mod real_quantized;
mod real_qwen2;
mod reliability;
mod training_ops;
