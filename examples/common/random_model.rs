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
