//! GGUF files (llama.cpp's format), read with Candle's GGUF reader: where a
//! source names one, its metadata, and its tensors as Candle `QTensor`s.
//! What the tensors mean is the architecture's business (`models`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use super::hub::ModelRepo;
use crate::error::{Error, Result};

/// Resolves `source` to a GGUF file when it names one: a local `.gguf` path,
/// `org/repo/file.gguf` (Hub cache or download), or a directory / repo whose
/// only weights file is a single `.gguf`. `Ok(None)` otherwise.
///
/// # Errors
/// Fails when the named file cannot be found.
pub fn resolve_gguf(source: &str) -> Result<Option<PathBuf>> {
    let path = Path::new(source);
    if path.is_file() {
        return Ok(is_gguf(source).then(|| path.to_path_buf()));
    }
    if is_gguf(source) {
        return match source.rsplit_once('/') {
            Some((repo, file)) if !Path::new(repo).is_dir() && repo.contains('/') => {
                ModelRepo::open(repo)?.get(file).map(Some)
            }
            _ => Err(Error::ModelNotFound(format!(
                "GGUF file {source} does not exist"
            ))),
        };
    }
    let repo = ModelRepo::open(source)?;
    if repo.get_optional("config.json")?.is_some() {
        return Ok(None);
    }
    let ggufs: Vec<&String> = repo.list_files()?.iter().filter(|f| is_gguf(f)).collect();
    match ggufs.as_slice() {
        [one] => repo.get(one).map(Some),
        [] => Ok(None),
        many => Err(Error::InvalidInput(format!(
            "{} holds several GGUF files ({}); name one as {source}/FILE.gguf",
            repo.describe(),
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn is_gguf(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".gguf")
}

/// An open GGUF file: metadata read, tensors read on demand.
pub(crate) struct GgufFile {
    path: PathBuf,
    file: std::fs::File,
    content: Content,
}

impl GgufFile {
    /// Opens `path` and reads its header and metadata.
    ///
    /// # Errors
    /// Unreadable or malformed file.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| Error::InvalidCheckpoint {
            path: path.to_path_buf(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
        })
    }

    /// Every metadata key/value.
    pub(crate) fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when it is missing.
    pub(crate) fn architecture(&self) -> Result<String> {
        self.metadata()
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| Error::InvalidConfig {
                origin: self.path.display().to_string(),
                message: "missing general.architecture".into(),
            })
    }

    /// Tensor names stored in the file.
    pub(crate) fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        names
    }

    /// The dims of tensor `name` (GGUF order reversed to row-major, as
    /// Candle reports them), if present.
    pub(crate) fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims().to_vec())
    }

    /// Reads tensor `name` (still quantized) onto `device`.
    ///
    /// # Errors
    /// [`Error::InvalidCheckpoint`] when it cannot be read.
    pub(crate) fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, device)
            .map_err(|e| Error::InvalidCheckpoint {
                path: self.path.clone(),
                message: format!("tensor {name}: {e}"),
            })
    }
}
