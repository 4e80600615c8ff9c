//! Pairwise evaluation of two models on held-out tasks (`orchestrator eval`).
//!
//! Each model writes one answer per task with the embedded engine (same seeds for both, one
//! model in memory at a time), or on the remote pool of `engine.backend = "remote"` (see
//! [`PoolWeights`]); the judge then compares policy and baseline in both presentation
//! orders. A pair is a win when both orders prefer the policy, a loss when both prefer the
//! baseline, a tie otherwise (the `both` rule of [`crate::reward`]); a pair with a failed call
//! is unscored and left out of the rates. The win rate counts a tie as half a win and comes with
//! a 95% Wilson score interval.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::model::{ModelConfig, ModelFormat};
use crate::data::Task;
use crate::engine::remote::{version_name, RemoteConfig, WeightPush};
use crate::engine::{ChatMessage, Engine, EngineConfig, GenRequest, MistralEngine, Role, Rollout, SamplingConfig, SeedKey};
use crate::judge::{Comparison, JudgeOutput, Judgement, LabelProbs, Panel, Verdict};
use crate::progress::Progress;
use crate::reward::{self, JudgeCall, MemberStats, Outcome, Position, RewardConfig, RewardStats};

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// The model directory an `eval` argument names: an HF model directory, a run directory (its
/// newest complete checkpoint) or a checkpoint directory. Checkpoints are exported as merged HF
/// directories under `scratch` first.
pub fn resolve_model(arg: &Path, scratch: &Path) -> Result<PathBuf> {
    if !arg.exists() {
        bail!("model {} does not exist", arg.display());
    }
    if !arg.is_dir() {
        bail!("model {} is not a directory (expected an HF model directory with config.json)", arg.display());
    }
    let checkpoint = crate::rundir::checkpoint_of(arg)?;
    if let Some(ckpt) = checkpoint {
        let ckpt = ckpt.canonicalize().with_context(|| format!("resolving {}", ckpt.display()))?;
        // Two runs with the same directory name (and step) must not share an export.
        use sha2::Digest;
        let tag = format!("{:x}", sha2::Sha256::digest(ckpt.to_string_lossy().as_bytes()));
        let name = format!(
            "{}-{}-{}",
            ckpt.parent().and_then(|p| p.parent()).and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
            ckpt.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
            &tag[..8]
        );
        let out = scratch.join(name);
        crate::rundir::export_checkpoint(&ckpt, &out)?;
        eprintln!("exported checkpoint {} as {}", ckpt.display(), out.display());
        return Ok(out);
    }
    if !arg.join("config.json").is_file() {
        bail!("model {} has no config.json (expected an HF model directory, a run directory or a checkpoint)", arg.display());
    }
    Ok(arg.to_path_buf())
}

/// Wilson score interval for `successes` out of `n` (successes may be fractional: ties count
/// half). None for n = 0.
pub fn wilson(successes: f64, n: f64, z: f64) -> Option<(f64, f64)> {
    if !(n > 0.0) {
        return None;
    }
    let p = successes / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = p + z2 / (2.0 * n);
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some((((centre - half) / denom).max(0.0), ((centre + half) / denom).min(1.0)))
}

/// Which model the judge read first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    PolicyFirst,
    BaselineFirst,
}

/// The model a verdict preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preferred {
    Policy,
    Baseline,
    Tie,
}

/// One line of `judgements.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgementRecord {
    pub task_id: String,
    pub domain: String,
    pub order: Order,
    /// None when unscored.
    pub verdict: Option<Verdict>,
    pub preferred: Option<Preferred>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unscored_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probs: Option<LabelProbs>,
    pub raw: String,
    pub latency_ms: u64,
    pub retries: u32,
    pub policy_answer: String,
    pub baseline_answer: String,
    /// The panel member that judged (panels only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

