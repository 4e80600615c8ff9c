//! Dynamic reference scheduling: every task has a ladder level, starting at its weakest
//! reference (0). When the policy beats the current reference the task moves up exactly one
//! level; ties, losses and unscored judgements never move it; the top level stays.
//!
//! The levels live in [`CurriculumState`], which the trainer saves in the same checkpoint as the
//! weights it belongs to (never in a side file), so a resume cannot desynchronise them. One call
//! of [`Curriculum::advance`] per step takes all of the step's outcomes at once, grouped by
//! task, so several rollouts of one prompt (or a task drawn twice in one batch) move it at most
//! one level.
//!
//! The promotion rule (`advance_rule`) is either per step (`any`, `majority`, `all`: one task's
//! rollouts of one step decide) or across steps (`k-of-m`: a task moves when at least `advance_k`
//! of its last `advance_window` scored comparisons at its current level are wins). The k-of-m
//! windows are part of [`CurriculumState`] too, so a resume continues them exactly. [`sim`]
//! measures how often each rule moves under a random judge and how fast it climbs under a real one.

use std::collections::{BTreeMap, HashMap, VecDeque};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::data::Task;
use crate::reward::Reference;

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

/// When a task moves up. `any`, `majority` and `all` look at one step: with several rollouts of
/// one task in a step, how many of its scored rollouts must win. `k-of-m` counts across steps.
/// Unscored rollouts are left out of every count; a task with no scored rollout never moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdvanceRule {
    /// At least one win in the step.
    #[default]
    Any,
    /// Wins are more than half of the step's scored rollouts.
    Majority,
    /// Every scored rollout of the step wins.
    All,
    /// At least `advance_k` wins among the task's last `advance_window` scored comparisons at its
    /// current level, counted across steps; ties (a `both`-order disagreement included) and
    /// losses are non-wins. The window empties when the task moves up.
    #[serde(rename = "k-of-m")]
    KOfM,
}

/// `[curriculum]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CurriculumConfig {
    pub mode: CurriculumMode,
    pub advance_rule: AdvanceRule,
    /// `k-of-m` only (and required there): wins needed in the window, >= 1 and <= `advance_window`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advance_k: Option<usize>,
    /// `k-of-m` only (and required there): the window, the task's last m scored comparisons at
    /// its current level, m >= 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advance_window: Option<usize>,
}

impl CurriculumConfig {
    /// Range checks, each problem with its key path (`key` = `curriculum`). `advance_k` and
    /// `advance_window` are refused with any rule but `k-of-m` (set there and ignored, they would
    /// suggest a window that is not applied).
    pub fn validate(&self, key: &str, p: &mut crate::validate::Problems) {
        let (k_key, m_key) = (format!("{key}.advance_k"), format!("{key}.advance_window"));
        if self.advance_rule != AdvanceRule::KOfM {
            let rule = serde_json::to_value(self.advance_rule).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            for (name, v) in [(&k_key, self.advance_k), (&m_key, self.advance_window)] {
                if v.is_some() {
                    p.push(name, format!("only applies with {key}.advance_rule = \"k-of-m\", not \"{rule}\"; remove it"));
                }
            }
            return;
        }
        let (Some(k), Some(m)) = (self.advance_k, self.advance_window) else {
            for (name, v) in [(&k_key, self.advance_k), (&m_key, self.advance_window)] {
                if v.is_none() {
                    p.push(name, format!("required with {key}.advance_rule = \"k-of-m\""));
                }
            }
            return;
        };
        if k == 0 {
            p.push(&k_key, "must be >= 1, got 0");
        }
        if m == 0 {
            p.push(&m_key, "must be >= 1, got 0");
        }
        if k > m {
            p.push(&k_key, format!("must be <= {m_key} ({m}), got {k}: the window could never hold {k} wins"));
        }
    }

    /// [`validate`](Self::validate) as a `Result`.
    pub fn check(&self) -> Result<()> {
        let mut p = crate::validate::Problems::default();
        self.validate("curriculum", &mut p);
        if !p.0.is_empty() {
            bail!("{}", p.0.join("\n  "));
        }
        Ok(())
    }
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
    /// Whether these outcomes (all rollouts of one task in one step) move the task up, for the
    /// per-step rules. `k-of-m` cannot be decided from one step: [`Curriculum::advance`] keeps
    /// its windows, and this answers false for it.
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
            AdvanceRule::KOfM => false,
        }
    }
}

