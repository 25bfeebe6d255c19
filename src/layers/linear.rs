//! The linear layer every model uses: dense or quantized weights, an
//! optional bias, and the adapter hook LoRA plugs into.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Tensor};

use crate::backend::autograd::{frozen_matmul, matmul_t, needs_grad, with_backward};
use crate::backend::kernels::{bias_act, gemm_bias_act, Activation};
use crate::error::{Error, Result};
use crate::io::Weights;

/// Something that adds to a linear layer's output, e.g. a LoRA adapter.
///
/// The layer computes `base(x) + adapter.forward(x)`.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// The adapter's contribution for input `x` (`[..., in]` → `[..., out]`).
    ///
    /// # Errors
    /// Tensor errors (shape, device, dtype).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;

    /// The adapter's trainable tensors (what activation recomputation must
    /// hand gradients to).
    fn parameters(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// The adapter as a low-rank update, when its forward is exactly
    /// `scale · (x Aᵀ) Bᵀ` for now (LoRA without a dropout mask to draw):
    /// the layer then runs base and adapter as one graph node in training.
    fn low_rank(&self) -> Option<LowRank> {
        None
    }
}

/// An adapter's low-rank update `scale · (x Aᵀ) Bᵀ` (see
/// [`LinearAdapter::low_rank`]).
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// The factor on the product.
    pub scale: f64,
}

/// The base weight of a [`Linear`].
#[derive(Debug, Clone)]
enum BaseWeight {
    /// `[out, in]` in the model's dtype.
    Dense(Tensor),
    /// A quantized `[out, in]` matrix (GGUF block formats), multiplied by
    /// Candle's quantized matmul kernels.
    Quantized(Arc<QTensor>),
}

/// Rows from which [`Linear::forward`] takes the cuBLASLt epilogue path
/// (with or without a bias): a decoder's decode step (a row per sequence)
/// stays on the plain GEMM and `bias_act`, the kernels its CUDA graphs
/// were measured with.
const EPILOGUE_MIN_ROWS: usize = 512;

/// A linear layer `y = x Wᵀ + b` with an optional adapter hook. The base
/// weight is dense or quantized; adapters work the same on both.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: BaseWeight,
    bias: Option<Tensor>,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

