//! Where model files come from: a local directory, or a Hugging Face Hub
//! repository resolved through the Hugging Face cache.
//!
//! One code path serves everyone. A repo id is first looked up in the cache
//! (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), so
//! a machine with the files cached needs no network. With `HF_HUB_OFFLINE=1`
//! nothing is downloaded and a missing file is an error naming the cache
//! folder; otherwise missing files are downloaded with hf-hub into the same
//! cache. (hf-hub itself ignores `HF_HUB_OFFLINE` and `HF_HUB_CACHE`, which
//! is why the cache is consulted here first.)

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// A source of model files.
#[derive(Debug)]
pub struct ModelRepo {
    location: Location,
    /// File names of the repo, listed once when needed.
    listing: OnceLock<Vec<String>>,
}

#[derive(Debug)]
enum Location {
    Dir(PathBuf),
    Hub {
        repo_id: String,
        revision: String,
        cache: Cache,
    },
}

/// True when `HF_HUB_OFFLINE` asks for no network access.
#[must_use]
pub(crate) fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The Hugging Face hub cache folder in force (`HF_HUB_CACHE`, `$HF_HOME/hub`
/// or `~/.cache/huggingface/hub`).
#[must_use]
pub(crate) fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
        _ => Cache::from_env(),
    }
}

