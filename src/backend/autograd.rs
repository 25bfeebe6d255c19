//! Ops whose forward is computed with ordinary tensor ops outside the
//! autograd graph and whose backward is written by hand.
//!
//! Candle's autograd keeps every intermediate of a composed op alive until
//! the backward pass and differentiates it op by op (each gradient starting
//! as a zero tensor it adds into). For attention that means the f32 scores
//! and probabilities of every layer; for the loss the `[tokens, vocab]`
//! logits and their log-softmax. [`with_backward`] records one graph node
//! instead: the forward runs on detached inputs (nothing kept but what the
//! backward closure captures), and the closure recomputes what it needs.
//!
//! The node is a Candle custom op whose forward hands back a copy of the
//! precomputed value (Candle gives no way to attach a backward to an
//! existing tensor); the copy is one output-sized device copy.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};

/// Whether any of `xs` takes part in a gradient computation (depends on a
/// trainable `Var`), so ops on them must be differentiable.
pub(crate) fn needs_grad(xs: &[&Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

/// The backward of a [`with_backward`] node: given the op's inputs (as
/// recorded, not detached), its output and the output's gradient, the
/// gradient of each input (`None`: no gradient flows to it).
pub(crate) type Backward =
    dyn Fn(&[&Tensor], &Tensor, &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync;

/// `value` (computed without a graph from `inputs`) as a graph node whose
/// gradients with respect to `inputs` (1 to 3 tensors) are given by
/// `backward`.
///
/// # Errors
/// More than 3 inputs, or tensor errors.
pub(crate) fn with_backward(
    inputs: &[&Tensor],
    value: &Tensor,
    backward: Arc<Backward>,
) -> candle_core::Result<Tensor> {
    // The op hands back a clone of `value`'s storage: it must start at
    // offset 0 and be laid out contiguously (a fresh copy otherwise).
    let value = if value.is_contiguous() && value.layout().start_offset() == 0 {
        value.detach()
    } else {
        value.detach().contiguous()?.affine(1.0, 0.0)?
    };
    let op = Precomputed { value, backward };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!("with_backward takes 1 to 3 inputs, got {}", inputs.len()),
    }
}

struct Precomputed {
    value: Tensor,
    backward: Arc<Backward>,
}

impl Precomputed {
    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, self.value.shape().clone())),
            _ => candle_core::bail!("with_backward: value is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (storage, layout) = self.value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, self.value.shape().clone())),
            _ => candle_core::bail!("with_backward: value is not on the GPU"),
        }
    }

    #[cfg(feature = "metal")]
    fn metal(&self) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        let (storage, layout) = self.value.storage_and_layout();
        match &*storage {
            Storage::Metal(s) => Ok((s.try_clone(layout)?, self.value.shape().clone())),
            _ => candle_core::bail!("with_backward: value is not on the Metal device"),
        }
    }

    fn grads<const N: usize>(
        &self,
        args: [&Tensor; N],
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; N]> {
        let grads = (self.backward)(&args, res, grad)?;
        let n = grads.len();
        grads.try_into().map_err(|_| {
            candle_core::Error::Msg(format!("backward gave {n} gradients for {N} inputs"))
        })
    }
}

const NAME: &str = "metal-candle-precomputed";

impl candle_core::CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        NAME
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(&self, a: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [ga] = self.grads([a], res, grad)?;
        Ok(ga)
    }
}

impl candle_core::CustomOp2 for Precomputed {
    fn name(&self) -> &'static str {
        NAME
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.grads([a, b], res, grad)?;
        Ok((ga, gb))
    }
}

impl candle_core::CustomOp3 for Precomputed {
    fn name(&self) -> &'static str {
        NAME
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.grads([a, b, c], res, grad)?;
        Ok((ga, gb, gc))
    }
}

/// `x Wᵀ` for a 2-D `x` (`[m, k]`) and a frozen `w` (`[n, k]`), whose
/// backward computes only `dx = dy W`.
///
/// Candle's matmul backward always forms both gradients: for a frozen base
/// weight that is a full `[n, k]` weight gradient per layer per step (a
/// third of the step's matmul work, plus a zero tensor it is added to),
/// thrown away.
///
/// # Errors
/// Shape or dtype mismatch.
pub(crate) fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("frozen_matmul: x is [{m}, {k}] but w is [{n}, {k2}]");
    }
    x.apply_op2(&w.detach(), FrozenMatMul)
}