/// Counts and rates for one slice (all tasks, or one domain).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub pairs: u64,
    pub wins: u64,
    pub ties: u64,
    pub losses: u64,
    pub unscored: u64,
    pub scored: u64,
    /// (wins + ties / 2) / scored; None with no scored pair.
    pub win_rate: Option<f64>,
    pub ci95: Option<(f64, f64)>,
    /// Mean reward with the `[reward]` values (soft when configured and available).
    pub mean_reward: Option<f64>,
    /// Scored pairs whose two orders agreed.
    pub position_consistency: Option<f64>,
    /// Scored calls that chose the first-read answer (position bias).
    pub first_position_rate: Option<f64>,
}

impl Tally {
    fn from_stats(s: &RewardStats, reward_sum: f64) -> Self {
        let scored = s.wins + s.ties + s.losses;
        let win_rate = (scored > 0).then(|| (s.wins as f64 + 0.5 * s.ties as f64) / scored as f64);
        Self {
            pairs: s.total(),
            wins: s.wins,
            ties: s.ties,
            losses: s.losses,
            unscored: s.unscored,
            scored,
            win_rate,
            ci95: wilson(s.wins as f64 + 0.5 * s.ties as f64, scored as f64, Z95),
            mean_reward: (scored > 0).then(|| reward_sum / scored as f64),
            position_consistency: s.position_consistency(),
            first_position_rate: s.first_position_rate(),
        }
    }
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub policy: PathBuf,
    pub baseline: PathBuf,
    pub tasks: usize,
    pub seed: u64,
    pub judge: String,
    pub overall: Tally,
    pub domains: BTreeMap<String, Tally>,
    /// A panel's members (empty for one judge).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, MemberTally>,
}

/// The outcome for the policy of one call.
fn preferred(v: Verdict, order: Order) -> Preferred {
    match (v, order) {
        (Verdict::Tie, _) => Preferred::Tie,
        (Verdict::First, Order::PolicyFirst) | (Verdict::Second, Order::BaselineFirst) => Preferred::Policy,
        _ => Preferred::Baseline,
    }
}

fn outcome(p: Preferred) -> Outcome {
    match p {
        Preferred::Policy => Outcome::Win,
        Preferred::Tie => Outcome::Tie,
        Preferred::Baseline => Outcome::Loss,
    }
}

pub fn domain_of(t: &Task) -> String {
    t.domain.clone().filter(|d| !d.trim().is_empty()).unwrap_or_else(|| "unknown".into())
}

/// One answer per task from the model in `dir`; the engine is dropped before returning.
pub async fn generate_answers(
    model: &ModelConfig,
    engine_cfg: &EngineConfig,
    tasks: &[Task],
    seed: u64,
    what: &str,
) -> Result<Vec<String>> {
    let engine = MistralEngine::load(model, engine_cfg).await?;
    let answers = answers_from(&engine, &engine_cfg.sampling, tasks, seed, what).await;
    drop(engine);
    answers
}

/// One answer per task from `engine` (seeded as [`generate_answers`]).
pub async fn answers_from(engine: &dyn Engine, sampling: &SamplingConfig, tasks: &[Task], seed: u64, what: &str) -> Result<Vec<String>> {
    let requests: Vec<GenRequest> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut messages = Vec::new();
            if let Some(sys) = &t.system {
                messages.push(ChatMessage::new(Role::System, sys));
            }
            messages.push(ChatMessage::new(Role::User, &t.prompt));
            GenRequest { messages, n: 1, seed: SeedKey::new(seed, 0, i as u64) }
        })
        .collect();
    let progress = Arc::new(Progress::new(tasks.len() as u64, what));
    let (tx, mut rx) = mpsc::unbounded_channel::<Rollout>();
    let collector = {
        let progress = progress.clone();
        let n = tasks.len();
        tokio::spawn(async move {
            let mut answers = vec![None; n];
            while let Some(r) = rx.recv().await {
                // A canceled answer is cut short: never judged as if finished.
                answers[r.request] = (r.finish_reason != crate::engine::FinishReason::Canceled).then_some(r.text);
                progress.inc(1);
            }
            answers
        })
    };
    engine.generate_into(&requests, sampling, tx).await?;
    let answers = collector.await?;
    progress.finish();
    answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.with_context(|| format!("{what}: no answer for task {:?} (the engine canceled it or returned none)", tasks[i].id)))
        .collect()
}

