//! Adapters in Hugging Face peft's format: a directory with
//! `adapter_config.json` and `adapter_model.safetensors` whose keys are
//! `base_model.model.{layer path}.lora_A.weight` (`[r, in]`) and
//! `….lora_B.weight` (`[out, r]`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::checkpoint::{read_safetensors, safetensors_bytes, write_atomic};
use super::lora::{LoRAAdapter, LoRAAdapterConfig, TargetModule};
use super::optimizer::all_finite;
use crate::error::{Error, Result};

/// peft's prefix for a causal LM wrapped by `get_peft_model`.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// File names peft uses.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// See [`CONFIG_FILE`].
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The `adapter_config.json` peft writes for `config` (the fields peft
/// needs to rebuild the adapter; the others take peft's defaults).
#[must_use]
pub fn peft_config_json(config: &LoRAAdapterConfig, base_model: Option<&str>) -> Value {
    // Sorted, de-duplicated names so the file is stable.
    let mut targets: Vec<&str> = config.target_modules.iter().map(|m| m.name()).collect();
    targets.sort_unstable();
    targets.dedup();
    json!({
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": config.rank,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": config.use_rslora,
    })
}

/// Saves `adapter` in peft's format into `dir` (created if needed); each
/// file is written atomically.
///
/// # Errors
/// [`Error::InvalidInput`] when a weight is NaN or infinite (nothing is
/// written); I/O or tensor errors.
pub fn save_peft_adapter(
    adapter: &LoRAAdapter,
    dir: &Path,
    base_model: Option<&str>,
) -> Result<()> {
    // Never write an adapter that can only produce NaN.
    for (name, v) in adapter.named_vars() {
        if !all_finite(&[v.as_tensor()])? {
            return Err(Error::InvalidInput(format!(
                "not saving the adapter: `{name}` holds NaN or infinite values"
            )));
        }
    }
    let cfg = peft_config_json(adapter.config(), base_model);
    let text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::InvalidInput(format!("adapter config: {e}")))?;
    let tensors: Vec<(String, Tensor)> = adapter
        .named_vars()
        .into_iter()
        .map(|(n, v)| (format!("{PEFT_PREFIX}{n}"), v.as_tensor().clone()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors_bytes(&tensors, Some(meta))?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
    Ok(())
}

fn bad(dir: &Path, message: impl Into<String>) -> Error {
    Error::InvalidCheckpoint {
        path: dir.join(CONFIG_FILE),
        message: message.into(),
    }
}

/// Reads a peft `adapter_config.json` into our config.
///
/// # Errors
/// Unreadable file, or features we do not implement (DoRA, LoRA bias,
/// per-layer rank/alpha patterns, fan-in-fan-out, regex targets).
pub fn load_peft_config(dir: &Path) -> Result<LoRAAdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    parse_peft_config(&text, dir)
}

/// [`load_peft_config`] on the text of `dir`'s `adapter_config.json`.
pub(crate) fn parse_peft_config(text: &str, dir: &Path) -> Result<LoRAAdapterConfig> {
    let v: Value = serde_json::from_str(text).map_err(|e| bad(dir, e.to_string()))?;
    if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(bad(dir, "peft_type is not LORA"));
    }
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    for k in ["use_dora", "fan_in_fan_out", "lora_bias"] {
        if flag(k) {
            return Err(bad(dir, format!("`{k}` adapters are not supported")));
        }
    }
    if v.get("bias")
        .and_then(Value::as_str)
        .is_some_and(|b| b != "none")
    {
        return Err(bad(dir, "only bias = \"none\" is supported"));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if v.get(k)
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
        {
            return Err(bad(dir, format!("`{k}` is not supported")));
        }
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .and_then(|r| usize::try_from(r).ok())
        .ok_or_else(|| bad(dir, "missing `r`"))?;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad(dir, "missing `lora_alpha`"))?;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let targets =
        match v.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| bad(dir, "target_modules must be strings"))
                        .and_then(TargetModule::from_name)
                })
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(bad(
                dir,
                "target_modules must be a list of module names (regex targets are not supported)",
            )),
        };
    let config = LoRAAdapterConfig {
        rank,
        alpha,
        dropout,
        target_modules: targets,
        use_rslora: flag("use_rslora"),
    };
    config.validate().map_err(|e| bad(dir, e.to_string()))?;
    Ok(config)
}

