//! Choosing the next token: penalties, temperature, top-k / top-p / min-p
//! filtering and a seeded draw, with transformers' semantics and order
//! (penalties, temperature, top-k, top-p, min-p).
//!
//! Where the work happens: the penalties, the temperature and the greedy
//! argmax run on the logits tensor on its device, so greedy decoding copies
//! one `u32` back per token. Sampling on a CUDA device runs every step
//! (penalties, temperature, filters, the draw) in one kernel over all the
//! batch's rows (`backend::kernels::sample`), which also copies one `u32`
//! per row back. Elsewhere the processed logits are copied to the host once
//! per token and filtered there in linear time: top-k with a partial
//! selection, min-p with a threshold, top-p by binning the logits by value
//! and sorting only the bin that holds the cut. Both paths keep the same
//! tokens and walk them in id order for the draw, so a seed gives the same
//! token on either (the GPU tier checks it).
//!
//! Sampled tokens are reproducible for a given seed (rand's `StdRng`), but are
//! not expected to equal transformers' samples: the random number generators
//! differ. The filters themselves equal transformers' logits warpers
//! (tests/suite/generation.rs).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How the next token is chosen from the logits.
///
/// Every non-greedy strategy first divides the logits by
/// [`GeneratorConfig::temperature`](super::GeneratorConfig::temperature).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum SamplingStrategy {
    /// The most likely token (transformers' `do_sample=False`).
    #[default]
    Greedy,
    /// Sampling from the whole distribution.
    Temperature,
    /// Sampling from the `k` most likely tokens (ties with the k-th kept).
    TopK(usize),
    /// Nucleus sampling: the most likely tokens whose mass reaches `p`.
    TopP(f32),
    /// Sampling from the tokens at least `p` times as likely as the best one.
    MinP(f32),
    /// Any combination, applied in transformers' order: top-k, top-p, min-p.
    Combined {
        /// Top-k filter.
        top_k: Option<usize>,
        /// Top-p (nucleus) filter.
        top_p: Option<f32>,
        /// Min-p filter.
        min_p: Option<f32>,
    },
}

impl SamplingStrategy {
    /// True for [`SamplingStrategy::Greedy`].
    #[must_use]
    pub fn is_greedy(&self) -> bool {
        matches!(self, Self::Greedy)
    }

    /// The `(top_k, top_p, min_p)` filters this strategy applies.
    #[must_use]
    pub fn filters(&self) -> (Option<usize>, Option<f32>, Option<f32>) {
        match *self {
            Self::Greedy | Self::Temperature => (None, None, None),
            Self::TopK(k) => (Some(k), None, None),
            Self::TopP(p) => (None, Some(p), None),
            Self::MinP(p) => (None, None, Some(p)),
            Self::Combined {
                top_k,
                top_p,
                min_p,
            } => (top_k, top_p, min_p),
        }
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `top_k == 0`, `top_p` outside
    /// `(0, 1]` or `min_p` outside `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        let (k, p, m) = self.filters();
        if k == Some(0) {
            return Err(Error::config(
                "sampling settings",
                "top_k must be at least 1",
            ));
        }
        if let Some(p) = p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::config(
                    "sampling settings",
                    format!("top_p must be in (0, 1], got {p}"),
                ));
            }
        }
        if let Some(m) = m {
            if !(0.0..=1.0).contains(&m) {
                return Err(Error::config(
                    "sampling settings",
                    format!("min_p must be in [0, 1], got {m}"),
                ));
            }
        }
        Ok(())
    }
}

/// The logits processing pipeline of one generation: penalties, temperature
/// and filters. Build it with [`LogitsProcessor::new`] or from a
/// [`GeneratorConfig`](super::GeneratorConfig).
#[derive(Debug, Clone, PartialEq)]
pub struct LogitsProcessor {
    /// transformers/CTRL repetition penalty (1 = off): every distinct token
    /// of the context has its logit divided by it when positive, multiplied
    /// when negative.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty: `logit -= frequency_penalty * count` for
    /// each generated token.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty: `logit -= presence_penalty` for each token
    /// generated at least once.
    pub presence_penalty: f32,
    /// Logits are divided by it before filtering (sampling only).
    pub temperature: f32,
    /// Token selection.
    pub strategy: SamplingStrategy,
}

impl Default for LogitsProcessor {
    fn default() -> Self {
        Self::new(SamplingStrategy::Greedy)
    }
}

