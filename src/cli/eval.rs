//! `orchestrator eval`: policy vs baseline on held-out tasks, judged in both orders.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::config::Config;
use crate::data::{read_tasks, References};
use crate::eval::{self, Summary};
use crate::judge::JudgeKind;

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    /// The model under test: an HF model directory, a run directory (its newest complete
    /// checkpoint) or a checkpoint directory; checkpoints are exported under `OUT/models/`.
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
    let policy_dir = eval::resolve_model(&args.policy, &scratch)?;
    let baseline_dir = eval::resolve_model(&args.baseline, &scratch)?;
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
    let judge_name = match cfg.judge.kind {
        JudgeKind::Openai => format!("openai {} at {}", cfg.judge.openai.model, cfg.judge.openai.base_url),
        JudgeKind::Embedded => {
            format!("embedded {}", cfg.judge.embedded_model(&cfg.model).path.display())
        }
    };
    eprintln!(
        "eval: {} tasks from {} | policy {} vs baseline {} | judge {judge_name}",
        tasks.len(),
        tasks_path.display(),
        policy_dir.display(),
        baseline_dir.display()
    );

    // One model in memory at a time: policy, then baseline, then the judge.
    let t0 = Instant::now();
    let policy = eval::generate_answers(
        &eval::model_config(&policy_dir, &cfg.model),
        &cfg.engine,
        &tasks,
        seed,
        "generate policy",
    )
    .await?;
    let baseline = eval::generate_answers(
        &eval::model_config(&baseline_dir, &cfg.model),
        &cfg.engine,
        &tasks,
        seed,
        "generate baseline",
    )
    .await?;
    let t_gen = t0.elapsed().as_secs_f64();
    let judge = crate::judge::from_config(&cfg.judge, &cfg.model).await?;
    let t1 = Instant::now();
    let (records, overall, domains) =
        eval::judge_pairs(judge.as_ref(), &cfg.reward, &tasks, &policy, &baseline).await;
    let t_judge = t1.elapsed().as_secs_f64();

    let summary = Summary {
        policy: policy_dir,
        baseline: baseline_dir,
        tasks: tasks.len(),
        seed,
        judge: judge_name,
        overall,
        domains,
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
    println!("wrote {} and {}", jpath.display(), spath.display());
    Ok(())
}
