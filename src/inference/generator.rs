//! [`Generator`]: text generation from a causal language model and its
//! tokenizer, with a KV cache, sampling, stop conditions, streaming, chat
//! and batches.

use candle_core::{DType, Device, Tensor};

use std::ops::Deref;

use super::chat::Message;
use super::decode_graph::DecodeGraph;
use super::language_model::LanguageModel;
use super::sampling::{LogitsProcessor, Sampler, SamplingStrategy};
use super::stop::{FinishReason, StopConditions};
use super::streaming::{GenerationOutput, SequenceState, TokenEvent};
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use crate::models::{CausalLm, KvCache};

/// Generation settings. [`Default`]: greedy, 256 tokens, stop on the
/// model's EOS ids, no penalty, special tokens left out of the text.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// The most tokens to generate (at least 1). The prompt plus
    /// `max_tokens` must fit the model's context, otherwise generation fails
    /// upfront with [`Error::ContextLengthExceeded`].
    pub max_tokens: usize,
    /// How tokens are chosen.
    pub sampling: SamplingStrategy,
    /// Divides the logits before sampling (`> 0`); `0` means greedy
    /// whatever `sampling` says. Greedy decoding ignores it (the argmax does
    /// not change).
    pub temperature: f32,
    /// transformers' repetition penalty (`> 0`, 1 = off), over the prompt
    /// and the generated tokens.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty over the generated tokens (0 = off).
    pub frequency_penalty: f32,
    /// OpenAI presence penalty over the generated tokens (0 = off).
    pub presence_penalty: f32,
    /// Stop at an end-of-sequence token.
    pub stop_on_eos: bool,
    /// End-of-sequence ids; `None` takes the tokenizer's / model's.
    pub eos_token_ids: Option<Vec<u32>>,
    /// Token sequences that end generation (not part of the text).
    pub stop_sequences: Vec<Vec<u32>>,
    /// Strings that end generation, matched on the decoded text (not part
    /// of the text).
    pub stop_strings: Vec<String>,
    /// Seed of the sampling RNG (reset at each generation); `None` draws a
    /// fresh one each time.
    pub seed: Option<u64>,
    /// Leave special tokens (`<|im_end|>`, …) out of the text.
    pub skip_special_tokens: bool,
    /// Padding id of batched prompts; `None` uses the first EOS id, else 0.
    pub pad_token_id: Option<u32>,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingStrategy::Greedy,
            temperature: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            stop_on_eos: true,
            eos_token_ids: None,
            stop_sequences: Vec::new(),
            stop_strings: Vec::new(),
            seed: None,
            skip_special_tokens: true,
            pad_token_id: None,
        }
    }
}

impl GeneratorConfig {
    /// Checks every value.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config("generation settings", m));
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be finite and >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be finite and > 0, got {}",
                self.repetition_penalty
            ));
        }
        if !self.frequency_penalty.is_finite() || !self.presence_penalty.is_finite() {
            return bad("frequency_penalty and presence_penalty must be finite".into());
        }
        self.sampling.validate()?;
        StopConditions::new(
            Vec::new(),
            self.stop_sequences.clone(),
            self.stop_strings.clone(),
        )?;
        Ok(())
    }

    /// The logits pipeline these settings describe (temperature 0 → greedy).
    #[must_use]
    pub fn logits_processor(&self) -> LogitsProcessor {
        let strategy = if self.temperature == 0.0 {
            SamplingStrategy::Greedy
        } else {
            self.sampling
        };
        LogitsProcessor {
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            temperature: self.temperature,
            strategy,
        }
    }
}

/// Generates text from a causal LM and its tokenizer. `M` is anything
/// that derefs to a [`CausalLm`]: the `Box<dyn CausalLm>` loading returns
/// (the default), or a borrow `&M`, so a model being trained can be sampled
/// without giving it up.
///
/// ```no_run
/// use metal_candle::inference::{Generator, GeneratorConfig, SamplingStrategy};
/// # fn main() -> metal_candle::Result<()> {
/// let config = GeneratorConfig {
///     max_tokens: 64,
///     sampling: SamplingStrategy::TopP(0.9),
///     temperature: 0.7,
///     seed: Some(42),
///     ..GeneratorConfig::default()
/// };
/// let mut gen = Generator::from_pretrained(
///     "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
///     None,
///     &candle_core::Device::Cpu,
///     config,
/// )?;
/// let out = gen.generate("def fibonacci(n):")?;
/// println!("{}", out.text);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Generator<M = Box<dyn CausalLm>> {
    pub(crate) model: M,
    pub(crate) tokenizer: TextTokenizer,
    pub(crate) cache: KvCache,
    config: GeneratorConfig,
}

