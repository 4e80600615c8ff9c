//! Answer files for `select`: the lines `orchestrator generate` writes (`id`, `sample`,
//! `response`, `source`, ...; other fields ignored). Policy answers and candidate answers come in
//! separate files, so one model's own samples can serve as either.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One answer to one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub task_id: String,
    pub text: String,
    /// Who wrote it (generate's `source`; the file name when absent).
    pub source: String,
    pub sample: usize,
    /// `FILE:LINE`, for messages.
    pub origin: String,
}

#[derive(Debug, Deserialize)]
struct Line {
    #[serde(deserialize_with = "crate::data::string_or_integer")]
    id: String,
    response: String,
    #[serde(default)]
    sample: usize,
    #[serde(default)]
    source: Option<String>,
}

/// Reads one answer file. Bad lines fail with `FILE:LINE`; the same (id, source, sample) twice is
/// an error naming both lines.
pub fn read_answers(path: &Path) -> Result<Vec<Answer>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let mut out = Vec::new();
    let mut seen: HashMap<(String, String, usize), usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(raw).map_err(|e| {
            anyhow::anyhow!("{}:{lineno}: not an answer line (id, response, sample?, source?): {e}", path.display())
        })?;
        if l.id.trim().is_empty() {
            bail!("{}:{lineno}: empty id", path.display());
        }
        let source = l.source.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| stem.clone());
        let key = (l.id.clone(), source.clone(), l.sample);
        if let Some(first) = seen.insert(key, lineno) {
            bail!(
                "{}:{lineno}: task {:?} source {source:?} sample {} appears twice (first on line {first})",
                path.display(),
                l.id,
                l.sample
            );
        }
        out.push(Answer {
            task_id: l.id,
            text: l.response,
            source,
            sample: l.sample,
            origin: format!("{}:{lineno}", path.display()),
        });
    }
    if out.is_empty() {
        bail!("{}: no answers", path.display());
    }
    Ok(out)
}
