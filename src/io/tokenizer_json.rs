//! Reading `tokenizer.json` with the `tokenizers` crate, safely.
//!
//! `tokenizers` 0.23 panics on some malformed files instead of returning an
//! error (its decoder deserializer calls `expect` on a JSON syntax error;
//! found by the `tokenizer` fuzz target). The text is therefore checked to
//! be JSON first (which is what that `expect` trips on), and the parse runs
//! under `catch_unwind` as well, so any other panic in that crate becomes
//! an [`Error::Tokenizer`] too.

use std::path::Path;

use crate::error::{Error, Result};

/// Parses the text of a `tokenizer.json`; `origin` names it in errors.
///
/// # Errors
/// [`Error::Tokenizer`] for text that is not JSON or not a tokenizer.
pub(crate) fn parse_tokenizer_json(text: &str, origin: &str) -> Result<tokenizers::Tokenizer> {
    let bad = |m: String| Error::Tokenizer(format!("{origin}: {m}"));
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    std::panic::catch_unwind(move || serde_json::from_value::<tokenizers::Tokenizer>(value))
        .map_err(|_| bad("the tokenizers crate panicked on this file".into()))?
        .map_err(|e| bad(e.to_string()))
}

/// Reads and parses a `tokenizer.json` file.
///
/// # Errors
/// [`Error::Io`], or see [`parse_tokenizer_json`].
pub(crate) fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_tokenizer_json(&text, &path.display().to_string())
}
