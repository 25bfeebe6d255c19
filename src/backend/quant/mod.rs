//! Quantized weights in the layout the device's kernels run fastest,
//! without changing a value.
//!
//! Candle 0.11's CPU kernels for Q5_0 are its scalar reference loop, while
//! Q8_0 has AVX2 and AVX-512 VNNI kernels. A Q5_0 block is a Q8_0 block in
//! disguise: both hold 32 values as an f16 scale `d` times small integers
//! (Q5_0's in -16..=15, packed in 5 bits). Rewriting the integers as bytes
//! keeps every dequantized value exactly and moves the matmul onto the
//! vector kernels, for 8.5 instead of 5.5 bits per weight. The products of
//! a few rows (decoding) still round the activations to 8 bits per 32
//! values, as Candle's Q5_0 loop does: on AVX2 in Candle's Q8_0 loop, on
//! AVX-512 VNNI in ours ([`cpu_vnni`]; Candle's own VNNI tiles would round
//! per 256 values). Real GGUF
//! files are full of Q5_0: Qwen2.5-Coder-0.5B's "Q4_K_M" stores 133 of its
//! 170 quantized tensors so (rows of 896 values are not whole 256-value
//! k-quant blocks). Q4_1 / Q5_1 (an offset per block) have no exact Q8_0
//! form and stay as stored; so does everything on CUDA, where memory is
//! the point and Candle's kernels take Q5_0 directly.

pub(crate) mod cpu_vnni;

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

use crate::error::Result;

/// Bytes of one Q5_0 block (f16 scale, 32 high bits, 16 bytes of low nibbles).
const Q5_0_BLOCK: usize = 22;
/// Values per block (Q5_0 and Q8_0).
const BLOCK_VALUES: usize = 32;

/// `w` in the layout its device runs fastest (a Q5_0 weight on the CPU as
/// the equal Q8_0 weight); anything else unchanged.
///
/// # Errors
/// Reading the weight's bytes or building the new storage.
pub(crate) fn for_device_kernels(w: Arc<QTensor>) -> Result<Arc<QTensor>> {
    if !matches!(w.device(), Device::Cpu) || w.dtype() != GgmlDType::Q5_0 {
        return Ok(w);
    }
    let data = w.data()?;
    if data.len() % Q5_0_BLOCK != 0 {
        return Ok(w);
    }
    let blocks = data.len() / Q5_0_BLOCK;
    let mut out = Vec::with_capacity(blocks * (2 + BLOCK_VALUES));
    for b in data.chunks_exact(Q5_0_BLOCK) {
        // The f16 scale, as is.
        out.extend_from_slice(&b[..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..];
        let mut q = [0u8; BLOCK_VALUES];
        for j in 0..BLOCK_VALUES / 2 {
            // Value j: low nibble of byte j plus bit j of qh; value j + 16:
            // the high nibble plus bit j + 16 (ggml's dequantize_row_q5_0).
            let lo = u32::from(qs[j] & 0x0F) | ((qh >> j) & 1) << 4;
            let hi = u32::from(qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
            q[j] = ((lo as i32 - 16) as i8).to_le_bytes()[0];
            q[j + BLOCK_VALUES / 2] = ((hi as i32 - 16) as i8).to_le_bytes()[0];
        }
        out.extend_from_slice(&q);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, GgmlDType::Q8_0)?;
    Ok(Arc::new(QTensor::new(storage, w.shape().clone())?))
}

/// `x Wᵀ` for a Q8_0 or Q4_1 weight `w` on the CPU through [`cpu_vnni`]
/// (`x`: f32 `[.., k]`, contiguous), when this CPU runs those kernels;
/// `None` otherwise (and with `METAL_CANDLE_VNNI_KERNELS=0`, an A/B
/// switch), for Candle's kernels. The body of a quantized matmul's
/// `cpu_fwd`.
///
/// # Errors
/// Reading the weight's bytes.
pub(crate) fn vnni_matmul(
    x: &candle_core::CpuStorage,
    l: &candle_core::Layout,
    w: &QTensor,
) -> candle_core::Result<Option<(candle_core::CpuStorage, candle_core::Shape)>> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("METAL_CANDLE_VNNI_KERNELS").as_deref() != Ok("0"));
    let format = match w.dtype() {
        GgmlDType::Q8_0 => cpu_vnni::Format::Q8_0,
        GgmlDType::Q4_1 => cpu_vnni::Format::Q4_1,
        _ => return Ok(None),
    };
    if !on || !cpu_vnni::available() {
        return Ok(None);
    }
    let (candle_core::CpuStorage::F32(x), Some((start, end))) = (x, l.contiguous_offsets()) else {
        return Ok(None);
    };
    let (Ok((n, k)), Some((_, lead)), Some(x)) =
        (w.shape().dims2(), l.dims().split_last(), x.get(start..end))
    else {
        return Ok(None);
    };
    let m: usize = lead.iter().product();
    let data = w.data()?;
    if !k.is_multiple_of(cpu_vnni::BLOCK)
        || x.len() != m * k
        || data.len() != n * (k / cpu_vnni::BLOCK) * format.block_bytes()
    {
        return Ok(None);
    }
    #[cfg(target_arch = "x86_64")]
    {
        let y = cpu_vnni::matmul(x, m, k, (&data, format), n);
        let mut out = lead.to_vec();
        out.push(n);
        Ok(Some((candle_core::CpuStorage::F32(y), out.into())))
    }
    #[cfg(not(target_arch = "x86_64"))]
    Ok(None)
}
