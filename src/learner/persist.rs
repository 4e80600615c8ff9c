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
use super::io::{write_sources, Source};
use super::lora::Linear;
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
    /// Optimizer steps skipped in a row (non-finite gradients), so "in a row" survives a resume.
    #[serde(default)]
    skipped_in_a_row: u64,
    seed: u64,
    lora: bool,
    trainable: usize,
}

/// The weights of an export, split by whether training can change them.
pub struct WeightSplit<'a> {
    /// The LoRA-targeted projections (merged when written) with adapters; every weight otherwise.
    pub changed: Vec<(String, Source<'a>)>,
    /// The base weights training never changes (empty without LoRA).
    pub frozen: Vec<(String, Source<'a>)>,
}

impl CausalLm {
    /// Projections carrying an adapter, by HF weight name.
    fn adapted(&self) -> BTreeMap<String, &Linear> {
        let mut out = BTreeMap::new();
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
                    out.insert(format!("model.layers.{i}.{n}.weight"), lin);
                }
            }
        }
        out
    }

    /// Every base weight under its HF name, split into what training changes and what it does
    /// not. Adapted projections are merged only when the writer reaches them, once per export.
    pub fn weight_split(&self) -> WeightSplit<'_> {
        let adapted = self.adapted();
        let vars = self.vs.variables();
        let mut split = WeightSplit { changed: Vec::new(), frozen: Vec::new() };
        for n in self.base_names() {
            match adapted.get(n) {
                Some(&lin) => {
                    let make: Box<dyn Fn() -> Tensor + '_> = Box::new(move || lin.merged_weight());
                    let src = Source::Lazy { shape: lin.weight.size(), kind: lin.weight.kind(), make };
                    split.changed.push((n.clone(), src));
                }
                None if adapted.is_empty() => split.changed.push((n.clone(), Source::Ready(vars[n].detach()))),
                None => split.frozen.push((n.clone(), Source::Ready(vars[n].detach()))),
            }
        }
        split
    }

    /// Every base weight under its HF name, LoRA adapters merged in (as they are written).
    pub fn merged_weights(&self) -> Vec<(String, Source<'_>)> {
        let WeightSplit { mut changed, frozen } = self.weight_split();
        changed.extend(frozen);
        changed.sort_by(|a, b| a.0.cmp(&b.0));
        changed
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
        write_sources(&dir.join("model.safetensors"), self.policy.merged_weights(), None, true)
    }

    /// The weights of a sync export, split (see [`WeightSplit`]).
    pub fn weight_split(&self) -> WeightSplit<'_> {
        self.policy.weight_split()
    }

    /// Identifies the frozen weights: the source model's directory and weight files (path,
    /// size, modification time) and which weights are frozen, in which dtype and shape (so a
    /// `learner.dtype` change rewrites it too). A sync may reuse a frozen file
    /// written under the same key only, so a changed `model.path` or LoRA target list (both can
    /// change on resume with `--allow-config-change`) rewrites it.
    pub fn frozen_key(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let dir = std::path::absolute(&self.model_dir).unwrap_or_else(|_| self.model_dir.clone());
        h.update(dir.to_string_lossy().as_bytes());
        for f in super::io::weight_files(&self.model_dir)? {
            let m = std::fs::metadata(&f).with_context(|| format!("reading {}", f.display()))?;
            let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
            h.update(format!("\n{}:{}:{}", f.display(), m.len(), mtime).as_bytes());
        }
        for (n, src) in self.policy.weight_split().frozen {
            let (kind, shape) = match &src {
                Source::Ready(t) => (t.kind(), t.size()),
                Source::Lazy { shape, kind, .. } => (*kind, shape.clone()),
            };
            h.update(format!("\n{n}:{kind:?}:{shape:?}").as_bytes());
        }
        Ok(format!("{:x}", h.finalize()))
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
            skipped_in_a_row: self.skipped_in_a_row,
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
        self.skipped_in_a_row = st.skipped_in_a_row;
        Ok(())
    }
}
