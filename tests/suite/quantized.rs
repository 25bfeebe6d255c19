//! Quantized weights: GGUF files stay quantized (Candle's quantized
//! matmuls), safetensors models quantize in situ, and QLoRA trains adapters
//! over a quantized base that then load on the dense one. The GGUF files are
//! made here with Candle's quantizer and writer from the tiny fixtures.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use metal_candle::models::{
    load_decoder_with, read_decoder_config, CausalLm, LoadOptions, Quantization,
};
use metal_candle::training::{
    load_peft_adapter, save_peft_adapter, LoRAAdapter, LoRAAdapterConfig, TargetModule,
};

use crate::common::{abs_max, device, fixture, max_abs_diff, reference};

#[path = "../../examples/common/random_model.rs"]
mod random_model;

/// Writes fixture `name` as a GGUF file (llama.cpp's layout) with its
/// linear weights in `format`.
fn write_gguf(name: &str, format: GgmlDType, out: &Path) {
    let config = read_decoder_config(&fixture(name).join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    random_model::write_gguf(&tensors, &config, format, out).unwrap();
}

fn load(source: &Path, quantization: Quantization) -> Box<dyn CausalLm> {
    let options = LoadOptions {
        dtype: Some(DType::F32),
        quantization,
    };
    load_decoder_with(source.to_str().unwrap(), &device(), &options).unwrap()
}

fn ids(r: &HashMap<String, Tensor>) -> Tensor {
    r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_device(&device())
        .unwrap()
}

/// Share of positions whose argmax agrees.
fn agreement(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .argmax(candle_core::D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let b = b
        .argmax(candle_core::D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    a.iter().zip(&b).filter(|(x, y)| x == y).count() as f32 / a.len() as f32
}

/// A GGUF of f32 tensors is the checkpoint itself: equal to transformers
/// (checks the name map, the metadata and llama's q/k un-permutation).
/// Q8_0 and Q4_0 files keep their linear weights quantized and track their
/// own dequantized copies; the row un-permutation of quantized q/k bytes
/// equals the dense one.
#[test]
fn gguf_files_load_quantized_and_track_their_dequantized_weights() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "qwen2-tiny",
        "llama-tiny-linear",
        "llama3-tiny",
        "qwen3-tiny",
    ] {
        let r = reference(name);
        let f32_file = dir.path().join(format!("{name}-f32.gguf"));
        write_gguf(name, GgmlDType::F32, &f32_file);
        let m = load(&f32_file, Quantization::AsStored);
        let logits = m.forward(&ids(&r), None, None).unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d <= 1e-4, "{name} f32 GGUF vs transformers: {d}");
        // The 20-token prompt, where RoPE scaling (llama3's as llama.cpp
        // stores it: per-frequency divisors) shows.
        if let Some(long) = r.get("long_input_ids") {
            let long = long
                .to_dtype(DType::U32)
                .unwrap()
                .to_device(&device())
                .unwrap();
            let d = max_abs_diff(&m.forward(&long, None, None).unwrap(), &r["long_logits"]);
            assert!(d <= 1e-4, "{name} f32 GGUF, long prompt: {d}");
        }

        for (format, bound) in [(GgmlDType::Q8_0, 0.05), (GgmlDType::Q4_0, 0.15)] {
            let file = dir.path().join(format!("{name}-{format:?}.gguf"));
            write_gguf(name, format, &file);
            let quantized = load(&file, Quantization::AsStored);
            assert!(quantized
                .linear_layers()
                .iter()
                .all(|(_, l)| l.is_quantized()));
            let dense = load(&file, Quantization::Dense);
            assert!(dense.linear_layers().iter().all(|(_, l)| !l.is_quantized()));
            let (q, d) = (
                quantized.forward(&ids(&r), None, None).unwrap(),
                dense.forward(&ids(&r), None, None).unwrap(),
            );
            // The quantized kernels also round activations to 8 bits per
            // block: a small fraction of the logit scale.
            let diff = max_abs_diff(&q, &d);
            let agree = agreement(&q, &d);
            println!(
                "{name} {format:?}: max diff {diff:.4} (scale {:.2}), argmax agreement {agree}",
                abs_max(&d)
            );
            assert!(diff <= bound * abs_max(&d), "{name} {format:?}: {diff}");
            // 14 positions of a random tiny model with near-ties: one flip
            // is 7%; the logit bound above is the real check.
            assert!(agree >= 0.7, "{name} {format:?}: agreement {agree}");
        }
    }
}

