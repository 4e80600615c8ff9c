//! `orchestrator select`: margin-aware data selection.
//!
//! Inputs: a task file, the policy's answers (`--policy`) and candidate answers
//! (`--candidates`, repeatable), both in the format `orchestrator generate` writes. Policy and
//! candidates are told apart by the file they come from, so one model's own samples can be
//! either (e.g. a greedy run as the policy, high-temperature runs as candidates).
//! Output: the kept tasks as task JSONL, references ordered weakest..strongest, and a JSON report
//! (summary, margin histogram, every task's scores).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::data::{self, References};
use crate::selection::{self, Answer, SelectionMode, WeakerCandidates};

#[derive(Debug, Clone, clap::Args)]
pub struct SelectArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    #[arg(long)]
    pub tasks: PathBuf,
    /// The current policy's answers (generate output).
    #[arg(long)]
    pub policy: PathBuf,
    /// Candidate answers (generate output); repeat for several sources.
    #[arg(long, required = true)]
    pub candidates: Vec<PathBuf>,
    /// Kept tasks, task JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// JSON report (default: OUT with `.report.json`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Overrides selection.mode.
    #[arg(long, value_enum)]
    pub mode: Option<SelectionMode>,
    /// Overrides selection.top_k (and clears top_fraction).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Overrides selection.top_fraction (and clears top_k).
    #[arg(long)]
    pub top_fraction: Option<f64>,
    /// Overrides selection.min_margin.
    #[arg(long)]
    pub min_margin: Option<f64>,
    /// Keep candidates weaker than the policy as the lowest rungs (selection.weaker_candidates = "keep").
    #[arg(long)]
    pub keep_weaker: bool,
    /// Also treat the task file's existing references as candidates (source "task-reference").
    #[arg(long)]
    pub include_task_references: bool,
}

pub async fn run(args: SelectArgs) -> Result<()> {
    let cfg = Config::load(args.config.path())?;
    let mut sel = cfg.selection.clone();
    sel.order.get_or_insert(cfg.reward.position);
    if let Some(m) = args.mode {
        sel.mode = m;
    }
    if let Some(k) = args.top_k {
        sel.top_k = Some(k);
        sel.top_fraction = None;
    }
    if let Some(f) = args.top_fraction {
        sel.top_fraction = Some(f);
        sel.top_k = None;
    }
    if args.min_margin.is_some() {
        sel.min_margin = args.min_margin;
    }
    if args.keep_weaker {
        sel.weaker_candidates = WeakerCandidates::Keep;
    }

    let tasks = data::read_tasks(&args.tasks, References::Optional)?;
    let policy = selection::read_answers(&args.policy)?;
    let mut candidates = Vec::new();
    for path in &args.candidates {
        candidates.extend(selection::read_answers(path)?);
    }
    if args.include_task_references {
        for t in &tasks {
            candidates.extend(t.references.iter().enumerate().map(|(i, r)| Answer {
                task_id: t.id.clone(),
                text: r.clone(),
                source: "task-reference".into(),
                sample: i,
                origin: format!("{} task {:?} references[{i}]", args.tasks.display(), t.id),
            }));
        }
    }

    let judge = crate::judge::from_config(&cfg.judge, &cfg.model)
        .await
        .context("building the judge")?;
    let result = selection::select(&tasks, &policy, &candidates, judge.as_ref(), &sel).await?;

    let report = args.report.clone().unwrap_or_else(|| args.out.with_extension("report.json"));
    let report_json = serde_json::json!({ "summary": &result.summary, "tasks": &result.tasks });
    crate::fsutil::atomic_write(&report, &serde_json::to_vec_pretty(&report_json)?)?;
    eprint!("{}", result.summary.render());
    if let Some(line) = crate::judge::embedded::prefix_cache_summary() {
        eprintln!("{line}");
    }
    if result.kept.is_empty() {
        anyhow::bail!("no task was kept (report in {}); {} not written", report.display(), args.out.display());
    }
    data::write_tasks(&args.out, &result.kept, References::Required)?;
    eprintln!("wrote {} tasks to {} and the report to {}", result.kept.len(), args.out.display(), report.display());
    Ok(())
}

/// `orchestrator bench select`: `select` against the scripted judge server with a fixed latency,
/// printing the wall time and its ratio to the ideal (calls x latency / concurrency).
pub async fn bench(tasks: usize, candidates: usize, latency_ms: u64, concurrency: usize, pairwise: bool) -> Result<()> {
    use crate::testkit::scripted::{rules, Behavior, ScriptedServer};
    use crate::judge::{JudgeConfig, OpenAiJudge, Verdict};
    anyhow::ensure!(tasks > 0 && candidates > 0 && concurrency > 0, "tasks, candidates and concurrency must be >= 1");
    let answer = Behavior::rule(|req| {
        let prompt = req.prompt();
        if rules::answers(&prompt).is_some() {
            rules::verdict_reply(req, Verdict::First)
        } else {
            Behavior::reply("Fine.\n[[SCORE: 7]]")
        }
    });
    let server = ScriptedServer::start(Behavior::delay(std::time::Duration::from_millis(latency_ms), answer)).await?;
    let mut jc = JudgeConfig::default();
    jc.openai.base_url = server.base_url();
    jc.openai.model = "scripted".into();
    jc.openai.api_key_env = String::new();
    jc.openai.max_concurrency = concurrency;
    let judge = OpenAiJudge::new(&jc)?;
    let task_list: Vec<crate::data::Task> =
        (0..tasks).map(|i| crate::data::Task::new(format!("t{i}"), format!("Write text number {i}."), vec![])).collect();
    let mk = |i: usize, source: &str, sample: usize| Answer {
        task_id: format!("t{i}"),
        text: format!("{source} answer {sample} to task {i}"),
        source: source.into(),
        sample,
        origin: "bench".into(),
    };
    let policy: Vec<Answer> = (0..tasks).map(|i| mk(i, "policy", 0)).collect();
    let cands: Vec<Answer> = (0..tasks).flat_map(|i| (0..candidates).map(move |c| (i, c))).map(|(i, c)| mk(i, "cand", c)).collect();
    let sel = crate::selection::SelectionConfig {
        mode: if pairwise { SelectionMode::Pairwise } else { SelectionMode::Pointwise },
        concurrency,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let s = selection::select(&task_list, &policy, &cands, &judge, &sel).await?;
    let wall = t0.elapsed().as_secs_f64();
    let calls = s.summary.judge_calls;
    let ideal = calls as f64 * latency_ms as f64 / 1000.0 / concurrency as f64;
    println!(
        "select bench ({:?}): {tasks} tasks x {candidates} candidates, {calls} judge calls ({} unscored), latency {latency_ms} ms, \
         concurrency {concurrency}: {wall:.2} s; ideal {calls} x {:.3} s / {concurrency} = {ideal:.2} s; ratio {:.3}; max in flight at the server {}",
        sel.mode,
        s.summary.unscored_calls,
        latency_ms as f64 / 1000.0,
        wall / ideal,
        server.max_in_flight()
    );
    Ok(())
}
