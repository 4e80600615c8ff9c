//! Real-shape synthetic models: an HF directory with a known model's exact config (Qwen2.5-7B,
//! Qwen2.5-0.5B, Llama-3.1-8B, SmolLM2-135M), deterministic random weights sharded like HF, and a
//! byte-level BPE tokenizer whose vocabulary is exactly the model's, so every id the engine can
//! sample decodes. Speed and memory do not depend on weight values, so such a directory costs
//! what the real model costs: it is how the 7B path is measured where no weights can be fetched.
//!
//! Weights are written streaming, straight into each shard (the safetensors header is computed
//! from the shapes first), in blocks generated in parallel by a counter-based PRNG: the bytes do
//! not depend on the number of threads.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};


mod tokenizer;
pub use tokenizer::covering_tokenizer;

/// The model a synthetic directory copies the shape of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Like {
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
    #[value(name = "qwen2.5-0.5b")]
    Qwen25_0_5b,
    #[value(name = "llama-3.1-8b")]
    Llama31_8b,
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
}

/// The name `--like` takes (`qwen2.5-7b`).
pub fn like_name(like: Like) -> String {
    use clap::ValueEnum;
    like.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SynthDType {
    #[default]
    Bf16,
    F32,
}

impl SynthDType {
    pub fn bytes(self) -> usize {
        match self {
            SynthDType::Bf16 => 2,
            SynthDType::F32 => 4,
        }
    }
    fn safetensors_name(self) -> &'static str {
        match self {
            SynthDType::Bf16 => "BF16",
            SynthDType::F32 => "F32",
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            SynthDType::Bf16 => "bfloat16",
            SynthDType::F32 => "float32",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
}

/// Everything of an HF config.json that changes the forward pass or the cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    /// llama3-style `rope_scaling` (Llama 3.1), as HF writes it.
    pub rope_scaling: Option<Value>,
    pub tie_word_embeddings: bool,
    pub rms_norm_eps: f64,
}

impl Shape {
    /// The published config of each model (the HF `config.json` of its -Instruct release).
    pub fn like(like: Like) -> Self {
        match like {
            Like::Qwen25_7b => Shape {
                family: Family::Qwen2,
                vocab_size: 152_064,
                hidden_size: 3584,
                intermediate_size: 18_944,
                num_hidden_layers: 28,
                num_attention_heads: 28,
                num_key_value_heads: 4,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                rope_scaling: None,
                tie_word_embeddings: false,
                rms_norm_eps: 1e-6,
            },
            Like::Qwen25_0_5b => Shape {
                family: Family::Qwen2,
                vocab_size: 151_936,
                hidden_size: 896,
                intermediate_size: 4864,
                num_hidden_layers: 24,
                num_attention_heads: 14,
                num_key_value_heads: 2,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                rope_scaling: None,
                tie_word_embeddings: true,
                rms_norm_eps: 1e-6,
            },
            Like::Llama31_8b => Shape {
                family: Family::Llama,
                vocab_size: 128_256,
                hidden_size: 4096,
                intermediate_size: 14_336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                max_position_embeddings: 131_072,
                rope_theta: 500_000.0,
                rope_scaling: Some(json!({
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                    "rope_type": "llama3"
                })),
                tie_word_embeddings: false,
                rms_norm_eps: 1e-5,
            },
            Like::Smollm2_135m => Shape {
                family: Family::Llama,
                vocab_size: 49_152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                max_position_embeddings: 8192,
                rope_theta: 100_000.0,
                rope_scaling: None,
                tie_word_embeddings: true,
                rms_norm_eps: 1e-5,
            },
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The tensors of the model in HF names and the order HF shards them (layer by layer).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.num_key_value_heads * self.head_dim();
        // Uniform weights with the variance of N(0, scale^2 / fan_in): activations of order one
        // through every layer, and logits with a standard deviation of about 2 (neither flat nor
        // one-hot), tied or not.
        let mat = |name: String, rows: usize, cols: usize, scale: f32| TensorSpec {
            name,
            shape: vec![rows, cols],
            center: 0.0,
            spread: scale * (3.0 / cols as f32).sqrt(),
        };
        let vec1 = |name: String, n: usize, center: f32, spread: f32| TensorSpec { name, shape: vec![n], center, spread };
        let mut t = vec![mat("model.embed_tokens.weight".into(), v, h, 2.0)];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            t.push(vec1(format!("{p}.input_layernorm.weight"), h, 1.0, 0.1));
            t.push(mat(format!("{p}.mlp.down_proj.weight"), h, i, 1.0));
            t.push(mat(format!("{p}.mlp.gate_proj.weight"), i, h, 1.0));
            t.push(mat(format!("{p}.mlp.up_proj.weight"), i, h, 1.0));
            t.push(vec1(format!("{p}.post_attention_layernorm.weight"), h, 1.0, 0.1));
            let bias = self.family == Family::Qwen2;
            for (m, rows) in [("k_proj", kv), ("o_proj", h), ("q_proj", q), ("v_proj", kv)] {
                if bias && m != "o_proj" {
                    t.push(vec1(format!("{p}.self_attn.{m}.bias"), rows, 0.0, 0.2));
                }
                let cols = if m == "o_proj" { q } else { h };
                t.push(mat(format!("{p}.self_attn.{m}.weight"), rows, cols, 1.0));
            }
        }
        t.push(vec1("model.norm.weight".into(), h, 1.0, 0.1));
        if !self.tie_word_embeddings {
            t.push(mat("lm_head.weight".into(), v, h, 2.0));
        }
        t
    }

    /// Parameters stored in the weight files.
    pub fn parameters(&self) -> u64 {
        self.tensors().iter().map(|t| t.numel() as u64).sum()
    }

    /// HF config.json. Special token ids are the tokenizer's: the last three of the vocabulary.
    pub fn config_json(&self, dtype: SynthDType) -> Value {
        let (pad, bos, eos) = special_ids(self.vocab_size);
        let mut c = json!({
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype.torch_name(),
            "use_cache": true,
            "vocab_size": self.vocab_size,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        });
        match self.family {
            Family::Qwen2 => {
                c["architectures"] = json!(["Qwen2ForCausalLM"]);
                c["model_type"] = json!("qwen2");
                c["attention_dropout"] = json!(0.0);
                c["use_sliding_window"] = json!(false);
                c["sliding_window"] = json!(self.max_position_embeddings);
                c["max_window_layers"] = json!(self.num_hidden_layers);
            }
            Family::Llama => {
                c["architectures"] = json!(["LlamaForCausalLM"]);
                c["model_type"] = json!("llama");
                c["attention_bias"] = json!(false);
                c["attention_dropout"] = json!(0.0);
                c["mlp_bias"] = json!(false);
                c["head_dim"] = json!(self.head_dim());
                c["rope_scaling"] = self.rope_scaling.clone().unwrap_or(Value::Null);
            }
        }
        c
    }
}

/// (pad = `<|endoftext|>`, bos = `<|im_start|>`, eos = `<|im_end|>`): the last three ids.
pub fn special_ids(vocab: usize) -> (usize, usize, usize) {
    (vocab - 3, vocab - 2, vocab - 1)
}

/// One tensor: values `center + U(-spread, spread)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub center: f32,
    pub spread: f32,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What to write: a shape, a dtype, a seed and the largest shard.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub shape: Shape,
    pub dtype: SynthDType,
    pub seed: u64,
    /// A new shard starts before a tensor that would take the current one past this size.
    pub max_shard_bytes: u64,
}