/// A safetensors model quantized at load: every linear quantized, logits
/// within Q8_0's rounding of the dense model.
#[test]
fn safetensors_models_quantize_in_situ() {
    let r = reference("qwen2-tiny");
    let dense = load(&fixture("qwen2-tiny"), Quantization::AsStored);
    assert!(dense.linear_layers().iter().all(|(_, l)| !l.is_quantized()));
    let q = load(&fixture("qwen2-tiny"), Quantization::To(GgmlDType::Q8_0));
    assert!(q.linear_layers().iter().all(|(_, l)| l.is_quantized()));
    let (a, b) = (
        q.forward(&ids(&r), None, None).unwrap(),
        dense.forward(&ids(&r), None, None).unwrap(),
    );
    // Q8_0 rounds weights and (inside the kernels) activations to 8 bits
    // per block of 32; through two layers of these large random weights the
    // logits move by about 2.5% of their scale (measured 0.081 of 3.3).
    let (diff, agree) = (max_abs_diff(&a, &b), agreement(&a, &b));
    println!(
        "in-situ Q8_0: max diff {diff:.4} (scale {:.2}), agreement {agree}",
        abs_max(&b)
    );
    assert!(diff <= 0.05 * abs_max(&b), "in-situ Q8_0 vs dense: {diff}");
    assert!(agree >= 0.85, "in-situ Q8_0 argmax agreement {agree}");
    // Widths that are not whole blocks stay dense instead of failing:
    // Q4_K needs 256 columns, the tiny model has 64 and 96.
    let k = load(&fixture("qwen2-tiny"), Quantization::To(GgmlDType::Q4K));
    assert!(k.linear_layers().iter().all(|(_, l)| !l.is_quantized()));
    assert_eq!(
        "q4_k".parse::<Quantization>().unwrap(),
        Quantization::To(GgmlDType::Q4K)
    );
    assert_eq!(
        "Q8_0".parse::<Quantization>().unwrap(),
        Quantization::To(GgmlDType::Q8_0)
    );
    assert_eq!(
        "dense".parse::<Quantization>().unwrap(),
        Quantization::Dense
    );
    // The spelling the error message and `train_lora --quantize` use.
    for s in ["as-stored", "as_stored", "none"] {
        assert_eq!(s.parse::<Quantization>().unwrap(), Quantization::AsStored);
    }
    assert!("q3_0".parse::<Quantization>().is_err());
}

/// QLoRA: adapters over a Q8_0 base get gradients in every layer (through
/// the quantized matmuls below them), and the saved PEFT adapter applies to
/// the dense base with the same effect.
#[test]
fn qlora_trains_over_a_quantized_base_and_its_adapter_loads_on_the_dense_one() {
    let r = reference("qwen2-tiny");
    let mut base = load(&fixture("qwen2-tiny"), Quantization::To(GgmlDType::Q8_0));
    let cfg = LoRAAdapterConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    };
    let adapter = LoRAAdapter::new(cfg, &base, &device(), 3).unwrap();
    adapter.attach(&mut base).unwrap();
    // Make B non-zero so the adapter changes the output.
    for (_, l) in adapter.layers() {
        let b = l.b().as_tensor();
        l.b()
            .set(
                &((Tensor::arange(0f32, b.elem_count() as f32, b.device()).unwrap() * 0.37)
                    .unwrap()
                    .sin()
                    .unwrap()
                    * 0.05)
                    .unwrap()
                    .reshape(b.dims())
                    .unwrap(),
            )
            .unwrap();
    }
    let logits = base.forward(&ids(&r), None, None).unwrap();
    let grads =
        metal_candle::training::backward(&logits.sqr().unwrap().mean_all().unwrap()).unwrap();
    let with_grad = adapter
        .layers()
        .iter()
        .filter(|(_, l)| {
            grads.get(l.a().as_tensor()).is_some_and(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
        })
        .count();
    assert_eq!(
        with_grad, 14,
        "every A (7 modules x 2 layers) gets a gradient"
    );

    let dir = tempfile::tempdir().unwrap();
    save_peft_adapter(&adapter, dir.path(), None).unwrap();
    let mut dense = load(&fixture("qwen2-tiny"), Quantization::AsStored);
    load_peft_adapter(dir.path(), &device())
        .unwrap()
        .attach(&mut dense)
        .unwrap();
    let on_dense = dense.forward(&ids(&r), None, None).unwrap();
    // As in-situ quantization: Q8_0's rounding, a few % of the scale.
    let d = max_abs_diff(&on_dense, &logits);
    println!(
        "QLoRA adapter on dense vs quantized base: {d:.4} (scale {:.2})",
        abs_max(&on_dense)
    );
    assert!(agreement(&on_dense, &logits) >= 0.85);
    assert!(
        d <= 0.05 * abs_max(&on_dense),
        "adapter on dense vs quantized base: {d}"
    );
    assert!(
        max_abs_diff(&on_dense, &r["logits"]) > 1e-3,
        "the adapter changes the output"
    );
}