impl Linear {
    /// A dense layer from a `[out, in]` weight and an optional `[out]` bias.
    #[must_use]
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: BaseWeight::Dense(weight),
            bias,
            adapter: None,
        }
    }

    /// A layer over a quantized `[out, in]` weight. Unquantized GGUF
    /// tensors (f32/f16/bf16) are kept dense in `dtype`; a Q5_0 weight on
    /// the CPU is held as the equal Q8_0 weight (`backend::quant`: same
    /// values, Candle's vector kernels instead of its scalar loop).
    ///
    /// # Errors
    /// A weight that is not 2-D, or a bias of the wrong length.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>, dtype: DType) -> Result<Self> {
        let (out, _) = weight.shape().dims2()?;
        if let Some(b) = &bias {
            if b.dims() != [out] {
                return Err(Error::ShapeMismatch {
                    name: "linear bias".into(),
                    expected: vec![out],
                    actual: b.dims().to_vec(),
                });
            }
        }
        let weight = match weight.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                BaseWeight::Dense(weight.dequantize(&weight.device())?.to_dtype(dtype)?)
            }
            _ => BaseWeight::Quantized(crate::backend::quant::for_device_kernels(weight)?),
        };
        Ok(Self {
            weight,
            bias,
            adapter: None,
        })
    }

    /// Loads `{prefix}.weight` (`[out, in]`) and, if `bias`, `{prefix}.bias`.
    /// A weight stored quantized stays quantized; a dense one is quantized
    /// when the weights ask for it ([`Weights::quantize_linears`]) and its
    /// rows split into whole blocks, else it stays dense.
    ///
    /// # Errors
    /// Missing tensor or wrong shape.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        if let Some(q) = w.quantized(&name) {
            if q.shape().dims() != [out_dim, in_dim] {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: vec![out_dim, in_dim],
                    actual: q.shape().dims().to_vec(),
                });
            }
            return Self::quantized(q, bias, w.dtype());
        }
        let weight = w.get(&name, &[out_dim, in_dim])?;
        match w.quantize_to() {
            Some(format) if in_dim.is_multiple_of(format.block_size()) => {
                Self::quantize(&weight, bias, format)
            }
            _ => Ok(Self::new(weight, bias)),
        }
    }

    /// A layer over `weight` (`[out, in]`, dense) quantized to `format`
    /// (quantized on the CPU, then uploaded).
    ///
    /// # Errors
    /// A width that is not a whole number of `format` blocks.
    pub fn quantize(weight: &Tensor, bias: Option<Tensor>, format: GgmlDType) -> Result<Self> {
        Self::quantized(quantize_on_device(weight, format)?, bias, weight.dtype())
    }

    /// `[out, in]`.
    fn dims(&self) -> (usize, usize) {
        let d = match &self.weight {
            BaseWeight::Dense(w) => w.dims(),
            BaseWeight::Quantized(q) => q.shape().dims(),
        };
        // `new` takes any tensor: a weight that is not 2-D reports 0s here
        // and fails with a shape error in `forward` instead of panicking.
        (
            d.first().copied().unwrap_or(0),
            d.get(1).copied().unwrap_or(0),
        )
    }

    /// One dense layer computing the outputs of `parts` side by side (their
    /// weights stacked along the output dimension), without biases (see
    /// [`Linear::stacked_bias`]): the fused q/k/v projection. Each part's
    /// weight becomes a view into the stacked one, so the parts still work
    /// alone (adapters, training) and the fused layer costs no memory.
    /// `None` (parts unchanged) when a part is quantized or carries an
    /// adapter (those stay separate).
    ///
    /// # Errors
    /// Weights of different widths, dtypes or devices.
    pub(crate) fn stack_shared(parts: &mut [&mut Linear]) -> Result<Option<Linear>> {
        let mut weights = Vec::with_capacity(parts.len());
        for p in parts.iter() {
            match (&p.weight, &p.adapter) {
                (BaseWeight::Dense(w), None) => weights.push(w.clone()),
                _ => return Ok(None),
            }
        }
        let all = Tensor::cat(&weights, 0)?;
        let mut start = 0;
        for p in parts.iter_mut() {
            let rows = p.dims().0;
            p.weight = BaseWeight::Dense(all.narrow(0, start, rows)?);
            start += rows;
        }
        Ok(Some(Linear::new(all, None)))
    }

    /// The biases of `parts` concatenated (zeros for a part without one),
    /// in `dtype` on `device`.
    ///
    /// # Errors
    /// Tensor errors.
    pub(crate) fn stacked_bias(
        parts: &[&Linear],
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let mut biases = Vec::with_capacity(parts.len());
        for p in parts {
            biases.push(match &p.bias {
                Some(b) => b.to_dtype(dtype)?.to_device(device)?,
                None => Tensor::zeros(p.dims().0, dtype, device)?,
            });
        }
        Ok(Tensor::cat(&biases, 0)?)
    }

    /// The identity of the dense base weight (`None` when quantized): a
    /// layer built over views of it (see [`Linear::stack_shared`]) checks it
    /// to notice that the weight was replaced, e.g. by an adapter merge.
    pub(crate) fn weight_id(&self) -> Option<candle_core::TensorId> {
        match &self.weight {
            BaseWeight::Dense(w) => Some(w.id()),
            BaseWeight::Quantized(_) => None,
        }
    }

    /// This layer with `bias` (`[out]`) instead of its own.
    #[must_use]
    pub(crate) fn with_bias(self, bias: Tensor) -> Self {
        Self {
            bias: Some(bias),
            ..self
        }
    }

    /// This layer without its bias (for a caller that adds the bias in a
    /// fused op of its own).
    #[must_use]
    pub(crate) fn without_bias(self) -> Self {
        Self { bias: None, ..self }
    }

    /// The quantized base weight, if it is quantized.
    #[must_use]
    pub(crate) fn quantized_weight(&self) -> Option<&Arc<QTensor>> {
        match &self.weight {
            BaseWeight::Quantized(q) => Some(q),
            BaseWeight::Dense(_) => None,
        }
    }

    /// Whether the base weight is quantized.
    #[must_use]
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, BaseWeight::Quantized(_))
    }

    /// The `[out, in]` base weight as a dense tensor in `dtype`
    /// (dequantized when quantized).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        Ok(match &self.weight {
            BaseWeight::Dense(w) => w.to_dtype(dtype)?,
            BaseWeight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype)?,
        })
    }

    /// Elements of the weight and bias (for parameter counts).
    #[must_use]
    pub fn parameter_count(&self) -> usize {
        let (o, i) = self.dims();
        o * i + self.bias.as_ref().map_or(0, Tensor::elem_count)
    }

    /// The bias, if any.
    #[must_use]
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input features.
    #[must_use]
    pub fn in_features(&self) -> usize {
        self.dims().1
    }

    /// Output features.
    #[must_use]
    pub fn out_features(&self) -> usize {
        self.dims().0
    }

    /// The attached adapter, if any.
    #[must_use]
    pub fn adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        self.adapter.as_ref()
    }

    /// Attaches (`Some`) or detaches (`None`) an adapter.
    pub fn set_adapter(&mut self, adapter: Option<Arc<dyn LinearAdapter>>) {
        self.adapter = adapter;
    }

    /// Adds `delta` (`[out, in]`, any float dtype) to the base weight, e.g.
    /// to merge an adapter in. The sum is formed in f32 and stored in the
    /// weight's dtype.
    ///
    /// # Errors
    /// A shape mismatch, or a quantized base (merging would re-quantize
    /// the sum and lose the adapter's precision: dequantize the model first).
    pub fn add_to_weight(&mut self, delta: &Tensor) -> Result<()> {
        let BaseWeight::Dense(w) = &self.weight else {
            return Err(Error::InvalidInput(
                "cannot merge into a quantized layer; load the model dense to merge".into(),
            ));
        };
        if delta.dims() != w.dims() {
            return Err(Error::ShapeMismatch {
                name: "linear weight".into(),
                expected: w.dims().to_vec(),
                actual: delta.dims().to_vec(),
            });
        }
        let merged =
            (w.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?.to_dtype(w.dtype())?;
        self.weight = BaseWeight::Dense(merged);
        Ok(())
    }

    /// Applies the layer (and its adapter).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, Activation::None, EPILOGUE_MIN_ROWS)
    }

    /// `act(x Wᵀ + b + adapter(x))` for the encoders: on CUDA in bf16/f16 (in
    /// f32 without GELU) a dense layer without an adapter is one cuBLASLt
    /// GEMM with the bias and activation in its epilogue ([`gemm_bias_act`])
    /// at every size, a single query's few rows too; elsewhere the product
    /// and then one [`bias_act`] pass.
    pub(crate) fn forward_act(&self, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        self.forward_with(x, act, 1)
    }

    /// The product, the epilogue path from `epilogue_rows` rows on.
    fn forward_with(
        &self,
        x: &Tensor,
        act: Activation,
        epilogue_rows: usize,
    ) -> candle_core::Result<Tensor> {
        if act == Activation::None {
            if let Some(y) = self.fused_low_rank(x)? {
                return Ok(y);
            }
        }
        let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        if let (BaseWeight::Dense(w), None) = (&self.weight, &self.adapter) {
            if rows >= epilogue_rows {
                if let Some(y) = gemm_bias_act(x, w, self.bias.as_ref(), act)? {
                    return Ok(y);
                }
            }
        }
        let y = match &self.weight {
            BaseWeight::Dense(w) => dense_matmul(x, w)?,
            BaseWeight::Quantized(q) => quantized_matmul(x, q)?,
        };
        // The activation comes after the adapter's update (as peft adds it
        // to the base layer's output).
        let (bias_act_now, act_after) = match &self.adapter {
            Some(_) => (Activation::None, act),
            None => (act, Activation::None),
        };
        let y = match &self.bias {
            Some(b) => bias_act(&y, b, bias_act_now)?,
            None => bias_act_now.apply(&y)?,
        };
        let y = match &self.adapter {
            Some(a) => (y + a.forward(x)?)?,
            None => y,
        };
        act_after.apply(&y)
    }
}