/// Where one side of an eval comes from with `engine.backend = "remote"`: the servers generate
/// with their base model, or with a LoRA version `eval` pushes for itself alone (under a name no
/// training run uses, unloaded when it is done). Full-weight pushes (`weight_push = "disk"`)
/// would change what every user of the servers generates with, so they are refused, as are other
/// model directories, which the servers cannot load as an adapter.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolWeights {
    /// `model.path`: the base model the servers serve.
    Base,
    /// A checkpoint of a run trained with LoRA: its adapter is exported and pushed.
    Checkpoint(PathBuf),
    /// A PEFT adapter directory (`orchestrator export --adapter`): pushed as it is.
    Adapter(PathBuf),
}

impl PoolWeights {
    /// The path the summary names for this side.
    pub fn path(&self, base: &Path) -> PathBuf {
        match self {
            PoolWeights::Base => base.to_path_buf(),
            PoolWeights::Checkpoint(p) | PoolWeights::Adapter(p) => p.clone(),
        }
    }
}

/// What `arg` (`--policy` or `--baseline`, named by `flag`) is on a remote pool whose servers
/// serve `base` (`model.path`); an error saying why and what to do when the pool cannot serve it.
pub fn pool_weights(arg: &Path, flag: &str, base: &Path, remote: &RemoteConfig) -> Result<PoolWeights> {
    if !arg.exists() {
        bail!("{flag} {} does not exist", arg.display());
    }
    if !arg.is_dir() {
        bail!("{flag} {} is not a directory (expected a model directory, a run directory or a checkpoint)", arg.display());
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(arg, base) {
        return Ok(PoolWeights::Base);
    }
    let embedded = "evaluate it with the embedded engine instead (engine.backend = \"embedded\", e.g. ORCHESTRATOR__ENGINE__BACKEND=embedded)";
    match remote.weight_push {
        WeightPush::Lora => {}
        WeightPush::None => bail!(
            "{flag} {}: with engine.backend = \"remote\" and engine.remote.weight_push = \"none\" the servers keep the weights they \
             were started with, so only the base model (model.path = {}) can be evaluated on them; {embedded}",
            arg.display(),
            base.display()
        ),
        WeightPush::Disk => bail!(
            "{flag} {}: with engine.backend = \"remote\" and engine.remote.weight_push = \"disk\", evaluating it would replace the \
             weights every user of the servers generates with (a training run's included), so eval pushes only LoRA adapters and \
             evaluates only the base model (model.path = {}) on a full-weight pool; {embedded}",
            arg.display(),
            base.display()
        ),
    }
    if let Some(ckpt) = crate::rundir::checkpoint_of(arg)? {
        return Ok(PoolWeights::Checkpoint(ckpt));
    }
    if arg.join("adapter_config.json").is_file() {
        return Ok(PoolWeights::Adapter(arg.to_path_buf()));
    }
    bail!(
        "{flag} {}: with engine.backend = \"remote\" an evaluated model reaches the servers as a LoRA adapter, so it must be the \
         base model (model.path = {}), a run or checkpoint trained with LoRA, or a PEFT adapter directory (orchestrator export \
         --adapter); this is another model directory: {embedded}",
        arg.display(),
        base.display()
    )
}

/// Version numbers of `eval`'s own pushes: far above any training step, one range per process,
/// so its adapters never take the name of a training run's versions on shared servers.
const EVAL_VERSIONS: u64 = 900_000_000_000;

/// Writes the adapter of side `side` as `<dir>/<version name>` (blocking: tch work for a
/// checkpoint); returns (step, directory) to push.
pub fn pool_export(w: &PoolWeights, side: u64, dir: &Path, flag: &str) -> Result<Option<(u64, PathBuf)>> {
    let step = EVAL_VERSIONS + u64::from(std::process::id()) * 4 + side;
    let out = dir.join(version_name(step));
    match w {
        PoolWeights::Base => return Ok(None),
        PoolWeights::Checkpoint(ckpt) => {
            let learner = crate::rundir::checkpoint_learner(ckpt)?;
            if !learner.config().lora.enabled {
                bail!(
                    "{flag} {}: trained without LoRA (learner.lora.enabled = false), so there is no adapter to push to the pool \
                     of engine.backend = \"remote\"; evaluate it with the embedded engine instead (engine.backend = \"embedded\", \
                     e.g. ORCHESTRATOR__ENGINE__BACKEND=embedded)",
                    ckpt.display()
                );
            }
            let _ = std::fs::remove_dir_all(&out);
            learner.export_adapter(&out).with_context(|| format!("exporting the adapter of {}", ckpt.display()))?;
            eprintln!("exported the adapter of checkpoint {} as {}", ckpt.display(), out.display());
        }
        PoolWeights::Adapter(src) => {
            // Copied under the export directory, the path every server reads.
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
                let p = e?.path();
                if p.is_file() {
                    let to = out.join(p.file_name().expect("a file has a name"));
                    std::fs::copy(&p, &to).with_context(|| format!("copying {} to {}", p.display(), to.display()))?;
                }
            }
        }
    }
    Ok(Some((step, out)))
}

