//! The Llama-family decoder: grouped-query attention with rotary position
//! embeddings, RMSNorm and a SwiGLU MLP. Llama 2/3.x, SmolLM2, Qwen2/2.5,
//! Qwen3 and Mistral are this graph; what differs between them (q/k/v
//! biases, tied embeddings, RoPE scaling, sliding windows, per-head q/k
//! norms, head width) is in [`DecoderConfig`].
//!
//! One implementation serves inference (with a [`KvCache`]) and training:
//! each op takes a differentiable path when its inputs track gradients.
//! Every projection is a [`Linear`] with an adapter hook, which is where
//! LoRA plugs in.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::DecoderConfig;
use super::decoder::CausalLm;
use super::kv_cache::{KvCache, StaticCache};
use crate::backend::autograd::{checkpoint, needs_grad, with_backward};
use crate::backend::kernels::{flash_attention_cached, kv_write, split_heads, Heads};
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::layers::{
    attention, attention_mask as build_mask, attention_taped, dense_mask_needed, mask_rows,
    padding_bias, AttentionTape, Embedding, Linear, LinearTape, Mask, MaskKind, RmsNorm,
    RotaryEmbedding,
};

/// The stacked q/k/v projection of an [`Attention`].
#[derive(Debug, Clone)]
struct FusedQkv {
    proj: Linear,
    bias: Tensor,
    /// The parts' weights when it was built: a part whose weight has been
    /// replaced since (an adapter merged into it) no longer matches the
    /// stacked copy, and the layer goes back to the three projections.
    parts: [Option<candle_core::TensorId>; 3],
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head RMSNorm of q and k, before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Which mask this layer uses (full causal or a sliding window).
    mask: MaskKind,
    /// q, k and v as one projection whose weight the three share (views),
    /// and their stacked bias: inference runs one matmul and one
    /// [`split_heads`] instead of three matmuls, bias adds and transposes.
    /// `None` for quantized weights.
    qkv: Option<FusedQkv>,
}