/// The tokens that survive filtering, with their (processed) logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    /// `(token id, logit)` in ascending id order.
    pub tokens: Vec<(u32, f32)>,
}

impl LogitsProcessor {
    /// A processor with no penalty and temperature 1.
    #[must_use]
    pub fn new(strategy: SamplingStrategy) -> Self {
        Self {
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            temperature: 1.0,
            strategy,
        }
    }

    /// Applies the penalties to `logits` (`[vocab]`, on its device).
    /// `context` is every token the repetition penalty looks at (prompt and
    /// generated, as transformers); `generated` the tokens the frequency and
    /// presence penalties count.
    ///
    /// # Errors
    /// A token id outside the vocabulary, or tensor errors.
    pub fn apply_penalties(
        &self,
        logits: &Tensor,
        context: &[u32],
        generated: &[u32],
    ) -> Result<Tensor> {
        let vocab = logits.dim(0)?;
        let mut logits = logits.clone();
        let dev = logits.device().clone();
        let ids = self.repeated_ids(vocab, context)?;
        if !ids.is_empty() {
            let idx = Tensor::new(ids.as_slice(), &dev)?;
            let g = logits.index_select(&idx, 0)?;
            let p = Tensor::new(&[self.repetition_penalty], &dev)?;
            // Division (not multiplication by the inverse), as transformers,
            // so greedy ties resolve the same way.
            let new = g
                .lt(0f32)?
                .where_cond(&g.broadcast_mul(&p)?, &g.broadcast_div(&p)?)?;
            logits = logits.scatter(&idx, &new, 0)?;
        }
        let (ids, sub): (Vec<u32>, Vec<f32>) =
            self.subtractions(vocab, generated)?.into_iter().unzip();
        if !ids.is_empty() {
            let idx = Tensor::new(ids.as_slice(), &dev)?;
            let g = logits.index_select(&idx, 0)?;
            let new = (g - Tensor::new(sub.as_slice(), &dev)?)?;
            logits = logits.scatter(&idx, &new, 0)?;
        }
        Ok(logits)
    }

    /// The distinct ids of `context` the repetition penalty applies to, in
    /// ascending order (none when it is off).
    fn repeated_ids(&self, vocab: usize, context: &[u32]) -> Result<Vec<u32>> {
        if self.repetition_penalty == 1.0 || context.is_empty() {
            return Ok(Vec::new());
        }
        check_ids(context, vocab)?;
        let mut ids = context.to_vec();
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// `(id, frequency_penalty * count + presence_penalty)` for each
    /// distinct id of `generated`, in ascending id order (none when both
    /// penalties are off).
    fn subtractions(&self, vocab: usize, generated: &[u32]) -> Result<Vec<(u32, f32)>> {
        if (self.frequency_penalty == 0.0 && self.presence_penalty == 0.0) || generated.is_empty() {
            return Ok(Vec::new());
        }
        check_ids(generated, vocab)?;
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        let mut out: Vec<(u32, f32)> = counts
            .into_iter()
            .map(|(t, n)| (t, self.frequency_penalty * n as f32 + self.presence_penalty))
            .collect();
        out.sort_unstable_by_key(|x| x.0);
        Ok(out)
    }

    /// The penalty entries of one row for the sampling kernel: each
    /// distinct id the penalties touch, whether the repetition penalty
    /// applies to it, and what the frequency and presence penalties
    /// subtract (the same values [`Self::apply_penalties`] applies).
    ///
    /// # Errors
    /// A token id outside the vocabulary.
    #[cfg(feature = "cuda")]
    fn row_penalties(
        &self,
        vocab: usize,
        context: &[u32],
        generated: &[u32],
    ) -> Result<crate::backend::kernels::RowPenalties> {
        use std::collections::BTreeMap;
        let mut entries: BTreeMap<u32, (bool, f32)> = BTreeMap::new();
        for t in self.repeated_ids(vocab, context)? {
            entries.entry(t).or_insert((false, 0.0)).0 = true;
        }
        for (t, sub) in self.subtractions(vocab, generated)? {
            entries.entry(t).or_insert((false, 0.0)).1 = sub;
        }
        let mut out = crate::backend::kernels::RowPenalties::default();
        for (id, (repeat, sub)) in entries {
            out.ids.push(id);
            out.repeat.push(repeat);
            out.sub.push(sub);
        }
        Ok(out)
    }

    /// Divides by the temperature (on the device); identity at 1.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn apply_temperature(&self, logits: &Tensor) -> Result<Tensor> {
        if self.temperature == 1.0 {
            return Ok(logits.clone());
        }
        let t = Tensor::new(&[self.temperature], logits.device())?;
        Ok(logits.broadcast_div(&t)?)
    }