/// What [`Linear::backward_taped`] needs from [`Linear::forward_taped`]:
/// with a low-rank adapter, the 2-D input and `scale · x Aᵀ` (`[m, r]`);
/// nothing for a frozen layer, whose input gradient needs only the weight.
#[derive(Debug, Clone)]
pub(crate) struct LinearTape {
    xt: Option<(Tensor, Tensor)>,
}

impl Linear {
    /// Whether [`Self::forward_taped`] and [`Self::backward_taped`] stand
    /// for this layer: a frozen base (dense or quantized) and bias, and no
    /// adapter or a low-rank one.
    pub(crate) fn tapeable(&self) -> bool {
        let frozen = match &self.weight {
            BaseWeight::Dense(w) => !w.track_op(),
            BaseWeight::Quantized(_) => true,
        } && self.bias.as_ref().is_none_or(|b| !b.track_op());
        frozen && self.adapter.as_ref().is_none_or(|a| a.low_rank().is_some())
    }

    /// The adapter's low-rank update with `A` and `B` detached and in
    /// `dtype` (`None` without an adapter).
    fn low_rank_in(&self, dtype: DType) -> candle_core::Result<Option<(LowRank, Tensor, Tensor)>> {
        let Some(lr) = self.adapter.as_ref().and_then(|a| a.low_rank()) else {
            return Ok(None);
        };
        let a = lr.a.detach().to_dtype(dtype)?;
        let b = lr.b.detach().to_dtype(dtype)?;
        Ok(Some((lr, a, b)))
    }

