//! `orchestrator run`: the Writing-RL training loop.
//!
//! One step, data flowing one way:
//! ```text
//! sampler -> prompts -> engine (n rollouts each) --each finished rollout--> judge vs current reference
//!         -> rewards -> curriculum.advance -> learner.update -> [sync_every] export + engine reload
//!         -> samples + metrics -> [save_every] checkpoint
//! ```
//! Rollouts are judged while the others are still generating. Unscored rollouts never become
//! trajectories; a prompt with none scored is skipped. Everything a step depends on (task order,
//! sampling streams, reward order, learner draws) derives from `run.seed` and the step number, so
//! a run resumed from a checkpoint repeats the uninterrupted run's steps exactly on CPU.
//! With `run.max_off_policy_steps = 1` the next step's rollouts are made while the learner
//! trains (see [`offpolicy`]).

pub mod bench;
pub mod offpolicy;
pub mod prepare;
pub mod record;
pub mod state;
mod rollouts;
mod start;
pub mod sync;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::checkpoint::{Checkpoints, Retention};
use crate::config::Config;
use crate::curriculum::{self, Curriculum};
use crate::data::{Task, TaskSampler};
use crate::engine::remote::{PoolShort, RemoteEngine, ServerStats};
use crate::engine::{Backend, ChatMessage, Engine, Role, Rollout};
use crate::judge::Panel;
use crate::learner::{Learner, Trajectory, UpdateStats};
use crate::metrics::MetricsWriter;
use crate::progress::Progress;
use crate::reward::RewardStats;
use crate::rundir::RunDir;

use offpolicy::Pending;
use record::StepRecord;
use crate::rundir::{LEARNER_DIR, POLICY_DIR};
use state::{JudgeSpent, TrainerState};
use rollouts::Judged;
use sync::Served;

pub use prepare::{prepare, run_dir_for, Prepared, Resume, RunOptions};

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    Completed { step: u64, run_dir: PathBuf },
    /// SIGINT/SIGTERM: checkpointed at `step`.
    Interrupted { step: u64, run_dir: PathBuf },
    /// The judge's breaker stayed open: checkpointed at `step` (the step in progress was dropped).
    JudgeDown { step: u64, run_dir: PathBuf, reason: String },
    /// The run's judge spending reached `key` (`run.max_judge_tokens` or `run.max_judge_cost`):
    /// checkpointed at `step`, the step that reached it; `reason` names the key and the totals.
    JudgeBudget { step: u64, run_dir: PathBuf, key: &'static str, reason: String },
}

/// The chat messages of a task's prompt.
pub fn task_messages(task: &Task) -> Vec<ChatMessage> {
    let mut m = Vec::new();
    if let Some(sys) = &task.system {
        m.push(ChatMessage::new(Role::System, sys));
    }
    m.push(ChatMessage::new(Role::User, &task.prompt));
    m
}

/// A scored rollout as the learner takes it. Unscored (and canceled) rollouts have no reward
/// and so no trajectory.
pub fn trajectory(r: &Rollout, reward: f64, group: u64) -> Trajectory {
    Trajectory {
        prompt_ids: r.prompt_ids.clone(),
        response_ids: r.ids.clone(),
        behaviour_logprobs: r.logprobs.clone(),
        reward,
        group,
    }
}

/// The learner lives on blocking threads (tch work); it is moved there and back for each call.
async fn on_learner<T: Send + 'static>(
    slot: &mut Option<Learner>,
    f: impl FnOnce(&mut Learner) -> T + Send + 'static,
) -> Result<T> {
    let mut learner = slot.take().context("learner lost by an earlier failure")?;
    let (learner, out) = tokio::task::spawn_blocking(move || {
        let out = f(&mut learner);
        (learner, out)
    })
    .await
    .context("learner thread panicked")?;
    *slot = Some(learner);
    Ok(out)
}

