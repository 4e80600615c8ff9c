//! `orchestrator bench learner`: forward+backward tokens/s and peak memory of the tch learner's
//! training pass (trunk, chunked log-probs, manual head backward, optional per-layer recompute)
//! on a batch of seeded random token ids. `scripts/bench_learner_torch.py` runs the same work in
//! PyTorch eager and prints the ratio.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use crate::learner::batch::{token_stats, trunk_backward, trunk_forward, Entropy};
use crate::learner::config::{device_arg, parse_device, LearnerDType};
use crate::learner::model::{write_all, CausalLm, Fwd};
use crate::progress::Progress;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchLearnerArgs {
    /// HF model directory.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: LearnerDType,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = device_arg)]
    pub device: String,
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    /// Timed steps (after one untimed warm-up step); 0 reports peak memory and the warm-up time only.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Per-layer activation recompute.
    #[arg(long)]
    pub recompute: bool,
    #[arg(long, default_value_t = 1024)]
    pub logprob_chunk: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Writes the batch's ids and the first sequence's logits (for the PyTorch script).
    #[arg(long)]
    pub save_logits: Option<PathBuf>,
    /// LoRA adapters of this rank on all seven projections, base frozen (0 = every weight trainable).
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// Also write the measurements as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn vm_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn vm_hwm_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the kernel's peak-RSS counter (Linux >= 4.0), so the peak covers only what follows.
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

pub fn run(a: BenchLearnerArgs) -> Result<()> {
    tch::set_num_threads(a.threads);
    let device = parse_device(&a.device).with_context(|| format!("--device {:?}: cpu, cuda or cuda:N", a.device))?;
    let kind = match a.dtype {
        LearnerDType::F32 => Kind::Float,
        LearnerDType::Bf16 => Kind::BFloat16,
    };
    let rss_start = vm_rss_mb();
    let lora = (a.lora_rank > 0).then(|| crate::learner::lora::LoraConfig {
        enabled: true,
        rank: a.lora_rank,
        alpha: 2.0 * a.lora_rank as f64,
        ..Default::default()
    });
    let lm = CausalLm::load(&a.model, device, kind, lora.as_ref(), lora.is_none())?;
    let rss_loaded = vm_rss_mb();
    let v = lm.cfg.vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let ids: Vec<i64> = (0..a.batch * a.seq_len).map(|_| rng.random_range(0..v) as i64).collect();
    let ids = Tensor::from_slice(&ids).view([a.batch as i64, a.seq_len as i64]).to_device(device);
    if let Some(p) = &a.save_logits {
        let first = ids.narrow(0, 0, 1);
        let logits = tch::no_grad(|| lm.logits(&first, None, Fwd::EVAL)).to_kind(Kind::Float);
        write_all(p, &[("ids".into(), ids.shallow_clone()), ("logits".into(), logits)], None)?;
    }
    // Every position predicts the next token: L-1 targets per sequence.
    let (b, l) = (a.batch as i64, a.seq_len as i64);
    let pos: Vec<i64> = (0..b).flat_map(|i| (0..l - 1).map(move |j| i * l + j)).collect();
    let pred_pos = Tensor::from_slice(&pos).to_device(device);
    let targets = ids.narrow(1, 1, l - 1).reshape([-1]);
    let n = pos.len() as f64;
    let f = Fwd { adapters: true, train: true };
    let step = || {
        let trunk = trunk_forward(&lm, &ids, f, a.recompute, a.seed);
        let sel = trunk.h().view([-1, lm.cfg.hidden_size as i64]).index_select(0, &pred_pos);
        let hd = sel.detach().set_requires_grad(true);
        // Loss = -mean ln p: d loss / d ln p = -1/n for every token, so one graph pass per chunk.
        let chunk = a.logprob_chunk as i64;
        let rows = hd.size()[0];
        let mut loss = 0.0;
        let mut s = 0;
        while s < rows {
            let len = chunk.min(rows - s);
            let (lp, _) = token_stats(&hd.narrow(0, s, len), lm.lm_head_weight(), &targets.narrow(0, s, len), 1.0, a.logprob_chunk, Entropy::Skip);
            let obj = lp.sum(Kind::Float) * (-1.0 / n);
            loss += obj.double_value(&[]);
            obj.backward();
            s += len;
        }
        trunk_backward(&lm, &ids, trunk, &pred_pos, &hd.grad(), f, a.seed);
        for (_, t) in lm.vs.variables() {
            let mut t = t;
            t.zero_grad();
        }
        loss
    };
    // The peak covers the warm-up step too (the same work), so `--steps 0` measures memory alone.
    let reset = reset_hwm();
    let w0 = Instant::now();
    let warm = step();
    let warm_secs = w0.elapsed().as_secs_f64();
    let prog = Progress::new(a.steps as u64, "bench learner");
    let t0 = Instant::now();
    let mut loss = warm;
    for _ in 0..a.steps {
        loss = step();
        prog.inc(1);
    }
    let secs = t0.elapsed().as_secs_f64();
    prog.finish();
    let tokens = (a.batch * a.seq_len * a.steps) as f64;
    println!(
        "model {} | batch {} x {} | {} | {:?} | threads {} | recompute {} | lora rank {}",
        a.model.display(),
        a.batch,
        a.seq_len,
        clap::ValueEnum::to_possible_value(&a.dtype).map(|v| v.get_name().to_string()).unwrap_or_default(),
        device,
        a.threads,
        a.recompute,
        a.lora_rank
    );
    println!("loss {loss:.6} (warm-up step {warm:.6})");
    let peak_mb = if reset { vm_hwm_mb() } else { None };
    let peak = peak_mb.map(|m| format!("{m:.0} MB")).unwrap_or_else(|| "unavailable".into());
    if let (Some(s), Some(l)) = (rss_start, rss_loaded) {
        println!("RSS before loading {s:.0} MB, after loading {l:.0} MB (host memory; a GPU's is not in it)");
    }
    let tok_s = if a.steps == 0 { None } else { Some(tokens / secs) };
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "model": a.model.display().to_string(),
            "batch": a.batch,
            "seq_len": a.seq_len,
            "dtype": a.dtype,
            "device": a.device,
            "recompute": a.recompute,
            "lora_rank": a.lora_rank,
            "logprob_chunk": a.logprob_chunk,
            "steps": a.steps,
            "tokens_per_s": tok_s,
            "warmup_secs": warm_secs,
            "loss": loss,
            "rss_start_mb": rss_start,
            "rss_loaded_mb": rss_loaded,
            "peak_rss_mb": peak_mb,
        });
        crate::fsutil::atomic_write(path, &serde_json::to_vec_pretty(&v)?)?;
    }
    if a.steps == 0 {
        println!("tch warm-up step only: {warm_secs:.3} s, peak RSS {peak}");
    } else {
        println!("tch fwd+bwd: {:.1} tokens/s ({:.3} s/step), peak RSS {peak}", tokens / secs, secs / a.steps as f64);
    }
    Ok(())
}
