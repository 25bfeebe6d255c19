//! `act(x Wᵀ + b)` as one cuBLASLt GEMM whose epilogue adds the bias and
//! applies the activation (CUDA, bf16/f16, and f32 without GELU;
//! inference), as text-embeddings-inference runs its encoders' linears.
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
//! parity tests); f32 takes this path only for the exact epilogues (bias,
//! ReLU, none; GELU stays with `bias_act`), with f32 products and sums
//! (`CUBLAS_COMPUTE_32F`, no TF32), so f32 results still match transformers
//! to 1e-5. text-embeddings-inference makes the same choice for GELU.
//!
//! Every size takes it, a single query's few rows too (one launch instead
//! of a GEMM and a `bias_act`): the descriptors and the algorithm
//! cuBLASLt's heuristic picks are made once per shape and kept (the
//! heuristic query on every call had cost the launch-bound single-query
//! path host time, so small products used to keep the plain GEMM).
//! From 2,048 rows the first eight algorithms of the heuristic are timed
//! once per power-of-two row bucket on the call's own buffers and the
//! fastest is kept (the first choice was up to 20% slower on encoder
//! shapes); `METAL_CANDLE_GEMM_AUTOTUNE=0` keeps the first choice, whose
//! results do not depend on timing. A layer without a bias takes the same
//! path with a bias-free epilogue.
//! `METAL_CANDLE_GEMM_EPILOGUE=0` turns the path off (A/B runs).

use candle_core::Tensor;

use super::bias_act::Activation;

