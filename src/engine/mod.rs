//! The rollout engine: chat prompts in, sampled token ids with their natural-log probabilities
//! out. The trainer sees only the [`Engine`] trait; `mistral.rs` is one implementation.

pub mod bench;
pub mod mistral;
pub mod remote;
pub mod sampler;

use std::path::Path;

use anyhow::Result;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::validate::Problems;

pub use mistral::{request_concurrency, MistralEngine};
// The remote engine builds on this module's trait and types; this module names only its config
// (a leaf), so the dependency runs one way.
pub use remote::config::RemoteConfig;
pub use sampler::SeedKey;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `embedded`: mistral.rs in this process; `remote`: a pool of vLLM or SGLang servers
    /// (`[engine.remote]`). `sampling` applies to both; the other keys to `embedded` only.
    pub backend: Backend,
    /// Sequences the engine runs at once (mistral.rs scheduler): requests in flight are
    /// decoded together in one batch.
    pub max_num_seqs: usize,
    /// One request at a time. Each sequence is then computed exactly as if alone, so a run is
    /// bit-for-bit reproducible (a resumed run equals an uninterrupted one); batched, the
    /// batch a sequence shares depends on timing and its matrix products may round
    /// differently (README, "Batching and reproducibility"). Slower: on CPU about half the
    /// throughput of a batch of 8.
    pub serial: bool,
    pub sampling: SamplingConfig,
    pub paged_attention: PagedAttentionConfig,
    pub remote: RemoteConfig,
    /// Finished sequences whose KV caches the engine keeps so that a later prompt starting with
    /// the same tokens prefills only the rest (mistral.rs's prefix cache); 0 keeps none. Not a
    /// config key: only the embedded judge sets it (`judge.embedded.prefix_cache`), because
    /// its weights never change, while the policy's change at every sync and would leave the
    /// cached prefixes stale.
    #[serde(skip)]
    pub prefix_cache: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Embedded,
    Remote,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            max_num_seqs: 32,
            serial: false,
            sampling: SamplingConfig::default(),
            paged_attention: PagedAttentionConfig::default(),
            remote: RemoteConfig::default(),
            prefix_cache: 0,
        }
    }
}

impl EngineConfig {
    /// `lora_enabled` is `learner.lora.enabled` (LoRA pushes need adapters).
    pub fn validate_with(&self, key: &str, lora_enabled: bool, p: &mut Problems) {
        self.validate(key, p);
        if self.backend == Backend::Remote {
            self.remote.validate(&format!("{key}.remote"), lora_enabled, p);
        }
    }

    pub fn validate(&self, key: &str, p: &mut Problems) {
        if self.max_num_seqs == 0 {
            p.push(&format!("{key}.max_num_seqs"), "must be >= 1, got 0");
        }
        self.sampling.validate(&format!("{key}.sampling"), p);
        self.paged_attention
            .validate(&format!("{key}.paged_attention"), p);
    }
}

/// The smallest non-zero sampling temperature (see [`SamplingConfig::validate`]).
pub const MIN_TEMPERATURE: f64 = 1e-5;

/// Sampling settings for rollouts. `temperature = 0` is greedy decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    /// 0 disables it.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Generation stops once the text ends with one of these (the ids keep the tokens sampled).
    pub stop: Vec<String>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            stop: Vec::new(),
        }
    }
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_new_tokens,
            ..Self::default()
        }
    }

    pub fn validate(&self, key: &str, p: &mut Problems) {
        let t = format!("{key}.temperature");
        // Below 1e-5, 1/T overflows f32 logits to infinity and the log-probs turn NaN.
        p.at_least(&t, self.temperature, 0.0);
        if self.temperature > 0.0 && self.temperature < MIN_TEMPERATURE {
            p.push(&t, format!("must be 0 (greedy) or >= 1e-5, got {}", self.temperature));
        }
        p.open_closed(&format!("{key}.top_p"), self.top_p, 0.0, 1.0);
        if self.max_new_tokens == 0 {
            p.push(&format!("{key}.max_new_tokens"), "must be >= 1, got 0");
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            p.push(&format!("{key}.stop"), "stop strings must not be empty");
        }
    }
}

