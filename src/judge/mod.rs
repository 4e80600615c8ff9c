//! The judge: compares two answers to one writing prompt, or rates one answer.
//! Implementations sit behind [`Judge`]; the reward, selection and evaluation code use only it.

pub mod config;
pub mod embedded;
pub mod openai;
pub mod templates;
pub mod verdict;

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use config::{EmbeddedConfig, JudgeConfig, JudgeKind, OpenAiConfig, VerdictMode};
pub use embedded::EmbeddedJudge;
pub use openai::OpenAiJudge;

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

/// A judgement plus what the samples log and the metrics need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgeOutput {
    pub judgement: Judgement,
    /// The judge's raw text (every attempt's, for re-asks), for the samples log.
    pub raw: String,
    pub latency_ms: u64,
    pub retries: u32,
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
        Self { judgement: Judgement::Unscored { reason: reason.into() }, raw, latency_ms, retries }
    }
}

/// Builds the judge `[judge]` describes; `policy` is the `[model]` section, used by an embedded
/// judge that has no model of its own.
pub async fn from_config(judge: &JudgeConfig, policy: &crate::model::ModelConfig) -> Result<Arc<dyn Judge>> {
    Ok(match judge.kind {
        JudgeKind::Openai => Arc::new(OpenAiJudge::new(judge)?),
        JudgeKind::Embedded => Arc::new(EmbeddedJudge::load(judge, &judge.embedded_model(policy)).await?),
    })
}
