//! What a checkpoint holds besides the learner: the trainer's own state.
//!
//! ```text
//! checkpoints/step-NNNNNN/
//!   trainer.json      step, sampler cursor, curriculum levels, which weights the engine served,
//!                     and the step's metrics line
//!   learner/          trainable weights (all, or the LoRA adapters + value head), optimizer
//!                     moments, update counters (every random draw of the learner derives from them)
//!   policy/           only when the engine served older weights than the learner's (sync_every
//!                     not dividing the step): the export it served, so a resume samples from it
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
    /// This step's metrics line, appended again on resume if a crash lost it.
    pub record: Option<StepRecord>,
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
