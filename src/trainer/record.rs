//! What a step leaves behind: one `metrics.jsonl` line and one `samples/step-NNNNNN.jsonl` file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::offpolicy::Pending;
use crate::config::Config;
use crate::curriculum::CurriculumMetrics;
use crate::data::Task;
use crate::engine::remote::ServerStats;
use crate::engine::FinishReason;
use crate::learner::UpdateStats;
use crate::reward::RewardStats;
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
    /// Judge tokens of this step's rollouts (every attempt, retry and re-ask): the endpoint's
    /// `usage`, or the embedded judge's own counts. One-step-off, the rollouts judged during a
    /// step count in the step that trains on them.
    #[serde(default)]
    pub judge_prompt_tokens: u64,
    #[serde(default)]
    pub judge_completion_tokens: u64,
    /// Judge replies of this step without usable token counts (counted as 0 tokens).
    #[serde(default)]
    pub judge_usage_missing: u64,
    /// Prompt tokens the embedded judge took from its prefix cache during this step instead of
    /// prefilling them (`judge.embedded.prefix_cache`); counted in `judge_prompt_tokens` too.
    #[serde(default)]
    pub judge_prefix_reused_tokens: u64,
    /// Prompt + completion judge tokens of the run so far (this step included, resumes too).
    #[serde(default)]
    pub judge_tokens_total: u64,
    /// This step's and the run's judge cost at `judge.openai.price_*_per_mtok`; null without prices.
    #[serde(default)]
    pub judge_cost: Option<f64>,
    #[serde(default)]
    pub judge_cost_total: Option<f64>,
    /// Phase wall times in seconds: where the step's wall time went. `t_judge_tail` is judging
    /// left after the last rollout finished; `t_other` is the step's time outside every phase
    /// (the trainer's own overhead). One-step-off, `t_generate` and `t_judge_tail` are those of
    /// the rollouts made during this step (the next step's, plus this step's own when none were
    /// made ahead), and `t_overlap` is the part of `t_learn` that ran alongside them, so
    /// t_step = t_generate + t_judge_tail + t_learn - t_overlap + t_sync + t_checkpoint + t_other.
    /// `gen_tokens_per_s` is always this step's rollouts' tokens over their own generation time.
    pub t_generate: f64,
    pub t_judge_tail: f64,
    pub t_learn: f64,
    /// Learner seconds hidden behind generation and judging (0 unless one-step-off).
    #[serde(default)]
    pub t_overlap: f64,
    pub t_sync: f64,
    /// None on the line restored from a checkpoint after a crash (the save's time was lost).
    pub t_checkpoint: Option<f64>,
    pub t_other: f64,
    pub t_step: f64,
    /// Weight bytes written by this step's sync (0 = no sync).
    pub sync_bytes: u64,
    /// Staleness of the rollouts trained on: the learner's version before the update (step - 1)
    /// minus the version that generated them. 0 on-policy; up to sync_every - 1, plus 1
    /// one-step-off.
    #[serde(default)]
    pub off_policy_steps: u64,
    /// A remote pool's servers over the step (`engine.backend = "remote"` only; no keys
    /// otherwise), server `i` as `engine.remote.servers[i]`: `pool/<i>/requests` (generation
    /// requests, one per sample), `pool/<i>/generated_tokens`, `pool/<i>/tok_per_s` (its tokens
    /// over the step's `t_generate`, so the servers' rates add up to about `gen_tokens_per_s`;
    /// null without generation), `pool/<i>/failures` (prompt groups that failed on it, each
    /// ejecting it), `pool/<i>/refused` (groups it refused as bad requests), `pool/<i>/ejections`,
    /// and at the step's end `pool/<i>/healthy` (1 or 0) and `pool/<i>/serving` (the version it
    /// generates with; "" while ejected).
    ///
    /// A judge panel's members over the step (`judge.kind = "panel"` only), member `<m>` by its
    /// name: `judge/<m>/reward_mean` (over the pairs it scored), `judge/<m>/agreement` (with the
    /// panel's outcome: 1 the same, 0.5 when one of the two is a tie, 0 a win against a loss),
    /// `judge/<m>/position_consistency` (`both` only), `judge/<m>/latency_ms_mean`,
    /// `judge/<m>/scored`, `judge/<m>/unscored` (pairs), `judge/<m>/failed_calls`,
    /// `judge/<m>/prompt_tokens`, `judge/<m>/completion_tokens` and, with its prices,
    /// `judge/<m>/cost`.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, Value>,
}

