//! Devices and the dtype policy; later, our own kernels.
//!
//! CPU is always available. CUDA needs the `cuda` feature and an NVIDIA GPU.
//! Metal needs the `metal` feature: it forwards to Candle's Metal backend and
//! is **untested** on this project's machines (no Apple hardware).

pub use candle_core::{DType, Device};

pub(crate) mod autograd;
pub mod kernels;

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
    Ok(Device::new_cuda(ordinal)?)
}

/// The best device available: CUDA 0, then Metal, then the CPU.
///
/// A GPU that fails to open is logged and skipped.
#[must_use]
pub fn best_available() -> Device {
    if candle_core::utils::cuda_is_available() {
        match Device::new_cuda(0) {
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
