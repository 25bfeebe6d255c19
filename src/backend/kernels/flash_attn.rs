//! Fused attention, FlashAttention-2 style: `softmax(q kᵀ·scale + bias) v`
//! with causal and sliding-window masks decided in the kernel, with a fused
//! backward.
//!
//! The composed attention (`layers::attention`) materialises the
//! `[b, heads, s, t]` scores in f32, a mask of the same size, and for
//! training the probabilities and their gradient: memory and time grow with
//! `s·t`. The CUDA kernel (`flash_attn.cu`) keeps one tile of scores in
//! registers with an online softmax, so it reads q, k, v once and writes the
//! output and one log-sum-exp per row; the backward recomputes the
//! probabilities from that log-sum-exp. The CPU path is the same math written
//! plainly in f32 (the reference, and what runs without a GPU).
//!
//! Masked keys: causal and window masks are flags (keys outside are skipped);
//! padding and position biases come as an additive f32 `bias`. With a bias,
//! scores are floored at [`SCORE_FLOOR`], so a padding mask of `f32::MIN`
//! gives a row whose keys are all padding the uniform weights the composed
//! path gives it (finite, never NaN). A row that sees no key at all through
//! the flags gives zeros.

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor};

use super::cpu::{cpu_map, CpuOp, Float};

/// Head dims the CUDA kernel is instantiated for.
const HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// Head dims of the f32 forward (the encoders').
const F32_HEAD_DIMS: [usize; 2] = [32, 64];

/// Lowest score (natural-log units, after scale and bias) when there is a
/// bias: the kernel's `SCORE_FLOOR` (-16384 in log2 units). Far below any
/// real score, so masked keys weigh `exp(floor - max) = 0`, yet small
/// enough that an all-padding row's log-sum-exp keeps its `log(n)`.
const SCORE_FLOOR: f32 = -16384.0 * std::f32::consts::LN_2;

/// Whether [`flash_attention`] runs its CUDA kernel for these inputs: a CUDA
/// device (and the `cuda` feature), bf16 or f16 for all three, rank 4 with
/// head dim 32, 64 or 128. Other inputs work on the CPU path, or should take
/// the composed attention.
#[must_use]
pub fn flash_attention_supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    inputs_fit(q, k, v, flash_attention_available)
}

/// q, k, v of one dtype, all rank 4, and `available` for q's device, dtype
/// and head width.
fn inputs_fit(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    available: fn(&candle_core::Device, DType, usize) -> bool,
) -> bool {
    q.rank() == 4
        && available(q.device(), q.dtype(), q.dims()[3])
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && [k, v].iter().all(|x| x.rank() == 4)
}

/// Whether q/k/v of this device, dtype and head width take the kernel
/// (the device/dtype/width part of [`flash_attention_supported`]): a model
/// asks before its forward so it can skip building the dense mask only
/// the composed path reads (`s²` values made on the host).
#[must_use]
pub fn flash_attention_available(
    device: &candle_core::Device,
    dtype: DType,
    head_dim: usize,
) -> bool {
    cfg!(feature = "cuda")
        && device.is_cuda()
        && matches!(dtype, DType::BF16 | DType::F16)
        && HEAD_DIMS.contains(&head_dim)
}

/// Whether the CUDA inference forward ([`flash_attention_merged`],
/// [`flash_attention_packed`]) runs for inputs of this device, dtype and
/// head width: where [`flash_attention_available`] holds, and for f32 with
/// head dim 32 or 64 (the encoders'), which runs on f32 FMAs, without a
/// backward or the decode kernels.
#[must_use]
pub(crate) fn flash_forward_available(
    device: &candle_core::Device,
    dtype: DType,
    head_dim: usize,
) -> bool {
    flash_attention_available(device, dtype, head_dim)
        || (cfg!(feature = "cuda")
            && device.is_cuda()
            && dtype == DType::F32
            && F32_HEAD_DIMS.contains(&head_dim))
}

/// [`flash_attention_supported`] for the inference forward
/// ([`flash_forward_available`]).
#[must_use]
pub(crate) fn flash_forward_supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    inputs_fit(q, k, v, flash_forward_available)
}

/// `softmax(q kᵀ · scale + bias + masks) v`, fused.
///
/// - `q`: `[b, heads, s, d]`; `k`, `v`: `[b, kv_heads, t, d]`, `heads` a
///   multiple of `kv_heads` (query head `h` uses key/value head
///   `h / (heads / kv_heads)`). Any layout: made contiguous here, except
///   that the CUDA inference forwards ([`flash_attention_merged`],
///   [`flash_attention_packed`]) read views with a contiguous head dim in
///   place.
/// - `bias`: optional, any float dtype (used as f32), broadcastable to
///   `[b, heads, s, t]`, e.g. a padding mask `[b, 1, s, t]` (0 or a large
///   negative such as `f32::MIN`) or a relative position bias
///   `[1 or b, heads, s, t]`. Not differentiated.
/// - `causal`: query `i` sits at position `i + t - s` (the last `s` of `t`
///   positions, as after a KV cache) and sees keys `j <= i + t - s`.
/// - `window`: `Some(w)` also hides keys with `(i + t - s) - j >= w`
///   (transformers' sliding window, counted in key slots).
///
/// Returns `[b, heads, s, d]` in the input dtype; scores and softmax are f32.
/// Differentiable with respect to `q`, `k` and `v` (for grouped-query
/// attention the key/value gradients are summed over each group).
///
/// Runs the CUDA kernel where [`flash_attention_supported`] holds and the
/// f32 reference on the CPU.
///
/// # Errors
/// Mismatched shapes or dtypes, a bias that does not broadcast, `window` of
/// `Some(0)`, or a CUDA input the kernel does not take (f32, other head
/// dims: use the composed attention there).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    causal: bool,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    let op = flash_op(q, k, v, bias, scale, causal, window, false)?;
    apply_flash(op, q, k, v)
}

/// Runs `op` (from [`flash_op`]) on q, k and v: a graph node with a
/// backward, unless it writes the merged layout (inference).
fn apply_flash(op: FlashAttn, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let on_cuda = q.device().is_cuda();
    if op.p.out_bshd && on_cuda && op.p.dims.s > 1 {
        // The inference forward reads views in place (no backward to feed).
        // One query row may take the split-key decode kernels, which read
        // contiguous rows: those inputs are made contiguous below.
        let (q, k, v) = strided_inputs(q, k, v)?;
        return q.apply_op3_no_bwd(&k, &v, &op);
    }
    let (q, k, v) = (input(q, on_cuda)?, input(k, on_cuda)?, input(v, on_cuda)?);
    if op.p.out_bshd {
        q.apply_op3_no_bwd(&k, &v, &op)
    } else {
        q.apply_op3(&k, &v, op)
    }
}