impl ModelRepo {
    /// Opens `source`: an existing directory, or a Hub repo id `org/name`
    /// (optionally `org/name@revision`).
    ///
    /// # Errors
    /// Fails when `source` is neither an existing directory nor a repo id.
    pub fn open(source: &str) -> Result<Self> {
        let path = Path::new(source);
        if path.is_dir() {
            return Ok(Self::from_dir(path));
        }
        let (repo_id, revision) = match source.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (source, "main"),
        };
        let looks_like_repo = repo_id.split('/').count() == 2
            && repo_id.split('/').all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            });
        if !looks_like_repo {
            return Err(Error::ModelNotFound(format!(
                "`{source}` is neither an existing directory nor a Hub repo id like `org/name`"
            )));
        }
        Ok(Self::from_hub(repo_id, revision))
    }

    /// A local directory holding the model files.
    #[must_use]
    pub fn from_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            location: Location::Dir(dir.into()),
            listing: OnceLock::new(),
        }
    }

    /// A Hub repository at `revision` (a branch, tag or commit).
    #[must_use]
    pub fn from_hub(repo_id: &str, revision: &str) -> Self {
        Self {
            location: Location::Hub {
                repo_id: repo_id.to_string(),
                revision: revision.to_string(),
                cache: hub_cache(),
            },
            listing: OnceLock::new(),
        }
    }

    /// A short human description: the directory, or `repo@revision`.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.location {
            Location::Dir(d) => d.display().to_string(),
            Location::Hub {
                repo_id, revision, ..
            } => format!("{repo_id}@{revision}"),
        }
    }

    /// The path of `filename`, downloading it if needed and allowed.
    /// `filename` is relative to the repo (`a/b.json`); names that would
    /// leave it (absolute, `..`, backslashes) are refused, since file names
    /// also come from the repo's own files (shard indexes, `modules.json`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a name outside the repo;
    /// [`Error::ModelNotFound`] when the file is not there (offline: not in
    /// the cache), [`Error::Hub`] when a download fails.
    pub fn get(&self, filename: &str) -> Result<PathBuf> {
        check_inside(filename)?;
        match &self.location {
            Location::Dir(dir) => {
                let p = dir.join(filename);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(Error::ModelNotFound(format!(
                        "`{filename}` not found in directory {}",
                        dir.display()
                    )))
                }
            }
            Location::Hub {
                repo_id,
                revision,
                cache,
            } => {
                if let Some(p) = self.cached(filename) {
                    return Ok(p);
                }
                if hub_offline() {
                    return Err(Error::ModelNotFound(format!(
                        "`{filename}` of {repo_id}@{revision} is not in the Hugging Face cache at {} \
                         and HF_HUB_OFFLINE is set (fetch it with scripts/fetch-models.sh or go online)",
                        cache.path().display()
                    )));
                }
                tracing::info!("downloading {filename} from {repo_id}@{revision}");
                let api = ApiBuilder::from_cache(cache.clone())
                    .with_progress(true)
                    .build()
                    .map_err(|e| self.hub_error(&e))?;
                api.repo(hub_repo(repo_id, revision))
                    .get(filename)
                    .map_err(|e| self.hub_error(&e))
            }
        }
    }

    /// Like [`ModelRepo::get`], but `Ok(None)` when the repo has no such file.
    ///
    /// # Errors
    /// Fails when listing the repo or downloading fails.
    pub fn get_optional(&self, filename: &str) -> Result<Option<PathBuf>> {
        check_inside(filename)?;
        if let Some(p) = self.cached(filename) {
            return Ok(Some(p));
        }
        if self.list_files()?.iter().any(|f| f == filename) {
            self.get(filename).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The names of the repo's files (offline: those in the cache).
    ///
    /// # Errors
    /// Fails when the directory cannot be read or the Hub cannot be reached
    /// (and nothing is cached).
    pub fn list_files(&self) -> Result<&[String]> {
        if let Some(l) = self.listing.get() {
            return Ok(l);
        }
        let files = match &self.location {
            Location::Dir(dir) => list_dir(dir, dir)?,
            Location::Hub {
                repo_id,
                revision,
                cache,
            } => match self.snapshot_dir() {
                Some(snap) if hub_offline() => list_dir(&snap, &snap)?,
                _ if hub_offline() => {
                    return Err(Error::ModelNotFound(format!(
                        "{repo_id}@{revision} is not in the Hugging Face cache at {} and \
                         HF_HUB_OFFLINE is set (fetch it with scripts/fetch-models.sh or go online)",
                        cache.path().display()
                    )))
                }
                snap => {
                    let online = ApiBuilder::from_cache(cache.clone())
                        .build()
                        .and_then(|api| api.repo(hub_repo(repo_id, revision)).info());
                    match (online, snap) {
                        (Ok(info), _) => info.siblings.into_iter().map(|s| s.rfilename).collect(),
                        // Unreachable Hub but a cached snapshot: use what is cached.
                        (Err(e), Some(snap)) => {
                            tracing::warn!("{}; using the cached files", self.hub_error(&e));
                            list_dir(&snap, &snap)?
                        }
                        (Err(e), None) => return Err(self.hub_error(&e)),
                    }
                }
            },
        };
        Ok(self.listing.get_or_init(|| files))
    }

    /// The cached snapshot folder of a Hub repo at its revision, if any.
    fn snapshot_dir(&self) -> Option<PathBuf> {
        let Location::Hub {
            repo_id,
            revision,
            cache,
        } = &self.location
        else {
            return None;
        };
        let repo_dir = cache.path().join(hub_repo(repo_id, revision).folder_name());
        let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
            revision.clone()
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(revision))
                .ok()?
                .trim()
                .to_string()
        };
        let snap = repo_dir.join("snapshots").join(commit);
        snap.is_dir().then_some(snap)
    }

    fn cached(&self, filename: &str) -> Option<PathBuf> {
        match &self.location {
            Location::Dir(dir) => Some(dir.join(filename)).filter(|p| p.is_file()),
            Location::Hub { .. } => self
                .snapshot_dir()
                .map(|s| s.join(filename))
                .filter(|p| p.is_file()),
        }
    }

    fn hub_error(&self, e: &dyn std::fmt::Display) -> Error {
        Error::Hub {
            repo: self.describe(),
            message: format!(
                "{e} (set HF_HUB_OFFLINE=1 to use only the cache, or fetch the files with \
                 scripts/fetch-models.sh)"
            ),
        }
    }
}

/// Refuses a repo file name that could resolve outside the repo folder: an
/// absolute path, a `..` or `.` component, an empty component, a backslash
/// (a separator on Windows) or a NUL.
pub(crate) fn inside_repo(filename: &str) -> std::result::Result<(), String> {
    let bad = filename.is_empty()
        || filename.starts_with('/')
        || filename.contains(['\\', '\0'])
        || filename
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(format!(
            "`{filename}` points outside the model folder (absolute, `..`, `\\` or empty parts); \
             only files inside it are read"
        ));
    }
    Ok(())
}

fn check_inside(filename: &str) -> Result<()> {
    inside_repo(filename).map_err(Error::InvalidInput)
}

fn hub_repo(repo_id: &str, revision: &str) -> Repo {
    Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string())
}

fn list_dir(root: &Path, dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if path.is_dir() {
            out.extend(list_dir(root, &path)?);
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    out.sort();
    Ok(out)
}
