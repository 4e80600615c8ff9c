//! `orchestrator generate`: sample answers for a JSONL file of prompts.
//!
//! Output lines are candidate answers (`id`, `sample`, `response`, plus how they were made), the
//! format `orchestrator select` reads, so a single model can build ladders from its own samples.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::engine::remote::RemoteEngine;
use crate::engine::{Backend, ChatMessage, Engine, GenRequest, MistralEngine, Role, Rollout, SeedKey};
use crate::progress::Progress;

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    /// JSONL with `prompt` (required), `id` and `system` (optional); other fields are ignored,
    /// so a task file works as it is.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output JSONL, one line per sample (written atomically; nothing on error).
    #[arg(long)]
    pub out: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Overrides `run.seed`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Label written into every line's `source` (default: the model path, or with
    /// `engine.backend = "remote"` the pool's served model name, and the sampling settings).
    #[arg(long)]
    pub source: Option<String>,
    /// Also write prompt ids, sampled ids and their ln-probs.
    #[arg(long)]
    pub with_tokens: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PromptLine {
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
}

/// Reads prompts; every bad line is an error naming `FILE:LINE`.
pub fn read_prompts(path: &Path) -> Result<Vec<(String, PromptLine)>> {
    let mut ids = crate::jsonl::UniqueIds::default();
    let mut out = Vec::new();
    for (lineno, p) in crate::jsonl::read_records::<PromptLine>(path, "a prompt object", "prompts")? {
        if p.prompt.trim().is_empty() {
            bail!("{}:{lineno}: empty prompt", path.display());
        }
        out.push((ids.from_json(path, lineno, p.id.as_ref())?, p));
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
struct OutLine<'a> {
    id: &'a str,
    sample: usize,
    response: &'a str,
    finish_reason: crate::engine::FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
    source: &'a str,
    seed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<&'a [f32]>,
}

pub async fn run(args: GenerateArgs) -> Result<()> {
    let cfg = Config::load(args.config.path())?;
    if args.n == 0 {
        bail!("--n must be >= 1");
    }
    let prompts = read_prompts(&args.prompts)?;
    let seed = args.seed.unwrap_or(cfg.run.seed);
    let s = &cfg.engine.sampling;
    let model = match cfg.engine.backend {
        Backend::Embedded => cfg.model.path.display().to_string(),
        Backend::Remote => format!("remote:{}", cfg.engine.remote.model),
    };
    let source = args
        .source
        .clone()
        .unwrap_or_else(|| format!("{model} T={} top_p={} top_k={}", s.temperature, s.top_p, s.top_k));

    // The embedded engine on model.path, or the pool's servers on their base model (model.path
    // gives the tokenizer and chat template the prompts are sent with).
    let t0 = Instant::now();
    let engine: Arc<dyn Engine> = match cfg.engine.backend {
        Backend::Embedded => {
            let e = MistralEngine::load(&cfg.model, &cfg.engine).await?;
            eprintln!("loaded {} in {:.1}s", cfg.model.path.display(), t0.elapsed().as_secs_f64());
            Arc::new(e)
        }
        Backend::Remote => {
            let e = RemoteEngine::connect(&cfg.engine.remote, &cfg.model.path, None).await?;
            eprintln!(
                "connected to the pool of {} server(s) serving {} in {:.1}s",
                cfg.engine.remote.servers.len(),
                cfg.engine.remote.model,
                t0.elapsed().as_secs_f64()
            );
            Arc::new(e)
        }
    };

    let requests: Vec<GenRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, (_, p))| {
            let mut messages = Vec::new();
            if let Some(sys) = &p.system {
                messages.push(ChatMessage::new(Role::System, sys));
            }
            messages.push(ChatMessage::new(Role::User, &p.prompt));
            GenRequest { messages, n: args.n, seed: SeedKey::new(seed, 0, i as u64) }
        })
        .collect();

    let total = (requests.len() * args.n) as u64;
    let progress = Arc::new(Progress::new(total, "generate"));
    let (tx, mut rx) = mpsc::unbounded_channel::<Rollout>();
    let collector = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut tokens = 0usize;
            let start = Instant::now();
            while let Some(r) = rx.recv().await {
                tokens += r.ids.len();
                progress.set_message(format!(
                    "{:.1} tok/s",
                    tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
                ));
                progress.inc(1);
                got.push(r);
            }
            got
        })
    };
    let gen_start = Instant::now();
    engine.generate_into(&requests, s, tx).await?;
    let mut rollouts = collector.await?;
    progress.finish();
    rollouts.sort_by_key(|r| (r.request, r.sample));
    let tokens: usize = rollouts.iter().map(|r| r.ids.len()).sum();
    let wall = gen_start.elapsed().as_secs_f64();

    crate::fsutil::atomic_write_with(&args.out, |w| {
        for r in &rollouts {
            let line = OutLine {
                id: &prompts[r.request].0,
                sample: r.sample,
                response: &r.text,
                finish_reason: r.finish_reason,
                prompt_tokens: r.prompt_ids.len(),
                completion_tokens: r.ids.len(),
                source: &source,
                seed,
                prompt_ids: args.with_tokens.then_some(r.prompt_ids.as_slice()),
                ids: args.with_tokens.then_some(r.ids.as_slice()),
                logprobs: args.with_tokens.then_some(r.logprobs.as_slice()),
            };
            serde_json::to_writer(&mut *w, &line)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;
    eprintln!(
        "wrote {} samples ({} tokens, {:.1} tok/s) to {}",
        rollouts.len(),
        tokens,
        tokens as f64 / wall.max(1e-9),
        args.out.display()
    );
    Ok(())
}
