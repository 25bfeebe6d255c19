//! Training data from JSONL: one example per line, in any of three formats
//!
//! - `{"text": "..."}`: every token is trained on;
//! - `{"prompt": "...", "completion": "..."}`: only the completion is;
//! - `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the
//!   model's chat template, only the assistant turns are trained on.
//!
//! Labels follow transformers' convention: `-100` ([`IGNORE_INDEX`]) marks
//! positions excluded from the loss (prompt tokens, padding).

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use super::loss::IGNORE_INDEX;
use crate::error::{Error, Result};
use crate::inference::{Message, TextTokenizer};

/// How examples are tokenised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetConfig {
    /// Longer examples are truncated to this many tokens.
    pub max_len: usize,
    /// Append the tokenizer's end-of-sequence token to `text` and
    /// `completion` examples (so the model learns to stop).
    pub add_eos: bool,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            max_len: 512,
            add_eos: true,
        }
    }
}

/// One tokenised example; `labels[t]` is the target for `input_ids[t]`
/// (the loss shifts by one) or `-100`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Same length; `-100` where the token is not trained on.
    pub labels: Vec<i64>,
}

impl Example {
    /// Tokens trained on: labels after the first (each label is predicted
    /// from the tokens before it) that are not ignored.
    fn num_targets(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// A padded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, s]` u32, right-padded.
    pub input_ids: Tensor,
    /// `[b, s]` u32, 1 = token, 0 = padding.
    pub attention_mask: Tensor,
    /// `[b, s]` i64, `-100` on prompt tokens and padding.
    pub labels: Tensor,
    /// Real (non-padding) tokens.
    pub num_tokens: usize,
    /// Labels that count in the (shifted) loss.
    pub num_targets: usize,
}

/// Tokenised examples.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    examples: Vec<Example>,
}

impl Dataset {
    /// Reads a JSONL file (see the module docs for the formats).
    ///
    /// # Errors
    /// [`Error::Dataset`] for an unreadable file, a malformed line (with its
    /// number), a chat line when the tokenizer has no template, or when no
    /// example is left (e.g. all prompts longer than `max_len`).
    pub fn from_jsonl(
        path: &Path,
        tokenizer: &TextTokenizer,
        config: &DatasetConfig,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Dataset(format!("cannot read {}: {e}", path.display())))?;
        Self::from_jsonl_str(&text, tokenizer, config)
            .map_err(|e| Error::Dataset(format!("{}: {e}", path.display())))
    }

    /// Like [`Self::from_jsonl`] on text already in memory.
    ///
    /// # Errors
    /// See [`Self::from_jsonl`].
    pub fn from_jsonl_str(
        text: &str,
        tokenizer: &TextTokenizer,
        config: &DatasetConfig,
    ) -> Result<Self> {
        if config.max_len < 2 {
            return Err(Error::config(
                "dataset config",
                "max_len must be at least 2 tokens",
            ));
        }
        let mut examples = Vec::new();
        let mut skipped = 0usize;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .map_err(|e| Error::Dataset(format!("line {n}: invalid JSON: {e}")))?;
            let mut ex = tokenize_record(&v, tokenizer, config)
                .map_err(|e| Error::Dataset(format!("line {n}: {e}")))?;
            ex.input_ids.truncate(config.max_len);
            ex.labels.truncate(config.max_len);
            // Position 0 is never a target after the shift.
            if ex.labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
                skipped += 1;
                continue;
            }
            examples.push(ex);
        }
        if skipped > 0 {
            tracing::warn!("skipped {skipped} examples with nothing to train on (prompt ≥ max_len or too short)");
        }
        if examples.is_empty() {
            return Err(Error::Dataset("no usable examples".into()));
        }
        Ok(Self { examples })
    }

    /// A dataset from tokenised examples.
    ///
    /// # Errors
    /// [`Error::Dataset`] when empty or an example's ids and labels differ in length.
    pub fn from_examples(examples: Vec<Example>) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::Dataset("no examples".into()));
        }
        if let Some(i) = examples
            .iter()
            .position(|e| e.input_ids.len() != e.labels.len() || e.input_ids.is_empty())
        {
            return Err(Error::Dataset(format!(
                "example {i}: ids and labels differ in length or are empty"
            )));
        }
        Ok(Self { examples })
    }

    /// Number of examples.
    #[must_use]
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The examples.
    #[must_use]
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Splits off a shuffled `eval_fraction` (at least one example each side).
    ///
    /// # Errors
    /// [`Error::Dataset`] with fewer than two examples or a fraction outside (0, 1).
    pub fn split(&self, eval_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) || self.len() < 2 {
            return Err(Error::Dataset(format!(
                "cannot split {} examples with eval fraction {eval_fraction}",
                self.len()
            )));
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let n_eval =
            ((self.len() as f64 * eval_fraction).round() as usize).clamp(1, self.len() - 1);
        let pick = |ids: &[usize]| Dataset {
            examples: ids.iter().map(|&i| self.examples[i].clone()).collect(),
        };
        Ok((pick(&idx[n_eval..]), pick(&idx[..n_eval])))
    }

    /// Number of batches of `batch_size` per epoch (the last may be smaller).
    #[must_use]
    pub fn num_batches(&self, batch_size: usize) -> usize {
        self.len().div_ceil(batch_size.max(1))
    }

    /// Example indices of batch `index` of `epoch`: the order is a seeded
    /// shuffle per epoch (`shuffle`), so any batch can be recomputed, e.g.
    /// after resuming.
    #[must_use]
    pub fn batch_indices(
        &self,
        batch_size: usize,
        epoch: usize,
        index: usize,
        shuffle: bool,
        seed: u64,
    ) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if shuffle {
            let s = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(s));
        }
        let bs = batch_size.max(1);
        order.into_iter().skip(index * bs).take(bs).collect()
    }

    /// Target tokens (labels after the shift that are not ignored) of the
    /// examples at `indices` (out-of-range indices count nothing): what
    /// [`Self::collate`] reports as `num_targets`, without collating.
    pub(crate) fn targets_of(&self, indices: &[usize]) -> usize {
        indices
            .iter()
            .filter_map(|&i| self.examples.get(i))
            .map(Example::num_targets)
            .sum()
    }

    /// Right-pads the examples `indices` into a [`Batch`] on `device`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for no or out-of-range indices; tensor errors.
    pub fn collate(&self, indices: &[usize], pad_id: u32, device: &Device) -> Result<Batch> {
        if indices.is_empty() || indices.iter().any(|&i| i >= self.len()) {
            return Err(Error::InvalidInput(format!(
                "bad batch indices {indices:?}"
            )));
        }
        let s = indices
            .iter()
            .map(|&i| self.examples[i].input_ids.len())
            .max()
            .unwrap_or(0);
        let b = indices.len();
        let mut ids = vec![pad_id; b * s];
        let mut mask = vec![0u32; b * s];
        let mut labels = vec![IGNORE_INDEX; b * s];
        let (mut num_tokens, mut num_targets) = (0, 0);
        for (r, &i) in indices.iter().enumerate() {
            let e = &self.examples[i];
            for (t, (&id, &l)) in e.input_ids.iter().zip(&e.labels).enumerate() {
                ids[r * s + t] = id;
                mask[r * s + t] = 1;
                labels[r * s + t] = l;
            }
            num_tokens += e.input_ids.len();
            num_targets += e.num_targets();
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, s), device)?,
            attention_mask: Tensor::from_vec(mask, (b, s), device)?,
            labels: Tensor::from_vec(labels, (b, s), device)?,
            num_tokens,
            num_targets,
        })
    }
}

