//! One-step-off training (`run.max_off_policy_steps = 1`): step k+1's rollouts are generated and
//! judged while the learner trains on step k's.
//!
//! The schedule is fixed, whatever the timing; v(k) are the learner's weights after step k:
//! ```text
//! step k:  [step k's rollouts, generated and judged during step k-1] -> curriculum.advance
//!          -> learner.update(step k) on v(k-1) -> v(k)
//!             || generate + judge step k+1 on the engine's weights (v(k-1)), against the
//!                references of the curriculum as advanced by step k
//!          -> wait for both -> [sync_every] v(k) to the engine -> samples, metrics, [checkpoint]
//! ```
//! So with `sync_every = 1` the rollouts of step s come from v(s-2): one step stale from step 2 on
//! (step 1 is generated on v(0) before anything else runs). The engine is reloaded only after its
//! generation has finished (the embedded engine's reload also waits for generations in flight).
//! Every step's metrics line carries `off_policy_steps` (the learner's version, s - 1, minus the
//! version that generated the rollouts) and `t_overlap` (learner seconds that ran while the next
//! step's rollouts were generated and judged, i.e. hidden). The update is off-policy: pair it with
//! `learner.is_correction = "token-tis"` (`check` and `run` warn otherwise).
//!
//! Checkpoints. A checkpoint after step k holds the pending step k+1 in `pending.json`: its batch,
//! every rollout (ids, behaviour log-probs, text) with its reward and judge calls, the ladder levels
//! it was judged at and the weights version that generated it; the checkpoint's curriculum is the
//! one those rollouts were judged against and its sampler cursor is past step k+1's batch. A resumed
//! run trains on exactly those rollouts. Floats are stored by their bits, so nothing moves by an
//! ulp through JSON. When step k+1's rollouts are not complete at save time (a stop signal during
//! their generation, the judge down, the run's last step), the engine is not synced after step k:
//! it keeps serving the weights step k+1 must be generated with, the checkpoint holds them
//! (`policy/`, as for `sync_every > 1`), and the resumed run generates step k+1 on them first,
//! then syncs v(k) before it launches step k+2: the same schedule as a run that never stopped.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use super::rollouts::Judged;

pub const PENDING_FILE: &str = "pending.json";

/// A step's rollouts, generated and judged, not yet trained on.
#[derive(Serialize, Deserialize)]
pub(super) struct Pending {
    pub step: u64,
    /// Task-order epoch when the batch was drawn.
    pub epoch: u64,
    /// Task indices, and their ids (a resume checks the task file still has them there).
    pub batch: Vec<usize>,
    pub task_ids: Vec<String>,
    /// Each task's ladder level when its rollouts were judged.
    pub levels: Vec<usize>,
    /// The learner step whose weights generated the rollouts (0 = the starting model).
    pub generated_by: u64,
    /// Generation and judging-tail seconds as measured when the rollouts were made.
    pub t_generate: f64,
    pub t_judge_tail: f64,
    pub groups: Vec<Vec<Judged>>,
}

/// Key of the object a float is stored in: `{"f64": "<16 hex digits of its bits>"}`. No struct
/// of ours has a field of that name alone, so decoding cannot mistake data for a float.
const FLOAT_KEY: &str = "f64";

/// Every float of `v` as its exact bits (f32 values were widened exactly by `to_value`).
fn floats_to_bits(v: Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => {
            let bits = n.as_f64().expect("is_f64").to_bits();
            Value::Object(Map::from_iter([(FLOAT_KEY.to_string(), Value::String(format!("{bits:016x}")))]))
        }
        Value::Array(a) => Value::Array(a.into_iter().map(floats_to_bits).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, floats_to_bits(v))).collect()),
        other => other,
    }
}