    /// `x Wᵀ + b (+ scale · (x Aᵀ) Bᵀ)` for a 2-D `x` (`[m, in]`) outside
    /// the autograd graph, and the tape for [`Self::backward_taped`]. For
    /// layers where [`Self::tapeable`] holds; the adapter's products run in
    /// `x`'s dtype (A and B cast to it).
    ///
    /// # Errors
    /// Shape or dtype mismatch.
    pub(crate) fn forward_taped(&self, x: &Tensor) -> candle_core::Result<(Tensor, LinearTape)> {
        let x = x.detach();
        let mut y = match &self.weight {
            BaseWeight::Dense(w) => x.matmul(&w.t()?)?,
            BaseWeight::Quantized(q) => quantized_matmul(&x, q)?,
        };
        if let Some(bias) = &self.bias {
            y = crate::backend::kernels::bias_act(
                &y,
                bias,
                crate::backend::kernels::Activation::None,
            )?;
        }
        let mut xt = None;
        if let Some((lr, a, b)) = self.low_rank_in(x.dtype())? {
            let h = (x.matmul(&a.t()?)? * lr.scale)?;
            y = (y + h.matmul(&b.t()?)?)?;
            xt = Some((x, h));
        }
        Ok((y, LinearTape { xt }))
    }

    /// The backward of [`Self::forward_taped`] for the output gradient `dy`
    /// (`[m, out]`): the input gradient when `need_dx` (the input tracks
    /// gradients), and the adapter's gradients set aside for
    /// `training::backward`.
    ///
    /// # Errors
    /// Shape or dtype mismatch.
    pub(crate) fn backward_taped(
        &self,
        tape: &LinearTape,
        dy: &Tensor,
        need_dx: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let (dx, adapter) = self.taped_grads(tape, dy, need_dx)?;
        if let Some((lr, da, db)) = adapter {
            crate::backend::autograd::defer_grad(&lr.a, da);
            crate::backend::autograd::defer_grad(&lr.b, db);
        }
        Ok(dx)
    }

