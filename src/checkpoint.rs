//! Checkpoints in a run directory: each one complete before it is named, verifiable, and
//! found again after a crash.
//!
//! Layout: `checkpoints/step-NNNNNN/` holds whatever the caller writes plus `manifest.json`
//! (sha256 and size of every file), written last. A checkpoint is built in a hidden temporary
//! directory, every file is fsynced, then the directory is renamed into place and `latest` (a
//! one-line file naming it) is replaced atomically. On resume a checkpoint whose manifest is
//! missing or whose checksums fail is reported and skipped for the previous complete one.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsutil::{atomic_write, sync_dir};

pub const MANIFEST: &str = "manifest.json";
pub const LATEST: &str = "latest";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub step: u64,
    /// Hash of the resolved config the checkpoint belongs to.
    pub config_hash: String,
    pub files: BTreeMap<String, FileEntry>,
}

/// Which checkpoints survive pruning: the newest `keep_last`, and every step divisible by
/// `keep_every` (0 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub keep_last: usize,
    pub keep_every: u64,
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((format!("{:x}", h.finalize()), n))
}

/// Everything under `dir`: the relative paths of its regular files, sorted, and its
/// subdirectories (absolute, `dir` itself not included).
fn walk(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p.clone());
                stack.push(p);
            } else {
                files.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    files.sort();
    Ok((files, dirs))
}

pub struct Checkpoints {
    dir: PathBuf,
}

impl Checkpoints {
    /// `dir` is the run's `checkpoints/` directory (created if needed).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes checkpoint `step`: `fill` writes its files into a fresh directory; then the
    /// manifest, fsyncs, rename, `latest`, pruning. Returns the final directory.
    pub fn save(
        &self,
        step: u64,
        config_hash: &str,
        retention: Retention,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let name = step_dir_name(step);
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let built = (|| -> Result<()> {
            fill(&tmp)?;
            let (written, subdirs) = walk(&tmp)?;
            let mut files = BTreeMap::new();
            for rel in written {
                let p = tmp.join(&rel);
                std::fs::File::open(&p)?.sync_all()?;
                let (sha256, bytes) = sha256_file(&p)?;
                files.insert(rel.to_string_lossy().to_string(), FileEntry { sha256, bytes });
            }
            // Subdirectory entries too: a file's data on disk is no use if its name is not.
            for d in subdirs {
                sync_dir(&d)?;
            }
            let manifest = Manifest { step, config_hash: config_hash.to_string(), files };
            atomic_write(&tmp.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
            sync_dir(&tmp)
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("writing checkpoint {name}")));
        }
        let fin = self.dir.join(&name);
        if fin.exists() {
            // A checkpoint of this step from an earlier, interrupted attempt: replace it.
            let old = self.dir.join(format!(".old-{name}-{}", std::process::id()));
            std::fs::rename(&fin, &old)?;
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&tmp, &fin)?;
        sync_dir(&self.dir)?;
        atomic_write(&self.dir.join(LATEST), format!("{name}\n").as_bytes())?;
        self.prune(retention, step)?;
        Ok(fin)
    }

    /// Moves every checkpoint newer than `step` (the one a run resumes from) aside to
    /// `abandoned-step-N`: they belong to a history that is being replaced, so neither `--resume
    /// auto` nor pruning may count them, but nothing is deleted. Returns (from, to) pairs.
    pub fn abandon_after(&self, step: u64) -> Result<Vec<(PathBuf, PathBuf)>> {
        let mut moved = Vec::new();
        for s in self.steps()?.into_iter().filter(|&s| s > step) {
            let from = self.dir.join(step_dir_name(s));
            let mut to = self.dir.join(format!("abandoned-{}", step_dir_name(s)));
            let mut k = 1;
            while to.exists() {
                k += 1;
                to = self.dir.join(format!("abandoned-{}-{k}", step_dir_name(s)));
            }
            std::fs::rename(&from, &to).with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
            moved.push((from, to));
        }
        if !moved.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(moved)
    }

