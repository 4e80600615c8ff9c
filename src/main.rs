use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use orchestrator::cli;
use orchestrator::config::Config;

#[derive(Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Writing-RL trainer: mistral.rs rollouts, LLM-judge rewards, tch learner",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train: rollouts, judge rewards, curriculum, learner updates, weight sync, checkpoints.
    /// Resumes from the run directory's newest complete checkpoint by default.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Validate a config file (and environment overrides) without loading any weights.
    Check {
        #[command(flatten)]
        config: cli::ConfigArg,
        /// Check for this binary (default) or for a CUDA build of it: CUDA-only settings
        /// (paged attention, a cuda learner) are then listed instead of rejected.
        #[arg(long, value_enum, default_value = "this")]
        for_build: orchestrator::config::Build,
    },
    /// Sample answers for a JSONL file of prompts.
    Generate(cli::generate::GenerateArgs),
    /// Reward a JSONL file of (prompt, criteria?, response, reference) pairs with the judge.
    Judge(cli::judge::JudgeArgs),
    /// Convert WritingBench JSONL or the official Writing-RL parquet to task JSONL, or a GGUF
    /// model to an HF model directory.
    Import(cli::import::ImportArgs),
    /// Margin-aware data selection: keep the tasks with the largest (best candidate - policy)
    /// margins, with reference ladders ordered by the judge's scores.
    Select(cli::select::SelectArgs),
    /// Pairwise evaluation: policy vs baseline answers on held-out tasks, judged in both orders;
    /// win/tie/loss, win rate with a 95% Wilson interval, position consistency, per domain.
    Eval(cli::eval::EvalArgs),
    /// Plots (PNG) and a markdown summary of a run's metrics.jsonl, into RUN_DIR/report/.
    Report(cli::report::ReportArgs),
    /// A run's policy (newest complete checkpoint, or the one named) as a merged HF model
    /// directory, or with --adapter as a PEFT LoRA adapter directory.
    Export(cli::export::ExportArgs),
    /// The learner's logits for given token ids (LoRA applied, not merged), to compare another
    /// framework's forward pass on an export with ours.
    Logits(cli::export::LogitsArgs),
    /// Print throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a random HF model directory: a small one (Llama or Qwen2 layout) as the tests use,
    /// or, with --like, one with a real model's exact shape (config, sharded weights, a tokenizer
    /// covering every id) for measuring speed and memory without its weights.
    TinyModel {
        #[arg(long, value_enum, default_value = "llama")]
        arch: TinyArch,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// Copy this model's shape (exact config.json; random weights, sharded like HF).
        #[arg(long, value_enum, conflicts_with = "arch")]
        like: Option<orchestrator::synth::Like>,
        /// Weight dtype of a --like model.
        #[arg(long, value_enum, default_value = "bf16", requires = "like")]
        dtype: orchestrator::synth::SynthDType,
        /// Keep only this many layers of a --like model (same widths and vocabulary; quick checks).
        #[arg(long, requires = "like")]
        layers: Option<usize>,
    },
    /// The GPU memory budget of a config before anything loads: engine weights and KV cache,
    /// learner weights, trainable parameters, AdamW state, gradients, activations, log-prob
    /// chunk; a verdict and the largest settings that fit.
    #[command(after_long_help = orchestrator::plan::ASSUMPTIONS)]
    Plan(orchestrator::plan::PlanArgs),
    /// One vLLM or SGLang stand-in on 127.0.0.1 in the foreground, for tests of the remote
    /// rollout pool that kill it (prints `listening on http://127.0.0.1:PORT`).
    #[command(hide = true)]
    ServeTestPool(ServeTestPoolArgs),
}

