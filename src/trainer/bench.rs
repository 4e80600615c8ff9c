//! `orchestrator bench run`: the training loop's own costs on a tiny model and a scripted judge
//! of fixed latency, as ratios measured in one run.
//!
//! 1. overlap: rollout+judge phase wall / max(generation alone, judging alone), same rollouts;
//! 2. sync: weight-sync wall / (bytes written / this machine's measured copy bandwidth);
//! 3. steps: whole training steps, once per `--off-policy` mode (synchronous, one-step-off),
//!    each a fresh run with the same seeds: median step time, the share of step time outside
//!    engine, judge, learner, sync and checkpoint, and for one-step-off the share of the
//!    learner's time hidden behind generation and the step time against the synchronous run.
//!
//! What the runs train on is a [`RunBench`]: the engine backend is one of its fields. Section 3
//! runs once per backend of `--pool` (0 = the embedded engine, N = a remote pool of N loopback
//! servers, [`crate::testkit::pool`], each generating with its own embedded engine on the same
//! model) and mode. All of them share this machine's cores, so a pool here measures the HTTP
//! path's overhead against the embedded engine, not the speed-up of N machines.

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
    /// `run.max_off_policy_steps` of each training run measured in section 3 (0 = synchronous,
    /// 1 = one-step-off), each a fresh run of --steps steps.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    pub off_policy: Vec<u64>,
    /// Engine backends of section 3: 0 = the embedded engine, N = a remote pool of N loopback
    /// servers on 127.0.0.1 (SGLang dialect with full-weight pushes; vLLM with LoRA pushes under
    /// --lora). Each backend runs every --off-policy mode.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub pool: Vec<usize>,
    /// Also write the measurements as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Where the bench's rollouts are generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The embedded mistral.rs engine, in this process.
    Embedded,
    /// A remote pool: the base URLs of its servers (loopback stand-ins started by the bench).
    Pool { servers: Vec<String>, lora: bool, export_dir: PathBuf },
}

impl Backend {
    fn name(&self) -> String {
        match self {
            Backend::Embedded => "embedded".into(),
            Backend::Pool { servers, .. } => format!("pool of {}", servers.len()),
        }
    }
}

/// What the bench's training runs are: the engine backend and the run settings the flags give.
#[derive(Debug, Clone)]
pub struct RunBench {
    pub backend: Backend,
    pub args: BenchRunArgs,
}

impl RunBench {
    pub fn from_args(args: BenchRunArgs) -> Self {
        Self { backend: Backend::Embedded, args }
    }

    /// The `[engine]` section of the bench's own config.
    fn engine_toml(&self) -> String {
        match &self.backend {
            Backend::Embedded => format!("[engine]\nmax_num_seqs = {BENCH_SEQS}\n"),
            Backend::Pool { servers, lora, export_dir } => format!(
                "[engine]\nmax_num_seqs = {BENCH_SEQS}\nbackend = \"remote\"\n[engine.remote]\nkind = \"{}\"\nservers = {servers:?}\n\
                 model = \"{POOL_MODEL}\"\nweight_push = \"{}\"\nexport_dir = {:?}\n",
                if *lora { "vllm" } else { "sglang" },
                if *lora { "lora" } else { "disk" },
                export_dir.display().to_string(),
            ),
        }
    }

    /// The same backend in a loaded config (`--config`).
    fn apply(&self, c: &mut crate::config::Config) {
        use crate::engine::remote::{RemoteKind, WeightPush};
        c.engine.max_num_seqs = BENCH_SEQS;
        match &self.backend {
            Backend::Embedded => c.engine.backend = crate::engine::Backend::Embedded,
            Backend::Pool { servers, lora, export_dir } => {
                c.engine.backend = crate::engine::Backend::Remote;
                c.engine.remote.kind = if *lora { RemoteKind::Vllm } else { RemoteKind::Sglang };
                c.engine.remote.weight_push = if *lora { WeightPush::Lora } else { WeightPush::Disk };
                c.engine.remote.servers = servers.clone();
                c.engine.remote.model = POOL_MODEL.into();
                c.engine.remote.export_dir = export_dir.clone();
            }
        }
    }
}

/// Sequences every engine of the bench batches at once (embedded, or inside each pool server).
const BENCH_SEQS: usize = 16;
/// The name the bench's pool servers serve the base model under.
const POOL_MODEL: &str = "bench-base";

