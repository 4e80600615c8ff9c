//! JSON-lines input shared by the commands: blank lines are skipped, every bad line is an
//! error naming `FILE:LINE`, and ids are unique within a file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

/// Every non-blank line of `path` parsed as `T`, with its 1-based line number. `what` names one
/// record in errors ("a task"), `plural` the file's content when it has none ("tasks").
pub fn read_records<T: DeserializeOwned>(path: &Path, what: &str, plural: &str) -> Result<Vec<(usize, T)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: not {what}: {e}", path.display(), i + 1))?;
        out.push((i + 1, record));
    }
    if out.is_empty() {
        bail!("{}: no {plural}", path.display());
    }
    Ok(out)
}

/// Hands out record ids, refusing one already seen in the same file.
#[derive(Default)]
pub struct UniqueIds {
    first_line: HashMap<String, usize>,
}

impl UniqueIds {
    /// Registers `id` seen on `lineno`.
    pub fn insert(&mut self, path: &Path, lineno: usize, id: &str) -> Result<()> {
        if let Some(first) = self.first_line.insert(id.to_string(), lineno) {
            bail!("{}:{lineno}: duplicate id {id:?} (first on line {first})", path.display());
        }
        Ok(())
    }

    /// An optional JSON id (string or number) or `line-N`, registered as above.
    pub fn from_json(&mut self, path: &Path, lineno: usize, id: Option<&serde_json::Value>) -> Result<String> {
        let id = match id {
            None => format!("line-{lineno}"),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(other) => bail!("{}:{lineno}: id must be a string or number, got {other}", path.display()),
        };
        self.insert(path, lineno, &id)?;
        Ok(id)
    }
}
