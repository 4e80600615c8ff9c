//! TensorBoard event files for a run: one scalar per numeric field of each `metrics.jsonl` line,
//! so `tensorboard --logdir runs/` shows a run live with the tool RL engineers already have open.
//!
//! The format is small enough to write by hand (no maintained Rust crate writes it without a
//! protobuf stack): a TFRecord file (`u64` length, masked CRC32C of the length, the bytes, their
//! masked CRC32C) of `Event` protobufs, the first holding `file_version`, each later one a
//! `Summary` of `simple_value` scalars (f32, as TensorBoard stores them) at the step.
//!
//! Resume: TensorBoard reads every event file of a directory, so appending the re-run steps to
//! the old file (or a new one beside it) would show the rolled-back steps twice. [`EventLog::open`]
//! instead rebuilds one event file from the metrics lines kept at the checkpoint (in a temporary
//! name TensorBoard ignores), then removes the event files this program wrote before and moves
//! the new one into place. The new file starts with a `SessionLog START` at step 0, so a
//! TensorBoard that was watching the old file drops what it had shown and reads the new history.

use std::io::Write;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::value::RawValue;

/// Marks the event files we write (TensorBoard reads any name containing `tfevents`).
const PREFIX: &str = "events.out.tfevents.";
const SUFFIX: &str = ".orchestrator";

/// An open event file that every step's metrics line is appended to.
pub struct EventLog {
    path: PathBuf,
    file: std::fs::File,
}

