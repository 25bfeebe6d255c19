//! Fused SwiGLU, `silu(gate) * up`, with a fused backward.
//!
//! Composed in Candle, `gate.silu()? * up` is two kernels with a full-size
//! intermediate written and read back between them, and its backward is half
//! a dozen more (sigmoid, products, sums). The MLP of every Qwen2 layer runs
//! it on the widest activation of the model, in inference and in training,
//! so one kernel each way saves that memory traffic in both: forward reads
//! gate and up and writes y; backward reads gate, up and dy once and writes
//! both gradients (`d_gate = dy·up·s·(1 + gate·(1 − s))`, `s = sigmoid(gate)`;
//! `d_up = dy·silu(gate)`). Math is in f32 for every dtype.

use candle_core::{CpuStorage, Layout, Shape, Tensor};

use super::cpu::{cpu_map, for_rows, stacked, CpuOp, Float};

/// `silu(gate) * up`, elementwise, with `silu(x) = x·sigmoid(x)`.
/// Differentiable with respect to both inputs.
///
/// # Errors
/// Shape or dtype mismatch (f32, bf16 and f16 are supported).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        );
    }
    if gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate is {:?} but up is {:?}",
            gate.dtype(),
            up.dtype()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// The gradients of [`swiglu`] with respect to `gate` and `up` for output
/// gradient `dy` (one fused pass), for callers that write their own
/// backward around it.
///
/// # Errors
/// Shape or dtype mismatch.
pub(crate) fn swiglu_backward(
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let grads = gate.contiguous()?.apply_op3_no_bwd(
        &up.contiguous()?,
        &dy.contiguous()?,
        &SwigluBackward,
    )?;
    Ok((grads.get(0)?, grads.get(1)?))
}

/// [`swiglu`] of the two halves of each row of `gu` (`[.., 2w]`: gate in
/// the first `w` columns, up in the last), as the stacked gate/up
/// projection writes them: one matmul and one kernel for the MLP's first
/// half, no copies of the halves. Inference only (no backward).
///
/// # Errors
/// An odd last dimension, an input that tracks gradients, an unsupported
/// dtype.
pub(crate) fn swiglu_packed(gu: &Tensor) -> candle_core::Result<Tensor> {
    let dims = gu.dims();
    let Some((&two_w, lead)) = dims.split_last() else {
        candle_core::bail!("swiglu_packed: a scalar input");
    };
    if two_w % 2 != 0 {
        candle_core::bail!("swiglu_packed: the last dimension {two_w} is odd");
    }
    if gu.track_op() {
        candle_core::bail!("swiglu_packed: inference only (the input tracks gradients)");
    }
    let mut out = lead.to_vec();
    out.push(two_w / 2);
    gu.contiguous()?.apply_op1_no_bwd(&SwigluPacked {
        out: Shape::from(out),
    })
}

struct Swiglu;

/// [`swiglu_packed`]'s op: the output shape.
struct SwigluPacked {
    out: Shape,
}

impl CpuOp for SwigluPacked {
    const NAME: &'static str = "swiglu_packed";

    fn run<T: Float>(&self, inputs: &[&[T]], _: &Layout) -> candle_core::Result<Vec<T>> {
        let &[gu] = inputs else {
            candle_core::bail!("swiglu_packed: expected one input");
        };
        let w = self.out.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![T::from_f32(0.0); self.out.elem_count()];
        for_rows(&mut y, w, |r, o| {
            let row = &gu[2 * w * r..2 * w * (r + 1)];
            let (g, u) = row.split_at(w);
            for ((oi, g), u) in o.iter_mut().zip(g).zip(u) {
                *oi = T::from_f32(silu_sigmoid(g.to_f32()).0 * u.to_f32());
            }
        });
        Ok(y)
    }
}

