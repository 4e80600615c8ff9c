//! The pairwise comparison reward: the judge compares a rollout (the response) with the
//! prompt's current reference; win / tie / loss map to configurable values (1 / 0.5 / 0).
//!
//! Judges prefer the answer they read first, so the order is a setting: `reference-first` (the
//! paper's default, harder for the policy), `response-first`, `random` (seeded per rollout), or
//! `both` (two calls in swapped order: a win needs both orders to prefer the response, a loss
//! both to prefer the reference, anything else is a tie). A failed judge call gives
//! **unscored**, never a number: [`RewardOutcome::reward`] is `None` and the trainer leaves the
//! rollout out of the update. With label probabilities, `soft = true` rewards the expected value
//! under the judge's label distribution, averaged over the orders used.
//!
//! `reference = "group"` (Writing-Zero's bootstrapped relative reward, arXiv 2506.00103) puts
//! another rollout of the same prompt in the reference's place: each rollout's partner is drawn
//! from its group by [`group_partner`], seeded by (run seed, step, prompt, sample), and the rest
//! (orders, win / tie / loss, soft rewards, unscored) is as above. No reference answers are needed
//! and the curriculum is off.

use serde::{Deserialize, Serialize};

use crate::validate::Problems;
use crate::seed::splitmix64;
use std::collections::BTreeMap;

use crate::judge::{Comparison, Judge, JudgeOutput, Judgement, LabelProbs, Panel, Usage, Verdict};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Position {
    #[default]
    ReferenceFirst,
    ResponseFirst,
    Random,
    Both,
}

/// What a rollout is compared with (`reward.reference`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reference {
    /// The task's current reference on its ladder (Writing-RL; the curriculum moves it).
    #[default]
    Ladder,
    /// Another rollout of the same prompt, drawn from its group by a seeded partner draw
    /// (Writing-Zero's bootstrapped relative reward): no reference answers, no curriculum.
    Group,
}

impl Reference {
    pub fn is_ladder(&self) -> bool {
        *self == Reference::Ladder
    }
}

/// The `[reward]` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// `ladder` (default) or `group`. Left out of the serialised config at its default, so the
    /// config hash of a ladder run is what it was before the key existed.
    #[serde(skip_serializing_if = "Reference::is_ladder")]
    pub reference: Reference,
    pub position: Position,
    pub win: f64,
    pub tie: f64,
    pub loss: f64,
    /// Label-probability judges: expected reward under the label probabilities instead of the
    /// hard verdict's value.
    pub soft: bool,
    /// Seed of the `random` order (mixed with each rollout's key).
    pub seed: u64,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self { reference: Reference::Ladder, position: Position::ReferenceFirst, win: 1.0, tie: 0.5, loss: 0.0, soft: false, seed: 0 }
    }
}

impl RewardConfig {
    pub fn validate(&self, key: &str, p: &mut Problems) {
        for (name, v) in [("win", self.win), ("tie", self.tie), ("loss", self.loss)] {
            if !v.is_finite() {
                p.push(&format!("{key}.{name}"), format!("must be finite, got {v}"));
            }
        }
        if !(self.win >= self.tie && self.tie >= self.loss && self.win > self.loss) {
            p.push(
                &format!("{key}.win"),
                format!(
                    "values must satisfy win >= tie >= loss and win > loss, got {} / {} / {}",
                    self.win, self.tie, self.loss
                ),
            );
        }
    }

    fn value(&self, o: Outcome) -> f64 {
        match o {
            Outcome::Win => self.win,
            Outcome::Tie => self.tie,
            Outcome::Loss => self.loss,
        }
    }
}

/// The response's result against the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Win,
    Tie,
    Loss,
}

/// One rollout to reward.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    pub prompt: &'a str,
    pub criteria: Option<&'a str>,
    pub response: &'a str,
    /// The ladder's current reference, or (`reference = "group"`) the partner rollout's text.
    pub reference: &'a str,
}

/// One judge call and what it meant for the response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgeCall {
    /// Whether the response was shown first.
    pub response_first: bool,
    #[serde(flatten)]
    pub output: JudgeOutput,
    /// None when this call was unscored.
    pub outcome: Option<Outcome>,
    /// The panel member that made the call (panels only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

/// One panel member's result for a pair (its calls are in the pair's `calls`, tagged with its
/// name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberOutcome {
    pub member: String,
    pub weight: f64,
    pub outcome: Option<Outcome>,
    pub reward: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unscored_reason: Option<String>,
}

