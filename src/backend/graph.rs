//! CUDA graphs for decoding: one decode step captured once and replayed at
//! every later step, so a token costs one launch on the host instead of the
//! hundreds of kernel launches Candle makes for it (decoding a small model
//! is bound by that host work, not by the GPU).
//!
//! A captured step replays exactly the kernels, shapes and addresses of the
//! capture: whatever changes from step to step (the token ids, the
//! position, the number of cached keys) must be read by the kernels from
//! device memory that is written before each replay ([`upload_u32`]), and
//! the KV cache must be preallocated (`models::StaticCache`). Candle's
//! small parameter uploads (strides of strided kernels) come from its
//! graph-upload cache, filled by one eager run of the step before the
//! capture. Memory the step allocates belongs to the graph (freed and
//! reallocated at the same addresses each replay), including the output.

use candle_core::{CpuStorage, Layout, Tensor};

/// Writes `data` into `dst` (a contiguous u32 tensor of that length) in
/// place: the step inputs a captured graph reads.
///
/// # Errors
/// Length, dtype or layout mismatch.
pub(crate) fn upload_u32(dst: &Tensor, data: &[u32]) -> candle_core::Result<()> {
    if dst.dtype() != candle_core::DType::U32 || dst.elem_count() != data.len() {
        candle_core::bail!(
            "upload: {} u32 values into a {:?} tensor of {}",
            data.len(),
            dst.dtype(),
            dst.elem_count()
        );
    }
    if !dst.is_contiguous() {
        candle_core::bail!("upload: the destination must be contiguous");
    }
    dst.inplace_op1(&Upload(data))
}

struct Upload<'a>(&'a [u32]);

impl candle_core::InplaceOp1 for Upload<'_> {
    fn name(&self) -> &'static str {
        "metal-candle-upload"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::U32(v) = s else {
            candle_core::bail!("upload: not a u32 tensor");
        };
        let a = l.start_offset();
        v[a..a + self.0.len()].copy_from_slice(self.0);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let dev = s.device.clone();
        let a = l.start_offset();
        let slice = s.as_cuda_slice_mut::<u32>()?;
        let Some(mut dst) = slice.try_slice_mut(a..a + self.0.len()) else {
            candle_core::bail!("upload: outside the destination's storage");
        };
        dev.memcpy_htod(self.0, &mut dst)
    }
}

/// A captured step and the tensor it writes its result to.
#[cfg(feature = "cuda")]
pub(crate) struct CapturedStep {
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    output: Tensor,
}

// SAFETY: the graph's handles belong to the device's context, not to a
// thread: cudarc binds that context to the calling thread before launching
// or destroying, so a step may move to another thread (as Candle's CUDA
// tensors may); it is not Sync (one replay at a time, through `&self` on
// one thread).
#[cfg(feature = "cuda")]
unsafe impl Send for CapturedStep {}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for CapturedStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapturedStep")
            .field("output", &self.output.shape())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "cuda")]
impl CapturedStep {
    /// Records `step` (run once, nothing executes) on `device`'s stream.
    /// `step` must already have run eagerly once with
    /// [`CapturedStep::warm`], so Candle's parameter uploads are cached.
    ///
    /// # Errors
    /// `step`'s error, or what CUDA reports (an operation that cannot be
    /// captured, such as a copy to the host).
    pub(crate) fn capture(
        device: &candle_core::CudaDevice,
        step: impl FnOnce() -> crate::error::Result<Tensor>,
    ) -> crate::error::Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use candle_core::cuda_backend::WrapErr;
        let stream = device.cuda_stream();
        let _cache = device.enable_cuda_graph_htod_cache();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        let output = step();
        // End the capture whatever happened, so the stream is usable again.
        let graph = stream
            .end_capture(
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            )
            .w();
        let output = output?;
        let Some(graph) = graph? else {
            return Err(crate::error::Error::InvalidInput(
                "CUDA graph capture recorded nothing".into(),
            ));
        };
        Ok(Self { graph, output })
    }

    /// Runs `step` eagerly with Candle's graph-upload cache on, so a later
    /// [`CapturedStep::capture`] of the same step finds its uploads cached.
    ///
    /// # Errors
    /// `step`'s error.
    pub(crate) fn warm<R>(
        device: &candle_core::CudaDevice,
        step: impl FnOnce() -> crate::error::Result<R>,
    ) -> crate::error::Result<R> {
        let _cache = device.enable_cuda_graph_htod_cache();
        step()
    }

    /// Kernel launches in the captured step (graph nodes of kernel type):
    /// what one replay runs on the device.
    ///
    /// # Errors
    /// What CUDA reports.
    pub(crate) fn kernel_count(&self) -> crate::error::Result<usize> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        use candle_core::cuda_backend::WrapErr;
        let graph = self.graph.cu_graph();
        let mut n = 0usize;
        // SAFETY: a null node array asks only for the count.
        unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) }
            .result()
            .w()?;
        let mut nodes = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` holds the `n` entries the graph reported.
        unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n) }
            .result()
            .w()?;
        let mut kernels = 0;
        for node in nodes.into_iter().take(n) {
            let mut kind = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `node` is one of the graph's nodes, alive with it.
            unsafe { sys::cuGraphNodeGetType(node, &mut kind) }
                .result()
                .w()?;
            if kind == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
                kernels += 1;
            }
        }
        Ok(kernels)
    }

    /// Replays the step; its output tensor holds the result once the
    /// stream reaches it.
    ///
    /// # Errors
    /// What CUDA reports.
    pub(crate) fn replay(&self) -> crate::error::Result<&Tensor> {
        use candle_core::cuda_backend::WrapErr;
        self.graph.launch().w()?;
        Ok(&self.output)
    }
}
