//! Streaming: UTF-8 safe incremental decoding, the per-token events, and the
//! iterator over them ([`TokenStream`]).

use super::stop::{FinishReason, StopConditions};
use super::tokenizer::TextTokenizer;
use crate::error::Result;

/// One generated token and the text it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEvent {
    /// The token id.
    pub token: u32,
    /// Text released by this token: whole characters only, possibly empty
    /// (an incomplete character or a possible stop-string start is held back
    /// until it resolves). Concatenating the events' texts gives the
    /// generation's text.
    pub text: String,
    /// Position of the token among the generated ones (from 0).
    pub index: usize,
    /// Set on the last event.
    pub finish_reason: Option<FinishReason>,
}

/// Decodes a growing token list piece by piece without splitting characters.
///
/// The "prefix offset" technique (as in text-generation-inference): the
/// tokens since the last emitted piece are decoded together with the
/// previous piece's tokens as context, and the new suffix is released only
/// when it does not end in U+FFFD, i.e. when no multi-byte character is
/// still incomplete.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// An empty decoder.
    #[must_use]
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// Adds `id`; returns the newly completed text (may be empty).
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        self.take(tokenizer, false)
    }

    /// Returns whatever is still held back (an incomplete character decodes
    /// as U+FFFD, as in a full decode).
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        self.take(tokenizer, true)
    }

    fn take(&mut self, tokenizer: &TextTokenizer, force: bool) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let skip = self.skip_special_tokens;
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], skip)?;
        let complete = !full.ends_with('\u{FFFD}');
        match full.get(prefix.len()..) {
            Some(new) if (complete || force) && full.starts_with(&prefix) => {
                let new = new.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                Ok(new)
            }
            _ => Ok(String::new()),
        }
    }
}

/// The text state of one sequence being generated: stop handling and
/// hold-back of text that is not safe to release yet.
#[derive(Debug, Clone)]
pub(crate) struct SequenceState {
    prompt_len: usize,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    /// Generated tokens that may start a stop sequence, not yet decoded.
    pending: Vec<u32>,
    decoder: IncrementalDecoder,
    /// Decoded text (cut before a stop string once one is found).
    text: String,
    /// Bytes of `text` already released.
    released: usize,
    /// Generated tokens that count as text (without a final EOS / stop sequence).
    kept: usize,
    finish: Option<FinishReason>,
}

impl SequenceState {
    pub(crate) fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        Self {
            prompt_len: prompt.len(),
            tokens: prompt.to_vec(),
            pending: Vec::new(),
            decoder: IncrementalDecoder::new(skip_special_tokens),
            text: String::new(),
            released: 0,
            kept: 0,
            finish: None,
        }
    }

    pub(crate) fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub(crate) fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub(crate) fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Records a generated token; returns the text it releases.
    pub(crate) fn push(
        &mut self,
        id: u32,
        stop: &StopConditions,
        tok: &TextTokenizer,
    ) -> Result<String> {
        self.tokens.push(id);
        if stop.is_eos(id) {
            self.kept = self.generated().len() - 1;
            return self.close(FinishReason::Eos, stop, tok);
        }
        self.pending.push(id);
        if let Some(m) = stop.sequence_match(self.generated()) {
            self.kept = self.generated().len() - m;
            let keep = self.pending.len().saturating_sub(m);
            self.pending.truncate(keep);
            return self.close(FinishReason::StopSequence, stop, tok);
        }
        self.kept = self.generated().len();
        let hold = stop.sequence_holdback(&self.pending);
        let feed: Vec<u32> = self.pending.drain(..self.pending.len() - hold).collect();
        self.feed(&feed, tok)?;
        if self.cut_at_stop_string(stop) {
            self.finish = Some(FinishReason::StopString);
            return Ok(self.release_all());
        }
        let h = stop.string_holdback(&self.text[self.released..]);
        let end = self.text.len() - h;
        let out = self.text[self.released..end].to_string();
        self.released = end;
        Ok(out)
    }

    /// Ends the sequence for `reason` (unless already ended) and returns the
    /// text still held back.
    pub(crate) fn close(
        &mut self,
        reason: FinishReason,
        stop: &StopConditions,
        tok: &TextTokenizer,
    ) -> Result<String> {
        if self.finish.is_some() {
            return Ok(String::new());
        }
        let pending = std::mem::take(&mut self.pending);
        self.feed(&pending, tok)?;
        let rest = self.decoder.flush(tok)?;
        self.text.push_str(&rest);
        self.finish = Some(if self.cut_at_stop_string(stop) {
            FinishReason::StopString
        } else {
            reason
        });
        Ok(self.release_all())
    }

    fn feed(&mut self, ids: &[u32], tok: &TextTokenizer) -> Result<()> {
        for &t in ids {
            let piece = self.decoder.push(tok, t)?;
            self.text.push_str(&piece);
        }
        Ok(())
    }

    /// A stop string can only start in the unreleased text (the released
    /// part was never a possible start of one).
    fn cut_at_stop_string(&mut self, stop: &StopConditions) -> bool {
        match stop.find_string(&self.text, self.released) {
            Some(pos) => {
                self.text.truncate(pos);
                true
            }
            None => false,
        }
    }

    fn release_all(&mut self) -> String {
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        out
    }

    /// The result. Its text is decoded afresh from the kept tokens (and cut
    /// at the first stop string), independently of the streamed pieces.
    pub(crate) fn output(
        &self,
        stop: &StopConditions,
        tok: &TextTokenizer,
        skip_special_tokens: bool,
    ) -> Result<GenerationOutput> {
        let generated = self.generated();
        let mut text = tok.decode(&generated[..self.kept], skip_special_tokens)?;
        if let Some(pos) = stop.find_string(&text, 0) {
            text.truncate(pos);
        }
        Ok(GenerationOutput {
            text,
            tokens: generated.to_vec(),
            prompt_tokens: self.prompt_len,
            finish_reason: self.finish.unwrap_or(FinishReason::Cancelled),
        })
    }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationOutput {
    /// The generated text (without EOS, stop sequence or stop string).
    pub text: String,
    /// Every generated token id, including a final EOS or stop sequence.
    pub tokens: Vec<u32>,
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
}