fn bits_to_floats(v: Value) -> Result<Value> {
    Ok(match v {
        Value::Object(o) if o.len() == 1 && o.contains_key(FLOAT_KEY) => {
            let hex = o[FLOAT_KEY].as_str().context("a float's bits must be a hex string")?;
            let bits = u64::from_str_radix(hex, 16).with_context(|| format!("bad float bits {hex:?}"))?;
            let f = f64::from_bits(bits);
            Value::Number(Number::from_f64(f).with_context(|| format!("non-finite float {f}"))?)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(bits_to_floats).collect::<Result<_>>()?),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| Ok((k, bits_to_floats(v)?))).collect::<Result<_>>()?),
        other => other,
    })
}

impl Pending {
    /// What judging these rollouts counted (tokens, per panel member too).
    pub fn judge_stats(&self) -> crate::reward::RewardStats {
        let mut s = crate::reward::RewardStats::default();
        for j in self.groups.iter().flatten() {
            s.add(&j.reward);
        }
        s
    }

    /// The bytes of `pending.json`. Refuses what could not be read back: JSON has no NaN or
    /// infinity (serde writes them as null), so every value is checked and the bytes are read
    /// back before anything is written.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.check_values().context("refusing to write pending.json")?;
        let bytes = serde_json::to_vec(&floats_to_bits(serde_json::to_value(self)?))?;
        let back = bits_to_floats(serde_json::from_slice(&bytes)?)
            .and_then(|v| Ok(serde_json::from_value::<Pending>(v)?))
            .context("refusing to write pending.json: it would not read back (a non-finite number?)")?;
        back.check_values().context("refusing to write pending.json: it reads back changed")?;
        Ok(bytes)
    }

    /// Every rollout whole and every number finite; a scored rollout has ids to train on.
    fn check_values(&self) -> Result<()> {
        if !self.t_generate.is_finite() || !self.t_judge_tail.is_finite() {
            bail!("non-finite timings");
        }
        for (pi, group) in self.groups.iter().enumerate() {
            for j in group {
                let r = &j.rollout;
                if r.ids.len() != r.logprobs.len() {
                    bail!("prompt {pi}: a rollout with {} ids and {} log-probs", r.ids.len(), r.logprobs.len());
                }
                if r.logprobs.iter().any(|l| !l.is_finite()) || j.reward.reward.is_some_and(|x| !x.is_finite()) {
                    bail!("prompt {pi}: a non-finite log-prob or reward");
                }
                if j.reward.reward.is_some() && r.ids.is_empty() {
                    bail!("prompt {pi}: a scored rollout without token ids");
                }
            }
        }
        Ok(())
    }

    /// Reads `dir/pending.json` and checks it against the step and tasks it must belong to.
    pub fn read(dir: &Path, step: u64, tasks: &[std::sync::Arc<crate::data::Task>]) -> Result<Self> {
        let p = dir.join(PENDING_FILE);
        let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let parsed = (|| -> Result<Self> {
            let v = bits_to_floats(serde_json::from_slice(&text)?)?;
            Ok(serde_json::from_value(v)?)
        })()
        .with_context(|| format!("parsing {}", p.display()))?;
        parsed.check(step, tasks).with_context(|| format!("{}: not the pending step this checkpoint needs", p.display()))?;
        Ok(parsed)
    }

    fn check(&self, step: u64, tasks: &[std::sync::Arc<crate::data::Task>]) -> Result<()> {
        if self.step != step {
            bail!("it holds step {}, the checkpoint needs step {step}", self.step);
        }
        if self.generated_by >= step {
            bail!("rollouts of step {step} cannot come from step {}'s weights", self.generated_by);
        }
        let n = self.batch.len();
        if self.task_ids.len() != n || self.levels.len() != n || self.groups.len() != n {
            bail!("batch, task ids, levels and groups differ in length");
        }
        for (pi, (&ti, id)) in self.batch.iter().zip(&self.task_ids).enumerate() {
            match tasks.get(ti) {
                Some(t) if &t.id == id => {}
                _ => bail!("prompt {pi}: task {id:?} is no longer task #{ti} of the task file (was data.tasks changed?)"),
            }
            if let Some(r) = self.groups[pi].iter().find(|j| j.rollout.request != pi) {
                bail!("prompt {pi}: a rollout of request {}", r.rollout.request);
            }
        }
        self.check_values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FinishReason, Rollout};
    use crate::judge::{JudgeOutput, Judgement, LabelProbs, Verdict};
    use crate::reward::{JudgeCall, Outcome, RewardOutcome};

    fn pending(logprob: f32, reward: Option<f64>, prob: f64, ids: Vec<u32>) -> Pending {
        let n = ids.len();
        let rollout = Rollout { request: 0, sample: 0, prompt_ids: vec![1, 2], ids, logprobs: vec![logprob; n], finish_reason: FinishReason::Stop, text: "x".into() };
        let output = JudgeOutput {
            judgement: Judgement::Scored { verdict: Verdict::First, probs: Some(LabelProbs { first: prob, second: 0.25, tie: 0.0 }) },
            raw: "A".into(),
            latency_ms: 3,
            retries: 0,
            usage: crate::judge::Usage { prompt_tokens: 40, completion_tokens: 2, usage_missing: 0 },
        };
        let call = JudgeCall { response_first: true, output, outcome: Some(Outcome::Win), member: None };
        let reward = RewardOutcome {
            calls: vec![call],
            outcome: Some(Outcome::Win),
            reward,
            soft: false,
            unscored_reason: None,
            consistent: None,
            replaced_usage: Default::default(),
            members: Vec::new(),
        };
        Pending {
            step: 2,
            epoch: 0,
            batch: vec![0],
            task_ids: vec!["t".into()],
            levels: vec![0],
            generated_by: 1,
            t_generate: 1.0,
            t_judge_tail: 0.5,
            groups: vec![vec![Judged { rollout, reward, partner: None }]],
        }
    }

    /// JSON has no NaN: encoding one would write a checkpoint no resume can read.
    #[test]
    fn pending_with_a_non_finite_value_or_an_empty_scored_rollout_is_never_written() {
        let good = pending(-0.5, Some(1.0), 0.75, vec![5, 6]);
        let bytes = good.encode().unwrap();
        let back = bits_to_floats(serde_json::from_slice(&bytes).unwrap()).unwrap();
        assert_eq!(serde_json::from_value::<Pending>(back).unwrap().groups[0][0].rollout.logprobs, vec![-0.5, -0.5]);
        let cases = [
            (pending(f32::NEG_INFINITY, Some(1.0), 0.75, vec![5]), "non-finite log-prob"),
            (pending(-0.5, Some(f64::NAN), 0.75, vec![5]), "non-finite log-prob or reward"),
            (pending(-0.5, Some(1.0), f64::NAN, vec![5]), "would not read back"),
            (pending(-0.5, Some(1.0), 0.75, vec![]), "without token ids"),
        ];
        for (p, want) in cases {
            let e = format!("{:#}", p.encode().unwrap_err());
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn floats_survive_by_their_bits() {
        // Values whose shortest decimal form a lossy parser may read back an ulp off.
        let xs: Vec<f64> = vec![0.1, 1.0 / 3.0, 2.2250738585072014e-308, 9007199254740993.0, -0.0, 123456.789e-300, 0.30000000000000004];
        let fs: Vec<f32> = vec![0.1, -1.0 / 3.0, f32::MIN_POSITIVE, 16777217.0, -2.7182817];
        let v = serde_json::json!({"xs": xs, "fs": fs, "n": 7u64, "s": "f64"});
        let text = serde_json::to_vec(&floats_to_bits(v)).unwrap();
        let back = bits_to_floats(serde_json::from_slice(&text).unwrap()).unwrap();
        let xs2: Vec<f64> = serde_json::from_value(back["xs"].clone()).unwrap();
        let fs2: Vec<f32> = serde_json::from_value(back["fs"].clone()).unwrap();
        assert_eq!(xs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), xs2.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(fs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), fs2.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(back["n"], 7);
        assert_eq!(back["s"], "f64");
    }
}
