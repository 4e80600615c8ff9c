//! Llama and Qwen2 decoder-only transformers in tch, laid out like the HF modules so every
//! variable path in the [`VarStore`] is the HF weight name (`model.layers.0.self_attn.q_proj.weight`).
//!
//! Qwen2 is Llama with biases on q/k/v; both share this code. Attention goes through
//! `scaled_dot_product_attention` (causal, grouped-query).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::lora::{Linear, LoraConfig};
pub use super::io::{copy_checked, for_each_tensor, read_all, weight_files, write_all};

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_act() -> String {
    "silu".into()
}

/// The fields of HF `config.json` these models read. Unknown fields are ignored (HF configs
/// carry many that do not change the forward pass).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// llama3-style frequency-dependent RoPE scaling (the only `rope_scaling` accepted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl Config {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let cfg: Config = serde_path_to_error::deserialize(de)
            .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))?;
        cfg.check().with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    pub fn arch(&self) -> Result<Arch> {
        let name = self.architectures.first().map(String::as_str);
        match (name, self.model_type.as_deref()) {
            (Some("LlamaForCausalLM"), _) | (None, Some("llama")) => Ok(Arch::Llama),
            (Some("Qwen2ForCausalLM"), _) | (None, Some("qwen2")) => Ok(Arch::Qwen2),
            (Some(a), _) => bail!("unsupported architecture {a} (supported: LlamaForCausalLM, Qwen2ForCausalLM)"),
            (None, t) => bail!("unsupported model_type {t:?} and no architectures (supported: llama, qwen2)"),
        }
    }

    fn check(&self) -> Result<()> {
        self.arch()?;
        ensure!(self.hidden_act == "silu", "hidden_act {:?} is not supported (only silu)", self.hidden_act);
        ensure!(self.use_sliding_window != Some(true), "use_sliding_window = true is not supported");
        ensure!(self.num_attention_heads > 0 && self.num_hidden_layers > 0, "empty model");
        ensure!(
            self.num_attention_heads % self.kv_heads() == 0,
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            self.num_attention_heads,
            self.kv_heads()
        );
        self.llama3_scaling()?;
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// q/k/v biases (Qwen2 always; Llama when `attention_bias`), and whether o_proj has one.
    fn qkv_bias(&self) -> (bool, bool) {
        match self.arch() {
            Ok(Arch::Qwen2) => (true, false),
            _ => {
                let b = self.attention_bias.unwrap_or(false);
                (b, b)
            }
        }
    }

    /// `None` for plain RoPE; an error names any scaling type other than llama3.
    pub fn llama3_scaling(&self) -> Result<Option<Llama3Scaling>> {
        let Some(v) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else { return Ok(None) };
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("");
        match kind {
            "default" => Ok(None),
            "llama3" => {
                let f = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_f64())
                        .with_context(|| format!("rope_scaling.{k} missing or not a number"))
                };
                Ok(Some(Llama3Scaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?,
                }))
            }
            other => bail!("rope_scaling type {other:?} is not supported (supported: llama3)"),
        }
    }
}

/// Forward-pass switches that are not weights.
#[derive(Debug, Clone, Copy)]
pub struct Fwd {
    /// Apply LoRA adapters (off = the frozen base model, the KL reference).
    pub adapters: bool,
    /// Training mode: LoRA dropout active.
    pub train: bool,
}

impl Fwd {
    pub const EVAL: Fwd = Fwd { adapters: true, train: false };
}

#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vs: tch::nn::Path, size: usize, eps: f64, trainable: bool) -> Self {
        Self { weight: param(&vs, "weight", &[size as i64], trainable), eps }
    }

    /// Normalises in f32 and scales in the input dtype, as HF does.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim(-1, true, Kind::Float);
        let y = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        y * &self.weight
    }
}

/// cos/sin tables for the positions of one batch: [B, 1, L, head_dim].
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn rotate_half(x: &Tensor) -> Tensor {
        let d = x.size()[3];
        let x1 = x.narrow(3, 0, d / 2);
        let x2 = x.narrow(3, d / 2, d / 2);
        Tensor::cat(&[-x2, x1], 3)
    }

    fn apply(&self, x: &Tensor) -> Tensor {
        x * &self.cos + Self::rotate_half(x) * &self.sin
    }
}

fn inv_freq(cfg: &Config) -> Result<Vec<f32>> {
    let d = cfg.head_dim();
    let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
    let Some(s) = cfg.llama3_scaling()? else { return Ok(base.iter().map(|&x| x as f32).collect()) };
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    Ok(base
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let g = if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            };
            g as f32
        })
        .collect())
}

fn param(vs: &tch::nn::Path, name: &str, dims: &[i64], trainable: bool) -> Tensor {
    let t = Tensor::zeros(dims, (vs.kind(), vs.device()));
    vs.add(name, t, trainable)
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    n_heads: i64,
    n_kv: i64,
    head_dim: i64,
}