/// HF's own default shard size is 5 GB; "a few GB" keeps the writes of one shard short.
pub const DEFAULT_SHARD_BYTES: u64 = 4_000_000_000;

/// What [`SynthSpec::write`] did.
#[derive(Debug, Clone)]
pub struct Written {
    pub bytes: u64,
    pub shards: usize,
    pub parameters: u64,
    pub secs: f64,
}

impl SynthSpec {
    pub fn new(like: Like, dtype: SynthDType, seed: u64) -> Self {
        Self { shape: Shape::like(like), dtype, seed, max_shard_bytes: DEFAULT_SHARD_BYTES }
    }

    /// Writes the directory `out` (which must not exist or be empty): built under a temporary
    /// name beside it and renamed into place, so a cut-short write leaves nothing at `out`.
    pub fn write(&self, out: &Path, progress: bool) -> Result<Written> {
        let t0 = std::time::Instant::now();
        if out.exists() {
            let empty = out.is_dir() && std::fs::read_dir(out)?.next().is_none();
            ensure!(empty, "{} already exists and is not empty; remove it or choose another --out", out.display());
            std::fs::remove_dir(out)?;
        }
        let name = out.file_name().context("--out needs a directory name")?.to_string_lossy().to_string();
        let tmp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let (bytes, shards) = self.write_into(&tmp, progress).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
        })?;
        std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        Ok(Written { bytes, shards, parameters: self.shape.parameters(), secs: t0.elapsed().as_secs_f64() })
    }

    fn write_into(&self, dir: &Path, progress: bool) -> Result<(u64, usize)> {
        let s = &self.shape;
        write_json(&dir.join("config.json"), &s.config_json(self.dtype))?;
        let (pad, bos, eos) = special_ids(s.vocab_size);
        crate::chatml::write_configs(dir, pad, bos, eos, s.max_position_embeddings)?;
        let tok = covering_tokenizer(s.vocab_size)?;
        tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
        self.write_weights(dir, progress)
    }

    /// Groups the tensors into shards of at most `max_shard_bytes` (a larger tensor gets a shard
    /// of its own).
    pub fn shard_plan(&self) -> Vec<Vec<TensorSpec>> {
        let eb = self.dtype.bytes() as u64;
        let mut shards: Vec<Vec<TensorSpec>> = vec![];
        let mut cur: Vec<TensorSpec> = vec![];
        let mut size = 0u64;
        for t in self.shape.tensors() {
            let b = t.numel() as u64 * eb;
            if !cur.is_empty() && size + b > self.max_shard_bytes {
                shards.push(std::mem::take(&mut cur));
                size = 0;
            }
            size += b;
            cur.push(t);
        }
        if !cur.is_empty() {
            shards.push(cur);
        }
        shards
    }

    fn write_weights(&self, dir: &Path, progress: bool) -> Result<(u64, usize)> {
        let plan = self.shard_plan();
        let n = plan.len();
        let eb = self.dtype.bytes();
        let total: u64 = plan.iter().flatten().map(|t| (t.numel() * eb) as u64).sum();
        let bar = progress.then(|| crate::progress::Progress::new(total >> 20, "writing weights (MiB)"));
        let mut weight_map = serde_json::Map::new();
        let mut written = 0u64;
        let mut buf = Vec::new();
        for (k, tensors) in plan.iter().enumerate() {
            let file = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", k + 1, n) };
            let path = dir.join(&file);
            let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
            w.write_all(&self.header(tensors)?)?;
            for t in tensors {
                let mut on_block = |b: &[u8]| -> Result<()> {
                    w.write_all(b).with_context(|| format!("writing {}", path.display()))?;
                    written += b.len() as u64;
                    if let Some(bar) = &bar {
                        let pos = written >> 20;
                        if pos > bar.position() {
                            bar.inc(pos - bar.position());
                        }
                    }
                    Ok(())
                };
                generate(t, self.dtype, self.seed, &mut buf, &mut on_block)?;
                weight_map.insert(t.name.clone(), json!(file));
            }
            w.into_inner().map_err(|e| anyhow::anyhow!("flushing {}: {e}", path.display()))?;
        }
        if let Some(bar) = bar {
            bar.finish();
        }
        if n > 1 {
            write_json(
                &dir.join("model.safetensors.index.json"),
                &json!({ "metadata": { "total_size": total }, "weight_map": weight_map }),
            )?;
        }
        Ok((written, n))
    }

    /// The safetensors header of one shard: tensors in file order, data contiguous, padded to 8.
    fn header(&self, tensors: &[TensorSpec]) -> Result<Vec<u8>> {
        let eb = self.dtype.bytes();
        let mut m = serde_json::Map::new();
        m.insert("__metadata__".into(), json!({ "format": "pt" }));
        let mut off = 0usize;
        for t in tensors {
            let end = off + t.numel() * eb;
            m.insert(
                t.name.clone(),
                json!({ "dtype": self.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [off, end] }),
            );
            off = end;
        }
        let mut h = serde_json::to_vec(&Value::Object(m))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        Ok(out)
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(v)?).with_context(|| format!("writing {}", path.display()))
}

