//! The fused q/k/v projection's output split into heads: `[b, s, (hq +
//! 2·hkv)·d]` plus its bias becomes q `[b, hq, s, d]`, k and v `[b, hkv, s,
//! d]`, contiguous, in one pass. Composed in Candle that is three broadcast
//! bias adds and three transposing copies (a third of an encoder forward's
//! GPU time on an H200 at b512 × 128, with the other bias adds). Inference
//! only: [`split_heads`] takes Candle's differentiable ops when an input
//! tracks gradients.

use candle_core::{CpuStorage, Layout, Shape, Tensor};

use super::cpu::{cpu_map, for_rows, CpuOp, Float};

/// Head counts and width of a [`split_heads`] call.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

/// `(q, k, v)` from `qkv` (`[b, s, (q + 2·kv)·dim]`) and its `bias`
/// (`[(q + 2·kv)·dim]`), each `[b, heads, s, dim]` and contiguous.
///
/// # Errors
/// Shape or dtype mismatch (f32, bf16 and f16 are supported).
pub fn split_heads(
    qkv: &Tensor,
    bias: &Tensor,
    heads: Heads,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, s, width) = qkv.dims3()?;
    let Heads { q, kv, dim } = heads;
    if width != (q + 2 * kv) * dim || bias.dims() != [width] {
        candle_core::bail!(
            "split_heads: qkv {:?} and bias {:?} do not hold {q} + 2 x {kv} heads of {dim}",
            qkv.dims(),
            bias.dims()
        );
    }
    if bias.dtype() != qkv.dtype() {
        candle_core::bail!("split_heads: qkv and bias must share a dtype");
    }
    if crate::backend::autograd::needs_grad(&[qkv, bias]) {
        let y = qkv.broadcast_add(bias)?;
        let part = |start: usize, n: usize| {
            y.narrow(2, start * dim, n * dim)?
                .reshape((b, s, n, dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        return Ok((part(0, q)?, part(q, kv)?, part(q + kv, kv)?));
    }
    let op = SplitHeads { b, s, heads };
    let out = qkv
        .contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &op)?;
    let (nq, nkv) = (b * q * s * dim, b * kv * s * dim);
    Ok((
        out.narrow(0, 0, nq)?.reshape((b, q, s, dim))?,
        out.narrow(0, nq, nkv)?.reshape((b, kv, s, dim))?,
        out.narrow(0, nq + nkv, nkv)?.reshape((b, kv, s, dim))?,
    ))
}

struct SplitHeads {
    b: usize,
    s: usize,
    heads: Heads,
}

impl CpuOp for SplitHeads {
    const NAME: &'static str = "split_heads";

    fn run<T: Float>(&self, inputs: &[&[T]], _: &Layout) -> candle_core::Result<Vec<T>> {
        let &[qkv, bias] = inputs else {
            candle_core::bail!("split_heads: expected qkv and bias");
        };
        let Heads { q, kv, dim } = self.heads;
        let (b, s) = (self.b, self.s);
        let width = (q + 2 * kv) * dim;
        let mut out = vec![T::from_f32(0.0); qkv.len()];
        let (nq, nkv) = (b * q * s, b * kv * s);
        // Output rows of `dim`: q [b, q, s], then k and v [b, kv, s]; each
        // reads `dim` columns of one input row.
        for_rows(&mut out, dim, |row, o| {
            let (part_row, heads, col0) = if row < nq {
                (row, q, 0)
            } else if row < nq + nkv {
                (row - nq, kv, q)
            } else {
                (row - nq - nkv, kv, q + kv)
            };
            let (bi, h, si) = (part_row / (heads * s), part_row / s % heads, part_row % s);
            let c = (col0 + h) * dim;
            let src = &qkv[(bi * s + si) * width + c..][..dim];
            for ((oi, v), bv) in o.iter_mut().zip(src).zip(&bias[c..c + dim]) {
                *oi = T::from_f32(v.to_f32() + bv.to_f32());
            }
        });
        Ok(out)
    }
}

impl candle_core::CustomOp2 for SplitHeads {
    fn name(&self) -> &'static str {
        "metal-candle-split-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = cpu_map(self, &[(s1, l1), (s2, l2)])?;
        Ok((out, Shape::from(l1.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{launch, ptx, Arg};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let total = l1.shape().elem_count();
        let int = |v: usize| {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("split_heads: {v} too large")))
        };
        let Heads { q, kv, dim } = self.heads;
        let rows = u32::try_from(self.b * self.s)
            .ok()
            .filter(|&r| r <= i32::MAX as u32)
            .ok_or_else(|| candle_core::Error::Msg("split_heads: too many rows".into()))?;
        let args = [
            Arg::I32(int(self.b)?),
            Arg::I32(int(self.s)?),
            Arg::I32(int(q)?),
            Arg::I32(int(kv)?),
            Arg::I32(int(dim)?),
        ];
        let inputs = [(s1, l1), (s2, l2)];
        // One block per row of the input, 128 threads over its columns.
        let cfg = LaunchConfig {
            grid_dim: (rows.max(1), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let out = launch(&ptx::SPLIT_HEADS, "split_heads", &inputs, total, cfg, &args)?;
        Ok((out, Shape::from(total)))
    }
}