/// The checked op for [`apply_flash`] and [`flash_attention_taped`].
#[allow(clippy::too_many_arguments)]
fn flash_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    causal: bool,
    window: Option<usize>,
    out_bshd: bool,
) -> candle_core::Result<FlashAttn> {
    let dims = Dims::new(q, k, v)?;
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!(
            "flash_attention: q, k, v are {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    // The merged layout is the inference forward's, which also takes f32.
    let supported = if out_bshd {
        flash_forward_supported(q, k, v)
    } else {
        flash_attention_supported(q, k, v)
    };
    if q.device().is_cuda() && !supported {
        candle_core::bail!(
            "flash_attention: the CUDA kernel takes bf16/f16 with head dim 32, 64 or 128 \
             (for inference also f32 with 32 or 64), not {:?} with {} (use layers::attention)",
            q.dtype(),
            dims.d
        );
    }
    let window = window_keys(window, dims.t)?;
    let bias = bias
        .map(|b| dims.bias(&b.to_device(q.device())?))
        .transpose()?;
    Ok(FlashAttn {
        p: Params {
            dims,
            bias,
            scale: scale as f32,
            causal,
            window,
            out_bshd,
            keys: None,
            packed: None,
        },
        lse: Mutex::new(None),
    })
}

/// What [`flash_attention_taped`]'s backward needs: the op (which holds
/// the forward's log-sum-exp), its inputs and output.
pub(crate) struct FlashTape {
    op: FlashAttn,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
}

/// [`flash_attention`] outside the autograd graph, for a caller that
/// writes its own backward ([`FlashTape::backward`]): the output
/// `[b, heads, s, d]` and the tape.
///
/// # Errors
/// As [`flash_attention`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn flash_attention_taped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    causal: bool,
    window: Option<usize>,
) -> candle_core::Result<(Tensor, FlashTape)> {
    let op = flash_op(q, k, v, bias, scale, causal, window, false)?;
    let on_cuda = q.device().is_cuda();
    let (q, k, v) = (
        input(&q.detach(), on_cuda)?,
        input(&k.detach(), on_cuda)?,
        input(&v.detach(), on_cuda)?,
    );
    let o = q.apply_op3_no_bwd(&k, &v, &op)?;
    Ok((o.clone(), FlashTape { op, q, k, v, o }))
}

impl FlashTape {
    /// The shape of q (and of the output).
    pub(crate) fn q_dims(&self) -> &[usize] {
        self.q.dims()
    }

    /// `(dq, dk, dv)` for the output gradient `d_o` (`[b, heads, s, d]`),
    /// shaped as q, k and v.
    ///
    /// # Errors
    /// Shape mismatch, backend errors.
    pub(crate) fn backward(&self, d_o: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (dq, dk, dv) = candle_core::CustomOp3::bwd(
            &self.op,
            &self.q,
            &self.k,
            &self.v,
            &self.o,
            &d_o.detach(),
        )?;
        match (dq, dk, dv) {
            (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
            _ => candle_core::bail!("flash_attention backward: a gradient is missing"),
        }
    }
}

/// [`flash_attention`] for inference with the heads merged: the output as
/// `[b, s, hq · d]`, ready for the output projection, written so by the
/// kernel (the `[b, hq, s, d]` result would need a transposing copy, 15% of
/// an encoder forward's GPU time on an H200). No backward: for inputs that
/// track gradients use [`flash_attention`] (`layers::attention` picks).
///
/// # Errors
/// As [`flash_attention`].
pub fn flash_attention_merged(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    causal: bool,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    let (b, hq, s, d) = q.dims4()?;
    // The CUDA kernel writes the merged layout itself; the CPU path
    // transposes after.
    let in_kernel = q.device().is_cuda();
    let op = flash_op(q, k, v, bias, scale, causal, window, in_kernel)?;
    let o = apply_flash(op, q, k, v)?;
    let o = if in_kernel { o } else { o.transpose(1, 2)? };
    o.reshape((b, s, hq * d))
}

/// The kernel's window argument: keys per window, 0 for none.
fn window_keys(window: Option<usize>, t: usize) -> candle_core::Result<usize> {
    Ok(match window {
        Some(0) => candle_core::bail!("flash_attention: a window of 0 keys hides everything"),
        // A query is at most t - 1 positions after key 0, so a window of t
        // or more hides nothing: no window (which also keeps the kernel's
        // int arithmetic on window edges far from overflow).
        Some(w) if w < t => w,
        _ => 0,
    })
}

/// [`flash_attention_merged`] over a preallocated cache: `k` and `v` are
/// `[b, kv_heads, capacity, d]` of which the first `keys` rows are keys
/// (`keys`: a u32 `[1]` tensor on the same CUDA device, read by the kernel
/// when it runs), the queries the last `s` of them. The launch does not
/// depend on the count, so a decode step captured in a CUDA graph replays
/// at every length. CUDA, bf16/f16, inference only.
///
/// # Errors
/// As [`flash_attention`]; `keys` not a u32 `[1]` CUDA tensor.
pub fn flash_attention_cached(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keys: &Tensor,
    scale: f64,
    causal: bool,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    let dims = Dims::new(q, k, v)?;
    if !q.device().is_cuda() || !flash_attention_supported(q, k, v) {
        candle_core::bail!("flash_attention_cached: CUDA bf16/f16 with head dim 32, 64 or 128");
    }
    if keys.dtype() != DType::U32 || keys.dims() != [1] || !keys.device().same_device(q.device()) {
        candle_core::bail!("flash_attention_cached: keys must be a u32 [1] tensor on q's device");
    }
    let window = window_keys(window, dims.t)?;
    let (b, hq, s, d) = q.dims4()?;
    let op = FlashAttn {
        p: Params {
            dims,
            bias: None,
            scale: scale as f32,
            causal,
            window,
            out_bshd: true,
            keys: Some(keys.contiguous()?),
            packed: None,
        },
        lse: Mutex::new(None),
    };
    let (q, k, v) = (input(q, true)?, input(k, true)?, input(v, true)?);
    q.apply_op3_no_bwd(&k, &v, &op)?.reshape((b, s, hq * d))
}

/// Query rows per tile of the CUDA forward (`FwdCfg<D>::BM`).
const FWD_TILE: usize = 64;

/// The device index [`flash_attention_packed`] reads for sequences packed
/// end to end at token `offsets` (`offsets[0] = 0`, one more entry than
/// sequences, non-decreasing): the offsets, then the prefix sums of each
/// sequence's query tiles (u32, `2 · offsets.len()` values). Made once per
/// batch and shared by every layer.
///
/// # Errors
/// Offsets that are not as described or do not fit u32; upload failures.
pub fn flash_packed_index(
    offsets: &[usize],
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[1] < w[0]) {
        candle_core::bail!("flash_attention_packed: offsets must start at 0 and not decrease");
    }
    let mut index = Vec::with_capacity(2 * offsets.len());
    let mut tiles = 0usize;
    let mut tile_index = Vec::with_capacity(offsets.len());
    tile_index.push(0);
    for w in offsets.windows(2) {
        tiles += (w[1] - w[0]).div_ceil(FWD_TILE);
        tile_index.push(tiles);
    }
    for &x in offsets.iter().chain(&tile_index) {
        index.push(u32::try_from(x).map_err(|_| {
            candle_core::Error::Msg(format!("flash_attention_packed: offset {x} too large"))
        })?);
    }
    let n = index.len();
    Tensor::from_vec(index, n, device)
}