impl Attention {
    fn new(vs: tch::nn::Path, cfg: &Config, lora: Option<&LoraConfig>, trainable: bool) -> Self {
        let (h, d) = (cfg.hidden_size as i64, cfg.head_dim() as i64);
        let (nh, nkv) = (cfg.num_attention_heads as i64, cfg.kv_heads() as i64);
        let (qkv_b, o_b) = cfg.qkv_bias();
        let lin = |name: &str, i, o, b| Linear::new(&vs / name, name, i, o, b, lora, trainable);
        Self {
            q_proj: lin("q_proj", h, nh * d, qkv_b),
            k_proj: lin("k_proj", h, nkv * d, qkv_b),
            v_proj: lin("v_proj", h, nkv * d, qkv_b),
            o_proj: lin("o_proj", nh * d, h, o_b),
            n_heads: nh,
            n_kv: nkv,
            head_dim: d,
        }
    }

    fn forward(&self, x: &Tensor, rope: &Rope, mask: Option<&Tensor>, f: Fwd) -> Tensor {
        let (b, l, _) = x.size3().expect("[B, L, H]");
        let split = |t: Tensor, n| t.view([b, l, n, self.head_dim]).transpose(1, 2);
        let q = rope.apply(&split(self.q_proj.forward(x, f), self.n_heads));
        let k = rope.apply(&split(self.k_proj.forward(x, f), self.n_kv));
        let v = split(self.v_proj.forward(x, f), self.n_kv);
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask,
            0.0,
            mask.is_none(),
            None,
            self.n_kv != self.n_heads,
        );
        let y = y.transpose(1, 2).reshape([b, l, self.n_heads * self.head_dim]);
        self.o_proj.forward(&y, f)
    }
}

/// SwiGLU: down(silu(gate(x)) * up(x)).
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn new(vs: tch::nn::Path, cfg: &Config, lora: Option<&LoraConfig>, trainable: bool) -> Self {
        let (h, i) = (cfg.hidden_size as i64, cfg.intermediate_size as i64);
        let b = cfg.mlp_bias.unwrap_or(false);
        let lin = |name: &str, i, o| Linear::new(&vs / name, name, i, o, b, lora, trainable);
        Self { gate_proj: lin("gate_proj", h, i), up_proj: lin("up_proj", h, i), down_proj: lin("down_proj", i, h) }
    }

    fn forward(&self, x: &Tensor, f: Fwd) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x, f).silu() * self.up_proj.forward(x, f)), f)
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(vs: tch::nn::Path, cfg: &Config, lora: Option<&LoraConfig>, trainable: bool) -> Self {
        let eps = cfg.rms_norm_eps;
        Self {
            self_attn: Attention::new(&vs / "self_attn", cfg, lora, trainable),
            mlp: Mlp::new(&vs / "mlp", cfg, lora, trainable),
            input_layernorm: RmsNorm::new(&vs / "input_layernorm", cfg.hidden_size, eps, trainable),
            post_attention_layernorm: RmsNorm::new(&vs / "post_attention_layernorm", cfg.hidden_size, eps, trainable),
        }
    }

    pub fn forward(&self, x: &Tensor, rope: &Rope, mask: Option<&Tensor>, f: Fwd) -> Tensor {
        let h = x + self.self_attn.forward(&self.input_layernorm.forward(x), rope, mask, f);
        let out = self.mlp.forward(&self.post_attention_layernorm.forward(&h), f);
        h + out
    }
}

/// The trunk: `model.*` in HF names.
#[derive(Debug)]
pub struct Model {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

/// A causal LM with its VarStore. Batches are right-padded, so causal attention alone is exact
/// for every real token; an explicit key mask is only needed for left padding.
pub struct CausalLm {
    pub cfg: Config,
    pub arch: Arch,
    pub vs: VarStore,
    pub model: Model,
    /// `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Tensor>,
    inv_freq: Tensor,
    /// HF names of the base weights (what a model file must hold).
    base_names: BTreeSet<String>,
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CausalLm({:?}, {} layers)", self.arch, self.cfg.num_hidden_layers)
    }
}

/// What a model file may contain beyond the parameters: non-persistent buffers some exporters keep.
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

