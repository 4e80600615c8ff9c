//! Our own token sampler, run inside mistral.rs as a per-request logits processor.
//!
//! mistral.rs 0.8.1 returns neither the sampled ids nor natural-log probabilities, and has no
//! per-request seed. So each sequence gets a [`RecordingSampler`]: it sees the raw logits,
//! draws the token itself from a stream keyed by (seed, position), records (id, ln p), and
//! hands back a mask that is 0 at the chosen id and -inf elsewhere; the engine's greedy sampler
//! then emits exactly that id.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mistralrs::{CustomLogitsProcessor, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::SamplingConfig;
use crate::seed::splitmix64;

/// Identifies one prompt's random streams: (run seed, step, prompt). The sample index and the
/// token position are mixed in below, so no stream depends on batch composition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SeedKey {
    pub run: u64,
    pub step: u64,
    pub prompt: u64,
}

impl SeedKey {
    pub fn new(run: u64, step: u64, prompt: u64) -> Self {
        Self { run, step, prompt }
    }

    /// The seed of one sample's stream, below 2^63: vLLM and SGLang take a request's seed as a
    /// signed 64-bit integer and refuse larger ones (HTTP 400), and the embedded engine must draw
    /// from the same streams as a pool.
    pub fn sample_seed(&self, sample: u64) -> u64 {
        let mut h = splitmix64(self.run ^ 0x6f72_6368_6573_7472);
        h = splitmix64(h ^ self.step);
        h = splitmix64(h ^ self.prompt);
        splitmix64(h ^ sample) >> 1
    }
}

/// Token-level sampling parameters, already validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenSampling {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
}

impl From<&SamplingConfig> for TokenSampling {
    fn from(s: &SamplingConfig) -> Self {
        Self {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
        }
    }
}

/// ln softmax(logits / t) for every entry (t = 1 when `temperature` is 0).
pub fn log_softmax(logits: &[f32], temperature: f64) -> Vec<f32> {
    let inv_t = if temperature > 0.0 { 1.0 / temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits
        .iter()
        .map(|&l| ((l as f64 - max) * inv_t).exp())
        .sum();
    let lse = sum.ln();
    logits
        .iter()
        .map(|&l| ((l as f64 - max) * inv_t - lse) as f32)
        .collect()
}

/// The truncated distribution the draw is made from: (token, renormalised probability) in
/// descending probability, after top-k then top-p. Ties keep the lower id first.
pub fn truncated_distribution(logp: &[f32], s: TokenSampling) -> Vec<(u32, f64)> {
    let v = logp.len();
    let k = if s.top_k == 0 { v } else { s.top_k.min(v) };
    let by_prob_desc = |a: &u32, b: &u32| {
        logp[*b as usize]
            .partial_cmp(&logp[*a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    let mut idx: Vec<u32> = (0..v as u32).collect();
    // Only the head of the distribution is needed: select it in O(V) and sort just that,
    // widening only while the nucleus is not inside it.
    let mut head = if s.top_p < 1.0 { k.min(512) } else { k };
    loop {
        if head < v {
            idx.select_nth_unstable_by(head - 1, by_prob_desc);
        }
        let mut top: Vec<u32> = idx[..head].to_vec();
        top.sort_unstable_by(by_prob_desc);
        let mut kept = Vec::with_capacity(top.len());
        let mut mass = 0.0f64;
        for &t in &top {
            let p = (logp[t as usize] as f64).exp();
            kept.push((t, p));
            mass += p;
            if s.top_p < 1.0 && mass >= s.top_p {
                break;
            }
        }
        if head == k || mass >= s.top_p {
            let total: f64 = kept.iter().map(|x| x.1).sum();
            for x in &mut kept {
                x.1 /= total;
            }
            return kept;
        }
        head = (head * 4).min(k);
    }
}

/// Draws one token: greedy (argmax, lowest id on ties) at temperature 0, otherwise by inverse
/// CDF over the truncated distribution with the uniform `u` in [0, 1). NaN or +inf logits are
/// an error: a draw from them would be token 0 with a NaN log-prob, trained on as if real.
pub fn draw(logits: &[f32], s: TokenSampling, u: f64) -> Result<(u32, f32), NonFiniteLogits> {
    if let Some(at) = logits.iter().position(|l| l.is_nan() || *l == f32::INFINITY) {
        return Err(NonFiniteLogits { at, value: logits[at], count: logits.iter().filter(|l| l.is_nan() || **l == f32::INFINITY).count() });
    }
    let logp = log_softmax(logits, s.temperature);
    if s.temperature <= 0.0 {
        let mut best = 0usize;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return Ok((best as u32, logp[best]));
    }
    let id = if s.top_k == 0 && s.top_p >= 1.0 {
        // Full distribution: one pass, no sort.
        let mut acc = 0.0f64;
        let mut chosen = None;
        let mut last_nonzero = 0usize;
        for (i, &lp) in logp.iter().enumerate() {
            let p = (lp as f64).exp();
            if p > 0.0 {
                last_nonzero = i;
            }
            acc += p;
            if chosen.is_none() && u < acc {
                chosen = Some(i);
                break;
            }
        }
        chosen.unwrap_or(last_nonzero) as u32
    } else {
        let dist = truncated_distribution(&logp, s);
        let mut acc = 0.0f64;
        let mut chosen = dist.last().map(|d| d.0).unwrap_or(0);
        for &(t, p) in &dist {
            acc += p;
            if u < acc {
                chosen = t;
                break;
            }
        }
        chosen
    };
    Ok((id, logp[id as usize]))
}

/// The model produced logits no token can be drawn from.
#[derive(Debug, Clone, PartialEq)]
pub struct NonFiniteLogits {
    pub at: usize,
    pub value: f32,
    pub count: usize,
}

impl std::fmt::Display for NonFiniteLogits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "non-finite logits from the model: {} of them, first at token id {} ({})", self.count, self.at, self.value)
    }
}

impl std::error::Error for NonFiniteLogits {}

/// The uniform draw for one position of one sample's stream.
pub fn uniform_at(sample_seed: u64, position: usize) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(sample_seed ^ (position as u64)));
    rng.random::<f64>()
}