    /// The gradients of [`Self::forward_taped`] for `dy`: `dx = dy W +
    /// scale · (dy B) A` (when `need_dx`), and with a low-rank adapter
    /// `dA = scale · (dy B)ᵀ x` and `dB = dyᵀ (scale · x Aᵀ)` in their own
    /// dtypes.
    #[allow(clippy::type_complexity)]
    fn taped_grads(
        &self,
        tape: &LinearTape,
        dy: &Tensor,
        need_dx: bool,
    ) -> candle_core::Result<(Option<Tensor>, Option<(LowRank, Tensor, Tensor)>)> {
        let dtype = dy.dtype();
        let mut dx = if need_dx {
            let w = self
                .dense_weight(dtype)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Some(dy.matmul(&w)?)
        } else {
            None
        };
        let Some((lr, a, b)) = self.low_rank_in(dtype)? else {
            return Ok((dx, None));
        };
        let u = (dy.matmul(&b)? * lr.scale)?;
        if let Some(d) = dx {
            dx = Some((d + u.matmul(&a)?)?);
        }
        let Some((x, h)) = &tape.xt else {
            candle_core::bail!("linear backward: the tape has no input for the adapter");
        };
        let da = u.t()?.matmul(x)?.to_dtype(lr.a.dtype())?;
        let db = dy.t()?.matmul(h)?.to_dtype(lr.b.dtype())?;
        Ok((dx, Some((lr, da, db))))
    }

    /// Training through a low-rank adapter over a frozen dense weight: the
    /// layer as one graph node ([`Self::forward_taped`] with its gradients
    /// returned through the node's edges): Candle's backward costs a zero
    /// tensor and an add per graph edge, and the composed layer had about
    /// ten nodes. `None` where that does not apply (no gradient needed, a
    /// quantized or trainable base, dropout).
    fn fused_low_rank(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (BaseWeight::Dense(w), Some(adapter)) = (&self.weight, &self.adapter) else {
            return Ok(None);
        };
        let Some(lr) = adapter.low_rank() else {
            return Ok(None);
        };
        let frozen = !w.track_op() && self.bias.as_ref().is_none_or(|b| !b.track_op());
        if !frozen || !needs_grad(&[x, &lr.a, &lr.b]) {
            return Ok(None);
        }
        let dims = x.dims();
        let Some((&k, lead)) = dims.split_last() else {
            return Ok(None);
        };
        if lead.is_empty() {
            return Ok(None);
        }
        let rows: usize = lead.iter().product();
        let mut out = lead.to_vec();
        out.push(w.dim(0)?);
        let x2 = x.contiguous()?.reshape((rows, k))?;
        let (y, tape) = self.forward_taped(&x2)?;
        let layer = self.clone();
        let backward = move |args: &[&Tensor], _: &Tensor, dy: &Tensor| {
            let (dx, adapter) = layer.taped_grads(&tape, &dy.detach(), args[0].track_op())?;
            let (da, db) = match adapter {
                Some((_, da, db)) => (Some(da), Some(db)),
                None => (None, None),
            };
            Ok(vec![dx, da, db])
        };
        let y = with_backward(&[&x2, &lr.a, &lr.b], &y, Arc::new(backward))?;
        Ok(Some(y.reshape(out)?))
    }
}

