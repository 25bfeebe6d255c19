//! The training ops with written backward passes (attention that
//! recomputes its probabilities, RoPE, the frozen base matmul, the loss
//! fused with the output projection) against the same math composed of
//! Candle's differentiable ops: values and gradients.

use candle_core::{DType, Device, Tensor, Var, D};
use metal_candle::layers::{composed_attention, Linear, RopeScaling, RotaryEmbedding};
use metal_candle::models::{load_decoder, CausalLm};
use metal_candle::training::TargetModule;
use metal_candle::training::{
    backward, lm_loss, shifted_causal_lm_loss, LoRAAdapter, LoRAAdapterConfig,
};

use crate::common::{device, rel_diff};

fn randn(shape: &[usize], dev: &Device) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, dev).unwrap()
}

/// Composed attention, every op differentiable (the reference).
fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Tensor {
    let rep = q.dim(1).unwrap() / k.dim(1).unwrap();
    let repeat = |x: &Tensor| {
        let (b, h, t, d) = x.dims4().unwrap();
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, h, rep, t, d))
            .unwrap()
            .reshape((b, h * rep, t, d))
            .unwrap()
    };
    let (k, v) = (repeat(k), repeat(v));
    let s = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(bias)
        .unwrap();
    let m = s.max_keepdim(D::Minus1).unwrap().detach();
    let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    p.matmul(&v).unwrap()
}

#[test]
fn attention_backward_matches_composed_ops() {
    let dev = device();
    let (b, hq, hkv, s, d) = (2, 6, 2, 9, 16);
    let q = Var::from_tensor(&randn(&[b, hq, s, d], &dev)).unwrap();
    let k = Var::from_tensor(&randn(&[b, hkv, s, d], &dev)).unwrap();
    let v = Var::from_tensor(&randn(&[b, hkv, s, d], &dev)).unwrap();
    // Causal, with the first two keys of row 1 hidden (left padding).
    let mut mask = vec![0f32; b * s * s];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..s {
                if j > i || (bi == 1 && j < 2) {
                    mask[(bi * s + i) * s + j] = f32::MIN;
                }
            }
        }
    }
    let bias = Tensor::from_vec(mask, (b, 1, s, s), &dev).unwrap();
    let w = randn(&[b, hq, s, d], &dev);
    let scale = 0.25;
    let ours = composed_attention(&q, &k, &v, Some(&bias), scale).unwrap();
    let want = reference_attention(&q, &k, &v, &bias, scale);
    assert!(rel_diff(&ours, &want) < 1e-5);
    let g_ours = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g_want = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        let (a, e) = (g_ours.get(x).unwrap(), g_want.get(x).unwrap());
        let r = rel_diff(a, e);
        println!("d{name}: rel {r:e}");
        assert!(r < 1e-5, "d{name} differs: rel {r:e}");
    }
}

#[test]
fn rope_backward_matches_composed_ops() {
    let dev = device();
    let (b, h, s, d) = (2, 3, 5, 8);
    let rope = RotaryEmbedding::new(d, 10_000.0, RopeScaling::None, &dev).unwrap();
    let positions: Vec<u32> = (0..(b * s) as u32).map(|i| i % s as u32 + 3).collect();
    let (cos, sin) = rope.tables(&positions, (b, s), DType::F32).unwrap();
    let x = Var::from_tensor(&randn(&[b, h, s, d], &dev)).unwrap();
    let ours = RotaryEmbedding::apply(&x, &cos, &sin).unwrap();
    // x·cos + rotate_half(x)·sin, composed.
    let c = Tensor::cat(&[&cos, &cos], D::Minus1)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let sn = Tensor::cat(&[&sin, &sin], D::Minus1)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
    let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
    let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    let want = (x.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&sn).unwrap()).unwrap();
    assert!(rel_diff(&ours, &want) < 1e-5);
    let w = randn(&[b, h, s, d], &dev);
    let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let r = rel_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap());
    assert!(r < 1e-5, "rope dx rel {r:e}");
}

