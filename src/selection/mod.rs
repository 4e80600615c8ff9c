//! Margin-aware data selection: keep the tasks where the policy has the most to learn.
//!
//! For every task the judge scores the policy's answer(s) and each candidate answer. The task's
//! margin is (best candidate score - policy score); the same scores order its candidates into a
//! reference ladder, weakest to strongest.
//! - `pointwise` (the paper's reading): the judge `rate`s every answer 1-10 against the task's
//!   criteria; the policy score is the mean over its scored answers.
//! - `pairwise`: the judge compares each candidate with each policy answer (order strategy as
//!   for the reward); a candidate's score is its win rate against the policy (tie = 0.5), and
//!   the policy's own score is 0.5 by definition.
//!
//! Unscored judgements are never numbers: they are left out and counted. Only the [`Judge`]
//! trait is used; calls run concurrently (bounded) with progress.

mod answers;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{bail, Result};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use answers::{read_answers, Answer};

use crate::validate::Problems;
use crate::data::Task;
use crate::judge::{Comparison, Judge, JudgeHealth, Judgement, Verdict};
use crate::progress::Progress;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SelectionMode {
    #[default]
    Pointwise,
    Pairwise,
}

/// Presentation order in `pairwise` mode: the reward's position strategies, with the candidate
/// as the reference and the policy's answer as the response. `reference-first` shows the
/// candidate first; `both` asks in both orders (the candidate wins only if both calls say so,
/// loses only if both say so, otherwise a tie; one unscored call makes the pair unscored);
/// `random` draws the order per comparison from `selection.seed`.
pub use crate::reward::Position as PairOrder;

/// What happens to candidates that score below the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeakerCandidates {
    /// Left out of the ladder.
    #[default]
    Drop,
    /// Kept as the lowest rungs.
    Keep,
}

/// `[selection]`. At most one of `top_k` / `top_fraction`; `min_margin` may combine with either
/// (applied first). With none set every scored task with a ladder is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelectionConfig {
    pub mode: SelectionMode,
    /// Pairwise order; unset = the `[reward]` position (the CLI fills it in).
    pub order: Option<PairOrder>,
    /// Judge calls in flight at once.
    pub concurrency: usize,
    pub top_k: Option<usize>,
    /// Fraction of the scored tasks to keep (rounded up).
    pub top_fraction: Option<f64>,
    /// Keep only tasks whose margin is at least this.
    pub min_margin: Option<f64>,
    pub weaker_candidates: WeakerCandidates,
    /// Seed of the `random` order.
    pub seed: u64,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        Self {
            mode: SelectionMode::Pointwise,
            order: None,
            concurrency: 32,
            top_k: None,
            top_fraction: None,
            min_margin: None,
            weaker_candidates: WeakerCandidates::Drop,
            seed: 0,
        }
    }
}

impl SelectionConfig {
    pub fn validate(&self, key: &str, p: &mut Problems) {
        if self.concurrency == 0 {
            p.push(&format!("{key}.concurrency"), "must be >= 1, got 0");
        }
        if self.top_k == Some(0) {
            p.push(&format!("{key}.top_k"), "must be >= 1, got 0");
        }
        if let Some(f) = self.top_fraction {
            p.open_closed(&format!("{key}.top_fraction"), f, 0.0, 1.0);
        }
        if self.top_k.is_some() && self.top_fraction.is_some() {
            p.push(&format!("{key}.top_fraction"), "set top_k or top_fraction, not both");
        }
        if let Some(m) = self.min_margin {
            if !m.is_finite() {
                p.push(&format!("{key}.min_margin"), format!("must be finite, got {m}"));
            }
        }
    }
}

/// One candidate's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateScore {
    pub source: String,
    pub sample: usize,
    /// None when every judgement of it was unscored.
    pub score: Option<f64>,
    /// Unscored judge calls about this candidate.
    pub unscored: usize,
    /// Its index in the output ladder, if it made it there.
    pub rung: Option<usize>,
}