/// `x Wᵀ` for `x` of any rank. A contiguous input is flattened to one 2-D
/// matmul: a batched matmul against a broadcast weight is much slower on the
/// CPU and CUDA backends and, under autograd, keeps batch-sized copies of the
/// weight (measured on an H200: 79,665 vs 59,921 MiB peak and 0.84x the
/// speed of the LoRA benchmark's step, BENCHMARKS.md).
///
/// When `x` tracks gradients and the weight does not (a frozen base), the
/// product's backward forms only the input gradient (`frozen_matmul`).
fn dense_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let frozen = x.track_op() && !w.track_op();
    match dims.len() {
        0 | 1 => candle_core::bail!("linear: input must have at least 2 dims, got {dims:?}"),
        2 if frozen => frozen_matmul(&x.contiguous()?, w),
        2 if split_columns(x) => split_matmul(x, w),
        2 => x.matmul(&w.t()?),
        _ if frozen => {
            let (lead, k) = dims.split_at(dims.len() - 1);
            let rows: usize = lead.iter().product();
            let mut out = lead.to_vec();
            out.push(w.dim(0)?);
            frozen_matmul(&x.contiguous()?.reshape((rows, k[0]))?, w)?.reshape(out)
        }
        _ if x.is_contiguous() => {
            let (lead, k) = dims.split_at(dims.len() - 1);
            let rows: usize = lead.iter().product();
            let mut out = lead.to_vec();
            out.push(w.dim(0)?);
            let x2 = x.reshape((rows, k[0]))?;
            if split_columns(&x2) {
                return split_matmul(&x2, w)?.reshape(out);
            }
            x2.matmul(&w.t()?)?.reshape(out)
        }
        _ => {
            let lead = &dims[..dims.len() - 2];
            x.matmul(&w.broadcast_left(lead)?.t()?)
        }
    }
}

/// Whether an inference product on the CPU is split over threads by
/// output columns here (AVX-512 kernels: gemm leaves a few-hundred-row
/// product on one thread, BENCHMARKS.md). Only where gemm runs its
/// AVX-512 kernels: the feature is on and the CPU has them.
fn split_columns(x: &Tensor) -> bool {
    cfg!(feature = "avx512")
        && avx512_cpu()
        && x.device().is_cpu()
        && !x.track_op()
        && x.dim(0).is_ok_and(|r| r <= 512)
        && rayon::current_num_threads() > 1
}

/// Whether this CPU has AVX-512F (gemm picks its kernels at run time).
fn avx512_cpu() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// `x Wᵀ` as one product per thread over a share of W's rows (output
/// columns), joined.
fn split_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    let n = w.dim(0)?;
    let t = rayon::current_num_threads().min(n.div_ceil(64)).max(1);
    let chunk = n.div_ceil(t);
    let parts = (0..t)
        .into_par_iter()
        .map(|i| {
            let start = i * chunk;
            let len = chunk.min(n - start);
            x.matmul(&w.narrow(0, start, len)?.t()?)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1)
}

/// `t` quantized to `format` on the CPU, its blocks then uploaded to
/// `t`'s device: Candle 0.11's CUDA `QTensor::quantize` leaves the row
/// padding its kernels read uninitialised (NaN logits seen on an H200),
/// its upload path zero-fills it.
pub(crate) fn quantize_on_device(t: &Tensor, format: GgmlDType) -> Result<Arc<QTensor>> {
    let q = QTensor::quantize(&t.to_device(&candle_core::Device::Cpu)?, format)?;
    if t.device().is_cpu() {
        return Ok(Arc::new(q));
    }
    Ok(Arc::new(QTensor::new(
        QStorage::from_data(q.data()?, t.device(), format)?,
        q.shape().clone(),
    )?))
}

/// Inputs with at least this many rows multiply a quantized weight by
/// dequantizing it (transiently, in the input's dtype) and running the dense
/// matmul; fewer rows (decoding) use Candle's quantized kernels.
///
/// Candle's quantized kernels quantize the activations too (to 8 bits,
/// Q8_K / Q8_1, as llama.cpp's CPU kernels): cheap for a few rows, where
/// reading the weight is the cost, but it moves the logits of a prompt or
/// a training batch away from the model's own (96.7% next-token agreement
/// with the dequantized Qwen2.5-Coder Q4_K_M file over 2,000 tokens). With
/// many rows the matmul is compute-bound, the dequantization is paid once
/// for all of them, and the result is the dequantized model's, as
/// bitsandbytes' QLoRA and llama.cpp's CUDA backend for large batches do.
pub(crate) const DEQUANTIZE_ROWS: usize = 32;