#[derive(Default)]
struct Record {
    prompt: Option<Vec<u32>>,
    /// position -> (id, ln p); keyed by position because the engine may call twice at one.
    tokens: BTreeMap<usize, (u32, f32)>,
}

/// One sequence's sampler and recorder. Attach one per request (n = 1 each).
pub struct RecordingSampler {
    params: TokenSampling,
    seed: u64,
    /// Ids set to -inf before the draw (see `MistralEngine::suppress_tokens`).
    suppressed: Vec<u32>,
    record: Mutex<Record>,
    /// Shared count of positions drawn (see [`RecordingSampler::counting`]).
    drawn: Option<Arc<AtomicU64>>,
    /// vLLM's and HF's repetition penalty (1 = off): see [`RecordingSampler::penalizing_repeats`].
    repetition_penalty: f32,
}

impl RecordingSampler {
    pub fn new(params: TokenSampling, sample_seed: u64) -> Self {
        Self {
            params,
            seed: sample_seed,
            suppressed: Vec::new(),
            record: Mutex::new(Record::default()),
            drawn: None,
            repetition_penalty: 1.0,
        }
    }

    /// Divides the positive logits (multiplies the negative ones) of every id already in the
    /// context, prompt included, by `penalty` before the draw, as vLLM and HF transformers do.
    /// The learner knows nothing of it: only the pool stand-ins use it, to reproduce a server
    /// that takes a penalty from the model's `generation_config.json`.
    pub fn penalizing_repeats(mut self, penalty: f32) -> Self {
        self.repetition_penalty = penalty;
        self
    }

    /// Never draws these ids (their logits become -inf, so ln p is of what remains).
    pub fn suppressing(mut self, ids: &[u32]) -> Self {
        self.suppressed = ids.to_vec();
        self
    }

    /// Adds one to `drawn` for every new position drawn (a position drawn again is not
    /// counted twice), so a caller can watch generation progress while it runs.
    pub fn counting(mut self, drawn: Arc<AtomicU64>) -> Self {
        self.drawn = Some(drawn);
        self
    }

    /// (prompt ids, sampled ids, ln-probs) recorded so far.
    pub fn take(&self) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
        let rec = std::mem::take(&mut *self.record.lock().unwrap());
        let (ids, lps) = rec.tokens.into_values().unzip();
        (rec.prompt.unwrap_or_default(), ids, lps)
    }
}