/// A Q5_0 weight on the CPU runs as the equal Q8_0 weight (Candle's vector
/// kernels instead of its scalar Q5_0 loop): every dequantized value is
/// bit-equal; many rows (dequantized) give the dense product; few rows go
/// through the quantized kernels, whose 8-bit activations round the
/// product. On an AVX-512 VNNI CPU Candle's Q8_0 kernel rounds activations
/// per 256 values (Q8_K) where its Q5_0 loop rounds per 32 (Q8_0): one row
/// measured 0.99% vs 0.57% of the largest output off the dense product
/// here (2-core EPYC), so the bound is the quantized kernels' own.
#[test]
fn q5_0_weights_on_the_cpu_keep_their_values() {
    use candle_core::quantized::QTensor;
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (96, 512), &dev).unwrap();
    let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q5_0).unwrap());
    let layer = metal_candle::layers::Linear::quantized(q.clone(), None, DType::F32).unwrap();
    assert!(layer.is_quantized());
    let dense = q.dequantize(&dev).unwrap();
    let ours: Vec<f32> = layer
        .dense_weight(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let theirs: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        ours.iter()
            .zip(&theirs)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "dequantized values differ"
    );
    for (rows, bound) in [(1, 0.03), (3, 0.03), (40, 1e-5)] {
        let x = Tensor::randn(0f32, 1.0, (rows, 512), &dev).unwrap();
        let reference = x.matmul(&dense.t().unwrap()).unwrap();
        let rel = max_abs_diff(&layer.forward(&x).unwrap(), &reference) / abs_max(&reference);
        assert!(rel <= bound, "{rows} rows: {rel}");
    }
}

/// Q8_0 products of a few rows (decoding) on the CPU: the activations
/// rounded to 8 bits per 32 values as llama.cpp and Candle's AVX2 loop do
/// (scale `max|x| / 127` rounded to f16), then exact integer block sums.
/// Computed here in f64 from the dequantized weight. At widths that are
/// not whole 256-value superblocks (896, Qwen2.5-0.5B's), where Candle runs
/// its per-32 loop on every x86 CPU, the result must also be bit-equal to
/// Candle's `QMatMul` (our AVX-512 VNNI kernel forms the same partial sums
/// in the same lanes and order: a kernel that only matched the f64 sums
/// to 1e-5 moved the real Qwen2.5-Coder's logits by 0.1). At 512 Candle's
/// VNNI tiles round activations per 256 values instead; ours keeps 32.
/// Output counts with and without a tail of 4.
#[test]
fn q8_0_products_round_activations_per_32_values() {
    use candle_core::quantized::QTensor;
    let dev = Device::Cpu;
    for (n, k) in [(96, 896), (38, 896), (64, 512)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let dense: Vec<Vec<f32>> = q.dequantize(&dev).unwrap().to_vec2().unwrap();
        let layer = metal_candle::layers::Linear::quantized(q.clone(), None, DType::F32).unwrap();
        for rows in [1, 3, 7] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let ours: Vec<Vec<f32>> = layer.forward(&x).unwrap().to_vec2().unwrap();
            if k % 256 != 0 {
                use candle_core::Module;
                let candle = candle_core::quantized::QMatMul::from_arc(q.clone()).unwrap();
                let theirs: Vec<Vec<f32>> = candle.forward(&x).unwrap().to_vec2().unwrap();
                assert_eq!(
                    ours, theirs,
                    "[{n}, {k}], {rows} rows: not Candle's numbers"
                );
            }
            for (r, xr) in x.to_vec2::<f32>().unwrap().iter().enumerate() {
                let mut want = vec![0f64; n];
                for (b, xb) in xr.chunks(32).enumerate() {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    let dx = f64::from(half::f16::from_f32(d).to_f32());
                    for (j, wj) in want.iter_mut().enumerate() {
                        let s: f64 = xb
                            .iter()
                            .zip(&dense[j][b * 32..(b + 1) * 32])
                            .map(|(&v, &wv)| f64::from((v * id).round()) * f64::from(wv))
                            .sum();
                        *wj += dx * s;
                    }
                }
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (j, (&o, &t)) in ours[r].iter().zip(&want).enumerate() {
                    let rel = (f64::from(o) - t).abs() / scale;
                    assert!(
                        rel <= 1e-5,
                        "[{n}, {k}], {rows} rows: row {r} out {j}: {o} vs {t}"
                    );
                }
            }
        }
    }
}

