//! The judge: compares two answers to one writing prompt, or rates one answer.
//! Implementations sit behind [`Judge`]; the reward, selection and evaluation code use only it.

pub mod config;
pub mod embedded;
pub mod openai;
pub mod panel;
pub mod templates;
pub mod verdict;

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use config::{EmbeddedConfig, JudgeConfig, JudgeKind, OpenAiConfig, VerdictMode};
pub use embedded::EmbeddedJudge;
pub use openai::OpenAiJudge;
pub use panel::Panel;

/// Which of the two answers, in the order the judge read them, it preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    First,
    Second,
    Tie,
}

/// Probabilities the judge gave the three labels at the verdict position, renormalised over
/// the labels (label-probability mode only).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LabelProbs {
    pub first: f64,
    pub second: f64,
    pub tie: f64,
}

/// The outcome of one comparison. `Unscored` is never a number: callers carry it as such.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Judgement {
    Scored {
        verdict: Verdict,
        #[serde(skip_serializing_if = "Option::is_none")]
        probs: Option<LabelProbs>,
    },
    Unscored {
        reason: String,
    },
}

/// One pairwise comparison: the task and the two answers in presentation order.
#[derive(Debug, Clone, Copy)]
pub struct Comparison<'a> {
    pub prompt: &'a str,
    pub criteria: Option<&'a str>,
    pub first: &'a str,
    pub second: &'a str,
}

/// Tokens judge calls used: `usage.prompt_tokens` / `usage.completion_tokens` of an endpoint's
/// replies (every attempt's, retries and re-asks included), or for the embedded judge the
/// engine's counts of the prompt ids it sent and the ids it generated. A reply whose `usage`
/// is absent or unusable counts 0 tokens and 1 in `usage_missing`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Replies that carried no usable token counts.
    pub usage_missing: u32,
}

/// Largest token count of one reply taken as real; above it (or negative, fractional, not a
/// number) the reply's usage is treated as missing.
pub const MAX_REPLY_TOKENS: u64 = 1_000_000_000;

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }

    /// Adds `o`; sums saturate instead of overflowing.
    pub fn add(&mut self, o: Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.usage_missing = self.usage_missing.saturating_add(o.usage_missing);
    }

    /// The `usage` object of an OpenAI-style reply body: both counts must be integers in
    /// 0..=[`MAX_REPLY_TOKENS`], else the reply counts as one with its usage missing.
    pub fn from_reply(body: &serde_json::Value) -> Usage {
        let count = |k: &str| body.get("usage")?.get(k)?.as_u64().filter(|&n| n <= MAX_REPLY_TOKENS);
        match (count("prompt_tokens"), count("completion_tokens")) {
            (Some(p), Some(c)) => Usage { prompt_tokens: p, completion_tokens: c, usage_missing: 0 },
            _ => Usage { usage_missing: 1, ..Usage::default() },
        }
    }
}

/// A judgement plus what the samples log and the metrics need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgeOutput {
    pub judgement: Judgement,
    /// The judge's raw text (every attempt's, for re-asks), for the samples log.
    pub raw: String,
    pub latency_ms: u64,
    pub retries: u32,
    /// Tokens this call used, every attempt's (absent in checkpoints written before it existed).
    #[serde(flatten)]
    pub usage: Usage,
}

/// A pointwise rating (1-10) of one answer against the task's criteria.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RatingOutput {
    /// None when unscored; `reason` says why.
    pub score: Option<f64>,
    pub reason: Option<String>,
    pub raw: String,
    pub latency_ms: u64,
    pub retries: u32,
    #[serde(flatten)]
    pub usage: Usage,
}

/// Whether the judge can be used. A judge whose circuit breaker is open answers every call
/// with `Unscored` at once; the trainer should pause or stop instead of collecting those.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum JudgeHealth {
    Up,
    Down {
        consecutive_failures: u32,
        last_error: String,
        /// Seconds until the breaker lets one probe call through.
        retry_in_secs: f64,
    },
}

#[async_trait]
pub trait Judge: Send + Sync {
    async fn compare(&self, c: Comparison<'_>) -> JudgeOutput;
    async fn rate(&self, prompt: &str, criteria: Option<&str>, answer: &str) -> RatingOutput;
    /// Circuit-breaker state; judges without one are always up.
    fn health(&self) -> JudgeHealth {
        JudgeHealth::Up
    }
}

impl JudgeOutput {
    pub fn unscored(reason: impl Into<String>, raw: String, latency_ms: u64, retries: u32) -> Self {
        Self { judgement: Judgement::Unscored { reason: reason.into() }, raw, latency_ms, retries, usage: Usage::default() }
    }

    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }
}

/// Builds the one judge `[judge]` describes (a panel is refused: see [`Panel::from_config`]);
/// `policy` is the `[model]` section, used by an embedded judge that has no model of its own.
pub async fn from_config(judge: &JudgeConfig, policy: &crate::model::ModelConfig) -> Result<Arc<dyn Judge>> {
    if judge.kind == JudgeKind::Panel {
        anyhow::bail!("judge.kind = \"panel\": this command takes one judge (a panel is for run, judge and eval); name one judge in [judge]");
    }
    let panel = Panel::from_config(judge, policy).await?;
    Ok(panel.only().expect("one judge").clone())
}