impl CustomLogitsProcessor for RecordingSampler {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        let mut values: Vec<f32> = logits
            .to_dtype(mistralrs::DType::F32)?
            .to_device(&mistralrs::Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        for &id in &self.suppressed {
            if let Some(v) = values.get_mut(id as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        if self.repetition_penalty != 1.0 {
            let mut seen = std::collections::BTreeSet::new();
            for &id in context {
                if seen.insert(id) {
                    if let Some(v) = values.get_mut(id as usize) {
                        *v = if *v > 0.0 { *v / self.repetition_penalty } else { *v * self.repetition_penalty };
                    }
                }
            }
        }
        let position = context.len();
        let u = uniform_at(self.seed, position);
        let (id, lp) = draw(&values, self.params, u).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        {
            let mut rec = self.record.lock().unwrap();
            let prompt_len = rec.prompt.get_or_insert_with(|| context.to_vec()).len();
            let gen_pos = position.checked_sub(prompt_len).unwrap_or(0);
            let redrawn = !rec.tokens.split_off(&gen_pos).is_empty();
            rec.tokens.insert(gen_pos, (id, lp));
            if let (Some(drawn), false) = (&self.drawn, redrawn) {
                drawn.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut mask = vec![f32::NEG_INFINITY; values.len()];
        mask[id as usize] = 0.0;
        Tensor::from_vec(mask, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits_fixture(v: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..v).map(|_| rng.random::<f32>() * 6.0 - 3.0).collect()
    }

    #[test]
    fn recorded_value_is_log_softmax_of_scaled_logits() {
        let logits = logits_fixture(300, 1);
        for &t in &[0.5, 1.0, 1.7] {
            let s = TokenSampling { temperature: t, top_p: 0.9, top_k: 50 };
            for pos in 0..20 {
                let (id, lp) = draw(&logits, s, uniform_at(7, pos)).unwrap();
                // Independent computation in f64.
                let m = logits.iter().map(|&x| x as f64 / t).fold(f64::MIN, f64::max);
                let z: f64 = logits.iter().map(|&x| (x as f64 / t - m).exp()).sum();
                let want = logits[id as usize] as f64 / t - m - z.ln();
                assert!((lp as f64 - want).abs() < 1e-5, "t={t} id={id} {lp} vs {want}");
                assert!(lp <= 0.0 && lp.is_finite());
            }
        }
    }

    #[test]
    fn nan_or_infinite_logits_are_an_error_not_token_zero() {
        let mut logits = logits_fixture(50, 4);
        logits[0] = f32::NEG_INFINITY; // masked tokens are fine
        for s in [TokenSampling { temperature: 0.0, top_p: 1.0, top_k: 0 }, TokenSampling { temperature: 1.0, top_p: 0.9, top_k: 0 }] {
            assert!(draw(&logits, s, 0.5).is_ok());
            let mut bad = logits.clone();
            bad[7] = f32::NAN;
            let e = draw(&bad, s, 0.5).unwrap_err();
            assert_eq!((e.at, e.count), (7, 1));
            bad[3] = f32::INFINITY;
            assert_eq!(draw(&bad, s, 0.5).unwrap_err().at, 3);
            assert!(draw(&vec![f32::NAN; 50], s, 0.5).unwrap_err().to_string().contains("50 of them"));
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let logits = logits_fixture(1000, 2);
        let best = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.partial_cmp(b.1).unwrap())
            .unwrap()
            .0;
        let (id, _) = draw(&logits, TokenSampling { temperature: 0.0, top_p: 1.0, top_k: 0 }, 0.3).unwrap();
        assert_eq!(id as usize, best);
    }

    /// Pearson chi-square of empirical draws against the truncated distribution.
    fn chi_square(logits: &[f32], s: TokenSampling, draws: usize) -> (f64, usize) {
        let dist = truncated_distribution(&log_softmax(logits, s.temperature), s);
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for i in 0..draws {
            let (id, _) = draw(logits, s, uniform_at(99, i)).unwrap();
            *counts.entry(id).or_default() += 1;
        }
        let allowed: std::collections::HashSet<u32> = dist.iter().map(|d| d.0).collect();
        for id in counts.keys() {
            assert!(allowed.contains(id), "drew {id}, outside top-k/top-p set");
        }
        let stat = dist
            .iter()
            .map(|&(t, p)| {
                let e = p * draws as f64;
                let o = *counts.get(&t).unwrap_or(&0) as f64;
                (o - e).powi(2) / e
            })
            .sum();
        (stat, dist.len() - 1)
    }

    #[test]
    fn empirical_frequencies_match_truncated_distribution() {
        let logits = logits_fixture(40, 3);
        let cases = [
            TokenSampling { temperature: 1.0, top_p: 1.0, top_k: 0 },
            TokenSampling { temperature: 0.7, top_p: 1.0, top_k: 8 },
            TokenSampling { temperature: 1.3, top_p: 0.8, top_k: 0 },
            TokenSampling { temperature: 1.0, top_p: 0.6, top_k: 10 },
        ];
        for s in cases {
            let (stat, df) = chi_square(&logits, s, 40_000);
            // 99.9% quantile of chi-square ~ df + 3.1*sqrt(2 df) + 10 for these df.
            let bound = df as f64 + 3.1 * (2.0 * df as f64).sqrt() + 10.0;
            assert!(stat < bound, "{s:?}: chi2 {stat:.1} with df {df} (bound {bound:.1})");
        }
    }

    #[test]
    fn truncation_sets_are_exact() {
        let logp = log_softmax(&[0.0, 1.0, 2.0, 3.0], 1.0);
        let p: Vec<f64> = logp.iter().map(|&x| (x as f64).exp()).collect();
        let d = truncated_distribution(&logp, TokenSampling { temperature: 1.0, top_p: 1.0, top_k: 2 });
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        let d = truncated_distribution(&logp, TokenSampling { temperature: 1.0, top_p: p[3] + 1e-9, top_k: 0 });
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        let d = truncated_distribution(&logp, TokenSampling { temperature: 1.0, top_p: p[3] - 1e-9, top_k: 0 });
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3]);
        // Large vocabulary with a flat tail: the nucleus is wider than the first head window.
        let flat = vec![0.0f32; 5000];
        let lp = log_softmax(&flat, 1.0);
        let d = truncated_distribution(&lp, TokenSampling { temperature: 1.0, top_p: 0.5, top_k: 0 });
        assert_eq!(d.len(), 2500);
        assert!((d.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn streams_depend_only_on_seed_and_position() {
        let k = SeedKey::new(1, 2, 3);
        assert_eq!(k.sample_seed(0), SeedKey::new(1, 2, 3).sample_seed(0));
        assert_ne!(k.sample_seed(0), k.sample_seed(1));
        assert_ne!(k.sample_seed(0), SeedKey::new(1, 3, 3).sample_seed(0));
        // Every seed fits a signed 64-bit integer (what servers accept), and the top half of the
        // range is used.
        let seeds: Vec<u64> = (0..4096).map(|i| SeedKey::new(i, 7, i / 3).sample_seed(i % 5)).collect();
        assert!(seeds.iter().all(|&s| s <= i64::MAX as u64), "a seed above 2^63 - 1");
        assert!(seeds.iter().any(|&s| s > 1u64 << 62));
        assert_eq!(uniform_at(5, 10), uniform_at(5, 10));
        assert_ne!(uniform_at(5, 10), uniform_at(5, 11));
    }

    #[test]
    fn suppressed_ids_are_never_drawn() {
        let mut logits = logits_fixture(300, 3);
        logits[7] = 40.0; // nearly all the mass
        let t = Tensor::from_vec(logits, 300, &mistralrs::Device::Cpu).unwrap();
        let params = TokenSampling { temperature: 1.0, top_p: 1.0, top_k: 0 };
        let draw_all = |s: RecordingSampler| {
            for len in 1..=40 {
                s.apply(&t, &vec![0u32; len]).unwrap();
            }
            s.take().1
        };
        assert!(draw_all(RecordingSampler::new(params, 5)).iter().all(|&id| id == 7));
        let ids = draw_all(RecordingSampler::new(params, 5).suppressing(&[7, 299]));
        assert_eq!(ids.len(), 40);
        assert!(ids.iter().all(|&id| id != 7 && id != 299), "{ids:?}");
    }
}