/// Elements per PRNG block: each block has its own stream, so blocks are generated in parallel.
const BLOCK: usize = 1 << 20;

fn mix(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Fills `out` with the little-endian values of elements [start, start + out.len() / eb) of `t`.
fn fill_block(t: &TensorSpec, dtype: SynthDType, seed: u64, block: u64, out: &mut [u8]) {
    let mut state = mix(mix(seed, name_hash(&t.name)), block);
    let (c, s) = (t.center, t.spread);
    let eb = dtype.bytes();
    for chunk in out.chunks_mut(2 * eb) {
        // splitmix64: one 64-bit draw gives two 24-bit uniforms.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let us = [(z >> 40) as u32, ((z >> 8) & 0xff_ffff) as u32];
        for (k, e) in chunk.chunks_mut(eb).enumerate() {
            let u = us[k] as f32 * (1.0 / 16_777_216.0);
            let x = c + s * (2.0 * u - 1.0);
            match dtype {
                SynthDType::F32 => e.copy_from_slice(&x.to_le_bytes()),
                SynthDType::Bf16 => e.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
            }
        }
    }
}

/// Generates `t` block by block (blocks of one round in parallel) and hands the bytes to `sink`
/// in order.
/// `buf` is reused from tensor to tensor.
fn generate(
    t: &TensorSpec,
    dtype: SynthDType,
    seed: u64,
    buf: &mut Vec<u8>,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let eb = dtype.bytes();
    let n = t.numel();
    let blocks = n.div_ceil(BLOCK);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(blocks.max(1));
    let cap = n.min(threads * BLOCK) * eb;
    if buf.len() < cap {
        buf.resize(cap, 0);
    }
    let mut b0 = 0;
    while b0 < blocks {
        let round = threads.min(blocks - b0);
        let first = b0 * BLOCK;
        let len = (n - first).min(round * BLOCK) * eb;
        let data = &mut buf[..len];
        std::thread::scope(|sc| {
            for (k, part) in data.chunks_mut(BLOCK * eb).enumerate() {
                let block = (b0 + k) as u64;
                sc.spawn(move || fill_block(t, dtype, seed, block, part));
            }
        });
        sink(data)?;
        b0 += round;
    }
    Ok(())
}

/// `orchestrator tiny-model --like`: writes the directory and says how long it took.
pub fn write_cli(like: Like, dtype: SynthDType, seed: u64, layers: Option<usize>, out: &Path) -> Result<PathBuf> {
    let mut spec = SynthSpec::new(like, dtype, seed);
    if let Some(l) = layers {
        ensure!(l >= 1, "--layers must be >= 1");
        spec.shape.num_hidden_layers = l;
    }
    let w = spec.write(out, true)?;
    println!(
        "wrote {} ({}, {} layers, {:.3} B parameters, {}): {:.2} GB in {} shard(s) in {:.1} s ({:.0} MB/s)",
        out.display(),
        like_name(like),
        spec.shape.num_hidden_layers,
        w.parameters as f64 / 1e9,
        dtype.torch_name(),
        w.bytes as f64 / 1e9,
        w.shards,
        w.secs,
        w.bytes as f64 / 1e6 / w.secs.max(1e-9)
    );
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_parameter_counts() {
        // Published sizes: Qwen2.5-7B 7.62 B, Qwen2.5-0.5B 0.49 B, Llama-3.1-8B 8.03 B, SmolLM2 134.5 M.
        let p = |l| Shape::like(l).parameters() as f64 / 1e9;
        assert!((p(Like::Qwen25_7b) - 7.62).abs() < 0.01, "{}", p(Like::Qwen25_7b));
        assert!((p(Like::Qwen25_0_5b) - 0.494).abs() < 0.005, "{}", p(Like::Qwen25_0_5b));
        assert!((p(Like::Llama31_8b) - 8.03).abs() < 0.01, "{}", p(Like::Llama31_8b));
        assert!((p(Like::Smollm2_135m) - 0.1345).abs() < 0.0005, "{}", p(Like::Smollm2_135m));
    }

    #[test]
    fn blocks_do_not_depend_on_threads_and_values_stay_in_range() {
        let t = TensorSpec { name: "x".into(), shape: vec![3 * BLOCK + 5], center: 1.0, spread: 0.5 };
        let mut all = Vec::new();
        generate(&t, SynthDType::F32, 9, &mut Vec::new(), &mut |b| {
            all.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(all.len(), t.numel() * 4);
        let mut one = vec![0u8; BLOCK * 4];
        fill_block(&t, SynthDType::F32, 9, 2, &mut one);
        assert_eq!(&all[2 * BLOCK * 4..3 * BLOCK * 4], &one[..]);
        assert_ne!(&all[..BLOCK * 4], &all[BLOCK * 4..2 * BLOCK * 4], "every block has its own stream");
        let vals: Vec<f32> = all.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert!(vals.iter().all(|&v| (0.5..=1.5).contains(&v)));
        let mean = vals.iter().map(|&v| v as f64).sum::<f64>() / vals.len() as f64;
        assert!((mean - 1.0).abs() < 1e-3, "{mean}");
    }
}