/// Starts `n` loopback pool servers on `model`, each with the bench's engine settings.
async fn start_pool(n: usize, model: &Path, lora: bool) -> Result<Vec<crate::testkit::pool::PoolServer>> {
    use crate::testkit::pool::{Dialect, PoolServer, PoolServerOptions};
    let mut out = Vec::new();
    for _ in 0..n {
        let mut o = PoolServerOptions::new(if lora { Dialect::Vllm } else { Dialect::Sglang }, model, POOL_MODEL);
        o.engine.max_num_seqs = BENCH_SEQS;
        out.push(PoolServer::start(o).await?);
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub async fn run(args: BenchRunArgs) -> Result<()> {
    let bench = RunBench::from_args(args);
    let args = &bench.args;
    if args.pool.is_empty() {
        anyhow::bail!("--pool: give at least one backend (0 = embedded, N = a pool of N servers)");
    }
    for &m in &args.off_policy {
        if m > 1 {
            anyhow::bail!("--off-policy: {m} is not a valid run.max_off_policy_steps (0 = synchronous, 1 = one-step-off)");
        }
    }
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
    // Every run of the bench, synchronous or not, computes the TIS weights (the learner logs the
    // mismatch either way); one-step-off applies them, as its config should.
    let cfg_text = |bench: &RunBench| format!(
        "[model]\npath = {model:?}\ndtype = \"f32\"\n\n{engine}[engine.sampling]\ntemperature = 1.0\n\
         max_new_tokens = {mnt}\n\n[run]\nseed = 7\nsteps = {steps}\nbatch_prompts = {p}\nn_samples = {n}\nsync_every = 1\n\
         save_every = {steps}\njudge_concurrency = 64\nmax_off_policy_steps = OFF_POLICY\n\n[data]\ntasks = \"tasks.jsonl\"\n\n\
         [judge]\nkind = \"openai\"\n[judge.openai]\nbase_url = \"{url}\"\nmodel = \"scripted\"\napi_key_env = \"\"\n\
         max_concurrency = 64\n\n[learner]\nalgorithm = \"grpo\"\nlr = 1e-3\nthreads = 2\nis_correction = \"token-tis\"\n{lora}",
        engine = bench.engine_toml(),
        model = model.display().to_string(),
        mnt = args.max_new_tokens,
        steps = args.steps,
        p = args.prompts,
        n = args.n,
        url = server.base_url(),
    );
    // One config per backend and mode (`max_off_policy_steps`), else identical.
    let config_for = |bench: &RunBench, tag: &str, off: u64| -> Result<PathBuf> {
        let config = tmp.join(format!("bench-{tag}-off{off}.toml"));
        match user_cfg.clone() {
            None => std::fs::write(&config, cfg_text(bench).replace("OFF_POLICY", &off.to_string()))?,
            Some(mut c) => {
                bench.apply(&mut c);
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
                c.run.max_off_policy_steps = off;
                let text = toml::to_string(&c).context("writing the bench's config as TOML")?;
                std::fs::write(&config, text)?;
            }
        }
        Ok(config)
    };
    let mut report = serde_json::Map::new();
    report.insert("model".into(), serde_json::json!(model.display().to_string()));
    let modes = if args.off_policy.is_empty() { vec![0] } else { args.off_policy.clone() };
    let opts_for = |bench: &RunBench, tag: &str, off: u64| -> Result<RunOptions> {
        let run_dir = Some(tmp.join(format!("run-{tag}-off{off}")));
        Ok(RunOptions { config: config_for(bench, &tag, off)?, run_dir, resume: Resume::Never, allow_config_change: vec![] })
    };
    let mut trainer = Trainer::start(prepare(&opts_for(&bench, "first", modes[0])?)?).await?;
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

    // 3. Whole steps, once per backend and mode: the first on this trainer, the others each on a
    // fresh one (a pool's servers start before its runs and stop after them).
    let mut runs = Vec::new();
    let mut first = Some(trainer);
    for (bi, &pool) in args.pool.iter().enumerate() {
        let (servers, backend) = if pool == 0 {
            (Vec::new(), Backend::Embedded)
        } else {
            let servers = start_pool(pool, &model, args.lora).await?;
            let urls = servers.iter().map(|s| s.base_url()).collect();
            let export_dir = tmp.join(format!("pool-export-{bi}"));
            (servers, Backend::Pool { servers: urls, lora: args.lora, export_dir })
        };
        let b = RunBench { backend, args: args.clone() };
        for (mi, &off) in modes.iter().enumerate() {
            let mut trainer = match first.take() {
                Some(t) if pool == 0 && mi == 0 => t,
                other => {
                    drop(other);
                    Trainer::start(prepare(&opts_for(&b, &format!("b{bi}"), off)?)?).await?
                }
            };
            let t = Instant::now();
            trainer.train().await?;
            let wall = t.elapsed().as_secs_f64();
            runs.push(ModeRun::new(b.backend.name(), off, wall, crate::metrics::read_jsonl(&trainer.run.metrics())?));
        }
        for s in &servers {
            s.kill().await;
        }
    }
    print_modes(&runs);
    report.insert("wall_s".into(), serde_json::json!(runs[0].wall));
    report.insert("steps".into(), serde_json::Value::Array(runs[0].lines.clone()));
    let embedded = |off: u64| runs.iter().find(|r| r.backend == "embedded" && r.off == off);
    if let (Some(s), Some(o)) = (embedded(0), embedded(1)) {
        report.insert("off_policy_vs_sync".into(), serde_json::to_value(OffVsSync::of(s, o))?);
    }
    report.insert("modes".into(), serde_json::Value::Array(runs.iter().map(|r| r.json()).collect()));
    // Products our CPU kernel computed in this process: 0 where the engine and learner ran on a GPU.
    report.insert("cpu_kernel_products".into(), serde_json::json!(candle_core::cpu_backend::rowdot_products()));
    if let Some(path) = &args.json {
        crate::fsutil::atomic_write(path, &serde_json::to_vec_pretty(&serde_json::Value::Object(report))?)?;
    }
    Ok(())
}

/// One training run of section 3 and its medians over the steady steps: from step 2 (step 1 has
/// no rollouts made ahead) to the one before the last (which has nothing to make ahead), when
/// there are four steps or more. Medians, because a machine shared with other work stretches
/// single steps.
struct ModeRun {
    backend: String,
    off: u64,
    wall: f64,
    lines: Vec<serde_json::Value>,
    steady: (u64, u64),
}

impl ModeRun {
    fn new(backend: String, off: u64, wall: f64, lines: Vec<serde_json::Value>) -> Self {
        let n = lines.len() as u64;
        let steady = if n >= 4 { (2, n - 1) } else { (1, n) };
        Self { backend, off, wall, lines, steady }
    }

    fn name(&self) -> &'static str {
        if self.off == 0 { "synchronous" } else { "one-step-off" }
    }

    /// Share of the step spent waiting for rollouts (generation, then the judge's tail).
    fn waiting_share(&self) -> f64 {
        (self.steady_sum("t_generate") + self.steady_sum("t_judge_tail")) / self.steady_sum("t_step").max(1e-9)
    }

    fn steady_lines(&self) -> impl Iterator<Item = &serde_json::Value> {
        let (a, b) = self.steady;
        self.lines.iter().filter(move |v| v["step"].as_u64().is_some_and(|s| s >= a && s <= b))
    }

    /// Median of `key` over the steady steps (0 without values).
    fn med(&self, key: &str) -> f64 {
        let xs: Vec<f64> = self.steady_lines().filter_map(|v| v.get(key).and_then(|x| x.as_f64())).collect();
        if xs.is_empty() { 0.0 } else { median(xs) }
    }

    /// Sum of `key` over the steady steps.
    fn steady_sum(&self, key: &str) -> f64 {
        self.steady_lines().filter_map(|v| v.get(key).and_then(|x| x.as_f64())).fold(0.0, |a, x| a + x)
    }

    fn sum_all(&self, key: &str) -> f64 {
        self.lines.iter().filter_map(|v| v.get(key).and_then(|x| x.as_f64())).fold(0.0, |a, x| a + x)
    }

    /// Share of the learner's time (steady steps) that ran alongside generation and judging.
    fn hidden_share(&self) -> f64 {
        self.steady_sum("t_overlap") / self.steady_sum("t_learn").max(1e-9)
    }

    fn overhead_share(&self) -> f64 {
        self.sum_all("t_other") / self.sum_all("t_step").max(1e-9)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": self.backend, "waiting_share": self.waiting_share(),
            "max_off_policy_steps": self.off, "wall_s": self.wall, "steady_steps": [self.steady.0, self.steady.1],
            "median_step_s": self.med("t_step"), "median_generate_s": self.med("t_generate"),
            "median_judge_tail_s": self.med("t_judge_tail"), "median_learn_s": self.med("t_learn"),
            "median_overlap_s": self.med("t_overlap"), "median_sync_s": self.med("t_sync"),
            "hidden_share": self.hidden_share(), "overhead_share": self.overhead_share(),
            "off_policy_steps": self.lines.iter().map(|v| v["off_policy_steps"].clone()).collect::<Vec<_>>(),
            "steps": self.lines,
        })
    }
}

