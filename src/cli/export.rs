//! `orchestrator export RUN|CKPT --out DIR [--adapter]`: a run's policy for other tools, either
//! as a merged HF model directory (transformers, vLLM, mistral.rs load it as is) or, with LoRA,
//! as a PEFT adapter directory (`PeftModel.from_pretrained(base, DIR)`, vLLM's
//! `load_lora_adapter`). And `orchestrator logits`, the learner's own logits for given token ids,
//! so another framework's forward pass on an export can be compared with ours.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::learner::model::{write_all, CausalLm, Fwd};
use crate::learner::Learner;

#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// A run directory (its newest complete checkpoint) or a checkpoint directory.
    pub source: PathBuf,
    /// New directory to write; refused if it exists and is not empty.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the LoRA adapter as PEFT saves it (adapter_config.json, adapter_model.safetensors)
    /// instead of the merged model.
    #[arg(long)]
    pub adapter: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LogitsArgs {
    /// A run directory, a checkpoint directory (the learner with its LoRA adapters applied, not
    /// merged) or an HF model directory.
    pub model: PathBuf,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<i64>,
    /// safetensors file to write: `ids` [1, L] (i64) and `logits` [1, L, vocab] (f32).
    #[arg(long)]
    pub out: PathBuf,
}

fn checkpoint(source: &Path) -> Result<PathBuf> {
    if !source.is_dir() {
        bail!("{} is not a directory (expected a run directory or a checkpoint directory)", source.display());
    }
    crate::rundir::checkpoint_of(source)?.with_context(|| {
        format!("{} is neither a run directory (with checkpoints/) nor a checkpoint directory (with a manifest)", source.display())
    })
}

/// `out` must be new (or an empty directory), so an export never overwrites anything.
fn check_out(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = out.is_dir() && std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty {
            bail!("--out {} already exists and is not an empty directory; nothing was written", out.display());
        }
    }
    Ok(())
}

pub fn run(args: ExportArgs) -> Result<()> {
    check_out(&args.out)?;
    let ckpt = checkpoint(&args.source)?;
    eprintln!("loading {}", ckpt.display());
    let learner = crate::rundir::checkpoint_learner(&ckpt)?;
    if args.adapter && !learner.config().lora.enabled {
        bail!(
            "--adapter: {} was trained without LoRA (learner.lora.enabled = false), so there is no adapter; \
             export the merged model instead (without --adapter)",
            ckpt.display()
        );
    }
    // Staged beside the target and renamed, so `out` is either absent or complete.
    let name = args.out.file_name().map(|n| n.to_string_lossy().to_string()).context("--out has no directory name")?;
    let stage = args.out.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    let written = (|| -> Result<()> {
        if args.adapter {
            learner.export_adapter(&stage)?;
        } else {
            learner.export(&stage)?;
        }
        if args.out.exists() {
            std::fs::remove_dir(&args.out).with_context(|| format!("replacing the empty directory {}", args.out.display()))?;
        }
        std::fs::rename(&stage, &args.out).with_context(|| format!("renaming {} to {}", stage.display(), args.out.display()))?;
        if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::fsutil::sync_dir(parent)?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&stage);
    }
    written?;
    let mut files: Vec<String> = std::fs::read_dir(&args.out)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .collect();
    files.sort();
    let what = if args.adapter { "PEFT LoRA adapter" } else { "merged HF model" };
    println!("{what} of {}: {} ({})", ckpt.display(), args.out.display(), files.join(", "));
    if args.adapter {
        println!("base model: {}", learner.model_dir().display());
    }
    Ok(())
}

pub fn logits(args: LogitsArgs) -> Result<()> {
    enum Model {
        Trained(Learner),
        Plain(CausalLm),
    }
    let plain = args.model.join("config.json").is_file() && crate::rundir::checkpoint_of(&args.model)?.is_none();
    let model = if plain {
        Model::Plain(CausalLm::load(&args.model, Device::Cpu, Kind::Float, None, false)?)
    } else {
        Model::Trained(crate::rundir::checkpoint_learner(&checkpoint(&args.model)?)?)
    };
    let lm = match &model {
        Model::Trained(l) => l.policy(),
        Model::Plain(m) => m,
    };
    let vocab = lm.cfg.vocab_size as i64;
    if let Some(bad) = args.ids.iter().find(|&&i| i < 0 || i >= vocab) {
        bail!("--ids: {bad} is outside the vocabulary (0..{vocab})");
    }
    let ids = Tensor::from_slice(&args.ids).view([1, args.ids.len() as i64]).to_device(lm.device());
    let out = tch::no_grad(|| lm.logits(&ids, None, Fwd::EVAL)).to_kind(Kind::Float).to_device(Device::Cpu);
    write_all(&args.out, &[("ids".into(), ids.to_device(Device::Cpu)), ("logits".into(), out)], None)?;
    println!("logits [1, {}, {vocab}] -> {}", args.ids.len(), args.out.display());
    Ok(())
}
