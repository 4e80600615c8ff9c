//! `orchestrator plan`: the GPU memory budget of a run, from its config and the model's
//! config.json, before anything loads.
//!
//! The order of a run fixes the arithmetic. The learner loads first (weights, trainable
//! parameters, AdamW state). The engine then loads its own copy of the weights, and mistral.rs
//! 0.8.1 sizes the paged KV cache as `memory_fraction x total GPU memory - memory in use at that
//! moment` (`calculate_cache_config`, `MemoryGpuConfig::Utilization`): the fraction is a target
//! for the whole GPU, not a share of what is free, and a fraction below what is already in use
//! leaves no KV cache at all (mistral.rs stops with "Num GPU blocks is 0"). Gradients and
//! activations come later, during the update, on top of everything that stays allocated.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::config::{Build, Config, DType};
use crate::learner::config::LearnerDType;
use crate::learner::model::Config as ModelShape;
use crate::learner::Algorithm;
use crate::synth::{Like, Shape, SynthDType};

const GIB: f64 = (1u64 << 30) as f64;

/// CUDA context, cuBLAS/cuDNN workspaces and allocator slack of the one process (assumed).
pub const CUDA_OVERHEAD: u64 = 1 << 30;

/// `orchestrator plan` (its `--help` ends with [`ASSUMPTIONS`]).
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// Run config (TOML, environment overrides apply); checked as for a CUDA build.
    pub config: PathBuf,
    /// Total GPU memory as nvidia-smi reports it, e.g. 81559MiB (H100 80GB), 143771MiB (H200),
    /// 80GiB, 141GB (GB = 10^9, GiB = 2^30; a plain number is bytes).
    #[arg(long, default_value = "80GiB", value_parser = parse_size)]
    pub gpu_memory: u64,
    /// Use this model's shape instead of the config.json in `[model] path`.
    #[arg(long, value_enum)]
    pub like: Option<Like>,
    /// Prompt tokens per rollout, for the KV demand and the engine's prefill workspace.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Also write the estimate (bytes) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub const ASSUMPTIONS: &str = "\
Assumptions (estimates from the shapes, not measurements):
  - One GPU holds the engine and, when learner.device is cuda, the learner; the learner loads first.
  - KV cache (paged attention, mistral.rs 0.8.1): memory_fraction x GPU memory - memory in use when
    the engine starts (learner weights, trainable parameters, AdamW state, engine weights, CUDA
    overhead); bytes/token = layers x 2 x KV heads x head_dim x model dtype. Without paged attention
    the cache grows per sequence: max_num_seqs x (prompt + max_new_tokens) tokens.
  - Engine workspace: f32 logits of max_num_seqs rows (twice) plus one MLP's intermediates
    (3 x intermediate) for a prefill of max_num_seqs x --prompt-tokens tokens.
  - AdamW (src/learner/optim.rs): f32 m and v for every trainable parameter, plus an f32 master
    copy when the learner dtype is not f32; the step needs ~3 f32 temporaries of the largest
    trainable tensor. Gradients are in the learner dtype. LoRA A/B are in the learner dtype.
  - Full fine-tuning with kl_coef > 0 keeps a frozen reference copy; LoRA uses the base model.
  - Activations at micro_batch_tokens T (dtype s bytes; RmsNorm works in f32), per layer:
    T x [(8 + 4s) hidden + s (5 q_width + 4 kv_width) + 4 heads + 4 s intermediate + s rank x adapted
    modules], flash/efficient attention (no L x L matrix), plus ~3 T x intermediate x s of backward
    temporaries. With activation_recompute: every layer's input (T x hidden x s) plus one layer.
    Without: all layers.
  - Log-prob chunk: logprob_chunk rows x vocab x (16 + 2s) bytes (f32 logits, log-softmax and
    their gradients, dtype copies), back-propagated chunk by chunk.
  - The engine's workspace and the learner's update do not overlap in time.
  - CUDA context, library workspaces and allocator slack: 1 GiB for the process.
  - An embedded judge's model is not counted.";

/// `80GiB`, `141GB`, `81559MiB`, `1024`: bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size like 80GiB or 141GB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1_048_576.0,
        "g" | "gib" => GIB,
        "t" | "tib" => GIB * 1024.0,
        u => return Err(format!("{s:?}: unknown unit {u:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    if !(x > 0.0) || !x.is_finite() {
        return Err(format!("{s:?} must be a positive size"));
    }
    Ok((x * mult) as u64)
}

