//! Saving, loading and exporting the learner.
//!
//! `save(dir)` writes `trainable.safetensors` (every trainable tensor by name: the full model, or
//! the LoRA adapters, plus the value head), `optimizer.safetensors` and `learner.json`
//! (counters). Every random draw of an update is a function of (seed, counters), so these files
//! are the whole training state. `export(dir)` writes an HF model directory with merged weights.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::lora::{is_adapter_name, peft_name, write_adapter_config};
use super::model::{copy_checked, read_all, write_all, CausalLm};
use super::Learner;

/// Tokenizer and generation files copied from the source model into an export.
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

#[derive(Debug, Serialize, Deserialize)]
struct State {
    updates: u64,
    optimizer_steps: u64,
    seed: u64,
    lora: bool,
    trainable: usize,
}

impl CausalLm {
    /// Every base weight under its HF name, LoRA adapters merged in.
    pub fn merged_weights(&self) -> Vec<(String, Tensor)> {
        let mut merged = self.lora_merged();
        let vars = self.vs.variables();
        self.base_names()
            .iter()
            .map(|n| {
                let t = merged.remove(n).unwrap_or_else(|| vars[n].detach());
                (n.clone(), t)
            })
            .collect()
    }

    /// The base weights training can change, under their HF names: the LoRA-targeted
    /// projections (merged) with adapters, every weight otherwise. A weight sync writes only
    /// these; the rest (`frozen_weights`) is written once per run.
    pub fn changed_weights(&self) -> Vec<(String, Tensor)> {
        let merged = self.lora_merged();
        if merged.is_empty() {
            return self.merged_weights();
        }
        merged.into_iter().collect()
    }

    /// The base weights training never changes (empty without LoRA).
    pub fn frozen_weights(&self) -> Vec<(String, Tensor)> {
        let merged = self.lora_merged();
        if merged.is_empty() {
            return Vec::new();
        }
        let vars = self.vs.variables();
        self.base_names()
            .iter()
            .filter(|n| !merged.contains_key(*n))
            .map(|n| (n.clone(), vars[n].detach()))
            .collect()
    }

    /// Projections carrying an adapter, with the adapter merged in, by HF weight name.
    fn lora_merged(&self) -> BTreeMap<String, Tensor> {
        let mut merged: BTreeMap<String, Tensor> = BTreeMap::new();
        for (i, l) in self.model.layers.iter().enumerate() {
            let a = &l.self_attn;
            let m = &l.mlp;
            for (n, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                if lin.lora.is_some() {
                    merged.insert(format!("model.layers.{i}.{n}.weight"), lin.merged_weight());
                }
            }
        }
        merged
    }

    /// LoRA adapter tensors under PEFT's names.
    pub fn adapter_weights(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(n, _)| is_adapter_name(n))
            .map(|(n, t)| (peft_name(&n), t.detach()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<()> {
    for f in COPIED {
        let from = src.join(f);
        if from.is_file() {
            let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            crate::fsutil::atomic_write(&dst.join(f), &bytes)?;
        }
    }
    Ok(())
}

impl Learner {
    /// Writes an HF model directory (config.json, tokenizer files, model.safetensors with LoRA
    /// merged) that `MistralEngine::load`/`reload` serve. Files are written atomically; the
    /// weights file last, so a reader never pairs new weights with a missing config.
    pub fn export(&self, dir: &Path) -> Result<()> {
        self.export_config(dir)?;
        write_all(&dir.join("model.safetensors"), &self.policy.merged_weights(), None)
    }

    /// Writes the model files of an HF directory except the weights: config.json and the
    /// tokenizer files of the source model.
    pub fn export_config(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cfg_src = self.model_dir.join("config.json");
        let cfg = std::fs::read(&cfg_src).with_context(|| format!("reading {}", cfg_src.display()))?;
        crate::fsutil::atomic_write(&dir.join("config.json"), &cfg)?;
        copy_tokenizer_files(&self.model_dir, dir)
    }

    /// Writes the LoRA adapter as `peft` does: adapter_config.json + adapter_model.safetensors.
    pub fn export_adapter(&self, dir: &Path) -> Result<()> {
        ensure!(self.cfg.lora.enabled, "export_adapter needs learner.lora.enabled = true");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_adapter_config(dir, &self.cfg.lora, &self.model_dir)?;
        write_all(&dir.join("adapter_model.safetensors"), &self.policy.adapter_weights(), None)
    }

    /// Saves trainable weights, optimizer state and counters into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_all(&dir.join("trainable.safetensors"), &self.params, None)?;
        self.opt.save(&dir.join("optimizer.safetensors"))?;
        let st = State {
            updates: self.updates,
            optimizer_steps: self.opt.step,
            seed: self.seed,
            lora: self.cfg.lora.enabled,
            trainable: self.params.len(),
        };
        crate::fsutil::atomic_write(&dir.join("learner.json"), &serde_json::to_vec_pretty(&st)?)
    }

    /// Restores what [`Learner::save`] wrote. Names and shapes must match this learner's
    /// trainable tensors exactly; an error names the first tensor that does not.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let sp = dir.join("learner.json");
        let st: State = serde_json::from_slice(&std::fs::read(&sp).with_context(|| format!("reading {}", sp.display()))?)
            .with_context(|| format!("parsing {}", sp.display()))?;
        ensure!(
            st.lora == self.cfg.lora.enabled,
            "{}: saved with lora = {}, this learner has lora = {}",
            sp.display(),
            st.lora,
            self.cfg.lora.enabled
        );
        let wp = dir.join("trainable.safetensors");
        let mut saved = read_all(&wp)?;
        for (name, dst) in &self.params {
            let src = saved.remove(name).with_context(|| format!("{}: missing tensor {name}", wp.display()))?;
            copy_checked(dst, &src, name).with_context(|| format!("{}", wp.display()))?;
        }
        if let Some(extra) = saved.keys().next() {
            bail!("{}: unexpected tensor {extra} (not a trainable tensor of this learner)", wp.display());
        }
        self.opt.load(&dir.join("optimizer.safetensors"))?;
        ensure!(self.opt.step == st.optimizer_steps, "{}: optimizer step {} != {}", sp.display(), self.opt.step, st.optimizer_steps);
        self.updates = st.updates;
        Ok(())
    }
}
