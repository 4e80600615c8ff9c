//! The generating and judging phase of a step: its batch is drawn, every rollout of the batch is
//! judged against its task's current reference as soon as it finishes, while later ones still
//! generate; an open judge breaker is waited out (`on_judge_down = pause`) or given up on.

/// Why a canceled rollout is unscored: it was never sent to the judge.
const CANCELED: &str = "generation canceled by the engine (not judged, not trained on)";

/// A rollout's key for seeded reward order (`position = random`).
fn reward_key(step: u64, prompt: usize, sample: usize) -> u64 {
    splitmix64(splitmix64(splitmix64(step) ^ prompt as u64) ^ sample as u64)
}

/// A rollout with its reward, as the step collects them.
#[derive(Serialize, Deserialize)]
pub(super) struct Judged {
    pub(super) rollout: Rollout,
    pub(super) reward: RewardOutcome,
    /// `reward.reference = "group"`: the sample index of the rollout of the same group this one
    /// was compared with (see [`reward::group_partner`]); None with the ladder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) partner: Option<usize>,
}

/// Why a rollout whose partner was canceled is unscored.
const PARTNER_CANCELED: &str = "its in-group partner's generation was canceled (not judged, not trained on)";
/// Why a rollout whose partner never came back is unscored.
const PARTNER_MISSING: &str = "its in-group partner rollout never came back from the engine (not judged, not trained on)";

/// How waiting out an open breaker ended.
pub(super) enum JudgeDown {
    Recovered,
    GiveUp(String),
    Interrupted,
}

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, Semaphore};

use super::offpolicy::Pending;
use super::{task_messages, StepEnd, Trainer};
use crate::data::{Task, TaskSampler};
use crate::config::OnJudgeDown;
use crate::engine::{FinishReason, GenRequest, Rollout, SeedKey};
use crate::judge::JudgeHealth;
use crate::reward::{self, Reference, RewardInput, RewardOutcome};
use crate::seed::splitmix64;

impl Trainer {
    /// Draws step `step`'s batch from the sampler, at the curriculum levels of now.
    pub(super) fn draw(&mut self, step: u64) -> Draw {
        let epoch = self.sampler.cursor().epoch;
        let before = self.sampler.clone();
        let batch = self.sampler.next_batch(self.cfg.run.batch_prompts);
        let levels = batch.iter().map(|&ti| self.curriculum.level(&self.tasks[ti].id).unwrap_or(0)).collect();
        Draw { step, before, epoch, batch, levels, generated_by: self.served.step }
    }

    /// Generates and judges a drawn batch; None when a stop signal came first (nothing changed).
    pub(super) async fn generate_drawn(&self, d: &Draw) -> Result<Option<(Vec<Vec<Judged>>, f64, f64)>> {
        let notify = self.stop_notify.clone();
        tokio::select! {
            r = self.generate_and_judge(d.step, &d.batch) => Ok(Some(r?)),
            _ = notify.notified() => Ok(None),
        }
    }

    /// An open judge breaker after a drawn batch's judging: waited out (the seconds it took) or
    /// the step given up on. The caller puts the sampler back on an `Err`.
    pub(super) async fn settle(&self, d: &Draw, groups: &mut [Vec<Judged>]) -> Result<f64, StepEnd> {
        if !matches!(self.judge.health(), JudgeHealth::Down { .. }) {
            return Ok(0.0);
        }
        let t = Instant::now();
        match self.handle_judge_down(d.step, &d.batch, groups).await {
            JudgeDown::Recovered => Ok(t.elapsed().as_secs_f64()),
            JudgeDown::GiveUp(reason) => {
                self.bars.log(format!("step {}: {reason}; stopping (the step is dropped, nothing was trained on it)", d.step));
                Err(StepEnd::JudgeDown(reason))
            }
            JudgeDown::Interrupted => Err(StepEnd::Interrupted),
        }
    }

