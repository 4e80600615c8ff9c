//! Writing tasks: a prompt, its reference ladder (weakest..strongest) and optional criteria.
//!
//! The native format is JSONL, one [`Task`] per line. Importers turn the official Writing-RL
//! parquet ([`parquet`]) and WritingBench's `benchmark_all.jsonl` ([`writingbench`]) into it.
//! Every reader fails on the first bad line or row and names it (`FILE:LINE`, `FILE: row N`).

#[cfg(feature = "parquet")]
pub mod parquet;
pub mod sampler;
pub mod writingbench;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Deserializer, Serialize};

use crate::validate::Problems;

pub use sampler::{SamplerCursor, TaskSampler};

/// One writing task. `references` go from the weakest to the strongest answer: the curriculum
/// starts every task at index 0 and walks up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    #[serde(deserialize_with = "string_or_integer")]
    pub id: String,
    pub prompt: String,
    #[serde(default)]
    pub references: Vec<String>,
    /// Judging criteria (a WritingBench checklist, for instance), given to the judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criteria: Option<String>,
    /// System message for the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Metadata kept from imports (WritingBench domain1 / domain2 / language); not used in training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdomain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
}

impl Task {
    pub fn new(id: impl Into<String>, prompt: impl Into<String>, references: Vec<String>) -> Self {
        Self {
            id: id.into(),
            prompt: prompt.into(),
            references,
            criteria: None,
            system: None,
            domain: None,
            subdomain: None,
            lang: None,
        }
    }

    /// Content checks shared by every reader; the caller adds the location.
    pub fn check(&self, need_references: bool) -> std::result::Result<(), String> {
        if self.id.trim().is_empty() {
            return Err("empty id".into());
        }
        if self.prompt.trim().is_empty() {
            return Err(format!("task {:?}: empty prompt", self.id));
        }
        if need_references && self.references.is_empty() {
            return Err(format!(
                "task {:?}: no references (at least one is required with reward.reference = \"ladder\"; \
                 reward.reference = \"group\" needs none)",
                self.id
            ));
        }
        if let Some(i) = self.references.iter().position(|r| r.trim().is_empty()) {
            return Err(format!("task {:?}: references[{i}] is empty", self.id));
        }
        Ok(())
    }

    /// The ladder's top index, or None for a task without references.
    pub fn top_level(&self) -> Option<usize> {
        self.references.len().checked_sub(1)
    }
}

/// Accepts `"id": "abc"` and `"id": 17` (datasets often number their rows).
pub(crate) fn string_or_integer<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        I(i64),
        U(u64),
    }
    match Id::deserialize(d).map_err(|_| serde::de::Error::custom("id must be a string or an integer"))? {
        Id::S(s) => Ok(s),
        Id::I(i) => Ok(i.to_string()),
        Id::U(u) => Ok(u.to_string()),
    }
}

/// Whether a reader insists on at least one reference per task (`run` does; `select` and
/// `generate` do not, they build or ignore ladders).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum References {
    Required,
    Optional,
}

/// Reads native task JSONL. Blank lines are skipped; every other bad line is an error naming
/// `FILE:LINE`; duplicate ids are errors naming both lines.
pub fn read_tasks(path: &Path, refs: References) -> Result<Vec<Task>> {
    let mut ids = crate::jsonl::UniqueIds::default();
    let mut tasks = Vec::new();
    for (lineno, task) in crate::jsonl::read_records::<Task>(path, "a task", "tasks")? {
        task.check(refs == References::Required)
            .map_err(|e| anyhow::anyhow!("{}:{lineno}: {e}", path.display()))?;
        ids.insert(path, lineno, &task.id)?;
        tasks.push(task);
    }
    Ok(tasks)
}

