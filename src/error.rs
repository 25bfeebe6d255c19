//! The library's error type. Every fallible public function returns [`Result`].

use std::path::PathBuf;

/// Errors returned by metal-candle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside Candle. Built with `From`, which
    /// drops the backtrace Candle attaches under `RUST_BACKTRACE=1` so
    /// messages stay messages.
    #[error(transparent)]
    Candle(candle_core::Error),

    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// Multi-process (data-parallel) training failed: the rendezvous, a
    /// rank that exited or timed out, mismatched ranks or world sizes, or
    /// the collective library (NCCL).
    #[error("distributed training: {0}")]
    Distributed(String),

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

    /// An optimizer step produced NaN or infinite adapter weights. The
    /// step was not applied: the adapter keeps the values of the step before.
    #[error(
        "training diverged: optimizer step {step} produced non-finite adapter weights \
         (not applied; the adapter keeps the weights of step {previous})",
        previous = step.saturating_sub(1)
    )]
    NonFiniteWeights {
        /// The optimizer step (1-based) that was rejected.
        step: usize,
    },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(strip_backtrace(e))
    }
}

/// Candle's error without the backtraces it attaches when `RUST_BACKTRACE`
/// is set (they would otherwise be printed inside our messages), with
/// `context` joined by `": "` onto one line.
pub(crate) fn strip_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        C::Context { inner, context } => C::Msg(format!("{context}: {}", strip_backtrace(*inner))),
        C::WithPath { inner, path } => C::WithPath {
            inner: Box::new(strip_backtrace(*inner)),
            path,
        },
        other => other,
    }
}

/// The message of a Candle error, without backtrace.
pub(crate) fn candle_message(e: candle_core::Error) -> String {
    strip_backtrace(e).to_string()
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