/// One line of the budget.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub name: &'static str,
    pub bytes: u64,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub gpu_memory: u64,
    pub model: String,
    pub parameters: u64,
    pub engine: Vec<Item>,
    pub learner: Vec<Item>,
    pub learner_on_gpu: bool,
    pub kv_bytes_per_token: u64,
    /// Tokens the KV cache holds (paged attention) or needs (without).
    pub kv_tokens: u64,
    pub kv_tokens_demand: u64,
    /// KV cache after the engine reloads at a weight sync (the learner's cache still held).
    pub kv_bytes_after_sync: u64,
    pub kv_tokens_after_sync: u64,
    /// In use when the engine sizes its KV cache.
    pub at_engine_start: u64,
    /// What `orchestrator bench learner` allocates: weights, trainable, gradients, activations,
    /// log-prob chunk (no optimizer).
    pub learner_fwd_bwd: u64,
    pub activations_recompute: u64,
    pub activations_no_recompute: u64,
    pub peak: u64,
    pub fits: bool,
    pub problems: Vec<String>,
    pub max_micro_batch_tokens: Option<u64>,
    /// memory_fraction range that leaves room for the update and holds the KV demand.
    pub memory_fraction_range: Option<(f64, f64)>,
}

fn dtype_bytes(d: DType) -> u64 {
    match d {
        DType::F32 => 4,
        DType::Bf16 | DType::F16 => 2,
    }
}

/// Parameter counts of a model shape.
struct Counts {
    base: u64,
    largest: u64,
}

fn counts(m: &ModelShape) -> Counts {
    let (h, i, v, l) = (m.hidden_size as u64, m.intermediate_size as u64, m.vocab_size as u64, m.num_hidden_layers as u64);
    let (q, kv) = ((m.num_attention_heads * m.head_dim()) as u64, (m.kv_heads() * m.head_dim()) as u64);
    let qwen = m.arch().ok() == Some(crate::learner::model::Arch::Qwen2);
    let attn_bias = !qwen && m.attention_bias.unwrap_or(false);
    let qkv_b = if qwen || attn_bias { q + 2 * kv } else { 0 };
    let o_b = if attn_bias { h } else { 0 };
    let mlp_b = if m.mlp_bias.unwrap_or(false) { 2 * i + h } else { 0 };
    let layer = h * q + 2 * h * kv + q * h + 3 * h * i + qkv_b + o_b + mlp_b + 2 * h;
    let embed = v * h;
    let head = if m.tie_word_embeddings { 0 } else { v * h };
    Counts { base: embed + head + l * layer + h, largest: embed.max(h * i) }
}

/// LoRA parameters: rank x (fan_in + fan_out) for every targeted projection of every layer.
fn lora_params(m: &ModelShape, rank: u64, targets: &[String]) -> (u64, u64) {
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let (q, kv) = ((m.num_attention_heads * m.head_dim()) as u64, (m.kv_heads() * m.head_dim()) as u64);
    let mut per_layer = 0;
    let mut adapted = 0;
    for t in targets {
        let (fi, fo) = match t.as_str() {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => continue,
        };
        per_layer += rank * (fi + fo);
        adapted += 1;
    }
    (per_layer * m.num_hidden_layers as u64, adapted)
}

/// Inputs of the learner's activation estimate.
#[derive(Debug, Clone, Copy)]
struct Act {
    h: u64,
    i: u64,
    q: u64,
    kv: u64,
    heads: u64,
    layers: u64,
    s: u64,
    lora: u64,
}

impl Act {
    fn per_layer(&self, t: u64) -> u64 {
        let Act { h, i, q, kv, heads, s, lora, .. } = *self;
        t * ((8 + 4 * s) * h + s * (5 * q + 4 * kv) + 4 * heads + 4 * s * i + s * lora) + 3 * t * i * s
    }
    fn recompute(&self, t: u64) -> u64 {
        (self.layers + 2) * t * self.h * self.s + self.per_layer(t)
    }
    fn no_recompute(&self, t: u64) -> u64 {
        2 * t * self.h * self.s + self.layers * self.per_layer(t)
    }
}