/// SIGINT/SIGTERM: the first asks the loop to stop at a safe point; a second exits at once.
fn install_signals(stop: Arc<AtomicBool>, notify: Arc<tokio::sync::Notify>) {
    use tokio::signal::unix::{signal, SignalKind};
    for kind in [SignalKind::interrupt(), SignalKind::terminate()] {
        let stop = stop.clone();
        let notify = notify.clone();
        if let Ok(mut s) = signal(kind) {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if stop.swap(true, Ordering::SeqCst) {
                        eprintln!("second signal: exiting without a checkpoint");
                        std::process::exit(130);
                    }
                    eprintln!("signal received: stopping at the next safe point and writing a checkpoint (again to abort)");
                    notify.notify_waiters();
                }
            });
        }
    }
}

/// Per-step counts shown on the bars.
struct Bars {
    multi: indicatif::MultiProgress,
    steps: Progress,
    rollouts: Progress,
    verdicts: Progress,
    plain: bool,
}

impl Bars {
    fn new(steps: u64, done: u64) -> Self {
        let multi = Progress::multi();
        let s = Progress::in_multi(&multi, steps, "steps   ");
        s.inc(done);
        let rollouts = Progress::in_multi(&multi, 0, "rollouts");
        let verdicts = Progress::in_multi(&multi, 0, "verdicts");
        let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
        Self { multi, steps: s, rollouts, verdicts, plain }
    }

    fn log(&self, line: impl AsRef<str>) {
        if self.plain {
            eprintln!("{}", line.as_ref());
        } else {
            let _ = self.multi.println(line.as_ref());
        }
    }
}

pub struct Trainer {
    cfg: Config,
    tasks: Vec<Arc<Task>>,
    run: RunDir,
    hash: String,
    engine: Arc<dyn Engine>,
    /// The same engine when it is a remote pool, for its per-server metrics.
    pool: Option<Arc<RemoteEngine>>,
    judge: Arc<Panel>,
    learner: Option<Learner>,
    curriculum: Curriculum,
    sampler: TaskSampler,
    checkpoints: Checkpoints,
    metrics: MetricsWriter,
    served: Served,
    /// One-step-off: the next step's rollouts, generated and judged during the last step.
    pending: Option<Pending>,
    /// A remote pool's servers at the end of the last step (or at the engine's start): each
    /// step's `pool/<i>/...` metrics are the growth since.
    pool_before: Vec<ServerStats>,
    /// Steps completed, and whether the learner changed since the last sync.
    step: u64,
    dirty: bool,
    last_saved: u64,
    /// Judge tokens and cost of every step trained so far (restored from the checkpoint).
    judge_spent: JudgeSpent,
    stop: Arc<AtomicBool>,
    stop_notify: Arc<tokio::sync::Notify>,
    bars: Bars,
}

/// Runs (or resumes) the training run `opts` describes.
pub async fn run(opts: RunOptions) -> Result<Ended> {
    let p = prepare(&opts)?;
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    let mut trainer = Trainer::start(p).await?;
    trainer.train().await
}

impl Trainer {
    pub fn run_dir(&self) -> &Path {
        &self.run.root
    }

    async fn train(&mut self) -> Result<Ended> {
        let total = self.cfg.run.steps;
        if self.step >= total {
            self.bars.log(format!("run already at step {} of {total}: nothing to do", self.step));
        } else if let Some((key, reason)) = self.judge_budget_reached() {
            // Resumed past its budget: stop before spending more.
            return Ok(Ended::JudgeBudget { step: self.step, run_dir: self.run.root.clone(), key, reason });
        }
        while self.step < total {
            if self.stop.load(Ordering::SeqCst) {
                return self.interrupted().await;
            }
            // What a step changes before its rollouts are all in: if a short pool stops it with
            // these untouched, the state before it is a consistent checkpoint.
            let before = self.sampler.clone();
            let untouched = |t: &Self| (t.learner.as_ref().map(|l| l.updates()), serde_json::to_value(t.curriculum.state()).ok());
            let marks = untouched(self);
            let step_before = self.step;
            let end = match self.step_once().await {
                Err(e) if e.downcast_ref::<PoolShort>().is_some() => {
                    let at = self.step;
                    // One-step-off: the step before the short one was trained and checkpointed.
                    if at > step_before && self.last_saved == at {
                        return Err(e);
                    }
                    if marks.0.is_some() && marks.1.is_some() && untouched(self) == marks {
                        self.sampler = before;
                        self.save_if_needed(None).await?;
                        return Err(e.context(format!("stopped before step {} (checkpoint at step {at}); resume once the pool is back", at + 1)));
                    }
                    return Err(e.context(format!("stopped in step {} after the learner or curriculum moved; resume from the last checkpoint once the pool is back", at + 1)));
                }
                r => r?,
            };
            match end {
                StepEnd::Done => {}
                StepEnd::Interrupted => return self.interrupted().await,
                StepEnd::JudgeDown(reason) => {
                    self.save_if_needed(None).await?;
                    return Ok(Ended::JudgeDown { step: self.step, run_dir: self.run.root.clone(), reason });
                }
                StepEnd::JudgeBudget(key, reason) => {
                    self.save_if_needed(None).await?;
                    return Ok(Ended::JudgeBudget { step: self.step, run_dir: self.run.root.clone(), key, reason });
                }
            }
        }
        self.bars.steps.finish();
        Ok(Ended::Completed { step: self.step, run_dir: self.run.root.clone() })
    }

