//! Weight sync, learner -> engine, through HF directories under `<run>/policy/`.
//!
//! Only what training can change is written at each sync: without LoRA that is every weight
//! (`model.safetensors`); with LoRA it is the adapted projections with the adapters merged in
//! (`model-00002-of-00002.safetensors`), while the untouched weights are written once per run
//! (`frozen.safetensors`) and hard-linked into each export as `model-00001-of-00002.safetensors`
//! (mistral.rs loads every `model-N-of-M` file of a directory). `frozen.key` names what the
//! frozen file was written from (model files, frozen weight names); a run resumed with another
//! `model.path` or LoRA target list writes it again. An export is built in a staging
//! directory, renamed to `step-NNNNNN`, the engine reloads from it, and the previous export is
//! deleted. mistral.rs cannot swap in a LoRA adapter at run time, so the merged weights go over.
//!
//! A remote engine (`engine.backend = "remote"`) takes what `engine.remote.weight_push` says: the
//! PEFT adapter (`lora`) or the same HF directory (`disk`), written under
//! `engine.remote.export_dir` as `policy-vNNNNNN` (the version name the servers load it under).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::engine::remote::{version_name, WeightPush};
use crate::engine::{Backend, Engine, WeightFormat};
use crate::learner::io::write_sources;
use crate::learner::Learner;
use crate::rundir::RunDir;

const FROZEN: &str = "frozen.safetensors";
const FROZEN_KEY: &str = "frozen.key";
const SINGLE: &str = "model.safetensors";
const SHARD_FROZEN: &str = "model-00001-of-00002.safetensors";
const SHARD_TRAINED: &str = "model-00002-of-00002.safetensors";

/// Bytes and time of one export.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exported {
    pub bytes: u64,
    /// Bytes written once for the frozen weights (first LoRA export of a process's run only).
    pub frozen_bytes: u64,
    pub secs: f64,
}

pub fn export_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:06}"))
}

