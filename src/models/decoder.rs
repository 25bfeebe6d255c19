//! [`CausalLm`]: what generation, LoRA, the adapter registry and the trainer
//! know of a decoder. Nothing outside `models` names a concrete architecture.

use candle_core::{DType, Device, Tensor};

use super::config::DecoderConfig;
use super::kv_cache::{KvCache, StaticCache};
use crate::error::Result;
use crate::layers::Linear;

/// A decoder-only language model.
pub trait CausalLm: Send + Sync + std::fmt::Debug {
    /// The resolved hyper-parameters.
    fn config(&self) -> &DecoderConfig;

    /// The device the weights live on.
    fn device(&self) -> &Device;

    /// The weights' dtype.
    fn dtype(&self) -> DType;

    /// Final hidden states `[b, s, hidden]` (after the last norm).
    ///
    /// `input_ids` is `[b, s]` (u32). `attention_mask` (`[b, past + s]`,
    /// 1 = token, 0 = padding) hides padding, left or right; positions then
    /// count only real tokens, as transformers' `generate` does. With a
    /// `cache`, the new tokens attend to the cached ones and are appended.
    ///
    /// # Errors
    /// Wrong input shapes, context length exceeded, tensor errors.
    fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;

    /// The output projection from hidden states to vocabulary logits
    /// (the embedding table when they are tied).
    fn lm_head(&self) -> &Linear;

    /// Projects hidden states to vocabulary logits.
    ///
    /// # Errors
    /// Tensor errors.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head().forward(hidden)?)
    }

    /// The linear layers by checkpoint path
    /// (`model.layers.{i}.self_attn.q_proj`, …), in model order: where
    /// adapters attach.
    fn linear_layers(&self) -> Vec<(String, &Linear)>;

    /// Mutable [`Self::linear_layers`].
    fn linear_layers_mut(&mut self) -> Vec<(String, &mut Linear)>;

    /// Parameters of the base model (tied weights counted once).
    fn parameter_count(&self) -> usize;

    /// Activation recomputation ("gradient checkpointing"): when on, a
    /// training forward keeps only each decoder layer's input and the
    /// backward pass runs the layer again, trading about a third more
    /// compute for most of the activation memory. Off by default; a model
    /// that cannot recompute ignores it.
    ///
    /// Training goes through `metal_candle::training::backward`, not
    /// `loss.backward()`: decoder layers with written backward passes hand
    /// their adapters' gradients to it (the trainer does this; the
    /// optimizer refuses a gradient store that misses them).
    fn set_gradient_checkpointing(&mut self, on: bool) {
        let _ = on;
    }

    /// Differentiate decoder layers op by op through Candle's autograd
    /// instead of their written backward passes (the reference the tests
    /// and benchmarks compare them with). Off by default.
    #[doc(hidden)]
    fn set_composed_backward(&mut self, on: bool) {
        let _ = on;
    }

    /// Logits `[b, s, vocab]` for every position; see [`Self::forward_hidden`].
    ///
    /// # Errors
    /// See [`Self::forward_hidden`].
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask, cache)?;
        self.logits(&h)
    }

    /// Logits `[b, vocab]` (f32) of the last position only (what decoding
    /// needs).
    ///
    /// # Errors
    /// See [`Self::forward_hidden`].
    fn forward_last(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask, cache)?;
        let s = h.dim(1)?;
        // cuBLAS needs the row-strided slice made contiguous (the CPU gemm does not).
        Ok(self
            .logits(&h.narrow(1, s - 1, 1)?.squeeze(1)?.contiguous()?)?
            .to_dtype(DType::F32)?)
    }

    /// A [`StaticCache`] of `capacity` positions continuing `cache` (after
    /// a prefill without padding), for decode steps captured as CUDA graphs;
    /// `None` where this model, its settings or the device cannot decode
    /// that way (then decode with the [`KvCache`]).
    ///
    /// # Errors
    /// Tensor errors, or a capacity beyond the context.
    fn static_cache(&self, cache: &KvCache, capacity: usize) -> Result<Option<StaticCache>> {
        let _ = (cache, capacity);
        Ok(None)
    }

    /// Logits `[b, vocab]` (f32) of one decode step over `cache`, whose
    /// step buffer holds the tokens (see [`StaticCache`]); appends their
    /// keys and values. Launches the same kernels at every length.
    ///
    /// # Errors
    /// A model without static decoding, tensor errors.
    fn forward_static(&self, cache: &StaticCache) -> Result<Tensor> {
        let _ = cache;
        Err(crate::error::Error::InvalidInput(
            "this model has no static-cache decoding".into(),
        ))
    }

    /// A fresh KV cache sized for this model's context window.
    fn new_cache(&self) -> KvCache {
        let c = self.config();
        KvCache::new(c.num_hidden_layers, c.context_length())
    }

    /// The most positions (prompt + generated) the model handles.
    fn context_length(&self) -> usize {
        self.config().context_length()
    }
}

/// A boxed model is a model, so `Box<dyn CausalLm>` (what loading returns)
/// goes wherever a model does.
impl<M: CausalLm + ?Sized> CausalLm for Box<M> {
    fn config(&self) -> &DecoderConfig {
        (**self).config()
    }
    fn device(&self) -> &Device {
        (**self).device()
    }
    fn dtype(&self) -> DType {
        (**self).dtype()
    }
    fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        (**self).forward_hidden(input_ids, attention_mask, cache)
    }
    fn lm_head(&self) -> &Linear {
        (**self).lm_head()
    }
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        (**self).logits(hidden)
    }
    fn linear_layers(&self) -> Vec<(String, &Linear)> {
        (**self).linear_layers()
    }
    fn linear_layers_mut(&mut self) -> Vec<(String, &mut Linear)> {
        (**self).linear_layers_mut()
    }
    fn parameter_count(&self) -> usize {
        (**self).parameter_count()
    }
    fn set_gradient_checkpointing(&mut self, on: bool) {
        (**self).set_gradient_checkpointing(on);
    }
    fn set_composed_backward(&mut self, on: bool) {
        (**self).set_composed_backward(on);
    }
    fn static_cache(&self, cache: &KvCache, capacity: usize) -> Result<Option<StaticCache>> {
        (**self).static_cache(cache, capacity)
    }
    fn forward_static(&self, cache: &StaticCache) -> Result<Tensor> {
        (**self).forward_static(cache)
    }
}