impl Attention {
    fn load(cfg: &DecoderConfig, w: &Weights, p: &str, layer: usize) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        let qk_norm = if cfg.qk_norm {
            let eps = cfg.rms_norm_eps;
            Some((
                RmsNorm::load(w, &format!("{p}.q_norm.weight"), d, eps)?,
                RmsNorm::load(w, &format!("{p}.k_norm.weight"), d, eps)?,
            ))
        } else {
            None
        };
        let mut q_proj = Linear::load(w, &format!("{p}.q_proj"), h, nh * d, bias)?;
        let mut k_proj = Linear::load(w, &format!("{p}.k_proj"), h, nkv * d, bias)?;
        let mut v_proj = Linear::load(w, &format!("{p}.v_proj"), h, nkv * d, bias)?;
        let qkv = match Linear::stack_shared(&mut [&mut q_proj, &mut k_proj, &mut v_proj])? {
            Some(proj) => Some(FusedQkv {
                proj,
                bias: Linear::stacked_bias(&[&q_proj, &k_proj, &v_proj], w.dtype(), w.device())?,
                parts: [q_proj.weight_id(), k_proj.weight_id(), v_proj.weight_id()],
            }),
            None => None,
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            qkv,
            o_proj: Linear::load(w, &format!("{p}.o_proj"), nh * d, h, false)?,
            qk_norm,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            mask: match cfg.sliding_windows.get(layer).copied().flatten() {
                Some(window) => MaskKind::SlidingWindow(window),
                None => MaskKind::Causal,
            },
        })
    }

    /// The stacked q/k/v projection when it stands for the three layers:
    /// none of them has an adapter or a replaced weight.
    fn fused_qkv(&self) -> Option<&FusedQkv> {
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        self.qkv.as_ref().filter(|f| {
            parts
                .iter()
                .zip(&f.parts)
                .all(|(l, id)| l.adapter().is_none() && l.weight_id() == *id)
        })
    }

    /// q, k, v as `[b, heads, s, head_dim]`, before the q/k norms and RoPE.
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        if let (Some(f), false) = (self.fused_qkv(), needs_grad(&[x])) {
            let heads = Heads {
                q: self.num_heads,
                kv: self.num_kv_heads,
                dim: self.head_dim,
            };
            return Ok(split_heads(&f.proj.forward(x)?, &f.bias, heads)?);
        }
        let heads = |t: Tensor, n: usize| t.reshape((b, s, n, self.head_dim))?.transpose(1, 2);
        Ok((
            heads(self.q_proj.forward(x)?, self.num_heads)?,
            heads(self.k_proj.forward(x)?, self.num_kv_heads)?,
            heads(self.v_proj.forward(x)?, self.num_kv_heads)?,
        ))
    }

    /// q, k (normed where the model norms them, then rotated) and v as
    /// `[b, heads, s, head_dim]`.
    fn rotated_qkv(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (mut q, mut k, v) = self.project(x)?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let q = RotaryEmbedding::apply(&q, cos, sin)?;
        let k = RotaryEmbedding::apply(&k, cos, sin)?;
        Ok((q, k, v))
    }

    fn forward(&self, x: &Tensor, ctx: &mut LayerCtx<'_>, layer: usize) -> Result<Tensor> {
        let (q, k, v) = self.rotated_qkv(x, ctx.cos, ctx.sin)?;
        let (k, v) = match ctx.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let mask = Mask {
            kind: self.mask,
            bias: ctx.padding,
            dense: match self.mask {
                MaskKind::SlidingWindow(_) => ctx.window_mask,
                _ => ctx.mask,
            },
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = attention(&q, &k, &v, &mask, scale)?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// What a static-cache decode step's layers read (see [`StaticCache`]).
struct StaticCtx<'a> {
    /// The RoPE rows of the step's position, `[1, head_dim / 2]`.
    cos: &'a Tensor,
    sin: &'a Tensor,
    /// The whole RoPE tables, `[capacity, head_dim / 2]` (the fused kernel
    /// picks its rows itself).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    cos_table: &'a Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    sin_table: &'a Tensor,
    /// u32 `[1]`: the step's position (where its keys are written).
    pos: &'a Tensor,
    /// u32 `[1]`: the keys after the step.
    keys: &'a Tensor,
}

impl Attention {
    /// [`Attention::forward`] over a [`StaticCache`]: keys and values
    /// written at the device-held position, attention over the
    /// preallocated rows up to the device-held count.
    fn forward_static(
        &self,
        x: &Tensor,
        ctx: &StaticCtx<'_>,
        (kc, vc): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let window = match self.mask {
            MaskKind::SlidingWindow(w) => Some(w),
            _ => None,
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // The stacked projection, then bias, RoPE and the cache writes in
        // one kernel (a captured step's time is its number of kernels):
        // without q/k norms, and with no adapter on q, k or v.
        #[cfg(feature = "cuda")]
        if let (None, Some(f)) = (&self.qk_norm, self.fused_qkv()) {
            let heads = Heads {
                q: self.num_heads,
                kv: self.num_kv_heads,
                dim: self.head_dim,
            };
            let q = crate::backend::kernels::qkv_rope_cache(
                &f.proj.forward(x)?,
                &f.bias,
                ctx.cos_table,
                ctx.sin_table,
                ctx.pos,
                kc,
                vc,
                heads,
            )?;
            let out = flash_attention_cached(&q, kc, vc, ctx.keys, scale, true, window)?;
            return Ok(self.o_proj.forward(&out)?);
        }
        let (q, k, v) = self.rotated_qkv(x, ctx.cos, ctx.sin)?;
        kv_write(kc, &k, ctx.pos)?;
        kv_write(vc, &v, ctx.pos)?;
        let out = flash_attention_cached(&q, kc, vc, ctx.keys, scale, true, window)?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// The stacked gate/up projection of an [`Mlp`] (see [`FusedQkv`]).
#[derive(Debug, Clone)]
struct FusedGateUp {
    proj: Linear,
    /// The parts' weights when it was built.
    parts: [Option<candle_core::TensorId>; 2],
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// gate and up as one projection whose weight the two share (views):
    /// inference runs one matmul and one SwiGLU over the halves of its
    /// rows. `None` for quantized weights or biases.
    gate_up: Option<FusedGateUp>,
}

impl Mlp {
    fn load(cfg: &DecoderConfig, w: &Weights, p: &str) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let mut gate_proj = Linear::load(w, &format!("{p}.gate_proj"), h, i, bias)?;
        let mut up_proj = Linear::load(w, &format!("{p}.up_proj"), h, i, bias)?;
        let gate_up = if bias {
            None
        } else {
            Linear::stack_shared(&mut [&mut gate_proj, &mut up_proj])?.map(|proj| FusedGateUp {
                proj,
                parts: [gate_proj.weight_id(), up_proj.weight_id()],
            })
        };
        Ok(Self {
            gate_proj,
            up_proj,
            down_proj: Linear::load(w, &format!("{p}.down_proj"), i, h, bias)?,
            gate_up,
        })
    }

    /// The stacked gate/up projection when it stands for the two layers:
    /// neither has an adapter or a replaced weight.
    /// `METAL_CANDLE_FUSED_GATE_UP=0` keeps the two products (A/B runs).
    fn fused_gate_up(&self) -> Option<&FusedGateUp> {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OFF.get_or_init(|| std::env::var("METAL_CANDLE_FUSED_GATE_UP").is_ok_and(|v| v == "0"))
        {
            return None;
        }
        let parts = [&self.gate_proj, &self.up_proj];
        self.gate_up.as_ref().filter(|f| {
            parts
                .iter()
                .zip(&f.parts)
                .all(|(l, id)| l.adapter().is_none() && l.weight_id() == *id)
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if needs_grad(&[x]) && self.is_frozen() {
            return self.forward_frozen(x);
        }
        if let (Some(f), false) = (self.fused_gate_up(), needs_grad(&[x])) {
            let act = crate::backend::kernels::swiglu_packed(&f.proj.forward(x)?)?;
            return self.down_proj.forward(&act);
        }
        // Our fused silu(gate) * up has a backward, so it serves training
        // too (one pass instead of two and an intermediate; 4x the composed
        // ops on the CPU, measured on [4, 128, 4864] f32).
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj
            .forward(&crate::backend::kernels::swiglu(&gate, &up)?)
    }

    /// No adapter and no bias on any projection: nothing in the MLP trains.
    fn is_frozen(&self) -> bool {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
            .iter()
            .all(|l| l.adapter().is_none() && l.bias().is_none())
    }

    /// A frozen MLP under training as one graph node with a written
    /// backward (`dx = dg W_gate + du W_up`, `(dg, du)` from the fused
    /// SwiGLU backward of `dy W_down`): Candle's graph would keep the
    /// intermediate-width activation and start a zero gradient for each of
    /// the three intermediate-width tensors (0.6 ms a layer on an H200 at
    /// b8 × 512, Nsight Compute).
    fn forward_frozen(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let xd = x.detach();
        let gate = self.gate_proj.forward(&xd)?;
        let up = self.up_proj.forward(&xd)?;
        let y = self
            .down_proj
            .forward(&crate::backend::kernels::swiglu(&gate, &up)?)?;
        let mlp = self.clone();
        let backward = move |_: &[&Tensor], _: &Tensor, dy: &Tensor| {
            let dtype = dy.dtype();
            let weight = |l: &Linear| {
                l.dense_weight(dtype)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            };
            let dims = dy.dims().to_vec();
            let rows = dy.elem_count() / dims.last().copied().unwrap_or(1).max(1);
            let dy = dy.contiguous()?.reshape((rows, ()))?;
            let d_act = dy.matmul(&weight(&mlp.down_proj)?)?;
            let (g2, u2) = (gate.reshape((rows, ()))?, up.reshape((rows, ()))?);
            let (d_gate, d_up) = crate::backend::kernels::swiglu_backward(&g2, &u2, &d_act)?;
            let dx = (d_gate.matmul(&weight(&mlp.gate_proj)?)?
                + d_up.matmul(&weight(&mlp.up_proj)?)?)?;
            Ok(vec![Some(dx.reshape(dims.as_slice())?)])
        };
        with_backward(&[x], &y, Arc::new(backward))
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// The layer with its residual adds fused into the norms after them:
    /// `x + pending` (the previous layer's MLP output, if any) is normed by
    /// this layer's input norm in one pass, the attention output likewise
    /// by the post-attention norm. Returns the residual stream before this
    /// layer's MLP output and that output, for the next norm to add.
    fn forward_fused(
        &self,
        x: &Tensor,
        pending: Option<Tensor>,
        ctx: &mut LayerCtx<'_>,
        i: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.fused_around(x, pending, |h| self.self_attn.forward(h, ctx, i))
    }

    /// [`Self::forward_fused`] over a [`StaticCache`].
    fn forward_static(
        &self,
        x: &Tensor,
        pending: Option<Tensor>,
        ctx: &StaticCtx<'_>,
        kv: (&Tensor, &Tensor),
    ) -> Result<(Tensor, Tensor)> {
        self.fused_around(x, pending, |h| self.self_attn.forward_static(h, ctx, kv))
    }

    /// The fused residual adds and norms around `attend` (the attention of
    /// either decode path), then the MLP.
    fn fused_around(
        &self,
        x: &Tensor,
        pending: Option<Tensor>,
        attend: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (x, h) = match pending {
            Some(delta) => self.input_layernorm.add_forward(x, &delta)?,
            None => (x.clone(), self.input_layernorm.forward(x)?),
        };
        let attn = attend(&h)?;
        let (x, h) = self.post_attention_layernorm.add_forward(&x, &attn)?;
        Ok((x, self.mlp.forward(&h)?))
    }

    fn forward(&self, x: &Tensor, ctx: &mut LayerCtx<'_>, i: usize) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let x = (x + self.self_attn.forward(&h, ctx, i)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        Ok((&x + self.mlp.forward(&h)?)?)
    }

    /// The layer's seven projections.
    fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// The trainable tensors of the adapters attached to this layer.
    fn parameters(&self) -> Vec<Tensor> {
        self.linears()
            .iter()
            .filter_map(|l| l.adapter())
            .flat_map(|a| a.parameters())
            .collect()
    }
}

/// What a taped layer's backward reads besides its tape (owned: the
/// backward runs after the forward's borrows end).
#[derive(Clone)]
struct TapeCtx {
    cos: Tensor,
    sin: Tensor,
    /// The dense mask of this layer's kind (composed attention only).
    dense: Option<Tensor>,
    padding: Option<Tensor>,
}

/// What [`DecoderLayer::backward_taped`] needs from the forward.
struct LayerTape {
    /// The layer's input, `[rows, hidden]`.
    x: Tensor,
    q: LinearTape,
    k: LinearTape,
    v: LinearTape,
    /// q and k before their per-head norms (Qwen3), `[b, heads, s, d]`.
    qk_pre: Option<(Tensor, Tensor)>,
    attn: AttentionTape,
    o: LinearTape,
    /// The residual stream after attention, `[rows, hidden]`.
    mid: Tensor,
    gate: (Tensor, LinearTape),
    up: (Tensor, LinearTape),
    down: LinearTape,
}

impl DecoderLayer {
    /// Whether [`Self::forward_taped`] stands for this layer: frozen norms
    /// and linear layers with at most low-rank adapters.
    fn tapeable(&self) -> bool {
        let a = &self.self_attn;
        self.linears().iter().all(|l| l.tapeable())
            && self.input_layernorm.frozen()
            && self.post_attention_layernorm.frozen()
            && a.qk_norm
                .as_ref()
                .is_none_or(|(q, k)| q.frozen() && k.frozen())
    }

    /// The layer for training as one autograd node with a written
    /// backward: Candle's backward gives every edge of a graph a zero
    /// tensor and an add, about forty activation-sized adds and as many
    /// launches per layer for the composed layer (the LoRA step was bound
    /// by the host launching them, BENCHMARKS.md); the node has one edge.
    /// The adapters' gradients go to `training::backward` (`defer_grad`).
    /// With `recompute`, only the input is kept and the backward runs the
    /// forward again (activation recomputation).
    fn forward_taped(&self, x: &Tensor, ctx: TapeCtx, recompute: bool) -> Result<Tensor> {
        let (y, tape) = self.tape_forward(x, &ctx)?;
        let params: Vec<Tensor> = self.parameters();
        let anchor = params.first().cloned();
        if !x.track_op() && anchor.is_none() {
            return Ok(y);
        }
        let layer = self.clone();
        let tape = if recompute { None } else { Some(tape) };
        let backward = move |args: &[&Tensor], _: &Tensor, dy: &Tensor| {
            let x = args[0];
            let recomputed;
            let tape = match &tape {
                Some(t) => t,
                None => {
                    recomputed = layer
                        .tape_forward(x, &ctx)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                        .1;
                    &recomputed
                }
            };
            let dx = layer.backward_taped(tape, &ctx, dy, x.track_op())?;
            let mut grads = vec![dx];
            if args.len() > 1 {
                // The anchor's gradient went to `defer_grad` with the rest.
                grads.push(None);
            }
            Ok(grads)
        };
        // A first layer's input does not track gradients: a parameter as a
        // second input makes Candle visit the node all the same.
        let inputs: Vec<&Tensor> = match &anchor {
            Some(p) if !x.track_op() => vec![x, p],
            _ => vec![x],
        };
        Ok(with_backward(&inputs, &y, Arc::new(backward))?)
    }

    /// The forward of [`Self::forward_taped`] outside the graph: the
    /// output and the tape.
    fn tape_forward(&self, x: &Tensor, ctx: &TapeCtx) -> Result<(Tensor, LayerTape)> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let (b, s, hidden) = x.dims3()?;
        let rows = b * s;
        let d = a.head_dim;
        let x2 = x.detach().contiguous()?.reshape((rows, hidden))?;
        let h1 = self.input_layernorm.forward_taped(&x2)?;
        let (q, q_t) = a.q_proj.forward_taped(&h1)?;
        let (k, k_t) = a.k_proj.forward_taped(&h1)?;
        let (v, v_t) = a.v_proj.forward_taped(&h1)?;
        let heads = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous()
        };
        let (mut q4, mut k4, v4) = (
            heads(&q, a.num_heads)?,
            heads(&k, a.num_kv_heads)?,
            heads(&v, a.num_kv_heads)?,
        );
        let mut qk_pre = None;
        if let Some((qn, kn)) = &a.qk_norm {
            let (qn_out, kn_out) = (qn.forward_taped(&q4)?, kn.forward_taped(&k4)?);
            qk_pre = Some((q4, k4));
            (q4, k4) = (qn_out, kn_out);
        }
        let q4 = candle_nn::rotary_emb::rope(&q4.contiguous()?, &ctx.cos, &ctx.sin)?;
        let k4 = candle_nn::rotary_emb::rope(&k4.contiguous()?, &ctx.cos, &ctx.sin)?;
        let mask = Mask {
            kind: a.mask,
            bias: ctx.padding.as_ref(),
            dense: ctx.dense.as_ref(),
        };
        let scale = 1.0 / (d as f64).sqrt();
        let (attn, attn_t) = attention_taped(&q4, &k4, &v4, &mask, scale)?;
        let attn = attn.reshape((rows, a.num_heads * d))?;
        let (o, o_t) = a.o_proj.forward_taped(&attn)?;
        let (mid, h2) = self.post_attention_layernorm.add_forward(&x2, &o)?;
        let (g, g_t) = m.gate_proj.forward_taped(&h2)?;
        let (u, u_t) = m.up_proj.forward_taped(&h2)?;
        let act = crate::backend::kernels::swiglu(&g, &u)?;
        let (y, down_t) = m.down_proj.forward_taped(&act)?;
        let out = (&mid + y)?.reshape((b, s, hidden))?;
        Ok((
            out,
            LayerTape {
                x: x2,
                q: q_t,
                k: k_t,
                v: v_t,
                qk_pre,
                attn: attn_t,
                o: o_t,
                mid,
                gate: (g, g_t),
                up: (u, u_t),
                down: down_t,
            },
        ))
    }

    /// The input gradient of the layer for the output gradient `dy`
    /// (`None` unless `need_dx`); the adapters' gradients are deferred.
    fn backward_taped(
        &self,
        t: &LayerTape,
        ctx: &TapeCtx,
        dy: &Tensor,
        need_dx: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let (b, s, hidden) = dy.dims3()?;
        let rows = b * s;
        let d = a.head_dim;
        let missing = || candle_core::Error::Msg("layer backward: missing input gradient".into());
        let dy = dy.detach().contiguous()?.reshape((rows, hidden))?;
        // MLP: out = mid + down(silu(gate(h2)) · up(h2)), h2 = norm2(mid).
        let d_act = m
            .down_proj
            .backward_taped(&t.down, &dy, true)?
            .ok_or_else(missing)?;
        let (dg, du) = crate::backend::kernels::swiglu_backward(&t.gate.0, &t.up.0, &d_act)?;
        let dh2 = (m
            .gate_proj
            .backward_taped(&t.gate.1, &dg, true)?
            .ok_or_else(missing)?
            + m.up_proj
                .backward_taped(&t.up.1, &du, true)?
                .ok_or_else(missing)?)?;
        let d_mid = (&dy + self.post_attention_layernorm.backward_taped(&t.mid, &dh2)?)?;
        // Attention: mid = x + o_proj(attention(rope(q), rope(k), v)).
        let d_attn = a
            .o_proj
            .backward_taped(&t.o, &d_mid, true)?
            .ok_or_else(missing)?;
        let (dq, dk, dv) = t.attn.backward(&d_attn.reshape((b, s, a.num_heads * d))?)?;
        let neg_sin = ctx.sin.neg()?;
        let mut dq = candle_nn::rotary_emb::rope(&dq.contiguous()?, &ctx.cos, &neg_sin)?;
        let mut dk = candle_nn::rotary_emb::rope(&dk.contiguous()?, &ctx.cos, &neg_sin)?;
        if let (Some((qn, kn)), Some((q_pre, k_pre))) = (&a.qk_norm, &t.qk_pre) {
            dq = qn.backward_taped(q_pre, &dq)?;
            dk = kn.backward_taped(k_pre, &dk)?;
        }
        let flat = |g: &Tensor, n: usize| g.transpose(1, 2)?.reshape((rows, n * d));
        let dq = a
            .q_proj
            .backward_taped(&t.q, &flat(&dq, a.num_heads)?, need_dx)?;
        let dk = a
            .k_proj
            .backward_taped(&t.k, &flat(&dk, a.num_kv_heads)?, need_dx)?;
        let dv = a
            .v_proj
            .backward_taped(&t.v, &flat(&dv, a.num_kv_heads)?, need_dx)?;
        let (Some(dq), Some(dk), Some(dv)) = (dq, dk, dv) else {
            return Ok(None);
        };
        let dh1 = ((dq + dk)? + dv)?;
        let dx = (d_mid + self.input_layernorm.backward_taped(&t.x, &dh1)?)?;
        Ok(Some(dx.reshape((b, s, hidden))?))
    }
}

/// Per-forward state every layer reads.
struct LayerCtx<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: Option<&'a Tensor>,
    window_mask: Option<&'a Tensor>,
    /// Padding alone (for the fused kernel, which takes causality as a flag).
    padding: Option<&'a Tensor>,
    cache: Option<&'a mut KvCache>,
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    config: DecoderConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    /// Recompute each layer's activations in the backward pass instead of
    /// keeping them ([`CausalLm::set_gradient_checkpointing`]).
    checkpointing: bool,
    /// Layers differentiated op by op ([`CausalLm::set_composed_backward`]).
    composed_backward: bool,
}

impl Llama {
    /// Builds the model from `config` and HF-named weights
    /// (`model.layers.{i}.self_attn.q_proj.weight`, …).
    ///
    /// # Errors
    /// Invalid config, missing tensor or wrong shape.
    pub fn new(config: &DecoderConfig, w: &Weights) -> Result<Self> {
        config.validate().map_err(|message| Error::InvalidConfig {
            origin: format!("{} config", config.model_type),
            message,
        })?;
        let h = config.hidden_size;
        let eps = config.rms_norm_eps;
        let embed_tokens = match w.quantized("model.embed_tokens.weight") {
            Some(q) => {
                if q.shape().dims() != [config.vocab_size, h] {
                    return Err(Error::ShapeMismatch {
                        name: "model.embed_tokens.weight".into(),
                        expected: vec![config.vocab_size, h],
                        actual: q.shape().dims().to_vec(),
                    });
                }
                Embedding::quantized(q, w.dtype())?
            }
            None => {
                let table = w.get("model.embed_tokens.weight", &[config.vocab_size, h])?;
                match w.quantize_to() {
                    Some(format) => Embedding::quantize(&table, format)?,
                    None => Embedding::new(table),
                }
            }
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                self_attn: Attention::load(config, w, &format!("{p}.self_attn"), i)?,
                mlp: Mlp::load(config, w, &format!("{p}.mlp"))?,
                input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm.weight"), h, eps)?,
                post_attention_layernorm: RmsNorm::load(
                    w,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    eps,
                )?,
            });
        }
        // A quantized file ties its output projection to the quantized
        // embedding table (stored as `lm_head.weight` by the loader too).
        let tied = config.tie_word_embeddings && w.quantized("lm_head.weight").is_none();
        let lm_head = match (embed_tokens.dense(), embed_tokens.quantized_table()) {
            (Some(table), _) if tied => Linear::new(table.clone(), None),
            (_, Some(q)) if tied => Linear::quantized(q.clone(), None, w.dtype())?,
            _ => Linear::load(w, "lm_head", h, config.vocab_size, false)?,
        };
        // Tied and quantized: the lookup reads the head's blocks (on the
        // CPU a Q5_0 head is held as the equal Q8_0, `backend::quant`), so
        // the table is in memory once.
        let embed_tokens = match (config.tie_word_embeddings, lm_head.quantized_weight()) {
            (true, Some(q)) if embed_tokens.dense().is_none() => {
                Embedding::quantized(q.clone(), w.dtype())?
            }
            _ => embed_tokens,
        };
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm::load(w, "model.norm.weight", h, eps)?,
            lm_head,
            rotary: RotaryEmbedding::new(
                config.head_dim,
                config.rope_theta,
                config.rope_scaling.clone(),
                w.device(),
            )?,
            checkpointing: false,
            composed_backward: false,
        })
    }

    /// Positions of the new tokens: `past..past + s`, or with a padding
    /// mask `cumsum(mask) - 1` (as transformers' `generate`), row-major
    /// `[b, s]`.
    fn positions(rows: Option<&[Vec<u32>]>, (b, s): (usize, usize), past: usize) -> Vec<u32> {
        match rows {
            Some(rows) => rows
                .iter()
                .flat_map(|r| {
                    let mut seen = 0u32;
                    let all: Vec<u32> = r
                        .iter()
                        .map(|&m| {
                            seen += u32::from(m != 0);
                            seen.saturating_sub(1)
                        })
                        .collect();
                    all[past..].to_vec()
                })
                .collect(),
            None => (0..b)
                .flat_map(|_| (past as u32)..(past + s) as u32)
                .collect(),
        }
    }
}

