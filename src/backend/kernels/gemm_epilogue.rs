//! `act(x Wᵀ + b)` as one cuBLASLt GEMM whose epilogue adds the bias and
//! applies the activation (CUDA, bf16/f16, inference), as
//! text-embeddings-inference runs its encoders' linears.
//!
//! Why: after a plain GEMM the bias (and the MLP's GELU) is another pass
//! over the output; at MiniLM's b128 × 512 in bf16 the `bias_act` pass of
//! the 1,536-wide MLP alone was 1.17 of 8.22 ms of GPU time (Nsight
//! Compute, H200, BENCHMARKS.md). In the epilogue the values are still in
//! registers.
//!
//! cuBLASLt's GELU epilogue is the tanh form; for an erf GELU
//! ([`Activation::GeluErf`]) this path is taken only in bf16/f16, where the
//! two forms differ by at most 4.7e-4 in absolute value (near x = -2.7,
//! where GELU is -0.0094): a tenth of bf16's rounding step at 1, the scale
//! of the activations the next product sums. The bf16 bounds hold
//! (`kernels::gemm_epilogue_matches_composed`, the half-precision encoder
//! parity tests); f32 never takes this path (f32 results match
//! transformers to 1e-5). text-embeddings-inference makes the same choice.
//!
//! Small products (fewer than 512 rows, `MIN_ROWS`) keep the plain GEMM and the
//! `bias_act` kernel: there the launch-bound forward gains nothing and
//! cuBLASLt's per-call algorithm query costs host time (single-query
//! latency). `METAL_CANDLE_GEMM_EPILOGUE=0` turns the path off (A/B runs).

use candle_core::Tensor;

use super::bias_act::Activation;

/// Rows from which a product takes the epilogue path.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MIN_ROWS: usize = 512;

/// `act(x Wᵀ + b)` through cuBLASLt, or `None` where this path does not
/// apply (not CUDA, not bf16/f16, fewer than 512 rows, an input
/// tracking gradients, an activation the epilogue lacks, or switched off):
/// the caller then runs its plain GEMM and `bias_act`.
///
/// `x`: `[.., k]`; `w`: `[n, k]`; `bias`: `[n]`, all of one dtype.
///
/// # Errors
/// Shape mismatches, or cuBLASLt failing.
#[allow(unused_variables)]
pub fn gemm_bias_act(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    act: Activation,
) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        let dims = x.dims();
        let Some((&k, lead)) = dims.split_last() else {
            return Ok(None);
        };
        let rows: usize = lead.iter().product();
        let supported = matches!(
            act,
            Activation::None | Activation::Relu | Activation::GeluErf | Activation::GeluTanh
        );
        if !supported
            || !enabled()
            || lead.is_empty()
            || rows < MIN_ROWS
            || !x.device().is_cuda()
            || !matches!(
                x.dtype(),
                candle_core::DType::BF16 | candle_core::DType::F16
            )
            || w.dtype() != x.dtype()
            || bias.dtype() != x.dtype()
            || crate::backend::autograd::needs_grad(&[x, w, bias])
        {
            return Ok(None);
        }
        let n = w.dim(0)?;
        if w.dims() != [n, k] || bias.dims() != [n] {
            candle_core::bail!(
                "gemm_bias_act: x {:?}, weight {:?}, bias {:?}",
                x.dims(),
                w.dims(),
                bias.dims()
            );
        }
        let mut out = lead.to_vec();
        out.push(n);
        let x2 = x.contiguous()?.reshape((rows, k))?;
        let y = x2.apply_op3_no_bwd(&w.contiguous()?, &bias.contiguous()?, &cuda::Gemm { act })?;
        Ok(Some(y.reshape(out)?))
    }
    #[cfg(not(feature = "cuda"))]
    Ok(None)
}