    /// Generates the step's rollouts and judges each as soon as it is finished.
    pub(super) async fn generate_and_judge(&self, step: u64, batch: &[usize]) -> Result<(Vec<Vec<Judged>>, f64, f64)> {
        let n = self.cfg.run.n_samples;
        let requests: Vec<GenRequest> = batch
            .iter()
            .enumerate()
            .map(|(pi, &ti)| GenRequest {
                messages: task_messages(&self.tasks[ti]),
                n,
                seed: SeedKey::new(self.cfg.run.seed, step, pi as u64),
            })
            .collect();
        // The ladder's references; `reference = "group"` compares with a partner rollout instead.
        let group = self.cfg.reward.reference == Reference::Group;
        let references: Vec<Option<Arc<str>>> = batch
            .iter()
            .map(|&ti| (!group).then(|| Arc::from(self.curriculum.reference(&self.tasks[ti]).expect("every task has a reference"))))
            .collect();
        // Group mode: rollouts wait here until their partner's text exists.
        let partner_of = |pi: usize, sample: usize| reward::group_partner(self.cfg.run.seed, step, pi as u64, sample, n);
        let mut waiting: Vec<Vec<Option<Rollout>>> = batch.iter().map(|_| (0..n).map(|_| None).collect()).collect();
        let mut texts: Vec<Vec<Option<(Arc<str>, bool)>>> = batch.iter().map(|_| vec![None; n]).collect();
        self.bars.rollouts.restart((batch.len() * n) as u64);
        self.bars.verdicts.restart((batch.len() * n) as u64);

        let t0 = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel::<Rollout>();
        let engine = self.engine.clone();
        let sampling = self.cfg.engine.sampling.clone();
        let generate = async move {
            let r = engine.generate_into(&requests, &sampling, tx).await;
            (r, t0.elapsed().as_secs_f64())
        };
        let judging = async {
            let permits = Arc::new(Semaphore::new(self.cfg.run.judge_concurrency));
            let mut pending = FuturesUnordered::new();
            let mut out: Vec<Vec<Judged>> = batch.iter().map(|_| Vec::new()).collect();
            let mut open = true;
            let mut retries = 0u64;
            loop {
                tokio::select! {
                    r = rx.recv(), if open => match r {
                        Some(rollout) => {
                            self.bars.rollouts.inc(1);
                            // (rollout, what it is compared with: reference text or partner)
                            let mut ready: Vec<(Rollout, Option<(Arc<str>, bool)>, Option<usize>)> = Vec::new();
                            let (pi, si) = (rollout.request, rollout.sample);
                            if let Some(reference) = &references[pi] {
                                ready.push((rollout, Some((reference.clone(), false)), None));
                            } else if si < n && texts[pi][si].is_none() {
                                texts[pi][si] = Some((Arc::from(rollout.text.as_str()), rollout.finish_reason == FinishReason::Canceled));
                                waiting[pi][si] = Some(rollout);
                                // This rollout, and those waiting for it as their partner.
                                for q in 0..n {
                                    let p = partner_of(pi, q);
                                    if (q == si || p == si) && waiting[pi][q].is_some() && texts[pi][p].is_some() {
                                        ready.push((waiting[pi][q].take().expect("waiting"), texts[pi][p].clone(), Some(p)));
                                    }
                                }
                            } else {
                                // No engine sends a sample twice or past n; never judged if one did.
                                self.bars.verdicts.inc(1);
                                out[pi].push(Judged { rollout, reward: RewardOutcome::unscored("the engine sent this sample twice or past run.n_samples"), partner: None });
                            }
                            for (rollout, against, partner) in ready {
                                let task = self.tasks[batch[rollout.request]].clone();
                                let (judge, permits, cfg) = (self.judge.clone(), permits.clone(), self.cfg.reward.clone());
                                let key = reward_key(step, rollout.request, rollout.sample);
                                pending.push(async move {
                                    if rollout.finish_reason == FinishReason::Canceled {
                                        return Judged { rollout, reward: RewardOutcome::unscored(CANCELED), partner };
                                    }
                                    let (reference, partner_canceled) = against.expect("a reference or a partner");
                                    if partner_canceled {
                                        return Judged { rollout, reward: RewardOutcome::unscored(PARTNER_CANCELED), partner };
                                    }
                                    let _permit = permits.acquire_owned().await.expect("semaphore open");
                                    let input = RewardInput {
                                        prompt: &task.prompt,
                                        criteria: task.criteria.as_deref(),
                                        response: &rollout.text,
                                        reference: &reference,
                                    };
                                    let reward = reward::reward(&*judge, &cfg, input, key).await;
                                    Judged { rollout, reward, partner }
                                });
                            }
                        }
                        None => {
                            open = false;
                            // Group mode: rollouts whose partner never came are unscored.
                            for (pi, w) in waiting.iter_mut().enumerate() {
                                for (q, slot) in w.iter_mut().enumerate() {
                                    if let Some(rollout) = slot.take() {
                                        let partner = Some(partner_of(pi, q));
                                        self.bars.verdicts.inc(1);
                                        out[pi].push(Judged { rollout, reward: RewardOutcome::unscored(PARTNER_MISSING), partner });
                                    }
                                }
                            }
                        }
                    },
                    Some(j) = pending.next(), if !pending.is_empty() => {
                        retries += j.reward.retries() as u64;
                        self.bars.verdicts.inc(1);
                        self.bars.verdicts.set_message(format!("{retries} retries"));
                        out[j.rollout.request].push(j);
                    }
                    else => break,
                }
            }
            out
        };
        let ((gen, t_generate), mut out) = tokio::join!(generate, judging);
        gen?;
        let t_all = t0.elapsed().as_secs_f64();
        for group in &mut out {
            group.sort_by_key(|j| j.rollout.sample);
        }
        Ok((out, t_generate, (t_all - t_generate).max(0.0)))
    }

