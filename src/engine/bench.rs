//! `orchestrator bench engine`: throughput of our recording sampler against plain mistral.rs
//! requests (the engine's own sampler) on the same model, prompt, batch size and length.

use std::time::Instant;

use anyhow::Result;
use futures::future::join_all;
use mistralrs::{RequestBuilder, TextMessageRole};

use super::{ChatMessage, Engine, GenRequest, MistralEngine, Role, SamplingConfig, SeedKey};

pub const BENCH_PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";

#[derive(Debug, Clone, Copy)]
pub struct EngineBenchRow {
    pub batch: usize,
    pub ours_tok_s: f64,
    pub plain_tok_s: f64,
}

impl EngineBenchRow {
    pub fn ratio(&self) -> f64 {
        self.ours_tok_s / self.plain_tok_s
    }
}

/// Tokens and seconds for `batch` copies of the prompt through our wrapper.
async fn ours(engine: &MistralEngine, batch: usize, s: &SamplingConfig, round: u64) -> Result<(usize, f64)> {
    let req = GenRequest {
        messages: vec![ChatMessage::new(Role::User, BENCH_PROMPT)],
        n: batch,
        seed: SeedKey::new(round, 0, 0),
    };
    let t = Instant::now();
    let out = engine.generate(std::slice::from_ref(&req), s).await?;
    let tokens = out.iter().flatten().map(|r| r.ids.len()).sum();
    Ok((tokens, t.elapsed().as_secs_f64()))
}

/// The same work as plain mistral.rs requests with its built-in sampler.
async fn plain(engine: &MistralEngine, batch: usize, s: &SamplingConfig) -> Result<(usize, f64)> {
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
    Ok((tokens, t.elapsed().as_secs_f64()))
}

/// Runs both sides `repeats` times per batch size, alternating which goes first, after one
/// warm-up round; rates are total tokens over total seconds.
pub async fn run(
    engine: &MistralEngine,
    batches: &[usize],
    sampling: &SamplingConfig,
    repeats: usize,
) -> Result<Vec<EngineBenchRow>> {
    ours(engine, 1, sampling, 999).await?;
    plain(engine, 1, sampling).await?;
    let mut rows = Vec::new();
    for &b in batches {
        let (mut ot, mut os, mut pt, mut ps) = (0usize, 0f64, 0usize, 0f64);
        for rep in 0..repeats {
            let first_ours = rep % 2 == 0;
            if first_ours {
                let (t, s) = ours(engine, b, sampling, rep as u64).await?;
                ot += t;
                os += s;
            }
            let (t, s) = plain(engine, b, sampling).await?;
            pt += t;
            ps += s;
            if !first_ours {
                let (t, s) = ours(engine, b, sampling, rep as u64).await?;
                ot += t;
                os += s;
            }
        }
        let row = EngineBenchRow {
            batch: b,
            ours_tok_s: ot as f64 / os,
            plain_tok_s: pt as f64 / ps,
        };
        println!(
            "batch {:>3}: ours {:>8.1} tok/s  plain mistral.rs {:>8.1} tok/s  ratio {:.3}",
            row.batch,
            row.ours_tok_s,
            row.plain_tok_s,
            row.ratio()
        );
        rows.push(row);
    }
    Ok(rows)
}
