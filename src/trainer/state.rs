//! What a checkpoint holds besides the learner: the trainer's own state.
//!
//! ```text
//! checkpoints/step-NNNNNN/
//!   trainer.json      step, sampler cursor, curriculum levels, which weights the engine served,
//!                     and the step's metrics line
//!   learner/          trainable weights (all, or the LoRA adapters + value head), optimizer
//!                     moments, update counters (every random draw of the learner derives from them)
//!   policy/           only when the engine served older weights than the learner's (sync_every
//!                     not dividing the step, or one-step-off without the next step's rollouts):
//!                     the export it served, so a resume samples from it
//!   pending.json      one-step-off only: the next step's rollouts, generated and judged, with
//!                     their rewards (see `offpolicy`)
//!   manifest.json     sha256 of every file, written last
//! ```

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::record::StepRecord;
use crate::curriculum::CurriculumState;
use crate::data::SamplerCursor;

pub const TRAINER_FILE: &str = "trainer.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: u64,
    pub sampler: SamplerCursor,
    pub curriculum: CurriculumState,
    /// The learner step whose weights the engine served (0 = the starting model).
    pub served_step: u64,
    /// Whether the learner changed since the last sync.
    pub dirty: bool,
    /// One-step-off: the step whose rollouts `pending.json` holds (always `step + 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// This step's metrics line, appended again on resume if a crash lost it.
    pub record: Option<StepRecord>,
    /// Judge tokens (and cost) of every step trained so far, across resumes: what
    /// `run.max_judge_tokens` and `run.max_judge_cost` are checked against.
    #[serde(default)]
    pub judge_spent: JudgeSpent,
}

/// A run's judge spending so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JudgeSpent {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Replies that reported no usable token counts (counted as 0 tokens).
    pub usage_missing: u64,
    /// At `judge.openai.price_*_per_mtok` (0 without prices).
    pub cost: f64,
}

impl JudgeSpent {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// This plus `usage` costing `cost`.
    pub fn plus(&self, usage: &crate::judge::Usage, cost: Option<f64>) -> Self {
        Self {
            prompt_tokens: self.prompt_tokens.saturating_add(usage.prompt_tokens),
            completion_tokens: self.completion_tokens.saturating_add(usage.completion_tokens),
            usage_missing: self.usage_missing.saturating_add(usage.usage_missing as u64),
            cost: self.cost + cost.unwrap_or(0.0),
        }
    }
}

impl TrainerState {
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::fsutil::atomic_write(&dir.join(TRAINER_FILE), &serde_json::to_vec_pretty(self)?)
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(TRAINER_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }
}
