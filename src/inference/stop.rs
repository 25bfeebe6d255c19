//! Stop conditions: end-of-sequence ids, token-id sequences and strings.
//!
//! Stop strings are looked for in the decoded text (so they match however
//! the tokenizer splits them). While streaming, text that could be the start
//! of a stop string is held back until it is known not to be one, so a stop
//! string is never emitted nor returned.

use crate::error::{Error, Result};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token was generated (it is not part of the text).
    Eos,
    /// A stop token sequence was generated (not part of the text).
    StopSequence,
    /// A stop string appeared in the text (the text ends before it).
    StopString,
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The streaming callback asked to stop, or the stream was dropped.
    Cancelled,
}

/// The stop conditions of one generation.
#[derive(Debug, Clone, Default)]
pub struct StopConditions {
    eos: Vec<u32>,
    sequences: Vec<Vec<u32>>,
    strings: Vec<String>,
}

impl StopConditions {
    /// Stops on any of `eos`, on any of the token `sequences` and on any of
    /// the `strings`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an empty sequence or string.
    pub fn new(eos: Vec<u32>, sequences: Vec<Vec<u32>>, strings: Vec<String>) -> Result<Self> {
        if sequences.iter().any(Vec::is_empty) {
            return Err(Error::config(
                "stop conditions",
                "a stop token sequence is empty",
            ));
        }
        if strings.iter().any(String::is_empty) {
            return Err(Error::config("stop conditions", "a stop string is empty"));
        }
        Ok(Self {
            eos,
            sequences,
            strings,
        })
    }

    /// True when `token` ends the generation.
    #[must_use]
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos.contains(&token)
    }

    /// The length of a stop sequence that `generated` ends with, if any.
    #[must_use]
    pub fn sequence_match(&self, generated: &[u32]) -> Option<usize> {
        self.sequences
            .iter()
            .filter(|s| generated.ends_with(s))
            .map(Vec::len)
            .max()
    }

    /// The longest suffix of `tokens` that is a proper prefix of a stop
    /// sequence: those tokens must be held back.
    #[must_use]
    pub fn sequence_holdback(&self, tokens: &[u32]) -> usize {
        let mut best = 0;
        for s in &self.sequences {
            for n in (best + 1..s.len().min(tokens.len() + 1)).rev() {
                if tokens.ends_with(&s[..n]) {
                    best = n;
                    break;
                }
            }
        }
        best
    }

    /// The earliest byte position at or after `from` where a stop string
    /// starts in `text`.
    #[must_use]
    pub fn find_string(&self, text: &str, from: usize) -> Option<usize> {
        let tail = text.get(from..)?;
        self.strings
            .iter()
            .filter_map(|s| tail.find(s.as_str()))
            .min()
            .map(|p| p + from)
    }

    /// How many bytes at the end of `text` could begin a stop string (and so
    /// must not be emitted yet). Always a character boundary.
    #[must_use]
    pub fn string_holdback(&self, text: &str) -> usize {
        let mut best = 0;
        for s in &self.strings {
            // Only the last `s.len() - 1` bytes can be a proper prefix of `s`.
            let mut start = text.len().saturating_sub(s.len().saturating_sub(1));
            while !text.is_char_boundary(start) {
                start += 1;
            }
            for (i, _) in text[start..].char_indices() {
                let suffix = &text[start + i..];
                if suffix.len() <= best {
                    break;
                }
                if s.starts_with(suffix) {
                    best = suffix.len();
                    break;
                }
            }
        }
        best
    }
}
