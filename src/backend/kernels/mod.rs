//! Our own fused kernels, as Candle custom ops with a CPU path, a CUDA path
//! (PTX compiled by build.rs from the `.cu` files beside this module) and a
//! backward pass, so they serve training as well as inference.
//!
//! Each kernel exists because it measurably wins or because Candle's fused
//! equivalent has no backward (see BENCHMARKS.md for the measurements).
//!
//! Adding a kernel is one `.cu` file (including `common.cuh`, instantiated
//! with `FOR_EACH_FLOAT`; build.rs finds and compiles it and names its PTX
//! after the file), one small `.rs` module (a custom op whose CPU body is a
//! `cpu::CpuOp` and whose CUDA body is one call of `launch::launch`), and
//! one row in the kernel table of `tests/suite/kernels.rs`.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod launch;

mod adamw;
mod add_layer_norm;
mod bias_act;
mod cross_entropy;
mod embed_sum;
mod flash_attn;
mod gemm_epilogue;
mod kv_write;
mod rms_norm;
#[cfg(feature = "cuda")]
mod rope_cache;
#[cfg(feature = "cuda")]
mod sample;
mod split_heads;
mod swiglu;

pub(crate) use adamw::{adamw_update, AdamWStep};
pub use add_layer_norm::add_layer_norm;
pub use add_layer_norm::layer_norm;
pub use bias_act::{bias_act, Activation};
pub(crate) use cross_entropy::{cross_entropy_grad, cross_entropy_stats};
pub use embed_sum::embed_sum;
pub use flash_attn::{
    flash_attention, flash_attention_available, flash_attention_cached, flash_attention_merged,
    flash_attention_packed, flash_attention_supported, flash_packed_index,
};
pub(crate) use flash_attn::{
    flash_attention_taped, flash_forward_available, flash_forward_supported, FlashTape,
};
pub use gemm_epilogue::gemm_bias_act;
pub use kv_write::kv_write;
pub(crate) use rms_norm::rms_norm_backward;
pub use rms_norm::{add_rms_norm, rms_norm};
#[cfg(feature = "cuda")]
pub(crate) use rope_cache::qkv_rope_cache;
#[cfg(feature = "cuda")]
pub(crate) use sample::{sample_rows, RowPenalties, SampleParams, NO_FINITE, POS_INF};
pub use split_heads::{split_heads, Heads};
pub use swiglu::swiglu;
pub(crate) use swiglu::{swiglu_backward, swiglu_packed};