/// One task's k-of-m window: its last scored comparisons at its current level, oldest first, at
/// most m. Serialised as a string of `W` (win), `T` (tie) and `L` (loss), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window(VecDeque<Outcome>);

impl Window {
    /// Appends a scored outcome (unscored ones are ignored), dropping the oldest past `m`.
    fn push(&mut self, o: Outcome, m: usize) {
        if o == Outcome::Unscored {
            return;
        }
        self.0.push_back(o);
        while self.0.len() > m {
            self.0.pop_front();
        }
    }

    pub fn wins(&self) -> usize {
        self.0.iter().filter(|o| **o == Outcome::Win).count()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn outcomes(&self) -> impl Iterator<Item = Outcome> + '_ {
        self.0.iter().copied()
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.0.iter()
            .map(|o| match o {
                Outcome::Win => 'W',
                Outcome::Tie => 'T',
                Outcome::Loss => 'L',
                Outcome::Unscored => unreachable!("a window holds scored outcomes only"),
            })
            .collect()
    }
}

impl TryFrom<String> for Window {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.chars()
            .map(|c| match c {
                'W' => Ok(Outcome::Win),
                'T' => Ok(Outcome::Tie),
                'L' => Ok(Outcome::Loss),
                _ => Err(format!("k-of-m window {s:?}: {c:?} is not W, T or L")),
            })
            .collect::<Result<VecDeque<_>, _>>()
            .map(Window)
    }
}

impl FromIterator<Outcome> for Window {
    /// The scored outcomes of `iter`, oldest first (no length limit).
    fn from_iter<I: IntoIterator<Item = Outcome>>(iter: I) -> Self {
        Window(iter.into_iter().filter(|o| *o != Outcome::Unscored).collect())
    }
}

/// What the checkpoint stores: the settings, every task's level (by task id, sorted, so the
/// serialised form is deterministic) and, with `k-of-m`, the non-empty windows. The k-of-m
/// fields are absent from the serialised form of the other rules, which is the same as before
/// they existed (and a state saved before them reads with them empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurriculumState {
    pub mode: CurriculumMode,
    pub advance_rule: AdvanceRule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advance_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advance_window: Option<usize>,
    pub levels: BTreeMap<String, usize>,
    /// k-of-m: each task's window at its current level; a task without an entry has an empty one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub windows: BTreeMap<String, Window>,
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
    /// `reward.reference = "group"`: no ladder. Tasks may have no references (their top is 0),
    /// [`advance`](Self::advance) never moves a level and no task counts as at its top.
    off: bool,
}

impl Curriculum {
    /// Every task at level 0 (and, with k-of-m, an empty window). Each task needs at least one
    /// reference; the config must pass [`CurriculumConfig::validate`].
    pub fn new(cfg: &CurriculumConfig, tasks: &[Task]) -> Result<Self> {
        Self::new_for(cfg, tasks, Reference::Ladder)
    }

    /// As [`new`](Self::new) for the given `reward.reference`: with `group` the curriculum is off
    /// and tasks need no references.
    pub fn new_for(cfg: &CurriculumConfig, tasks: &[Task], reference: Reference) -> Result<Self> {
        cfg.check()?;
        let off = reference == Reference::Group;
        let tops = tops(tasks, off)?;
        let levels = tops.keys().map(|id| (id.clone(), 0)).collect();
        Ok(Self {
            state: CurriculumState {
                mode: cfg.mode,
                advance_rule: cfg.advance_rule,
                advance_k: cfg.advance_k,
                advance_window: cfg.advance_window,
                levels,
                windows: BTreeMap::new(),
            },
            tops,
            off,
        })
    }

    /// Restores a saved state for these tasks. Refused when the task set differs (ids added or
    /// missing), a saved level is past its task's top, the settings changed (k and m included),
    /// or a saved window could not have been left by [`advance`](Self::advance).
    pub fn restore(cfg: &CurriculumConfig, tasks: &[Task], state: CurriculumState) -> Result<Self> {
        Self::restore_for(cfg, tasks, state, Reference::Ladder)
    }