/// Q4_1 products of a few rows on the CPU (SmolLM2's format; Candle has
/// only its scalar loop for it on x86): bit-equal to Candle's `QMatMul`,
/// whichever kernel runs (ours on AVX-512 VNNI repeats that loop's f32
/// operations after exact integer block sums).
#[test]
fn q4_1_products_equal_candles() {
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::Module;
    let dev = Device::Cpu;
    for (n, k) in [(96, 576), (38, 576), (64, 512)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap());
        let layer = metal_candle::layers::Linear::quantized(q.clone(), None, DType::F32).unwrap();
        let candle = QMatMul::from_arc(q).unwrap();
        for rows in [1, 3, 7] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let ours: Vec<Vec<f32>> = layer.forward(&x).unwrap().to_vec2().unwrap();
            let theirs: Vec<Vec<f32>> = candle.forward(&x).unwrap().to_vec2().unwrap();
            assert_eq!(ours, theirs, "[{n}, {k}], {rows} rows");
        }
    }
}

/// Q5_0 products of a few rows on the CPU equal, bit for bit, those of the
/// same weight written as Q8_0 by hand here (the same integers in bytes):
/// the Q5_0 weight is converted at load (`backend::quant`) and runs on the
/// Q8_0 kernels. (Unpacking Q5_0 inside the AVX-512 VNNI kernel instead
/// gave the same numbers but decoded slower: BENCHMARKS.md, 2026-11-28.)
#[test]
fn q5_0_products_equal_those_of_its_q8_0_twin() {
    use candle_core::quantized::{QStorage, QTensor};
    use std::borrow::Cow;
    let dev = Device::Cpu;
    for (n, k) in [(96, 896), (38, 896), (64, 512)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q5 = QTensor::quantize(&w, GgmlDType::Q5_0).unwrap();
        // ggml's dequantize_row_q5_0, as bytes: value j from the low nibble
        // of byte j and bit j, value j + 16 from the high nibble and bit j + 16.
        let mut bytes = Vec::new();
        for b in q5.data().unwrap().chunks_exact(22) {
            bytes.extend_from_slice(&b[..2]);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let (mut lo, mut hi) = (Vec::new(), Vec::new());
            for j in 0..16 {
                let l = u32::from(b[6 + j] & 0x0F) | ((qh >> j) & 1) << 4;
                let h = u32::from(b[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
                lo.push(((l as i32 - 16) as i8).to_le_bytes()[0]);
                hi.push(((h as i32 - 16) as i8).to_le_bytes()[0]);
            }
            bytes.extend(lo);
            bytes.extend(hi);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &dev, GgmlDType::Q8_0).unwrap();
        let q8 = QTensor::new(storage, (n, k)).unwrap();
        let a = metal_candle::layers::Linear::quantized(std::sync::Arc::new(q5), None, DType::F32)
            .unwrap();
        let b = metal_candle::layers::Linear::quantized(std::sync::Arc::new(q8), None, DType::F32)
            .unwrap();
        for rows in [1, 3, 7] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let (ya, yb): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
                a.forward(&x).unwrap().to_vec2().unwrap(),
                b.forward(&x).unwrap().to_vec2().unwrap(),
            );
            assert_eq!(ya, yb, "[{n}, {k}], {rows} rows");
        }
    }
}