/// Loads an adapter saved by peft's `save_pretrained` (or by
/// [`save_peft_adapter`]) onto `device`. Attach it with
/// [`LoRAAdapter::attach`].
///
/// # Errors
/// Missing files, unsupported options, tensors without their A/B partner
/// or of inconsistent rank, tensors that disagree with `target_modules`
/// (either way), NaN or infinite weights.
pub fn load_peft_adapter(dir: &Path, device: &Device) -> Result<LoRAAdapter> {
    let config = load_peft_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let tensors = read_safetensors(&path, device)?;
    adapter_from_tensors(config, tensors, &path)
}

/// The adapter that `tensors` (peft names) hold for `config`; `path` names
/// the weights file in errors. Refuses tensors that do not pair up, ranks
/// that differ from `r`, modules that disagree with `target_modules` either
/// way, and non-finite values (such an adapter would only produce NaN).
pub(crate) fn adapter_from_tensors(
    config: LoRAAdapterConfig,
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<LoRAAdapter> {
    let path = path.to_path_buf();
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        let inner = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
        let (layer, which) = if let Some(l) = inner.strip_suffix(".lora_A.weight") {
            (l, 0)
        } else if let Some(l) = inner.strip_suffix(".lora_B.weight") {
            (l, 1)
        } else {
            return Err(Error::InvalidCheckpoint {
                path,
                message: format!("unexpected tensor `{name}` (only lora_A/lora_B are supported)"),
            });
        };
        let e = pairs.entry(layer.to_string()).or_default();
        if which == 0 {
            e.0 = Some(t);
        } else {
            e.1 = Some(t);
        }
    }
    let mut layers = Vec::new();
    let mut found = std::collections::BTreeSet::new();
    for (layer, (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::InvalidCheckpoint {
                path,
                message: format!("`{layer}` lacks its lora_A or lora_B tensor"),
            });
        };
        if a.dims().len() != 2
            || a.dims()[0] != config.rank
            || b.dims().len() != 2
            || b.dims()[1] != config.rank
        {
            return Err(Error::InvalidCheckpoint {
                path,
                message: format!(
                    "`{layer}`: A {:?} / B {:?} do not have rank {}",
                    a.dims(),
                    b.dims(),
                    config.rank
                ),
            });
        }
        let module = layer
            .rsplit('.')
            .next()
            .and_then(|m| TargetModule::from_name(m).ok())
            .filter(|m| config.target_modules.contains(m))
            .ok_or_else(|| Error::InvalidCheckpoint {
                path: path.clone(),
                message: format!(
                    "`{layer}` is not one of the adapter's target_modules ({})",
                    module_names(&config.target_modules)
                ),
            })?;
        found.insert(module);
        for (which, t) in [("lora_A", &a), ("lora_B", &b)] {
            if !all_finite(&[t])? {
                return Err(Error::InvalidCheckpoint {
                    path,
                    message: format!(
                        "`{layer}.{which}.weight` holds NaN or infinite values (not finite)"
                    ),
                });
            }
        }
        layers.push((layer, a, b));
    }
    let missing: Vec<TargetModule> = config
        .target_modules
        .iter()
        .copied()
        .filter(|m| !found.contains(m))
        .collect();
    if !layers.is_empty() && !missing.is_empty() {
        return Err(Error::InvalidCheckpoint {
            path,
            message: format!(
                "target_modules names {} but the file has no tensors for them",
                module_names(&missing)
            ),
        });
    }
    if layers.is_empty() {
        return Err(Error::InvalidCheckpoint {
            path,
            message: "no LoRA tensors".into(),
        });
    }
    // Model order (layer index numerically, then module), not string order.
    layers.sort_by_key(|(p, _, _)| layer_sort_key(p));
    LoRAAdapter::from_layers(config, layers)
}

fn module_names(modules: &[TargetModule]) -> String {
    modules
        .iter()
        .map(|m| m.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn layer_sort_key(path: &str) -> (usize, usize, String) {
    let idx = path
        .split('.')
        .find_map(|s| s.parse::<usize>().ok())
        .unwrap_or(usize::MAX);
    let module = TargetModule::ALL
        .iter()
        .position(|m| path.ends_with(m.name()))
        .unwrap_or(usize::MAX);
    (idx, module, path.to_string())
}