/// Everything the trainer logs about one rollout's reward.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardOutcome {
    pub calls: Vec<JudgeCall>,
    /// None when unscored.
    pub outcome: Option<Outcome>,
    /// None when unscored: never a number standing in for a failure.
    pub reward: Option<f64>,
    /// Whether `reward` is the soft (probability-weighted) value.
    pub soft: bool,
    pub unscored_reason: Option<String>,
    /// `both` only, when both calls were scored: whether the two orders agreed.
    pub consistent: Option<bool>,
    /// Tokens of earlier judgings of this rollout that a re-judge replaced (`on_judge_down =
    /// "pause"`): spent, so still counted.
    #[serde(default, skip_serializing_if = "Usage::is_zero")]
    pub replaced_usage: Usage,
    /// A panel's members, each with its own result; empty for one judge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberOutcome>,
}

impl RewardOutcome {
    /// Unscored without asking the judge.
    pub fn unscored(reason: &str) -> Self {
        Self {
            calls: Vec::new(),
            outcome: None,
            reward: None,
            soft: false,
            unscored_reason: Some(reason.to_string()),
            consistent: None,
            replaced_usage: Usage::default(),
            members: Vec::new(),
        }
    }
    /// Tokens every judge call of this rollout used, replaced ones included.
    pub fn usage(&self) -> Usage {
        let mut u = self.replaced_usage;
        for c in &self.calls {
            u.add(c.output.usage);
        }
        u
    }
    pub fn is_unscored(&self) -> bool {
        self.reward.is_none()
    }
    pub fn retries(&self) -> u32 {
        self.calls.iter().map(|c| c.output.retries).sum()
    }
    pub fn latency_ms(&self) -> u64 {
        self.calls.iter().map(|c| c.output.latency_ms).max().unwrap_or(0)
    }
}

/// The response's outcome given which position it held.
fn outcome_of(v: Verdict, response_first: bool) -> Outcome {
    match (v, response_first) {
        (Verdict::Tie, _) => Outcome::Tie,
        (Verdict::First, true) | (Verdict::Second, false) => Outcome::Win,
        _ => Outcome::Loss,
    }
}

/// Expected reward under the label probabilities of one call.
fn soft_value(cfg: &RewardConfig, p: &LabelProbs, response_first: bool) -> f64 {
    let (p_win, p_loss) = if response_first { (p.first, p.second) } else { (p.second, p.first) };
    p_win * cfg.win + p.tie * cfg.tie + p_loss * cfg.loss
}

/// The orders to ask in, as `response_first` flags. `key` identifies the rollout (e.g. a hash
/// of step, prompt and sample) so `random` is reproducible.
pub fn orders(cfg: &RewardConfig, key: u64) -> Vec<bool> {
    match cfg.position {
        Position::ReferenceFirst => vec![false],
        Position::ResponseFirst => vec![true],
        Position::Random => vec![splitmix64(cfg.seed ^ splitmix64(key)) & 1 == 1],
        Position::Both => vec![false, true],
    }
}

/// `reference = "group"`: the sample index of the rollout that sample `sample` of a group of `n`
/// (n >= 2) is compared with. Uniform over the group's other samples, never `sample` itself, and a
/// pure function of (run seed, step, prompt index in the batch, sample), like the engine's
/// sampling streams, so a resumed run draws the same pairs.
pub fn group_partner(run_seed: u64, step: u64, prompt: u64, sample: usize, n: usize) -> usize {
    assert!(n >= 2 && sample < n, "a partner needs a group of >= 2 (sample {sample} of {n})");
    // A constant of its own keeps this stream apart from the sampling and reward-order ones.
    let mut h = splitmix64(run_seed ^ 0x7061_7274_6e65_7273);
    h = splitmix64(h ^ step);
    h = splitmix64(h ^ prompt);
    h = splitmix64(h ^ sample as u64);
    let r = ((h as u128 * (n - 1) as u128) >> 64) as usize;
    if r >= sample {
        r + 1
    } else {
        r
    }
}