impl Generator {
    /// A generator over a loaded [`LanguageModel`].
    ///
    /// # Errors
    /// An invalid `config`.
    pub fn new(lm: LanguageModel, config: GeneratorConfig) -> Result<Self> {
        Self::with_model(lm.model, lm.tokenizer, config)
    }

    /// Loads model and tokenizer from `source` (directory, Hub repo id or
    /// GGUF file, see [`LanguageModel::from_pretrained`]).
    ///
    /// # Errors
    /// Loading failures or an invalid `config`.
    pub fn from_pretrained(
        source: &str,
        dtype: Option<DType>,
        device: &Device,
        config: GeneratorConfig,
    ) -> Result<Self> {
        Self::new(
            LanguageModel::from_pretrained(source, dtype, device)?,
            config,
        )
    }
}

impl<M: Deref<Target: CausalLm>> Generator<M> {
    /// A generator over any model and its tokenizer.
    ///
    /// # Errors
    /// An invalid `config`.
    pub fn with_model(model: M, tokenizer: TextTokenizer, config: GeneratorConfig) -> Result<Self> {
        config.validate()?;
        let cache = model.new_cache();
        Ok(Self {
            model,
            tokenizer,
            cache,
            config,
        })
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// Replaces the settings.
    ///
    /// # Errors
    /// An invalid `config` (the old one is kept).
    pub fn set_config(&mut self, config: GeneratorConfig) -> Result<()> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// The model.
    #[must_use]
    pub fn model(&self) -> &M::Target {
        &self.model
    }

    /// The tokenizer.
    #[must_use]
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The KV cache: the last generation's positions, or only its prompt's
    /// where decoding continued in a [`DecodeGraph`]'s static cache (CUDA).
    #[must_use]
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Generates a continuation of `prompt`.
    ///
    /// # Errors
    /// Empty prompt, prompt plus `max_tokens` beyond the context
    /// ([`Error::ContextLengthExceeded`]), tokenizer or model failures.
    pub fn generate(&mut self, prompt: &str) -> Result<GenerationOutput> {
        let ids = self.encode(prompt)?;
        self.generate_tokens(&ids)
    }

    /// Generates a continuation of the token ids `prompt`.
    ///
    /// # Errors
    /// See [`Self::generate`].
    pub fn generate_tokens(&mut self, prompt: &[u32]) -> Result<GenerationOutput> {
        self.generate_tokens_stream(prompt, |_| true)
    }

    /// Renders `messages` with the model's chat template (generation prompt
    /// added) and generates the assistant's reply.
    ///
    /// # Errors
    /// No chat template, or see [`Self::generate`].
    pub fn generate_chat(&mut self, messages: &[Message]) -> Result<GenerationOutput> {
        let ids = self.encode_chat(messages)?;
        self.generate_tokens(&ids)
    }

    /// Generates while calling `on_token` for every token; returning `false`
    /// stops (the result is then [`FinishReason::Cancelled`]).
    ///
    /// # Errors
    /// See [`Self::generate`].
    pub fn generate_stream<F>(&mut self, prompt: &str, on_token: F) -> Result<GenerationOutput>
    where
        F: FnMut(&TokenEvent) -> bool,
    {
        let ids = self.encode(prompt)?;
        self.generate_tokens_stream(&ids, on_token)
    }

    /// [`Self::generate_stream`] from token ids.
    ///
    /// # Errors
    /// See [`Self::generate`].
    pub fn generate_tokens_stream<F>(
        &mut self,
        prompt: &[u32],
        mut on_token: F,
    ) -> Result<GenerationOutput>
    where
        F: FnMut(&TokenEvent) -> bool,
    {
        let mut stream = self.stream_tokens(prompt)?;
        for event in stream.by_ref() {
            if !on_token(&event?) {
                break;
            }
        }
        stream.into_output()
    }

    /// An iterator over the tokens generated from `prompt`.
    ///
    /// # Errors
    /// See [`Self::generate`]; errors while generating come as items.
    pub fn stream(&mut self, prompt: &str) -> Result<TokenStream<'_, M>> {
        let ids = self.encode(prompt)?;
        self.stream_tokens(&ids)
    }

