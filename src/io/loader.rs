//! Checkpoint loading: safetensors (single file or sharded, memory-mapped),
//! header-only inspection, and [`Weights`], the name → tensor source that
//! models are built from.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::hub::ModelRepo;
use crate::error::{Error, Result};

/// One tensor as described by a checkpoint header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Stored dtype (`F32`, `BF16`, …, or a GGUF quantization type).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements.
    #[must_use]
    pub fn numel(&self) -> usize {
        // Saturating: shapes come from files (checked against the file size
        // when read, but a hand-made `TensorInfo` may hold anything).
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }
}

/// What [`ModelLoader::inspect`] reports.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    /// The files read.
    pub files: Vec<PathBuf>,
    /// Every tensor, sorted by name.
    pub tensors: Vec<TensorInfo>,
}

impl CheckpointInfo {
    /// Total number of parameters.
    #[must_use]
    pub fn parameter_count(&self) -> usize {
        self.tensors
            .iter()
            .fold(0usize, |n, t| n.saturating_add(t.numel()))
    }
}

/// Finds and reads checkpoint files.
#[derive(Debug, Clone, Copy)]
pub struct ModelLoader;

impl ModelLoader {
    /// The safetensors files of a model: `model.safetensors`, or the shards
    /// listed in `model.safetensors.index.json`.
    ///
    /// # Errors
    /// Fails when neither exists or the index is malformed.
    pub fn safetensors_files(repo: &ModelRepo) -> Result<Vec<PathBuf>> {
        if let Some(index) = repo.get_optional("model.safetensors.index.json")? {
            #[derive(Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let parsed: Index =
                serde_json::from_str(&text).map_err(|e| Error::InvalidCheckpoint {
                    path: index.clone(),
                    message: format!("malformed shard index: {e}"),
                })?;
            let mut shards: Vec<&String> = parsed.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            // The index is data: a shard named `../../x` must not be read.
            for s in &shards {
                super::hub::inside_repo(s).map_err(|message| Error::InvalidCheckpoint {
                    path: index.clone(),
                    message: format!("shard {message}"),
                })?;
            }
            return shards.into_iter().map(|s| repo.get(s)).collect();
        }
        match repo.get_optional("model.safetensors")? {
            Some(p) => Ok(vec![p]),
            None => Err(Error::ModelNotFound(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                repo.describe()
            ))),
        }
    }

    /// Names, shapes and dtypes of every tensor of a model, reading only the
    /// file headers (no tensor data).
    ///
    /// # Errors
    /// Fails when the files are missing, truncated or malformed.
    pub fn inspect(repo: &ModelRepo) -> Result<CheckpointInfo> {
        let files = Self::safetensors_files(repo)?;
        Self::inspect_files(&files)
    }

    /// [`ModelLoader::inspect`] for explicit safetensors files.
    ///
    /// # Errors
    /// Fails when a file is missing, truncated or malformed.
    pub fn inspect_files(files: &[PathBuf]) -> Result<CheckpointInfo> {
        let mut tensors = Vec::new();
        for f in files {
            tensors.extend(read_safetensors_header(f)?);
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(CheckpointInfo {
            files: files.to_vec(),
            tensors,
        })
    }

    /// Memory-maps safetensors files as a [`Weights`] source that converts
    /// tensors to `dtype` on `device` as they are read.
    ///
    /// # Errors
    /// Fails when a file is missing, truncated or malformed.
    pub fn load_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Weights> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            // Validate the header ourselves first: it turns a truncated or
            // corrupt file into a clear error naming the file.
            for t in read_safetensors_header(f)? {
                index.insert(t.name, i);
            }
            // SAFETY: the file is mapped read-only; like every safetensors
            // reader we assume it is not modified while mapped.
            let st =
                unsafe { MmapedSafetensors::new(f) }.map_err(|e| Error::InvalidCheckpoint {
                    path: f.clone(),
                    message: crate::error::candle_message(e),
                })?;
            shards.push(st);
        }
        Ok(Weights {
            source: Source::Safetensors { shards, index },
            location: files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            dtype,
            device: device.clone(),
            quantized: HashMap::new(),
            quantize_to: None,
        })
    }
}

/// Reads a model's `config.json` into `T` and validates it with `validate`:
/// one place for the "unreadable / malformed / inconsistent config" errors of
/// every architecture.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl Fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_config(&text, &path.display().to_string(), validate)
}

/// [`read_config`] on text already read; `origin` names it in errors.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
    validate: impl Fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let invalid = |message: String| Error::config(origin, message);
    let cfg: T = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
    validate(&cfg).map_err(invalid)?;
    Ok(cfg)
}

/// Parses a safetensors header and checks it against the file size.
fn read_safetensors_header(path: &Path) -> Result<Vec<TensorInfo>> {
    let bad = |message: String| Error::InvalidCheckpoint {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| bad("file is shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    check_header_len(header_len, file_len).map_err(bad)?;
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("cannot read header: {e}")))?;
    parse_safetensors_header(&header, file_len - 8 - header_len).map_err(bad)
}

/// The header must fit the file (and a sane size: it is read into memory).
fn check_header_len(header_len: u64, file_len: u64) -> std::result::Result<(), String> {
    if header_len > 100_000_000 || header_len > file_len.saturating_sub(8) {
        return Err(format!(
            "header length {header_len} does not fit a file of {file_len} bytes (truncated or not safetensors)"
        ));
    }
    Ok(())
}