/// One answer per task from each side on a remote pool: the base model's sides first, then each
/// other side with its adapter pushed (`exports[k]`, from [`pool_export`]). The pushed versions
/// are released (unloaded) at the end, whatever happened.
pub async fn answers_on_pool(
    engine: &dyn Engine,
    sampling: &SamplingConfig,
    tasks: &[Task],
    seed: u64,
    sides: &[(&str, Option<(u64, PathBuf)>)],
) -> Result<Vec<Vec<String>>> {
    let run = async {
        let mut answers: Vec<Option<Vec<String>>> = vec![None; sides.len()];
        for (k, (what, export)) in sides.iter().enumerate() {
            if export.is_none() {
                answers[k] = Some(answers_from(engine, sampling, tasks, seed, what).await?);
            }
        }
        for (k, (what, export)) in sides.iter().enumerate() {
            if let Some((step, dir)) = export {
                engine.push(*step, dir).await.with_context(|| format!("{what}: pushing {} to the pool", dir.display()))?;
                answers[k] = Some(answers_from(engine, sampling, tasks, seed, what).await?);
            }
        }
        Ok::<_, anyhow::Error>(answers.into_iter().map(|a| a.expect("every side generated")).collect())
    };
    let out = run.await;
    if let Err(e) = engine.release().await {
        eprintln!("warning: unloading eval's adapters from the pool: {e:#}");
    }
    out
}

/// Judges every task's pair in both orders (by every member of a panel) and tallies the
/// results; the last value is each panel member's counts (empty for one judge).
pub async fn judge_pairs(
    judges: &Panel,
    reward_cfg: &RewardConfig,
    tasks: &[Task],
    policy: &[String],
    baseline: &[String],
) -> (Vec<JudgementRecord>, Tally, BTreeMap<String, Tally>, BTreeMap<String, MemberStats>) {
    let progress = Progress::new((2 * tasks.len() * judges.members.len()) as u64, "judge");
    let progress = &progress;
    let calls = futures::future::join_all(tasks.iter().enumerate().flat_map(|(i, t)| {
        judges.members.iter().enumerate().flat_map(move |(mi, m)| {
            [Order::PolicyFirst, Order::BaselineFirst].map(move |order| async move {
                let (first, second) = match order {
                    Order::PolicyFirst => (&policy[i], &baseline[i]),
                    Order::BaselineFirst => (&baseline[i], &policy[i]),
                };
                let out = m
                    .judge
                    .compare(Comparison { prompt: &t.prompt, criteria: t.criteria.as_deref(), first, second })
                    .await;
                progress.inc(1);
                (i, mi, order, out)
            })
        })
    }))
    .await;
    progress.finish();

    // Combined like reward position `both`, with the policy as the "response".
    let cfg = RewardConfig { position: Position::Both, ..reward_cfg.clone() };
    let mut per_task: Vec<Vec<Vec<JudgeCall>>> = tasks.iter().map(|_| judges.members.iter().map(|_| Vec::new()).collect()).collect();
    let mut records = Vec::with_capacity(calls.len());
    for (i, mi, order, out) in calls {
        let mut rec = record(&tasks[i], order, &out, &policy[i], &baseline[i]);
        if !judges.single {
            rec.member = Some(judges.members[mi].name.clone());
        }
        records.push(rec);
        let outcome = match &out.judgement {
            Judgement::Scored { verdict, .. } => Some(outcome(preferred(*verdict, order))),
            Judgement::Unscored { .. } => None,
        };
        per_task[i][mi].push(JudgeCall { response_first: order == Order::PolicyFirst, output: out, outcome, member: None });
    }
    let mut all = (RewardStats::default(), 0.0);
    let mut by_domain: BTreeMap<String, (RewardStats, f64)> = BTreeMap::new();
    for (t, members) in tasks.iter().zip(per_task) {
        let mut rs: Vec<_> = members.into_iter().map(|calls| reward::combine(&cfg, calls)).collect();
        let r = if judges.single {
            rs.pop().expect("one judge")
        } else {
            let named = judges.members.iter().zip(rs).map(|(m, r)| (m.name.as_str(), m.weight, r)).collect();
            reward::combine_panel(judges.quorum, named)
        };
        let value = r.reward.unwrap_or(0.0);
        for slot in [&mut all, by_domain.entry(domain_of(t)).or_default()] {
            slot.0.add(&r);
            slot.1 += value;
        }
    }
    let domains = by_domain.iter().map(|(d, (s, v))| (d.clone(), Tally::from_stats(s, *v))).collect();
    let members = std::mem::take(&mut all.0.members);
    (records, Tally::from_stats(&all.0, all.1), domains, members)
}