impl CausalLm {
    /// Builds the model with uninitialised (zero) weights. `trainable_base = false` freezes the
    /// base weights (LoRA, or a frozen reference copy).
    pub fn build(cfg: Config, device: Device, kind: Kind, lora: Option<&LoraConfig>, trainable_base: bool) -> Result<Self> {
        let arch = cfg.arch()?;
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let m = &root / "model";
        let (v, h) = (cfg.vocab_size as i64, cfg.hidden_size as i64);
        let embed_tokens = param(&(&m / "embed_tokens"), "weight", &[v, h], trainable_base);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(&m / "layers" / i, &cfg, lora, trainable_base))
            .collect();
        let norm = RmsNorm::new(&m / "norm", cfg.hidden_size, cfg.rms_norm_eps, trainable_base);
        let lm_head =
            (!cfg.tie_word_embeddings).then(|| param(&(&root / "lm_head"), "weight", &[v, h], trainable_base));
        let base_names: BTreeSet<String> =
            vs.variables().into_keys().filter(|n| !super::lora::is_adapter_name(n)).collect();
        let inv_freq = Tensor::from_slice(&inv_freq(&cfg)?).to_device(device);
        Ok(Self { cfg, arch, vs, model: Model { embed_tokens, layers, norm }, lm_head, inv_freq, base_names })
    }

    /// Loads an HF model directory (config.json + model.safetensors or a sharded index).
    pub fn load(dir: &Path, device: Device, kind: Kind, lora: Option<&LoraConfig>, trainable_base: bool) -> Result<Self> {
        let cfg = Config::from_dir(dir)?;
        let lm = Self::build(cfg, device, kind, lora, trainable_base)
            .with_context(|| format!("{}", dir.join("config.json").display()))?;
        let files = weight_files(dir)?;
        let vars = lm.vs.variables();
        let mut seen = BTreeSet::new();
        for file in &files {
            for_each_tensor(file, |name, t| {
                if ignorable(name) || (name == "lm_head.weight" && lm.cfg.tie_word_embeddings) {
                    return Ok(());
                }
                let Some(var) = vars.get(name).filter(|_| lm.base_names.contains(name)) else {
                    bail!("{}: unexpected tensor {name} (not a weight of this {:?} model)", file.display(), lm.arch)
                };
                copy_checked(var, &t, name).with_context(|| format!("{}", file.display()))?;
                seen.insert(name.to_string());
                Ok(())
            })?;
        }
        if let Some(missing) = lm.base_names.iter().find(|n| !seen.contains(*n)) {
            bail!("{}: missing weight {missing}", dir.display());
        }
        Ok(lm)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn kind(&self) -> Kind {
        self.model.embed_tokens.kind()
    }

    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.model.embed_tokens)
    }

    /// HF names of the base weights, sorted.
    pub fn base_names(&self) -> &BTreeSet<String> {
        &self.base_names
    }

    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.model.embed_tokens, ids, -1, false, false)
    }

    /// RoPE tables for positions `pos` ([B, L] int64).
    pub fn rope(&self, pos: &Tensor) -> Rope {
        let freqs = pos.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        let kind = self.kind();
        Rope { cos: emb.cos().to_kind(kind), sin: emb.sin().to_kind(kind) }
    }

    /// Positions and attention mask for a batch. `key_mask` ([B, L], 1 = token, 0 = padding)
    /// is needed only for left padding; right-padded batches pass `None`.
    pub fn positions_and_mask(&self, ids: &Tensor, key_mask: Option<&Tensor>) -> (Tensor, Option<Tensor>) {
        let (b, l) = ids.size2().expect("[B, L] ids");
        let dev = ids.device();
        match key_mask {
            None => (Tensor::arange(l, (Kind::Int64, dev)).unsqueeze(0).expand([b, l], true), None),
            Some(km) => {
                let km = km.to_kind(Kind::Int64);
                let pos = (km.cumsum(1, Kind::Int64) - 1).clamp_min(0);
                let causal = Tensor::ones([l, l], (Kind::Bool, dev)).tril(0);
                let keys = km.to_kind(Kind::Bool).view([b, 1, 1, l]);
                // A query always sees itself, so padding rows are finite (and ignored).
                let diag = Tensor::eye(l, (Kind::Bool, dev));
                let mask = causal.logical_and(&keys).logical_or(&diag);
                (pos, Some(mask))
            }
        }
    }

    /// Final normalised hidden states [B, L, H].
    pub fn trunk(&self, ids: &Tensor, key_mask: Option<&Tensor>, f: Fwd) -> Tensor {
        let (pos, mask) = self.positions_and_mask(ids, key_mask);
        let rope = self.rope(&pos);
        let mut x = self.embed(ids);
        for layer in &self.model.layers {
            x = layer.forward(&x, &rope, mask.as_ref(), f);
        }
        self.model.norm.forward(&x)
    }

    /// Full logits [B, L, V] (for short sequences and tests; the learner uses chunked log-probs).
    pub fn logits(&self, ids: &Tensor, key_mask: Option<&Tensor>, f: Fwd) -> Tensor {
        self.trunk(ids, key_mask, f).matmul(&self.lm_head_weight().tr())
    }

    /// Greedy decode of one prompt, no KV cache (tests and small checks only).
    pub fn greedy(&self, prompt: &[u32], max_new: usize, eos: &[u32]) -> Vec<u32> {
        let _g = tch::no_grad_guard();
        let mut ids: Vec<i64> = prompt.iter().map(|&x| x as i64).collect();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let t = Tensor::from_slice(&ids).to_device(self.device()).unsqueeze(0);
            let h = self.trunk(&t, None, Fwd::EVAL);
            let last = h.select(1, -1).matmul(&self.lm_head_weight().tr());
            let next = last.to_kind(Kind::Float).argmax(-1, false).int64_value(&[0]) as u32;
            out.push(next);
            ids.push(next as i64);
            if eos.contains(&next) {
                break;
            }
        }
        out
    }
}