impl candle_core::CustomOp1 for SwigluPacked {
    fn name(&self) -> &'static str {
        "metal-candle-swiglu-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((cpu_map(self, &[(s, l)])?, self.out.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{elementwise_config, launch as launch_kernel, ptx, Arg};
        let n = self.out.elem_count();
        let w = self.out.dims().last().copied().unwrap_or(1);
        let args = [Arg::U64(n as u64), Arg::U64(w as u64)];
        let out = launch_kernel(
            &ptx::SWIGLU,
            "swiglu_packed_fwd",
            &[(s, l)],
            n,
            elementwise_config(n),
            &args,
        )?;
        Ok((out, self.out.clone()))
    }
}

/// Backward: inputs gate, up, dy; output `[2, ..shape]`, d_gate stacked
/// over d_up (a custom op returns one tensor).
struct SwigluBackward;

/// `(silu(g), sigmoid(g))` in Candle's form, so f32 results match its `silu`.
fn silu_sigmoid(g: f32) -> (f32, f32) {
    let e = 1.0 + (-g).exp();
    (g / e, 1.0 / e)
}

impl CpuOp for Swiglu {
    const NAME: &'static str = "swiglu";

    fn run<T: Float>(&self, inputs: &[&[T]], _: &Layout) -> candle_core::Result<Vec<T>> {
        let &[gate, up] = inputs else {
            candle_core::bail!("swiglu: expected gate and up");
        };
        // Blocks of 4,096 elements spread over threads (rows do not matter).
        const BLOCK: usize = 4096;
        let mut y = vec![T::from_f32(0.0); gate.len()];
        for_rows(&mut y, BLOCK, |i, o| {
            let (g, u) = (&gate[i * BLOCK..], &up[i * BLOCK..]);
            for ((oi, g), u) in o.iter_mut().zip(g).zip(u) {
                *oi = T::from_f32(silu_sigmoid(g.to_f32()).0 * u.to_f32());
            }
        });
        Ok(y)
    }
}

impl CpuOp for SwigluBackward {
    const NAME: &'static str = "swiglu backward";

    fn run<T: Float>(&self, inputs: &[&[T]], _: &Layout) -> candle_core::Result<Vec<T>> {
        let &[gate, up, dy] = inputs else {
            candle_core::bail!("swiglu backward: expected gate, up and dy");
        };
        let n = gate.len();
        let mut grads = vec![T::from_f32(0.0); 2 * n];
        let (d_gate, d_up) = grads.split_at_mut(n);
        for (i, ((g, u), d)) in gate.iter().zip(up).zip(dy).enumerate() {
            let (g, u, d) = (g.to_f32(), u.to_f32(), d.to_f32());
            let (silu, s) = silu_sigmoid(g);
            d_gate[i] = T::from_f32(d * u * s * (1.0 + g * (1.0 - s)));
            d_up[i] = T::from_f32(d * silu);
        }
        Ok(grads)
    }
}

impl candle_core::CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "metal-candle-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((cpu_map(self, &[(s1, l1), (s2, l2)])?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.shape().elem_count();
        let out = cuda::launch("swiglu_fwd", &[(s1, l1), (s2, l2)], n, n)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = swiglu_backward(gate, up, dy)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

impl candle_core::CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "metal-candle-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let grads = cpu_map(self, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((grads, stacked(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = l1.shape().elem_count();
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let grads = cuda::launch("swiglu_bwd", &inputs, n, 2 * n)?;
        Ok((grads, stacked(l1)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::launch::{elementwise_config, launch as launch_kernel, ptx, Arg};
    use candle_core::{CudaStorage, Layout};

    /// `swiglu_{fwd|bwd}` over the `n` elements of each input.
    pub(super) fn launch(
        base: &str,
        inputs: &[(&CudaStorage, &Layout)],
        n: usize,
        out_elems: usize,
    ) -> candle_core::Result<CudaStorage> {
        let cfg = elementwise_config(n);
        let args = [Arg::U64(n as u64)];
        launch_kernel(&ptx::SWIGLU, base, inputs, out_elems, cfg, &args)
    }
}
