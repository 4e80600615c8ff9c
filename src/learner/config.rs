//! The `[learner]` config section.

use serde::{Deserialize, Serialize};

use super::loss::{Aggregation, KlEstimator};
use super::lora::LoraConfig;
use super::optim::Schedule;
use crate::validate::Problems;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// PPO with GAE advantages from a value head on the policy trunk (the paper's setting).
    #[default]
    Ppo,
    /// Group-relative advantages over the rollouts of one prompt; no critic.
    Grpo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LearnerDType {
    #[default]
    F32,
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerConfig {
    pub algorithm: Algorithm,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub dtype: LearnerDType,
    /// libtorch intra-op threads; 0 keeps libtorch's default.
    pub threads: usize,

    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    /// Optimizer steps at which linear/cosine decay ends.
    pub total_steps: u64,
    pub min_lr_ratio: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub max_grad_norm: f64,
    /// Optimizer steps in a row whose gradient norm is NaN or infinite (each one skipped, the
    /// weights untouched) before the run stops with an error instead of going on.
    pub max_skipped_steps: u64,

    /// Passes over each batch of trajectories.
    pub ppo_epochs: usize,
    /// Optimizer steps per epoch (the batch is split into this many mini-batches).
    pub mini_batches: usize,
    /// Padded tokens (batch x longest sequence) per micro-batch; gradients accumulate over them.
    pub micro_batch_tokens: usize,
    /// Rows of logits computed at once when turning hidden states into log-probs.
    pub logprob_chunk: usize,
    /// Recompute each layer's activations in the backward pass instead of keeping them.
    pub activation_recompute: bool,

    pub clip_range: f64,
    /// Dual-clip constant c > 1 for negative advantages; unset disables it.
    pub dual_clip: Option<f64>,
    pub aggregation: Aggregation,
    /// GAE discount and trace decay (the paper: 1 and 1).
    pub gamma: f64,
    pub lambda: f64,
    pub value_coef: f64,
    /// Clip range of the value loss around the old values; unset disables it.
    pub value_clip: Option<f64>,
    /// PPO: whiten GAE advantages over the batch.
    pub whiten_advantages: bool,
    /// GRPO: divide group-centred rewards by the group's standard deviation.
    pub grpo_normalise_std: bool,
    /// KL penalty coefficient against the frozen starting policy; 0 disables it (and the reference copy).
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub entropy_coef: f64,
    /// Off-policy correction with the engine's behaviour log-probs mu: `token-tis` weights each
    /// token's clipped-surrogate loss by min(exp(ln pi_old - ln mu), is_cap) (truncated
    /// importance sampling). It corrects rollouts from older weights (`run.sync_every > 1`) and
    /// engine/learner numeric mismatch.
    pub is_correction: IsCorrection,
    /// Truncation of the token-TIS weight (>= 1).
    pub is_cap: f64,

    pub lora: LoraConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsCorrection {
    #[default]
    None,
    TokenTis,
}

impl Default for LearnerConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Ppo,
            device: "cpu".into(),
            dtype: LearnerDType::F32,
            threads: 0,
            lr: 1e-6,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            max_skipped_steps: 3,
            ppo_epochs: 1,
            mini_batches: 1,
            micro_batch_tokens: 4096,
            logprob_chunk: 1024,
            activation_recompute: false,
            clip_range: 0.2,
            dual_clip: None,
            aggregation: Aggregation::TokenMean,
            gamma: 1.0,
            lambda: 1.0,
            value_coef: 0.5,
            value_clip: Some(0.2),
            whiten_advantages: true,
            grpo_normalise_std: true,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K1,
            entropy_coef: 0.0,
            is_correction: IsCorrection::None,
            is_cap: 2.0,
            lora: LoraConfig::default(),
        }
    }
}

