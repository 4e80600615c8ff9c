//! The official Writing-RL training parquet (verl layout) -> tasks, read as it is.
//!
//! Columns used: `prompt` (chat messages `[{role, content}]`: the system message becomes
//! `system`, the single user message the task prompt) and `reward_model.ground_truth`
//! (`{prompt, target, criteria, id}`, `target` being the references in increasing quality, or one
//! string). Other columns (`data_source`, `ability`, `extra_info`, ...) are ignored. Rows are
//! named by their 0-based position, as pandas' `df.iloc[n]` would.
//!
//! Reading goes through the parquet crate's record API (no arrow): each row becomes a JSON value
//! and then a typed struct, so a malformed field is reported with its path.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::Deserialize;

use super::Task;

#[derive(Debug, Deserialize)]
struct Row {
    #[serde(default)]
    prompt: Option<PromptField>,
    reward_model: RewardModel,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Messages(Vec<Message>),
    Text(String),
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
struct RewardModel {
    /// A struct, or (in some verl datasets) the same struct as JSON text.
    ground_truth: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct GroundTruth {
    #[serde(default)]
    prompt: Option<String>,
    target: OneOrMany,
    #[serde(default)]
    criteria: Option<OneOrMany>,
    #[serde(default, deserialize_with = "opt_id")]
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn opt_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct W(#[serde(deserialize_with = "super::string_or_integer")] String);
    Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
}

/// Deserialises with the failing key path (prefixed by `prefix`) and a hint for untagged fields.
fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value, prefix: &str) -> std::result::Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." {
            prefix.trim_end_matches('.').to_string()
        } else {
            format!("{prefix}{inner}")
        };
        let path = if path.is_empty() { "(row)".to_string() } else { path };
        // Untagged enums only say "did not match any variant": name what was expected.
        let hint = match path.as_str() {
            p if p.ends_with("target") => " (expected a string or a list of strings)",
            p if p.ends_with("criteria") => " (expected a string or a list of strings)",
            "prompt" => " (expected chat messages [{role, content}] or a string)",
            _ => "",
        };
        format!("{path}: {}{hint}", e.inner())
    })
}

fn to_task(value: serde_json::Value, row: usize) -> std::result::Result<Task, String> {
    let r: Row = typed(value, "")?;
    let gt: GroundTruth = match r.reward_model.ground_truth {
        serde_json::Value::String(s) => {
            let v: serde_json::Value = serde_json::from_str(&s)
                .map_err(|e| format!("reward_model.ground_truth: text is not JSON: {e}"))?;
            typed(v, "reward_model.ground_truth (JSON text).")?
        }
        v => typed(v, "reward_model.ground_truth.")?,
    };
    let (mut system, mut user) = (None, None);
    match r.prompt {
        Some(PromptField::Messages(msgs)) => {
            for (k, m) in msgs.into_iter().enumerate() {
                match m.role.as_str() {
                    "system" if system.is_none() => system = Some(m.content),
                    "user" if user.is_none() => user = Some(m.content),
                    role => {
                        return Err(format!(
                            "prompt[{k}]: unexpected {role:?} message (one system and one user message are supported)"
                        ))
                    }
                }
            }
        }
        Some(PromptField::Text(s)) => user = Some(s),
        None => {}
    }
    let prompt = user
        .or(gt.prompt)
        .ok_or_else(|| "no user message in `prompt` and no reward_model.ground_truth.prompt".to_string())?;
    let references = match gt.target {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    let mut task = Task::new(gt.id.unwrap_or_else(|| format!("row-{row}")), prompt, references);
    task.system = system.filter(|s| !s.trim().is_empty());
    task.criteria = match gt.criteria {
        Some(OneOrMany::One(s)) => Some(s),
        Some(OneOrMany::Many(v)) => Some(v.join("\n")),
        None => None,
    }
    .filter(|s| !s.trim().is_empty());
    task.check(true)?;
    Ok(task)
}

/// Reads every row; the first bad one fails the whole read with `FILE: row N (0-based): ...`.
pub fn read(path: &Path) -> Result<Vec<Task>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow!("{}: not a readable parquet file: {e}", path.display()))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| anyhow!("{}: reading rows: {e}", path.display()))?;
    let mut tasks = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (n, row) in rows.enumerate() {
        let at = |msg: String| anyhow!("{}: row {n} (0-based): {msg}", path.display());
        let row = row.map_err(|e| at(format!("decoding: {e}")))?;
        let task = to_task(row.to_json_value(), n).map_err(at)?;
        if let Some(first) = seen.insert(task.id.clone(), n) {
            return Err(at(format!("duplicate id {:?} (first in row {first})", task.id)));
        }
        tasks.push(task);
    }
    if tasks.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(tasks)
}
