//! Weight versions: what the pool serves, and the names pushed weights go under. A name is
//! never reused for other weights (vLLM's prefix cache outlives an unload), so a LoRA adapter is
//! named by a hash of its files and full weights by this process.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::config::{RemoteConfig, WeightPush, VERSION_PREFIX};

/// The version name of the learner's weights after `step` steps (the export directory's
/// name; the servers load it under [`versioned_name`]).
pub fn version_name(step: u64) -> String {
    format!("{VERSION_PREFIX}{step:06}")
}

/// The name a version is served under: `policy-vNNNNNN-<tag>`.
pub fn versioned_name(step: u64, tag: &str) -> String {
    format!("{}-{tag}", version_name(step))
}

/// The first 12 hex digits of a SHA-256 over the regular files of `dir` (names, sizes and
/// contents, in name order): equal only for equal adapters.
pub fn content_hash(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect())
}

/// The weights new generations use.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Version {
    /// The version's name: the LoRA name generations ask for (`weight_push = "lora"`) or the
    /// `weight_version` every reply must carry (`"disk"`); None = the base model as started.
    pub(super) name: Option<String>,
    /// What a (re)joining server must load: the adapter or the full directory.
    pub(super) dir: Option<PathBuf>,
    /// Whether `name` is a LoRA name (else a full-weight version or nothing).
    pub(super) lora: bool,
    pub(super) step: u64,
}

impl Version {
    pub(super) fn lora(&self) -> Option<&str> {
        if self.lora {
            self.name.as_deref()
        } else {
            None
        }
    }

    /// The `weight_version` replies must carry (full-weight pushes only).
    pub(super) fn weight_version(&self) -> Option<&str> {
        if self.lora {
            None
        } else {
            self.name.as_deref()
        }
    }
}

/// Step `step`'s version of the weights in `dir`: a LoRA adapter is named by its content (a
/// name the servers have cached is never given other weights); full weights by this process.
pub(super) async fn version_of(cfg: &RemoteConfig, nonce: &str, step: u64, dir: &Path) -> Result<Version> {
    let lora = cfg.weight_push == WeightPush::Lora;
    let tag = if lora {
        let d = dir.to_path_buf();
        tokio::task::spawn_blocking(move || content_hash(&d)).await.context("hashing the adapter")??
    } else {
        nonce.to_string()
    };
    Ok(Version { name: Some(versioned_name(step, &tag)), dir: Some(dir.to_path_buf()), lora, step })
}

/// 8 hex digits unique to this process (time and pid).
pub(super) fn process_nonce() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    format!("{:08x}", crate::seed::splitmix64(t ^ ((std::process::id() as u64) << 32)) as u32)
}