/// Why a task was or was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskStatus {
    Kept,
    /// Scored, but below `min_margin` or outside the top-K / top fraction.
    BelowCut,
    /// Every scored candidate lost to the policy and weaker candidates are dropped.
    NoReference,
    /// The policy's answers or every candidate went unscored.
    Unscored,
    NoCandidates,
    NoPolicyAnswer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    pub id: String,
    pub policy_score: Option<f64>,
    pub margin: Option<f64>,
    pub status: TaskStatus,
    /// Unscored judge calls about the policy's answers (pointwise only).
    pub policy_unscored: usize,
    pub candidates: Vec<CandidateScore>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistogramBin {
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectionSummary {
    pub mode: SelectionMode,
    pub tasks: usize,
    pub kept: usize,
    pub below_cut: usize,
    pub no_reference: usize,
    pub unscored_tasks: usize,
    pub no_candidates: usize,
    pub no_policy_answer: usize,
    pub judge_calls: usize,
    pub unscored_calls: usize,
    /// Candidates with no scored judgement (left out of every ladder).
    pub unscored_candidates: usize,
    /// Candidates with an empty response (never judged, never a reference).
    pub empty_candidates: usize,
    pub weaker_dropped: usize,
    pub weaker_kept: usize,
    /// Margins of every scored task (bins of 1 point pointwise, 0.1 pairwise).
    pub margin_histogram: Vec<HistogramBin>,
    pub wall_s: f64,
}

/// The kept tasks (references = their ladders, by decreasing margin) and the full report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Selection {
    pub kept: Vec<Task>,
    pub summary: SelectionSummary,
    pub tasks: Vec<TaskScore>,
}

/// One judge call to make.
#[derive(Debug, Clone, Copy)]
enum Job {
    Rate { task: usize, answer: Who },
    Compare { task: usize, cand: usize, pol: usize, candidate_first: bool },
}

#[derive(Debug, Clone, Copy)]
enum Who {
    Policy(usize),
    Candidate(usize),
}

struct Work<'a> {
    task: &'a Task,
    policy: Vec<&'a Answer>,
    cands: Vec<&'a Answer>,
    empty: usize,
}