/// Judges one rollout against its reference and turns the verdict(s) into a reward: the one
/// judge's, or each panel member's combined by [`combine_panel`]. Calls run concurrently.
pub async fn reward(judges: &Panel, cfg: &RewardConfig, input: RewardInput<'_>, key: u64) -> RewardOutcome {
    let outs = futures::future::join_all(judges.members.iter().map(|m| reward_by(&*m.judge, cfg, input, key))).await;
    if judges.single {
        return outs.into_iter().next().expect("one judge");
    }
    let members = judges.members.iter().zip(outs).map(|(m, r)| (m.name.as_str(), m.weight, r)).collect();
    combine_panel(judges.quorum, members)
}

/// One judge's reward for a rollout. With `both`, the two calls run concurrently.
pub async fn reward_by(judge: &dyn Judge, cfg: &RewardConfig, input: RewardInput<'_>, key: u64) -> RewardOutcome {
    let calls = futures::future::join_all(orders(cfg, key).into_iter().map(|response_first| async move {
        let (first, second) =
            if response_first { (input.response, input.reference) } else { (input.reference, input.response) };
        let output = judge
            .compare(Comparison { prompt: input.prompt, criteria: input.criteria, first, second })
            .await;
        let outcome = match &output.judgement {
            Judgement::Scored { verdict, .. } => Some(outcome_of(*verdict, response_first)),
            Judgement::Unscored { .. } => None,
        };
        JudgeCall { response_first, output, outcome, member: None }
    }))
    .await;
    combine(cfg, calls)
}

/// A panel's result for one pair from its members' (name, weight, result). The reward is the
/// weighted mean of the members that scored the pair; the outcome (what the curriculum counts)
/// is the one with the most weight among them, a tie when two outcomes share the most. Fewer
/// than `quorum` members scoring it, or only members of weight 0, leave it unscored.
pub fn combine_panel(quorum: usize, members: Vec<(&str, f64, RewardOutcome)>) -> RewardOutcome {
    let mut calls = Vec::new();
    let mut outs = Vec::with_capacity(members.len());
    let mut replaced_usage = Usage::default();
    let mut soft = false;
    for (name, weight, r) in members {
        replaced_usage.add(r.replaced_usage);
        soft |= r.soft && r.reward.is_some() && weight > 0.0;
        calls.extend(r.calls.into_iter().map(|mut c| {
            c.member = Some(name.to_string());
            c
        }));
        outs.push(MemberOutcome {
            member: name.to_string(),
            weight,
            outcome: r.outcome,
            reward: r.reward,
            consistent: r.consistent,
            unscored_reason: r.unscored_reason,
        });
    }
    let scored: Vec<&MemberOutcome> = outs.iter().filter(|m| m.reward.is_some() && m.outcome.is_some()).collect();
    let weight: f64 = scored.iter().map(|m| m.weight).sum();
    let unscored = |reason: String| RewardOutcome {
        calls: Vec::new(),
        outcome: None,
        reward: None,
        soft: false,
        unscored_reason: Some(reason),
        consistent: None,
        replaced_usage: Usage::default(),
        members: Vec::new(),
    };
    let mut out = if scored.len() < quorum {
        let why: Vec<String> = outs
            .iter()
            .filter_map(|m| m.unscored_reason.as_ref().map(|r| format!("{}: {r}", m.member)))
            .collect();
        unscored(format!("panel: {} of {} members scored, quorum {quorum} ({})", scored.len(), outs.len(), why.join("; ")))
    } else if !(weight > 0.0) {
        unscored(format!("panel: the {} members that scored all weigh 0", scored.len()))
    } else {
        let reward = scored.iter().map(|m| m.weight * m.reward.unwrap_or(0.0)).sum::<f64>() / weight;
        let mut by = [(Outcome::Win, 0.0), (Outcome::Tie, 0.0), (Outcome::Loss, 0.0)];
        for m in &scored {
            let slot = by.iter_mut().find(|(o, _)| Some(*o) == m.outcome).expect("an outcome");
            slot.1 += m.weight;
        }
        let top = by.iter().map(|b| b.1).fold(0.0, f64::max);
        let leaders: Vec<Outcome> = by.iter().filter(|b| b.1 == top).map(|b| b.0).collect();
        let outcome = if leaders.len() == 1 { leaders[0] } else { Outcome::Tie };
        RewardOutcome {
            calls: Vec::new(),
            outcome: Some(outcome),
            reward: Some(reward),
            soft,
            unscored_reason: None,
            consistent: None,
            replaced_usage: Usage::default(),
            members: Vec::new(),
        }
    };
    out.calls = calls;
    out.members = outs;
    out.replaced_usage = replaced_usage;
    out
}