/// `x Wᵀ` for a quantized `W`: dequantized and dense for
/// [`DEQUANTIZE_ROWS`] rows or more, else Candle's quantized kernels (the
/// input's dtype on CUDA, f32 on the CPU) returned in `x`'s dtype. Differentiable with respect to `x`
/// either way, so adapters below a quantized layer still get gradients
/// (Candle's own op has no backward).
fn quantized_matmul(x: &Tensor, q: &Arc<QTensor>) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("linear: input must have at least 2 dims, got {dims:?}");
    };
    let rows: usize = lead.iter().product();
    if rows >= DEQUANTIZE_ROWS {
        let mut out = lead.to_vec();
        out.push(q.shape().dims2()?.0);
        let op = QuantizedMatMul {
            w: q.clone(),
            dense: true,
        };
        return x
            .contiguous()?
            .reshape((rows, k))?
            .apply_op1(op)?
            .reshape(out);
    }
    let op = QuantizedMatMul {
        w: q.clone(),
        dense: false,
    };
    // Candle's CUDA quantized kernels take bf16/f16 activations directly;
    // its CPU kernels take f32 only.
    let x = if x.device().is_cuda() {
        x.contiguous()?
    } else {
        x.to_dtype(DType::F32)?.contiguous()?
    };
    x.apply_op1(op)?.to_dtype(dtype)
}

/// A quantized matmul with a backward pass (`dx = dy · W`, `W` dequantized
/// for the backward only, never kept): Candle's quantized kernels
/// (`dense: false`, f32 input), or, for inputs with many rows, `W`
/// dequantized to the input's dtype and a dense matmul (`dense: true`, 2-D
/// input).
struct QuantizedMatMul {
    w: Arc<QTensor>,
    dense: bool,
}

impl QuantizedMatMul {
    /// `x Wᵀ` with `W` dequantized on `device` in `dtype`.
    fn dense_fwd<S: candle_core::backend::BackendStorage>(
        &self,
        x: &S,
        l: &candle_core::Layout,
        device: &candle_core::Device,
        unwrap: impl Fn(&candle_core::Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, candle_core::Shape)> {
        let w = self.w.dequantize(device)?.to_dtype(x.dtype())?;
        let (ws, wl) = w.storage_and_layout();
        let ws = unwrap(&ws).ok_or_else(|| {
            candle_core::Error::Msg("quantized matmul: weight on another device".into())
        })?;
        matmul_t(x, l, ws, wl)
    }
}

impl candle_core::CustomOp1 for QuantizedMatMul {
    fn name(&self) -> &'static str {
        "metal-candle-qmatmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        if self.dense {
            return self.dense_fwd(s, l, &candle_core::Device::Cpu, |st| match st {
                candle_core::Storage::Cpu(c) => Some(c),
                _ => None,
            });
        }
        // Q8_0 (and Q5_0, held as Q8_0) and Q4_1 on AVX-512 VNNI: our
        // kernels, Candle's numbers bit for bit, faster.
        if let Some(out) = crate::backend::quant::vnni_matmul(s, l, &self.w)? {
            return Ok(out);
        }
        candle_core::CustomOp1::cpu_fwd(self.w.as_ref(), s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        if self.dense {
            let device =
                candle_core::Device::Cuda(candle_core::backend::BackendStorage::device(s).clone());
            return self.dense_fwd(s, l, &device, |st| match st {
                candle_core::Storage::Cuda(c) => Some(c),
                _ => None,
            });
        }
        candle_core::CustomOp1::cuda_fwd(self.w.as_ref(), s, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
        if self.dense {
            let device =
                candle_core::Device::Metal(candle_core::backend::BackendStorage::device(s).clone());
            return self.dense_fwd(s, l, &device, |st| match st {
                candle_core::Storage::Metal(c) => Some(c),
                _ => None,
            });
        }
        candle_core::CustomOp1::metal_fwd(self.w.as_ref(), s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.w.dequantize(dy.device())?.to_dtype(dy.dtype())?;
        Ok(Some(dy.broadcast_matmul(&w)?))
    }
}