/// Runs the selection. `policy` and `candidates` may hold several answers per task; answers for
/// ids not in `tasks` are an error naming their line.
pub async fn select(
    tasks: &[Task],
    policy: &[Answer],
    candidates: &[Answer],
    judge: &dyn Judge,
    cfg: &SelectionConfig,
) -> Result<Selection> {
    let mut p = Problems::default();
    cfg.validate("selection", &mut p);
    if !p.0.is_empty() {
        bail!("{}", p.0.join("\n  "));
    }
    let index: HashMap<&str, usize> = tasks.iter().enumerate().map(|(i, t)| (t.id.as_str(), i)).collect();
    if index.len() != tasks.len() {
        bail!("selection: duplicate task ids");
    }
    let mut work: Vec<Work> =
        tasks.iter().map(|task| Work { task, policy: Vec::new(), cands: Vec::new(), empty: 0 }).collect();
    let mut seen: HashMap<(&str, &str, usize), &str> = HashMap::new();
    for (answers, policy_side) in [(policy, true), (candidates, false)] {
        for a in answers {
            let Some(&t) = index.get(a.task_id.as_str()) else {
                bail!("{}: task {:?} is not in the task file", a.origin, a.task_id);
            };
            if !policy_side {
                if let Some(first) = seen.insert((a.task_id.as_str(), a.source.as_str(), a.sample), a.origin.as_str()) {
                    bail!("{}: candidate {:?} sample {} for task {:?} also at {first}", a.origin, a.source, a.sample, a.task_id);
                }
                if a.text.trim().is_empty() {
                    work[t].empty += 1;
                    continue;
                }
            }
            if policy_side { work[t].policy.push(a) } else { work[t].cands.push(a) }
        }
    }

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut jobs = Vec::new();
    for (t, w) in work.iter().enumerate() {
        if w.policy.is_empty() || w.cands.is_empty() {
            continue;
        }
        match cfg.mode {
            SelectionMode::Pointwise => {
                jobs.extend((0..w.policy.len()).map(|i| Job::Rate { task: t, answer: Who::Policy(i) }));
                jobs.extend((0..w.cands.len()).map(|i| Job::Rate { task: t, answer: Who::Candidate(i) }));
            }
            SelectionMode::Pairwise => {
                for cand in 0..w.cands.len() {
                    for pol in 0..w.policy.len() {
                        let mut push = |candidate_first| jobs.push(Job::Compare { task: t, cand, pol, candidate_first });
                        match cfg.order.unwrap_or_default() {
                            PairOrder::ReferenceFirst => push(true),
                            PairOrder::ResponseFirst => push(false),
                            PairOrder::Random => push(rng.random_bool(0.5)),
                            PairOrder::Both => {
                                push(true);
                                push(false);
                            }
                        }
                    }
                }
            }
        }
    }

    let start = Instant::now();
    let progress = Progress::new(jobs.len() as u64, "select: judge calls");
    let unscored_so_far = std::sync::atomic::AtomicUsize::new(0);
    // A judge whose circuit breaker is open would make every remaining call unscored: stop.
    let down: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let results: Vec<(Job, Option<f64>)> = futures::stream::iter(jobs.iter().copied())
        .map(|job| {
            let (work, progress, unscored_so_far, down) = (&work, &progress, &unscored_so_far, &down);
            async move {
                if down.lock().unwrap().is_some() {
                    return (job, None);
                }
                if let JudgeHealth::Down { consecutive_failures, last_error, .. } = judge.health() {
                    *down.lock().unwrap() =
                        Some(format!("{consecutive_failures} consecutive failures, last: {last_error}"));
                    return (job, None);
                }
                let value = run_job(judge, work, job).await;
                if value.is_none() {
                    let n = unscored_so_far.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    progress.set_message(format!("{n} unscored"));
                }
                progress.inc(1);
                (job, value)
            }
        })
        .buffer_unordered(cfg.concurrency)
        .collect()
        .await;
    progress.finish();
    if let Some(why) = down.into_inner().unwrap() {
        bail!("selection stopped: the judge is down ({why})");
    }

    Ok(assemble(&work, results, cfg, start.elapsed().as_secs_f64()))
}