/// Attention over sequences packed end to end (the variable-length batches
/// of text-embeddings-inference): `q`, `k`, `v` are `[1, heads, tokens, d]`
/// (`heads` a multiple of `k`'s), sequence `i` holding tokens
/// `offsets[i]..offsets[i + 1]` and attending (bidirectionally) to those
/// only; `index` is [`flash_packed_index`] of the same offsets. `bias`
/// (optional, f32, broadcastable to `[1, heads, n, n]` for some `n` at
/// least the longest sequence) is indexed by row and column within each
/// sequence, e.g. MPNet's relative position bias. Returns `[tokens, heads
/// · d]`: heads merged. CUDA bf16/f16 with head dim 32, 64 or 128, or f32
/// with 32 or 64; inference only. Padding costs nothing:
/// no padded token is read or computed.
///
/// # Errors
/// Inputs the kernel does not take, mismatched shapes, offsets that do not
/// end at `tokens`, a bias smaller than the longest sequence.
pub fn flash_attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offsets: &[usize],
    index: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let dims = Dims::new(q, k, v)?;
    if !q.device().is_cuda() || !flash_forward_supported(q, k, v) {
        candle_core::bail!(
            "flash_attention_packed: CUDA bf16/f16 with head dim 32, 64 or 128, or f32 with 32 or 64"
        );
    }
    let n = offsets.len().saturating_sub(1);
    if dims.b != 1 || dims.s != dims.t || offsets.last() != Some(&dims.s) || n == 0 {
        candle_core::bail!(
            "flash_attention_packed: q {:?} is not [1, heads, tokens, d] for offsets ending at {:?}",
            q.dims(),
            offsets.last()
        );
    }
    if index.dtype() != DType::U32
        || index.dims() != [2 * offsets.len()]
        || !index.device().same_device(q.device())
    {
        candle_core::bail!(
            "flash_attention_packed: index is not flash_packed_index of the offsets"
        );
    }
    let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let bias = match bias {
        Some(b) => {
            let side = b.dims().last().copied().unwrap_or(0);
            if b.rank() != 4 || b.dim(2)? != side || side < longest {
                candle_core::bail!(
                    "flash_attention_packed: bias {:?} is not [1, heads or 1, n, n] with n >= {longest}",
                    b.dims()
                );
            }
            let b = b.detach().to_dtype(DType::F32)?;
            let b = b.broadcast_as((1, dims.hq, side, side))?;
            Some(if b.stride()[3] != 1 {
                b.contiguous()?
            } else {
                b
            })
        }
        None => None,
    };
    let tiles = offsets
        .windows(2)
        .map(|w| (w[1] - w[0]).div_ceil(FWD_TILE))
        .sum::<usize>();
    let op = FlashAttn {
        p: Params {
            dims,
            bias,
            scale: scale as f32,
            causal: false,
            window: 0,
            out_bshd: true,
            keys: None,
            packed: Some((index.contiguous()?, n, tiles)),
        },
        lse: Mutex::new(None),
    };
    let (q, k, v) = strided_inputs(q, k, v)?;
    q.apply_op3_no_bwd(&k, &v, &op)?
        .reshape((dims.s, dims.hq * dims.d))
}

/// q, k, v for the CUDA forward, which reads `[b, h, rows, d]` views in
/// place when the head dim is contiguous, every stride is a multiple of 8
/// elements and the view starts on a 16-byte boundary (the kernel loads
/// rows with 16-byte copies), and k and v share their strides: the q/k/v
/// views of one fused projection `[b, s, 3, h, d]` cost no copy. Anything
/// else is made contiguous ([`input`]).
fn strided_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    fn readable(x: &Tensor) -> bool {
        let l = x.layout();
        let st = l.stride();
        x.rank() == 4
            && st[3] == 1
            && st[..3].iter().all(|s| s.is_multiple_of(8))
            && (l.start_offset() * x.dtype().size_in_bytes()).is_multiple_of(16)
    }
    let q = if readable(q) {
        q.clone()
    } else {
        input(q, true)?
    };
    if readable(k) && readable(v) && k.stride() == v.stride() {
        return Ok((q, k.clone(), v.clone()));
    }
    Ok((q, input(k, true)?, input(v, true)?))
}

/// Contiguous, and on CUDA starting on a 16-byte boundary (the kernel loads
/// rows with 16-byte copies); a view at another offset is copied.
fn input(x: &Tensor, on_cuda: bool) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let aligned = x.layout().start_offset() * x.dtype().size_in_bytes() % 16 == 0;
    if on_cuda && !aligned {
        x.force_contiguous()
    } else {
        Ok(x)
    }
}

