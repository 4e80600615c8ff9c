//! `orchestrator eval`: policy vs baseline on held-out tasks, judged in both orders. With
//! `engine.backend = "remote"` the answers come from the pool (see [`eval::PoolWeights`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::config::Config;
use crate::engine::remote::RemoteEngine;
use crate::engine::Backend;
use crate::data::{read_tasks, References};
use crate::eval::{self, Summary};

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    /// The model under test: an HF model directory, a run directory (its newest complete
    /// checkpoint) or a checkpoint directory; checkpoints are exported under `OUT/models/`.
    /// With `engine.backend = "remote"`: the base model (`model.path`), a run or checkpoint
    /// trained with LoRA, or a PEFT adapter directory, pushed as an adapter of its own.
    #[arg(long)]
    pub policy: PathBuf,
    /// The model it is compared with: the same kinds as `--policy`.
    #[arg(long)]
    pub baseline: PathBuf,
    /// Task JSONL (references are not needed); default `data.eval_tasks`.
    #[arg(long)]
    pub tasks: Option<PathBuf>,
    /// Only the first N tasks.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Overrides `run.seed` (both models sample with the same seeds).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory for judgements.jsonl and summary.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub async fn run(args: EvalArgs) -> Result<()> {
    let cfg = Config::load(args.config.path())?;
    let scratch = args.out.join("models");
    let (policy_dir, baseline_dir, on_pool) = match cfg.engine.backend {
        Backend::Embedded => (eval::resolve_model(&args.policy, &scratch)?, eval::resolve_model(&args.baseline, &scratch)?, None),
        Backend::Remote => {
            let (base, remote) = (&cfg.model.path, &cfg.engine.remote);
            let p = eval::pool_weights(&args.policy, "--policy", base, remote)?;
            let b = eval::pool_weights(&args.baseline, "--baseline", base, remote)?;
            (p.path(base), b.path(base), Some((p, b)))
        }
    };
    let Some(tasks_path) = args.tasks.clone().or_else(|| cfg.data.eval_tasks.clone()) else {
        bail!("no tasks: pass --tasks FILE or set data.eval_tasks in {}", args.config.path().display());
    };
    let mut tasks = read_tasks(&tasks_path, References::Optional)?;
    if let Some(n) = args.limit {
        if n == 0 {
            bail!("--limit must be >= 1");
        }
        tasks.truncate(n);
    }
    let seed = args.seed.unwrap_or(cfg.run.seed);
    let judge_name = cfg.judge.describe(&cfg.model);
    eprintln!(
        "eval: {} tasks from {} | policy {} vs baseline {} | judge {judge_name}",
        tasks.len(),
        tasks_path.display(),
        policy_dir.display(),
        baseline_dir.display()
    );

    let t0 = Instant::now();
    let (policy, baseline) = match on_pool {
        // One model in memory at a time: policy, then baseline, then the judge.
        None => (
            eval::generate_answers(&eval::model_config(&policy_dir, &cfg.model), &cfg.engine, &tasks, seed, "generate policy").await?,
            eval::generate_answers(&eval::model_config(&baseline_dir, &cfg.model), &cfg.engine, &tasks, seed, "generate baseline")
                .await?,
        ),
        Some((p, b)) => {
            // Adapters go where the servers read pushed weights, in a directory of this process.
            let dir = cfg.engine.remote.export_dir.join(format!("eval-{}", std::process::id()));
            let result = async {
                let (d, pflag, bflag) = (dir.clone(), "--policy", "--baseline");
                let exports = tokio::task::spawn_blocking(move || -> Result<_> {
                    Ok((eval::pool_export(&p, 0, &d, pflag)?, eval::pool_export(&b, 1, &d, bflag)?))
                })
                .await??;
                let engine = RemoteEngine::connect(&cfg.engine.remote, &cfg.model.path, None).await?;
                let sides = [("generate policy", exports.0), ("generate baseline", exports.1)];
                let mut answers = eval::answers_on_pool(&engine, &cfg.engine.sampling, &tasks, seed, &sides).await?;
                let baseline = answers.pop().expect("two sides");
                Ok::<_, anyhow::Error>((answers.pop().expect("two sides"), baseline))
            }
            .await;
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    eprintln!("warning: removing {}: {e}", dir.display());
                }
            }
            result?
        }
    };
    let t_gen = t0.elapsed().as_secs_f64();
    let judge = crate::judge::Panel::from_config(&cfg.judge, &cfg.model).await?;
    let t1 = Instant::now();
    let (records, overall, domains, members) = eval::judge_pairs(&judge, &cfg.reward, &tasks, &policy, &baseline).await;
    let t_judge = t1.elapsed().as_secs_f64();

    let summary = Summary {
        policy: policy_dir,
        baseline: baseline_dir,
        tasks: tasks.len(),
        seed,
        judge: judge_name,
        overall,
        domains,
        members: eval::member_tallies(&members, &cfg.judge),
    };
    std::fs::create_dir_all(&args.out)?;
    let jpath = args.out.join("judgements.jsonl");
    eval::write_judgements(&jpath, &records)?;
    let spath = args.out.join("summary.json");
    crate::fsutil::atomic_write(&spath, &serde_json::to_vec_pretty(&summary)?)?;
    print!("{}", eval::table(&summary));
    println!(
        "win rate = (wins + ties/2) / scored pairs (a win needs both orders to prefer the policy); \
         reward = mean [reward] value{}; consist. = pairs whose orders agreed; first = calls choosing \
         the first-read answer. generate {t_gen:.1}s, judge {t_judge:.1}s",
        if cfg.reward.soft { " (soft where label probabilities exist)" } else { "" }
    );
    if cfg.judge.is_panel() {
        print!("{}", crate::reward::member_table(&members, &cfg.judge));
        println!("agree = share of pairs where the member's outcome equals the panel's (a tie against a win or loss counts 0.5)");
    }
    if let Some(line) = crate::judge::embedded::prefix_cache_summary() {
        println!("{line}");
    }
    println!("wrote {} and {}", jpath.display(), spath.display());
    Ok(())
}
