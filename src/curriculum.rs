//! Dynamic reference scheduling: every task has a ladder level, starting at its weakest
//! reference (0). When the policy beats the current reference the task moves up exactly one
//! level; ties, losses and unscored judgements never move it; the top level stays.
//!
//! The levels live in [`CurriculumState`], which the trainer saves in the same checkpoint as the
//! weights it belongs to (never in a side file), so a resume cannot desynchronise them. One call
//! of [`Curriculum::advance`] per step takes all of the step's outcomes at once, grouped by
//! task, so several rollouts of one prompt (or a task drawn twice in one batch) move it at most
//! one level.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::data::Task;

/// Which reference a task is compared with (the paper's ablations).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CurriculumMode {
    /// Start at the weakest reference, move up on wins.
    #[default]
    Dynamic,
    /// Always the strongest reference.
    StaticStrongest,
    /// Always the weakest reference.
    StaticWeakest,
}

/// With several rollouts of one task in a step, how many of its scored rollouts must win for the
/// task to move up. Unscored rollouts are left out of the count; a task with no scored rollout
/// never moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdvanceRule {
    /// At least one win.
    #[default]
    Any,
    /// Wins are more than half of the scored rollouts.
    Majority,
    /// Every scored rollout wins.
    All,
}

/// `[curriculum]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CurriculumConfig {
    pub mode: CurriculumMode,
    pub advance_rule: AdvanceRule,
}

/// One rollout's result against its task's current reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Win,
    Tie,
    Loss,
    /// The judge gave no usable verdict; never counts as anything.
    Unscored,
}

/// A reward outcome (`None` = unscored) as a curriculum outcome.
impl From<Option<crate::reward::Outcome>> for Outcome {
    fn from(o: Option<crate::reward::Outcome>) -> Self {
        match o {
            Some(crate::reward::Outcome::Win) => Outcome::Win,
            Some(crate::reward::Outcome::Tie) => Outcome::Tie,
            Some(crate::reward::Outcome::Loss) => Outcome::Loss,
            None => Outcome::Unscored,
        }
    }
}

impl AdvanceRule {
    /// Whether these outcomes (all rollouts of one task in one step) move the task up.
    pub fn moves(self, outcomes: &[Outcome]) -> bool {
        let wins = outcomes.iter().filter(|o| **o == Outcome::Win).count();
        let scored = outcomes.iter().filter(|o| **o != Outcome::Unscored).count();
        if wins == 0 {
            return false;
        }
        match self {
            AdvanceRule::Any => true,
            AdvanceRule::Majority => 2 * wins > scored,
            AdvanceRule::All => wins == scored,
        }
    }
}

/// What the checkpoint stores: the settings and every task's level (by task id, sorted, so the
/// serialised form is deterministic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurriculumState {
    pub mode: CurriculumMode,
    pub advance_rule: AdvanceRule,
    pub levels: BTreeMap<String, usize>,
}

/// Per-step metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurriculumMetrics {
    /// `histogram[l]` = tasks whose current reference is level `l` (effective level, so static
    /// modes show 0 or each task's top).
    pub histogram: Vec<usize>,
    /// Tasks moved up in this step.
    pub advanced: usize,
    pub at_top: usize,
    pub share_at_top: f64,
}

#[derive(Debug, Clone)]
pub struct Curriculum {
    state: CurriculumState,
    /// Top level per task id.
    tops: HashMap<String, usize>,
}

impl Curriculum {
    /// Every task at level 0. Each task needs at least one reference.
    pub fn new(cfg: &CurriculumConfig, tasks: &[Task]) -> Result<Self> {
        let tops = tops(tasks)?;
        let levels = tops.keys().map(|id| (id.clone(), 0)).collect();
        Ok(Self {
            state: CurriculumState { mode: cfg.mode, advance_rule: cfg.advance_rule, levels },
            tops,
        })
    }