/// The `judge/<member>/...` fields of a step (see [`StepRecord::parts`]); empty for one judge.
pub fn member_metrics(stats: &RewardStats, judge: &crate::judge::JudgeConfig) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (name, m) in &stats.members {
        let cost = judge.panel.members.iter().find(|c| &c.name == name).and_then(|c| c.openai.cost(&m.usage()));
        let fields = [
            ("reward_mean", serde_json::json!(m.reward_mean())),
            ("agreement", serde_json::json!(m.agreement())),
            ("position_consistency", serde_json::json!(m.position_consistency())),
            ("latency_ms_mean", serde_json::json!(m.latency_ms_mean())),
            ("scored", serde_json::json!(m.scored)),
            ("unscored", serde_json::json!(m.pairs - m.scored)),
            ("failed_calls", serde_json::json!(m.failed_calls)),
            ("prompt_tokens", serde_json::json!(m.prompt_tokens)),
            ("completion_tokens", serde_json::json!(m.completion_tokens)),
            ("cost", serde_json::json!(cost)),
        ];
        for (k, v) in fields {
            out.insert(format!("judge/{name}/{k}"), v);
        }
    }
    out
}

/// The `pool/<i>/...` fields of a step (see [`StepRecord::pool`]): each counter's growth from
/// `before` (the servers at the previous step's end, or at the engine's start) to `now`,
/// tokens/s over `gen_secs` seconds of generation, and `serving` (the version new generations
/// use) for each healthy server. Empty without a pool.
pub fn pool_metrics(before: &[ServerStats], now: &[ServerStats], serving: &str, gen_secs: f64) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let zero = ServerStats::default();
    for (i, s) in now.iter().enumerate() {
        let b = before.get(i).filter(|b| b.url == s.url).unwrap_or(&zero);
        let tokens = s.generated_tokens.saturating_sub(b.generated_tokens);
        let tok_per_s = if gen_secs > 0.0 { serde_json::json!(tokens as f64 / gen_secs) } else { Value::Null };
        let fields = [
            ("requests", serde_json::json!(s.requests.saturating_sub(b.requests))),
            ("generated_tokens", serde_json::json!(tokens)),
            ("tok_per_s", tok_per_s),
            ("failures", serde_json::json!(s.failures.saturating_sub(b.failures))),
            ("refused", serde_json::json!(s.refused.saturating_sub(b.refused))),
            ("ejections", serde_json::json!(s.ejections.saturating_sub(b.ejections))),
            ("healthy", serde_json::json!(u8::from(s.healthy))),
            ("serving", Value::String(if s.healthy { serving.to_string() } else { String::new() })),
        ];
        for (k, v) in fields {
            out.insert(format!("pool/{i}/{k}"), v);
        }
    }
    out
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
    /// The call's tokens (`prompt_tokens`, `completion_tokens`, `usage_missing`).
    #[serde(flatten)]
    pub usage: crate::judge::Usage,
    /// The panel member that made it (panels only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
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
    /// `reward.reference = "group"`: the `sample` of the rollout of this group it was compared
    /// with (its text stood in the reference's place); absent with the ladder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<usize>,
    pub calls: Vec<CallRecord>,
    /// A panel's members' own results for this rollout (their calls are in `calls`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<crate::reward::MemberOutcome>,
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
                    usage: c.output.usage,
                    member: c.member.clone(),
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

