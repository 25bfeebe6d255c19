//! Atomic file and directory writes, and safetensors (de)serialisation for
//! f32 tensors with metadata.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, fsync, then rename, so readers never see a partial file.
///
/// # Errors
/// I/O errors.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Fills a directory atomically: `fill` writes into a temporary sibling
/// directory, which then replaces `dir` (an existing `dir` is removed
/// only after the new one is complete).
///
/// # Errors
/// I/O errors, or whatever `fill` returns.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().filter(|d| !d.as_os_str().is_empty());
    let parent = parent.unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{} is not a directory path", dir.display())))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The `checkpoint-{step}` folders of `dir`, by step (ascending).
///
/// # Errors
/// I/O errors other than `dir` not existing.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes what interrupted writes left in `dir`: `.NAME.tmp-PID` files and
/// folders (incomplete by definition) and `.NAME.del-PID` folders (being
/// deleted). A `.NAME.old-PID` folder is the previous complete copy of
/// `NAME`, set aside just before the new one was renamed into place: it is
/// put back when `NAME` is missing (the process died between the two
/// renames), removed otherwise. Returns how many entries were cleaned.
///
/// # Errors
/// I/O errors.
pub fn clean_stale_temporaries(dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut cleaned = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix('.') else {
            continue;
        };
        let Some((target, kind)) = [".tmp-", ".old-", ".del-"]
            .iter()
            .find_map(|k| rest.rsplit_once(k).map(|(t, pid)| (t, *k, pid)))
            .filter(|(_, _, pid)| pid.chars().all(|c| c.is_ascii_digit()) && !pid.is_empty())
            .map(|(t, k, _)| (t.to_string(), k))
        else {
            continue;
        };
        let path = entry.path();
        if kind == ".old-" && !target.is_empty() && !dir.join(&target).exists() {
            std::fs::rename(&path, dir.join(&target)).map_err(|e| Error::io(&path, e))?;
            tracing::warn!("restored {target} from an interrupted checkpoint write");
        } else {
            let res = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            res.map_err(|e| Error::io(&path, e))?;
            tracing::info!("removed stale temporary {}", path.display());
        }
        cleaned += 1;
    }
    Ok(cleaned)
}

/// Deletes the oldest `checkpoint-N` folders of `dir` so at most `keep`
/// remain. Each is first renamed to `.checkpoint-N.del-PID` (atomic), so an
/// interrupted delete never leaves a half-deleted checkpoint that looks
/// complete.
///
/// # Errors
/// I/O errors.
pub fn prune_checkpoints(dir: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(dir)?;
    let excess = all.len().saturating_sub(keep);
    for (step, path) in all.into_iter().take(excess) {
        let doomed = dir.join(format!(".checkpoint-{step}.del-{}", std::process::id()));
        std::fs::rename(&path, &doomed).map_err(|e| Error::io(&path, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        tracing::info!("deleted {} (save_total_limit)", path.display());
    }
    Ok(())
}

/// Serialises tensors (stored as f32) to safetensors bytes with
/// `metadata` (e.g. `{"format": "pt"}`, which transformers/peft expect).
/// The byte layout depends only on the names and values.
///
/// # Errors
/// Tensor or serialisation errors.
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v = t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidInput(format!("safetensors: {e}")))?;
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::InvalidInput(format!("safetensors: {e}")))
}

/// Reads every tensor of a safetensors file onto `device`.
///
/// # Errors
/// [`Error::InvalidCheckpoint`] for an unreadable file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    candle_core::safetensors::load(path, device).map_err(|e| Error::InvalidCheckpoint {
        path: PathBuf::from(path),
        message: crate::error::candle_message(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_are_removed_and_set_aside_copies_restored() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path();
        std::fs::create_dir_all(d.join(".checkpoint-4.tmp-17")).unwrap();
        std::fs::write(d.join(".metrics.jsonl.tmp-17"), b"x").unwrap();
        std::fs::create_dir_all(d.join(".checkpoint-2.del-17")).unwrap();
        // Died between the two renames: checkpoint-3 only exists as .old.
        std::fs::create_dir_all(d.join(".checkpoint-3.old-17")).unwrap();
        std::fs::write(d.join(".checkpoint-3.old-17").join("f"), b"1").unwrap();
        // Died after them: the .old copy is stale.
        std::fs::create_dir_all(d.join("checkpoint-5")).unwrap();
        std::fs::create_dir_all(d.join(".checkpoint-5.old-17")).unwrap();
        std::fs::write(d.join(".hidden-user-file"), b"keep").unwrap();
        assert_eq!(clean_stale_temporaries(d).unwrap(), 5);
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, [".hidden-user-file", "checkpoint-3", "checkpoint-5"]);
        assert!(d.join("checkpoint-3").join("f").exists());
    }

    #[test]
    fn pruning_keeps_the_newest_checkpoints() {
        let root = tempfile::tempdir().unwrap();
        for step in [10, 2, 30, 4] {
            std::fs::create_dir_all(root.path().join(format!("checkpoint-{step}"))).unwrap();
        }
        prune_checkpoints(root.path(), 2).unwrap();
        let steps: Vec<usize> = list_checkpoints(root.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, [10, 30]);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 2);
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_directories() {
        let root = tempfile::tempdir().unwrap();
        let f = root.path().join("a.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");

        let d = root.path().join("checkpoint-1");
        write_dir_atomic(&d, |tmp| write_atomic(&tmp.join("x"), b"1")).unwrap();
        write_dir_atomic(&d, |tmp| write_atomic(&tmp.join("y"), b"2")).unwrap();
        assert!(!d.join("x").exists() && d.join("y").exists());
        // A failing fill leaves the previous directory intact.
        let err = write_dir_atomic(&d, |_| Err(Error::InvalidInput("boom".into())));
        assert!(err.is_err() && d.join("y").exists());
        // No temporary files or directories are left behind.
        let names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