/// One judge call; the value is from the candidate's side for comparisons (1 win, 0.5 tie,
/// 0 loss) and the 1-10 rating for rates; None = unscored.
async fn run_job(judge: &dyn Judge, work: &[Work<'_>], job: Job) -> Option<f64> {
    match job {
        Job::Rate { task, answer } => {
            let w = &work[task];
            let text = match answer {
                Who::Policy(i) => &w.policy[i].text,
                Who::Candidate(i) => &w.cands[i].text,
            };
            let out = judge.rate(&w.task.prompt, w.task.criteria.as_deref(), text).await;
            out.score.filter(|s| s.is_finite())
        }
        Job::Compare { task, cand, pol, candidate_first } => {
            let w = &work[task];
            let (c, p) = (&w.cands[cand].text, &w.policy[pol].text);
            let (first, second) = if candidate_first { (c, p) } else { (p, c) };
            let out = judge
                .compare(Comparison { prompt: &w.task.prompt, criteria: w.task.criteria.as_deref(), first, second })
                .await;
            match out.judgement {
                Judgement::Unscored { .. } => None,
                Judgement::Scored { verdict, .. } => Some(match (verdict, candidate_first) {
                    (Verdict::Tie, _) => 0.5,
                    (Verdict::First, true) | (Verdict::Second, false) => 1.0,
                    (Verdict::First, false) | (Verdict::Second, true) => 0.0,
                }),
            }
        }
    }
}

fn mean(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = xs.into_iter().fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn assemble(work: &[Work<'_>], results: Vec<(Job, Option<f64>)>, cfg: &SelectionConfig, wall_s: f64) -> Selection {
    let judge_calls = results.len();
    let unscored_calls = results.iter().filter(|(_, v)| v.is_none()).count();
    // Collect raw values per task.
    let mut policy_vals: Vec<Vec<Option<f64>>> = work.iter().map(|w| vec![None; w.policy.len()]).collect();
    // cand_vals[t][c][pol] = the values of the (one or two) calls of that pair.
    let mut cand_vals: Vec<Vec<Vec<Vec<Option<f64>>>>> =
        work.iter().map(|w| vec![vec![Vec::new(); w.policy.len()]; w.cands.len()]).collect();
    let mut unscored_per_cand: Vec<Vec<usize>> = work.iter().map(|w| vec![0; w.cands.len()]).collect();
    let mut policy_unscored = vec![0usize; work.len()];
    for (job, v) in results {
        match job {
            Job::Rate { task, answer: Who::Policy(i) } => {
                policy_vals[task][i] = v;
                policy_unscored[task] += usize::from(v.is_none());
            }
            Job::Rate { task, answer: Who::Candidate(c) } => {
                cand_vals[task][c][0].push(v);
                unscored_per_cand[task][c] += usize::from(v.is_none());
            }
            Job::Compare { task, cand, pol, .. } => {
                cand_vals[task][cand][pol].push(v);
                unscored_per_cand[task][cand] += usize::from(v.is_none());
            }
        }
    }

    let mut scores = Vec::with_capacity(work.len());
    let mut ladders: Vec<Vec<String>> = Vec::with_capacity(work.len());
    let (mut unscored_candidates, mut weaker_dropped, mut weaker_kept) = (0, 0, 0);
    for (t, w) in work.iter().enumerate() {
        let policy_score = match cfg.mode {
            SelectionMode::Pointwise => mean(policy_vals[t].iter().flatten().copied()),
            SelectionMode::Pairwise => (!w.policy.is_empty()).then_some(0.5),
        };
        let cand_scores: Vec<Option<f64>> = cand_vals[t]
            .iter()
            .map(|per_pol| match cfg.mode {
                SelectionMode::Pointwise => per_pol.first().and_then(|v| v.first().copied().flatten()),
                // A pair is scored when all its calls are; `both` needs agreement for a win/loss.
                SelectionMode::Pairwise => mean(per_pol.iter().filter_map(|calls| {
                    let vals: Option<Vec<f64>> = calls.iter().copied().collect();
                    let vals = vals.filter(|v| !v.is_empty())?;
                    Some(if vals.iter().all(|&x| x == vals[0]) { vals[0] } else { 0.5 })
                })),
            })
            .collect();
        let mut candidates: Vec<CandidateScore> = w
            .cands
            .iter()
            .zip(&cand_scores)
            .enumerate()
            .map(|(c, (a, &score))| CandidateScore {
                source: a.source.clone(),
                sample: a.sample,
                score,
                unscored: unscored_per_cand[t][c],
                rung: None,
            })
            .collect();
        if !w.policy.is_empty() {
            unscored_candidates += cand_scores.iter().filter(|s| s.is_none()).count();
        }
        let best = cand_scores.iter().flatten().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        let margin = policy_score.zip(best).map(|(p, b)| b - p);
        // The ladder: scored candidates, weakest first (ties keep input order).
        let mut rungs: Vec<(usize, f64)> = Vec::new();
        if let Some(p) = policy_score {
            for (c, s) in cand_scores.iter().enumerate() {
                let Some(s) = *s else { continue };
                if s < p {
                    match cfg.weaker_candidates {
                        WeakerCandidates::Drop => {
                            weaker_dropped += 1;
                            continue;
                        }
                        WeakerCandidates::Keep => weaker_kept += 1,
                    }
                }
                rungs.push((c, s));
            }
        }
        rungs.sort_by(|a, b| a.1.total_cmp(&b.1));
        for (rung, &(c, _)) in rungs.iter().enumerate() {
            candidates[c].rung = Some(rung);
        }
        ladders.push(rungs.iter().map(|&(c, _)| w.cands[c].text.clone()).collect());
        let status = if w.policy.is_empty() {
            TaskStatus::NoPolicyAnswer
        } else if w.cands.is_empty() {
            TaskStatus::NoCandidates
        } else if margin.is_none() {
            TaskStatus::Unscored
        } else if rungs.is_empty() {
            TaskStatus::NoReference
        } else {
            TaskStatus::BelowCut // decided below
        };
        scores.push(TaskScore {
            id: w.task.id.clone(),
            policy_score,
            margin,
            status,
            policy_unscored: policy_unscored[t],
            candidates,
        });
    }

    // Rank the eligible tasks by margin (ties keep input order) and cut.
    let scored = scores.iter().filter(|s| s.margin.is_some()).count();
    let mut eligible: Vec<usize> = (0..scores.len())
        .filter(|&t| scores[t].status == TaskStatus::BelowCut)
        .filter(|&t| cfg.min_margin.is_none_or(|m| scores[t].margin.unwrap() >= m))
        .collect();
    eligible.sort_by(|&a, &b| scores[b].margin.unwrap().total_cmp(&scores[a].margin.unwrap()));
    let limit = match (cfg.top_k, cfg.top_fraction) {
        (Some(k), _) => k,
        (None, Some(f)) => (f * scored as f64).ceil() as usize,
        (None, None) => usize::MAX,
    };
    eligible.truncate(limit);
    let mut kept = Vec::with_capacity(eligible.len());
    for &t in &eligible {
        scores[t].status = TaskStatus::Kept;
        let mut task = work[t].task.clone();
        task.references = std::mem::take(&mut ladders[t]);
        kept.push(task);
    }

    let width = match cfg.mode {
        SelectionMode::Pointwise => 1.0,
        SelectionMode::Pairwise => 0.1,
    };
    let mut bins: BTreeMap<i64, usize> = BTreeMap::new();
    for m in scores.iter().filter_map(|s| s.margin) {
        *bins.entry((m / width + 1e-9).floor() as i64).or_default() += 1;
    }
    let count = |st: TaskStatus| scores.iter().filter(|s| s.status == st).count();
    let summary = SelectionSummary {
        mode: cfg.mode,
        tasks: scores.len(),
        kept: kept.len(),
        below_cut: count(TaskStatus::BelowCut),
        no_reference: count(TaskStatus::NoReference),
        unscored_tasks: count(TaskStatus::Unscored),
        no_candidates: count(TaskStatus::NoCandidates),
        no_policy_answer: count(TaskStatus::NoPolicyAnswer),
        judge_calls,
        unscored_calls,
        unscored_candidates,
        empty_candidates: work.iter().map(|w| w.empty).sum(),
        weaker_dropped,
        weaker_kept,
        margin_histogram: bins
            .into_iter()
            .map(|(b, count)| HistogramBin { lo: b as f64 * width, hi: (b + 1) as f64 * width, count })
            .collect(),
        wall_s,
    };
    Selection { kept, summary, tasks: scores }
}

impl SelectionSummary {
    /// Human-readable summary for the terminal.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{} tasks ({:?}): kept {}, below the cut {}, no reference above the policy {}, unscored {}, \
             no candidates {}, no policy answer {}\n\
             judge calls {} ({} unscored, {:.1}s); candidates unscored {}, empty {}, weaker than the policy: dropped {}, kept {}\n\
             margin histogram:\n",
            self.tasks, self.mode, self.kept, self.below_cut, self.no_reference, self.unscored_tasks,
            self.no_candidates, self.no_policy_answer, self.judge_calls, self.unscored_calls, self.wall_s,
            self.unscored_candidates, self.empty_candidates, self.weaker_dropped, self.weaker_kept,
        );
        let max = self.margin_histogram.iter().map(|b| b.count).max().unwrap_or(1).max(1);
        for b in &self.margin_histogram {
            let bar = "#".repeat((b.count * 40).div_ceil(max));
            s.push_str(&format!("  [{:>6.2}, {:>6.2})  {:>6}  {bar}\n", b.lo, b.hi, b.count));
        }
        s
    }
}
