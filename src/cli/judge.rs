//! `orchestrator judge`: reward a JSONL file of (prompt, criteria?, response, reference) pairs
//! with the configured judge and reward settings; and `orchestrator bench judge`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::testkit::scripted::{Behavior, ScriptedServer};
use crate::judge::{self, Comparison, Judge, JudgeConfig, JudgeHealth, OpenAiJudge};
use crate::progress::Progress;
use crate::reward::{self, RewardInput, RewardOutcome, RewardStats};

#[derive(Debug, Clone, clap::Args)]
pub struct JudgeArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    /// JSONL with `prompt`, `response`, `reference` (required), `criteria` and `id` (optional).
    #[arg(long)]
    pub pairs: PathBuf,
    /// Output JSONL, one line per pair: verdicts, reward, judge text, latency, retries (written
    /// atomically). The win/tie/loss summary is printed.
    #[arg(long)]
    pub out: PathBuf,
    /// Pairs judged at once (default: the judge's own concurrency).
    #[arg(long)]
    pub concurrency: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PairLine {
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    pub prompt: String,
    #[serde(default)]
    pub criteria: Option<String>,
    pub response: String,
    pub reference: String,
}

/// Reads pairs; every bad line is an error naming `FILE:LINE`.
pub fn read_pairs(path: &Path) -> Result<Vec<(String, PairLine)>> {
    let mut ids = crate::jsonl::UniqueIds::default();
    let mut out = Vec::new();
    let records = crate::jsonl::read_records::<PairLine>(path, "a pair object (prompt, response, reference)", "pairs")?;
    for (lineno, p) in records {
        for (name, v) in [("prompt", &p.prompt), ("response", &p.response), ("reference", &p.reference)] {
            if v.trim().is_empty() {
                bail!("{}:{lineno}: empty {name}", path.display());
            }
        }
        out.push((ids.from_json(path, lineno, p.id.as_ref())?, p));
    }
    Ok(out)
}

#[derive(Serialize)]
struct OutLine<'a> {
    id: &'a str,
    /// Sum over the calls.
    retries: u32,
    /// The slowest call.
    latency_ms: u64,
    #[serde(flatten)]
    result: &'a RewardOutcome,
}

