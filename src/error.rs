//! The library's error type. Every fallible public function returns [`Result`].

use std::path::PathBuf;

/// Errors returned by metal-candle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A model could not be found locally, in the Hugging Face cache, or on the Hub.
    #[error("model not found: {0}")]
    ModelNotFound(String),

    /// Downloading from the Hugging Face Hub failed.
    #[error("Hugging Face Hub error for {repo}: {message}")]
    Hub {
        /// Repository id.
        repo: String,
        /// What went wrong.
        message: String,
    },

    /// A configuration is missing fields, malformed or inconsistent: a
    /// model's `config.json` or GGUF metadata, or our own settings
    /// (generation, LoRA, training).
    #[error("invalid configuration ({origin}): {message}")]
    InvalidConfig {
        /// Where the config came from: a file, or the settings' name.
        origin: String,
        /// What is wrong with it.
        message: String,
    },

    /// A model's architecture is not one this library implements.
    #[error("architecture `{name}` is not supported (supported: {supported})")]
    UnsupportedArchitecture {
        /// `model_type` or GGUF `general.architecture`.
        name: String,
        /// The supported ones, comma-separated.
        supported: String,
    },

    /// A checkpoint file is unreadable: truncated, corrupt or of an unknown format.
    #[error("invalid checkpoint {path}: {message}")]
    InvalidCheckpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from {location}")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The checkpoint it was looked up in.
        location: String,
    },

    /// A tensor in the checkpoint has the wrong shape for the model's config.
    #[error("tensor `{name}` has shape {actual:?}, the config expects {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored in the checkpoint.
        actual: Vec<usize>,
    },

    /// Tokenizer loading, encoding or decoding failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// A prompt (plus the tokens to generate) does not fit the model's context window.
    #[error("context length exceeded: {requested} tokens requested, the limit is {limit}")]
    ContextLengthExceeded {
        /// Tokens needed.
        requested: usize,
        /// Tokens allowed.
        limit: usize,
    },

    /// An argument or an input is invalid (empty input, bad shape, bad option).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A dataset could not be read or produced no usable examples.
    #[error("dataset error: {0}")]
    Dataset(String),

    /// Training produced a NaN or infinite loss.
    #[error("training diverged: loss is {loss} at step {step}")]
    NonFiniteLoss {
        /// Optimizer step at which it happened.
        step: usize,
        /// The offending loss value.
        loss: f32,
    },
}

impl Error {
    /// An [`Error::InvalidConfig`] of `origin`.
    pub(crate) fn config(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidConfig {
            origin: origin.into(),
            message: message.into(),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result type of metal-candle.
pub type Result<T> = std::result::Result<T, Error>;