    /// A remote pool's servers now (cumulative counts); empty with the embedded engine.
    fn pool_stats(&self) -> Vec<ServerStats> {
        self.pool.as_ref().map(|p| p.pool_stats()).unwrap_or_default()
    }

    /// The version a remote pool's new generations use.
    fn pool_serving(&self) -> String {
        self.pool.as_ref().map(|p| p.serving()).unwrap_or_default()
    }

    /// The judge budget the run has reached, as (key, message naming it and the totals); None
    /// under every budget (or without any). Rollouts already judged for the next step
    /// (one-step-off) count: their tokens are spent.
    fn judge_budget_reached(&self) -> Option<(&'static str, String)> {
        let run = &self.cfg.run;
        let ahead_stats = self.pending.as_ref().map(|p| p.judge_stats()).unwrap_or_default();
        let ahead = ahead_stats.usage();
        let spent = self.judge_spent.plus(&ahead, self.cfg.judge.cost(&ahead, &|m| ahead_stats.member_usage(m)));
        let detail = format!(
            "{} judge tokens used ({} prompt + {} completion{}{})",
            spent.tokens(),
            spent.prompt_tokens,
            spent.completion_tokens,
            if ahead.total() > 0 { format!(", {} of them on step {}'s rollouts, judged ahead", ahead.total(), self.step + 1) } else { String::new() },
            if spent.usage_missing > 0 { format!("; {} replies reported no usage and count 0", spent.usage_missing) } else { String::new() },
        );
        if run.max_judge_tokens > 0 && spent.tokens() >= run.max_judge_tokens {
            return Some(("run.max_judge_tokens", format!("judge budget reached: run.max_judge_tokens = {}, {detail}", run.max_judge_tokens)));
        }
        if run.max_judge_cost > 0.0 && self.cfg.judge.priced() && spent.cost >= run.max_judge_cost {
            return Some((
                "run.max_judge_cost",
                format!("judge budget reached: run.max_judge_cost = {}, judge cost {:.6} ({detail})", run.max_judge_cost, spent.cost),
            ));
        }
        None
    }

    async fn interrupted(&mut self) -> Result<Ended> {
        self.save_if_needed(None).await?;
        Ok(Ended::Interrupted { step: self.step, run_dir: self.run.root.clone() })
    }

    /// Checkpoints the current state unless the last checkpoint already holds it.
    async fn save_if_needed(&mut self, record: Option<StepRecord>) -> Result<Option<f64>> {
        if self.step == 0 || self.last_saved == self.step {
            return Ok(None);
        }
        Ok(Some(self.save(record).await?))
    }

