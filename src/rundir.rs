//! The run directory: `runs/<name>/` with the resolved config, metrics, samples and checkpoints.
//!
//! The resolved config is saved as `config.json` (it holds the *names* of secret environment
//! variables, never their values). On resume the new config is compared with the saved one key
//! by key; a change is refused unless every changed key is under a prefix the user allowed
//! (`--allow-config-change judge.openai.base_url,judge.openai.timeout_secs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::Config;

pub const CONFIG_FILE: &str = "config.json";
pub const LEARNER_DIR: &str = "learner";
pub const POLICY_DIR: &str = "policy";

/// One changed leaf: (dotted key, saved value, new value); `None` where a side lacks the key.
pub type Change = (String, Option<Value>, Option<Value>);

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// Key-by-key differences between two configs as JSON values.
pub fn diff(saved: &Value, new: &Value) -> Vec<Change> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", saved, &mut a);
    flatten("", new, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), a.get(k).cloned(), b.get(k).cloned()))
        .collect()
}

/// A saved config read through today's `Config`, so keys added since it was saved take their
/// defaults and are no change unless the new config sets them otherwise (a run started before
/// an upgrade resumes without flags). A config that no longer reads (a removed key) is compared
/// as it is.
fn with_defaults(saved: Value) -> Value {
    serde_json::from_value::<Config>(saved.clone()).ok().and_then(|c| serde_json::to_value(c).ok()).unwrap_or(saved)
}

/// Whether `key` is `prefix` or lies under it.
fn allowed_by(key: &str, prefix: &str) -> bool {
    key == prefix || key.starts_with(&format!("{prefix}."))
}

pub fn render(changes: &[Change]) -> String {
    let show = |v: &Option<Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "(absent)".into());
    changes
        .iter()
        .map(|(k, a, b)| format!("  {k}: {} -> {}", show(a), show(b)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// sha256 of the config's canonical JSON (object keys sorted by serde_json's map).
pub fn config_hash(cfg: &Config) -> Result<String> {
    let v = serde_json::to_value(cfg)?;
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&v)?);
    Ok(format!("{:x}", h.finalize()))
}

pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Opens (or creates) the run directory for `cfg`. A saved config that differs is shown as
    /// a diff and refused unless each changed key is covered by `allow`.
    pub fn open(root: &Path, cfg: &Config, allow: &[String]) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating run directory {}", root.display()))?;
        let path = root.join(CONFIG_FILE);
        let new = serde_json::to_value(cfg)?;
        if path.exists() {
            let saved: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("{}: unreadable saved config", path.display()))?;
            let changes = diff(&with_defaults(saved), &new);
            let refused: Vec<Change> = changes
                .iter()
                .filter(|(k, _, _)| !allow.iter().any(|p| allowed_by(k, p)))
                .cloned()
                .collect();
            if !refused.is_empty() {
                bail!(
                    "the config differs from the one this run was started with ({}):\n{}\n\
                     resume with --allow-config-change KEY[,KEY...] naming what may change, or use a new run directory",
                    path.display(),
                    render(&refused)
                );
            }
            if !changes.is_empty() {
                eprintln!("config changes allowed on resume:\n{}", render(&changes));
            }
        }
        crate::fsutil::atomic_write(&path, &serde_json::to_vec_pretty(&new)?)?;
        Ok(Self { root: root.to_path_buf() })
    }
}

/// What a run leaves where, as (what, path or command) lines for the end of `orchestrator run`:
/// only what exists.
pub fn outputs(root: &Path) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    if crate::tensorboard::event_files(root).map(|f| !f.is_empty()).unwrap_or(false) {
        v.push(("TensorBoard", format!("tensorboard --logdir {}", root.display())));
    }
    let metrics = root.join("metrics.jsonl");
    if metrics.is_file() {
        v.push(("metrics", metrics.display().to_string()));
        v.push(("plots", format!("orchestrator report {}", root.display())));
    }
    for (what, dir) in [("samples", "samples"), ("checkpoints", "checkpoints")] {
        let d = root.join(dir);
        if d.is_dir() {
            v.push((what, d.display().to_string()));
        }
    }
    if let Ok(latest) = std::fs::read_to_string(root.join("checkpoints/latest")) {
        v.push(("latest checkpoint", root.join("checkpoints").join(latest.trim()).display().to_string()));
    }
    v
}

