//! Our own fused kernels, as Candle custom ops with a CPU path, a CUDA path
//! (PTX compiled by build.rs from the `.cu` files beside this module) and a
//! backward pass, so they serve training as well as inference.
//!
//! Each kernel exists because it measurably wins or because Candle's fused
//! equivalent has no backward (see BENCHMARKS.md for the measurements).

pub mod rms_norm;

pub use rms_norm::rms_norm;