#[derive(clap::Args)]
struct ServeTestPoolArgs {
    /// Which server's API to speak.
    #[arg(long, value_enum)]
    dialect: orchestrator::testkit::pool::Dialect,
    /// HF model directory of the base model.
    #[arg(long)]
    model: PathBuf,
    /// The name the base model is served under.
    #[arg(long)]
    name: String,
    /// Port on 127.0.0.1 (0: a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Environment variable holding the API key clients must send (default: no key).
    #[arg(long)]
    api_key_env: Option<String>,
    /// One request at a time (engine.serial): bit-exact results.
    #[arg(long)]
    serial: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TinyArch {
    Llama,
    Qwen2,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: cli::ConfigArg,
    /// Run directory (default: <run.root>/<run.name or the config file's stem>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// `auto` (newest complete checkpoint, if any), `never` (a fresh run; refused over an
    /// existing one) or a checkpoint directory.
    #[arg(long, default_value = "auto")]
    resume: orchestrator::trainer::Resume,
    /// Config keys (or prefixes, comma-separated) that may differ from the run's saved config on
    /// resume, e.g. `judge.openai.base_url,run.steps`.
    #[arg(long, value_delimiter = ',')]
    allow_config_change: Vec<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The training loop's overheads on a tiny model and a scripted judge: generation/judging
    /// overlap, sync cost vs copy bandwidth, time outside engine, judge and learner.
    Run(orchestrator::trainer::bench::BenchRunArgs),
    /// `select` against the scripted judge at a fixed latency: wall time vs calls x latency / concurrency.
    Select {
        #[arg(long, default_value_t = 100)]
        tasks: usize,
        #[arg(long, default_value_t = 4)]
        candidates: usize,
        #[arg(long, default_value_t = 200)]
        latency_ms: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Pairwise (one call per candidate) instead of pointwise (one per candidate plus the policy).
        #[arg(long)]
        pairwise: bool,
    },
    /// Rollout tokens/s serial vs batched, and our recording sampler vs plain mistral.rs.
    Engine {
        #[command(flatten)]
        config: cli::ConfigArg,
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
        batches: Vec<usize>,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Overrides engine.sampling.max_new_tokens.
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Also write the rows (tokens/s per batch size) as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Skip the serial measurement (one sequence at a time): at large batches on a GPU it
        /// takes batch-size times as long as the batched one.
        #[arg(long)]
        no_serial: bool,
        /// Our sampler never draws the end-of-sequence ids (eos_token_id of the model's
        /// config.json and generation_config.json), so every rollout has max_new_tokens tokens
        /// (scripts/bench_llamacpp.sh compares fixed lengths). Plain mistral.rs rows still stop.
        #[arg(long)]
        ignore_eos: bool,
        /// Skip the plain mistral.rs rows (its own sampler, no recording).
        #[arg(long)]
        no_plain: bool,
    },
    /// Judge calls/s against a scripted server with a fixed latency, and the ratio to C/L.
    Judge {
        #[arg(long, default_value_t = 200)]
        latency_ms: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 1280)]
        calls: usize,
    },
    /// Forward+backward tokens/s and peak memory of the tch learner (compare with
    /// scripts/bench_learner_torch.py).
    Learner(cli::bench_learner::BenchLearnerArgs),
}

/// Exit statuses, so a scheduler can tell a finished run from one to restart or to look at.
const EXIT_ERROR: u8 = 1;
const EXIT_JUDGE_DOWN: u8 = 3;
const EXIT_DIVERGED: u8 = 4;
const EXIT_POOL_SHORT: u8 = 5;
const EXIT_JUDGE_BUDGET: u8 = 6;
const EXIT_INTERRUPTED: u8 = 130;
const EXIT_CODES: &str = "\
Exit status:
  0    done (`run`: every step trained and checkpointed)
  1    error (bad config or input, I/O, engine or learner failure); nothing is overwritten
  2    bad command line
  3    `run`: stopped because the judge stayed unavailable; a checkpoint was written, resume when it is back
  4    `run`: stopped because learner.max_skipped_steps optimizer steps in a row had a non-finite
       gradient norm; none was applied, so the newest checkpoint is clean
  5    `run`: stopped because the remote pool generated fewer prompt groups than
       engine.remote.min_groups_share; the newest checkpoint is resumable, resume once the servers are back
  6    `run`: stopped because the run's judge tokens or cost reached run.max_judge_tokens or
       run.max_judge_cost; a checkpoint was written, raise the budget and resume to go on
  130  `run`: interrupted by SIGINT or SIGTERM; a checkpoint was written (a second signal exits at
       once without one), rerun the command to resume";