/// The reward of a set of calls (one, or two in swapped order).
pub fn combine(cfg: &RewardConfig, calls: Vec<JudgeCall>) -> RewardOutcome {
    if let Some(bad) = calls.iter().find(|c| c.outcome.is_none()) {
        let reason = match &bad.output.judgement {
            Judgement::Unscored { reason } => reason.clone(),
            Judgement::Scored { .. } => unreachable!("outcome is None only when unscored"),
        };
        let order = if bad.response_first { "response first" } else { "reference first" };
        return RewardOutcome {
            calls,
            outcome: None,
            reward: None,
            soft: false,
            unscored_reason: Some(format!("{reason} ({order})")),
            consistent: None,
            replaced_usage: Usage::default(),
            members: Vec::new(),
        };
    }
    let outs: Vec<Outcome> = calls.iter().filter_map(|c| c.outcome).collect();
    let outcome = if outs.iter().all(|o| *o == Outcome::Win) {
        Outcome::Win
    } else if outs.iter().all(|o| *o == Outcome::Loss) {
        Outcome::Loss
    } else {
        Outcome::Tie
    };
    let consistent = (calls.len() == 2).then(|| outs[0] == outs[1]);
    let probs: Option<Vec<(LabelProbs, bool)>> = calls
        .iter()
        .map(|c| match &c.output.judgement {
            Judgement::Scored { probs: Some(p), .. } => Some((*p, c.response_first)),
            _ => None,
        })
        .collect();
    let (reward, soft) = match probs {
        Some(ps) if cfg.soft && !ps.is_empty() => {
            let v = ps.iter().map(|(p, rf)| soft_value(cfg, p, *rf)).sum::<f64>() / ps.len() as f64;
            (v, true)
        }
        _ => (cfg.value(outcome), false),
    };
    RewardOutcome {
        calls,
        outcome: Some(outcome),
        reward: Some(reward),
        soft,
        unscored_reason: None,
        consistent,
        replaced_usage: Usage::default(),
        members: Vec::new(),
    }
}

/// Counts for metrics and summaries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardStats {
    pub wins: u64,
    pub ties: u64,
    pub losses: u64,
    pub unscored: u64,
    /// `both`: pairs where both orders were scored, and those where they agreed.
    pub both_scored: u64,
    pub consistent: u64,
    /// Scored calls whose verdict was the first / second position / tie (position bias).
    pub chose_first: u64,
    pub chose_second: u64,
    pub chose_tie: u64,
    pub retries: u64,
    /// Judge tokens of every call (retries, re-asks and replaced calls included) and replies
    /// without usable token counts.
    pub judge_prompt_tokens: u64,
    pub judge_completion_tokens: u64,
    pub judge_usage_missing: u64,
    /// A panel's members by name; empty for one judge.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, MemberStats>,
}

/// One panel member over a set of pairs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberStats {
    pub pairs: u64,
    /// Pairs it scored, and the sum of its rewards over them.
    pub scored: u64,
    pub reward_sum: f64,
    /// Pairs both it and the panel scored, and its agreement with the panel summed over them:
    /// 1 for the same outcome, 0.5 when one of the two is a tie, 0 for a win against a loss.
    pub compared: u64,
    pub agreement_sum: f64,
    /// `both`: pairs it scored in both orders, and those where its two orders agreed.
    pub both_scored: u64,
    pub consistent: u64,
    pub calls: u64,
    pub failed_calls: u64,
    pub retries: u64,
    pub latency_ms_sum: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub usage_missing: u64,
}

impl MemberStats {
    pub fn reward_mean(&self) -> Option<f64> {
        (self.scored > 0).then(|| self.reward_sum / self.scored as f64)
    }
    pub fn agreement(&self) -> Option<f64> {
        (self.compared > 0).then(|| self.agreement_sum / self.compared as f64)
    }
    pub fn position_consistency(&self) -> Option<f64> {
        (self.both_scored > 0).then(|| self.consistent as f64 / self.both_scored as f64)
    }
    pub fn latency_ms_mean(&self) -> Option<f64> {
        (self.calls > 0).then(|| self.latency_ms_sum as f64 / self.calls as f64)
    }
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            usage_missing: self.usage_missing.min(u32::MAX as u64) as u32,
        }
    }
}