pub fn plan(cfg: &Config, shape: &ModelShape, model_name: String, gpu: u64, prompt_tokens: u64) -> Plan {
    let c = counts(shape);
    let (h, i, v, l) = (shape.hidden_size as u64, shape.intermediate_size as u64, shape.vocab_size as u64, shape.num_hidden_layers as u64);
    let (nh, d) = (shape.num_attention_heads as u64, shape.head_dim() as u64);
    let kvw = shape.kv_heads() as u64 * d;
    let se = dtype_bytes(cfg.model.dtype);
    let lc = &cfg.learner;
    let sl: u64 = match lc.dtype {
        LearnerDType::F32 => 4,
        LearnerDType::Bf16 => 2,
    };
    let gib = |b: u64| b as f64 / GIB;

    // Engine.
    let eng = &cfg.engine;
    let engine_weights = c.base * se;
    let kv_per_token = l * 2 * kvw * se;
    let demand = eng.max_num_seqs as u64 * (prompt_tokens + eng.sampling.max_new_tokens as u64);
    let engine_ws = eng.max_num_seqs as u64 * v * 4 * 2 + eng.max_num_seqs as u64 * prompt_tokens * 3 * i * se;

    // Learner.
    let lora = lc.lora.enabled;
    let (lora_n, adapted) = if lora { lora_params(shape, lc.lora.rank as u64, &lc.lora.target_modules) } else { (0, 0) };
    let vh = if lc.algorithm == Algorithm::Ppo { h + 1 } else { 0 };
    let trainable = if lora { lora_n + vh } else { c.base + vh };
    let largest = if lora { (lc.lora.rank as u64) * i.max(h) } else { c.largest };
    let learner_weights = c.base * sl;
    let trainable_bytes = if lora { (lora_n + vh) * sl } else { vh * sl };
    let adam = trainable * (8 + if sl == 4 { 0 } else { 4 });
    let grads = trainable * sl;
    let reference = if lc.kl_coef > 0.0 && !lora { c.base * sl } else { 0 };
    let opt_tmp = 3 * largest * 4;
    let act = Act { h, i, q: nh * d, kv: kvw, heads: nh, layers: l, s: sl, lora: if lora { lc.lora.rank as u64 * adapted } else { 0 } };
    let t = lc.micro_batch_tokens as u64;
    let activations = |t: u64| if lc.activation_recompute { act.recompute(t) } else { act.no_recompute(t) };
    let logprob = |t: u64| (lc.logprob_chunk as u64).min(t) * v * (16 + 2 * sl) + 2 * t * h * sl;
    let update = |t: u64| grads + activations(t) + logprob(t) + opt_tmp;
    let learner_static = learner_weights + trainable_bytes + adam + reference;
    let on_gpu = lc.device.starts_with("cuda");

    let at_start = CUDA_OVERHEAD + engine_weights + if on_gpu { learner_static } else { 0 };
    let paged = eng.paged_attention.enabled;
    let f = eng.paged_attention.memory_fraction;
    let learner_update = if on_gpu { update(t) } else { 0 };
    let fg = (f * gpu as f64) as i64;
    let kv_bytes = if paged { (fg - at_start as i64).max(0) as u64 } else { demand * kv_per_token };
    // Every weight sync reloads the engine, which sizes its cache again while libtorch's
    // caching allocator still holds the update's memory.
    let kv_after_sync = if paged { (fg - (at_start + learner_update) as i64).max(0) as u64 } else { kv_bytes };
    let block = (eng.paged_attention.block_size.max(1) as u64) * kv_per_token;
    let tokens_of = |b: u64| if paged { b / block * eng.paged_attention.block_size as u64 } else { demand };
    let (kv_tokens, kv_tokens_after_sync) = (tokens_of(kv_bytes), tokens_of(kv_after_sync));
    let peak = at_start + kv_bytes + engine_ws.max(learner_update);

    let mut problems = Vec::new();
    if paged && kv_bytes < block {
        problems.push(format!(
            "engine.paged_attention.memory_fraction: {f} x {:.1} GiB = {:.1} GiB is below the {:.1} GiB in use when the \
             engine starts, so mistral.rs gets no KV cache (\"Num GPU blocks is 0\"); it needs more than {:.3}",
            gib(gpu),
            f * gib(gpu),
            gib(at_start),
            (at_start + block) as f64 / gpu as f64
        ));
    } else if paged && kv_after_sync < block {
        problems.push(format!(
            "engine.paged_attention.memory_fraction: after the first update libtorch keeps {:.1} GiB cached, so the \
             engine reloaded at the first weight sync finds {:.1} GiB in use, above {f} x {:.1} GiB: no KV cache; \
             it needs more than {:.3} (or a smaller learner.micro_batch_tokens)",
            gib(learner_update),
            gib(at_start + learner_update),
            gib(gpu),
            (at_start + learner_update + block) as f64 / gpu as f64
        ));
    }
    if peak > gpu {
        problems.push(format!("peak {:.1} GiB exceeds the GPU's {:.1} GiB", gib(peak), gib(gpu)));
    }
    let fits = problems.is_empty();

    // Largest micro_batch_tokens whose update fits beside everything else (multiples of 256).
    let room = (gpu as i64 - (at_start + kv_bytes) as i64).min(if paged { fg - (at_start + block) as i64 } else { i64::MAX });
    let max_mbt = if !on_gpu {
        None
    } else {
        let ok = |t: u64| (update(t) as i64) <= room;
        if !ok(256) {
            Some(0)
        } else {
            let (mut lo, mut hi) = (256u64, 256u64);
            while ok(hi) && hi < (1 << 24) {
                lo = hi;
                hi *= 2;
            }
            while hi - lo > 256 {
                let mid = (lo + hi) / 2 / 256 * 256;
                if ok(mid) {
                    lo = mid
                } else {
                    hi = mid
                }
            }
            Some(lo)
        }
    };
    let fraction_range = paged.then(|| {
        let need = demand.div_ceil(eng.paged_attention.block_size.max(1) as u64) * block;
        let lo = (at_start + learner_update + need) as f64 / gpu as f64;
        let hi = 1.0 - engine_ws.max(learner_update) as f64 / gpu as f64;
        (lo, hi)
    });

    let mut engine = vec![
        Item { name: "engine weights", bytes: engine_weights, note: format!("{:.3} B parameters x {se} bytes", c.base as f64 / 1e9) },
        Item {
            name: "KV cache",
            bytes: kv_bytes,
            note: if paged {
                format!(
                    "paged: {f} x {:.1} GiB - {:.1} GiB in use = {} tokens at {:.1} KiB/token (demand {} = {} seqs x ({} + {}))",
                    gib(gpu),
                    gib(at_start),
                    kv_tokens,
                    kv_per_token as f64 / 1024.0,
                    demand,
                    eng.max_num_seqs,
                    prompt_tokens,
                    eng.sampling.max_new_tokens
                )
            } else {
                format!(
                    "not paged: {demand} tokens = {} seqs x ({prompt_tokens} + {}) at {:.1} KiB/token",
                    eng.max_num_seqs,
                    eng.sampling.max_new_tokens,
                    kv_per_token as f64 / 1024.0
                )
            },
        },
        Item {
            name: "KV cache after a sync",
            bytes: kv_after_sync,
            note: if paged {
                format!("{kv_tokens_after_sync} tokens: reloaded while the learner's update memory stays cached")
            } else {
                "as above".into()
            },
        },
        Item { name: "engine workspace", bytes: engine_ws, note: format!("logits of {} rows + prefill of {} tokens", eng.max_num_seqs, eng.max_num_seqs as u64 * prompt_tokens) },
    ];
    engine.push(Item { name: "CUDA context + workspaces", bytes: CUDA_OVERHEAD, note: "assumed".into() });
    let what = if lora {
        format!("LoRA r{} on {adapted} modules: {:.1} M (+ value head {vh})", lc.lora.rank, lora_n as f64 / 1e6)
    } else {
        format!("full fine-tuning: {:.3} B", trainable as f64 / 1e9)
    };
    let learner = vec![
        Item { name: "learner weights", bytes: learner_weights, note: format!("{sl} bytes/parameter, {}", lc.device) },
        Item { name: "trainable parameters", bytes: trainable_bytes, note: what },
        Item { name: "AdamW state", bytes: adam, note: format!("f32 m, v{} for {trainable} parameters", if sl == 4 { "" } else { ", master" }) },
        Item { name: "reference copy", bytes: reference, note: if reference > 0 { "full fine-tuning with kl_coef > 0".into() } else { "none (LoRA: adapters off; or kl_coef = 0)".into() } },
        Item { name: "gradients", bytes: grads, note: format!("{sl} bytes/trainable parameter") },
        Item {
            name: "activations",
            bytes: activations(t),
            note: format!(
                "micro_batch_tokens {t}, recompute {}: {:.2} GiB with recompute, {:.2} GiB without",
                lc.activation_recompute,
                gib(act.recompute(t)),
                gib(act.no_recompute(t))
            ),
        },
        Item { name: "log-prob chunk", bytes: logprob(t), note: format!("{} rows x {v} vocab", (lc.logprob_chunk as u64).min(t)) },
        Item { name: "optimizer step temporaries", bytes: opt_tmp, note: "3 f32 copies of the largest trainable tensor".into() },
    ];
    Plan {
        gpu_memory: gpu,
        model: model_name,
        parameters: c.base,
        engine,
        learner,
        learner_on_gpu: on_gpu,
        kv_bytes_per_token: kv_per_token,
        kv_tokens,
        kv_tokens_demand: demand,
        kv_bytes_after_sync: kv_after_sync,
        kv_tokens_after_sync,
        at_engine_start: at_start,
        learner_fwd_bwd: learner_weights + trainable_bytes + grads + activations(t) + logprob(t),
        activations_recompute: act.recompute(t),
        activations_no_recompute: act.no_recompute(t),
        peak,
        fits,
        problems,
        max_micro_batch_tokens: max_mbt,
        memory_fraction_range: fraction_range,
    }
}