    async fn save(&mut self, record: Option<StepRecord>) -> Result<f64> {
        let t0 = Instant::now();
        let state = TrainerState {
            step: self.step,
            sampler: self.sampler.cursor(),
            curriculum: self.curriculum.state().clone(),
            served_step: self.served.step,
            dirty: self.dirty,
            pending: self.pending.as_ref().map(|p| p.step),
            record,
            judge_spent: self.judge_spent,
        };
        let pending = self.pending.as_ref().map(|p| p.encode()).transpose()?;
        let served_policy = (self.served.owned && self.served.step != self.step).then(|| self.served.path.clone());
        let (ckdir, hash, step) = (self.checkpoints.dir().to_path_buf(), self.hash.clone(), self.step);
        let retention = Retention { keep_last: self.cfg.run.keep_last, keep_every: self.cfg.run.keep_every };
        let dir = on_learner(&mut self.learner, move |l| {
            Checkpoints::open(ckdir)?.save(step, &hash, retention, |d| {
                l.save(&d.join(LEARNER_DIR))?;
                if let Some(p) = &served_policy {
                    sync::link_files(p, &d.join(POLICY_DIR))?;
                }
                if let Some(bytes) = &pending {
                    crate::fsutil::atomic_write(&d.join(offpolicy::PENDING_FILE), bytes)?;
                }
                state.write(d)
            })
        })
        .await??;
        self.last_saved = self.step;
        let secs = t0.elapsed().as_secs_f64();
        self.bars.log(format!("checkpoint {} ({secs:.2}s)", dir.display()));
        Ok(secs)
    }

