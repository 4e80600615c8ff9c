//! Metrics as JSON lines, one object per step, appended and flushed as each step ends.
//!
//! On resume from checkpoint step S the file is first cut back to the lines with step <= S
//! (atomically), so steps that ran after the checkpoint and are about to run again never appear
//! twice. With TensorBoard logging on, each line also goes to the run's event file, rebuilt
//! from the kept lines on open (see [`crate::tensorboard`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
    events: Option<crate::tensorboard::EventLog>,
}

impl MetricsWriter {
    /// Opens `path` for appending, first dropping every line whose `step` is greater than
    /// `resume_step` when resuming.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        if let (Some(limit), true) = (resume_step, path.exists()) {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let mut kept = String::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = match serde_json::from_str(line) {
                    Ok(v) => v,
                    // A line cut by a crash mid-write can only be the last one.
                    Err(_) if i + 1 == text.lines().count() => continue,
                    Err(e) => anyhow::bail!("{}:{}: not JSON: {e}", path.display(), i + 1),
                };
                if v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s <= limit) {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            crate::fsutil::atomic_write(path, kept.as_bytes())?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), file, events: None })
    }

    /// Mirrors every line into a TensorBoard event file in `dir`, started over from the lines
    /// the file holds now (so call it after `open` has cut them back). With `enabled = false`,
    /// event files left by earlier sessions of the run are removed instead: they could hold
    /// rolled-back steps. Returns the event file.
    pub fn tensorboard(&mut self, dir: &Path, enabled: bool) -> Result<Option<PathBuf>> {
        if !enabled {
            let n = crate::tensorboard::remove_all(dir)?;
            if n > 0 {
                eprintln!("run.tensorboard = false: removed {n} event file(s) of earlier sessions of this run");
            }
            return Ok(None);
        }
        let text = if self.path.exists() {
            std::fs::read_to_string(&self.path).with_context(|| format!("reading {}", self.path.display()))?
        } else {
            String::new()
        };
        // Complete lines only (a torn last one is not history).
        let complete = &text[..text.rfind('\n').map(|i| i + 1).unwrap_or(0)];
        let history: Vec<&str> = complete.lines().filter(|l| !l.trim().is_empty()).collect();
        let log = crate::tensorboard::EventLog::open(dir, &history)?;
        let p = log.path().to_path_buf();
        self.events = Some(log);
        Ok(Some(p))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a single write and syncs it.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        if let Some(e) = &mut self.events {
            e.write(std::str::from_utf8(&line)?.trim_end())?;
        }
        Ok(())
    }
}

/// Reads a metrics file back (for reports and tests).
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1)))
        .collect()
}

/// Reads a metrics file that may be growing (a run still writing it) or was cut by a crash:
/// a last line without its newline is left out; any other bad line is an error naming it.
pub fn read_jsonl_lenient(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resume_drops_steps_after_the_checkpoint_and_a_torn_last_line() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("metrics.jsonl");
        let mut w = MetricsWriter::open(&p, None).unwrap();
        for s in 1..=5 {
            w.write(&json!({"step": s, "reward": 0.5})).unwrap();
        }
        drop(w);
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"{\"step\": 6, \"rew").unwrap();
        let mut w = MetricsWriter::open(&p, Some(3)).unwrap();
        w.write(&json!({"step": 4, "reward": 1.0})).unwrap();
        let steps: Vec<u64> = read_jsonl(&p).unwrap().iter().map(|v| v["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
    }
}
