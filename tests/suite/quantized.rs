//! Quantized weights: GGUF files stay quantized (Candle's quantized
//! matmuls), safetensors models quantize in situ, and QLoRA trains adapters
//! over a quantized base that then load on the dense one. The GGUF files are
//! made here with Candle's quantizer and writer from the tiny fixtures.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use metal_candle::models::{load_decoder_with, CausalLm, LoadOptions, Quantization};
use metal_candle::training::{
    load_peft_adapter, save_peft_adapter, LoRAAdapter, LoRAAdapterConfig, TargetModule,
};

use crate::common::{device, fixture, max_abs_diff, reference};

/// llama.cpp's tensor name for a Hugging Face one.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{g}.{kind}")
}

/// llama.cpp's `permute(w, n_head)` of q/k rows (for interleaved RoPE).
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// Writes fixture `name` as a GGUF file of architecture `arch` with its
/// linear weights in `format` (norms, embeddings and biases in f32), as
/// llama.cpp's converter lays it out.
fn write_gguf(name: &str, arch: &str, format: GgmlDType, out: &Path) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    let n = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let tensors =
        candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut q: Vec<(String, QTensor)> = Vec::new();
    for (hf, t) in &tensors {
        let mut t = t.to_dtype(DType::F32).unwrap();
        if arch == "llama" && hf.ends_with("q_proj.weight") {
            t = permute(&t, n("num_attention_heads") as usize);
        }
        if arch == "llama" && hf.ends_with("k_proj.weight") {
            t = permute(&t, n("num_key_value_heads") as usize);
        }
        let linear = hf.ends_with("_proj.weight") || hf == "lm_head.weight";
        let f = if linear { format } else { GgmlDType::F32 };
        q.push((gguf_name(hf), QTensor::quantize(&t, f).unwrap()));
    }
    let theta = cfg["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32;
    let mut md: Vec<(String, gguf_file::Value)> = vec![
        (
            "general.architecture".into(),
            gguf_file::Value::String(arch.into()),
        ),
        (
            format!("{arch}.embedding_length"),
            gguf_file::Value::U32(n("hidden_size")),
        ),
        (
            format!("{arch}.block_count"),
            gguf_file::Value::U32(n("num_hidden_layers")),
        ),
        (
            format!("{arch}.feed_forward_length"),
            gguf_file::Value::U32(n("intermediate_size")),
        ),
        (
            format!("{arch}.attention.head_count"),
            gguf_file::Value::U32(n("num_attention_heads")),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            gguf_file::Value::U32(n("num_key_value_heads")),
        ),
        (
            format!("{arch}.context_length"),
            gguf_file::Value::U32(n("max_position_embeddings")),
        ),
        (
            format!("{arch}.rope.freq_base"),
            gguf_file::Value::F32(theta),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
    ];
    if cfg["rope_parameters"]["rope_type"] == "linear" {
        let factor = cfg["rope_parameters"]["factor"].as_f64().unwrap() as f32;
        md.push((
            format!("{arch}.rope.scaling.type"),
            gguf_file::Value::String("linear".into()),
        ));
        md.push((
            format!("{arch}.rope.scaling.factor"),
            gguf_file::Value::F32(factor),
        ));
    }
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
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

fn scale(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
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
    for (name, arch) in [("qwen2-tiny", "qwen2"), ("llama-tiny-linear", "llama")] {
        let r = reference(name);
        let f32_file = dir.path().join(format!("{name}-f32.gguf"));
        write_gguf(name, arch, GgmlDType::F32, &f32_file);
        let logits = load(&f32_file, Quantization::AsStored)
            .forward(&ids(&r), None, None)
            .unwrap();
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d <= 1e-4, "{name} f32 GGUF vs transformers: {d}");

        for (format, bound) in [(GgmlDType::Q8_0, 0.05), (GgmlDType::Q4_0, 0.15)] {
            let file = dir.path().join(format!("{name}-{format:?}.gguf"));
            write_gguf(name, arch, format, &file);
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
                scale(&d)
            );
            assert!(diff <= bound * scale(&d), "{name} {format:?}: {diff}");
            assert!(agree >= 0.85, "{name} {format:?}: agreement {agree}");
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
        scale(&b)
    );
    assert!(diff <= 0.05 * scale(&b), "in-situ Q8_0 vs dense: {diff}");
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
    let grads = logits
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .backward()
        .unwrap();
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
        scale(&on_dense)
    );
    assert!(agreement(&on_dense, &logits) >= 0.85);
    assert!(
        d <= 0.05 * scale(&on_dense),
        "adapter on dense vs quantized base: {d}"
    );
    assert!(
        max_abs_diff(&on_dense, &r["logits"]) > 1e-3,
        "the adapter changes the output"
    );
}