fn field<'a>(v: &'a Value, k: &str) -> Result<&'a str> {
    v.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Dataset(format!("`{k}` must be a string")))
}

fn raw_ids(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .inner()
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec())
}

fn tokenize_record(v: &Value, tok: &TextTokenizer, cfg: &DatasetConfig) -> Result<Example> {
    let eos: Vec<u32> = if cfg.add_eos {
        tok.eos_token_ids().first().copied().into_iter().collect()
    } else {
        Vec::new()
    };
    if !v.is_object() {
        return Err(Error::Dataset("each line must be a JSON object".into()));
    }
    if let Some(msgs) = v.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(msgs.clone()).map_err(|e| {
            Error::Dataset(format!(
                "`messages` must be a list of {{role, content}}: {e}"
            ))
        })?;
        return tokenize_chat(&messages, tok);
    }
    if v.get("prompt").is_some() || v.get("completion").is_some() {
        let mut ids = tok.encode(field(v, "prompt")?)?;
        let n_prompt = ids.len();
        ids.extend(raw_ids(tok, field(v, "completion")?)?);
        ids.extend(&eos);
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i < n_prompt {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
            .collect();
        return Ok(Example {
            input_ids: ids,
            labels,
        });
    }
    if v.get("text").is_some() {
        let mut ids = tok.encode(field(v, "text")?)?;
        ids.extend(&eos);
        let labels = ids.iter().map(|&i| i64::from(i)).collect();
        return Ok(Example {
            input_ids: ids,
            labels,
        });
    }
    Err(Error::Dataset(
        "expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}".into(),
    ))
}

/// Renders the conversation; assistant turns are found by rendering the
/// prefixes (up to the generation prompt, and through the reply), whose
/// lengths bound each reply in the full text.
fn tokenize_chat(messages: &[Message], tok: &TextTokenizer) -> Result<Example> {
    let tmpl = tok
        .chat_template()
        .ok_or_else(|| Error::Dataset("chat examples need a model with a chat template".into()))?;
    if messages.is_empty() {
        return Err(Error::Dataset("`messages` is empty".into()));
    }
    let full = tmpl.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = if i == 0 {
            0
        } else {
            tmpl.render(&messages[..i], true)?.len()
        };
        let end = tmpl.render(&messages[..=i], false)?.len();
        if start > end || end > full.len() {
            return Err(Error::Dataset(
                "the chat template does not render conversations incrementally; cannot find the assistant turns".into(),
            ));
        }
        spans.push((start, end));
    }
    if spans.is_empty() {
        return Err(Error::Dataset(
            "the conversation has no assistant message".into(),
        ));
    }
    let enc = tok
        .inner()
        .encode(full.as_str(), false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let ids = enc.get_ids().to_vec();
    let labels = ids
        .iter()
        .zip(enc.get_offsets())
        .map(|(&id, &(s, _))| {
            if spans.iter().any(|&(a, b)| s >= a && s < b) {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok(Example {
        input_ids: ids,
        labels,
    })
}