/// A panel member's line in `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberTally {
    pub weight: f64,
    pub pairs: u64,
    pub scored: u64,
    pub reward_mean: Option<f64>,
    /// With the panel's outcome: 1 the same, 0.5 when one of the two is a tie, 0 opposite.
    pub agreement: Option<f64>,
    pub position_consistency: Option<f64>,
    pub latency_ms_mean: Option<f64>,
    pub failed_calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Option<f64>,
}

/// Each member's tally, in the config's order.
pub fn member_tallies(stats: &BTreeMap<String, MemberStats>, judge: &crate::judge::JudgeConfig) -> BTreeMap<String, MemberTally> {
    judge
        .panel
        .members
        .iter()
        .map(|m| {
            let s = stats.get(&m.name).cloned().unwrap_or_default();
            let t = MemberTally {
                weight: m.weight,
                pairs: s.pairs,
                scored: s.scored,
                reward_mean: s.reward_mean(),
                agreement: s.agreement(),
                position_consistency: s.position_consistency(),
                latency_ms_mean: s.latency_ms_mean(),
                failed_calls: s.failed_calls,
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
                cost: m.openai.cost(&s.usage()),
            };
            (m.name.clone(), t)
        })
        .collect()
}

fn record(t: &Task, order: Order, out: &JudgeOutput, policy: &str, baseline: &str) -> JudgementRecord {
    let (verdict, probs, reason) = match &out.judgement {
        Judgement::Scored { verdict, probs } => (Some(*verdict), *probs, None),
        Judgement::Unscored { reason } => (None, None, Some(reason.clone())),
    };
    JudgementRecord {
        task_id: t.id.clone(),
        domain: domain_of(t),
        order,
        verdict,
        preferred: verdict.map(|v| preferred(v, order)),
        unscored_reason: reason,
        probs,
        raw: out.raw.clone(),
        latency_ms: out.latency_ms,
        retries: out.retries,
        policy_answer: policy.to_string(),
        baseline_answer: baseline.to_string(),
        member: None,
    }
}

/// The model section for an evaluated directory: the config's dtype, HF format.
pub fn model_config(dir: &Path, like: &ModelConfig) -> ModelConfig {
    ModelConfig { path: dir.to_path_buf(), format: ModelFormat::Safetensors, dtype: like.dtype }
}