#[cfg(feature = "cuda")]
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("METAL_CANDLE_GEMM_EPILOGUE").as_deref() != Ok("0"))
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::{Arc, Mutex, PoisonError};

    use candle_core::cuda_backend::cudarc::cublaslt::{self, CudaBlasLT, Matmul, MatmulConfig};
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DevicePtr};
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{CpuStorage, CudaStorage, DType, Layout, Shape};

    use super::Activation;

    /// The op: inputs x `[rows, k]`, W `[n, k]`, bias `[n]`, contiguous.
    pub(super) struct Gemm {
        pub act: Activation,
    }

    /// One cuBLASLt handle (and its 32 MiB workspace on Hopper) per device,
    /// on the device's stream, made on first use.
    fn handle(dev: &CudaDevice) -> candle_core::Result<Arc<CudaBlasLT>> {
        type Handles = Vec<(candle_core::cuda_backend::DeviceId, Arc<CudaBlasLT>)>;
        static HANDLES: Mutex<Handles> = Mutex::new(Vec::new());
        let mut handles = HANDLES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, h)) = handles.iter().find(|(id, _)| *id == dev.id()) {
            return Ok(h.clone());
        }
        let h = Arc::new(
            CudaBlasLT::new(dev.cuda_stream())
                .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))?,
        );
        handles.push((dev.id(), h.clone()));
        Ok(h)
    }

    fn run<T>(
        dev: &CudaDevice,
        act: Activation,
        [x, w, b]: [(&CudaStorage, &Layout); 3],
        (rows, k, n): (usize, usize, usize),
    ) -> candle_core::Result<CudaStorage>
    where
        T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
        CudaBlasLT: Matmul<T>,
        for<'a> CudaView<'a, T>: DevicePtr<T>,
    {
        use super::super::launch::view;
        let (x, w, b) = (
            view::<T>(x.0, x.1, "gemm_bias_act: x")?,
            view::<T>(w.0, w.1, "gemm_bias_act: weight")?,
            view::<T>(b.0, b.1, "gemm_bias_act: bias")?,
        );
        let lt = handle(dev)?;
        let int = |v: usize| {
            i64::try_from(v).map_err(|_| candle_core::Error::Msg(format!("gemm: size {v}")))
        };
        // Column-major view of row-major data: C (n × rows, ld n) =
        // Wᵀ (W stored k × n, ld k, transposed) · X (k × rows, ld k); the
        // bias runs along C's n rows, broadcast over its columns.
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: rows as u64,
            k: k as u64,
            alpha: 1.0,
            lda: int(k)?,
            ldb: int(k)?,
            beta: 0.0,
            ldc: int(n)?,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        let act = match act {
            Activation::None => None,
            Activation::Relu => Some(cublaslt::Activation::Relu),
            // The tanh form for both (see the module's header).
            Activation::GeluErf | Activation::GeluTanh => Some(cublaslt::Activation::Gelu),
            Activation::Silu => candle_core::bail!("gemm_bias_act: no SiLU epilogue"),
        };
        // SAFETY: every element of the output is written by the GEMM.
        let mut out = unsafe { dev.alloc::<T>((rows * n).max(1))? };
        // SAFETY: the views hold rows·k, n·k and n elements (checked by the
        // caller's shapes and `view`), the output rows·n, as `cfg` describes.
        unsafe { lt.matmul(cfg, &w, &x, &mut out, Some(&b), act.as_ref()) }
            .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt matmul: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    impl candle_core::CustomOp3 for Gemm {
        fn name(&self) -> &'static str {
            "metal-candle-gemm-bias-act"
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
            candle_core::bail!("gemm_bias_act: CUDA only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let (rows, k) = l1.shape().dims2()?;
            let n = l2.shape().dims2()?.0;
            let dev = &s1.device;
            let inputs = [(s1, l1), (s2, l2), (s3, l3)];
            let out = match s1.dtype() {
                DType::BF16 => run::<half::bf16>(dev, self.act, inputs, (rows, k, n))?,
                DType::F16 => run::<half::f16>(dev, self.act, inputs, (rows, k, n))?,
                other => candle_core::bail!("gemm_bias_act: no cuBLASLt path for {other:?}"),
            };
            Ok((out, Shape::from((rows, n))))
        }
    }
}
