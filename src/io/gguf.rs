//! GGUF files (llama.cpp's format), read with Candle's GGUF reader: where a
//! source names one, its metadata, and its tensors as Candle `QTensor`s.
//! What the tensors mean is the architecture's business (`models`).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
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

/// An open GGUF file: metadata read, tensors read on demand. `R` is the
/// file, or any reader (the fuzz targets read from memory).
pub(crate) struct GgufFile<R = std::fs::File> {
    path: PathBuf,
    file: R,
    file_len: u64,
    content: Content,
}

impl GgufFile {
    /// Opens `path` and reads its header and metadata.
    ///
    /// # Errors
    /// Unreadable or malformed file.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        GgufFile::from_reader(file, path)
    }
}

impl<R: Read + Seek> GgufFile<R> {
    /// Reads the header and metadata of the GGUF file in `reader`; `path`
    /// names it in errors.
    ///
    /// # Errors
    /// [`Error::InvalidCheckpoint`] for a malformed file.
    pub(crate) fn from_reader(mut reader: R, path: &Path) -> Result<Self> {
        let bad = |message: String| Error::InvalidCheckpoint {
            path: path.to_path_buf(),
            message: format!("not a readable GGUF file: {message}"),
        };
        let file_len = reader
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(path, e))?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        precheck(&mut reader, file_len).map_err(bad)?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let content =
            Content::read(&mut reader).map_err(|e| bad(crate::error::candle_message(e)))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: reader,
            file_len,
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

    /// Reads tensor `name` (still quantized) onto `device`. Its size is
    /// computed with checked arithmetic and must lie inside the file before
    /// anything is allocated: the dims are the file's word.
    ///
    /// # Errors
    /// [`Error::InvalidCheckpoint`] when it cannot be read.
    pub(crate) fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        let bad = |message: String| Error::InvalidCheckpoint {
            path: self.path.clone(),
            message: format!("tensor {name}: {message}"),
        };
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| bad("not in the file".into()))?;
        let dims = info.shape.dims();
        if dims.is_empty() || dims.contains(&0) {
            return Err(bad(format!("has no elements (dims {dims:?})")));
        }
        let elems = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
        let block = info.ggml_dtype.block_size();
        if block == 0 || elems % block != 0 {
            return Err(bad(format!(
                "{elems} elements do not fill blocks of {block} ({:?})",
                info.ggml_dtype
            )));
        }
        let bytes = (elems / block)
            .checked_mul(info.ggml_dtype.type_size())
            .and_then(|b| u64::try_from(b).ok());
        let end = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .zip(bytes)
            .and_then(|(start, len)| start.checked_add(len));
        if end.is_none_or(|end| end > self.file_len) {
            return Err(bad(format!(
                "dims {dims:?} at offset {} do not fit the file ({} bytes; truncated?)",
                info.offset, self.file_len
            )));
        }
        self.content
            .tensor(&mut self.file, name, device)
            .map_err(|e| bad(crate::error::candle_message(e)))
    }
}

/// Walks the GGUF header before Candle's reader does, for what that reader
/// does not check: `general.alignment` of 0 (it divides by it). Anything
/// else malformed is left for Candle's reader to report (this returns
/// `Ok`), so the messages stay Candle's.
fn precheck<R: Read + Seek>(r: &mut R, file_len: u64) -> std::result::Result<(), String> {
    fn u32_<R: Read>(r: &mut R) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_<R: Read>(r: &mut R) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    /// A length (u32 in v1, u64 after) no larger than what is left.
    fn len<R: Read + Seek>(r: &mut R, v1: bool, file_len: u64) -> Option<u64> {
        let n = if v1 { u64::from(u32_(r)?) } else { u64_(r)? };
        let left = file_len.saturating_sub(r.stream_position().ok()?);
        (n <= left).then_some(n)
    }
    fn skip<R: Seek>(r: &mut R, n: u64) -> Option<()> {
        r.seek(SeekFrom::Current(i64::try_from(n).ok()?)).ok()?;
        Some(())
    }
    /// Skips a value of type `ty`; returns it when it is an integer.
    fn value<R: Read + Seek>(
        r: &mut R,
        ty: u32,
        v1: bool,
        file_len: u64,
        depth: u32,
    ) -> Option<Option<i128>> {
        let mut int = |n: usize, signed: bool| -> Option<Option<i128>> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b[..n]).ok()?;
            let u = u64::from_le_bytes(b);
            let v = if signed {
                let shift = 64 - 8 * n as u32;
                i128::from(((u << shift) as i64) >> shift)
            } else {
                i128::from(u)
            };
            Some(Some(v))
        };
        match ty {
            0 => int(1, false),
            1 => int(1, true),
            2 => int(2, false),
            3 => int(2, true),
            4 => int(4, false),
            5 => int(4, true),
            10 => int(8, false),
            11 => int(8, true),
            6 => skip(r, 4).map(|()| None),
            12 => skip(r, 8).map(|()| None),
            7 => skip(r, 1).map(|()| None),
            8 => {
                let n = len(r, v1, file_len)?;
                skip(r, n).map(|()| None)
            }
            9 if depth < 4 => {
                let inner = u32_(r)?;
                let n = len(r, v1, file_len)?;
                for _ in 0..n {
                    value(r, inner, v1, file_len, depth + 1)?;
                }
                Some(None)
            }
            _ => None,
        }
    }
    let walk = |r: &mut R| -> Option<Option<i128>> {
        if u32_(r)? != u32::from_le_bytes(*b"GGUF") {
            return None;
        }
        let v1 = u32_(r)? == 1;
        let _tensors = len(r, v1, file_len)?;
        let kvs = len(r, v1, file_len)?;
        for _ in 0..kvs {
            let n = len(r, v1, file_len)?;
            let mut key = vec![0u8; usize::try_from(n).ok()?];
            r.read_exact(&mut key).ok()?;
            let ty = u32_(r)?;
            let v = value(r, ty, v1, file_len, 0)?;
            if key == b"general.alignment" {
                return Some(v);
            }
        }
        None
    };
    // Candle reads a negative alignment as the default; zero divides by zero.
    if let Some(Some(0)) = walk(r) {
        return Err("general.alignment is 0".into());
    }
    Ok(())
}