/// A whole safetensors file in memory: header checks as
/// [`read_safetensors_header`] (the fuzz targets call this).
pub(crate) fn parse_safetensors_bytes(
    bytes: &[u8],
) -> std::result::Result<Vec<TensorInfo>, String> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("file is shorter than a safetensors header")?;
    let header_len = u64::from_le_bytes(len_bytes);
    let file_len = bytes.len() as u64;
    check_header_len(header_len, file_len)?;
    // Fits in usize: at most 100 MB, checked above.
    let header = &bytes[8..8 + header_len as usize];
    parse_safetensors_header(header, file_len - 8 - header_len)
}

/// Parses the JSON header and checks every tensor's offsets against its
/// shape, its dtype and the `data_len` bytes that follow the header. All
/// arithmetic on the (untrusted) shapes and offsets is checked.
fn parse_safetensors_header(
    header: &[u8],
    data_len: u64,
) -> std::result::Result<Vec<TensorInfo>, String> {
    let parsed: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("header is not JSON: {e}"))?;
    let mut out = Vec::new();
    for (name, v) in parsed {
        if name == "__metadata__" {
            continue;
        }
        #[derive(Deserialize)]
        struct Entry {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: (u64, u64),
        }
        let e: Entry =
            serde_json::from_value(v).map_err(|e| format!("bad header entry for `{name}`: {e}"))?;
        let elem = dtype_size(&e.dtype)
            .ok_or_else(|| format!("`{name}` has unknown dtype {}", e.dtype))?;
        let (start, end) = e.data_offsets;
        let bytes = e
            .shape
            .iter()
            .try_fold(elem, |acc, &d| acc.checked_mul(d as u64));
        if end < start || bytes != Some(end - start) {
            return Err(format!(
                "`{name}`: data offsets {start}..{end} do not match shape {:?} of {}",
                e.shape, e.dtype
            ));
        }
        if end > data_len {
            return Err(format!(
                "`{name}` ends at byte {end} but the file holds {data_len} data bytes (truncated?)"
            ));
        }
        out.push(TensorInfo {
            name,
            dtype: e.dtype,
            shape: e.shape,
        });
    }
    Ok(out)
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

enum Source {
    Safetensors {
        shards: Vec<MmapedSafetensors>,
        index: HashMap<String, usize>,
    },
    Tensors(HashMap<String, Tensor>),
}

/// A checkpoint's tensors by name, read on demand and converted to one dtype
/// on one device. Models are built from this.
pub struct Weights {
    source: Source,
    location: String,
    dtype: DType,
    device: Device,
    /// Tensors kept in a GGUF block format (linear weights of GGUF files).
    quantized: HashMap<String, Arc<QTensor>>,
    /// Quantize dense linear weights to this format as they are loaded.
    quantize_to: Option<GgmlDType>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("location", &self.location)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Weights {
    /// Weights from tensors already in memory (tests, GGUF, merged adapters).
    /// Tensors are converted to `dtype` and moved to `device` when read.
    #[must_use]
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        location: &str,
    ) -> Self {
        Self {
            source: Source::Tensors(tensors),
            location: location.to_string(),
            dtype,
            device: device.clone(),
            quantized: HashMap::new(),
            quantize_to: None,
        }
    }

    /// Adds tensors kept quantized (GGUF block formats), looked up by
    /// [`Weights::quantized`] before the dense ones.
    #[must_use]
    pub fn with_quantized(mut self, tensors: HashMap<String, Arc<QTensor>>) -> Self {
        self.quantized.extend(tensors);
        self
    }

    /// Quantizes dense linear weights to `format` as models load them
    /// (`None`: keep them dense).
    #[must_use]
    pub fn quantize_linears(mut self, format: Option<GgmlDType>) -> Self {
        self.quantize_to = format;
        self
    }

    /// The quantized tensor `name`, if it is stored quantized.
    #[must_use]
    pub fn quantized(&self, name: &str) -> Option<Arc<QTensor>> {
        self.quantized.get(name).cloned()
    }

    /// The format dense linear weights are quantized to at load, if any.
    #[must_use]
    pub fn quantize_to(&self) -> Option<GgmlDType> {
        self.quantize_to
    }

    /// The dtype tensors are converted to.
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are moved to.
    #[must_use]
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether a tensor of that name exists.
    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        if self.quantized.contains_key(name) {
            return true;
        }
        match &self.source {
            Source::Safetensors { index, .. } => index.contains_key(name),
            Source::Tensors(t) => t.contains_key(name),
        }
    }

    /// Every tensor name, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.source {
            Source::Safetensors { index, .. } => index.keys().cloned().collect(),
            Source::Tensors(t) => t.keys().cloned().collect(),
        };
        names.sort();
        names
    }

    /// Reads tensor `name`, checking it has `shape`.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] or [`Error::ShapeMismatch`].
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_opt(name, shape)?
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                location: self.location.clone(),
            })
    }

    /// Like [`Weights::get`] but `Ok(None)` when the tensor does not exist.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], or a read failure.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let actual: Vec<usize> = match &self.source {
            Source::Safetensors { shards, index } => match index.get(name) {
                Some(&i) => shards[i].get(name)?.shape().to_vec(),
                None => return Ok(None),
            },
            Source::Tensors(t) => match t.get(name) {
                Some(t) => t.dims().to_vec(),
                None => return Ok(None),
            },
        };
        if actual != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual,
            });
        }
        let t = match &self.source {
            Source::Safetensors { shards, index } => {
                shards[index[name]].load(name, &Device::Cpu)?
            }
            Source::Tensors(t) => t[name].clone(),
        };
        Ok(Some(t.to_dtype(self.dtype)?.to_device(&self.device)?))
    }
}