    async fn step_once(&mut self) -> Result<StepEnd> {
        let t_step = Instant::now();
        let reused_before = crate::judge::embedded::prefix_cache_reuse().1;
        let step = self.step + 1;
        let ahead = self.cfg.run.max_off_policy_steps >= 1;
        // Where this step's wall time went (see `StepRecord`).
        let (mut t_generate, mut t_judge_tail, mut t_sync, mut sync_bytes) = (0.0, 0.0, 0.0, 0u64);

        // This step's rollouts: generated during the previous step (one-step-off), or now. Until
        // they are judged a stop signal abandons the step: nothing has changed yet.
        let own = match self.pending.take() {
            Some(p) => p,
            None => {
                let d = self.draw(step);
                let Some((mut groups, tg, tj)) = self.generate_drawn(&d).await? else {
                    self.sampler = d.before;
                    return Ok(StepEnd::Interrupted);
                };
                let waited = match self.settle(&d, &mut groups).await {
                    Ok(s) => s,
                    Err(end) => {
                        self.sampler = d.before;
                        return Ok(end);
                    }
                };
                (t_generate, t_judge_tail) = (tg, tj + waited);
                d.into_pending(&self.tasks, groups, tg, tj + waited)
            }
        };

        // Rewards -> curriculum (each task moves at most one level per step).
        let outcomes: Vec<(String, Vec<curriculum::Outcome>)> = own
            .batch
            .iter()
            .zip(&own.groups)
            .map(|(&ti, g)| (self.tasks[ti].id.clone(), g.iter().map(|j| j.reward.outcome.into()).collect()))
            .collect();
        let cm = self.curriculum.advance(outcomes.iter().map(|(id, o)| (id.as_str(), o.as_slice())))?;

        // Scored rollouts -> trajectories; a group with none is skipped.
        let mut trajs = Vec::new();
        let mut skipped = 0u64;
        let mut stats = RewardStats::default();
        for (pi, g) in own.groups.iter().enumerate() {
            let scored: Vec<&Judged> = g.iter().filter(|j| !j.reward.is_unscored()).collect();
            if scored.is_empty() {
                skipped += 1;
            }
            for j in g {
                stats.add(&j.reward);
            }
            let group_id = (step - 1) * self.cfg.run.batch_prompts as u64 + pi as u64;
            for j in scored {
                trajs.push(trajectory(&j.rollout, j.reward.reward.expect("scored"), group_id));
            }
        }

        // One-step-off: the next step's batch, drawn after this step's curriculum move and
        // generated on the weights the engine serves now. A sync deferred at the end of the last
        // step (its next rollouts were not complete then: see `offpolicy`) happens first.
        let next = if ahead && step < self.cfg.run.steps {
            if (step - 1) % self.cfg.run.sync_every == 0 && self.dirty {
                let (s, b) = self.sync_engine(step - 1).await?;
                (t_sync, sync_bytes) = (t_sync + s, sync_bytes + b);
            }
            Some(self.draw(step + 1))
        } else {
            None
        };

        // The update, with the next step's generation and judging alongside: the next step's
        // requests go out first (the generation's first poll), then the update starts on its
        // own thread. Each side notes when it ran, so `t_overlap` is time both spent running.
        let mut learner = self.learner.take().context("learner lost by an earlier failure")?;
        let temperature = self.cfg.engine.sampling.temperature;
        let (generated, gen_start, gen_end, learned) = {
            let generate = async {
                match &next {
                    Some(d) => Some(self.generate_drawn(d).await),
                    None => None,
                }
            };
            let mut generate = std::pin::pin!(generate);
            let gen_start = Instant::now();
            let early = futures::poll!(generate.as_mut());
            let learn = tokio::task::spawn_blocking(move || {
                let start = Instant::now();
                let update = (!trajs.is_empty()).then(|| learner.update(&trajs, temperature));
                (learner, update, start, Instant::now())
            });
            let generated = match early {
                std::task::Poll::Ready(g) => g,
                std::task::Poll::Pending => generate.await,
            };
            (generated, gen_start, Instant::now(), learn.await)
        };
        let (learner, update, learn_start, learn_end) = learned.context("learner thread panicked")?;
        self.learner = Some(learner);
        let update: Option<UpdateStats> = update.transpose()?;
        self.dirty |= update.is_some();
        let t_learn = (learn_end - learn_start).as_secs_f64();

        // The next step's rollouts: kept for the next step, or dropped (stop signal, judge down)
        // with the sampler put back, to be generated again on the same weights.
        let (mut t_overlap, mut next_pending, mut gave_up, mut pool_short) = (0.0, None, None, None);
        if let (Some(d), Some(r)) = (next, generated) {
            let both = gen_end.min(learn_end).saturating_duration_since(gen_start.max(learn_start));
            t_overlap = both.as_secs_f64().min(t_learn);
            // A pool too short for the next step's rollouts ends the run after this step, which
            // is trained and checkpointed like any other; the next step starts afresh on resume.
            let r = match r {
                Err(e) if e.downcast_ref::<PoolShort>().is_some() => {
                    pool_short = Some(e);
                    Ok(None)
                }
                r => r,
            };
            match r? {
                None => {
                    t_generate += (gen_end - gen_start).as_secs_f64();
                    self.sampler = d.before;
                }
                Some((mut groups, tg, tj)) => {
                    (t_generate, t_judge_tail) = (t_generate + tg, t_judge_tail + tj);
                    match self.settle(&d, &mut groups).await {
                        Ok(waited) => {
                            t_judge_tail += waited;
                            next_pending = Some(d.into_pending(&self.tasks, groups, tg, tj + waited));
                        }
                        Err(end) => {
                            self.sampler = d.before;
                            if let StepEnd::JudgeDown(reason) = end {
                                gave_up = Some(reason);
                            }
                        }
                    }
                }
            }
        }

        // Weight sync. One-step-off moves the engine on only once the next step's rollouts
        // exist; otherwise it keeps the weights they must be generated with.
        if step % self.cfg.run.sync_every == 0 && self.dirty && (!ahead || next_pending.is_some()) {
            let (s, b) = self.sync_engine(step).await?;
            (t_sync, sync_bytes) = (t_sync + s, sync_bytes + b);
        }
        self.step = step;
        self.pending = next_pending;

        record::write_samples(&self.run.samples(), step, &self.tasks, &own)?;
        let mut record = record::step_record(step, &own, &stats, skipped, &cm, update.as_ref(), &self.cfg);
        let usage = stats.usage();
        let cost = self.cfg.judge.cost(&usage, &|m| stats.member_usage(m));
        self.judge_spent = self.judge_spent.plus(&usage, cost);
        record.judge_tokens_total = self.judge_spent.tokens();
        (record.judge_cost, record.judge_cost_total) = (cost, cost.map(|_| self.judge_spent.cost));
        (record.t_generate, record.t_judge_tail, record.t_learn, record.t_overlap) = (t_generate, t_judge_tail, t_learn, t_overlap);
        (record.t_sync, record.sync_bytes) = (t_sync, sync_bytes);
        record.learn_tokens_per_s = update.as_ref().map(|u| u.tokens as f64 / t_learn.max(1e-9));
        record.parts = record::pool_metrics(&self.pool_before, &self.pool_stats(), &self.pool_serving(), t_generate);
        record.parts.extend(record::member_metrics(&stats, &self.cfg.judge));

        let last = step == self.cfg.run.steps;
        // The step that reaches a judge budget is the run's last (unless it is the last anyway).
        let budget = if last || gave_up.is_some() { None } else { self.judge_budget_reached() };
        let want_save = step % self.cfg.run.save_every == 0
            || last
            || gave_up.is_some()
            || budget.is_some()
            || pool_short.is_some()
            || self.stop.load(Ordering::SeqCst);
        let mut t_checkpoint = 0.0;
        if want_save {
            let mut saved = record.clone();
            saved.t_step = t_step.elapsed().as_secs_f64();
            t_checkpoint = self.save(Some(saved)).await?;
            record.t_checkpoint = Some(t_checkpoint);
        }
        // The run's last step: a pool gets its weights when no sync sent them (one-step-off
        // syncs a step only once the next step's rollouts exist; `sync_every` may not divide
        // the step). After the checkpoint, which keeps the weights the engine served before: a
        // run resumed with more steps generates its next step on those, as one that never
        // stopped would. The embedded engine ends with this process: nothing to send it.
        if last && self.dirty && self.cfg.engine.backend == Backend::Remote {
            match self.sync_engine(step).await {
                Ok((s, b)) => {
                    (t_sync, sync_bytes) = (t_sync + s, sync_bytes + b);
                    (record.t_sync, record.sync_bytes) = (t_sync, sync_bytes);
                    self.bars.log(format!("step {step}'s weights pushed to the pool ({s:.1}s)"));
                }
                Err(e) => self.bars.log(format!(
                    "warning: pushing step {step}'s weights to the pool failed: {e:#}; they are in the checkpoint (`orchestrator export` writes them)"
                )),
            }
        }
        let pool_now = self.pool_stats();
        record.parts.extend(record::pool_metrics(&self.pool_before, &pool_now, &self.pool_serving(), t_generate));
        self.pool_before = pool_now;
        record.judge_prefix_reused_tokens = crate::judge::embedded::prefix_cache_reuse().1.saturating_sub(reused_before);
        record.t_step = t_step.elapsed().as_secs_f64();
        record.t_other = (record.t_step - t_generate - t_judge_tail - (t_learn - t_overlap) - t_sync - t_checkpoint).max(0.0);
        self.metrics.write(&record)?;
        self.bars.steps.set_message(record.status());
        self.bars.steps.inc(1);
        let overlap = if ahead { format!(" (hidden {t_overlap:.1}s)") } else { String::new() };
        let reused = match record.judge_prefix_reused_tokens {
            0 => String::new(),
            n => format!(", {n} prompt tokens from the judge's prefix cache"),
        };
        self.bars.log(format!(
            "step {step}/{}: reward {} | W/T/L/U {}/{}/{}/{} | levels {:?} (+{}) | kl {} | gen {:.1}s judge-tail {:.1}s learn {:.1}s{overlap} sync {:.1}s | judge tokens {} (run {}{reused})",
            self.cfg.run.steps,
            record.reward_mean.map(|m| format!("{m:.3}")).unwrap_or_else(|| "-".into()),
            stats.wins,
            stats.ties,
            stats.losses,
            stats.unscored,
            record.levels,
            record.advanced,
            record.kl.map(|k| format!("{k:.4}")).unwrap_or_else(|| "-".into()),
            t_generate,
            t_judge_tail,
            t_learn,
            t_sync,
            record.judge_prompt_tokens + record.judge_completion_tokens,
            record.judge_tokens_total,
        ));
        if let Some(e) = pool_short {
            return Err(e.context(format!(
                "stopped after step {step} (checkpoint at step {step}): the pool could not generate step {}'s rollouts; resume once the pool is back",
                step + 1
            )));
        }
        if let Some((_, reason)) = &budget {
            self.bars.log(format!("step {step}: {reason}; stopping"));
        }
        Ok(match (gave_up, budget) {
            (Some(reason), _) => StepEnd::JudgeDown(reason),
            (None, Some((key, reason))) => StepEnd::JudgeBudget(key, reason),
            (None, None) => StepEnd::Done,
        })
    }
}

enum StepEnd {
    Done,
    Interrupted,
    JudgeDown(String),
    /// A judge budget was reached: (its key, a message naming it and the totals).
    JudgeBudget(&'static str, String),
}