/// The problem's sizes, checked once.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    s: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Self> {
        let (b, hq, s, d) = q.dims4()?;
        let (bk, hkv, t, dk) = k.dims4()?;
        if v.dims() != k.dims() || bk != b || dk != d {
            candle_core::bail!(
                "flash_attention: q {:?}, k {:?}, v {:?} are not [b, heads, s, d], \
                 [b, kv_heads, t, d], [b, kv_heads, t, d]",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if hkv == 0 || hq % hkv != 0 {
            candle_core::bail!("flash_attention: {hq} query heads for {hkv} key/value heads");
        }
        Ok(Self {
            b,
            hq,
            hkv,
            s,
            t,
            d,
        })
    }

    fn q_elems(&self) -> usize {
        self.b * self.hq * self.s * self.d
    }

    fn kv_elems(&self) -> usize {
        self.b * self.hkv * self.t * self.d
    }

    /// `bias` as f32 broadcast to `[b, hq, s, t]`, last dim contiguous (the
    /// kernel's layout: strides per batch, head and row, 0 where broadcast).
    fn bias(&self, bias: &Tensor) -> candle_core::Result<Tensor> {
        let full = (self.b, self.hq, self.s, self.t);
        let bias = bias.detach().to_dtype(DType::F32)?.broadcast_as(full)?;
        if self.t > 1 && bias.stride()[3] != 1 {
            // A broadcast or transposed last dim: materialise it.
            bias.contiguous()
        } else {
            Ok(bias)
        }
    }
}

/// What forward and backward share: sizes, bias and masks.
#[derive(Debug, Clone)]
struct Params {
    dims: Dims,
    /// f32 `[b, hq, s, t]` view (see [`Dims::bias`]).
    bias: Option<Tensor>,
    scale: f32,
    causal: bool,
    /// Keys per window, 0 for none.
    window: usize,
    /// The output as `[b, s, hq, d]` instead of `[b, hq, s, d]`
    /// ([`flash_attention_merged`]; forward only, CUDA only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    out_bshd: bool,
    /// For [`flash_attention_cached`]: a u32 `[1]` CUDA tensor holding how
    /// many of the `t` key rows are keys (read by the kernel).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    keys: Option<Tensor>,
    /// For [`flash_attention_packed`]: the sequences' index
    /// ([`flash_packed_index`]), their count and the forward's tiles.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    packed: Option<(Tensor, usize, usize)>,
}

impl Params {
    /// Whether key `j` is visible from query row `i`.
    fn visible(&self, i: usize, j: usize) -> bool {
        // Absolute position of query i: i + t - s (may be negative when s > t).
        let qpos = i as i64 + self.dims.t as i64 - self.dims.s as i64;
        let j = j as i64;
        (!self.causal || j <= qpos) && (self.window == 0 || qpos - j < self.window as i64)
    }

    /// Runs `f` with the bias values (CPU), if any.
    fn with_cpu_bias<R>(
        &self,
        f: impl FnOnce(Option<CpuBias<'_>>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Some(bias) = &self.bias else {
            return f(None);
        };
        let (storage, layout) = bias.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
            candle_core::bail!("flash_attention: the bias is not an f32 CPU tensor");
        };
        let st = layout.stride();
        f(Some(CpuBias {
            data: &data[layout.start_offset()..],
            strides: [st[0], st[1], st[2], st[3]],
        }))
    }

    /// Softmax weights of query row `i` of head `h`, batch `bi` (f32, length
    /// t; all zero when no key is visible). `q` and `k` are the whole inputs.
    fn probs<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        bias: Option<&CpuBias<'_>>,
        (bi, h, i): (usize, usize, usize),
    ) -> Vec<f32> {
        let Dims {
            hq, hkv, s, t, d, ..
        } = self.dims;
        let hk = h / (hq / hkv);
        let qi = &q[((bi * hq + h) * s + i) * d..][..d];
        let kb = &k[(bi * hkv + hk) * t * d..][..t * d];
        let mut x = vec![f32::NEG_INFINITY; t];
        for (j, (xj, kj)) in x.iter_mut().zip(kb.chunks(d)).enumerate() {
            if !self.visible(i, j) {
                continue;
            }
            let dot: f32 = qi
                .iter()
                .zip(kj)
                .map(|(a, b)| a.to_f32() * b.to_f32())
                .sum();
            *xj = dot * self.scale;
            if let Some(bias) = bias {
                *xj = (*xj + bias.at(bi, h, i, j)).max(SCORE_FLOOR);
            }
        }
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return vec![0.0; t];
        }
        let mut p: Vec<f32> = x.iter().map(|&xj| (xj - max).exp()).collect();
        let sum: f32 = p.iter().sum();
        p.iter_mut().for_each(|pj| *pj /= sum);
        p
    }
}

/// A CPU bias with its element strides over `[b, hq, s, t]`.
struct CpuBias<'a> {
    data: &'a [f32],
    strides: [usize; 4],
}

impl CpuBias<'_> {
    fn at(&self, b: usize, h: usize, i: usize, j: usize) -> f32 {
        let [sb, sh, si, sj] = self.strides;
        self.data[b * sb + h * sh + i * si + j * sj]
    }
}

/// The forward op. The CUDA forward leaves the log-sum-exp of each row here
/// for the backward (a custom op returns one tensor); the CPU backward
/// recomputes what it needs instead.
struct FlashAttn {
    p: Params,
    lse: Mutex<Option<Tensor>>,
}

impl CpuOp for FlashAttn {
    const NAME: &'static str = "flash_attention";

    /// Inputs `[q, k, v]`; output `[b, hq, s, d]`.
    fn run<T: Float>(&self, inputs: &[&[T]], _: &Layout) -> candle_core::Result<Vec<T>> {
        let &[q, k, v] = inputs else {
            candle_core::bail!("flash_attention: expected q, k and v");
        };
        let Dims {
            b,
            hq,
            hkv,
            s,
            t,
            d,
        } = self.p.dims;
        self.p.with_cpu_bias(|bias| {
            let mut out = Vec::with_capacity(q.len());
            let mut row = vec![0f32; d];
            for bi in 0..b {
                for h in 0..hq {
                    let vb = &v[(bi * hkv + h / (hq / hkv)) * t * d..][..t * d];
                    for i in 0..s {
                        let p = self.p.probs(q, k, bias.as_ref(), (bi, h, i));
                        row.fill(0.0);
                        for (pj, vj) in p.iter().zip(vb.chunks(d)) {
                            if *pj != 0.0 {
                                row.iter_mut()
                                    .zip(vj)
                                    .for_each(|(o, x)| *o += pj * x.to_f32());
                            }
                        }
                        out.extend(row.iter().map(|&o| T::from_f32(o)));
                    }
                }
            }
            Ok(out)
        })
    }
}