async fn run(args: RunArgs) -> Result<ExitCode> {
    use orchestrator::trainer::{self, Ended, RunOptions};
    let config = args.config.path().to_path_buf();
    let opts = RunOptions {
        config: config.clone(),
        run_dir: args.run_dir,
        resume: args.resume,
        allow_config_change: args.allow_config_change,
    };
    let resume_hint = |dir: &std::path::Path| {
        format!("orchestrator run {} --run-dir {}", config.display(), dir.display())
    };
    let ended = trainer::run(opts).await?;
    let print_outputs = |dir: &std::path::Path| {
        for (what, at) in orchestrator::rundir::outputs(dir) {
            println!("  {what:<18} {at}");
        }
    };
    Ok(match ended {
        Ended::Completed { step, run_dir } => {
            println!("run complete at step {step}: {}", run_dir.display());
            print_outputs(&run_dir);
            ExitCode::SUCCESS
        }
        Ended::Interrupted { step, run_dir } => {
            println!("interrupted; checkpoint at step {step}. Resume with: {}", resume_hint(&run_dir));
            print_outputs(&run_dir);
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Ended::JudgeDown { step, run_dir, reason } => {
            eprintln!(
                "error: stopped: {reason}\ncheckpoint at step {step}; once the judge is back, resume with: {}",
                resume_hint(&run_dir)
            );
            ExitCode::from(EXIT_JUDGE_DOWN)
        }
        Ended::JudgeBudget { step, run_dir, key, reason } => {
            eprintln!(
                "stopped: {reason}\ncheckpoint at step {step}; to go on, raise {key} and resume with: {} --allow-config-change {key}",
                resume_hint(&run_dir)
            );
            ExitCode::from(EXIT_JUDGE_BUDGET)
        }
    })
}

async fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Run(_) => unreachable!("handled in main"),
        Command::Bench(BenchCommand::Run(args)) => orchestrator::trainer::bench::run(args).await,
        Command::Check { config, for_build } => {
            let config = config.path();
            let cfg = Config::load_for(config, std::env::vars(), for_build)?;
            println!(
                "ok: {} (model {}, {:?})",
                config.display(),
                cfg.model.path.display(),
                cfg.model.resolved_format()
            );
            for w in cfg.warnings() {
                println!("warning: {w}");
            }
            if let Some(line) = orchestrator::cli::check::tasks_summary(&cfg)? {
                println!("{line}");
            }
            for (key, msg, here) in cfg.needs_cuda() {
                if !here {
                    println!("note: {key}: {msg}; checked for a CUDA build, this binary cannot run it");
                }
            }
            Ok(())
        }
        Command::Generate(args) => cli::generate::run(args).await,
        Command::Judge(args) => cli::judge::run(args).await,
        Command::Bench(BenchCommand::Judge { latency_ms, concurrency, calls }) => {
            cli::judge::bench(latency_ms, concurrency, calls).await
        }
        Command::Import(args) => cli::import::run(args),
        Command::Select(args) => cli::select::run(args).await,
        Command::Eval(args) => cli::eval::run(args).await,
        Command::Report(args) => cli::report::run(args),
        Command::Export(args) => cli::export::run(args),
        Command::Logits(args) => cli::export::logits(args),
        Command::Bench(BenchCommand::Select { tasks, candidates, latency_ms, concurrency, pairwise }) => {
            cli::select::bench(tasks, candidates, latency_ms, concurrency, pairwise).await
        }
        Command::Bench(BenchCommand::Engine { config, batches, repeats, max_new_tokens, json, no_serial, ignore_eos, no_plain }) => {
            let mut cfg = Config::load(config.path())?;
            if let Some(m) = max_new_tokens {
                cfg.engine.sampling.max_new_tokens = m;
            }
            let max_batch = batches.iter().copied().max().unwrap_or(1);
            cfg.engine.max_num_seqs = cfg.engine.max_num_seqs.max(max_batch);
            // Serial rows send one request at a time themselves; the engine must admit the batch.
            cfg.engine.serial = false;
            let mut engine = orchestrator::engine::MistralEngine::load(&cfg.model, &cfg.engine).await?;
            if ignore_eos {
                engine = engine.suppress_tokens(orchestrator::engine::bench::eos_ids(&cfg.model.path)?);
            }
            println!(
                "model {} | T={} top_p={} top_k={} max_new_tokens={} | {} repeats",
                cfg.model.path.display(),
                cfg.engine.sampling.temperature,
                cfg.engine.sampling.top_p,
                cfg.engine.sampling.top_k,
                cfg.engine.sampling.max_new_tokens,
                repeats
            );
            let t0 = std::time::Instant::now();
            let rows = orchestrator::engine::bench::run(&engine, &batches, &cfg.engine.sampling, repeats, !no_serial, !no_plain).await?;
            // Matrix products our CPU kernel served: none where the engine runs on a GPU.
            let cpu_kernel_products = candle_core::cpu_backend::rowdot_products();
            println!("CPU kernel products: {cpu_kernel_products}");
            if let Some(path) = json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "batch": r.batch, "ours_tok_s": r.batched_tok_s, "serial_tok_s": r.serial_tok_s,
                            "plain_tok_s": r.plain_tok_s, "ratio": r.sampler_ratio(), "batching_ratio": r.batching_ratio(),
                            "ours_tokens_per_request": r.batched_tokens_per_request, "prompt_tokens": r.prompt_tokens
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "model": cfg.model.path.display().to_string(),
                    "max_new_tokens": cfg.engine.sampling.max_new_tokens,
                    "ignore_eos": ignore_eos,
                    "prompt": orchestrator::engine::bench::BENCH_PROMPT,
                    "threads": candle_core::utils::get_num_threads(),
                    "paged_attention": cfg.engine.paged_attention.enabled,
                    "repeats": repeats,
                    "secs": t0.elapsed().as_secs_f64(),
                    "rows": rows,
                    "cpu_kernel_products": cpu_kernel_products,
                });
                orchestrator::fsutil::atomic_write(&path, &serde_json::to_vec_pretty(&v)?)?;
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Learner(args)) => cli::bench_learner::run(args),
        Command::Plan(args) => orchestrator::plan::run(args),
        Command::ServeTestPool(a) => {
            use orchestrator::testkit::pool::{serve_foreground, PoolServerOptions};
            let mut opts = PoolServerOptions::new(a.dialect, a.model, a.name);
            if let Some(var) = a.api_key_env {
                let key = std::env::var(&var).ok().filter(|k| !k.is_empty());
                opts.api_key = Some(key.ok_or_else(|| anyhow::anyhow!("--api-key-env: environment variable {var} is not set or empty"))?);
            }
            opts.engine.serial = a.serial;
            serve_foreground(opts, a.port).await
        }
        Command::TinyModel { like: Some(like), dtype, layers, seed, out, .. } => {
            orchestrator::synth::write_cli(like, dtype, seed, layers, &out)?;
            Ok(())
        }
        Command::TinyModel { arch, seed, out, .. } => {
            let spec = match arch {
                TinyArch::Llama => orchestrator::testkit::tiny::TinySpec::llama(seed),
                TinyArch::Qwen2 => orchestrator::testkit::tiny::TinySpec::qwen2(seed),
            };
            spec.write(&out)?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}

/// libtorch's OpenMP workers busy-wait between parallel regions by default; on shared cores they
/// starved the engine and the learner itself (docs/performance.md, "Batching and reproducibility"). libgomp reads
/// `OMP_WAIT_POLICY` when it is loaded, before `main`, so the binary runs itself again with it
/// set; a value the user set is kept.
fn passive_openmp() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe).arg0(arg0).args(args).env("OMP_WAIT_POLICY", "PASSIVE").exec();
    eprintln!("warning: could not run again with OMP_WAIT_POLICY=PASSIVE ({err}); continuing with OpenMP's default");
}

fn main() -> ExitCode {
    passive_openmp();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => rt.block_on(run(args)),
        other => rt.block_on(dispatch(other)).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<orchestrator::learner::Diverged>().is_some() {
                ExitCode::from(EXIT_DIVERGED)
            } else if e.downcast_ref::<orchestrator::engine::remote::PoolShort>().is_some() {
                ExitCode::from(EXIT_POOL_SHORT)
            } else {
                ExitCode::from(EXIT_ERROR)
            }
        }
    }
}
