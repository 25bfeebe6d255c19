//! The CPU side of every kernel: one dtype trait and one dispatch, so an op's
//! CPU path is a single generic function instead of one match arm per dtype
//! (the CPU counterpart of candle-nn's `Map1`/`Map2` and of `launch::launch`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, WithDType};

/// A storage dtype our kernels support (f32, bf16, f16). Kernels do their
/// math in f32 whatever the storage dtype, exactly as the CUDA side does
/// (`to_f`/`from_f` in `common.cuh`), so CPU and GPU round alike.
pub(crate) trait Float: WithDType + Send + Sync {
    /// The suffix of this dtype's CUDA entry points (`{base}_{SUFFIX}`),
    /// matching `FOR_EACH_FLOAT` in `common.cuh`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    const SUFFIX: &'static str;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Float for f32 {
    const SUFFIX: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl Float for half::f16 {
    const SUFFIX: &'static str = "f16";
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// `[2, ..shape of l]`: two results of an op stacked in its one output (a
/// custom op returns one tensor), e.g. swiglu's two gradients.
pub(crate) fn stacked(l: &Layout) -> candle_core::Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.dims());
    candle_core::Shape::from(dims)
}

/// Minimum elements before a CPU op spreads its rows over threads (below it
/// the hand-off costs more than it saves: a decode step's rows).
const PARALLEL_ELEMS: usize = 1 << 15;

/// Runs `f(row index, row)` over the rows of `n` elements of `out`, spread
/// over rayon's threads (as Candle's CPU norms) when there is enough work.
pub(crate) fn for_rows<T: Float>(out: &mut [T], n: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    use rayon::prelude::*;
    let n = n.max(1);
    if out.len() >= PARALLEL_ELEMS {
        out.par_chunks_mut(n)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(i, row)| f(i, row));
    }
}

/// An op's CPU body, written once for every [`Float`]. `inputs` are the
/// contiguous element slices of the op's inputs, in order; `layout` is the
/// first input's (ops read their row length from it).
pub(crate) trait CpuOp {
    /// Name used in error messages.
    const NAME: &'static str;

    fn run<T: Float>(&self, inputs: &[&[T]], layout: &Layout) -> candle_core::Result<Vec<T>>;
}

/// Runs `op` on `inputs` at their common dtype: checks that every input has
/// that dtype and is contiguous, and wraps the result as storage.
///
/// # Errors
/// Mixed or unsupported dtypes, non-contiguous inputs, or the op's own error.
pub(crate) fn cpu_map<O: CpuOp>(
    op: &O,
    inputs: &[(&CpuStorage, &Layout)],
) -> candle_core::Result<CpuStorage> {
    let Some(&(first, layout)) = inputs.first() else {
        candle_core::bail!("{}: no inputs", O::NAME);
    };
    let dtype = first.dtype();
    if let Some((s, _)) = inputs.iter().find(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!("{}: mixed dtypes {dtype:?} and {:?}", O::NAME, s.dtype());
    }
    match dtype {
        DType::F32 => run::<f32, O>(op, inputs, layout),
        DType::BF16 => run::<half::bf16, O>(op, inputs, layout),
        DType::F16 => run::<half::f16, O>(op, inputs, layout),
        other => candle_core::bail!("{}: unsupported dtype {other:?}", O::NAME),
    }
}

fn run<T: Float, O: CpuOp>(
    op: &O,
    inputs: &[(&CpuStorage, &Layout)],
    layout: &Layout,
) -> candle_core::Result<CpuStorage> {
    let mut slices = Vec::with_capacity(inputs.len());
    for &(s, l) in inputs {
        slices.push(contiguous::<T>(s, l, O::NAME)?);
    }
    Ok(T::to_cpu_storage_owned(op.run(&slices, layout)?))
}

/// The elements a contiguous layout covers (`name` for errors).
///
/// # Errors
/// A layout that is not contiguous or lies outside the storage, or a
/// storage of another dtype.
pub(crate) fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    name: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{name}: input must be contiguous");
    };
    match T::cpu_storage_as_slice(s)?.get(a..b) {
        Some(v) => Ok(v),
        None => candle_core::bail!("{name}: layout {a}..{b} is outside its storage"),
    }
}