impl candle_core::CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "metal-candle-flash-attention"
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
        Ok((out, l1.shape().clone()))
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
        let (out, lse) = cuda::forward(&self.p, (s1, l1), (s2, l2), (s3, l3))?;
        *self.lse.lock().unwrap_or_else(PoisonError::into_inner) = Some(lse);
        let Dims { b, hq, s, d, .. } = self.p.dims;
        let shape = if self.p.out_bshd {
            Shape::from((b, s, hq, d))
        } else {
            l1.shape().clone()
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if q.device().is_cuda() && lse.is_none() {
            candle_core::bail!("flash_attention backward: the forward left no log-sum-exp");
        }
        let op = FlashAttnBackward {
            p: self.p.clone(),
            o: o.contiguous()?,
            d_o: input(d_o, q.device().is_cuda())?,
            lse,
        };
        let grads = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (self.p.dims.q_elems(), self.p.dims.kv_elems());
        Ok((
            Some(grads.narrow(0, 0, nq)?.reshape(q.shape())?),
            Some(grads.narrow(0, nq, nk)?.reshape(k.shape())?),
            Some(grads.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
        ))
    }
}

/// The backward op: inputs q, k, v; output dq, dk, dv flattened and stacked
/// in one `[nq + 2·nk]` tensor (a custom op returns one tensor).
struct FlashAttnBackward {
    p: Params,
    /// The forward's output (CUDA only: the kernel's rowsum(dO∘O)).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    o: Tensor,
    d_o: Tensor,
    /// The forward's log-sum-exp (CUDA only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lse: Option<Tensor>,
}

impl CpuOp for FlashAttnBackward {
    const NAME: &'static str = "flash_attention backward";

    /// The reference gradients: probabilities recomputed per row in f32,
    /// `dP = dO·vᵀ`, `dS = P∘(dP − rowsum(P∘dP))`, `dq = dS·k·scale`,
    /// `dk = dSᵀ·q·scale`, `dv = Pᵀ·dO`.
    fn run<T: Float>(&self, inputs: &[&[T]], _: &Layout) -> candle_core::Result<Vec<T>> {
        let &[q, k, v] = inputs else {
            candle_core::bail!("flash_attention backward: expected q, k and v");
        };
        let Dims {
            b,
            hq,
            hkv,
            s,
            t,
            d,
        } = self.p.dims;
        let (storage, layout) = self.d_o.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("flash_attention backward: dO is not on the CPU");
        };
        let d_o = &T::cpu_storage_as_slice(storage)?[layout.start_offset()..][..q.len()];
        let scale = self.p.scale;
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        self.p.with_cpu_bias(|bias| {
            for bi in 0..b {
                for h in 0..hq {
                    let kv0 = (bi * hkv + h / (hq / hkv)) * t * d;
                    for i in 0..s {
                        let p = self.p.probs(q, k, bias.as_ref(), (bi, h, i));
                        let row = ((bi * hq + h) * s + i) * d;
                        let doi = &d_o[row..row + d];
                        let dp: Vec<f32> =
                            (0..t).map(|j| dot(doi, &v[kv0 + j * d..][..d])).collect();
                        let dsum: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                        for j in (0..t).filter(|&j| p[j] != 0.0) {
                            let ds = p[j] * (dp[j] - dsum) * scale;
                            let kj = kv0 + j * d;
                            for c in 0..d {
                                dq[row + c] += ds * k[kj + c].to_f32();
                                dk[kj + c] += ds * q[row + c].to_f32();
                                dv[kj + c] += p[j] * doi[c].to_f32();
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok(dq
            .into_iter()
            .chain(dk)
            .chain(dv)
            .map(T::from_f32)
            .collect())
    }
}

fn dot<T: Float>(a: &[T], b: &[T]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x.to_f32() * y.to_f32()).sum()
}

impl candle_core::CustomOp3 for FlashAttnBackward {
    fn name(&self) -> &'static str {
        "metal-candle-flash-attention-backward"
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
        let grads = cpu_map(self, &[(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((grads, self.stacked()))
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
        let Some(lse) = &self.lse else {
            candle_core::bail!("flash_attention backward: no log-sum-exp");
        };
        let grads = cuda::backward(
            &self.p,
            [(s1, l1), (s2, l2), (s3, l3)],
            &self.o,
            &self.d_o,
            lse,
        )?;
        Ok((grads, self.stacked()))
    }
}

impl FlashAttnBackward {
    fn stacked(&self) -> Shape {
        Shape::from(self.p.dims.q_elems() + 2 * self.p.dims.kv_elems())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launches of `flash_attn.cu` (see its header for the kernels' contract).

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Layout, Storage, Tensor};

    use super::super::cpu::Float;
    use super::super::launch::{elementwise_config, ptx};
    use super::{Dims, Params};

    type Input<'a> = (&'a CudaStorage, &'a Layout);

    /// Threads per block of the attention kernels (4 warps).
    const THREADS: u32 = 128;
    /// Query rows per forward block and keys per backward block.
    const TILE: usize = super::FWD_TILE;

    /// Dynamic shared memory of the forward: `FwdCfg<D>::SMEM` in
    /// flash_attn.cu (Q tile and `MAX_STAGES` K and V tiles of 64 rows, two
    /// at d = 32, rows padded by 8 elements), `FwdCfgF32<D>::SMEM` for f32.
    /// The kernel traps if it gets less than it needs.
    fn fwd_smem(d: usize, dtype: DType) -> usize {
        if dtype == DType::F32 {
            // `FwdCfgF32<D>::SMEM`: Q, K and V tiles with rows padded by 4
            // floats, and P (64 x 64, rows padded by 8).
            return ((3 * TILE) * (d + 4) + TILE * (TILE + 8)) * 4;
        }
        let stages = if d == 32 { 2 } else { 1 };
        (TILE + 2 * stages * TILE) * (d + 8) * 2
    }

    /// Whether an unbiased forward takes `flash_attn_fwd_nb_*` (register-
    /// capped for more blocks per SM); `METAL_CANDLE_FLASH_NB=0` takes the
    /// combined entry instead (an A/B switch).
    fn no_bias_entry() -> bool {
        static NB: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *NB.get_or_init(|| std::env::var("METAL_CANDLE_FLASH_NB").as_deref() != Ok("0"))
    }

    /// `BwdCfg<D>::SMEM`: K and V tiles, double-buffered Q and dO tiles of
    /// `bm` rows, the dSᵀ tile and two f32 rows per query, twice.
    fn bwd_smem(d: usize) -> usize {
        let bm = if d <= 64 { 64 } else { 32 };
        (2 * TILE + 4 * bm) * (d + 8) * 2 + TILE * (bm + 8) * 2 + 4 * bm * 4
    }

    fn int(v: usize, what: &str) -> candle_core::Result<i32> {
        i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("flash_attention: {what} {v} too large")))
    }

    /// The kernel's int arguments and grid limits.
    struct Sizes {
        hq: i32,
        hkv: i32,
        s: i32,
        t: i32,
        window: i32,
    }

    fn sizes(p: &Params) -> candle_core::Result<Sizes> {
        let Dims {
            b, hq, hkv, s, t, ..
        } = p.dims;
        // gridDim.y and .z are at most 65535.
        if b > 65535 || hq > 65535 {
            candle_core::bail!("flash_attention: batch {b} or {hq} heads exceed a CUDA grid");
        }
        Ok(Sizes {
            hq: int(hq, "heads")?,
            hkv: int(hkv, "kv heads")?,
            s: int(s, "query length")?,
            t: int(t, "key length")?,
            // A window wider than i32 hides nothing.
            window: i32::try_from(p.window).unwrap_or(i32::MAX),
        })
    }

    /// `Strides` in flash_attn.cu: element strides per batch, head and row.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Strides {
        b: i64,
        h: i32,
        r: i32,
    }

    // SAFETY: laid out as the kernel's `struct { long long b; int h, r; }`.
    unsafe impl DeviceRepr for Strides {}

    /// A `[b, h, rows, d]` input (head dim contiguous, see
    /// [`super::strided_inputs`]) as its elements from the view's start and
    /// its strides; every element the strides reach lies in the storage.
    fn strided<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<(CudaView<'a, T>, Strides)> {
        let (dims, st) = (l.dims(), l.stride());
        if dims.len() != 4 || (st[3] != 1 && dims[3] > 1) {
            candle_core::bail!("flash_attention: {what} is not [b, h, rows, d] with d contiguous");
        }
        let slice = s.as_cuda_slice::<T>()?;
        let start = l.start_offset();
        let reach = if dims.contains(&0) {
            0
        } else {
            1 + dims
                .iter()
                .zip(st)
                .map(|(&n, &s)| (n - 1) * s)
                .sum::<usize>()
        };
        let Some(v) = slice.try_slice(start..start + reach) else {
            candle_core::bail!("flash_attention: {what} lies outside its storage");
        };
        // Within a batch the kernel's offsets (head · h + row · r, under
        // `reach`) are 32-bit.
        let batch_reach = reach.saturating_sub(dims[0].saturating_sub(1) * st[0]);
        if i32::try_from(batch_reach).is_err() {
            candle_core::bail!("flash_attention: {what} spans more than 2^31 elements per batch");
        }
        let narrow = |x: usize| i32::try_from(x).unwrap_or(i32::MAX);
        Ok((
            v,
            Strides {
                b: i64::try_from(st[0]).unwrap_or(i64::MAX),
                h: narrow(st[1]),
                r: narrow(st[2]),
            },
        ))
    }

    /// A contiguous input's elements.
    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        super::super::launch::view(s, l, &format!("flash_attention: {what}"))
    }

    fn storage_of<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a CudaStorage> {
        match s {
            Storage::Cuda(s) => Ok(s),
            _ => candle_core::bail!("flash_attention: {what} is not on the CUDA device"),
        }
    }

    /// The kernel `name`, for the device stream's launch builder.
    fn func(dev: &CudaDevice, name: &str, smem: usize) -> candle_core::Result<CudaFunction> {
        let f = dev.get_or_load_custom_func(name, ptx::FLASH_ATTN.name, ptx::FLASH_ATTN.ptx)?;
        if smem > 48 * 1024 {
            // Above 48 KiB a kernel must opt in to dynamic shared memory.
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                int(smem, "shared memory")?,
            )
            .w()?;
        }
        // Candle's wrapper type is private; the function itself is what the
        // stream's launch builder takes.
        Ok((*f).clone())
    }

    fn grid(tiles: usize, p: &Params, smem: usize) -> candle_core::Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (
                int(tiles, "tiles")? as u32,
                p.dims.hq as u32,
                p.dims.b as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }

    /// The bias argument: its element view (offset applied) and strides per
    /// batch, head and row; `None` without a bias (the kernel gets null).
    struct BiasArg<'a> {
        view: CudaView<'a, f32>,
        strides: [i64; 3],
    }

    fn bias_arg<'a>(s: &'a Storage, l: &Layout) -> candle_core::Result<BiasArg<'a>> {
        let s = storage_of(s, "the bias")?;
        let Some(view) = s.as_cuda_slice::<f32>()?.try_slice(l.start_offset()..) else {
            candle_core::bail!("flash_attention: bias offset outside its storage");
        };
        let st = l.stride();
        Ok(BiasArg {
            view,
            strides: [st[0] as i64, st[1] as i64, st[2] as i64],
        })
    }