/// How far a member's outcome is from the panel's: 1 equal, 0.5 one a tie, 0 opposite.
pub fn agreement(member: Outcome, panel: Outcome) -> f64 {
    match (member, panel) {
        (a, b) if a == b => 1.0,
        (Outcome::Tie, _) | (_, Outcome::Tie) => 0.5,
        _ => 0.0,
    }
}

impl RewardStats {
    /// Judge tokens of every call counted.
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.judge_prompt_tokens,
            completion_tokens: self.judge_completion_tokens,
            usage_missing: self.judge_usage_missing.min(u32::MAX as u64) as u32,
        }
    }

    /// `member`'s tokens (zero for one judge or an unknown name).
    pub fn member_usage(&self, member: &str) -> Usage {
        self.members.get(member).map(|m| m.usage()).unwrap_or_default()
    }

    pub fn add(&mut self, r: &RewardOutcome) {
        for m in &r.members {
            let s = self.members.entry(m.member.clone()).or_default();
            s.pairs += 1;
            if let (Some(v), Some(o)) = (m.reward, m.outcome) {
                s.scored += 1;
                s.reward_sum += v;
                if let Some(p) = r.outcome {
                    s.compared += 1;
                    s.agreement_sum += agreement(o, p);
                }
            }
            if let Some(c) = m.consistent {
                s.both_scored += 1;
                s.consistent += c as u64;
                // A panel's own consistency is its members' over their pairs.
                self.both_scored += 1;
                self.consistent += c as u64;
            }
        }
        for c in r.calls.iter() {
            let Some(name) = &c.member else { continue };
            let s = self.members.entry(name.clone()).or_default();
            s.calls += 1;
            s.failed_calls += c.outcome.is_none() as u64;
            s.retries += c.output.retries as u64;
            s.latency_ms_sum = s.latency_ms_sum.saturating_add(c.output.latency_ms);
            s.prompt_tokens = s.prompt_tokens.saturating_add(c.output.usage.prompt_tokens);
            s.completion_tokens = s.completion_tokens.saturating_add(c.output.usage.completion_tokens);
            s.usage_missing += c.output.usage.usage_missing as u64;
        }
        match r.outcome {
            Some(Outcome::Win) => self.wins += 1,
            Some(Outcome::Tie) => self.ties += 1,
            Some(Outcome::Loss) => self.losses += 1,
            None => self.unscored += 1,
        }
        if let Some(c) = r.consistent {
            self.both_scored += 1;
            self.consistent += c as u64;
        }
        let u = r.usage();
        self.judge_prompt_tokens = self.judge_prompt_tokens.saturating_add(u.prompt_tokens);
        self.judge_completion_tokens = self.judge_completion_tokens.saturating_add(u.completion_tokens);
        self.judge_usage_missing += u.usage_missing as u64;
        for call in &r.calls {
            self.retries += call.output.retries as u64;
            if let Judgement::Scored { verdict, .. } = call.output.judgement {
                match verdict {
                    Verdict::First => self.chose_first += 1,
                    Verdict::Second => self.chose_second += 1,
                    Verdict::Tie => self.chose_tie += 1,
                }
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.wins + self.ties + self.losses + self.unscored
    }

    /// Share of `both` pairs whose two orders agreed; None without any.
    pub fn position_consistency(&self) -> Option<f64> {
        (self.both_scored > 0).then(|| self.consistent as f64 / self.both_scored as f64)
    }

    /// Share of scored calls that chose the first position.
    pub fn first_position_rate(&self) -> Option<f64> {
        let n = self.chose_first + self.chose_second + self.chose_tie;
        (n > 0).then(|| self.chose_first as f64 / n as f64)
    }
}

impl std::fmt::Display for RewardStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pairs: win {} / tie {} / loss {} / unscored {}",
            self.total(),
            self.wins,
            self.ties,
            self.losses,
            self.unscored
        )?;
        if let Some(c) = self.position_consistency() {
            write!(f, " | position consistency {:.3} ({}/{})", c, self.consistent, self.both_scored)?;
        }
        if let Some(r) = self.first_position_rate() {
            write!(f, " | first position chosen {:.3}", r)?;
        }
        write!(f, " | retries {}", self.retries)
    }
}