/// `x Wᵀ` through the backend's own matmul (cuBLAS on CUDA), differentiated
/// with respect to `x` only.
struct FrozenMatMul;

/// `x Wᵀ` at the storage level (inside a custom op's forward): `x` `[m, k]`,
/// `w` `[n, k]`, through the backend's own matmul.
///
/// # Errors
/// Shape mismatch, backend errors.
pub(crate) fn matmul_t<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("matmul: x is [{m}, {k}] but w is [{n}, {k2}]");
    }
    let wt = wl.transpose(0, 1)?;
    Ok((x.matmul(w, (1, m, n, k), xl, &wt)?, Shape::from((m, n))))
}

impl candle_core::CustomOp2 for FrozenMatMul {
    fn name(&self) -> &'static str {
        "metal-candle-frozen-matmul"
    }
    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        matmul_t(x, xl, w, wl)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        matmul_t(x, xl, w, wl)
    }
    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        xl: &Layout,
        w: &candle_core::MetalStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        matmul_t(x, xl, w, wl)
    }
    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.matmul(w)?), None))
    }
}

thread_local! {
    /// Parameter gradients that [`checkpoint`] backward passes found, waiting
    /// for [`backward`] to add them to the step's gradient store (a custom
    /// op can return gradients only for its inputs).
    static DEFERRED: std::cell::RefCell<Vec<(Tensor, Tensor)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The function a [`checkpoint`] recomputes.
pub(crate) type Recompute = dyn Fn(&Tensor) -> crate::error::Result<Tensor> + Send + Sync;

/// `f(x)` without keeping its intermediates: the forward runs `f` and keeps
/// only the result; the backward runs `f` again on `x` and differentiates
/// that (activation recomputation, "gradient checkpointing"). Gradients of
/// `params` (the trainable tensors `f` uses) are set aside for
/// [`backward`], which must then be used instead of `Tensor::backward`.
///
/// When `x` does not track gradients the node would never be visited by the
/// backward pass, so `f(x)` is returned with its graph kept.
///
/// # Errors
/// What `f` returns.
pub(crate) fn checkpoint(
    x: &Tensor,
    params: Vec<Tensor>,
    f: Arc<Recompute>,
) -> crate::error::Result<Tensor> {
    if !x.track_op() {
        return f(x);
    }
    // Built through `params`, the graph of `f` dies with this temporary.
    let y = f(&x.detach())?.detach();
    let backward = move |args: &[&Tensor], _: &Tensor, dy: &Tensor| {
        let x = candle_core::Var::from_tensor(&args[0].detach())?;
        let y = f(x.as_tensor()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let grads = (y * dy.detach())?.sum_all()?.backward()?;
        DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            for p in &params {
                if let Some(g) = grads.get(p) {
                    d.push((p.clone(), g.clone()));
                }
            }
        });
        Ok(vec![grads.get(x.as_tensor()).cloned()])
    };
    Ok(with_backward(&[x], &y, Arc::new(backward))?)
}

/// Sets `grad` aside as (part of) the gradient of the trainable tensor
/// `param`, for [`backward`] to add to the step's gradient store: how a
/// graph node with a written backward hands back the gradients of
/// parameters that are not among its inputs (a custom op has at most
/// three, and each input costs Candle's backward a zero tensor and an add).
pub(crate) fn defer_grad(param: &Tensor, grad: Tensor) {
    DEFERRED.with(|d| d.borrow_mut().push((param.clone(), grad)));
}

/// Whether gradients set aside by [`defer_grad`] or [`checkpoint`] are
/// waiting: after a backward pass, they mean it was Candle's
/// `Tensor::backward`, which never collects them, instead of [`backward`].
pub(crate) fn deferred_waiting() -> bool {
    DEFERRED.with(|d| !d.borrow().is_empty())
}

/// `loss.backward()`, plus the parameter gradients that nodes with written
/// backward passes ([`defer_grad`], [`checkpoint`]) set aside during it.
///
/// # Errors
/// Tensor errors.
pub(crate) fn backward(loss: &Tensor) -> candle_core::Result<candle_core::backprop::GradStore> {
    DEFERRED.with(|d| d.borrow_mut().clear());
    let mut grads = loss.backward()?;
    let deferred = DEFERRED.with(|d| std::mem::take(&mut *d.borrow_mut()));
    for (p, g) in deferred {
        let sum = match grads.remove(&p) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(&p, sum);
    }
    Ok(grads)
}