/// Paged attention for the KV cache. Only CUDA builds (`--features cuda`) have it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PagedAttentionConfig {
    pub enabled: bool,
    pub block_size: usize,
    /// Share of free GPU memory given to the KV cache.
    pub memory_fraction: f64,
}

impl Default for PagedAttentionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            block_size: 32,
            memory_fraction: 0.9,
        }
    }
}

impl PagedAttentionConfig {
    pub fn validate(&self, key: &str, p: &mut Problems) {
        if !self.enabled {
            return;
        }
        // Whether this binary has it is checked by `Config::validate_for` (a CPU build can
        // still check a config meant for a CUDA build).
        if ![8, 16, 32, 64, 128].contains(&self.block_size) {
            p.push(
                &format!("{key}.block_size"),
                format!("must be one of 8, 16, 32, 64, 128, got {}", self.block_size),
            );
        }
        p.open_closed(&format!("{key}.memory_fraction"), self.memory_fraction, 0.0, 1.0);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// One prompt to sample `n` answers for. `seed` fixes every sample's random stream:
/// sample `i` draws from (seed, i, position) only, whatever else shares the batch.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub messages: Vec<ChatMessage>,
    pub n: usize,
    pub seed: SeedKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The engine ended the sequence before it finished (mistral.rs's `canceled`, or any reason
    /// that is not a text completion). Never judged, never trained on; counted in the metrics.
    Canceled,
}

/// One sampled answer with the exact ids the engine produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    /// Index of the request in the batch.
    pub request: usize,
    /// Index of the sample within its request (0..n).
    pub sample: usize,
    /// Prompt ids after the chat template, exactly as the engine saw them.
    pub prompt_ids: Vec<u32>,
    /// Sampled ids, including a final end-of-sequence token when one was sampled.
    pub ids: Vec<u32>,
    /// ln softmax(logits / T)[id] over the full vocabulary, before top-p/top-k truncation
    /// (T = 1 for greedy decoding).
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    pub text: String,
}

/// The form of the learner's weights an engine takes at a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A full HF model directory (the embedded engine; `weight_push = "disk"`).
    HfDir,
    /// A PEFT adapter directory (`weight_push = "lora"`).
    Adapter,
    /// Nothing: the engine keeps its weights (`weight_push = "none"`).
    Nothing,
}

/// What the trainer needs from a generator of rollouts.
#[async_trait]
pub trait Engine: Send + Sync {
    /// Samples every request's `n` answers; each rollout is sent on `done` as soon as it
    /// finishes, so callers can judge early rollouts while later ones still generate.
    async fn generate_into(
        &self,
        requests: &[GenRequest],
        sampling: &SamplingConfig,
        done: mpsc::UnboundedSender<Rollout>,
    ) -> Result<()>;

    /// Swaps in the weights of the HF model directory `dir` (same architecture and tokenizer).
    async fn reload(&self, dir: &Path) -> Result<()>;

    /// What [`Engine::push`] takes.
    fn weight_format(&self) -> WeightFormat {
        WeightFormat::HfDir
    }

    /// Serves the learner's weights after `step` steps, written to `dir` in
    /// [`Engine::weight_format`], from the next generation on.
    async fn push(&self, step: u64, dir: &Path) -> Result<()> {
        let _ = step;
        self.reload(dir).await
    }

    /// Gives back what this engine loaded on shared servers for itself alone (the LoRA versions
    /// a command like `eval` pushed), so they do not stay loaded after it exits. Nothing for an
    /// engine of this process.
    async fn release(&self) -> Result<()> {
        Ok(())
    }

    /// All rollouts, grouped by request and ordered by sample index.
    async fn generate(
        &self,
        requests: &[GenRequest],
        sampling: &SamplingConfig,
    ) -> Result<Vec<Vec<Rollout>>> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.generate_into(requests, sampling, tx).await?;
        let mut out: Vec<Vec<Rollout>> = requests.iter().map(|_| Vec::new()).collect();
        while let Some(r) = rx.recv().await {
            out[r.request].push(r);
        }
        for group in &mut out {
            group.sort_by_key(|r| r.sample);
        }
        Ok(out)
    }
}