    /// Steps of the named checkpoint directories (complete or not), ascending.
    pub fn steps(&self) -> Result<Vec<u64>> {
        let mut steps: Vec<u64> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| parse_step(&e.file_name().to_string_lossy()))
            .collect();
        steps.sort_unstable();
        Ok(steps)
    }

    /// Keeps the newest `keep_last` up to and including `written` (never `written` itself).
    fn prune(&self, r: Retention, written: u64) -> Result<()> {
        let steps: Vec<u64> = self.steps()?.into_iter().filter(|&s| s <= written).collect();
        let keep_from = steps.len().saturating_sub(r.keep_last.max(1));
        for (i, &s) in steps.iter().enumerate() {
            let kept = i >= keep_from || s == written || (r.keep_every > 0 && s % r.keep_every == 0);
            if !kept {
                std::fs::remove_dir_all(self.dir.join(step_dir_name(s)))?;
            }
        }
        // Leftovers of interrupted saves.
        for e in std::fs::read_dir(&self.dir)?.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with(".tmp-step-") || n.starts_with(".old-step-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    /// Checks every file against the manifest.
    pub fn verify(dir: &Path) -> Result<Manifest> {
        let mpath = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&mpath)
            .with_context(|| format!("{}: manifest missing (incomplete checkpoint)", dir.display()))?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: unreadable manifest", mpath.display()))?;
        for (rel, want) in &m.files {
            let p = dir.join(rel);
            let (sha, bytes) = sha256_file(&p).with_context(|| format!("{}: listed file missing", p.display()))?;
            if bytes != want.bytes || sha != want.sha256 {
                bail!("{}: checksum mismatch ({} bytes, expected {})", p.display(), bytes, want.bytes);
            }
        }
        Ok(m)
    }

    /// The newest complete checkpoint. Every named directory is a candidate, newest first: a
    /// crash between the rename and the `latest` update leaves a complete checkpoint newer than
    /// `latest`, and it verifies. Every skipped checkpoint comes back with the reason, for the
    /// caller to report.
    pub fn latest_valid(&self) -> Result<(Option<(PathBuf, Manifest)>, Vec<String>)> {
        let mut warnings = Vec::new();
        for s in self.steps()?.into_iter().rev() {
            let dir = self.dir.join(step_dir_name(s));
            match Self::verify(&dir) {
                Ok(m) if m.step == s => return Ok((Some((dir, m)), warnings)),
                Ok(m) => warnings.push(format!("skipping checkpoint {}: manifest says step {}", dir.display(), m.step)),
                Err(e) => warnings.push(format!("skipping checkpoint {}: {e:#}", dir.display())),
            }
        }
        Ok((None, warnings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(c: &Checkpoints, step: u64, r: Retention) -> PathBuf {
        c.save(step, "h", r, |d| {
            std::fs::write(d.join("weights.bin"), vec![step as u8; 1000])?;
            std::fs::create_dir_all(d.join("sub"))?;
            std::fs::write(d.join("sub/state.json"), format!("{{\"step\":{step}}}"))?;
            Ok(())
        })
        .unwrap()
    }

    const KEEP3: Retention = Retention { keep_last: 3, keep_every: 0 };

    #[test]
    fn save_names_verifies_and_points_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(tmp.path().join("checkpoints")).unwrap();
        let d = save(&c, 7, KEEP3);
        assert!(d.ends_with("step-000007"));
        let m = Checkpoints::verify(&d).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(std::fs::read_to_string(c.dir().join(LATEST)).unwrap().trim(), "step-000007");
        let (found, warns) = c.latest_valid().unwrap();
        assert_eq!(found.unwrap().1.step, 7);
        assert!(warns.is_empty());
    }

    #[test]
    fn corrupt_or_incomplete_newest_falls_back_with_warning() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(tmp.path()).unwrap();
        save(&c, 1, KEEP3);
        save(&c, 2, KEEP3);
        let d3 = save(&c, 3, KEEP3);
        // Truncate a file of the newest.
        std::fs::write(d3.join("weights.bin"), vec![3u8; 10]).unwrap();
        let (found, warns) = c.latest_valid().unwrap();
        assert_eq!(found.unwrap().1.step, 2);
        assert!(warns[0].contains("step-000003") && warns[0].contains("checksum"), "{warns:?}");
        // A directory without a manifest (crash mid-save) is skipped too.
        std::fs::remove_file(c.dir().join("step-000002").join(MANIFEST)).unwrap();
        let (found, warns) = c.latest_valid().unwrap();
        assert_eq!(found.unwrap().1.step, 1);
        assert_eq!(warns.len(), 2);
    }

    #[test]
    fn failed_fill_leaves_nothing_and_latest_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(tmp.path()).unwrap();
        save(&c, 1, KEEP3);
        let err = c.save(2, "h", KEEP3, |d| {
            std::fs::write(d.join("half"), b"x")?;
            bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(c.steps().unwrap(), vec![1]);
        assert_eq!(std::fs::read_to_string(c.dir().join(LATEST)).unwrap().trim(), "step-000001");
        assert_eq!(std::fs::read_dir(c.dir()).unwrap().count(), 2, "no temporary leftovers");
    }

    #[test]
    fn resuming_from_an_older_checkpoint_sets_the_newer_ones_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(tmp.path()).unwrap();
        let r = Retention { keep_last: 2, keep_every: 0 };
        for s in [8, 9, 10] {
            save(&c, s, r);
        }
        assert_eq!(c.steps().unwrap(), vec![9, 10]);
        let moved = c.abandon_after(9).unwrap();
        assert_eq!(moved.len(), 1);
        assert!(moved[0].1.ends_with("abandoned-step-000010"));
        Checkpoints::verify(&moved[0].1).unwrap();
        // The replacement history: step 10 again, then 11; the abandoned one is neither
        // resumed from nor pruned, and the new checkpoint always survives its own pruning.
        save(&c, 10, r);
        save(&c, 11, r);
        assert_eq!(c.steps().unwrap(), vec![10, 11]);
        assert!(tmp.path().join("abandoned-step-000010").is_dir());
        assert_eq!(c.latest_valid().unwrap().0.unwrap().1.step, 11);
        // A stale newer checkpoint (never abandoned) does not make pruning drop the new one.
        let stale = Checkpoints::open(tmp.path().join("stale")).unwrap();
        save(&stale, 20, r);
        save(&stale, 5, r);
        save(&stale, 6, r);
        assert_eq!(stale.steps().unwrap(), vec![5, 6, 20]);
    }

    #[test]
    fn retention_keeps_last_k_and_every_mth() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(tmp.path()).unwrap();
        let r = Retention { keep_last: 2, keep_every: 4 };
        for s in 1..=9 {
            save(&c, s, r);
        }
        assert_eq!(c.steps().unwrap(), vec![4, 8, 9]);
    }
}