    /// Top-k, top-p and min-p over processed logits copied to the host.
    /// At least one token always survives (the most likely).
    #[must_use]
    pub fn candidates(&self, logits: &[f32]) -> Candidates {
        let (top_k, top_p, min_p) = self.strategy.filters();
        let mut c: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan() && **l > f32::NEG_INFINITY)
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if c.is_empty() {
            return Candidates { tokens: c };
        }
        if let Some(k) = top_k {
            // `k == 0` is rejected by `validate`; keep one token if it gets here.
            let k = k.max(1);
            if k < c.len() {
                // Partial selection: the k-th largest value in linear time;
                // ties with it are kept, as transformers' `scores < kth`.
                let mut vals: Vec<f32> = c.iter().map(|x| x.1).collect();
                let (_, kth, _) = vals.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                let kth = *kth;
                c.retain(|x| x.1 >= kth);
            }
        }
        if let Some(p) = top_p {
            if p < 1.0 {
                c = nucleus(c, p);
            }
        }
        if let Some(m) = min_p {
            // prob < min_p * max_prob  <=>  exp(l - max) < min_p (exp in
            // f32, as transformers' f32 softmax and the sampling kernel).
            let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
            let keep: Vec<(u32, f32)> = c
                .iter()
                .copied()
                .filter(|x| (x.1 - max).exp() >= m)
                .collect();
            if !keep.is_empty() {
                c = keep;
            }
        }
        Candidates { tokens: c }
    }

    /// The full processed logits (`[vocab]` f32 on the device of `logits`)
    /// with filtered tokens at `-inf`, as transformers' processors and
    /// warpers return them. Decoding uses the same steps without building
    /// this tensor; it is here to inspect and test them.
    ///
    /// # Errors
    /// See [`Self::apply_penalties`].
    pub fn process(&self, logits: &Tensor, context: &[u32], generated: &[u32]) -> Result<Tensor> {
        let l = self.apply_penalties(&logits.to_dtype(DType::F32)?, context, generated)?;
        if self.strategy.is_greedy() {
            return Ok(l);
        }
        let l = self.apply_temperature(&l)?;
        let host = l.to_vec1::<f32>()?;
        let mut out = vec![f32::NEG_INFINITY; host.len()];
        for (i, v) in self.candidates(&host).tokens {
            out[i as usize] = v;
        }
        Ok(Tensor::from_vec(out, host.len(), l.device())?)
    }
}

/// transformers' top-p: a token is removed when the ascending cumulative
/// probability up to and including it is `<= 1 - p`, i.e. kept when the mass
/// of the tokens more likely than it is `< p`.
///
/// Only the tokens around the cut are sorted. The logits are binned by
/// value (bin 0 the most likely); the bins' masses locate the bin holding
/// the cut; every token in a bin before it is kept, and only that bin is
/// sorted to place the cut exactly. A flat distribution (a random model, a
/// high temperature) puts most of a 150k vocabulary in the nucleus, which
/// the earlier grow-and-sort loop ended up sorting whole every token
/// (sampled decoding at b8 went from 66.6 to 141 tok/s on an H200 with
/// this, BENCHMARKS.md).
fn nucleus(mut c: Vec<(u32, f32)>, p: f32) -> Vec<(u32, f32)> {
    const BINS: usize = 4096;
    let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
    let min = c.iter().map(|x| x.1).fold(f32::INFINITY, f32::min);
    // exp in f32 (as transformers' f32 softmax), sums in f64.
    let total: f64 = c.iter().map(|x| f64::from((x.1 - max).exp())).sum();
    let p = f64::from(p);
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let width = f64::from(max) - f64::from(min);
    let last = if c.len() <= BINS || width.is_nan() || width <= 0.0 {
        let mut sorted = c.clone();
        sorted.sort_unstable_by(desc);
        last_kept(&sorted, 0.0, max, total, p)
    } else {
        // Monotone in the logit: equal logits share a bin, a larger logit
        // never lands in a later bin.
        let scale = (BINS - 1) as f64 / width;
        let bin = |l: f32| (((f64::from(max) - f64::from(l)) * scale) as usize).min(BINS - 1);
        let mut mass = vec![0f64; BINS];
        for x in &c {
            mass[bin(x.1)] += f64::from((x.1 - max).exp());
        }
        mass.iter_mut().for_each(|m| *m /= total);
        // The first bin whose tokens' preceding mass can reach p.
        // (None of them when rounding leaves the total just under p: keep all.)
        let (mut cut, mut before) = (BINS, 0.0f64);
        for (k, m) in mass.iter().enumerate() {
            if before + m >= p {
                cut = k;
                break;
            }
            before += m;
        }
        if cut == BINS {
            return c;
        }
        let mut edge: Vec<(u32, f32)> = c.iter().copied().filter(|x| bin(x.1) == cut).collect();
        edge.sort_unstable_by(desc);
        // All of the cut's bin kept (rounding): nothing after it is.
        last_kept(&edge, before, max, total, p).or(edge.last().copied())
    };
    // Every token ahead of the last kept one in (logit descending, id
    // ascending) order is kept: every token of an earlier bin has a larger
    // logit than any of the cut's bin, every token of a later bin a smaller
    // one. The kept tokens stay in id order, the order of the draw.
    if let Some((id, l)) = last {
        c.retain(|x| x.1 > l || (x.1 == l && x.0 <= id));
    }
    c
}

