//! [`Engine`] on an embedded mistral.rs 0.8.1 model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use mistralrs::{
    ChatCompletionResponse, Constraint, GgufModelBuilder, MemoryGpuConfig, Model, ModelDType, NormalRequest,
    PagedAttentionMetaBuilder, RequestBuilder, RequestLike, RequestMessage, Response, StopTokens, TextMessageRole,
    TextModelBuilder, TokenSource,
};
use tokio::sync::{mpsc, RwLock, Semaphore};

use super::sampler::{RecordingSampler, TokenSampling};
use super::{ChatMessage, Engine, EngineConfig, FinishReason, GenRequest, Role, Rollout, SamplingConfig, SeedKey};
use crate::model::{DType, ModelConfig, ModelFormat};

pub struct MistralEngine {
    model: Model,
    model_id: String,
    /// HF models are served from a directory of links we own, so `reload` can point it at new
    /// weights and have mistral.rs reload from the same path. None for GGUF.
    live_dir: Option<PathBuf>,
    /// Held for writing during a reload so no request is sent to an unloaded model.
    serving: RwLock<()>,
    /// Bounds requests in flight (see [`request_concurrency`]).
    inflight: Semaphore,
    format: ModelFormat,
    /// Token ids our sampler never draws (benchmarks: `bench engine --ignore-eos`).
    suppressed: Vec<u32>,
    /// Positions drawn by this engine's samplers so far (see [`MistralEngine::tokens_drawn`]).
    drawn: Arc<AtomicU64>,
}

fn model_dtype(d: DType) -> ModelDType {
    match d {
        DType::F32 => ModelDType::F32,
        DType::Bf16 => ModelDType::BF16,
        DType::F16 => ModelDType::F16,
    }
}

fn role(r: Role) -> TextMessageRole {
    match r {
        Role::System => TextMessageRole::System,
        Role::User => TextMessageRole::User,
        Role::Assistant => TextMessageRole::Assistant,
    }
}

/// Files of an HF model directory that the engine reads.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_file() && (name.ends_with(".json") || name.ends_with(".safetensors") || name.ends_with(".jinja")) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Checks that `dir` looks like an HF causal-LM directory before mistral.rs sees it, so a typo
/// is an error naming the path and never a hub lookup.
pub fn check_hf_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        bail!("model path {} does not exist", dir.display());
    }
    if !dir.is_dir() {
        bail!("model path {} is not a directory (HF model directory expected)", dir.display());
    }
    for f in ["config.json", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            bail!("model directory {} has no {f}", dir.display());
        }
    }
    let has_weights = model_files(dir)?
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "safetensors"));
    if !has_weights {
        bail!("model directory {} has no *.safetensors weights", dir.display());
    }
    Ok(())
}

