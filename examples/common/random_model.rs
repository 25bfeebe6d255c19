//! Random weights at real model shapes, for benchmarks without a
//! checkpoint (shared by examples/bench_compare.rs and benches/jobs.rs).
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use metal_candle::io::Weights;
use metal_candle::models::{build_decoder, parse_decoder_config, CausalLm, DecoderConfig};

/// A decoder with random N(0, `std`) weights for the `config_json` shape.
///
/// # Errors
/// An invalid config or allocation failures.
pub fn random_decoder(
    config_json: &serde_json::Value,
    std: f32,
    dtype: DType,
    device: &Device,
) -> metal_candle::Result<(DecoderConfig, Box<dyn CausalLm>)> {
    let cfg = parse_decoder_config(&config_json.to_string(), "benchmark config")?;
    let t = random_weights(&cfg, std, dtype, device)?;
    let model = build_decoder(&cfg, &Weights::from_tensors(t, dtype, device, "random"))?;
    Ok((cfg, model))
}

/// Random tensors for every weight of a `config` model, under the names
/// the Llama-family decoder reads: N(0, `std`) matrices and biases, norm weights 1.
/// For benchmarks and tests at real shapes without a checkpoint.
///
/// # Errors
/// Tensor allocation failures.
pub fn random_weights(
    config: &DecoderConfig,
    std: f32,
    dtype: DType,
    device: &Device,
) -> metal_candle::Result<HashMap<String, Tensor>> {
    let (h, i, d) = (
        config.hidden_size,
        config.intermediate_size,
        config.head_dim,
    );
    let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![config.vocab_size, h],
        ),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !config.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![config.vocab_size, h]));
    }
    for l in 0..config.num_hidden_layers {
        let mut layer = vec![
            ("self_attn.q_proj.weight", vec![nh * d, h]),
            ("self_attn.k_proj.weight", vec![nkv * d, h]),
            ("self_attn.v_proj.weight", vec![nkv * d, h]),
            ("self_attn.o_proj.weight", vec![h, nh * d]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ];
        if config.attention_bias {
            layer.push(("self_attn.q_proj.bias", vec![nh * d]));
            layer.push(("self_attn.k_proj.bias", vec![nkv * d]));
            layer.push(("self_attn.v_proj.bias", vec![nkv * d]));
        }
        if config.mlp_bias {
            layer.push(("mlp.gate_proj.bias", vec![i]));
            layer.push(("mlp.up_proj.bias", vec![i]));
            layer.push(("mlp.down_proj.bias", vec![h]));
        }
        if config.qk_norm {
            layer.push(("self_attn.q_norm.weight", vec![d]));
            layer.push(("self_attn.k_norm.weight", vec![d]));
        }
        shapes.extend(
            layer
                .into_iter()
                .map(|(n, s)| (format!("model.layers.{l}.{n}"), s)),
        );
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape, dtype, device)?
            } else {
                Tensor::randn(0f32, std, shape, device)?.to_dtype(dtype)?
            };
            Ok((name, t))
        })
        .collect()
}

/// llama.cpp's tensor name for a Hugging Face one (`None`: not stored).
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// llama.cpp's `permute(w, n_head)` of q/k rows (for interleaved RoPE).
fn permute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Writes `tensors` (Hugging Face names, any float dtype) of a `config`
/// model as a GGUF file the way llama.cpp's converter lays it out: its
/// names, its metadata keys, llama-arch q/k rows permuted, linear weights
/// and the embedding table in `format`, everything else in f32. For tests
/// and benchmarks.
///
/// # Errors
/// Quantization (a width that is not whole blocks) or I/O failures.
pub fn write_gguf(
    tensors: &HashMap<String, Tensor>,
    config: &DecoderConfig,
    format: candle_core::quantized::GgmlDType,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    use candle_core::quantized::{gguf_file::Value, GgmlDType, QTensor};
    use metal_candle::layers::RopeScaling;
    let arch = config.model_type.as_str();
    let mut q: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for hf in names {
        let Some(name) = gguf_name(hf) else {
            anyhow::bail!("no GGUF name for {hf}");
        };
        let mut t = tensors[hf].to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        if matches!(arch, "llama" | "mistral") {
            if hf.ends_with("q_proj.weight") {
                t = permute(&t, config.num_attention_heads)?;
            } else if hf.ends_with("k_proj.weight") {
                t = permute(&t, config.num_key_value_heads)?;
            }
        }
        // Linear weights and the embedding table in `format` (llama.cpp
        // quantizes `token_embd` too, when its rows are whole blocks);
        // norms and biases in f32.
        let linear = hf.ends_with("_proj.weight") || hf == "lm_head.weight";
        let table =
            hf == "model.embed_tokens.weight" && t.dim(1)?.is_multiple_of(format.block_size());
        let f = if linear || table {
            format
        } else {
            GgmlDType::F32
        };
        q.push((name, QTensor::quantize(&t, f)?));
    }
    // llama.cpp's converter writes Llama 3.1's RoPE scaling as one divisor
    // per frequency (`rope_freqs.weight`), not as metadata.
    if let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max,
    } = config.rope_scaling
    {
        let dim = config.head_dim;
        let old = original_max as f64;
        let divisors: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let d = if wavelen < old / high_freq_factor {
                    1.0
                } else if wavelen > old / low_freq_factor {
                    factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                d as f32
            })
            .collect();
        let t = Tensor::from_vec(divisors, dim / 2, &Device::Cpu)?;
        q.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let u = |v: usize| Value::U32(v as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.embedding_length"), u(config.hidden_size)),
        (format!("{arch}.block_count"), u(config.num_hidden_layers)),
        (
            format!("{arch}.feed_forward_length"),
            u(config.intermediate_size),
        ),
        (
            format!("{arch}.attention.head_count"),
            u(config.num_attention_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u(config.num_key_value_heads),
        ),
        (format!("{arch}.attention.key_length"), u(config.head_dim)),
        (
            format!("{arch}.context_length"),
            u(config.max_position_embeddings),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(config.rope_theta as f32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
    ];
    if let RopeScaling::Linear { factor } = config.rope_scaling {
        md.push((
            format!("{arch}.rope.scaling.type"),
            Value::String("linear".into()),
        ));
        md.push((
            format!("{arch}.rope.scaling.factor"),
            Value::F32(factor as f32),
        ));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = path.with_extension("gguf.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
