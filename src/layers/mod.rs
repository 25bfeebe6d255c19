//! Transformer parts shared by every model: the linear layer (dense or
//! quantized, with the adapter hook), the token embedding (dense or
//! quantized), norms, rotary embeddings and the one attention entry point.
//!
//! Candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward
//! pass: gradients silently stop at them. Each part here decides where it
//! runs: when an input tracks gradients (it depends on a trainable `Var`) it
//! takes a differentiable path, otherwise the fused one. No caller manages a
//! mode.

mod attention;
mod embedding;
mod linear;
mod norm;
mod rotary;

pub use attention::{attention, attention_packed, composed_attention, Mask, MaskKind, PackedSeqs};
pub(crate) use attention::{
    attention_mask, attention_taped, dense_mask_needed, mask_rows, padding_bias, AttentionTape,
};
pub use embedding::Embedding;
pub(crate) use linear::LinearTape;
pub use linear::{Linear, LinearAdapter, LowRank};
pub use norm::{LayerNorm, RmsNorm};
pub use rotary::{RopeScaling, RotaryEmbedding};