pub async fn run(args: JudgeArgs) -> Result<()> {
    let cfg = Config::load(args.config.path())?;
    let pairs = read_pairs(&args.pairs)?;
    let concurrency = args.concurrency.unwrap_or_else(|| cfg.judge.pair_concurrency());
    if concurrency == 0 {
        bail!("--concurrency must be >= 1");
    }
    let t0 = Instant::now();
    let judge = judge::Panel::from_config(&cfg.judge, &cfg.model).await?;
    eprintln!("judge ready ({:?}, {:?}) in {:.1}s", cfg.judge.kind, cfg.judge.mode, t0.elapsed().as_secs_f64());

    let progress = Progress::new(pairs.len() as u64, "judge");
    let stats = Mutex::new(RewardStats::default());
    let judge_ref = &judge;
    let reward_cfg = &cfg.reward;
    let mut results: Vec<(usize, RewardOutcome)> = stream::iter(pairs.iter().enumerate())
        .map(|(i, (_, p))| {
            let (progress, stats) = (&progress, &stats);
            async move {
                let input = RewardInput {
                    prompt: &p.prompt,
                    criteria: p.criteria.as_deref(),
                    response: &p.response,
                    reference: &p.reference,
                };
                let r = reward::reward(judge_ref, reward_cfg, input, i as u64).await;
                let msg = {
                    let mut s = stats.lock().unwrap();
                    s.add(&r);
                    format!("W {} T {} L {} U {}", s.wins, s.ties, s.losses, s.unscored)
                };
                progress.set_message(msg);
                progress.inc(1);
                (i, r)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    progress.finish();
    results.sort_by_key(|r| r.0);

    crate::fsutil::atomic_write_with(&args.out, |w| {
        for (i, r) in &results {
            let line = OutLine { id: &pairs[*i].0, retries: r.retries(), latency_ms: r.latency_ms(), result: r };
            serde_json::to_writer(&mut *w, &line)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;
    let stats = stats.into_inner().unwrap();
    let scored: Vec<f64> = results.iter().filter_map(|r| r.1.reward).collect();
    let mean = if scored.is_empty() { f64::NAN } else { scored.iter().sum::<f64>() / scored.len() as f64 };
    println!("{stats}");
    println!("mean reward over {} scored pairs: {mean:.4}", scored.len());
    if let Some(line) = crate::judge::embedded::prefix_cache_summary() {
        println!("{line} (judge prompt tokens in all: {})", stats.judge_prompt_tokens);
    }
    if cfg.judge.is_panel() {
        print!("{}", reward::member_table(&stats.members, &cfg.judge));
        println!("agree = share of pairs where the member's outcome equals the panel's (a tie against a win or loss counts 0.5)");
    }
    eprintln!("wrote {} lines to {} in {:.1}s", results.len(), args.out.display(), t0.elapsed().as_secs_f64());
    if let JudgeHealth::Down { consecutive_failures, last_error, .. } = judge.health() {
        bail!(
            "the judge is down (circuit breaker open after {consecutive_failures} consecutive failed calls): \
             {last_error}; the remaining pairs are unscored in {}",
            args.out.display()
        );
    }
    Ok(())
}

/// `orchestrator bench judge`: the OpenAI judge against the scripted server answering after a
/// fixed latency. Prints achieved calls/s and its ratio to the ideal concurrency / latency.
pub async fn bench(latency_ms: u64, concurrency: usize, calls: usize) -> Result<()> {
    if concurrency == 0 || calls == 0 || latency_ms == 0 {
        bail!("--latency-ms, --concurrency and --calls must be >= 1");
    }
    let latency = Duration::from_millis(latency_ms);
    let server = ScriptedServer::start(Behavior::delay(
        latency,
        Behavior::reply("Both are fine; B is tighter.\n[[B]]"),
    ))
    .await
    .context("starting the scripted server")?;
    let mut cfg = JudgeConfig::default();
    cfg.openai.base_url = server.base_url();
    cfg.openai.api_key_env = String::new();
    cfg.openai.max_concurrency = concurrency;
    cfg.openai.max_retries = 0;
    cfg.openai.timeout_secs = 30.0 + latency.as_secs_f64() * 2.0;
    let judge = OpenAiJudge::new(&cfg)?;
    let c = Comparison { prompt: "Write a haiku about rain.", criteria: None, first: "Rain on tin roofs.", second: "Soft rain, slow rain." };
    let run = |n: usize| {
        let judge = &judge;
        async move {
            let start = Instant::now();
            let outs = futures::future::join_all((0..n).map(|_| judge.compare(c))).await;
            let elapsed = start.elapsed();
            let failed = outs.iter().filter(|o| matches!(o.judgement, judge::Judgement::Unscored { .. })).count();
            (elapsed, failed)
        }
    };
    // Warm-up: open the connections.
    run(concurrency).await;
    server.reset_stats();
    let (elapsed, failed) = run(calls).await;
    let achieved = calls as f64 / elapsed.as_secs_f64();
    let ideal = concurrency as f64 / latency.as_secs_f64();
    println!(
        "judge bench: latency {latency_ms} ms, concurrency {concurrency}, {calls} calls in {:.3}s",
        elapsed.as_secs_f64()
    );
    println!(
        "achieved {achieved:.1} calls/s | ideal C/L {ideal:.1} calls/s | ratio {:.3} | server max in flight {} | unscored {failed}",
        achieved / ideal,
        server.max_in_flight()
    );
    if failed > 0 {
        bail!("{failed} of {calls} benchmark calls failed");
    }
    Ok(())
}