fn file_bytes(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Writes the learner's current weights as `<root>/step-NNNNNN` (blocking: tch work).
pub fn export(learner: &Learner, root: &Path, step: u64) -> Result<(PathBuf, Exported)> {
    export_to(learner, root, &format!("step-{step:06}"))
}

/// Builds `<root>/<name>` in a staging directory with `write` (which adds the bytes it wrote
/// beyond the staging directory's own files), then renames it into place.
fn staged(root: &Path, name: &str, write: impl FnOnce(&Path, &mut Exported) -> Result<()>) -> Result<(PathBuf, Exported)> {
    let t0 = Instant::now();
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let staging = root.join(format!(".staging-{name}"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let mut out = Exported::default();
    write(&staging, &mut out)?;
    let fin = root.join(name);
    if fin.exists() {
        std::fs::remove_dir_all(&fin)?;
    }
    std::fs::rename(&staging, &fin).with_context(|| format!("renaming {} to {}", staging.display(), fin.display()))?;
    out.secs = t0.elapsed().as_secs_f64();
    Ok((fin, out))
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        n += file_bytes(&e?.path());
    }
    Ok(n)
}

/// Writes the learner's current weights as the HF directory `<root>/<name>`.
pub fn export_to(learner: &Learner, root: &Path, name: &str) -> Result<(PathBuf, Exported)> {
    staged(root, name, |staging, out| {
        learner.export_config(staging)?;
        out.bytes += dir_bytes(staging)?;
        let split = learner.weight_split();
        if split.frozen.is_empty() {
            let p = staging.join(SINGLE);
            write_sources(&p, split.changed, None, false)?;
            out.bytes += file_bytes(&p);
        } else {
            let fp = root.join(FROZEN);
            let kp = root.join(FROZEN_KEY);
            let key = learner.frozen_key()?;
            if !(fp.is_file() && std::fs::read_to_string(&kp).is_ok_and(|k| k == key)) {
                // Kept across restarts, so written durably, and its key only after it.
                let _ = std::fs::remove_file(&kp);
                write_sources(&fp, split.frozen, None, true)?;
                crate::fsutil::atomic_write(&kp, key.as_bytes())?;
                out.frozen_bytes = file_bytes(&fp);
            }
            std::fs::hard_link(&fp, staging.join(SHARD_FROZEN))
                .with_context(|| format!("linking {} into {}", fp.display(), staging.display()))?;
            let p = staging.join(SHARD_TRAINED);
            write_sources(&p, split.changed, None, false)?;
            out.bytes += file_bytes(&p);
        }
        Ok(())
    })
}

/// Writes the learner's LoRA adapter in PEFT layout as `<root>/<name>`.
pub fn export_adapter(learner: &Learner, root: &Path, name: &str) -> Result<(PathBuf, Exported)> {
    staged(root, name, |staging, out| {
        learner.export_adapter(staging)?;
        out.bytes += dir_bytes(staging)?;
        Ok(())
    })
}

/// What the configured engine takes at a sync.
pub fn weight_format(cfg: &Config) -> WeightFormat {
    match (cfg.engine.backend, cfg.engine.remote.weight_push) {
        (Backend::Embedded, _) => WeightFormat::HfDir,
        (Backend::Remote, WeightPush::Lora) => WeightFormat::Adapter,
        (Backend::Remote, WeightPush::Disk) => WeightFormat::HfDir,
        (Backend::Remote, WeightPush::None) => WeightFormat::Nothing,
    }
}

/// Where exports go: `<run>/policy` for the embedded engine, `engine.remote.export_dir` (a path
/// the servers read) for a remote one.
pub fn export_root(cfg: &Config, run: &RunDir) -> PathBuf {
    match cfg.engine.backend {
        Backend::Embedded => run.root.join("policy"),
        Backend::Remote => cfg.engine.remote.export_dir.clone(),
    }
}

/// The directory of step `step`'s export under `root`.
pub fn export_path(cfg: &Config, root: &Path, step: u64) -> PathBuf {
    match cfg.engine.backend {
        Backend::Embedded => export_dir(root, step),
        Backend::Remote => root.join(version_name(step)),
    }
}

/// Writes step `step`'s export in `format` (blocking: tch work).
pub fn export_as(learner: &Learner, format: WeightFormat, dir: &Path) -> Result<(PathBuf, Exported)> {
    let root = dir.parent().context("export directory has no parent")?;
    let name = dir.file_name().context("export directory has no name")?.to_string_lossy().to_string();
    match format {
        WeightFormat::HfDir => export_to(learner, root, &name),
        WeightFormat::Adapter => export_adapter(learner, root, &name),
        WeightFormat::Nothing => anyhow::bail!("this engine takes no weights"),
    }
}

impl super::Trainer {
    /// Exports the learner's weights as step `step`'s, in the form the engine takes, and has the
    /// engine serve them (nothing to write for an engine that takes no weights); the engine is
    /// then in sync with the learner. Returns (seconds, bytes written).
    pub(super) async fn sync_engine(&mut self, step: u64) -> Result<(f64, u64)> {
        let t0 = Instant::now();
        let format = weight_format(&self.cfg);
        let mut bytes = 0;
        if format != WeightFormat::Nothing {
            let dir = export_path(&self.cfg, &export_root(&self.cfg, &self.run), step);
            let (dir, exported) = super::on_learner(&mut self.learner, move |l| export_as(l, format, &dir)).await??;
            switch(&*self.engine, &mut self.served, dir, step).await?;
            bytes = exported.bytes + exported.frozen_bytes;
        }
        self.dirty = false;
        Ok((t0.elapsed().as_secs_f64(), bytes))
    }
}

/// Which weights the engine serves: the starting model or an export under the run directory.
#[derive(Debug)]
pub struct Served {
    /// The directory (or GGUF file) the engine loaded last.
    pub path: PathBuf,
    /// The step whose learner weights these are (0 = the starting model).
    pub step: u64,
    /// Whether `path` is an export we own (and may delete once replaced).
    pub owned: bool,
}

/// Switches the engine to `dir` (step `step`'s export) and deletes the export it replaces. A
/// failed switch leaves the engine serving the old weights and is an error.
pub async fn switch(engine: &dyn Engine, served: &mut Served, dir: PathBuf, step: u64) -> Result<f64> {
    let t0 = Instant::now();
    engine.push(step, &dir).await?;
    let old = std::mem::replace(served, Served { path: dir, step, owned: true });
    if old.owned && old.path != served.path {
        std::fs::remove_dir_all(&old.path).with_context(|| format!("removing old export {}", old.path.display()))?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Removes exports and staging directories left by an earlier process, keeping `keep`.
pub fn clean(root: &Path, keep: Option<&Path>) -> Result<()> {
    if !root.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(root)? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy().to_string();
        let stale = name.starts_with(".staging-") || name.starts_with("step-") || name.starts_with(crate::engine::remote::VERSION_PREFIX);
        if p.is_dir() && stale && Some(p.as_path()) != keep {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Hard-links (or copies, across file systems) every file of `src` into `dst`.
pub fn link_files(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let p = e?.path();
        if p.is_file() {
            let to = dst.join(p.file_name().unwrap());
            if std::fs::hard_link(&p, &to).is_err() {
                std::fs::copy(&p, &to).with_context(|| format!("copying {} to {}", p.display(), to.display()))?;
            }
        }
    }
    Ok(())
}

/// The machine's write bandwidth in bytes/s for `src`'s bytes, measured two ways: as an export
/// writes (from memory into the page cache, no fsync: exports are rebuilt after a crash), and
/// durably (fsynced to the disk, as a checkpoint writes).
pub fn copy_bandwidth(src: &Path) -> Result<(f64, f64)> {
    use std::io::Write;
    let bytes = std::fs::read(src)?;
    let dst = src.with_extension("bwtest");
    let t0 = Instant::now();
    std::fs::File::create(&dst)?.write_all(&bytes)?;
    let cached = t0.elapsed().as_secs_f64();
    std::fs::remove_file(&dst)?;
    let t0 = Instant::now();
    let mut f = std::fs::File::create(&dst)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    let durable = t0.elapsed().as_secs_f64();
    std::fs::remove_file(&dst)?;
    let n = bytes.len() as f64;
    Ok((n / cached.max(1e-9), n / durable.max(1e-9)))
}
