//! `orchestrator bench engine`: rollout throughput at several batch sizes, serial (one sequence
//! in flight at a time, `engine.serial`) against batched (all in flight, decoded together), and
//! our recording sampler against plain mistral.rs requests (the engine's own sampler) on the
//! same batched work.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use futures::future::join_all;
use mistralrs::{RequestBuilder, TextMessageRole};

use super::{ChatMessage, Engine, GenRequest, MistralEngine, Role, SamplingConfig, SeedKey};

pub const BENCH_PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";

#[derive(Debug, Clone, Copy)]
pub struct EngineBenchRow {
    pub batch: usize,
    /// Tokens/s with one sequence in flight at a time.
    pub serial_tok_s: f64,
    /// Tokens/s with the whole batch in flight.
    pub batched_tok_s: f64,
    /// Tokens/s of plain mistral.rs requests with the whole batch in flight.
    pub plain_tok_s: f64,
    /// Mean generated tokens per request of the batched runs (max_new_tokens with
    /// `--ignore-eos`).
    pub batched_tokens_per_request: f64,
    /// Prompt length in tokens (the chat template applied to [`BENCH_PROMPT`]).
    pub prompt_tokens: usize,
}

impl EngineBenchRow {
    /// Batched over serial throughput.
    pub fn batching_ratio(&self) -> f64 {
        self.batched_tok_s / self.serial_tok_s
    }

    /// Our recording sampler over plain mistral.rs, both batched.
    pub fn sampler_ratio(&self) -> f64 {
        self.batched_tok_s / self.plain_tok_s
    }
}

/// `batch` one-sample requests with their own seeds: the same samples whichever way they run.
fn requests(batch: usize, round: u64) -> Vec<GenRequest> {
    (0..batch)
        .map(|i| GenRequest {
            messages: vec![ChatMessage::new(Role::User, BENCH_PROMPT)],
            n: 1,
            seed: SeedKey::new(round, 0, i as u64),
        })
        .collect()
}

/// The ids a model directory names as end of sequence (`eos_token_id`, a number or a list, in
/// config.json and generation_config.json).
pub fn eos_ids(model_dir: &Path) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for name in ["config.json", "generation_config.json"] {
        let path = model_dir.join(name);
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let found = match &v["eos_token_id"] {
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).collect(),
            x => x.as_u64().into_iter().collect::<Vec<_>>(),
        };
        ids.extend(found.into_iter().map(|x| x as u32));
    }
    ids.sort_unstable();
    ids.dedup();
    ensure!(!ids.is_empty(), "{}: no eos_token_id in config.json or generation_config.json", model_dir.display());
    Ok(ids)
}

/// Tokens generated, seconds, and the prompt length for the batch through our wrapper, all
/// in flight, or one after another.
async fn ours(engine: &MistralEngine, batch: usize, s: &SamplingConfig, round: u64, serial: bool) -> Result<(usize, f64, usize)> {
    let reqs = requests(batch, round);
    let t = Instant::now();
    let mut out = Vec::new();
    if serial {
        for r in &reqs {
            out.extend(engine.generate(std::slice::from_ref(r), s).await?);
        }
    } else {
        out = engine.generate(&reqs, s).await?;
    }
    let secs = t.elapsed().as_secs_f64();
    let tokens = out.iter().flatten().map(|r| r.ids.len()).sum();
    let prompt = out.iter().flatten().map(|r| r.prompt_ids.len()).max().unwrap_or(0);
    Ok((tokens, secs, prompt))
}

/// The same batched work as plain mistral.rs requests with its built-in sampler.
async fn plain(engine: &MistralEngine, batch: usize, s: &SamplingConfig) -> Result<(usize, f64, usize)> {
    let reqs = (0..batch).map(|_| {
        let mut r = RequestBuilder::new()
            .add_message(TextMessageRole::User, BENCH_PROMPT)
            .set_sampler_max_len(s.max_new_tokens);
        if s.temperature > 0.0 {
            r = r.set_sampler_temperature(s.temperature);
        }
        if s.top_p < 1.0 {
            r = r.set_sampler_topp(s.top_p);
        }
        if s.top_k > 0 {
            r = r.set_sampler_topk(s.top_k);
        }
        r
    });
    let t = Instant::now();
    let res = join_all(reqs.map(|r| engine.send(r))).await;
    let mut tokens = 0;
    for r in res {
        tokens += r?.usage.completion_tokens;
    }
    Ok((tokens, t.elapsed().as_secs_f64(), 0))
}

/// Runs the three ways `repeats` times per batch size, rotating which goes first, after one
/// warm-up round; rates are total tokens over total seconds. `engine` must admit at least the
/// largest batch (`engine.max_num_seqs`, not serial).
pub async fn run(
    engine: &MistralEngine,
    batches: &[usize],
    sampling: &SamplingConfig,
    repeats: usize,
    with_serial: bool,
    with_plain: bool,
) -> Result<Vec<EngineBenchRow>> {
    ours(engine, 1, sampling, 999, false).await?;
    if with_plain {
        plain(engine, 1, sampling).await?;
    }
    let mut rows = Vec::new();
    for &b in batches {
        let mut sums = [(0usize, 0f64); 3];
        let mut prompt_tokens = 0;
        for rep in 0..repeats {
            for k in 0..3 {
                let which = (k + rep) % 3;
                if (which == 0 && !with_serial) || (which == 2 && !with_plain) {
                    continue;
                }
                let (t, s, p) = match which {
                    0 => ours(engine, b, sampling, rep as u64, true).await?,
                    1 => ours(engine, b, sampling, rep as u64, false).await?,
                    _ => plain(engine, b, sampling).await?,
                };
                sums[which].0 += t;
                sums[which].1 += s;
                prompt_tokens = prompt_tokens.max(p);
            }
        }
        // NaN (printed "-", JSON null) for a part that was not measured.
        let rate = |i: usize| if sums[i].1 > 0.0 { sums[i].0 as f64 / sums[i].1 } else { f64::NAN };
        let row = EngineBenchRow {
            batch: b,
            serial_tok_s: rate(0),
            batched_tok_s: rate(1),
            plain_tok_s: rate(2),
            batched_tokens_per_request: sums[1].0 as f64 / (b * repeats) as f64,
            prompt_tokens,
        };
        println!(
            "batch {:>3}: serial {:>7.1} tok/s  batched {:>7.1} tok/s  batched/serial {:>5.2}x  \
             | plain mistral.rs batched {:>7.1} tok/s  ours/plain {:.3}",
            row.batch,
            row.serial_tok_s,
            row.batched_tok_s,
            row.batching_ratio(),
            row.plain_tok_s,
            row.sampler_ratio()
        );
        rows.push(row);
    }
    Ok(rows)
}
