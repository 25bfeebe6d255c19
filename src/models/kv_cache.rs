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