/// The checkpoint `arg` names: a run directory's newest complete checkpoint (one that does not
/// verify is reported and skipped), or a checkpoint directory (verified). None when `arg` is
/// neither (an HF model directory, for instance).
pub fn checkpoint_of(arg: &Path) -> Result<Option<PathBuf>> {
    if arg.join("checkpoints").is_dir() {
        let (found, warnings) = crate::checkpoint::Checkpoints::open(arg.join("checkpoints"))?.latest_valid()?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        return Ok(Some(found.with_context(|| format!("run {} has no complete checkpoint", arg.display()))?.0));
    }
    if arg.join(crate::checkpoint::MANIFEST).is_file() {
        crate::checkpoint::Checkpoints::verify(arg)?;
        return Ok(Some(arg.to_path_buf()));
    }
    Ok(None)
}

/// The learner of checkpoint `ckpt` (of a run directory `<run>/checkpoints/step-N`, already
/// verified by the caller), built from the run's saved config and restored.
pub fn checkpoint_learner(ckpt: &Path) -> Result<crate::learner::Learner> {
    let ckpt = &ckpt.canonicalize().with_context(|| format!("resolving {}", ckpt.display()))?;
    let run = ckpt
        .parent()
        .and_then(|p| p.parent())
        .with_context(|| format!("{}: not inside a run directory", ckpt.display()))?;
    let cfg_path = run.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let cfg: Config = serde_json::from_str(&text).with_context(|| format!("parsing {}", cfg_path.display()))?;
    let mut learner = crate::learner::Learner::new(&cfg.learner, &cfg.model.path, cfg.run.seed)?;
    learner.load(&ckpt.join(LEARNER_DIR))?;
    Ok(learner)
}

/// Writes the policy of checkpoint `ckpt` (verified by the caller) as an HF model directory with
/// merged weights at `out`, for `eval` or serving elsewhere.
pub fn export_checkpoint(ckpt: &Path, out: &Path) -> Result<()> {
    checkpoint_learner(ckpt)?.export(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A key added after the run was saved is no change at its default, a change otherwise.
    #[test]
    fn keys_added_since_a_run_was_saved_take_their_defaults() {
        let cfg: Config = serde_json::from_value(json!({"model": {"path": "/m"}})).unwrap();
        let mut saved = serde_json::to_value(&cfg).unwrap();
        saved["learner"].as_object_mut().unwrap().remove("is_cap");
        saved["learner"].as_object_mut().unwrap().remove("max_skipped_steps");
        let new = serde_json::to_value(&cfg).unwrap();
        assert_eq!(diff(&saved, &new).len(), 2, "raw: both keys look added");
        assert!(diff(&with_defaults(saved.clone()), &new).is_empty());
        let mut changed = new.clone();
        changed["learner"]["is_cap"] = json!(3.0);
        let d = diff(&with_defaults(saved), &changed);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, "learner.is_cap");
    }

    #[test]
    fn diff_lists_changed_added_and_removed_leaves() {
        let a = json!({"judge": {"openai": {"base_url": "http://a", "timeout_secs": 30}}, "run": {"seed": 1}});
        let b = json!({"judge": {"openai": {"base_url": "http://b", "timeout_secs": 30}}, "run": {"seed": 1, "steps": 5}});
        let d = diff(&a, &b);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].0, "judge.openai.base_url");
        assert_eq!(d[1], ("run.steps".into(), None, Some(json!(5))));
        assert!(allowed_by("judge.openai.base_url", "judge.openai"));
        assert!(allowed_by("judge.openai.base_url", "judge.openai.base_url"));
        assert!(!allowed_by("judge.openai_x", "judge.openai"));
    }
}
