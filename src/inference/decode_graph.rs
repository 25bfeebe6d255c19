//! Decoding with CUDA graphs: after the prompt's prefill, each step runs
//! over a [`StaticCache`]; the first step runs eagerly (which also fills
//! Candle's cache of small parameter uploads), the second is captured as a
//! CUDA graph, and every later step replays it: one launch on the host per
//! token instead of Candle's several hundred (`backend::graph`).
//!
//! The [`Generator`](super::Generator) uses it on CUDA for single sequences
//! and for batches of prompts of one length; a loop of your own can too.
//! `METAL_CANDLE_CUDA_GRAPHS=0` turns the capture off (steps then run
//! eagerly over the static cache), for comparison or as an escape hatch.

use candle_core::Tensor;

use crate::error::Result;
use crate::models::{CausalLm, KvCache, StaticCache};

/// A decode loop's state when stepping through captured CUDA graphs.
#[derive(Debug)]
pub struct DecodeGraph {
    cache: StaticCache,
    #[cfg(feature = "cuda")]
    captured: Option<crate::backend::graph::CapturedStep>,
    /// Capture failed or is turned off: every step runs eagerly.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    eager: bool,
    steps: usize,
}

impl DecodeGraph {
    /// Continues `cache` (after a prefill without padding) in a static
    /// cache of `capacity` positions; `None` off CUDA or where the model
    /// cannot decode over a static cache ([`CausalLm::static_cache`]).
    ///
    /// # Errors
    /// Tensor errors, a capacity beyond the model's context.
    pub fn new<M: CausalLm + ?Sized>(
        model: &M,
        cache: &KvCache,
        capacity: usize,
    ) -> Result<Option<Self>> {
        if !model.device().is_cuda() {
            return Ok(None);
        }
        let Some(cache) = model.static_cache(cache, capacity)? else {
            return Ok(None);
        };
        let eager = std::env::var("METAL_CANDLE_CUDA_GRAPHS").is_ok_and(|v| v == "0");
        Ok(Some(Self {
            cache,
            #[cfg(feature = "cuda")]
            captured: None,
            eager,
            steps: 0,
        }))
    }

    /// Positions cached so far.
    #[must_use]
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// True when nothing is cached (never, once made).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Whether steps replay a captured graph.
    #[must_use]
    pub fn is_captured(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.captured.is_some()
        }
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Kernels one replayed step launches on the device (`None` until the
    /// step is captured): the launches per decoded token under the graph.
    ///
    /// # Errors
    /// What CUDA reports.
    pub fn captured_kernels(&self) -> Result<Option<usize>> {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.captured {
            return Ok(Some(c.kernel_count()?));
        }
        Ok(None)
    }

    /// Logits `[b, vocab]` (f32) after feeding `ids` (one token per row).
    /// A replayed step writes its logits to the same device buffer every
    /// time: read them (sample) before the next step.
    ///
    /// # Errors
    /// A wrong number of ids, the capacity reached, tensor or CUDA errors.
    pub fn step<M: CausalLm + ?Sized>(&mut self, model: &M, ids: &[u32]) -> Result<Tensor> {
        self.cache.set_step(ids)?;
        let logits = self.run(model)?;
        self.cache.advance();
        self.steps += 1;
        Ok(logits)
    }

    #[cfg(feature = "cuda")]
    fn run<M: CausalLm + ?Sized>(&mut self, model: &M) -> Result<Tensor> {
        use crate::backend::graph::CapturedStep;
        if let Some(c) = &self.captured {
            return Ok(c.replay()?.clone());
        }
        let candle_core::Device::Cuda(dev) = model.device() else {
            return model.forward_static(&self.cache);
        };
        if self.eager {
            return model.forward_static(&self.cache);
        }
        if self.steps == 0 {
            return CapturedStep::warm(dev, || model.forward_static(&self.cache));
        }
        match CapturedStep::capture(dev, || model.forward_static(&self.cache)) {
            Ok(c) => {
                let out = c.replay()?.clone();
                self.captured = Some(c);
                Ok(out)
            }
            Err(e) => {
                // Something in the step cannot be captured: decode eagerly
                // (still over the static cache) rather than fail.
                tracing::warn!("CUDA graph capture failed, decoding without it: {e}");
                self.eager = true;
                model.forward_static(&self.cache)
            }
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn run<M: CausalLm + ?Sized>(&mut self, model: &M) -> Result<Tensor> {
        model.forward_static(&self.cache)
    }
}