/// Writes tasks as JSONL atomically: the file is the old one or the complete new one.
/// Checks ids are unique and contents valid first, so nothing bad is ever written.
pub fn write_tasks(path: &Path, tasks: &[Task], refs: References) -> Result<()> {
    let mut seen = HashSet::new();
    for (i, t) in tasks.iter().enumerate() {
        t.check(refs == References::Required)
            .map_err(|e| anyhow::anyhow!("task #{i} for {}: {e}", path.display()))?;
        if !seen.insert(t.id.as_str()) {
            bail!("task #{i} for {}: duplicate id {:?}", path.display(), t.id);
        }
    }
    crate::fsutil::atomic_write_with(path, |w| {
        for t in tasks {
            serde_json::to_writer(&mut *w, t)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// `[data]`: where the training tasks live.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Native task JSONL for `run` (every task needs at least one reference, unless
    /// `reward.reference = "group"`).
    pub tasks: Option<PathBuf>,
    /// Optional held-out tasks for evaluation.
    pub eval_tasks: Option<PathBuf>,
}

impl DataConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.tasks, &mut self.eval_tasks].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    pub fn validate(&self, key: &str, p: &mut Problems) {
        for (name, path) in [("tasks", &self.tasks), ("eval_tasks", &self.eval_tasks)] {
            if let Some(path) = path {
                if !path.is_file() {
                    p.push(&format!("{key}.{name}"), format!("{} is not a file", path.display()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        let mut t = Task::new("a", "Write a poem.", vec!["weak".into(), "strong".into()]);
        t.criteria = Some("rhyme".into());
        write_tasks(&p, &[t.clone(), Task::new("b", "Essay.", vec!["x".into()])], References::Required)
            .unwrap();
        let back = read_tasks(&p, References::Required).unwrap();
        assert_eq!(back[0], t);
        assert_eq!(back[1].id, "b");

        let bad = |text: &str, refs: References| -> String {
            std::fs::write(&p, text).unwrap();
            format!("{:#}", read_tasks(&p, refs).unwrap_err())
        };
        let e = bad("{\"id\":1,\"prompt\":\"p\",\"references\":[\"r\"]}\n\n{\"id\":\"1\",\"prompt\":\"q\",\"references\":[\"r\"]}\n", References::Required);
        assert!(e.contains("t.jsonl:3: duplicate id \"1\" (first on line 1)"), "{e}");
        let e = bad("{\"id\":\"a\",\"prompt\":\"  \"}\n", References::Optional);
        assert!(e.contains("t.jsonl:1:") && e.contains("empty prompt"), "{e}");
        let e = bad("{\"id\":\"a\",\"prompt\":\"p\"}\n", References::Required);
        assert!(e.contains("t.jsonl:1:") && e.contains("no references"), "{e}");
        let e = bad("{\"id\":\"a\",\"prompt\":\"p\",\"references\":[\"r\",\"\"]}\n", References::Required);
        assert!(e.contains("references[1] is empty"), "{e}");
        let e = bad("{\"id\":\"a\",\"prompt\":\"p\"}\n{\"id\":\"b\",\"prompt\":\"p\",\"refs\":[]}\n", References::Optional);
        assert!(e.contains("t.jsonl:2:") && e.contains("refs"), "{e}");
        let e = bad("{\"id\":\"a\",\"prompt\":\"p\"}\n{\"id\":\"b\",\n", References::Optional);
        assert!(e.contains("t.jsonl:2:"), "{e}");
        let e = bad("{\"id\":[1],\"prompt\":\"p\"}\n", References::Optional);
        assert!(e.contains("t.jsonl:1:") && e.contains("id must be a string or an integer"), "{e}");
        let e = bad("\n\n", References::Optional);
        assert!(e.contains("no tasks"), "{e}");
    }

    #[test]
    fn write_refuses_bad_tasks_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(&p, "old\n").unwrap();
        let ts = vec![Task::new("a", "p", vec![]), Task::new("a", "q", vec![])];
        let e = format!("{:#}", write_tasks(&p, &ts, References::Optional).unwrap_err());
        assert!(e.contains("duplicate id"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "old\n");
    }
}