/// Replaces the links in `live` with links to every model file of `src`.
fn link_model_dir(src: &Path, live: &Path) -> Result<()> {
    std::fs::create_dir_all(live)?;
    for old in std::fs::read_dir(live)? {
        let p = old?.path();
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    let src = std::fs::canonicalize(src)?;
    for f in model_files(&src)? {
        let name = f.file_name().unwrap();
        std::os::unix::fs::symlink(&f, live.join(name))
            .with_context(|| format!("linking {} into {}", f.display(), live.display()))?;
    }
    Ok(())
}

/// Requests the engine may have in flight at once. mistral.rs batches whatever is in flight
/// (its 0.8.1 scheduler admits every waiting sequence of equal length, whatever `max_num_seqs`
/// says), so this bound is what keeps batches at `max_num_seqs`. Batched CPU decoding relies on
/// our fix of 0.8.1's `flash_attn_cpu_single_q` (patches/, README "Patched crates").
/// `serial` sends one request at a time: slower, but every sequence is computed exactly as if
/// alone, so results do not depend on what else was in flight or when.
pub fn request_concurrency(max_num_seqs: usize, serial: bool) -> usize {
    if serial {
        1
    } else {
        max_num_seqs
    }
}

impl MistralEngine {
    pub async fn load(model: &ModelConfig, engine: &EngineConfig) -> Result<Self> {
        let max_num_seqs = engine.max_num_seqs;
        let concurrency = request_concurrency(max_num_seqs, engine.serial);
        let format = match model.format {
            ModelFormat::Auto if model.path.extension().is_some_and(|e| e == "gguf") => ModelFormat::Gguf,
            ModelFormat::Auto => ModelFormat::Safetensors,
            f => f,
        };
        // mistral.rs treats a missing path as a hub id and goes to the network; never let it.
        if !model.path.exists() {
            bail!("model path {} does not exist", model.path.display());
        }
        // mistral.rs 0.8.1 ignores HF_HUB_OFFLINE; with no token and an empty hub cache it
        // cannot quietly reach for anything else.
        let (built, live_dir) = match format {
            ModelFormat::Gguf => {
                if !model.path.is_file() {
                    bail!("GGUF model path {} is not a file", model.path.display());
                }
                let dir = model.path.parent().unwrap_or(Path::new(".")).to_string_lossy().to_string();
                let file = model.path.file_name().unwrap().to_string_lossy().to_string();
                let mut b = GgufModelBuilder::new(dir, vec![file])
                    .with_token_source(TokenSource::None)
                    .with_max_num_seqs(max_num_seqs)
                    .with_prefix_cache_n((engine.prefix_cache > 0).then_some(engine.prefix_cache));
                if let Some(pa) = paged_attention(engine)? {
                    b = b.with_paged_attn(pa);
                }
                (b.build().await, None)
            }
            ModelFormat::Safetensors | ModelFormat::Auto => {
                check_hf_dir(&model.path)?;
                let live = live_dir_for(&model.path)?;
                link_model_dir(&model.path, &live)?;
                let mut b = TextModelBuilder::new(live.to_string_lossy())
                    .with_dtype(model_dtype(model.dtype))
                    .with_token_source(TokenSource::None)
                    .with_max_num_seqs(max_num_seqs)
                    .with_prefix_cache_n((engine.prefix_cache > 0).then_some(engine.prefix_cache));
                if let Some(pa) = paged_attention(engine)? {
                    b = b.with_paged_attn(pa);
                }
                (b.build().await, Some(live))
            }
        };
        let model_handle = built.with_context(|| format!("loading model {}", model.path.display()))?;
        let model_id = model_handle
            .get_default_model_id()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .context("mistral.rs has no default model after loading")?;
        Ok(Self {
            model: model_handle,
            model_id,
            live_dir,
            serving: RwLock::new(()),
            inflight: Semaphore::new(concurrency),
            format,
            suppressed: Vec::new(),
            drawn: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Our sampler will never draw these ids: with the end-of-sequence ids, every rollout runs
    /// to `max_new_tokens` (fixed-length benchmarks). Changes the distribution; not for training.
    pub fn suppress_tokens(mut self, ids: Vec<u32>) -> Self {
        self.suppressed = ids;
        self
    }

    /// The mistral.rs handle, for tokenizer and model queries. Send requests through
    /// [`MistralEngine::send`], which respects the engine's concurrency bound.
    pub fn raw(&self) -> &Model {
        &self.model
    }

    /// Sends one chat request once a slot is free (see [`request_concurrency`]).
    pub async fn send(&self, request: RequestBuilder) -> Result<ChatCompletionResponse> {
        let _slot = self.inflight.acquire().await.expect("semaphore never closed");
        self.model
            .send_chat_request(request)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Sends prompt ids as they are (no chat template) once a slot is free; mistral.rs answers
    /// a token prompt with a completion. Returns (finish reason, tokens emitted).
    async fn send_tokens(
        &self,
        prompt_ids: Vec<u32>,
        sampling: &SamplingConfig,
        sampler: Arc<RecordingSampler>,
    ) -> Result<(String, usize)> {
        // The chat path's builder with no messages carries the same sampling parameters and
        // processors; only the message kind differs.
        let mut builder = Self::request(&[], sampling, sampler);
        let (tx, mut rx) = mpsc::channel(1);
        let request = mistralrs::Request::Normal(Box::new(NormalRequest {
            messages: RequestMessage::CompletionTokens(prompt_ids),
            sampling_params: builder.take_sampling_params(),
            response: tx,
            return_logprobs: false,
            is_streaming: false,
            id: 0,
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: builder.take_logits_processors(),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        let _slot = self.inflight.acquire().await.expect("semaphore never closed");
        let sender = self.model.inner().get_sender(None).map_err(|e| anyhow::anyhow!("{e}"))?;
        sender.send(request).await.map_err(|_| anyhow::anyhow!("the engine is not running"))?;
        match rx.recv().await {
            Some(Response::CompletionDone(c)) => {
                let choice = c.choices.into_iter().next().context("mistral.rs returned no choice")?;
                Ok((choice.finish_reason, c.usage.completion_tokens))
            }
            Some(Response::CompletionModelError(e, _)) => bail!("model error: {e}"),
            Some(Response::ValidationError(e)) => bail!("invalid request: {e}"),
            Some(Response::InternalError(e)) => bail!("internal error: {e}"),
            Some(_) => bail!("mistral.rs answered a token prompt with something other than a completion"),
            None => bail!("mistral.rs dropped the request"),
        }
    }

    /// `n` rollouts for prompt ids that are already templated and tokenised (sent as they are,
    /// for a server that takes ids). Sample `i` draws from `seed.sample_seed(i)` with the
    /// chat path's sampler, so fed a chat rollout's `prompt_ids` and seed it returns the same
    /// ids and log-probs. Rollouts come back in sample order with `request` 0.
    pub async fn generate_ids(
        &self,
        prompt_ids: &[u32],
        n: usize,
        sampling: &SamplingConfig,
        seed: SeedKey,
    ) -> Result<Vec<Rollout>> {
        let samples = (0..n).map(|i| self.generate_ids_seeded(prompt_ids, sampling, seed.sample_seed(i as u64)));
        let mut out = futures::future::try_join_all(samples).await?;
        for (i, r) in out.iter_mut().enumerate() {
            r.sample = i;
        }
        Ok(out)
    }

    /// One rollout for prompt ids, drawing from the stream `sample_seed` (what
    /// [`SeedKey::sample_seed`] gives one sample of a chat request).
    pub async fn generate_ids_seeded(
        &self,
        prompt_ids: &[u32],
        sampling: &SamplingConfig,
        sample_seed: u64,
    ) -> Result<Rollout> {
        self.generate_ids_penalized(prompt_ids, sampling, sample_seed, 1.0).await
    }

    /// As [`MistralEngine::generate_ids_seeded`] with a repetition penalty (1 = none; see
    /// [`RecordingSampler::penalizing_repeats`]): what a server applying one samples.
    pub async fn generate_ids_penalized(
        &self,
        prompt_ids: &[u32],
        sampling: &SamplingConfig,
        sample_seed: u64,
        repetition_penalty: f32,
    ) -> Result<Rollout> {
        anyhow::ensure!(!prompt_ids.is_empty(), "empty prompt");
        let _serving = self.serving.read().await;
        let sampler = Arc::new(
            RecordingSampler::new(TokenSampling::from(sampling), sample_seed)
                .suppressing(&self.suppressed)
                .counting(self.drawn.clone())
                .penalizing_repeats(repetition_penalty),
        );
        let (finish, emitted) = self.send_tokens(prompt_ids.to_vec(), sampling, sampler.clone()).await?;
        let mut r = self.rollout(0, 0, &sampler, &finish, emitted, sampling).await?;
        // The sampler sees the context from the first decode on; a prompt of ids is that context.
        if r.prompt_ids.is_empty() {
            r.prompt_ids = prompt_ids.to_vec();
        }
        Ok(r)
    }

    /// A finished sample's rollout from what its sampler recorded.
    async fn rollout(
        &self,
        ri: usize,
        si: usize,
        sampler: &RecordingSampler,
        finish_reason: &str,
        emitted: usize,
        sampling: &SamplingConfig,
    ) -> Result<Rollout> {
        let (prompt_ids, mut ids, mut logprobs) = sampler.take();
        if ids.len() < emitted {
            bail!(
                "sampler recorded {} tokens but the engine reports {emitted} (request {ri}, sample {si})",
                ids.len()
            );
        }
        // Batched, mistral.rs 0.8.1 can run a sequence that just finished once more with
        // its batch: our sampler then records a draw at the next position that the engine
        // never emits (its text ends before it). The emitted tokens are the first ones.
        ids.truncate(emitted);
        logprobs.truncate(emitted);
        let finish = finish_reason_of(finish_reason);
        // The text is the decode of exactly these ids (mistral.rs's streamed content can
        // differ on invalid UTF-8), cut before the first stop string like the engine does.
        let mut text = self.detokenize(&ids, true).await?;
        if finish == FinishReason::Stop {
            if let Some(cut) = sampling.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
        }
        Ok(Rollout { request: ri, sample: si, prompt_ids, ids, logprobs, finish_reason: finish, text })
    }

    /// Tokens drawn so far by every request this engine has served, counted as they are drawn
    /// (one per new position of a sequence; mistral.rs can draw one past a sequence's end):
    /// progress of a generation still running.
    pub fn tokens_drawn(&self) -> u64 {
        self.drawn.load(Ordering::Relaxed)
    }

    /// Ends every running sequence at its next decode step; they come back with
    /// [`FinishReason::Canceled`]. mistral.rs 0.8.1 keeps this flag process-wide, so it reaches
    /// every engine of the process (an embedded judge too).
    pub async fn cancel_running(&self) -> Result<()> {
        let sender = self.model.inner().get_sender(None).map_err(|e| anyhow::anyhow!("cancel: {e}"))?;
        sender
            .send(mistralrs::Request::TerminateAllSeqsNextStep)
            .await
            .map_err(|_| anyhow::anyhow!("cancel: the engine is not running"))
    }

    pub async fn detokenize(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.model
            .detokenize(ids.to_vec(), skip_special)
            .await
            .map_err(|e| anyhow::anyhow!("detokenize: {e}"))
    }

    /// A request carrying our recording sampler; the engine's own sampler stays greedy.
    pub fn request(
        messages: &[ChatMessage],
        sampling: &SamplingConfig,
        sampler: Arc<RecordingSampler>,
    ) -> RequestBuilder {
        // `set_deterministic_sampler` would wipe max_len: start from the builder's greedy
        // defaults and set the length afterwards.
        let mut r = RequestBuilder::new();
        for m in messages {
            r = r.add_message(role(m.role), &m.content);
        }
        r = r
            .set_sampler_max_len(sampling.max_new_tokens)
            .add_logits_processor(sampler);
        if !sampling.stop.is_empty() {
            r = r.set_sampler_stop_toks(StopTokens::Seqs(sampling.stop.clone()));
        }
        r
    }
}

fn paged_attention(engine: &EngineConfig) -> Result<Option<mistralrs::PagedAttentionConfig>> {
    let pa = &engine.paged_attention;
    if !pa.enabled {
        return Ok(None);
    }
    if !cfg!(feature = "cuda") {
        bail!("engine.paged_attention.enabled: paged attention needs a CUDA build (--features cuda)");
    }
    Ok(Some(
        PagedAttentionMetaBuilder::default()
            .with_block_size(pa.block_size)
            .with_gpu_memory(MemoryGpuConfig::Utilization(pa.memory_fraction as f32))
            .build()?,
    ))
}

/// A per-process directory of links next to nothing the user owns.
fn live_dir_for(model: &Path) -> Result<PathBuf> {
    let base = std::env::temp_dir().join(format!("orchestrator-live-{}", std::process::id()));
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(base.join(format!("{n}-{name}")))
}

impl Drop for MistralEngine {
    fn drop(&mut self) {
        if let Some(live) = &self.live_dir {
            let _ = std::fs::remove_dir_all(live);
        }
    }
}

fn finish_reason_of(s: &str) -> FinishReason {
    match s {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        _ => FinishReason::Canceled,
    }
}

#[async_trait]
impl Engine for MistralEngine {
    async fn generate_into(
        &self,
        requests: &[GenRequest],
        sampling: &SamplingConfig,
        done: mpsc::UnboundedSender<Rollout>,
    ) -> Result<()> {
        let _serving = self.serving.read().await;
        let params = TokenSampling::from(sampling);
        // Every sample is its own request with its own sampler. All are queued at once and
        // mistral.rs batches up to `max_num_seqs` of them (one at a time in serial mode).
        let mut inflight = FuturesUnordered::new();
        for (ri, req) in requests.iter().enumerate() {
            for si in 0..req.n {
                let sampler = Arc::new(RecordingSampler::new(params, req.seed.sample_seed(si as u64)).suppressing(&self.suppressed).counting(self.drawn.clone()));
                let builder = Self::request(&req.messages, sampling, sampler.clone());
                inflight.push(async move {
                    let resp = self.send(builder).await;
                    (ri, si, sampler, resp)
                });
            }
        }
        while let Some((ri, si, sampler, resp)) = inflight.next().await {
            let resp = resp.with_context(|| format!("generation failed (request {ri}, sample {si})"))?;
            let choice = resp
                .choices
                .into_iter()
                .next()
                .context("mistral.rs returned no choice")?;
            let rollout = self.rollout(ri, si, &sampler, &choice.finish_reason, resp.usage.completion_tokens, sampling).await?;
            // A closed receiver means the caller gave up on this batch; finishing is harmless.
            let _ = done.send(rollout);
        }
        Ok(())
    }

    async fn reload(&self, dir: &Path) -> Result<()> {
        let Some(live) = &self.live_dir else {
            bail!(
                "reload needs an HF safetensors model; this engine serves a {:?} file \
                 (convert it with `orchestrator import gguf`)",
                self.format
            );
        };
        check_hf_dir(dir)?;
        let _exclusive = self.serving.write().await;
        self.model
            .unload_model(&self.model_id)
            .map_err(|e| anyhow::anyhow!("unloading model for reload: {e}"))?;
        let relinked = link_model_dir(dir, live);
        let reloaded = match relinked {
            Ok(()) => self.model.reload_model(&self.model_id).await.map_err(|e| anyhow::anyhow!("{e}")),
            Err(e) => Err(e),
        };
        // Unloading clears the default model; every later request would fail as
        // `EnginePoisoned` until it is set again.
        self.model
            .set_default_model_id(&self.model_id)
            .map_err(|e| anyhow::anyhow!("restoring default model after reload: {e}"))?;
        reloaded.with_context(|| format!("reloading weights from {}", dir.display()))
    }
}
