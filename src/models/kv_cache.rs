//! The per-layer key/value cache used by incremental decoding.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// Growth step of the cache, in positions.
const CHUNK: usize = 256;

/// Keys and values of every layer for the positions processed so far.
///
/// Storage grows in chunks of 256 positions (copying only when a chunk
/// fills), up to `max_len`; [`KvCache::reset`] empties it for the next prompt.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    max_len: usize,
    len: usize,
}

#[derive(Debug, Clone)]
struct LayerCache {
    /// `[b, kv_heads, capacity, head_dim]`, valid up to `len`.
    k: Tensor,
    v: Tensor,
}

impl KvCache {
    /// An empty cache for `num_layers` layers holding at most `max_len` positions.
    #[must_use]
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            max_len,
            len: 0,
        }
    }

    /// Positions cached so far.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache holds.
    #[must_use]
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets everything (keeps the allocation for the next prompt).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Fails unless `new` more positions fit.
    ///
    /// # Errors
    /// [`Error::ContextLengthExceeded`].
    pub fn check_room(&self, new: usize) -> Result<()> {
        if self.len + new > self.max_len {
            return Err(Error::ContextLengthExceeded {
                requested: self.len + new,
                limit: self.max_len,
            });
        }
        Ok(())
    }

    /// Appends `k`, `v` (`[b, kv_heads, s, head_dim]`) for `layer` and returns
    /// the keys and values of all positions so far. Call [`KvCache::advance`]
    /// once every layer has appended.
    ///
    /// # Errors
    /// Context length exceeded, or a batch/shape change without a reset.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        self.check_room(new)?;
        let needed = self.len + new;
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::InvalidInput(format!("no cache for layer {layer}")))?;
        let grow = match slot {
            Some(c) => {
                let (b, h, cap, d) = c.k.dims4()?;
                let same =
                    (b, h, d) == (k.dim(0)?, k.dim(1)?, k.dim(3)?) && c.k.dtype() == k.dtype();
                if !same && self.len > 0 {
                    return Err(Error::InvalidInput(
                        "KV cache shape changed between calls; reset it for a new batch".into(),
                    ));
                }
                !same || cap < needed
            }
            None => true,
        };
        if grow {
            let cap = needed.div_ceil(CHUNK) * CHUNK;
            let cap = cap.min(self.max_len).max(needed);
            let (b, h, _, d) = k.dims4()?;
            let nk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
            if let (Some(old), true) = (slot.as_ref(), self.len > 0) {
                nk.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(LayerCache { k: nk, v: nv });
        }
        let c = slot
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("KV cache slot missing".into()))?;
        c.k.slice_set(&k.contiguous()?, 2, self.len)?;
        c.v.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((
            c.k.narrow(D::Minus2, 0, needed)?,
            c.v.narrow(D::Minus2, 0, needed)?,
        ))
    }

    /// Marks `new` positions (appended to every layer) as cached.
    pub fn advance(&mut self, new: usize) {
        self.len += new;
    }
}

impl KvCache {
    /// Keys and values of `layer` for the cached positions
    /// (`[b, kv_heads, len, head_dim]` views), if any.
    pub(crate) fn layer(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let c = self.layers.get(layer)?.as_ref()?;
        Some((
            c.k.narrow(D::Minus2, 0, self.len).ok()?,
            c.v.narrow(D::Minus2, 0, self.len).ok()?,
        ))
    }

    /// The number of layers.
    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// A KV cache preallocated to a fixed number of positions, whose decode
/// step reads everything that changes between steps from one small device
/// buffer: the batch's token ids, the position and the number of keys. A
/// step over it launches the same kernels with the same arguments at every
/// length, so it can be captured once as a CUDA graph and replayed
/// (`backend::graph`; `inference::Generator` does this on CUDA).
///
/// Made by [`CausalLm::static_cache`](super::CausalLm::static_cache) from a
/// [`KvCache`] after the prompt's prefill; decoded by
/// [`CausalLm::forward_static`](super::CausalLm::forward_static).
#[derive(Debug)]
pub struct StaticCache {
    /// `[b, kv_heads, capacity, head_dim]` per layer.
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    /// u32 `[b + 2]`: the step's token ids, its position, the keys after it.
    pub(crate) step: Tensor,
    /// RoPE tables for positions `0..capacity`, `[capacity, head_dim / 2]`.
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    len: usize,
    batch: usize,
}

impl StaticCache {
    /// Copies `cache` (after a prefill of every row) into buffers of
    /// `capacity` positions; `cos`/`sin` are the RoPE tables for them.
    pub(crate) fn from_cache(
        cache: &KvCache,
        capacity: usize,
        cos: Tensor,
        sin: Tensor,
    ) -> Result<Self> {
        let len = cache.len();
        if len == 0 || capacity <= len {
            return Err(Error::InvalidInput(format!(
                "a static cache of {capacity} positions cannot continue {len} cached ones"
            )));
        }
        let (mut k, mut v) = (Vec::new(), Vec::new());
        let mut batch = 0;
        for layer in 0..cache.num_layers() {
            let (ck, cv) = cache
                .layer(layer)
                .ok_or_else(|| Error::InvalidInput(format!("no cache for layer {layer}")))?;
            let (b, h, _, d) = ck.dims4()?;
            batch = b;
            let nk = Tensor::zeros((b, h, capacity, d), ck.dtype(), ck.device())?;
            let nv = Tensor::zeros((b, h, capacity, d), cv.dtype(), cv.device())?;
            nk.slice_set(&ck.contiguous()?, 2, 0)?;
            nv.slice_set(&cv.contiguous()?, 2, 0)?;
            k.push(nk);
            v.push(nv);
        }
        let step = Tensor::zeros(batch + 2, candle_core::DType::U32, cos.device())?;
        Ok(Self {
            k,
            v,
            step,
            cos,
            sin,
            len,
            batch,
        })
    }

    /// Positions cached so far.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached (never, once made).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions it holds.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Rows of the batch.
    #[must_use]
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Writes the next step's inputs (one token id per row) to the device.
    ///
    /// # Errors
    /// A wrong number of ids, or no room for another position.
    pub(crate) fn set_step(&mut self, ids: &[u32]) -> Result<()> {
        if ids.len() != self.batch {
            return Err(Error::InvalidInput(format!(
                "{} token ids for a batch of {}",
                ids.len(),
                self.batch
            )));
        }
        if self.len + 1 > self.capacity() {
            return Err(Error::ContextLengthExceeded {
                requested: self.len + 1,
                limit: self.capacity(),
            });
        }
        let mut step = ids.to_vec();
        // Lengths fit u32: the capacity is a tensor dimension of a model's
        // context, checked against the model's limit when made.
        step.push(self.len as u32);
        step.push(self.len as u32 + 1);
        crate::backend::graph::upload_u32(&self.step, &step)?;
        Ok(())
    }

    /// Marks the step's position as cached.
    pub(crate) fn advance(&mut self) {
        self.len += 1;
    }
}