#[test]
fn frozen_linear_backward_gives_the_input_gradient_only() {
    let dev = device();
    let w = randn(&[7, 5], &dev);
    let lin = Linear::new(w.clone(), None);
    let x = Var::from_tensor(&randn(&[2, 3, 5], &dev)).unwrap();
    let y = lin.forward(&x).unwrap();
    let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    assert!(rel_diff(&y, &want) < 1e-6);
    let dy = randn(&[2, 3, 7], &dev);
    let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = dy.broadcast_matmul(&w).unwrap();
    assert!(rel_diff(g.get(&x).unwrap(), &dx) < 1e-6);
    assert!(g.get(&w).is_none(), "a frozen weight gets no gradient");
}

/// The training loss (fused with the output projection, several chunks of
/// rows) equals the loss over the model's logits, value and every LoRA
/// gradient, with masked labels: a few (every position through the head,
/// ignored ones masked) and many (the kept rows selected first).
#[test]
fn fused_loss_matches_logits_loss() {
    let dev = device();
    let dir = crate::common::fixture("qwen2-tiny");
    let mut model = load_decoder(dir.to_str().unwrap(), Some(DType::F32), &dev).unwrap();
    let config = LoRAAdapterConfig {
        target_modules: TargetModule::ALL.to_vec(),
        ..Default::default()
    };
    let adapter = LoRAAdapter::new(config, &model, &dev, 3).unwrap();
    // Non-zero B so A gets gradients too.
    for (_, l) in adapter.layers() {
        let bt = l.b().as_tensor();
        l.b().set(&(randn(bt.dims(), &dev) * 0.1).unwrap()).unwrap();
    }
    adapter.attach(&mut model).unwrap();
    let vocab = model.config().vocab_size;
    let (b, s) = (3, 100); // 297 predicted positions: two chunks
    let ids: Vec<u32> = (0..b * s).map(|i| ((i * 7919) % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, s), &dev).unwrap();
    let all = ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
    let mut few = all.clone();
    few[0][..10].fill(-100); // a prompt
    few[2][s - 1] = -100;
    let mut many = all;
    for row in &mut many {
        row[..60].fill(-100);
    }
    for labels in [few, many] {
        let labels = Tensor::new(labels, &dev).unwrap();
        check_fused_loss(&model, &adapter, &ids, &labels);
    }
}

fn check_fused_loss(model: &dyn CausalLm, adapter: &LoRAAdapter, ids: &Tensor, labels: &Tensor) {
    let (fused, n1) = lm_loss(model, ids, None, labels).unwrap();
    let logits = model.forward(ids, None, None).unwrap();
    let (plain, n2) = shifted_causal_lm_loss(&logits, labels).unwrap();
    assert_eq!(n1, n2);
    let (f, p) = (
        fused.to_scalar::<f32>().unwrap(),
        plain.to_scalar::<f32>().unwrap(),
    );
    assert!(((f - p) / p).abs() < 1e-5, "fused {f} vs logits loss {p}");
    let g1 = metal_candle::training::backward(&fused).unwrap();
    let g2 = metal_candle::training::backward(&plain).unwrap();
    for (name, var) in adapter.named_vars() {
        let r = rel_diff(g1.get(&var).unwrap(), g2.get(&var).unwrap());
        assert!(r < 1e-4, "{name}: rel {r:e}");
    }
}

/// Activation recomputation changes nothing but memory: the same loss and
/// every LoRA gradient with it on and off.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let dev = device();
    let dir = crate::common::fixture("qwen2-tiny");
    let mut model = load_decoder(dir.to_str().unwrap(), Some(DType::F32), &dev).unwrap();
    let config = LoRAAdapterConfig {
        target_modules: TargetModule::ALL.to_vec(),
        dropout: 0.1,
        ..Default::default()
    };
    let adapter = LoRAAdapter::new(config, &model, &dev, 5).unwrap();
    for (_, l) in adapter.layers() {
        let bt = l.b().as_tensor();
        l.b().set(&(randn(bt.dims(), &dev) * 0.1).unwrap()).unwrap();
    }
    adapter.attach(&mut model).unwrap();
    // Dropout on: the recomputed forward must draw the same masks.
    adapter.set_training(true);
    adapter.set_dropout_seed(11);
    let vocab = model.config().vocab_size;
    let ids: Vec<u32> = (0..2 * 40).map(|i| ((i * 31) % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 40), &dev).unwrap();
    let labels = ids.to_dtype(DType::I64).unwrap();
    let run = |model: &dyn CausalLm| {
        let (loss, _) = lm_loss(model, &ids, None, &labels).unwrap();
        let grads = backward(&loss).unwrap();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    let (plain, g1) = run(&model);
    model.set_gradient_checkpointing(true);
    let (ckpt, g2) = run(&model);
    assert!(((plain - ckpt) / plain).abs() < 1e-6, "{plain} vs {ckpt}");
    for (name, var) in adapter.named_vars() {
        let (a, b) = (g1.get(&var).unwrap(), g2.get(&var).unwrap());
        let r = rel_diff(b, a);
        assert!(r < 1e-5, "{name}: rel {r:e}");
    }
}