/// One-step-off against synchronous, on the steady steps' medians.
#[derive(serde::Serialize)]
struct OffVsSync {
    /// Median step time, one-step-off over synchronous.
    step_ratio: f64,
    /// Wall time of the whole run (the same steps and work), one-step-off over synchronous.
    wall_ratio: f64,
    /// One-step-off's learner time that ran alongside generation (t_overlap / t_learn).
    hidden_share: f64,
    /// The synchronous step's learner time that one-step-off took off the step:
    /// (synchronous step - one-step-off step) / synchronous learn. Below `hidden_share` when
    /// learning and generating slow each other down (they share the machine's cores).
    saved_share: f64,
}

impl OffVsSync {
    fn of(sync: &ModeRun, off: &ModeRun) -> Self {
        Self {
            step_ratio: off.med("t_step") / sync.med("t_step").max(1e-9),
            wall_ratio: off.wall / sync.wall.max(1e-9),
            hidden_share: off.hidden_share(),
            saved_share: (sync.med("t_step") - off.med("t_step")) / sync.med("t_learn").max(1e-9),
        }
    }
}

fn print_modes(runs: &[ModeRun]) {
    let r0 = &runs[0];
    println!(
        "steps: {} per run, medians over steps {}-{} (s)\n{:<12}{:<14}{:>8}{:>8}{:>10}{:>12}{:>8}{:>9}{:>8}{:>8}{:>9}{:>11}",
        r0.lines.len(),
        r0.steady.0,
        r0.steady.1,
        "backend",
        "mode",
        "wall",
        "step",
        "generate",
        "judge tail",
        "learn",
        "hidden",
        "sync",
        "ckpt",
        "waiting",
        "overhead",
    );
    for r in runs {
        println!(
            "{:<12}{:<14}{:>8.2}{:>8.3}{:>10.3}{:>12.3}{:>8.3}{:>9.3}{:>8.3}{:>8.3}{:>8.0}%{:>10.2}%",
            r.backend,
            r.name(),
            r.wall,
            r.med("t_step"),
            r.med("t_generate"),
            r.med("t_judge_tail"),
            r.med("t_learn"),
            r.med("t_overlap"),
            r.med("t_sync"),
            r.med("t_checkpoint"),
            100.0 * r.waiting_share(),
            100.0 * r.overhead_share(),
        );
    }
    println!(
        "waiting: share of step time spent waiting for rollouts (generate + judge tail); \
         overhead: share outside engine, judge, learner, sync and checkpoint (goal <= 2%)"
    );
    for backend in runs.iter().map(|r| r.backend.clone()).collect::<std::collections::BTreeSet<_>>() {
        let of = |off: u64| runs.iter().find(|r| r.backend == backend && r.off == off);
        if let (Some(s), Some(o)) = (of(0), of(1)) {
            let c = OffVsSync::of(s, o);
            println!(
                "{backend}: one-step-off vs synchronous: step time ratio {:.3} (run wall ratio {:.3}); learner time hidden {:.0}% \
                 (t_overlap / t_learn, goal >= 80% when generation dominates); synchronous learner time saved {:.0}% \
                 ((sync step - off step) / sync learn)",
                c.step_ratio,
                c.wall_ratio,
                100.0 * c.hidden_share,
                100.0 * c.saved_share,
            );
        }
    }
    if let Some(e) = runs.iter().find(|r| r.backend == "embedded" && r.off == 0) {
        for p in runs.iter().filter(|r| r.backend != "embedded" && r.off == 0) {
            println!(
                "{}: generation {:.3}s against the embedded engine's {:.3}s (synchronous medians) -> HTTP pool overhead {:+.1}% \
                 of generation time (goal <= 10% at one server; every server shares this machine's cores)",
                p.backend,
                p.med("t_generate"),
                e.med("t_generate"),
                100.0 * (p.med("t_generate") / e.med("t_generate").max(1e-9) - 1.0),
            );
        }
    }
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