/// The last token of `sorted` (most likely first) that transformers' top-p
/// keeps, given `before`, the mass of the tokens ahead of it: a token is
/// kept while the mass ahead of it is `< p` (the first always). `None`
/// when all of `sorted` is kept.
fn last_kept(
    sorted: &[(u32, f32)],
    mut before: f64,
    max: f32,
    total: f64,
    p: f64,
) -> Option<(u32, f32)> {
    for i in 0..sorted.len() {
        if i > 0 && before >= p {
            return Some(sorted[i - 1]);
        }
        before += f64::from((sorted[i].1 - max).exp()) / total;
    }
    None
}

/// Picks tokens: greedy on the device, or a seeded draw over the candidates.
#[derive(Debug, Clone)]
pub struct Sampler {
    processor: LogitsProcessor,
    rng: StdRng,
}

impl Sampler {
    /// A sampler whose draws are determined by `seed`.
    #[must_use]
    pub fn new(processor: LogitsProcessor, seed: u64) -> Self {
        Self {
            processor,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The processing pipeline.
    #[must_use]
    pub fn processor(&self) -> &LogitsProcessor {
        &self.processor
    }

    /// The next token from `logits` (`[vocab]`, any float dtype, any
    /// device). `context` and `generated` feed the penalties (see
    /// [`LogitsProcessor::apply_penalties`]).
    ///
    /// # Errors
    /// Tensor errors, or logits that are all `-inf`/NaN (or contain `+inf`)
    /// when sampling.
    pub fn sample(&mut self, logits: &Tensor, context: &[u32], generated: &[u32]) -> Result<u32> {
        #[cfg(feature = "cuda")]
        if !self.processor.strategy.is_greedy() && logits.device().is_cuda() {
            let ids =
                self.sample_on_device(&logits.unsqueeze(0)?, &[Some((context, generated))])?;
            return ids
                .first()
                .copied()
                .flatten()
                .ok_or_else(|| Error::InvalidInput("no row to sample".into()));
        }
        let l =
            self.processor
                .apply_penalties(&logits.to_dtype(DType::F32)?, context, generated)?;
        if self.processor.strategy.is_greedy() {
            return Ok(l.argmax(0)?.to_scalar::<u32>()?);
        }
        // The temperature on the host, in the copy the filters read anyway
        // (the same f32 division `apply_temperature` makes on the device;
        // as a CPU tensor op it was 1.3 ms of a 151,936-entry row).
        let mut host = l.to_vec1::<f32>()?;
        let t = self.processor.temperature;
        if t != 1.0 {
            host.iter_mut().for_each(|v| *v /= t);
        }
        if host.contains(&f32::INFINITY) {
            return Err(positive_infinity());
        }
        let c = self.processor.candidates(&host);
        self.draw(&c)
    }

    /// One token per row of `logits` (`[rows, vocab]`), each row with its
    /// own `(context, generated)` history for the penalties (see
    /// [`Self::sample`]); a `None` row (a finished sequence) is skipped,
    /// draws nothing and gets `None`. The rows are drawn in order, so the
    /// tokens equal [`Self::sample`] called row by row with the same seed.
    ///
    /// Greedy decoding without penalties takes one argmax over the batch and
    /// sampling on a CUDA device one kernel: one copy of the ids per step.
    ///
    /// # Errors
    /// As [`Self::sample`], and a `rows` length other than the logits' rows.
    pub fn sample_batch(
        &mut self,
        logits: &Tensor,
        rows: &[Option<(&[u32], &[u32])>],
    ) -> Result<Vec<Option<u32>>> {
        let (b, _) = logits.dims2()?;
        if rows.len() != b {
            return Err(Error::InvalidInput(format!(
                "{b} rows of logits but {} histories",
                rows.len()
            )));
        }
        let p = &self.processor;
        let penalties =
            p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        if p.strategy.is_greedy() && !penalties {
            let ids: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            return Ok(rows.iter().zip(ids).map(|(r, id)| r.map(|_| id)).collect());
        }
        #[cfg(feature = "cuda")]
        if !p.strategy.is_greedy() && logits.device().is_cuda() {
            return self.sample_on_device(logits, rows);
        }
        let mut out = Vec::with_capacity(b);
        for (r, row) in rows.iter().enumerate() {
            out.push(match row {
                Some((context, generated)) => {
                    Some(self.sample(&logits.get(r)?, context, generated)?)
                }
                None => None,
            });
        }
        Ok(out)
    }

    /// [`Self::sample_batch`] for sampling on a CUDA device: the kernel in
    /// `backend::kernels::sample`, given each row's penalty entries and
    /// uniform draw.
    #[cfg(feature = "cuda")]
    fn sample_on_device(
        &mut self,
        logits: &Tensor,
        rows: &[Option<(&[u32], &[u32])>],
    ) -> Result<Vec<Option<u32>>> {
        use crate::backend::kernels::{sample_rows, SampleParams, NO_FINITE, POS_INF};
        let vocab = logits.dim(1)?;
        let mut u = Vec::with_capacity(rows.len());
        let mut penalties = Vec::with_capacity(rows.len());
        for row in rows {
            match row {
                Some((context, generated)) => {
                    penalties.push(self.processor.row_penalties(vocab, context, generated)?);
                    u.push(self.rng.random::<f64>());
                }
                None => {
                    penalties.push(Default::default());
                    u.push(0.0);
                }
            }
        }
        let (top_k, top_p, min_p) = self.processor.strategy.filters();
        let params = SampleParams {
            repetition_penalty: self.processor.repetition_penalty,
            temperature: self.processor.temperature,
            top_k: top_k.map_or(0, |k| k.max(1)),
            top_p: top_p.unwrap_or(1.0),
            min_p: min_p.unwrap_or(0.0),
        };
        let ids = sample_rows(logits, &u, &penalties, params)?;
        rows.iter()
            .zip(ids)
            .map(|(row, id)| match (row, id) {
                (None, _) => Ok(None),
                (Some(_), NO_FINITE) => Err(no_finite_logit()),
                (Some(_), POS_INF) => Err(positive_infinity()),
                (Some(_), id) => Ok(Some(id)),
            })
            .collect()
    }

    /// A draw from the softmax of the candidates' logits.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when there is no candidate.
    pub fn draw(&mut self, c: &Candidates) -> Result<u32> {
        let max = c
            .tokens
            .iter()
            .map(|x| x.1)
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::INFINITY {
            return Err(positive_infinity());
        }
        if c.tokens.is_empty() || !max.is_finite() {
            return Err(no_finite_logit());
        }
        // exp in f32, sums in f64 (as the sampling kernel).
        let weights: Vec<f64> = c
            .tokens
            .iter()
            .map(|x| f64::from((x.1 - max).exp()))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (w, t) in weights.iter().zip(&c.tokens) {
            if u < *w {
                return Ok(t.0);
            }
            u -= w;
        }
        // Rounding left `u` just above the last weight: take the last token.
        Ok(c.tokens[c.tokens.len() - 1].0)
    }
}

/// Softmax is undefined with +inf logits (transformers gives NaN
/// probabilities): say what happened rather than guess a token.
fn positive_infinity() -> Error {
    Error::InvalidInput(
        "no token can be sampled: the logits contain +inf (the model's activations overflowed)"
            .into(),
    )
}

fn no_finite_logit() -> Error {
    Error::InvalidInput("no token can be sampled: the logits are all -inf or NaN".into())
}

/// Fails for an id outside a vocabulary of `vocab` entries.
fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(Error::InvalidInput(format!(
            "token id {t} is outside the vocabulary ({vocab})"
        ))),
        None => Ok(()),
    }
}
