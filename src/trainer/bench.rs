//! `orchestrator bench run`: the training loop's own costs on a tiny model and a scripted judge
//! of fixed latency, as ratios measured in one run.
//!
//! 1. overlap: rollout+judge phase wall / max(generation alone, judging alone), same rollouts;
//! 2. sync: weight-sync wall / (bytes written / this machine's measured copy bandwidth);
//! 3. overhead: share of step time outside engine, judge, learner, sync and checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Semaphore;

use super::{prepare, sync, task_messages, Resume, RunOptions, Trainer};
use crate::data::{write_tasks, References};
use crate::engine::{GenRequest, SeedKey};
use crate::testkit::letters::{letter_tasks, more_a_judge};
use crate::testkit::scripted::{Behavior, ScriptedServer};
use crate::reward::{self, RewardInput};
use crate::testkit::tiny::TinySpec;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchRunArgs {
    /// Judge latency per call (scripted server on 127.0.0.1).
    #[arg(long, default_value_t = 100)]
    pub latency_ms: u64,
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    #[arg(long, default_value_t = 4)]
    pub n: usize,
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Training steps for the overhead measurement.
    #[arg(long, default_value_t = 6)]
    pub steps: u64,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Train LoRA adapters (sync writes only the adapted projections).
    #[arg(long)]
    pub lora: bool,
    /// Model to train instead of a tiny random one (an HF directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Start from this run config (model, engine, learner as configured) instead of the bench's
    /// tiny CPU one; its judge becomes the scripted server, its tasks the bench's, and
    /// steps / prompts / n / max_new_tokens come from the flags above.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Skip the generation/judging overlap measurement (three extra generations per repeat).
    #[arg(long)]
    pub skip_overlap: bool,
    /// Also write the measurements as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub async fn run(args: BenchRunArgs) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("orchestrator-bench-run-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(tmp.clone());
    std::fs::create_dir_all(&tmp)?;
    let user_cfg = match &args.config {
        Some(p) => Some(crate::config::Config::load(p)?),
        None => None,
    };
    let model = match (&args.model, &user_cfg) {
        (Some(m), _) => m.clone(),
        (None, Some(c)) => c.model.path.clone(),
        (None, None) => {
            let d = tmp.join("model");
            TinySpec::llama(0).write(&d)?;
            d
        }
    };
    write_tasks(&tmp.join("tasks.jsonl"), &letter_tasks(args.prompts * 4), References::Required)?;
    let server = ScriptedServer::start(Behavior::delay(Duration::from_millis(args.latency_ms), more_a_judge())).await?;
    let lora = if args.lora { "[learner.lora]\nenabled = true\nrank = 4\nalpha = 8.0\n" } else { "" };
    let cfg_text = format!(
        "[model]\npath = {model:?}\ndtype = \"f32\"\n\n[engine]\nmax_num_seqs = 16\n[engine.sampling]\ntemperature = 1.0\n\
         max_new_tokens = {mnt}\n\n[run]\nseed = 7\nsteps = {steps}\nbatch_prompts = {p}\nn_samples = {n}\nsync_every = 1\n\
         save_every = {steps}\njudge_concurrency = 64\n\n[data]\ntasks = \"tasks.jsonl\"\n\n[judge]\nkind = \"openai\"\n\
         [judge.openai]\nbase_url = \"{url}\"\nmodel = \"scripted\"\napi_key_env = \"\"\nmax_concurrency = 64\n\n\
         [learner]\nalgorithm = \"grpo\"\nlr = 1e-3\nthreads = 2\n{lora}",
        model = model.display().to_string(),
        mnt = args.max_new_tokens,
        steps = args.steps,
        p = args.prompts,
        n = args.n,
        url = server.base_url(),
    );
    let config = tmp.join("bench.toml");
    match user_cfg {
        None => std::fs::write(&config, cfg_text)?,
        Some(mut c) => {
            use crate::judge::config::{JudgeKind, VerdictMode};
            c.model.path = model.clone();
            c.judge.kind = JudgeKind::Openai;
            c.judge.mode = VerdictMode::Generate;
            c.judge.templates = None;
            c.judge.openai.base_url = server.base_url();
            c.judge.openai.model = "scripted".into();
            c.judge.openai.api_key_env = String::new();
            c.judge.openai.max_concurrency = 64;
            c.data.tasks = Some(tmp.join("tasks.jsonl"));
            c.data.eval_tasks = None;
            c.run.steps = args.steps;
            c.run.batch_prompts = args.prompts;
            c.run.n_samples = args.n;
            c.run.sync_every = 1;
            c.run.save_every = args.steps;
            c.run.judge_concurrency = 64;
            c.engine.sampling.max_new_tokens = args.max_new_tokens;
            let text = toml::to_string(&c).context("writing the bench's config as TOML")?;
            std::fs::write(&config, text)?;
        }
    }
    let mut report = serde_json::Map::new();
    report.insert("model".into(), serde_json::json!(model.display().to_string()));
    let opts = RunOptions { config, run_dir: Some(tmp.join("run")), resume: Resume::Never, allow_config_change: vec![] };
    let mut trainer = Trainer::start(prepare(&opts)?).await?;
    println!(
        "bench run: model {} | {} prompts x {} samples, max_new_tokens {} | judge latency {} ms, concurrency 64 | {} repeats",
        model.display(),
        args.prompts,
        args.n,
        args.max_new_tokens,
        args.latency_ms,
        args.repeats
    );

    // 1. Overlap of generation and judging on one fixed batch (same seeds: same rollouts).
    let batch: Vec<usize> = (0..args.prompts).collect();
    let overlap_repeats = if args.skip_overlap { 0 } else { args.repeats };
    let requests: Vec<GenRequest> = batch
        .iter()
        .enumerate()
        .map(|(pi, &ti)| GenRequest { messages: task_messages(&trainer.tasks[ti]), n: args.n, seed: SeedKey::new(7, 1, pi as u64) })
        .collect();
    let (mut gen_s, mut judge_s, mut both_s) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..overlap_repeats {
        let t = Instant::now();
        let groups = trainer.engine.generate(&requests, &trainer.cfg.engine.sampling).await?;
        gen_s.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let permits = Arc::new(Semaphore::new(trainer.cfg.run.judge_concurrency));
        let mut pending = FuturesUnordered::new();
        for (pi, g) in groups.iter().enumerate() {
            let task = trainer.tasks[batch[pi]].clone();
            let reference = trainer.curriculum.reference(&task).context("reference")?.to_string();
            for r in g {
                let (judge, permits, cfg, task, reference) =
                    (trainer.judge.clone(), permits.clone(), trainer.cfg.reward.clone(), task.clone(), reference.clone());
                let text = r.text.clone();
                pending.push(async move {
                    let _p = permits.acquire_owned().await.expect("open");
                    let input = RewardInput { prompt: &task.prompt, criteria: None, response: &text, reference: &reference };
                    reward::reward(&*judge, &cfg, input, 0).await
                });
            }
        }
        while pending.next().await.is_some() {}
        judge_s.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        trainer.generate_and_judge(1, &batch).await?;
        both_s.push(t.elapsed().as_secs_f64());
    }
    if overlap_repeats > 0 {
        let (g, j, b) = (median(gen_s), median(judge_s), median(both_s));
        println!(
            "overlap: generation alone {g:.3}s, judging alone {j:.3}s, both as the trainer runs them {b:.3}s \
             -> ratio {:.3} (goal <= 1.10; medians)",
            b / g.max(j)
        );
        report.insert("overlap".into(), serde_json::json!({"generate_s": g, "judge_s": j, "both_s": b, "ratio": b / g.max(j)}));
    }

    // 2. Sync: export the learner's weights and reload the engine.
    let (mut sync_s, mut export_s, mut reload_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0u64;
    let root = trainer.run.root.join("bench-policy");
    let mut served = sync::Served { path: model.clone(), step: 0, owned: false };
    let mut weights_file = PathBuf::new();
    for r in 0..args.repeats {
        let t = Instant::now();
        let root2 = root.clone();
        let step = 1000 + r as u64;
        let (dir, ex) = super::on_learner(&mut trainer.learner, move |l| sync::export(l, &root2, step)).await??;
        reload_s.push(sync::switch(&*trainer.engine, &mut served, dir.clone(), step).await?);
        export_s.push(ex.secs);
        sync_s.push(t.elapsed().as_secs_f64());
        bytes = ex.bytes;
        weights_file = largest_safetensors(&dir)?;
    }
    let bws = (0..args.repeats).map(|_| sync::copy_bandwidth(&weights_file)).collect::<Result<Vec<_>>>()?;
    let bw = median(bws.iter().map(|b| b.0).collect());
    let bw_disk = median(bws.iter().map(|b| b.1).collect());
    let s = median(sync_s);
    let floor = bytes as f64 / bw;
    println!(
        "sync: {s:.3}s (export {:.3}s + engine reload {:.3}s) for {:.2} MB written; write bandwidth {:.0} MB/s \
         (page cache; {:.0} MB/s fsynced) -> floor {floor:.3}s -> ratio {:.2} (goal <= 3; {:.2} against the fsynced bandwidth)",
        median(export_s.clone()),
        median(reload_s.clone()),
        bytes as f64 / 1e6,
        bw / 1e6,
        bw_disk / 1e6,
        s / floor,
        s / (bytes as f64 / bw_disk),
    );
    report.insert(
        "sync".into(),
        serde_json::json!({
            "secs": s, "export_s": median(export_s.clone()), "reload_s": median(reload_s.clone()), "bytes": bytes,
            "write_bw": bw, "write_bw_fsynced": bw_disk, "ratio": s / floor,
        }),
    );
    // Back to the run's own weights before training.
    trainer.engine.reload(&model).await?;

    // 3. Overhead over whole steps.
    let t = Instant::now();
    trainer.train().await?;
    let wall = t.elapsed().as_secs_f64();
    let lines = crate::metrics::read_jsonl(&trainer.run.metrics())?;
    let sum = |k: &str| lines.iter().filter_map(|v| v.get(k).and_then(|x| x.as_f64())).sum::<f64>();
    let (step_t, other) = (sum("t_step"), sum("t_other"));
    println!(
        "steps: {} in {wall:.2}s: generate {:.2}s, judge tail {:.2}s, learn {:.2}s, sync {:.2}s, checkpoint {:.2}s, \
         other {other:.3}s -> overhead share {:.2}% (goal <= 2%)",
        lines.len(),
        sum("t_generate"),
        sum("t_judge_tail"),
        sum("t_learn"),
        sum("t_sync"),
        sum("t_checkpoint"),
        100.0 * other / step_t.max(1e-9)
    );
    report.insert("wall_s".into(), serde_json::json!(wall));
    report.insert("steps".into(), serde_json::Value::Array(lines));
    if let Some(path) = &args.json {
        crate::fsutil::atomic_write(path, &serde_json::to_vec_pretty(&serde_json::Value::Object(report))?)?;
    }
    Ok(())
}

fn largest_safetensors(dir: &Path) -> Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let n = std::fs::metadata(&p)?.len();
            if best.as_ref().is_none_or(|(b, _)| n > *b) {
                best = Some((n, p));
            }
        }
    }
    best.map(|(_, p)| p).context("export has no safetensors file")
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
