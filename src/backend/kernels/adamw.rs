//! One fused AdamW update of one parameter (`adamw.cu`): the optimizer's
//! dozen composed ops a parameter in one launch. A LoRA step updates about a
//! hundred small parameters, so the composed update's cost was the host
//! launching it (15 ms of a 96 ms Qwen2.5-0.5B step on an H200, measured
//! with the trainer's step-phase events), not the GPU.

use candle_core::{CpuStorage, Layout, Shape, Tensor};

use super::cpu::{cpu_map, CpuOp, Float};

/// The scalars of one AdamW step (the caller folds the learning rate, the
/// weight decay and the bias corrections in).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWStep {
    pub(crate) beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) eps: f32,
    /// `1 - lr * weight_decay`.
    pub(crate) decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub(crate) step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub(crate) bc2_sqrt: f32,
}

/// One update of parameter `p` with gradient `g` and moments `mv` (`[2,
/// n]`: m over v), all of one dtype: `[3, n]`, the new parameter (flat)
/// over the new m and v (so `narrow(0, 1, 2)` is the next step's `mv`).
/// Math in f32; no gradient.
///
/// # Errors
/// Shapes or dtypes that do not fit.
pub(crate) fn adamw_update(
    p: &Tensor,
    g: &Tensor,
    mv: &Tensor,
    step: AdamWStep,
) -> candle_core::Result<Tensor> {
    let n = p.elem_count();
    if g.dims() != p.dims() || mv.dims() != [2, n] {
        candle_core::bail!(
            "adamw_update: parameter {:?}, gradient {:?} and moments {:?} do not fit",
            p.dims(),
            g.dims(),
            mv.dims()
        );
    }
    if g.dtype() != p.dtype() || mv.dtype() != p.dtype() {
        candle_core::bail!(
            "adamw_update: parameter {:?}, gradient {:?} and moments {:?} differ in dtype",
            p.dtype(),
            g.dtype(),
            mv.dtype()
        );
    }
    p.contiguous()?
        .apply_op3_no_bwd(&g.contiguous()?, &mv.contiguous()?, &AdamWUpdate(step))
}

struct AdamWUpdate(AdamWStep);

/// `[3, n]` for a parameter of `l`'s size.
fn out_shape(l: &Layout) -> Shape {
    Shape::from((3, l.shape().elem_count()))
}

impl CpuOp for AdamWUpdate {
    const NAME: &'static str = "adamw_update";

    fn run<T: Float>(&self, inputs: &[&[T]], _: &Layout) -> candle_core::Result<Vec<T>> {
        let &[p, g, mv] = inputs else {
            candle_core::bail!("adamw_update: expected p, g and mv");
        };
        let s = self.0;
        let n = p.len();
        let mut out = vec![T::from_f32(0.0); 3 * n];
        let (po, rest) = out.split_at_mut(n);
        let (mo, vo) = rest.split_at_mut(n);
        for i in 0..n {
            let gi = g[i].to_f32();
            let m = mv[i].to_f32() * s.beta1 + gi * (1.0 - s.beta1);
            let v = mv[n + i].to_f32() * s.beta2 + gi * gi * (1.0 - s.beta2);
            let update = m / (v.sqrt() / s.bc2_sqrt + s.eps) * s.step_size;
            po[i] = T::from_f32(p[i].to_f32() * s.decay - update);
            mo[i] = T::from_f32(m);
            vo[i] = T::from_f32(v);
        }
        Ok(out)
    }
}

impl candle_core::CustomOp3 for AdamWUpdate {
    fn name(&self) -> &'static str {
        "metal-candle-adamw-update"
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
        let out = cpu_map(self, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((out, out_shape(l1)))
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
        use super::launch::{elementwise_config, launch, ptx, Arg};
        let n = l1.shape().elem_count();
        let s = self.0;
        let args = [
            Arg::F32(s.beta1),
            Arg::F32(s.beta2),
            Arg::F32(s.eps),
            Arg::F32(s.decay),
            Arg::F32(s.step_size),
            Arg::F32(s.bc2_sqrt),
            Arg::U64(n as u64),
        ];
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let out = launch(
            &ptx::ADAMW,
            "adamw_update",
            &inputs,
            3 * n,
            elementwise_config(n),
            &args,
        )?;
        Ok((out, out_shape(l1)))
    }
}