/// The per-member table `judge` and `eval` print for a panel: each member's reward, agreement
/// with the panel, position consistency, latency, failures, tokens and (with prices) cost.
pub fn member_table(stats: &BTreeMap<String, MemberStats>, cfg: &crate::judge::JudgeConfig) -> String {
    use std::fmt::Write;
    let opt = |v: Option<f64>, d: usize| v.map(|v| format!("{v:.d$}")).unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>6} {:>6} {:>6} {:>7} {:>7} {:>8} {:>10} {:>7} {:>10} {:>10}",
        "member", "weight", "pairs", "scored", "reward", "agree", "consist.", "latency ms", "failed", "tokens", "cost"
    );
    for m in &cfg.panel.members {
        let s = stats.get(&m.name).cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<16} {:>6} {:>6} {:>6} {:>7} {:>7} {:>8} {:>10} {:>7} {:>10} {:>10}",
            m.name,
            format!("{:.2}", m.weight),
            s.pairs,
            s.scored,
            opt(s.reward_mean(), 3),
            opt(s.agreement(), 3),
            opt(s.position_consistency(), 3),
            opt(s.latency_ms_mean(), 0),
            s.failed_calls,
            s.prompt_tokens.saturating_add(s.completion_tokens),
            opt(m.openai.cost(&s.usage()), 4),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(v: Option<Verdict>, response_first: bool, probs: Option<LabelProbs>) -> JudgeCall {
        let judgement = match v {
            Some(verdict) => Judgement::Scored { verdict, probs },
            None => Judgement::Unscored { reason: "HTTP 500: boom".into() },
        };
        JudgeCall {
            response_first,
            outcome: v.map(|v| outcome_of(v, response_first)),
            output: JudgeOutput { judgement, raw: String::new(), latency_ms: 1, retries: 0, usage: Usage::default() },
            member: None,
        }
    }

    #[test]
    fn both_orders_rule() {
        let cfg = RewardConfig { position: Position::Both, ..Default::default() };
        // Reference first then response first.
        let win = combine(&cfg, vec![call(Some(Verdict::Second), false, None), call(Some(Verdict::First), true, None)]);
        assert_eq!((win.outcome, win.reward, win.consistent), (Some(Outcome::Win), Some(1.0), Some(true)));
        let loss = combine(&cfg, vec![call(Some(Verdict::First), false, None), call(Some(Verdict::Second), true, None)]);
        assert_eq!((loss.outcome, loss.reward, loss.consistent), (Some(Outcome::Loss), Some(0.0), Some(true)));
        // Always "first": position bias, the orders disagree -> tie.
        let biased = combine(&cfg, vec![call(Some(Verdict::First), false, None), call(Some(Verdict::First), true, None)]);
        assert_eq!((biased.outcome, biased.reward, biased.consistent), (Some(Outcome::Tie), Some(0.5), Some(false)));
        let half = combine(&cfg, vec![call(Some(Verdict::Second), false, None), call(Some(Verdict::Tie), true, None)]);
        assert_eq!(half.outcome, Some(Outcome::Tie));
        let failed = combine(&cfg, vec![call(Some(Verdict::Second), false, None), call(None, true, None)]);
        assert_eq!((failed.reward, failed.outcome), (None, None));
        assert!(failed.unscored_reason.unwrap().contains("HTTP 500: boom (response first)"));
    }

    #[test]
    fn values_and_soft_reward() {
        let cfg = RewardConfig { win: 2.0, tie: 1.0, loss: -1.0, ..Default::default() };
        assert_eq!(combine(&cfg, vec![call(Some(Verdict::First), false, None)]).reward, Some(-1.0));
        assert_eq!(combine(&cfg, vec![call(Some(Verdict::Tie), false, None)]).reward, Some(1.0));
        let soft = RewardConfig { soft: true, position: Position::Both, ..Default::default() };
        // A judge biased to the first slot: P(first)=0.7 whatever the order.
        let p = LabelProbs { first: 0.7, second: 0.2, tie: 0.1 };
        let r = combine(&soft, vec![call(Some(Verdict::First), false, Some(p)), call(Some(Verdict::First), true, Some(p))]);
        // Order 1 (response second): 0.2 + 0.05; order 2 (response first): 0.7 + 0.05.
        assert!(r.soft && (r.reward.unwrap() - 0.5).abs() < 1e-12, "{r:?}");
        let q = LabelProbs { first: 0.6, second: 0.3, tie: 0.1 };
        let r = combine(&soft, vec![call(Some(Verdict::First), false, Some(p)), call(Some(Verdict::First), true, Some(q))]);
        assert!((r.reward.unwrap() - (0.25 + 0.65) / 2.0).abs() < 1e-12);
        // Without probabilities the soft setting falls back to the hard value.
        let r = combine(&soft, vec![call(Some(Verdict::Second), false, None), call(Some(Verdict::First), true, None)]);
        assert_eq!((r.soft, r.reward), (false, Some(1.0)));
    }

    #[test]
    fn random_order_is_seeded_and_mixed() {
        let cfg = RewardConfig { position: Position::Random, seed: 3, ..Default::default() };
        let a: Vec<bool> = (0..200).map(|k| orders(&cfg, k)[0]).collect();
        let b: Vec<bool> = (0..200).map(|k| orders(&cfg, k)[0]).collect();
        assert_eq!(a, b);
        let firsts = a.iter().filter(|x| **x).count();
        assert!((70..130).contains(&firsts), "{firsts}");
        let other = RewardConfig { seed: 4, ..cfg.clone() };
        assert_ne!(a, (0..200).map(|k| orders(&other, k)[0]).collect::<Vec<_>>());
    }

    /// Partners: a pure function of (run seed, step, prompt, sample), so a resumed run (which
    /// recomputes them from scratch at the steps it repeats) draws the same pairs; never the rollout
    /// itself, always inside the group, every other sample reachable; another seed, other pairs.
    #[test]
    fn group_partners_are_seeded_never_self_and_in_the_group() {
        let pairs = |seed: u64, steps: std::ops::Range<u64>, n: usize| -> Vec<(u64, u64, usize, usize)> {
            let mut v = Vec::new();
            for step in steps {
                for prompt in 0..4u64 {
                    for s in 0..n {
                        v.push((step, prompt, s, group_partner(seed, step, prompt, s, n)));
                    }
                }
            }
            v
        };
        for n in [2usize, 3, 4, 8] {
            let straight = pairs(11, 1..9, n);
            // A run interrupted after step 4 and resumed: steps 5.. drawn again by a fresh process.
            let resumed: Vec<_> = pairs(11, 1..5, n).into_iter().chain(pairs(11, 5..9, n)).collect();
            assert_eq!(straight, resumed);
            for &(_, _, s, p) in &straight {
                assert!(p != s && p < n, "sample {s} of {n} got partner {p}");
            }
            if n == 2 {
                assert!(straight.iter().all(|&(_, _, s, p)| p == 1 - s));
                continue;
            }
            // Every other sample is drawn for each sample, roughly uniformly.
            let mut counts = vec![vec![0usize; n]; n];
            for step in 1..400 {
                for s in 0..n {
                    counts[s][group_partner(11, step, 0, s, n)] += 1;
                }
            }
            for (s, row) in counts.iter().enumerate() {
                for (p, &c) in row.iter().enumerate() {
                    if p == s {
                        assert_eq!(c, 0);
                    } else {
                        let want = 399 / (n - 1);
                        assert!(c * 2 > want && c < want * 2, "sample {s} -> {p}: {c} of 399 (n {n})");
                    }
                }
            }
            assert_ne!(straight, pairs(12, 1..9, n), "another run seed draws other pairs");
        }
    }

    #[test]
    fn stats_count_unscored_and_consistency() {
        let cfg = RewardConfig { position: Position::Both, ..Default::default() };
        let mut s = RewardStats::default();
        s.add(&combine(&cfg, vec![call(Some(Verdict::Second), false, None), call(Some(Verdict::First), true, None)]));
        s.add(&combine(&cfg, vec![call(Some(Verdict::First), false, None), call(Some(Verdict::First), true, None)]));
        s.add(&combine(&cfg, vec![call(None, false, None), call(Some(Verdict::First), true, None)]));
        assert_eq!((s.wins, s.ties, s.losses, s.unscored), (1, 1, 0, 1));
        assert_eq!(s.position_consistency(), Some(0.5));
        assert_eq!((s.chose_first, s.chose_second), (4, 1));
        let bad = RewardConfig { win: 0.0, tie: 0.5, loss: 1.0, ..Default::default() };
        let mut p = Problems::default();
        bad.validate("reward", &mut p);
        assert!(p.0[0].starts_with("reward.win:"), "{:?}", p.0);
    }
}
