//! With the `cuda` feature, compiles our CUDA kernels (src/backend/kernels/*.cu)
//! to PTX with nvcc for `CUDA_COMPUTE_CAP` (default 90: H100/H200). The PTX is
//! embedded in the library and loaded at run time through Candle's
//! custom-function API.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/backend/kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // One entry per kernel file.
    const KERNELS: &[&str] = &["rms_norm"];
    for kernel in KERNELS {
        let src = format!("src/backend/kernels/{kernel}.cu");
        let ptx = out.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=sm_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {} ({e}); with the `cuda` feature, nvcc is needed (source ../shared/cuda/toolkit.sh)", nvcc.display())
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