    /// [`Self::stream`] from token ids.
    ///
    /// # Errors
    /// See [`Self::generate`].
    pub fn stream_tokens(&mut self, prompt: &[u32]) -> Result<TokenStream<'_, M>> {
        self.check_prompt(prompt.len())?;
        let sampler = self.sampler();
        let stop = self.stop_conditions()?;
        let max_tokens = self.config.max_tokens;
        let skip = self.config.skip_special_tokens;
        self.cache.reset();
        Ok(TokenStream::new(
            self, prompt, sampler, stop, max_tokens, skip,
        ))
    }

    /// Generates for several prompts at once (left-padded into one batch,
    /// each stopping on its own) and returns each text.
    ///
    /// # Errors
    /// See [`Self::generate`].
    pub fn generate_batch(&mut self, prompts: &[&str]) -> Result<Vec<String>> {
        let ids = prompts
            .iter()
            .map(|p| self.encode(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(self
            .generate_batch_tokens(&ids)?
            .into_iter()
            .map(|o| o.text)
            .collect())
    }

    /// Batched generation from token ids. Prompts are left-padded with
    /// [`GeneratorConfig::pad_token_id`] under an attention mask, so each
    /// row sees only its own tokens; a finished row is fed padding until
    /// every row is done, and its output stops at its own end. Repetition
    /// penalties look at each row's real tokens only (as transformers).
    /// Sampling draws from one RNG, row after row.
    ///
    /// # Errors
    /// No prompt, an empty prompt, or see [`Self::generate`].
    pub fn generate_batch_tokens(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<GenerationOutput>> {
        if prompts.is_empty() {
            return Err(Error::InvalidInput("no prompt in the batch".into()));
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        for p in prompts {
            self.check_prompt(p.len())?;
        }
        let b = prompts.len();
        let pad = self
            .config
            .pad_token_id
            .or_else(|| self.eos_ids().first().copied())
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(b * longest);
        let mut mask: Vec<u32> = Vec::with_capacity(b * longest);
        for p in prompts {
            let n = longest - p.len();
            ids.extend(std::iter::repeat_n(pad, n).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(0, n).chain(std::iter::repeat_n(1, p.len())));
        }
        let device = self.model.device().clone();
        let mut mask = Tensor::from_vec(mask, (b, longest), &device)?;
        let mut input = Tensor::from_vec(ids, (b, longest), &device)?;
        let mut sampler = self.sampler();
        let stop = self.stop_conditions()?;
        let skip = self.config.skip_special_tokens;
        let mut states: Vec<SequenceState> = prompts
            .iter()
            .map(|p| SequenceState::new(p, skip))
            .collect();
        self.cache.reset();
        // Prompts of one length need no padding: their decode steps can
        // replay one captured step on CUDA (see DecodeGraph).
        let same_length = prompts.iter().all(|p| p.len() == longest);
        let mut graph: Option<DecodeGraph> = None;
        let mut next_ids: Vec<u32> = Vec::new();
        for step in 0..self.config.max_tokens {
            let logits = match graph.as_mut() {
                Some(g) => g.step(&*self.model, &next_ids)?,
                None => {
                    let logits =
                        self.model
                            .forward_last(&input, Some(&mask), Some(&mut self.cache))?;
                    if step == 0 && same_length {
                        let capacity = longest + self.config.max_tokens;
                        graph = DecodeGraph::new(&*self.model, &self.cache, capacity)?;
                    }
                    logits
                }
            };
            // Every row at once (one kernel and one copy of the ids when
            // sampling on the GPU); finished rows draw nothing.
            let histories: Vec<Option<(&[u32], &[u32])>> = states
                .iter()
                .map(|s| {
                    s.finish_reason()
                        .is_none()
                        .then(|| (s.tokens(), s.generated()))
                })
                .collect();
            let ids = sampler.sample_batch(&logits, &histories)?;
            let mut next = Vec::with_capacity(b);
            for (state, id) in states.iter_mut().zip(ids) {
                let Some(id) = id else {
                    next.push(pad);
                    continue;
                };
                state.push(id, &stop, &self.tokenizer)?;
                if step + 1 == self.config.max_tokens {
                    state.close(FinishReason::MaxTokens, &stop, &self.tokenizer)?;
                }
                next.push(id);
            }
            if states.iter().all(|s| s.finish_reason().is_some()) {
                break;
            }
            if graph.is_some() {
                next_ids = next;
                continue;
            }
            input = Tensor::from_vec(next, (b, 1), &device)?;
            mask = Tensor::cat(&[&mask, &Tensor::ones((b, 1), DType::U32, &device)?], 1)?;
        }
        states
            .iter()
            .map(|s| s.output(&stop, &self.tokenizer, skip))
            .collect()
    }

    /// Token ids of `prompt` (fails when empty).
    ///
    /// # Errors
    /// Empty prompt or tokenizer failures.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        self.tokenizer.encode(prompt)
    }

    /// Token ids of `messages` rendered with the chat template.
    ///
    /// # Errors
    /// No chat template, no message, or tokenizer failures.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.tokenizer.apply_chat_template(messages)?;
        self.encode(&text)
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.config
            .eos_token_ids
            .clone()
            .unwrap_or_else(|| self.tokenizer.eos_token_ids().to_vec())
    }

    fn stop_conditions(&self) -> Result<StopConditions> {
        let eos = if self.config.stop_on_eos {
            self.eos_ids()
        } else {
            Vec::new()
        };
        StopConditions::new(
            eos,
            self.config.stop_sequences.clone(),
            self.config.stop_strings.clone(),
        )
    }

    fn sampler(&self) -> Sampler {
        let seed = self.config.seed.unwrap_or_else(rand::random);
        Sampler::new(self.config.logits_processor(), seed)
    }

    fn check_prompt(&self, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        let limit = self.model.context_length();
        let requested = len + self.config.max_tokens;
        if requested > limit {
            return Err(Error::ContextLengthExceeded { requested, limit });
        }
        Ok(())
    }
}

/// An iterator over the tokens of one generation, from
/// [`Generator::stream`]. Each item is one token; the last one carries the
/// finish reason. Call [`TokenStream::into_output`] for the result (also
/// after stopping early).
pub struct TokenStream<'a, M: Deref<Target: CausalLm>> {
    gen: &'a mut Generator<M>,
    state: SequenceState,
    sampler: Sampler,
    stop: StopConditions,
    last: Option<u32>,
    max_tokens: usize,
    done: bool,
    /// Decode steps after the prefill, on CUDA (see [`DecodeGraph`]).
    graph: Option<DecodeGraph>,
}