impl Plan {
    pub fn render(&self, cfg_path: &Path, cfg: &Config) -> String {
        let g = |b: u64| format!("{:>8.2} GiB", b as f64 / GIB);
        let mut s = format!(
            "plan: {} on a {:.1} GiB GPU\nmodel: {} ({:.3} B parameters)\n",
            cfg_path.display(),
            self.gpu_memory as f64 / GIB,
            self.model,
            self.parameters as f64 / 1e9
        );
        s += "engine (mistral.rs):\n";
        for it in &self.engine {
            s += &format!("  {:<28}{}  {}\n", it.name, g(it.bytes), it.note);
        }
        s += &format!("learner (tch, {}):\n", if self.learner_on_gpu { "on this GPU" } else { "host memory, not on the GPU" });
        for it in &self.learner {
            s += &format!("  {:<28}{}  {}\n", it.name, g(it.bytes), it.note);
        }
        s += &format!("in use when the engine starts  {}\n", g(self.at_engine_start));
        s += &format!("peak                           {}  of {}\n", g(self.peak), g(self.gpu_memory).trim());
        if self.fits {
            s += "verdict: FITS\n";
        } else {
            s += "verdict: DOES NOT FIT\n";
            for p in &self.problems {
                s += &format!("  {p}\n");
            }
        }
        if self.fits && self.kv_tokens_after_sync < self.kv_tokens_demand {
            s += &format!(
                "note: after a sync the KV cache holds {} tokens, less than the {} that max_num_seqs x (prompt + max_new_tokens) \
                 can ask for: the engine then runs fewer sequences at once\n",
                self.kv_tokens_after_sync, self.kv_tokens_demand
            );
        }
        if let Some(m) = self.max_micro_batch_tokens {
            s += &format!(
                "largest learner.micro_batch_tokens that fits: {m} (configured {})\n",
                cfg.learner.micro_batch_tokens
            );
        }
        if let Some((lo, hi)) = self.memory_fraction_range {
            if lo <= hi {
                s += &format!(
                    "engine.paged_attention.memory_fraction that holds the KV demand and leaves room for the update: {lo:.3} to {hi:.3} (configured {})\n",
                    cfg.engine.paged_attention.memory_fraction
                );
            } else {
                s += &format!(
                    "no engine.paged_attention.memory_fraction holds the KV demand and leaves room for the update \
                     (needs >= {lo:.3}, room up to {hi:.3}): lower engine.max_num_seqs, max_new_tokens or micro_batch_tokens\n"
                );
            }
        }
        s
    }
}

