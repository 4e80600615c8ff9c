//! What a step leaves behind: one `metrics.jsonl` line and one `samples/step-NNNNNN.jsonl` file.

use serde::{Deserialize, Serialize};

use crate::engine::FinishReason;
use crate::judge::{Judgement, LabelProbs, Verdict};
use crate::reward::{Outcome, RewardOutcome};

/// One line of `metrics.jsonl`. Flat, so plots and `jq` read it directly; `None` is written as
/// null (no update this step, no scored rollout, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    /// Task-order epoch at the start of the step.
    pub epoch: u64,
    pub timestamp: f64,
    pub rollouts: u64,
    pub scored: u64,
    pub unscored: u64,
    pub wins: u64,
    pub ties: u64,
    pub losses: u64,
    /// Prompt groups with no scored rollout (left out of the update).
    pub skipped_groups: u64,
    /// Trajectories the learner was given.
    pub trained: u64,
    pub reward_mean: Option<f64>,
    pub reward_std: Option<f64>,
    /// `reward.position = both`: share of scored pairs whose two orders agreed.
    pub position_consistency: Option<f64>,
    /// Tasks at each ladder level after the step.
    pub levels: Vec<u64>,
    pub share_at_top: f64,
    pub advanced: u64,
    pub kl: Option<f64>,
    pub entropy: Option<f64>,
    pub clip_fraction: Option<f64>,
    pub value_loss: Option<f64>,
    pub policy_loss: Option<f64>,
    pub grad_norm: Option<f64>,
    /// Optimizer steps skipped for a NaN or infinite gradient norm (weights left untouched).
    #[serde(default)]
    pub skipped_steps: u64,
    pub lr: Option<f64>,
    /// max |engine ln p - learner ln p| before the update (on-policy check).
    pub logprob_max_diff: Option<f64>,
    /// Mean ln mu - ln pi_old over tokens (engine vs learner before the update).
    #[serde(default)]
    pub is_mismatch_kl: Option<f64>,
    /// Share of tokens whose importance ratio exceeds `learner.is_cap`.
    #[serde(default)]
    pub is_clipped_share: Option<f64>,
    pub response_tokens_mean: f64,
    pub response_tokens_max: u64,
    /// Rollouts cut by `max_new_tokens`.
    pub truncated: u64,
    /// Rollouts the engine canceled: counted in `unscored` too, never judged or trained on.
    #[serde(default)]
    pub canceled: u64,
    pub gen_tokens_per_s: f64,
    pub learn_tokens_per_s: Option<f64>,
    pub judge_calls: u64,
    pub judge_retries: u64,
    /// Mean and longest wall time of the step's judge calls in ms, retries included (None
    /// without calls).
    pub judge_latency_ms_mean: Option<f64>,
    pub judge_latency_ms_max: Option<u64>,
    /// Phase wall times in seconds. `t_judge_tail` is judging left after the last rollout
    /// finished; `t_other` is the step's time outside every phase (the trainer's own overhead).
    pub t_generate: f64,
    pub t_judge_tail: f64,
    pub t_learn: f64,
    pub t_sync: f64,
    /// None on the line restored from a checkpoint after a crash (the save's time was lost).
    pub t_checkpoint: Option<f64>,
    pub t_other: f64,
    pub t_step: f64,
    /// Weight bytes written by this step's sync (0 = no sync).
    pub sync_bytes: u64,
}

/// One judge call as the samples log shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallRecord {
    pub response_first: bool,
    pub verdict: Option<Verdict>,
    pub probs: Option<LabelProbs>,
    pub unscored_reason: Option<String>,
    pub judge_text: String,
    pub latency_ms: u64,
    pub retries: u32,
}

/// One rollout in `samples/step-NNNNNN.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleRecord {
    pub step: u64,
    pub task_id: String,
    /// Position of the prompt in the step's batch, and the sample within its group.
    pub prompt: usize,
    pub sample: usize,
    /// The task's ladder level when the rollout was judged (the reference it was compared with)
    /// and its top level.
    pub level: usize,
    pub top_level: usize,
    pub response: String,
    pub response_tokens: usize,
    pub finish_reason: FinishReason,
    pub outcome: Option<Outcome>,
    pub reward: Option<f64>,
    pub soft: bool,
    pub consistent: Option<bool>,
    pub unscored_reason: Option<String>,
    pub calls: Vec<CallRecord>,
}

impl SampleRecord {
    pub fn calls_of(r: &RewardOutcome) -> Vec<CallRecord> {
        r.calls
            .iter()
            .map(|c| {
                let (verdict, probs, reason) = match &c.output.judgement {
                    Judgement::Scored { verdict, probs } => (Some(*verdict), *probs, None),
                    Judgement::Unscored { reason } => (None, None, Some(reason.clone())),
                };
                CallRecord {
                    response_first: c.response_first,
                    verdict,
                    probs,
                    unscored_reason: reason,
                    judge_text: c.output.raw.clone(),
                    latency_ms: c.output.latency_ms,
                    retries: c.output.retries,
                }
            })
            .collect()
    }
}

impl StepRecord {
    /// The run's state after this step, for the progress line: mean reward, share of scored
    /// rollouts that won, tasks per ladder level.
    pub fn status(&self) -> String {
        let reward = self.reward_mean.map(|m| format!("{m:.3}")).unwrap_or_else(|| "-".into());
        let win = if self.scored > 0 { format!("{:.0}%", 100.0 * self.wins as f64 / self.scored as f64) } else { "-".into() };
        format!("reward {reward} | win {win} | levels {:?}", self.levels)
    }
}

/// Mean and population standard deviation.
pub fn mean_std(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64;
    Some((m, v.sqrt()))
}

pub fn samples_file(step: u64) -> String {
    format!("step-{step:06}.jsonl")
}