impl LearnerConfig {
    pub fn validate(&self, key: &str, p: &mut Problems) {
        let k = |s: &str| format!("{key}.{s}");
        if parse_device(&self.device).is_none() {
            p.push(&k("device"), format!("must be cpu, cuda or cuda:N, got {:?}", self.device));
        }
        p.positive(&k("lr"), self.lr);
        if self.schedule != Schedule::Constant && self.total_steps <= self.warmup_steps {
            p.push(&k("total_steps"), format!("must exceed warmup_steps ({}) for a decaying schedule", self.warmup_steps));
        }
        p.open_closed(&k("min_lr_ratio"), self.min_lr_ratio, -1e-12, 1.0);
        for (n, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                p.push(&k(n), format!("must be in [0, 1), got {v}"));
            }
        }
        p.positive(&k("eps"), self.eps);
        p.at_least(&k("weight_decay"), self.weight_decay, 0.0);
        p.at_least(&k("max_grad_norm"), self.max_grad_norm, 0.0);
        if p.finite(&k("is_cap"), self.is_cap) && self.is_cap < 1.0 {
            p.push(&k("is_cap"), format!("must be >= 1, got {}", self.is_cap));
        }
        if self.max_skipped_steps == 0 {
            p.push(&k("max_skipped_steps"), "must be >= 1, got 0");
        }
        for (n, v) in [
            ("ppo_epochs", self.ppo_epochs),
            ("mini_batches", self.mini_batches),
            ("micro_batch_tokens", self.micro_batch_tokens),
            ("logprob_chunk", self.logprob_chunk),
        ] {
            if v == 0 {
                p.push(&k(n), "must be >= 1, got 0");
            }
        }
        p.open_closed(&k("clip_range"), self.clip_range, 0.0, 1.0);
        if let Some(c) = self.dual_clip {
            if !(c > 1.0) {
                p.push(&k("dual_clip"), format!("must be > 1, got {c}"));
            }
        }
        p.open_closed(&k("gamma"), self.gamma, 0.0, 1.0);
        p.open_closed(&k("lambda"), self.lambda, -1e-12, 1.0);
        p.at_least(&k("value_coef"), self.value_coef, 0.0);
        if let Some(c) = self.value_clip {
            p.positive(&k("value_clip"), c);
        }
        p.at_least(&k("kl_coef"), self.kl_coef, 0.0);
        p.at_least(&k("entropy_coef"), self.entropy_coef, 0.0);
        self.lora.validate(&k("lora"), p);
    }

    pub fn tch_device(&self) -> tch::Device {
        parse_device(&self.device).unwrap_or(tch::Device::Cpu)
    }

    pub fn kind(&self) -> tch::Kind {
        match self.dtype {
            LearnerDType::F32 => tch::Kind::Float,
            LearnerDType::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// `--device` for the command line: cpu, cuda or cuda:N, with the accepted forms in the error.
pub fn device_arg(s: &str) -> Result<String, String> {
    parse_device(s).map(|_| s.to_string()).ok_or_else(|| format!("possible values: cpu, cuda, cuda:N; got {s:?}"))
}

pub fn parse_device(s: &str) -> Option<tch::Device> {
    match s {
        "cpu" => Some(tch::Device::Cpu),
        "cuda" => Some(tch::Device::Cuda(0)),
        _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(tch::Device::Cuda),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_their_keys() {
        let mut p = Problems::default();
        LearnerConfig::default().validate("learner", &mut p);
        assert!(p.0.is_empty(), "{:?}", p.0);
        let bad = LearnerConfig {
            device: "tpu".into(),
            clip_range: 0.0,
            dual_clip: Some(0.5),
            schedule: Schedule::Cosine,
            lora: LoraConfig { enabled: true, rank: 0, target_modules: vec!["qkv".into()], ..LoraConfig::default() },
            ..LearnerConfig::default()
        };
        let mut p = Problems::default();
        bad.validate("learner", &mut p);
        let all = p.0.join("\n");
        for key in ["learner.device", "learner.clip_range", "learner.dual_clip", "learner.total_steps", "learner.lora.rank", "learner.lora.target_modules"] {
            assert!(all.contains(key), "{key} not in {all}");
        }
    }
}