    /// Restores a saved state for these tasks. Refused when the task set differs (ids added or
    /// missing), a saved level is past its task's top, or the settings changed.
    pub fn restore(cfg: &CurriculumConfig, tasks: &[Task], state: CurriculumState) -> Result<Self> {
        let tops = tops(tasks)?;
        if state.mode != cfg.mode || state.advance_rule != cfg.advance_rule {
            bail!(
                "curriculum: the checkpoint was made with mode {:?} / advance_rule {:?}, the config says {:?} / {:?}",
                state.mode, state.advance_rule, cfg.mode, cfg.advance_rule
            );
        }
        if let Some(id) = tops.keys().find(|id| !state.levels.contains_key(*id)) {
            bail!("curriculum: task {id:?} has no saved level (the task file changed since the checkpoint)");
        }
        for (id, &level) in &state.levels {
            match tops.get(id) {
                None => bail!("curriculum: saved task {id:?} is not in the task file (it changed since the checkpoint)"),
                Some(&top) if level > top => {
                    bail!("curriculum: saved level {level} of task {id:?} is past its top level {top}")
                }
                _ => {}
            }
        }
        Ok(Self { state, tops })
    }

    pub fn state(&self) -> &CurriculumState {
        &self.state
    }

    pub fn mode(&self) -> CurriculumMode {
        self.state.mode
    }

    /// The index of the reference `task_id` is compared with now.
    pub fn level(&self, task_id: &str) -> Option<usize> {
        let top = *self.tops.get(task_id)?;
        Some(match self.state.mode {
            CurriculumMode::Dynamic => self.state.levels[task_id],
            CurriculumMode::StaticStrongest => top,
            CurriculumMode::StaticWeakest => 0,
        })
    }

    /// The reference text `task` is compared with now.
    pub fn reference<'t>(&self, task: &'t Task) -> Option<&'t str> {
        self.level(&task.id).and_then(|l| task.references.get(l)).map(String::as_str)
    }

    /// Applies one step's outcomes. Outcomes of one task may appear in several entries; they are
    /// pooled, and the task moves at most one level. Unknown task ids are an error (nothing is
    /// changed then).
    pub fn advance<'a>(
        &mut self,
        step: impl IntoIterator<Item = (&'a str, &'a [Outcome])>,
    ) -> Result<CurriculumMetrics> {
        let mut pooled: BTreeMap<&str, Vec<Outcome>> = BTreeMap::new();
        for (id, outcomes) in step {
            if !self.tops.contains_key(id) {
                bail!("curriculum: outcome for unknown task {id:?}");
            }
            pooled.entry(id).or_default().extend_from_slice(outcomes);
        }
        let mut advanced = 0;
        if self.state.mode == CurriculumMode::Dynamic {
            for (id, outcomes) in pooled {
                let top = self.tops[id];
                let level = self.state.levels.get_mut(id).expect("every task has a level");
                if *level < top && self.state.advance_rule.moves(&outcomes) {
                    *level += 1;
                    advanced += 1;
                }
            }
        }
        Ok(self.metrics(advanced))
    }

    /// Level histogram and share at the top, with `advanced` as given.
    pub fn metrics(&self, advanced: usize) -> CurriculumMetrics {
        let max_top = self.tops.values().copied().max().unwrap_or(0);
        let mut histogram = vec![0; max_top + 1];
        let mut at_top = 0;
        for (id, &top) in &self.tops {
            let l = self.level(id).expect("known task");
            histogram[l] += 1;
            at_top += usize::from(l == top);
        }
        CurriculumMetrics {
            histogram,
            advanced,
            at_top,
            share_at_top: at_top as f64 / self.tops.len().max(1) as f64,
        }
    }
}

fn tops(tasks: &[Task]) -> Result<HashMap<String, usize>> {
    let mut tops = HashMap::with_capacity(tasks.len());
    for t in tasks {
        let Some(top) = t.top_level() else {
            bail!("curriculum: task {:?} has no references", t.id);
        };
        if tops.insert(t.id.clone(), top).is_some() {
            bail!("curriculum: duplicate task id {:?}", t.id);
        }
    }
    if tops.is_empty() {
        bail!("curriculum: no tasks");
    }
    Ok(tops)
}

#[cfg(test)]
mod tests;