pub fn write_judgements(path: &Path, records: &[JudgementRecord]) -> Result<()> {
    crate::fsutil::atomic_write_with(path, |w| {
        for r in records {
            serde_json::to_writer(&mut *w, r)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}

/// A plain-text table: one row for all tasks, one per domain.
pub fn table(s: &Summary) -> String {
    let mut out = format!(
        "{:<24} {:>5} {:>5} {:>5} {:>5} {:>6} {:>8} {:>16} {:>7} {:>8} {:>6}\n",
        "domain", "pairs", "win", "tie", "loss", "unsc.", "win rate", "95% CI", "reward", "consist.", "first"
    );
    let row = |name: &str, t: &Tally| {
        let ci = t.ci95.map(|(l, h)| format!("[{l:.3}, {h:.3}]")).unwrap_or_else(|| "-".into());
        let name: String = name.chars().take(24).collect();
        format!(
            "{:<24} {:>5} {:>5} {:>5} {:>5} {:>6} {:>8} {:>16} {:>7} {:>8} {:>6}\n",
            name,
            t.pairs,
            t.wins,
            t.ties,
            t.losses,
            t.unscored,
            opt(t.win_rate),
            ci,
            opt(t.mean_reward),
            opt(t.position_consistency),
            opt(t.first_position_rate)
        )
    };
    out.push_str(&row("all", &s.overall));
    for (d, t) in &s.domains {
        out.push_str(&row(d, t));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: (f64, f64), b: (f64, f64)) -> bool {
        (a.0 - b.0).abs() < 5e-5 && (a.1 - b.1).abs() < 5e-5
    }

    #[test]
    fn wilson_matches_known_values() {
        // Published values (e.g. Newcombe 1998; any Wilson calculator), z = 1.96.
        assert!(close(wilson(8.0, 10.0, 1.96).unwrap(), (0.4902, 0.9433)), "{:?}", wilson(8.0, 10.0, 1.96));
        assert!(close(wilson(0.0, 10.0, 1.96).unwrap(), (0.0, 0.2775)), "{:?}", wilson(0.0, 10.0, 1.96));
        assert!(close(wilson(10.0, 10.0, 1.96).unwrap(), (0.7225, 1.0)), "{:?}", wilson(10.0, 10.0, 1.96));
        assert!(close(wilson(50.0, 100.0, 1.96).unwrap(), (0.4038, 0.5962)), "{:?}", wilson(50.0, 100.0, 1.96));
        assert!(close(wilson(1.0, 2.0, 1.96).unwrap(), (0.0945, 0.9055)), "{:?}", wilson(1.0, 2.0, 1.96));
        assert_eq!(wilson(0.0, 0.0, Z95), None);
        // Symmetry: k/n and (n-k)/n mirror each other.
        let (l, h) = wilson(3.5, 9.0, Z95).unwrap();
        let (l2, h2) = wilson(5.5, 9.0, Z95).unwrap();
        assert!((l - (1.0 - h2)).abs() < 1e-12 && (h - (1.0 - l2)).abs() < 1e-12);
    }

    #[test]
    fn orders_map_to_the_policy() {
        assert_eq!(preferred(Verdict::First, Order::PolicyFirst), Preferred::Policy);
        assert_eq!(preferred(Verdict::First, Order::BaselineFirst), Preferred::Baseline);
        assert_eq!(preferred(Verdict::Second, Order::BaselineFirst), Preferred::Policy);
        assert_eq!(preferred(Verdict::Tie, Order::PolicyFirst), Preferred::Tie);
    }

    #[test]
    fn resolve_model_wants_an_hf_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let scratch = tmp.path().join("scratch");
        let e = format!("{:#}", resolve_model(&tmp.path().join("nope"), &scratch).unwrap_err());
        assert!(e.contains("does not exist"), "{e}");
        let e = format!("{:#}", resolve_model(tmp.path(), &scratch).unwrap_err());
        assert!(e.contains("no config.json"), "{e}");
        std::fs::write(tmp.path().join("config.json"), "{}").unwrap();
        assert_eq!(resolve_model(tmp.path(), &scratch).unwrap(), tmp.path());
        let e = format!("{:#}", resolve_model(&tmp.path().join("config.json"), &scratch).unwrap_err());
        assert!(e.contains("not a directory"), "{e}");
    }
}