    /// Forward: the output storage and the log-sum-exp tensor `[b, hq, s]`.
    pub(super) fn forward(
        p: &Params,
        q: Input<'_>,
        k: Input<'_>,
        v: Input<'_>,
    ) -> candle_core::Result<(CudaStorage, Tensor)> {
        match q.0.dtype() {
            DType::BF16 => forward_t::<half::bf16>(p, q, k, v),
            DType::F16 => forward_t::<half::f16>(p, q, k, v),
            DType::F32 => forward_t::<f32>(p, q, k, v),
            other => candle_core::bail!("flash_attention: no CUDA kernel for {other:?}"),
        }
    }

    fn forward_t<T: Float + CudaDType + DeviceRepr>(
        p: &Params,
        q: Input<'_>,
        k: Input<'_>,
        v: Input<'_>,
    ) -> candle_core::Result<(CudaStorage, Tensor)> {
        let Dims { b, hq, s, d, .. } = p.dims;
        let n = sizes(p)?;
        let dev = &q.0.device;
        let rows = b * hq * s;
        // SAFETY: the kernel writes every row of O and lse before anything
        // reads them. At least one element: CUDA refuses empty allocations.
        let out = unsafe { dev.alloc::<T>(p.dims.q_elems().max(1))? };
        let lse = unsafe { dev.alloc::<f32>(rows.max(1))? };
        // f32 has the tiled forward only.
        let half = q.0.dtype() != DType::F32;
        if rows > 0 && p.packed.is_none() && half && decodes(p) {
            let (qv, kv, vv) = (
                view::<T>(q.0, q.1, "q")?,
                view::<T>(k.0, k.1, "k")?,
                view::<T>(v.0, v.1, "v")?,
            );
            decode_t::<T>(p, (&qv, &kv, &vv), &out, &lse, dev)?;
        } else if rows > 0 {
            let (qv, kv, vv) = (
                strided::<T>(q.0, q.1, "q")?,
                strided::<T>(k.0, k.1, "k")?,
                strided::<T>(v.0, v.1, "v")?,
            );
            let smem = fwd_smem(d, q.0.dtype());
            let entry = match (p.packed.is_some(), p.bias.is_none() && no_bias_entry()) {
                (false, true) => "fwd_nb",
                (false, false) => "fwd",
                (true, true) => "fwd_packed_nb",
                (true, false) => "fwd_packed",
            };
            let f = func(dev, &format!("flash_attn_{entry}_d{d}_{}", T::SUFFIX), smem)?;
            let guard = p.bias.as_ref().map(Tensor::storage_and_layout);
            let bias = match &guard {
                Some((s, l)) => Some(bias_arg(s, l)?),
                None => None,
            };
            let null = 0u64;
            let zeros = [0i64; 3];
            let strides = bias.as_ref().map_or(&zeros, |b| &b.strides);
            let (scale, causal) = (p.scale, i32::from(p.causal));
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            l.arg(&qv.0).arg(&kv.0).arg(&vv.0);
            match &bias {
                Some(b) => l.arg(&b.view),
                None => l.arg(&null),
            };
            l.arg(&out).arg(&lse);
            l.arg(&n.hq).arg(&n.hkv).arg(&n.s).arg(&n.t).arg(&scale);
            l.arg(&causal).arg(&n.window);
            l.arg(&strides[0]).arg(&strides[1]).arg(&strides[2]);
            let o_bshd = i32::from(p.out_bshd);
            l.arg(&o_bshd);
            let keys_guard = p.keys.as_ref().map(Tensor::storage_and_layout);
            let keys = match &keys_guard {
                Some((s, l)) => Some(view::<u32>(storage_of(s, "keys")?, l, "keys")?),
                None => None,
            };
            match &keys {
                Some(k) => l.arg(k),
                None => l.arg(&null),
            };
            let packed_guard = p.packed.as_ref().map(|(i, ..)| i.storage_and_layout());
            let seqs = match &packed_guard {
                Some((s, l)) => Some(view::<u32>(storage_of(s, "index")?, l, "index")?),
                None => None,
            };
            match &seqs {
                Some(x) => l.arg(x),
                None => l.arg(&null),
            };
            let (nseq, tiles) = match &p.packed {
                Some((_, n, tiles)) => (int(*n, "sequences")?, *tiles),
                None => (0, s.div_ceil(TILE)),
            };
            l.arg(&nseq);
            if kv.1 != vv.1 {
                candle_core::bail!("flash_attention: k and v views with different strides");
            }
            l.arg(&qv.1).arg(&kv.1);
            let cfg = grid(tiles, p, smem)?;
            // SAFETY: arguments in the order and C types of
            // flash_attn_fwd_d{D}_{dtype}; sizes checked against the views.
            unsafe { l.launch(cfg) }.w()?;
        }
        let lse = CudaStorage::wrap_cuda_slice(lse, dev.clone());
        let lse = Tensor::from_storage(Storage::Cuda(lse), (b, hq, s), BackpropOp::none(), false);
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), lse))
    }

    /// Whether the split-key decode kernels take this forward: one query
    /// row per head over at least [`DECODE_MIN_KEYS`] key rows (below it the
    /// tiled forward's one launch was faster on an H200), no bias, at most
    /// 16 query heads per key/value head. `METAL_CANDLE_DECODE_KERNEL=0`
    /// never takes them, `=1` takes them from one key on (A/B runs).
    fn decodes(p: &Params) -> bool {
        static MODE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
        let mode = *MODE.get_or_init(|| match std::env::var("METAL_CANDLE_DECODE_KERNEL") {
            Ok(v) if v == "0" => Some(false),
            Ok(v) if v == "1" => Some(true),
            _ => None,
        });
        let Dims { s, t, hq, hkv, .. } = p.dims;
        let long = match mode {
            Some(on) => on,
            None => t >= DECODE_MIN_KEYS,
        };
        long && s == 1 && p.bias.is_none() && hq / hkv <= DECODE_GROUP_MAX
    }

    /// Key rows (the cache's capacity under a CUDA graph) from which a
    /// decode step takes the split-key kernels.
    const DECODE_MIN_KEYS: usize = 512;

    /// Keys per split block and the most query heads per key/value head
    /// (`DEC_CH`, `DEC_GMAX` in flash_attn.cu).
    const DECODE_KEYS: usize = 128;
    const DECODE_GROUP_MAX: usize = 16;

    /// The decode forward (`flash_decode_*` then `flash_decode_combine_*`):
    /// O and lse for `s = 1`.
    fn decode_t<T: Float + CudaDType + DeviceRepr>(
        p: &Params,
        (q, k, v): (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
        out: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
        dev: &CudaDevice,
    ) -> candle_core::Result<()> {
        let Dims {
            b, hq, hkv, t, d, ..
        } = p.dims;
        let n = sizes(p)?;
        // With a device-held key count the grid covers the whole cache.
        let splits = t.div_ceil(DECODE_KEYS).max(1);
        let rows = b * hq;
        // SAFETY: decode_split writes every (row, split) max/sum and the
        // partial O of every split it reads back (the combine skips the
        // rest, whose weight is 0).
        let part_o = unsafe { dev.alloc::<f32>(rows * splits * d)? };
        let part_ml = unsafe { dev.alloc::<f32>(rows * splits * 2)? };
        let null = 0u64;
        let keys_guard = p.keys.as_ref().map(Tensor::storage_and_layout);
        let keys = match &keys_guard {
            Some((s, l)) => Some(view::<u32>(storage_of(s, "keys")?, l, "keys")?),
            None => None,
        };
        let stream = dev.cuda_stream();
        let f = func(dev, &format!("flash_decode_d{d}_{}", T::SUFFIX), 0)?;
        let mut l = stream.launch_builder(&f);
        l.arg(q).arg(k).arg(v).arg(&part_o).arg(&part_ml);
        l.arg(&n.hq)
            .arg(&n.hkv)
            .arg(&n.t)
            .arg(&n.t)
            .arg(&n.window)
            .arg(&p.scale);
        match &keys {
            Some(k) => l.arg(k),
            None => l.arg(&null),
        };
        if b > 65535 || hkv > 65535 {
            candle_core::bail!("flash_attention: batch {b} or {hkv} kv heads exceed a CUDA grid");
        }
        let cfg = LaunchConfig {
            grid_dim: (int(splits, "splits")? as u32, hkv as u32, b as u32),
            block_dim: (DECODE_KEYS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments in the order and C types of flash_decode_d{D}_{dtype}.
        unsafe { l.launch(cfg) }.w()?;
        let f = func(dev, &format!("flash_decode_combine_d{d}_{}", T::SUFFIX), 0)?;
        let mut l = stream.launch_builder(&f);
        let splits_arg = int(splits, "splits")?;
        l.arg(&part_o)
            .arg(&part_ml)
            .arg(out)
            .arg(lse)
            .arg(&splits_arg);
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "rows")? as u32, 1, 1),
            block_dim: (d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments in the order and C types of
        // flash_decode_combine_d{D}_{dtype}; `out` holds rows * d, `lse` rows.
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }

    /// Backward: dq, dk, dv stacked in one flat storage.
    pub(super) fn backward(
        p: &Params,
        qkv: [Input<'_>; 3],
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
    ) -> candle_core::Result<CudaStorage> {
        match qkv[0].0.dtype() {
            DType::BF16 => backward_t::<half::bf16>(p, qkv, o, d_o, lse),
            DType::F16 => backward_t::<half::f16>(p, qkv, o, d_o, lse),
            other => candle_core::bail!("flash_attention: no CUDA kernel for {other:?}"),
        }
    }

    fn backward_t<T: Float + CudaDType + DeviceRepr>(
        p: &Params,
        [q, k, v]: [Input<'_>; 3],
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
    ) -> candle_core::Result<CudaStorage> {
        let Dims {
            b,
            hq,
            hkv,
            s,
            t,
            d,
        } = p.dims;
        let n = sizes(p)?;
        let dev = &q.0.device;
        let (nq, nk) = (p.dims.q_elems(), p.dims.kv_elems());
        let rows = b * hq * s;
        let (qv, kv, vv) = (
            view::<T>(q.0, q.1, "q")?,
            view::<T>(k.0, k.1, "k")?,
            view::<T>(v.0, v.1, "v")?,
        );
        let (o_s, o_l) = o.storage_and_layout();
        let ov = view::<T>(storage_of(&o_s, "o")?, o_l, "o")?;
        let (do_s, do_l) = d_o.storage_and_layout();
        let dov = view::<T>(storage_of(&do_s, "dO")?, do_l, "dO")?;
        let (lse_s, lse_l) = lse.storage_and_layout();
        let lsev = view::<f32>(storage_of(&lse_s, "lse")?, lse_l, "lse")?;

        // SAFETY: every element is written below: dq by the conversion of
        // dq_acc, dk/dv by the main kernel (every key row, zeros for keys no
        // query sees) or by the conversions of their f32 sums.
        let mut out = unsafe { dev.alloc::<T>((nq + 2 * nk).max(1))? };
        if nq + nk == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        let gqa = hq != hkv;
        // SAFETY: dsum is written by the dot kernel before the main kernel.
        let dsum = unsafe { dev.alloc::<f32>(rows.max(1))? };
        let dq_acc = dev.alloc_zeros::<f32>(nq.max(1))?;
        // Grouped-query attention sums dK/dV over a group in f32; otherwise
        // the kernel writes them directly and these stay unused.
        let kv_acc_len = if gqa { nk } else { 1 };
        let dk_acc = dev.alloc_zeros::<f32>(kv_acc_len)?;
        let dv_acc = dev.alloc_zeros::<f32>(kv_acc_len)?;

        if rows > 0 {
            // dsum = rowsum(dO ∘ O), d/8 threads per row.
            let threads = rows * (d / 8);
            let f = func(dev, &format!("flash_attn_bwd_dot_d{d}_{}", T::SUFFIX), 0)?;
            let rows64 = rows as u64;
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&f);
            l.arg(&ov).arg(&dov).arg(&dsum).arg(&rows64);
            let cfg = LaunchConfig {
                grid_dim: (int(threads.div_ceil(256), "rows")? as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: (const T* o, const T* dout, float* dsum, size_t rows).
            unsafe { l.launch(cfg) }.w()?;
        }
        {
            let (mut dq, mut rest) = out.split_at_mut(nq);
            let (mut dk, mut dv) = rest.split_at_mut(nk);
            if t > 0 {
                let smem = bwd_smem(d);
                let f = func(dev, &format!("flash_attn_bwd_d{d}_{}", T::SUFFIX), smem)?;
                let guard = p.bias.as_ref().map(Tensor::storage_and_layout);
                let bias = match &guard {
                    Some((s, l)) => Some(bias_arg(s, l)?),
                    None => None,
                };
                let null = 0u64;
                let zeros = [0i64; 3];
                let strides = bias.as_ref().map_or(&zeros, |b| &b.strides);
                let (scale, causal) = (p.scale, i32::from(p.causal));
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(&f);
                l.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(&lsev).arg(&dsum);
                match &bias {
                    Some(b) => l.arg(&b.view),
                    None => l.arg(&null),
                };
                l.arg(&dq_acc)
                    .arg(&mut dk)
                    .arg(&mut dv)
                    .arg(&dk_acc)
                    .arg(&dv_acc);
                l.arg(&n.hq).arg(&n.hkv).arg(&n.s).arg(&n.t).arg(&scale);
                l.arg(&causal).arg(&n.window);
                l.arg(&strides[0]).arg(&strides[1]).arg(&strides[2]);
                let cfg = grid(t.div_ceil(TILE), p, smem)?;
                // SAFETY: arguments in the order and C types of
                // flash_attn_bwd_d{D}_{dtype}; accumulators zeroed above.
                unsafe { l.launch(cfg) }.w()?;
            }
            // f32 sums to the output dtype: dq takes its scale here.
            let convert = func(dev, &format!("flash_attn_convert_{}", T::SUFFIX), 0)?;
            let run = |src: &CudaSlice<f32>,
                       dst: &mut CudaViewMut<'_, T>,
                       n: usize,
                       scale: f32|
             -> candle_core::Result<()> {
                if n == 0 {
                    return Ok(());
                }
                let n64 = n as u64;
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(&convert);
                l.arg(src).arg(dst).arg(&n64).arg(&scale);
                // SAFETY: (const float* src, T* dst, size_t n, float scale).
                unsafe { l.launch(elementwise_config(n)) }.w()?;
                Ok(())
            };
            run(&dq_acc, &mut dq, nq, p.scale)?;
            if gqa {
                run(&dk_acc, &mut dk, nk, 1.0)?;
                run(&dv_acc, &mut dv, nk, 1.0)?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