/// `act(x Wᵀ + b)` (`act(x Wᵀ)` without a bias) through cuBLASLt, or
/// `None` where this path does not apply (not CUDA, not bf16/f16/f32, a
/// GELU in f32, no rows, an input tracking gradients, an activation the
/// epilogue lacks, or switched off): the caller then runs its plain GEMM
/// and `bias_act`.
///
/// `x`: `[.., k]`; `w`: `[n, k]`; `bias`: `[n]`, all of one dtype.
///
/// # Errors
/// Shape mismatches, or cuBLASLt failing.
#[allow(unused_variables)]
pub fn gemm_bias_act(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        let dims = x.dims();
        let Some((&k, lead)) = dims.split_last() else {
            return Ok(None);
        };
        let rows: usize = lead.iter().product();
        // The epilogue's GELU is the tanh form: only half precision takes it.
        let supported = match x.dtype() {
            candle_core::DType::BF16 | candle_core::DType::F16 => matches!(
                act,
                Activation::None | Activation::Relu | Activation::GeluErf | Activation::GeluTanh
            ),
            candle_core::DType::F32 => matches!(act, Activation::None | Activation::Relu),
            _ => false,
        };
        if !supported
            || !enabled()
            || lead.is_empty()
            || rows == 0
            || !x.device().is_cuda()
            || w.dtype() != x.dtype()
            || bias.is_some_and(|b| b.dtype() != x.dtype())
            || crate::backend::autograd::needs_grad(&[x, w])
            || bias.is_some_and(|b| crate::backend::autograd::needs_grad(&[b]))
        {
            return Ok(None);
        }
        let n = w.dim(0)?;
        if w.dims() != [n, k] || bias.is_some_and(|b| b.dims() != [n]) {
            candle_core::bail!(
                "gemm_bias_act: x {:?}, weight {:?}, bias {:?}",
                x.dims(),
                w.dims(),
                bias.map(Tensor::dims)
            );
        }
        let mut out = lead.to_vec();
        out.push(n);
        let x2 = x.contiguous()?.reshape((rows, k))?;
        let op = cuda::Gemm { act };
        let y = match bias {
            Some(b) => x2.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op)?,
            None => x2.apply_op2_no_bwd(&w.contiguous()?, &op)?,
        };
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
    use std::collections::HashMap;
    use std::sync::{Mutex, PoisonError};

    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr};
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{CpuStorage, CudaStorage, DType, Layout, Shape};

    use super::Activation;

    pub(super) struct Gemm {
        pub act: Activation,
    }

    /// cuBLASLt's workspace on Hopper (what cudarc's `CudaBlasLT` gives it).
    const WORKSPACE: usize = 32 << 20;
    /// Plans kept per device; past this (many distinct packed-batch token
    /// counts) the cache starts again.
    const MAX_PLANS: usize = 4096;
    /// Products of at least this many rows time the heuristic's first
    /// [`CANDIDATES`] algorithms once per row bucket and keep the fastest:
    /// its first choice was 3-20% slower than the best of them on
    /// MiniLM's and BGE's encoder GEMMs at 65,536 rows (the GELU epilogue
    /// and the 384/768-wide output projections most; H200, BENCHMARKS.md).
    /// Smaller products are launch-bound and keep the first choice.
    const TUNE_MIN_ROWS: usize = 2048;
    const CANDIDATES: usize = 8;

    /// What a plan depends on: dtype, rows, output and input width, epilogue.
    type Key = (DType, usize, usize, usize, sys::cublasLtEpilogue_t);

    /// The descriptors and the algorithm cuBLASLt's heuristic picked for one
    /// key, made once: the heuristic query costs host time on every call
    /// otherwise (cudarc's `CudaBlasLT::matmul` makes and drops all of
    /// them per call). Only the bias pointer changes between calls.
    struct Plan {
        desc: sys::cublasLtMatmulDesc_t,
        layouts: [sys::cublasLtMatrixLayout_t; 3],
        algo: sys::cublasLtMatmulAlgo_t,
    }

    impl Drop for Plan {
        fn drop(&mut self) {
            // SAFETY: made by `Plan::new`, used only under the device's lock,
            // dropped once. Errors cannot be reported from a drop.
            unsafe {
                let _ = result::destroy_matmul_desc(self.desc);
                for l in self.layouts {
                    let _ = result::destroy_matrix_layout(l);
                }
            }
        }
    }

    /// One cuBLASLt handle, workspace and plan cache per device, and the
    /// timed algorithm per row bucket (a key with rows rounded up to a power
    /// of two): packed batches have a new token count almost every batch,
    /// and each new count reuses its bucket's algorithm where cuBLASLt
    /// accepts it for that shape instead of timing again.
    struct Lt {
        device: candle_core::cuda_backend::DeviceId,
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
        plans: HashMap<Key, Plan>,
        tuned: HashMap<Key, sys::cublasLtMatmulAlgo_t>,
    }

    // SAFETY: the raw cuBLASLt handles are only used with the `LTS` lock held.
    unsafe impl Send for Lt {}

    static LTS: Mutex<Vec<Lt>> = Mutex::new(Vec::new());

    fn lt_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
    }

    fn new_lt(dev: &CudaDevice) -> candle_core::Result<Lt> {
        dev.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| lt_err("context", e))?;
        let handle = result::create_handle().map_err(|e| lt_err("handle", e))?;
        // SAFETY: cuBLASLt writes the workspace only inside its own calls.
        let workspace = unsafe { dev.alloc::<u8>(WORKSPACE)? };
        Ok(Lt {
            device: dev.id(),
            handle,
            workspace,
            plans: HashMap::new(),
            tuned: HashMap::new(),
        })
    }

    impl Plan {
        /// Descriptors for `out[rows, n] = epi(x[rows, k] w[n, k]ᵀ + bias)`
        /// in cuBLASLt's column-major terms (m = n, n = rows, A = w
        /// transposed) with the heuristic's first algorithm, and its first
        /// `candidates` algorithms.
        fn new(
            handle: sys::cublasLtHandle_t,
            key: Key,
            candidates: usize,
        ) -> candle_core::Result<(Self, Vec<sys::cublasLtMatmulAlgo_t>)> {
            let (dtype, rows, n, k, epilogue) = key;
            let ty = match dtype {
                DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
                DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
                DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
                other => candle_core::bail!("gemm_bias_act: no cuBLASLt path for {other:?}"),
            };
            let int = |v: usize| {
                i64::try_from(v).map_err(|_| candle_core::Error::Msg(format!("gemm: size {v}")))
            };
            let desc = result::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(|e| lt_err("matmul desc", e))?;
            // From here on `plan` owns what is made: an error drops it.
            let mut plan = Plan {
                desc,
                layouts: [std::ptr::null_mut(); 3],
                algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            };
            let shapes = [(k, n, k), (k, rows, k), (n, rows, n)];
            for (slot, (r, c, ld)) in plan.layouts.iter_mut().zip(shapes) {
                *slot = result::create_matrix_layout(ty, r as u64, c as u64, int(ld)?)
                    .map_err(|e| lt_err("layout", e))?;
            }
            let trans: i32 = 1;
            // SAFETY: attributes of the descriptor just made, values of the
            // sizes cuBLASLt documents for them.
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    (&trans) as *const i32 as *const _,
                    std::mem::size_of::<i32>(),
                )
                .map_err(|e| lt_err("transa", e))?;
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    (&epilogue) as *const sys::cublasLtEpilogue_t as *const _,
                    std::mem::size_of::<sys::cublasLtEpilogue_t>(),
                )
                .map_err(|e| lt_err("epilogue", e))?;
            }
            let pref = result::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
            let ws = WORKSPACE;
            // SAFETY: zeroed plain-data structs that cuBLASLt fills.
            let mut found: Vec<sys::cublasLtMatmulHeuristicResult_t> =
                vec![unsafe { std::mem::zeroed() }; candidates.max(1)];
            let mut count = 0i32;
            // SAFETY: every descriptor is live; `found` has room for the
            // count requested; `pref` is destroyed below.
            let status = unsafe {
                let set = result::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&ws) as *const usize as *const _,
                    std::mem::size_of::<usize>(),
                );
                let h = set.and_then(|()| {
                    sys::cublasLtMatmulAlgoGetHeuristic(
                        handle,
                        plan.desc,
                        plan.layouts[0],
                        plan.layouts[1],
                        plan.layouts[2],
                        plan.layouts[2],
                        pref,
                        found.len() as i32,
                        found.as_mut_ptr(),
                        &mut count,
                    )
                    .result()
                });
                let _ = result::destroy_matmul_pref(pref);
                h
            };
            status.map_err(|e| lt_err("heuristic", e))?;
            let algos: Vec<_> = found
                .iter()
                .take(usize::try_from(count).unwrap_or(0))
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect();
            let Some(first) = algos.first() else {
                candle_core::bail!("cuBLASLt heuristic: no algorithm for {key:?}");
            };
            plan.algo = *first;
            Ok((plan, algos))
        }

        /// Whether cuBLASLt runs `algo` for this plan's shapes.
        fn accepts(&self, handle: sys::cublasLtHandle_t, algo: &sys::cublasLtMatmulAlgo_t) -> bool {
            // SAFETY: zeroed plain-data struct that cuBLASLt fills.
            let mut out: sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
            // SAFETY: the plan's descriptors are live.
            let status = unsafe {
                sys::cublasLtMatmulAlgoCheck(
                    handle,
                    self.desc,
                    self.layouts[0],
                    self.layouts[1],
                    self.layouts[2],
                    self.layouts[2],
                    algo,
                    &mut out,
                )
            };
            status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && out.workspaceSize <= WORKSPACE
        }
    }

    /// Whether the timed choice is on (`METAL_CANDLE_GEMM_AUTOTUNE=0` keeps
    /// the heuristic's first algorithm: same results from run to run, where
    /// algorithms that sum in another order may differ in the last bit).
    fn autotune() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("METAL_CANDLE_GEMM_AUTOTUNE").as_deref() != Ok("0"))
    }

    /// Times each candidate (a warm-up, then two runs between events) on
    /// the call's own buffers and returns the fastest; `matmul` queues one
    /// product with the algorithm given (it writes only the output, which
    /// the real product then overwrites).
    fn fastest(
        stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        matmul: &dyn Fn(&sys::cublasLtMatmulAlgo_t) -> candle_core::Result<()>,
    ) -> candle_core::Result<Option<sys::cublasLtMatmulAlgo_t>> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |e| lt_err("timing event", e);
        let mut best: Option<(f32, sys::cublasLtMatmulAlgo_t)> = None;
        for algo in candidates {
            // An algorithm that fails to launch is skipped, not an error.
            if matmul(algo).is_err() {
                continue;
            }
            let start = stream.record_event(timed).map_err(ev)?;
            matmul(algo)?;
            matmul(algo)?;
            let end = stream.record_event(timed).map_err(ev)?;
            let ms = start.elapsed_ms(&end).map_err(ev)?;
            if best.is_none_or(|(b, _)| ms < b) {
                best = Some((ms, *algo));
            }
        }
        Ok(best.map(|(_, algo)| algo))
    }

    fn run<T>(
        dev: &CudaDevice,
        act: Activation,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        b: Option<(&CudaStorage, &Layout)>,
        (rows, k, n): (usize, usize, usize),
    ) -> candle_core::Result<CudaStorage>
    where
        T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
        for<'a> CudaView<'a, T>: DevicePtr<T>,
    {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
        let dtype = x.0.dtype();
        use super::super::launch::view;
        let x = view::<T>(x.0, x.1, "gemm_bias_act: x")?;
        let w = view::<T>(w.0, w.1, "gemm_bias_act: weight")?;
        let b = match b {
            Some(b) => Some(view::<T>(b.0, b.1, "gemm_bias_act: bias")?),
            None => None,
        };
        use sys::cublasLtEpilogue_t as E;
        let epilogue = match (act, b.is_some()) {
            (Activation::None, true) => E::CUBLASLT_EPILOGUE_BIAS,
            (Activation::None, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
            (Activation::Relu, true) => E::CUBLASLT_EPILOGUE_RELU_BIAS,
            (Activation::Relu, false) => E::CUBLASLT_EPILOGUE_RELU,
            (Activation::GeluErf | Activation::GeluTanh, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
            (Activation::GeluErf | Activation::GeluTanh, false) => E::CUBLASLT_EPILOGUE_GELU,
            (Activation::Silu, _) => candle_core::bail!("gemm_bias_act: no SiLU epilogue"),
        };
        let key: Key = (dtype, rows, n, k, epilogue);
        // SAFETY: every element is written by the GEMM before anyone reads it.
        let out = unsafe { dev.alloc::<T>((rows * n).max(1))? };
        let stream = dev.cuda_stream();
        let mut lts = LTS.lock().unwrap_or_else(PoisonError::into_inner);
        let i = match lts.iter().position(|l| l.device == dev.id()) {
            Some(i) => i,
            None => {
                lts.push(new_lt(dev)?);
                lts.len() - 1
            }
        };
        let lt = &mut lts[i];
        let (alpha, beta) = (1f32, 0f32);
        let (xp, _gx) = x.device_ptr(&stream);
        let (wp, _gw) = w.device_ptr(&stream);
        let bias_ptr = b.as_ref().map(|b| b.device_ptr(&stream));
        let (op, _go) = out.device_ptr(&stream);
        let (wsp, _gws) = lt.workspace.device_ptr(&stream);
        let handle = lt.handle;
        // SAFETY (for every call): the plan's descriptors match these
        // buffers' shapes (the key), the lock is held while the bias pointer
        // is set and the GEMM is queued, and every buffer outlives the
        // queued work (Candle's stream order keeps them until later work
        // frees them).
        let matmul = |plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t| unsafe {
            result::matmul(
                handle,
                plan.desc,
                (&alpha) as *const f32 as *const _,
                (&beta) as *const f32 as *const _,
                wp as *const _,
                plan.layouts[0],
                xp as *const _,
                plan.layouts[1],
                op as *const _,
                plan.layouts[2],
                op as *mut _,
                plan.layouts[2],
                algo,
                wsp as *mut _,
                WORKSPACE,
                stream.cu_stream() as *mut _,
            )
            .map_err(|e| lt_err("matmul", e))
        };
        let set_bias = |plan: &Plan| -> candle_core::Result<()> {
            if let Some((bp, _)) = &bias_ptr {
                // SAFETY: a live descriptor; the pointer's size is what
                // cuBLASLt reads.
                unsafe {
                    result::set_matmul_desc_attribute(
                        plan.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        bp as *const _ as *const _,
                        std::mem::size_of_val(bp),
                    )
                    .map_err(|e| lt_err("bias", e))?;
                }
            }
            Ok(())
        };
        if !lt.plans.contains_key(&key) {
            if lt.plans.len() >= MAX_PLANS {
                lt.plans.clear();
            }
            // A capture (a CUDA graph being recorded) cannot be timed.
            let capturing = stream.capture_status().ok()
                != Some(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE);
            let tune = rows >= TUNE_MIN_ROWS && autotune() && !capturing;
            let bucket: Key = (dtype, rows.next_power_of_two(), n, k, epilogue);
            let timed = if tune {
                lt.tuned.get(&bucket).copied()
            } else {
                None
            };
            // Candidates only where this bucket is timed now.
            let time_now = tune && timed.is_none();
            let (mut plan, candidates) =
                Plan::new(handle, key, if time_now { CANDIDATES } else { 1 })?;
            if let Some(algo) = timed {
                if plan.accepts(handle, &algo) {
                    plan.algo = algo;
                }
            } else if time_now {
                set_bias(&plan)?;
                let run_with = |a: &sys::cublasLtMatmulAlgo_t| matmul(&plan, a);
                if let Some(algo) = fastest(&stream, &candidates, &run_with)? {
                    plan.algo = algo;
                    lt.tuned.insert(bucket, algo);
                }
            }
            lt.plans.insert(key, plan);
        }
        let Some(plan) = lt.plans.get(&key) else {
            candle_core::bail!("gemm_bias_act: plan cache lost its entry");
        };
        set_bias(plan)?;
        matmul(plan, &plan.algo)?;
        drop((_gx, _gw, bias_ptr, _go, _gws));
        drop(lts);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    impl Gemm {
        fn forward(
            &self,
            x: (&CudaStorage, &Layout),
            w: (&CudaStorage, &Layout),
            b: Option<(&CudaStorage, &Layout)>,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let (rows, k) = x.1.shape().dims2()?;
            let n = w.1.shape().dims2()?.0;
            let dev = &x.0.device;
            let dims = (rows, k, n);
            let out = match x.0.dtype() {
                DType::BF16 => run::<half::bf16>(dev, self.act, x, w, b, dims)?,
                DType::F16 => run::<half::f16>(dev, self.act, x, w, b, dims)?,
                DType::F32 => run::<f32>(dev, self.act, x, w, b, dims)?,
                other => candle_core::bail!("gemm_bias_act: no cuBLASLt path for {other:?}"),
            };
            Ok((out, Shape::from((rows, n))))
        }
    }

    /// With a bias.
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
            self.forward((s1, l1), (s2, l2), Some((s3, l3)))
        }
    }

    /// Without a bias.
    impl candle_core::CustomOp2 for Gemm {
        fn name(&self) -> &'static str {
            "metal-candle-gemm-act"
        }

        fn cpu_fwd(
            &self,
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
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            self.forward((s1, l1), (s2, l2), None)
        }
    }
}