impl EventLog {
    /// Starts the run directory's event file over from `history` (the metrics lines kept after a
    /// resume, or none): written under a temporary name, earlier event files of ours removed,
    /// then renamed into place.
    pub fn open(dir: &Path, history: &[&str]) -> Result<Self> {
        let old = event_files(dir)?;
        let now = unix_secs();
        // A name after every older one: TensorBoard reads a directory's files in name order.
        let secs = old.iter().filter_map(|p| name_secs(p)).map(|s| s + 1).fold(now, u64::max);
        let path = dir.join(format!("{PREFIX}{secs:010}.{}{SUFFIX}", std::process::id()));
        let tmp = dir.join(format!(".events-{}.tmp", std::process::id()));
        let mut bytes = Vec::new();
        let t0 = history.first().and_then(|l| parse(l)).and_then(|p| p.1).unwrap_or(now as f64);
        bytes.extend(record(&event(t0, 0, Body::FileVersion)));
        bytes.extend(record(&event(t0, 0, Body::SessionStart)));
        for line in history {
            if let Some(e) = step_event(line) {
                bytes.extend(record(&e));
            }
        }
        std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        for p in &old {
            std::fs::remove_file(p).with_context(|| format!("removing the stale event file {}", p.display()))?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one metrics line as one event (a single write; readers see whole records, or a
    /// torn last one they wait on).
    pub fn write(&mut self, line: &str) -> Result<()> {
        if let Some(e) = step_event(line) {
            self.file.write_all(&record(&e)).with_context(|| format!("writing {}", self.path.display()))?;
        }
        Ok(())
    }
}

/// The event files of ours in `dir`, oldest name first.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    if !dir.is_dir() {
        return Ok(v);
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let n = p.file_name().unwrap_or_default().to_string_lossy();
        if n.starts_with(PREFIX) && n.ends_with(SUFFIX) {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// Removes our event files (a run resumed with `run.tensorboard = false`: the old ones would
/// show steps that were rolled back). Returns how many were removed.
pub fn remove_all(dir: &Path) -> Result<usize> {
    let files = event_files(dir)?;
    for p in &files {
        std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(files.len())
}

fn name_secs(p: &Path) -> Option<u64> {
    let n = p.file_name()?.to_str()?;
    n.strip_prefix(PREFIX)?.split('.').next()?.parse().ok()
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The TensorBoard tag of a metrics key: grouped by what it measures, the key kept whole so a
/// tag maps back to its field (`levels` becomes `ladder/levels_0`, `ladder/levels_1`, ...). A
/// remote pool's per-server keys and a judge panel's per-member keys are grouped already and stay
/// as they are (`pool/0/tok_per_s`, `judge/big/agreement`).
pub fn tag(key: &str) -> String {
    if key.starts_with("pool/") || key.starts_with("judge/") {
        return key.to_string();
    }
    let group = match key {
        "reward_mean" | "reward_std" => "reward",
        "rollouts" | "scored" | "unscored" | "wins" | "ties" | "losses" | "skipped_groups"
        | "position_consistency" => "outcomes",
        "levels" | "share_at_top" | "advanced" => "ladder",
        "kl" | "entropy" | "clip_fraction" | "value_loss" | "policy_loss" | "grad_norm" | "lr"
        | "logprob_max_diff" | "trained" | "learn_tokens_per_s" => "learner",
        "response_tokens_mean" | "response_tokens_max" | "truncated" | "gen_tokens_per_s" => "rollout",
        k if k.starts_with("judge_") => "judge",
        k if k.starts_with("t_") => "time",
        _ => "run",
    };
    format!("{group}/{key}")
}

/// Every numeric field of a metrics line (JSON text) as (tag, value); nulls (no update that
/// step, nothing scored) are left out, so they are gaps, not zeros. `step` is the event's step
/// and `timestamp` its wall time, not scalars. Numbers are read from their text with Rust's
/// correctly rounded parser (serde_json's default one may be an ulp off), so a scalar is exactly
/// the f32 nearest to the number in `metrics.jsonl`.
pub fn scalars(line: &str) -> Vec<(String, f64)> {
    parse(line).map(|p| p.2).unwrap_or_default()
}

fn number(raw: &RawValue) -> Option<f64> {
    let t = raw.get().trim();
    t.starts_with(|c: char| c == '-' || c.is_ascii_digit()).then(|| t.parse().ok()).flatten()
}

/// (step, timestamp, scalars) of a metrics line; None for a line without a step.
fn parse(line: &str) -> Option<(u64, Option<f64>, Vec<(String, f64)>)> {
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(line).ok()?;
    let step = fields.get("step")?.get().trim().parse().ok()?;
    let timestamp = fields.get("timestamp").and_then(|r| number(r));
    let mut out = Vec::new();
    for (k, raw) in &fields {
        if k == "step" || k == "timestamp" {
            continue;
        }
        if raw.get().trim_start().starts_with('[') {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).unwrap_or_default();
            for (i, x) in items.iter().enumerate() {
                if let Some(x) = number(x) {
                    out.push((format!("{}_{i}", tag(k)), x));
                }
            }
        } else if let Some(x) = number(raw) {
            out.push((tag(k), x));
        }
    }
    Some((step, timestamp, out))
}

fn step_event(line: &str) -> Option<Vec<u8>> {
    let (step, wall, values) = parse(line)?;
    Some(event(wall.unwrap_or_else(|| unix_secs() as f64), step, Body::Scalars(values)))
}

enum Body {
    FileVersion,
    SessionStart,
    Scalars(Vec<(String, f64)>),
}

// Protobuf encoding of the few fields we write (tensorflow/core/util/event.proto,
// tensorflow/core/framework/summary.proto).

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, ((field << 3) | 2) as u64);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 | session_log = 6 }`.
fn event(wall_time: f64, step: u64, body: Body) -> Vec<u8> {
    let mut e = Vec::new();
    e.push((1 << 3) | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(2 << 3);
    varint(&mut e, step);
    match body {
        Body::FileVersion => len_field(&mut e, 3, b"brain.Event:2"),
        // SessionLog { status = 1: START }
        Body::SessionStart => len_field(&mut e, 6, &[1 << 3, 1]),
        Body::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                // Summary.Value { tag = 1 (string), simple_value = 2 (float) }
                let mut value = Vec::new();
                len_field(&mut value, 1, tag.as_bytes());
                value.push((2 << 3) | 5);
                value.extend_from_slice(&(v as f32).to_le_bytes());
                len_field(&mut summary, 1, &value);
            }
            len_field(&mut e, 5, &summary);
        }
    }
    e
}

/// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::LazyLock<[u32; 256]> = std::sync::LazyLock::new(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 B.4 and the usual "123456789" check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn every_number_becomes_a_scalar_and_nulls_are_gaps() {
        let line = json!({"step": 3, "timestamp": 1.5e9, "reward_mean": 0.25, "kl": null,
            "levels": [4, 1, 0], "t_learn": 2.0, "judge_retries": 1, "finish": "x"})
        .to_string();
        let mut s = scalars(&line);
        s.sort_by(|a, b| a.0.cmp(&b.0));
        let tags: Vec<&str> = s.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            tags,
            ["judge/judge_retries", "ladder/levels_0", "ladder/levels_1", "ladder/levels_2", "reward/reward_mean", "time/t_learn"]
        );
        assert_eq!(s[1].1, 4.0);
        // A pool's per-server fields: numbers under their own key, the served version (a
        // string) and a null rate left out.
        let line = json!({"step": 4, "pool/0/requests": 8, "pool/0/tok_per_s": null, "pool/1/healthy": 0,
            "pool/1/serving": "policy-v000003"})
        .to_string();
        let s = scalars(&line);
        assert_eq!(s, vec![("pool/0/requests".to_string(), 8.0), ("pool/1/healthy".to_string(), 0.0)]);
        // A panel member's fields keep their key as the tag; the panel's own totals are grouped.
        let line = json!({"step": 2, "judge/big/agreement": 0.5, "judge/big/cost": null, "judge_calls": 4}).to_string();
        assert_eq!(
            scalars(&line),
            vec![("judge/big/agreement".to_string(), 0.5), ("judge/judge_calls".to_string(), 4.0)]
        );
        // The nearest f64 to the text, where serde_json's fast parser can be an ulp off.
        let t = "1795941873.4188945";
        assert_eq!(scalars(&format!("{{\"step\":1,\"x\":{t}}}"))[0].1, t.parse::<f64>().unwrap());
    }

    #[test]
    fn reopening_replaces_the_old_file_with_the_kept_history() {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<String> =
            (1..=5).map(|s| json!({"step": s, "timestamp": 1.0e9 + s as f64, "reward_mean": 0.1 * s as f64}).to_string()).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut log = EventLog::open(dir.path(), &[]).unwrap();
        for l in &lines {
            log.write(l).unwrap();
        }
        let first = log.path().to_path_buf();
        drop(log);
        let log = EventLog::open(dir.path(), &lines[..2]).unwrap();
        assert_eq!(event_files(dir.path()).unwrap(), vec![log.path().to_path_buf()]);
        assert!(log.path() > first.as_path(), "the new file sorts after the old one");
        // Header, START and two steps, each a whole framed record with valid CRCs.
        let bytes = std::fs::read(log.path()).unwrap();
        let (mut at, mut n) = (0usize, 0);
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(masked_crc(&bytes[at..at + 8]).to_le_bytes(), bytes[at + 8..at + 12]);
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(masked_crc(data).to_le_bytes(), bytes[at + 12 + len..at + 16 + len]);
            at += 16 + len;
            n += 1;
        }
        assert_eq!(n, 4);
        assert_eq!(remove_all(dir.path()).unwrap(), 1);
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no temporary file left");
    }
}