impl<M: Deref<Target: CausalLm>> std::fmt::Debug for TokenStream<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream")
            .field("generated", &self.state.generated().len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<'a, M: Deref<Target: CausalLm>> TokenStream<'a, M> {
    pub(crate) fn new(
        gen: &'a mut Generator<M>,
        prompt: &[u32],
        sampler: Sampler,
        stop: StopConditions,
        max_tokens: usize,
        skip_special_tokens: bool,
    ) -> Self {
        Self {
            gen,
            state: SequenceState::new(prompt, skip_special_tokens),
            sampler,
            stop,
            last: None,
            max_tokens,
            done: false,
            graph: None,
        }
    }

    /// Tokens generated so far.
    #[must_use]
    pub fn generated(&self) -> &[u32] {
        self.state.generated()
    }

    /// The result so far; a stream not run to its end is
    /// [`FinishReason::Cancelled`].
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn into_output(self) -> Result<GenerationOutput> {
        let skip = self.gen.config().skip_special_tokens;
        self.state.output(&self.stop, self.gen.tokenizer(), skip)
    }

    fn step(&mut self) -> Result<TokenEvent> {
        let g = &mut *self.gen;
        let device = g.model.device().clone();
        let logits = match (self.last, self.graph.as_mut()) {
            (Some(t), Some(graph)) => graph.step(&*g.model, &[t])?.squeeze(0)?,
            (Some(t), None) => g
                .model
                .forward_last(&Tensor::new(&[[t]], &device)?, None, Some(&mut g.cache))?
                .squeeze(0)?,
            (None, _) => {
                let input = Tensor::new(self.state.tokens(), &device)?.unsqueeze(0)?;
                let logits = g.model.forward_last(&input, None, Some(&mut g.cache))?;
                // The decode steps, on CUDA, replay one captured step.
                let capacity = self.state.tokens().len() + self.max_tokens;
                self.graph = DecodeGraph::new(&*g.model, &g.cache, capacity)?;
                logits.squeeze(0)?
            }
        };
        let id = self
            .sampler
            .sample(&logits, self.state.tokens(), self.state.generated())?;
        let index = self.state.generated().len();
        let mut text = self.state.push(id, &self.stop, &g.tokenizer)?;
        if self.state.finish_reason().is_none() && index + 1 >= self.max_tokens {
            text.push_str(
                &self
                    .state
                    .close(FinishReason::MaxTokens, &self.stop, &g.tokenizer)?,
            );
        }
        self.last = Some(id);
        self.done = self.state.finish_reason().is_some();
        Ok(TokenEvent {
            token: id,
            text,
            index,
            finish_reason: self.state.finish_reason(),
        })
    }
}

impl<M: Deref<Target: CausalLm>> Iterator for TokenStream<'_, M> {
    type Item = Result<TokenEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.step();
        if r.is_err() {
            self.done = true;
        }
        Some(r)
    }
}