/// A quantized embedding table gives the rows of its dequantized copy
/// (Candle's `get_rows` on CUDA, its row dequantization on the CPU), in
/// the model's dtype and the ids' shape; a table in a dense GGUF type is
/// held dense.
#[test]
fn quantized_embedding_rows_equal_the_dequantized_tables() {
    use metal_candle::layers::Embedding;
    use std::sync::Arc;
    let dev = device();
    let table = Tensor::randn(0f32, 1.0, (50, 256), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[3u32, 49, 0], [7, 7, 12]], &dev).unwrap();
    for format in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let q = candle_core::quantized::QTensor::quantize(&table, format).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let q = candle_core::quantized::QTensor::new(
            candle_core::quantized::QStorage::from_data(q.data().unwrap(), &dev, format).unwrap(),
            (50, 256),
        )
        .unwrap();
        let q = Arc::new(q);
        for dtype in [DType::F32, DType::BF16] {
            let e = Embedding::quantized(q.clone(), dtype).unwrap();
            assert!(e.dense().is_none(), "{format:?} held dense");
            let rows = e.forward(&ids).unwrap();
            assert_eq!(rows.dims(), [2, 3, 256]);
            assert_eq!(rows.dtype(), dtype);
            let want = dense
                .index_select(
                    &ids.flatten_all().unwrap().to_device(&Device::Cpu).unwrap(),
                    0,
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .reshape((2, 3, 256))
                .unwrap()
                .to_device(&dev)
                .unwrap();
            // Equal on the CPU; CUDA's kernels may fuse the scale products
            // differently (an f32 ulp, or a bf16 one after rounding).
            let bound = match (dev.is_cpu(), dtype) {
                (true, _) => 0.0,
                (false, DType::F32) => 1e-5 * abs_max(&want),
                (false, _) => 1e-2 * abs_max(&want),
            };
            let d = max_abs_diff(&rows, &want);
            assert!(d <= bound, "{format:?} {dtype:?}: rows differ by {d}");
        }
    }
    // A table in a dense GGUF type (f16 here) is held dense.
    let narrow = Tensor::randn(0f32, 1.0, (10, 96), &Device::Cpu).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&narrow, GgmlDType::F16).unwrap();
    let e = Embedding::quantized(Arc::new(q), DType::F32).unwrap();
    assert!(e.dense().is_some());
}

/// The training loss over a head of several vocabulary slices (20,000
/// words; the loss forms logits 8,192 words at a time and dequantizes a
/// quantized head one slice at a time) equals the loss over the model's
/// logits, value and every LoRA gradient: a dense tied head and a Q8_0 one
/// (in-situ quantization, which quantizes the tied table too), with a few
/// and many ignored labels.
#[test]
fn the_loss_over_vocabulary_slices_equals_the_logits_loss() {
    use metal_candle::io::Weights;
    use metal_candle::models::{build_decoder, parse_decoder_config};
    use metal_candle::training::{backward, lm_loss, shifted_causal_lm_loss};
    let dev = device();
    let cfg = parse_decoder_config(
        &serde_json::json!({
            "model_type": "qwen2", "vocab_size": 20000, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
        })
        .to_string(),
        "test config",
    )
    .unwrap();
    let tensors = random_model::random_weights(&cfg, 0.5, DType::F32, &Device::Cpu).unwrap();
    for quantize in [None, Some(GgmlDType::Q8_0)] {
        let w = Weights::from_tensors(tensors.clone(), DType::F32, &dev, "random")
            .quantize_linears(quantize);
        let mut model = build_decoder(&cfg, &w).unwrap();
        assert_eq!(model.lm_head().is_quantized(), quantize.is_some());
        let lora = LoRAAdapterConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec![TargetModule::QProj, TargetModule::VProj],
            use_rslora: false,
        };
        let adapter = LoRAAdapter::new(lora, &*model, &dev, 3).unwrap();
        for (_, l) in adapter.layers() {
            let b = l.b().as_tensor();
            l.b()
                .set(&(Tensor::randn(0f32, 0.1, b.dims(), b.device()).unwrap()))
                .unwrap();
        }
        adapter.attach(&mut *model).unwrap();
        let (b, s) = (2, 40);
        let ids: Vec<u32> = (0..b * s).map(|i| ((i * 7919) % 20000) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, s), &dev).unwrap();
        let all = ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap();
        let mut few = all.clone();
        few[0][..3].fill(-100);
        let mut many = all;
        for row in &mut many {
            row[..25].fill(-100);
        }
        for labels in [few, many] {
            let labels = Tensor::new(labels, &dev).unwrap();
            let (fused, n1) = lm_loss(&*model, &ids, None, &labels).unwrap();
            let logits = model.forward(&ids, None, None).unwrap();
            let (plain, n2) = shifted_causal_lm_loss(&logits, &labels).unwrap();
            assert_eq!(n1, n2);
            let (f, p) = (
                fused.to_scalar::<f32>().unwrap(),
                plain.to_scalar::<f32>().unwrap(),
            );
            assert!(((f - p) / p).abs() < 1e-5, "{quantize:?}: {f} vs {p}");
            let (g1, g2) = (backward(&fused).unwrap(), backward(&plain).unwrap());
            for (name, var) in adapter.named_vars() {
                let r = crate::common::rel_diff(g1.get(&var).unwrap(), g2.get(&var).unwrap());
                assert!(r < 1e-4, "{quantize:?} {name}: rel {r:e}");
            }
        }
    }
}