    /// Re-asks the judge for unscored rollouts (after the breaker closed again).
    async fn rejudge(&self, step: u64, batch: &[usize], groups: &mut [Vec<Judged>]) {
        let mut pending = FuturesUnordered::new();
        let permits = Arc::new(Semaphore::new(self.cfg.run.judge_concurrency));
        for (pi, group) in groups.iter().enumerate() {
            for (si, j) in group.iter().enumerate() {
                if !j.reward.is_unscored() || j.rollout.finish_reason == FinishReason::Canceled {
                    continue;
                }
                let task = self.tasks[batch[pi]].clone();
                // Group mode: the partner's text, unless the partner never came or was canceled.
                let reference = match j.partner {
                    None => self.curriculum.reference(&task).expect("reference").to_string(),
                    Some(p) => match group.iter().find(|o| o.rollout.sample == p) {
                        Some(o) if o.rollout.finish_reason != FinishReason::Canceled => o.rollout.text.clone(),
                        _ => continue,
                    },
                };
                let response = j.rollout.text.clone();
                let (judge, permits, cfg) = (self.judge.clone(), permits.clone(), self.cfg.reward.clone());
                let key = reward_key(step, pi, j.rollout.sample);
                pending.push(async move {
                    let _permit = permits.acquire_owned().await.expect("semaphore open");
                    let input = RewardInput {
                        prompt: &task.prompt,
                        criteria: task.criteria.as_deref(),
                        response: &response,
                        reference: &reference,
                    };
                    (pi, si, reward::reward(&*judge, &cfg, input, key).await)
                });
            }
        }
        while let Some((pi, si, mut r)) = pending.next().await {
            // The replaced calls' tokens were spent: they stay counted.
            r.replaced_usage = groups[pi][si].reward.usage();
            groups[pi][si].reward = r;
        }
    }

    /// Waits out an open breaker (`on_judge_down = pause`) or gives up. A stop signal ends the
    /// wait at once: the step is abandoned like one interrupted mid-generation.
    pub(super) async fn handle_judge_down(&self, step: u64, batch: &[usize], groups: &mut [Vec<Judged>]) -> JudgeDown {
        let started = Instant::now();
        let mut asked_again = false;
        loop {
            let JudgeHealth::Down { consecutive_failures, last_error, retry_in_secs } = self.judge.health() else {
                if asked_again {
                    // The probe closed the breaker; the calls it refused meanwhile go again.
                    self.rejudge(step, batch, groups).await;
                }
                return JudgeDown::Recovered;
            };
            let reason = format!("judge unavailable: {consecutive_failures} consecutive failures, last: {last_error}");
            let waited = started.elapsed().as_secs_f64();
            if self.cfg.run.on_judge_down == OnJudgeDown::Stop || waited >= self.cfg.run.judge_down_max_wait_secs {
                return JudgeDown::GiveUp(reason);
            }
            if self.stop.load(Ordering::SeqCst) {
                return JudgeDown::Interrupted;
            }
            let wait = retry_in_secs.clamp(0.2, 30.0).min(self.cfg.run.judge_down_max_wait_secs - waited + 0.01);
            self.bars.log(format!("step {step}: {reason}; pausing {wait:.1}s before asking again"));
            let notify = self.stop_notify.clone();
            let interrupted = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => false,
                _ = notify.notified() => true,
            };
            if interrupted || self.stop.load(Ordering::SeqCst) {
                return JudgeDown::Interrupted;
            }
            self.rejudge(step, batch, groups).await;
            asked_again = true;
        }
    }
}

/// A step's batch as drawn, before its rollouts exist.
pub(super) struct Draw {
    pub(super) step: u64,
    /// The sampler before the draw, put back if the step is dropped.
    pub(super) before: TaskSampler,
    pub(super) epoch: u64,
    pub(super) batch: Vec<usize>,
    pub(super) levels: Vec<usize>,
    pub(super) generated_by: u64,
}

impl Draw {
    pub(super) fn into_pending(self, tasks: &[Arc<Task>], groups: Vec<Vec<Judged>>, t_generate: f64, t_judge_tail: f64) -> Pending {
        Pending {
            step: self.step,
            epoch: self.epoch,
            task_ids: self.batch.iter().map(|&ti| tasks[ti].id.clone()).collect(),
            batch: self.batch,
            levels: self.levels,
            generated_by: self.generated_by,
            t_generate,
            t_judge_tail,
            groups,
        }
    }
}