/// Writes `samples/step-NNNNNN.jsonl`: every rollout a step trained on (or left out), with its
/// verdicts.
pub(super) fn write_samples(dir: &Path, step: u64, tasks: &[Arc<Task>], own: &Pending) -> Result<()> {
    let mut samples = Vec::new();
    for (pi, g) in own.groups.iter().enumerate() {
        let task = &tasks[own.batch[pi]];
        for j in g {
            samples.push(SampleRecord {
                step,
                task_id: task.id.clone(),
                prompt: pi,
                sample: j.rollout.sample,
                level: own.levels[pi],
                top_level: task.top_level().unwrap_or(0),
                response: j.rollout.text.clone(),
                response_tokens: j.rollout.ids.len(),
                finish_reason: j.rollout.finish_reason,
                outcome: j.reward.outcome,
                reward: j.reward.reward,
                soft: j.reward.soft,
                consistent: j.reward.consistent,
                unscored_reason: j.reward.unscored_reason.clone(),
                partner: j.partner,
                calls: SampleRecord::calls_of(&j.reward),
                members: j.reward.members.clone(),
            });
        }
    }
    crate::fsutil::atomic_write_with(&dir.join(samples_file(step)), |w| {
        use std::io::Write;
        for s in &samples {
            serde_json::to_writer(&mut *w, s)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// A step's metrics line from its rollouts and update; the caller fills in the wall times.
pub(super) fn step_record(
    step: u64,
    own: &Pending,
    stats: &RewardStats,
    skipped: u64,
    cm: &CurriculumMetrics,
    u: Option<&UpdateStats>,
    cfg: &Config,
) -> StepRecord {
    let groups = &own.groups;
    let rewards: Vec<f64> = groups.iter().flatten().filter_map(|j| j.reward.reward).collect();
    let lens: Vec<usize> = groups.iter().flatten().map(|j| j.rollout.ids.len()).collect();
    let gen_tokens: usize = lens.iter().sum();
    let rollouts = lens.len() as u64;
    let latencies: Vec<f64> = groups.iter().flatten().flat_map(|j| &j.reward.calls).map(|c| c.output.latency_ms as f64).collect();
    let (reward_mean, reward_std) = match mean_std(&rewards) {
        Some((m, s)) => (Some(m), Some(s)),
        None => (None, None),
    };
    StepRecord {
        step,
        epoch: own.epoch,
        timestamp: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        rollouts,
        scored: rollouts - stats.unscored,
        unscored: stats.unscored,
        wins: stats.wins,
        ties: stats.ties,
        losses: stats.losses,
        skipped_groups: skipped,
        trained: u.map(|u| u.trajectories as u64).unwrap_or(0),
        reward_mean,
        reward_std,
        position_consistency: stats.position_consistency(),
        levels: cm.histogram.iter().map(|&c| c as u64).collect(),
        share_at_top: cm.share_at_top,
        advanced: cm.advanced as u64,
        // Without a KL term the learner keeps no reference and has no KL to report.
        kl: u.filter(|_| cfg.learner.kl_coef > 0.0).map(|u| u.kl),
        entropy: u.map(|u| u.entropy),
        clip_fraction: u.map(|u| u.clip_fraction),
        value_loss: u.map(|u| u.value_loss),
        policy_loss: u.map(|u| u.policy_loss),
        grad_norm: u.map(|u| u.grad_norm).filter(|g| g.is_finite()),
        skipped_steps: u.map(|u| u.skipped_steps).unwrap_or(0),
        lr: u.map(|u| u.lr),
        logprob_max_diff: u.map(|u| u.behaviour_logprob_max_diff),
        is_mismatch_kl: u.map(|u| u.is_mismatch_kl),
        is_clipped_share: u.map(|u| u.is_clipped_share),
        response_tokens_mean: gen_tokens as f64 / rollouts.max(1) as f64,
        response_tokens_max: lens.iter().copied().max().unwrap_or(0) as u64,
        truncated: groups.iter().flatten().filter(|j| j.rollout.finish_reason == FinishReason::Length).count() as u64,
        canceled: groups.iter().flatten().filter(|j| j.rollout.finish_reason == FinishReason::Canceled).count() as u64,
        gen_tokens_per_s: gen_tokens as f64 / own.t_generate.max(1e-9),
        learn_tokens_per_s: None,
        judge_calls: groups.iter().flatten().map(|j| j.reward.calls.len() as u64).sum(),
        judge_retries: stats.retries,
        judge_latency_ms_mean: mean_std(&latencies).map(|(m, _)| m),
        judge_latency_ms_max: latencies.iter().map(|&l| l as u64).max(),
        judge_prompt_tokens: stats.judge_prompt_tokens,
        judge_completion_tokens: stats.judge_completion_tokens,
        judge_usage_missing: stats.judge_usage_missing,
        // The trainer's to fill in: the engine counts it, not the calls.
        judge_prefix_reused_tokens: 0,
        // The run's totals and costs are the trainer's to fill in.
        judge_tokens_total: 0,
        judge_cost: None,
        judge_cost_total: None,
        t_generate: 0.0,
        t_judge_tail: 0.0,
        t_learn: 0.0,
        t_overlap: 0.0,
        t_sync: 0.0,
        t_checkpoint: None,
        t_other: 0.0,
        t_step: 0.0,
        sync_bytes: 0,
        off_policy_steps: (step - 1).saturating_sub(own.generated_by),
        parts: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(url: &str, healthy: bool, requests: u64, tokens: u64, failures: u64, ejections: u64) -> ServerStats {
        ServerStats { url: url.into(), healthy, requests, generated_tokens: tokens, failures, ejections, ..ServerStats::default() }
    }

    #[test]
    fn pool_metrics_are_each_steps_growth_and_survive_the_metrics_line() {
        let before = vec![server("http://a", true, 4, 40, 0, 0), server("http://b", true, 2, 10, 1, 0)];
        let mut now = vec![server("http://a", true, 10, 100, 0, 0), server("http://b", false, 3, 10, 3, 1)];
        now[0].refused = 2;
        let m = pool_metrics(&before, &now, "policy-v000002-abc", 2.0);
        let want = serde_json::json!({
            "pool/0/requests": 6, "pool/0/generated_tokens": 60, "pool/0/tok_per_s": 30.0, "pool/0/failures": 0,
            "pool/0/refused": 2, "pool/0/ejections": 0, "pool/0/healthy": 1, "pool/0/serving": "policy-v000002-abc",
            "pool/1/requests": 1, "pool/1/generated_tokens": 0, "pool/1/tok_per_s": 0.0, "pool/1/failures": 2,
            "pool/1/refused": 0, "pool/1/ejections": 1, "pool/1/healthy": 0, "pool/1/serving": "",
        });
        assert_eq!(serde_json::to_value(&m).unwrap(), want);
        // No generation this step: no rate. The first step counts from nothing.
        assert_eq!(pool_metrics(&before, &now, "v", 0.0)["pool/0/tok_per_s"], Value::Null);
        assert_eq!(pool_metrics(&[], &now, "v", 1.0)["pool/0/requests"], 10);
        assert!(pool_metrics(&[], &[], "v", 1.0).is_empty(), "no pool, no keys");

        // Flat in the metrics line; read back (a resume's last line, a checkpoint's record) whole.
        let r = StepRecord { step: 3, parts: m, ..StepRecord::default() };
        let line = serde_json::to_value(&r).unwrap();
        assert_eq!(line["pool/0/requests"], 6);
        assert_eq!(line["pool/1/serving"], "");
        assert_eq!(serde_json::from_value::<StepRecord>(line).unwrap(), r);
        let plain = serde_json::to_value(StepRecord::default()).unwrap();
        assert!(plain.as_object().unwrap().keys().all(|k| !k.starts_with("pool/")));
        assert_eq!(serde_json::from_value::<StepRecord>(plain).unwrap(), StepRecord::default());
    }
}