impl CausalLm for Llama {
    fn config(&self) -> &DecoderConfig {
        &self.config
    }

    fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    fn parameter_count(&self) -> usize {
        // Embeddings, final norm, two norms per layer (and q/k norms), then
        // the linear layers.
        let (h, d) = (self.config.hidden_size, self.config.head_dim);
        let qk = if self.config.qk_norm { 2 * d } else { 0 };
        let mut n = self.embed_tokens.elem_count() + h + self.layers.len() * (2 * h + qk);
        if !self.config.tie_word_embeddings {
            n += self.lm_head.parameter_count();
        }
        n + self
            .linear_layers()
            .iter()
            .map(|(_, l)| l.parameter_count())
            .sum::<usize>()
    }

    fn linear_layers_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }

    fn linear_layers(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let (a, m) = (&l.self_attn, &l.mlp);
            for (n, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.push((format!("{p}.{n}"), lin));
            }
        }
        out
    }

    fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2().map_err(|_| {
            Error::InvalidInput(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if s == 0 {
            return Err(Error::InvalidInput("input_ids is empty".into()));
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        let limit = self.config.context_length();
        if past + s > limit {
            return Err(Error::ContextLengthExceeded {
                requested: past + s,
                limit,
            });
        }
        if let Some(c) = cache.as_ref() {
            c.check_room(s)?;
        }
        let device = self.device();
        let rows = attention_mask.map(mask_rows).transpose()?;
        if let Some(rows) = &rows {
            if rows.len() != b || rows.iter().any(|r| r.len() != past + s) {
                return Err(Error::InvalidInput(format!(
                    "attention_mask must be [{b}, {}], got {:?}",
                    past + s,
                    attention_mask.map(Tensor::dims)
                )));
            }
        }
        let positions = Self::positions(rows.as_deref(), (b, s), past);
        let (cos, sin) = self.rotary.tables(&positions, (b, s), self.dtype())?;
        // The fused attention kernel masks by kind (and reads only the
        // padding bias): the dense masks, s x (past + s) values made on the
        // host, are for the composed path alone (at a 4,096-token prefill
        // they took 37 of 55 ms).
        let dense = dense_mask_needed(device, self.dtype(), self.config.head_dim);
        let mask = if dense {
            build_mask(b, s, past, rows.as_deref(), MaskKind::Causal, device)?
        } else {
            None
        };
        let padding = padding_bias(rows.as_deref(), device)?;
        // One window mask serves every windowed layer (`validate` allows
        // one window size per model).
        let window_mask = match self.config.sliding_windows.iter().flatten().next() {
            Some(&w) if dense => build_mask(
                b,
                s,
                past,
                rows.as_deref(),
                MaskKind::SlidingWindow(w),
                device,
            )?,
            _ => None,
        };
        let vocab = self.config.vocab_size as u32;
        let max_id = input_ids
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::U32)?
            .to_scalar::<u32>()?;
        if max_id >= vocab {
            return Err(Error::InvalidInput(format!(
                "token id {max_id} is outside the vocabulary ({vocab})"
            )));
        }
        let mut x = self.embed_tokens.forward(input_ids)?;
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            // Training (a layer with adapters, or a gradient coming in)
            // through layers with written backward passes.
            if cache.is_none()
                && !self.composed_backward
                && (x.track_op() || !layer.parameters().is_empty())
                && layer.tapeable()
            {
                if let Some(mlp) = pending.take() {
                    x = (x + mlp)?;
                }
                let dense = match layer.self_attn.mask {
                    MaskKind::SlidingWindow(_) => window_mask.clone(),
                    _ => mask.clone(),
                };
                let ctx = TapeCtx {
                    cos: cos.clone(),
                    sin: sin.clone(),
                    dense,
                    padding: padding.clone(),
                };
                x = layer.forward_taped(&x, ctx, self.checkpointing)?;
                continue;
            }
            if self.checkpointing && cache.is_none() {
                if let Some(mlp) = pending.take() {
                    x = (x + mlp)?;
                }
                let params = layer.parameters();
                let (layer, cos, sin) = (layer.clone(), cos.clone(), sin.clone());
                let (mask, window_mask) = (mask.clone(), window_mask.clone());
                let padding = padding.clone();
                let f = move |x: &Tensor| {
                    let mut ctx = LayerCtx {
                        cos: &cos,
                        sin: &sin,
                        mask: mask.as_ref(),
                        window_mask: window_mask.as_ref(),
                        padding: padding.as_ref(),
                        cache: None,
                    };
                    layer.forward(x, &mut ctx, i)
                };
                x = checkpoint(&x, params, Arc::new(f))?;
                continue;
            }
            let mut ctx = LayerCtx {
                cos: &cos,
                sin: &sin,
                mask: mask.as_ref(),
                window_mask: window_mask.as_ref(),
                padding: padding.as_ref(),
                cache: cache.as_deref_mut(),
            };
            // The layer's MLP output is added to the residual stream by the
            // next norm (one fused add + RMSNorm, `pending`).
            let (sum, mlp) = layer.forward_fused(&x, pending.take(), &mut ctx, i)?;
            x = sum;
            pending = Some(mlp);
        }
        if let Some(c) = cache {
            c.advance(s);
        }
        Ok(match pending {
            Some(mlp) => self.norm.add_forward(&x, &mlp)?.1,
            None => self.norm.forward(&x)?,
        })
    }

    fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    fn set_composed_backward(&mut self, on: bool) {
        self.composed_backward = on;
    }

    /// On CUDA with the fused attention kernel's dtypes and head widths,
    /// RoPE without dynamic scaling (whose frequencies depend on the
    /// length) and a cache without padding rows.
    fn static_cache(&self, cache: &KvCache, capacity: usize) -> Result<Option<StaticCache>> {
        let c = &self.config;
        let d = c.head_dim;
        let dtype = self.dtype();
        let usable = self.device().is_cuda()
            && matches!(dtype, DType::BF16 | DType::F16)
            && matches!(d, 32 | 64 | 128)
            && !matches!(c.rope_scaling, crate::layers::RopeScaling::Dynamic { .. })
            && !cache.is_empty();
        if !usable {
            return Ok(None);
        }
        let limit = c.context_length();
        if capacity > limit || u32::try_from(capacity).is_err() {
            return Err(Error::ContextLengthExceeded {
                requested: capacity,
                limit,
            });
        }
        let positions: Vec<u32> = (0..capacity as u32).collect();
        let (cos, sin) = self.rotary.tables(&positions, (1, capacity), dtype)?;
        Ok(Some(StaticCache::from_cache(
            cache,
            capacity,
            cos.squeeze(0)?,
            sin.squeeze(0)?,
        )?))
    }

    fn forward_static(&self, cache: &StaticCache) -> Result<Tensor> {
        let b = cache.batch();
        let ids = cache.step.narrow(0, 0, b)?;
        let pos = cache.step.narrow(0, b, 1)?;
        let keys = cache.step.narrow(0, b + 1, 1)?;
        let cos = cache.cos.index_select(&pos, 0)?;
        let sin = cache.sin.index_select(&pos, 0)?;
        let ctx = StaticCtx {
            cos: &cos,
            sin: &sin,
            cos_table: &cache.cos,
            sin_table: &cache.sin,
            pos: &pos,
            keys: &keys,
        };
        let mut x = self.embed_tokens.forward(&ids.unsqueeze(1)?)?;
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (sum, mlp) =
                layer.forward_static(&x, pending.take(), &ctx, (&cache.k[i], &cache.v[i]))?;
            x = sum;
            pending = Some(mlp);
        }
        let h = match pending {
            Some(mlp) => self.norm.add_forward(&x, &mlp)?.1,
            None => self.norm.forward(&x)?,
        };
        Ok(self
            .logits(&h.squeeze(1)?.contiguous()?)?
            .to_dtype(DType::F32)?)
    }
}