/// The decoder layers' written backward (one graph node per layer) gives
/// the loss and every LoRA gradient of the same layers differentiated op
/// by op through Candle's autograd, for every decoder family's fixture
/// (q/k/v biases, Qwen3's q/k norms, sliding windows, GQA), with padding
/// and masked labels, all seven modules adapted, with and without
/// activation recomputation. f32 on every device (composed attention);
/// on CUDA also bf16 (the fused attention kernel), where the two sides
/// round differently: bound 3e-2 of each gradient's scale.
#[test]
fn written_layer_backward_equals_the_composed_graph() {
    let dev = device();
    let mut dtypes = vec![(DType::F32, 1e-5f32)];
    if dev.is_cuda() {
        dtypes.push((DType::BF16, 3e-2));
    }
    for fixture in [
        "qwen2-tiny",
        "qwen3-tiny",
        "qwen2-tiny-window",
        "mistral-tiny",
        "llama3-tiny",
    ] {
        for &(dtype, bound) in &dtypes {
            let dir = crate::common::fixture(fixture);
            let mut model = load_decoder(dir.to_str().unwrap(), Some(dtype), &dev).unwrap();
            let config = LoRAAdapterConfig {
                target_modules: TargetModule::ALL.to_vec(),
                ..Default::default()
            };
            let adapter = LoRAAdapter::new(config, &model, &dev, 9).unwrap();
            for (_, l) in adapter.layers() {
                let bt = l.b().as_tensor();
                l.b().set(&(randn(bt.dims(), &dev) * 0.1).unwrap()).unwrap();
            }
            adapter.attach(&mut model).unwrap();
            let vocab = model.config().vocab_size;
            let (b, s) = (2, 24);
            let ids: Vec<u32> = (0..b * s).map(|i| ((i * 37 + 5) % vocab) as u32).collect();
            let ids = Tensor::from_vec(ids, (b, s), &dev).unwrap();
            // Row 1 is left-padded by 5 positions, whose labels are masked.
            let mut mask = vec![vec![1u32; s]; b];
            mask[1][..5].fill(0);
            let mut labels = ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
            labels[1][..5].fill(-100);
            labels[0][..3].fill(-100);
            let mask = Tensor::new(mask, &dev).unwrap();
            let labels = Tensor::new(labels, &dev).unwrap();
            let mut run = |composed: bool, ckpt: bool| {
                model.set_composed_backward(composed);
                model.set_gradient_checkpointing(ckpt);
                let (loss, _) = lm_loss(&model, &ids, Some(&mask), &labels).unwrap();
                let grads = backward(&loss).unwrap();
                (
                    loss.to_dtype(DType::F32)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    grads,
                )
            };
            let (want, g_ref) = run(true, false);
            for ckpt in [false, true] {
                let (got, g) = run(false, ckpt);
                assert!(
                    ((got - want) / want).abs() < bound.max(1e-6) / 10.0,
                    "{fixture} {dtype:?} ckpt {ckpt}: loss {got} vs {want}"
                );
                for (name, var) in adapter.named_vars() {
                    let (a, e) = (g.get(&var).unwrap(), g_ref.get(&var).unwrap());
                    let r = rel_diff(a, e);
                    assert!(
                        r < bound,
                        "{fixture} {dtype:?} ckpt {ckpt} {name}: rel {r:e}"
                    );
                }
            }
        }
    }
}
