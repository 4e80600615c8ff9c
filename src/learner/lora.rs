//! LoRA (Hu et al. 2021): W x + (alpha / r) B A dropout(x), with only A and B trained.
//! Adapter variables live beside their base weight (`...q_proj.lora_A.weight`), so the PEFT
//! name is the HF name prefixed with `base_model.model.`.

use std::path::Path;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::Tensor;

use super::model::Fwd;
use crate::validate::Problems;

pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub enabled: bool,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl LoraConfig {
    pub fn validate(&self, key: &str, p: &mut Problems) {
        if !self.enabled {
            return;
        }
        if self.rank == 0 {
            p.push(&format!("{key}.rank"), "must be >= 1, got 0");
        }
        p.positive(&format!("{key}.alpha"), self.alpha);
        if !(0.0..1.0).contains(&self.dropout) {
            p.push(&format!("{key}.dropout"), format!("must be in [0, 1), got {}", self.dropout));
        }
        if self.target_modules.is_empty() {
            p.push(&format!("{key}.target_modules"), "must name at least one module");
        }
        for t in &self.target_modules {
            if !TARGETS.contains(&t.as_str()) {
                p.push(&format!("{key}.target_modules"), format!("unknown module {t:?} (known: {})", TARGETS.join(", ")));
            }
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn targets(&self, module: &str) -> bool {
        self.enabled && self.target_modules.iter().any(|t| t == module)
    }
}

pub fn is_adapter_name(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// `model.layers.0.self_attn.q_proj.lora_A.weight` -> the name `peft` saves it under.
pub fn peft_name(name: &str) -> String {
    format!("base_model.model.{name}")
}

#[derive(Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    scale: f64,
    dropout: f64,
}

/// A linear layer with an optional LoRA adapter.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// `module` is the HF module name (q_proj, ...) matched against the LoRA targets.
    pub fn new(
        vs: tch::nn::Path,
        module: &str,
        fan_in: i64,
        fan_out: i64,
        bias: bool,
        lora: Option<&LoraConfig>,
        trainable: bool,
    ) -> Self {
        let (k, d) = (vs.kind(), vs.device());
        let weight = vs.add("weight", Tensor::zeros([fan_out, fan_in], (k, d)), trainable);
        let bias = bias.then(|| vs.add("bias", Tensor::zeros([fan_out], (k, d)), trainable));
        let lora = lora.filter(|l| l.targets(module)).map(|l| {
            let r = l.rank as i64;
            // PEFT's init: A ~ kaiming-uniform(a = sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0,
            // so the adapted model starts equal to the base model.
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a = Tensor::empty([r, fan_in], (k, d)).uniform_(-bound, bound);
            Lora {
                a: (&vs / "lora_A").add("weight", a, true),
                b: (&vs / "lora_B").add("weight", Tensor::zeros([fan_out, r], (k, d)), true),
                scale: l.scale(),
                dropout: l.dropout,
            }
        });
        Self { weight, bias, lora }
    }

    pub fn forward(&self, x: &Tensor, f: Fwd) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.lora {
            Some(l) if f.adapters => {
                let xd = if f.train && l.dropout > 0.0 { x.dropout(l.dropout, true) } else { x.shallow_clone() };
                y + xd.linear::<Tensor>(&l.a, None).linear::<Tensor>(&l.b, None) * l.scale
            }
            _ => y,
        }
    }

    /// W + scale * B A (the base weight when there is no adapter).
    pub fn merged_weight(&self) -> Tensor {
        let _g = tch::no_grad_guard();
        match &self.lora {
            Some(l) => {
                let delta = l.b.to_kind(tch::Kind::Float).matmul(&l.a.to_kind(tch::Kind::Float)) * l.scale;
                (self.weight.to_kind(tch::Kind::Float) + delta).to_kind(self.weight.kind())
            }
            None => self.weight.detach(),
        }
    }
}

/// `adapter_config.json` as `peft` writes it for a causal LM.
pub fn write_adapter_config(dir: &Path, cfg: &LoraConfig, base_model: &Path) -> Result<()> {
    ensure!(cfg.enabled, "LoRA is not enabled");
    let v = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model.display().to_string(),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
    });
    crate::fsutil::atomic_write(&dir.join("adapter_config.json"), &serde_json::to_vec_pretty(&v)?)
}