/// The model shape: `--like`, or `[model] path`'s config.json.
fn shape_for(cfg: &Config, like: Option<Like>) -> Result<(ModelShape, String)> {
    if let Some(like) = like {
        let v = Shape::like(like).config_json(SynthDType::Bf16);
        let shape: ModelShape = serde_json::from_value(v)?;
        return Ok((shape, format!("{} shape (--like)", crate::synth::like_name(like))));
    }
    let dir = &cfg.model.path;
    if cfg.model.resolved_format() == crate::model::ModelFormat::Gguf {
        bail!("model.path {}: plan reads an HF directory's config.json, not a GGUF file (or pass --like)", dir.display());
    }
    let shape = ModelShape::from_dir(dir).with_context(|| format!("model.path {}: reading the model's shape (or pass --like)", dir.display()))?;
    Ok((shape, format!("{}", dir.join("config.json").display())))
}

pub fn run(a: PlanArgs) -> Result<()> {
    let cfg = Config::load_for(&a.config, std::env::vars(), Build::Cuda)?;
    let (shape, name) = shape_for(&cfg, a.like)?;
    let p = plan(&cfg, &shape, name, a.gpu_memory, a.prompt_tokens as u64);
    print!("{}", p.render(&a.config, &cfg));
    if let Some(path) = &a.json {
        crate::fsutil::atomic_write(path, &serde_json::to_vec_pretty(&p)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_size("80GiB").unwrap(), 80 << 30);
        assert_eq!(parse_size("141GB").unwrap(), 141_000_000_000);
        assert_eq!(parse_size("81559MiB").unwrap(), 81559 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("80 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("GiB").unwrap_err().contains("not a size"));
        assert!(parse_size("-3GB").is_err());
    }
}
