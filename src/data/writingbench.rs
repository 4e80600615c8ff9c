//! WritingBench `benchmark_all.jsonl` -> tasks without references (ladders come from `select`).
//!
//! A line holds `index`, `domain1`, `domain2`, `query`, `checklist` (criteria, each an object with
//! `name`, `criteria_description` and score bands such as `"1-2"`, or a plain string) and, in
//! some releases, `lang`. The file shipped in inspect-evals 0.26.0 has no `lang`: there the
//! language is inferred, `zh` when the query contains a CJK ideograph, `en` otherwise (545 of its
//! 1,000 queries are then `en`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::Task;

#[derive(Debug, Deserialize)]
struct Line {
    #[serde(deserialize_with = "super::string_or_integer")]
    index: String,
    #[serde(default)]
    domain1: Option<String>,
    #[serde(default)]
    domain2: Option<String>,
    #[serde(default)]
    lang: Option<String>,
    query: String,
    #[serde(default)]
    checklist: Vec<serde_json::Value>,
}

/// `zh` if `text` contains a CJK unified ideograph, else `en`.
pub fn infer_lang(text: &str) -> &'static str {
    let cjk = |c: char| matches!(c, '\u{4e00}'..='\u{9fff}' | '\u{3400}'..='\u{4dbf}' | '\u{f900}'..='\u{faff}');
    if text.chars().any(cjk) { "zh" } else { "en" }
}

/// One checklist item as judge-readable text: `name: description` then its score bands.
fn criterion_text(v: &serde_json::Value) -> std::result::Result<String, String> {
    match v {
        serde_json::Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        serde_json::Value::Object(m) => {
            let get = |k: &str| m.get(k).and_then(|v| v.as_str()).map(str::trim).filter(|s| !s.is_empty());
            let name = get("name");
            let desc = get("criteria_description").or_else(|| get("description"));
            let mut out = match (name, desc) {
                (Some(n), Some(d)) => format!("{n}: {d}"),
                (Some(n), None) => n.to_string(),
                (None, Some(d)) => d.to_string(),
                (None, None) => return Err("checklist item has neither `name` nor `criteria_description`".into()),
            };
            for band in ["1-2", "3-4", "5-6", "7-8", "9-10"] {
                if let Some(t) = get(band) {
                    out.push_str(&format!("\n   {band}: {t}"));
                }
            }
            Ok(out)
        }
        other => Err(format!("checklist item must be a non-empty string or an object, got {other}")),
    }
}

/// Reads WritingBench JSONL. `langs` empty keeps every language; otherwise only tasks whose
/// (given or inferred) language is listed. Ids are `wb-<index>`.
pub fn read(path: &Path, langs: &[String]) -> Result<Vec<Task>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut tasks = Vec::new();
    let mut seen = std::collections::HashMap::new();
    let mut total = 0usize;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let at = |msg: String| anyhow::anyhow!("{}:{lineno}: {msg}", path.display());
        let line: Line = serde_json::from_str(raw).map_err(|e| at(format!("not a WritingBench line: {e}")))?;
        total += 1;
        if line.query.trim().is_empty() {
            return Err(at(format!("index {}: empty query", line.index)));
        }
        if let Some(first) = seen.insert(line.index.clone(), lineno) {
            return Err(at(format!("duplicate index {} (first on line {first})", line.index)));
        }
        let mut criteria = Vec::new();
        for (k, item) in line.checklist.iter().enumerate() {
            let t = criterion_text(item).map_err(|e| at(format!("checklist[{k}]: {e}")))?;
            criteria.push(format!("{}. {t}", k + 1));
        }
        let lang = line
            .lang
            .clone()
            .filter(|l| !l.trim().is_empty())
            .unwrap_or_else(|| infer_lang(&line.query).to_string());
        if !langs.is_empty() && !langs.iter().any(|l| l.eq_ignore_ascii_case(&lang)) {
            continue;
        }
        let mut task = Task::new(format!("wb-{}", line.index), line.query, Vec::new());
        task.criteria = (!criteria.is_empty()).then(|| criteria.join("\n"));
        task.domain = line.domain1;
        task.subdomain = line.domain2;
        task.lang = Some(lang);
        tasks.push(task);
    }
    if total == 0 {
        bail!("{}: no lines", path.display());
    }
    if tasks.is_empty() {
        bail!("{}: none of its {total} tasks is in language(s) {}", path.display(), langs.join(","));
    }
    Ok(tasks)
}