    /// As [`restore`](Self::restore) for the given `reward.reference` (see [`new_for`](Self::new_for)).
    /// With `group` the saved levels are kept as they are (never moved), so a run switched back to
    /// the ladder finds them.
    pub fn restore_for(cfg: &CurriculumConfig, tasks: &[Task], state: CurriculumState, reference: Reference) -> Result<Self> {
        cfg.check()?;
        let off = reference == Reference::Group;
        let tops = tops(tasks, off)?;
        if state.mode != cfg.mode || state.advance_rule != cfg.advance_rule {
            bail!(
                "curriculum: the checkpoint was made with mode {:?} / advance_rule {:?}, the config says {:?} / {:?}",
                state.mode, state.advance_rule, cfg.mode, cfg.advance_rule
            );
        }
        if (state.advance_k, state.advance_window) != (cfg.advance_k, cfg.advance_window) {
            let show = |v: Option<usize>| v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into());
            bail!(
                "curriculum: the checkpoint was made with advance_k {} / advance_window {}, the config says {} / {}",
                show(state.advance_k), show(state.advance_window), show(cfg.advance_k), show(cfg.advance_window)
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
        for (id, w) in &state.windows {
            let (Some(k), Some(m)) = (state.advance_k, state.advance_window) else {
                bail!("curriculum: the checkpoint holds a k-of-m window for task {id:?} but advance_rule is {:?}", state.advance_rule);
            };
            let Some(&level) = state.levels.get(id) else {
                bail!("curriculum: saved window of task {id:?}, which has no saved level");
            };
            if w.is_empty() || w.len() > m || w.wins() >= k || level == tops[id] {
                bail!(
                    "curriculum: saved window {:?} of task {id:?} (level {level}, top {}) cannot come from {k}-of-{m}",
                    String::from(w.clone()),
                    tops[id]
                );
            }
        }
        Ok(Self { state, tops, off })
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

    /// The k-of-m window of `task_id` at its current level (empty for the other rules).
    pub fn window(&self, task_id: &str) -> Option<&Window> {
        self.state.windows.get(task_id)
    }

    /// Applies one step's outcomes. Outcomes of one task may appear in several entries; they are
    /// pooled, and the task moves at most one level. Unknown task ids are an error (nothing is
    /// changed then).
    ///
    /// k-of-m: the task's scored outcomes enter its window in the order given (entries in order,
    /// each entry's outcomes in order); the task moves as soon as the window holds k wins. Its
    /// window is then emptied, and the step's remaining outcomes are dropped: they were judged
    /// against the level it has left. A task at its top keeps no window.
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
        if self.off {
            return Ok(self.metrics(0));
        }
        if self.state.mode == CurriculumMode::Dynamic && self.state.advance_rule == AdvanceRule::KOfM {
            let (k, m) = self.k_of_m();
            for (id, outcomes) in pooled {
                let level = self.state.levels.get_mut(id).expect("every task has a level");
                if *level >= self.tops[id] {
                    continue;
                }
                let window = self.state.windows.entry(id.to_string()).or_default();
                let mut moved = false;
                for &o in &outcomes {
                    window.push(o, m);
                    if window.wins() >= k {
                        moved = true;
                        break;
                    }
                }
                if moved {
                    *level += 1;
                    advanced += 1;
                }
                if moved || window.is_empty() {
                    self.state.windows.remove(id);
                }
            }
        } else if self.state.mode == CurriculumMode::Dynamic {
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

    /// (k, m) of a k-of-m state; [`new`](Self::new) and [`restore`](Self::restore) checked both.
    fn k_of_m(&self) -> (usize, usize) {
        match (self.state.advance_k, self.state.advance_window) {
            (Some(k), Some(m)) => (k, m),
            _ => unreachable!("k-of-m without advance_k / advance_window passed the config check"),
        }
    }

    /// Level histogram and share at the top, with `advanced` as given.
    pub fn metrics(&self, advanced: usize) -> CurriculumMetrics {
        let max_top = self.tops.values().copied().max().unwrap_or(0);
        let mut histogram = vec![0; max_top + 1];
        let mut at_top = 0;
        for (id, &top) in &self.tops {
            let l = self.level(id).expect("known task");
            histogram[l] += 1;
            at_top += usize::from(l == top && !self.off);
        }
        CurriculumMetrics {
            histogram,
            advanced,
            at_top,
            share_at_top: at_top as f64 / self.tops.len().max(1) as f64,
        }
    }
}

/// Top level per task id. `off` (no ladder): a task without references has top 0.
fn tops(tasks: &[Task], off: bool) -> Result<HashMap<String, usize>> {
    let mut tops = HashMap::with_capacity(tasks.len());
    for t in tasks {
        let Some(top) = t.top_level().or(off.then_some(0)) else {
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

pub mod sim;

#[cfg(test)]
mod tests;
