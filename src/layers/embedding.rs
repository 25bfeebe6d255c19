//! The token embedding table: dense, or quantized as a GGUF file stores it.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::linear::quantize_on_device;
use crate::error::Result;

#[derive(Debug, Clone)]
enum Table {
    Dense(Tensor),
    /// Rows are dequantized as they are looked up (Candle's `get_rows`
    /// kernels, as llama.cpp does): a 4/5-bit table takes a quarter or a
    /// third of its bf16 size in memory.
    Quantized(Arc<QTensor>),
}

/// A `[vocab, hidden]` lookup table; rows come out in the model's dtype.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
    dtype: DType,
    device: Device,
}

impl Embedding {
    /// A dense table (`[vocab, hidden]`); rows come out in its dtype.
    #[must_use]
    pub fn new(table: Tensor) -> Self {
        Self {
            dtype: table.dtype(),
            device: table.device().clone(),
            table: Table::Dense(table),
        }
    }

    /// A quantized table whose rows come out in `dtype`. A table in a
    /// dense GGUF type (f32/f16/bf16), or whose rows are not whole blocks,
    /// is held dense in `dtype`.
    ///
    /// # Errors
    /// A table that is not 2-D.
    pub fn quantized(table: Arc<QTensor>, dtype: DType) -> Result<Self> {
        let (_, hidden) = table.shape().dims2()?;
        let device = table.device();
        let block = table.dtype().block_size();
        if block == 1 || !hidden.is_multiple_of(block) {
            return Ok(Self::new(table.dequantize(&device)?.to_dtype(dtype)?));
        }
        Ok(Self {
            table: Table::Quantized(table),
            dtype,
            device,
        })
    }

    /// A dense table (`[vocab, hidden]`) quantized to `format` (in-situ
    /// quantization, as llama.cpp and mlx-lm quantize embeddings too); held
    /// dense when its rows are not whole `format` blocks.
    ///
    /// # Errors
    /// A table that is not 2-D.
    pub fn quantize(table: &Tensor, format: GgmlDType) -> Result<Self> {
        let (_, hidden) = table.dims2()?;
        if !hidden.is_multiple_of(format.block_size()) {
            return Ok(Self::new(table.clone()));
        }
        Self::quantized(quantize_on_device(table, format)?, table.dtype())
    }

    /// The quantized table, if it is held quantized (a tied output
    /// projection multiplies by the same blocks).
    #[must_use]
    pub(crate) fn quantized_table(&self) -> Option<&Arc<QTensor>> {
        match &self.table {
            Table::Quantized(q) => Some(q),
            Table::Dense(_) => None,
        }
    }

    /// `[vocab, hidden]`.
    #[must_use]
    pub fn dims(&self) -> (usize, usize) {
        let dims = match &self.table {
            Table::Dense(t) => t.dims(),
            Table::Quantized(q) => q.shape().dims(),
        };
        (dims[0], dims[1])
    }

    /// Elements of the table (for parameter counts).
    #[must_use]
    pub fn elem_count(&self) -> usize {
        let (v, h) = self.dims();
        v * h
    }

    /// The dtype rows come out in.
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the table lives on.
    #[must_use]
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dense table, if it is held dense (a tied output projection
    /// shares it).
    #[must_use]
    pub fn dense(&self) -> Option<&Tensor> {
        match &self.table {
            Table::Dense(t) => Some(t),
            Table::Quantized(_) => None,
        }
    }

    /// Rows `ids` (any shape, u32, ids already checked against the vocab):
    /// `[..ids, hidden]`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, hidden) = self.dims();
        let mut shape = ids.dims().to_vec();
        shape.push(hidden);
        let rows = match &self.table {
            Table::Dense(t) => t.index_select(&ids.flatten_all()?, 0)?,
            Table::Quantized(q) => q.embedding(&ids.flatten_all()?)?.to_dtype(self.dtype)?,
        };
        Ok(rows.reshape(shape)?)
    }
}
