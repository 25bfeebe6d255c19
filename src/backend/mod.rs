//! Devices and the dtype policy; later, our own kernels.
//!
//! CPU is always available. CUDA needs the `cuda` feature and an NVIDIA GPU.
//! Metal needs the `metal` feature: it forwards to Candle's Metal backend and
//! is **untested** on this project's machines (no Apple hardware).

pub use candle_core::{DType, Device};

pub(crate) mod autograd;
pub(crate) mod graph;
pub mod kernels;
#[cfg(all(feature = "cuda", unix))]
pub(crate) mod nccl;
pub(crate) mod quant;

use crate::error::{Error, Result};

/// The CPU device.
#[must_use]
pub fn cpu() -> Device {
    Device::Cpu
}

/// The CUDA device with the given ordinal.
///
/// # Errors
/// Fails when the crate was built without the `cuda` feature or the GPU
/// cannot be opened.
pub fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::config(
            "device",
            "CUDA requested but metal-candle was built without the `cuda` feature",
        ));
    }
    let device = Device::new_cuda(ordinal)?;
    prepare_device(&device);
    Ok(device)
}

/// Sets a CUDA device up the way this library runs it; called by [`cuda`]
/// and by the model loaders, idempotent, nothing off CUDA. Two settings:
///
/// - **The pool keeps freed memory.** Candle allocates every tensor with
///   `cuMemAllocAsync` from the device's default pool, whose release
///   threshold is 0: the memory a training step frees was unmapped at the
///   next host sync and mapped again by the next step (at the LoRA
///   benchmark's shape a step without activation recomputation ran slower
///   than one with it, 25,105 vs 34,207 tokens/s on an H200). PyTorch's
///   caching allocator keeps freed blocks the same way; idle memory then
///   shows as used in `nvidia-smi`. [`release_freed_memory`] hands it back.
/// - **No per-tensor CUDA events.** Candle runs each device on one stream
///   of its own, which puts cudarc in multi-stream mode: every allocation
///   creates two events and every kernel argument records one and waits on
///   another, host work that decoding a token pays hundreds of times.
///   Everything Candle and this library launch on a device goes to that
///   one stream, in order, so the events order nothing. A program that
///   launches on other streams of the same context itself must synchronise
///   them itself.
pub fn prepare_device(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // SAFETY: see above: one stream per Candle device, nothing for the
        // events to order. cudarc 0.19 checks the flag at every use, so
        // tensors made before this call are fine too.
        unsafe { d.disable_event_tracking() };
    }
    keep_freed_memory(device);
}

fn keep_freed_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Some(pool) = default_pool(device) {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the device's own default pool, and a pointer to a live
        // u64 as the release-threshold attribute expects.
        unsafe {
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// The default memory pool of a CUDA device that allocates from one
/// (`None` off CUDA, without pool support, or on a driver error), with the
/// device's context bound to this thread.
#[cfg(feature = "cuda")]
fn default_pool(
    device: &Device,
) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = device else {
        return None;
    };
    let stream = d.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() || ctx.bind_to_thread().is_err() {
        return None;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a driver query on the context's own device, writing to a live
    // local of the type it expects.
    let status = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    (status == sys::CUresult::CUDA_SUCCESS).then_some(pool)
}

/// Hands the memory the CUDA pool keeps ([`prepare_device`]) back to
/// the system, like `torch.cuda.empty_cache()`: for a program that is done
/// with a large model and wants the memory seen as free (other processes,
/// `nvidia-smi`, measurements). Synchronises the device first. Does nothing
/// off CUDA.
///
/// # Errors
/// A failed synchronisation.
pub fn release_freed_memory(device: &Device) -> Result<()> {
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    if let Some(pool) = default_pool(device) {
        // SAFETY: the device's own default pool, after a synchronisation.
        unsafe {
            let _ = candle_core::cuda_backend::cudarc::driver::sys::cuMemPoolTrimTo(pool, 0);
        }
    }
    Ok(())
}

/// The best device available: CUDA 0, then Metal, then the CPU.
///
/// A GPU that fails to open is logged and skipped.
#[must_use]
pub fn best_available() -> Device {
    if candle_core::utils::cuda_is_available() {
        match cuda(0) {
            Ok(d) => return d,
            Err(e) => tracing::warn!("CUDA is compiled in but unusable, using the CPU: {e}"),
        }
    }
    if candle_core::utils::metal_is_available() {
        match Device::new_metal(0) {
            Ok(d) => return d,
            Err(e) => tracing::warn!("Metal is compiled in but unusable, using the CPU: {e}"),
        }
    }
    Device::Cpu
}

/// Parses a device name: `cpu`, `cuda`, `cuda:N`, `metal`, or `auto`.
///
/// # Errors
/// Fails on an unknown name or an unavailable device.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(best_available()),
        "cuda" => cuda(0),
        "metal" => Ok(Device::new_metal(0)?),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(Error::InvalidInput(format!(
                "unknown device `{other}` (expected cpu, cuda, cuda:N, metal or auto)"
            ))),
        },
    }
}

/// The dtype weights are kept in by default: f32 on the CPU (Candle's CPU
/// bf16 matmuls are slow and inexact), bf16 on CUDA, f32 on Metal (untested).
#[must_use]
pub fn default_dtype(device: &Device) -> DType {
    match device {
        Device::Cuda(_) => DType::BF16,
        _ => DType::F32,
    }
}

/// Parses a dtype name: `f32`, `f16`, `bf16`.
///
/// # Errors
/// Fails on any other name.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::InvalidInput(format!(
            "unknown dtype `{other}` (expected f32, f16 or bf16)"
        ))),
    }
}

/// Waits until all queued work on `device` has finished: call before reading
/// a clock in benchmarks, since GPU work is asynchronous.
///
/// # Errors
/// Fails if the device reports an error.
pub fn synchronize(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// `(free, total)` bytes of the GPU behind `device`, or `None` on the CPU.
///
/// # Errors
/// Fails if the driver query fails.
pub fn device_memory(device: &Device) -> Result<Option<(usize, usize)>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let info = d
            .cuda_stream()
            .context()
            .mem_get_info()
            .map_err(|e| Error::Candle(candle_core::Error::Cuda(Box::new(e))))?;
        return Ok(Some(info));
    }
    let _ = device;
    Ok(None)
}
