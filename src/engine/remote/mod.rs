//! [`Engine`] on a pool of vLLM or SGLang servers.
//!
//! Prompts are templated and tokenised here ([`prompt`]) and sent as ids, so the rollout's
//! prompt ids are exactly what the server saw. All samples of a prompt group go to one server
//! (they share its prefix cache): the healthy server with the fewest requests outstanding that
//! has room. A server that fails (connection, timeout, 5xx, a reply that does not check out) is
//! ejected and its groups are sent elsewhere, up to `max_group_retries` times each; a group
//! that cannot be generated comes back as canceled rollouts (never judged, never trained on),
//! and a step with fewer than `min_groups_share` of its groups is a [`PoolShort`] error.
//! Ejected servers are probed (`/health`) in the background and get the current weights
//! before they are admitted again.
//!
//! Weights are pushed as versions named `policy-vNNNNNN` (the learner step): to every healthy
//! server in parallel; generations switch to a version only once every healthy server has
//! acknowledged it, and a server whose push failed is ejected (never left serving old
//! weights). A LoRA version nothing is generating with any more is unloaded.

pub mod config;
pub mod pool;
pub mod prompt;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

pub use config::{RemoteConfig, RemoteKind, WeightPush, VERSION_PREFIX};
use pool::Pool;
use prompt::PromptTemplate;
use wire::PushReply;

use super::{Engine, GenRequest, Rollout, SamplingConfig, WeightFormat};
use crate::engine::FinishReason;

/// The version name of the learner's weights after `step` steps.
pub fn version_name(step: u64) -> String {
    format!("{VERSION_PREFIX}{step:06}")
}

/// Fewer prompt groups arrived than `min_groups_share` asks for: the step cannot go on.
#[derive(Debug)]
pub struct PoolShort(pub String);

impl std::fmt::Display for PoolShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PoolShort {}

/// The weights new generations use.
#[derive(Debug, Clone, PartialEq)]
struct Version {
    /// LoRA name to generate with; None = the base model name.
    lora: Option<String>,
    /// What a (re)joining server must load: (name, dir) of the adapter or the full directory.
    dir: Option<PathBuf>,
    step: u64,
}

struct Shared {
    cfg: RemoteConfig,
    pool: Pool,
    current: Mutex<Version>,
    /// Generation calls running per LoRA name (None = base).
    inflight: Mutex<HashMap<Option<String>, usize>>,
    /// LoRA names replaced by a newer version, unloaded once nothing generates with them.
    retired: Mutex<Vec<String>>,
    /// Serialises pushes and readmissions, so a server never joins between two pushes with the
    /// older weights.
    push_lock: tokio::sync::Mutex<()>,
}

pub struct RemoteEngine {
    shared: Arc<Shared>,
    prompt: PromptTemplate,
    vocab: usize,
    probe: tokio::task::JoinHandle<()>,
}

impl Drop for RemoteEngine {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn log(line: String) {
    eprintln!("remote: {line}");
}

impl Shared {
    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.connect_timeout_secs)
    }

    /// Loads `v` on server `i` (nothing for the base model). An adapter name the server has
    /// from elsewhere (an earlier process, or before it was ejected) is loaded again, since it
    /// may hold other weights.
    async fn push_to(&self, i: usize, v: &Version) -> Result<()> {
        let Some(dir) = &v.dir else { return Ok(()) };
        let path = dir.to_string_lossy();
        let kind = self.cfg.kind;
        match (&v.lora, self.cfg.weight_push) {
            (Some(name), _) => {
                if self.pool.servers[i].has_loaded(name) {
                    return Ok(());
                }
                let (p, body) = wire::load_lora(kind, name, &path);
                let (status, text) = self.pool.post(i, p, &body).await?;
                match wire::push_reply(kind, status, &text) {
                    PushReply::Ok => {}
                    PushReply::AlreadyLoaded => {
                        let (up, ubody) = wire::unload_lora(kind, name);
                        let (us, ut) = self.pool.post(i, up, &ubody).await?;
                        if let PushReply::Failed(m) = wire::push_reply(kind, us, &ut) {
                            bail!("unloading the stale {name}: {m}");
                        }
                        let (status, text) = self.pool.post(i, p, &body).await?;
                        if let PushReply::Failed(m) = wire::push_reply(kind, status, &text) {
                            bail!("loading {name}: {m}");
                        }
                    }
                    PushReply::Failed(m) => bail!("loading {name}: {m}"),
                }
                self.pool.servers[i].mark_loaded(name);
            }
            (None, WeightPush::Disk) => {
                let (p, body) = wire::update_from_disk(&path);
                let (status, text) = self.pool.post(i, p, &body).await?;
                match wire::push_reply(kind, status, &text) {
                    PushReply::Ok | PushReply::AlreadyLoaded => {}
                    PushReply::Failed(m) => bail!("update_weights_from_disk {path}: {m}"),
                }
            }
            (None, _) => {}
        }
        Ok(())
    }

    /// Asks server `i` whether it is up and serves our model.
    async fn check(&self, i: usize) -> Result<()> {
        self.pool.get(i, "/health", self.timeout()).await?;
        if self.cfg.kind == RemoteKind::Vllm {
            let text = self.pool.get(i, "/v1/models", self.timeout()).await?;
            let v: serde_json::Value = serde_json::from_str(&text).context("/v1/models reply is not JSON")?;
            let names: Vec<&str> = v.get("data").and_then(|d| d.as_array()).map(|d| d.iter().filter_map(|m| m.get("id")?.as_str()).collect()).unwrap_or_default();
            if !names.contains(&self.cfg.model.as_str()) {
                bail!("/v1/models does not list {:?} (it serves {names:?}); engine.remote.model must be its --served-model-name", self.cfg.model);
            }
        }
        Ok(())
    }

    /// Probes server `i` and, if it answers, pushes the current version and admits it.
    async fn try_admit(&self, i: usize) -> Result<()> {
        let epoch = self.pool.servers[i].epoch();
        self.check(i).await?;
        let _push = self.push_lock.lock().await;
        let v = lock(&self.current).clone();
        self.push_to(i, &v).await?;
        if self.pool.servers[i].admit(epoch) {
            log(format!("{} admitted (serving {})", self.pool.servers[i].url, v.lora.as_deref().unwrap_or(&self.cfg.model)));
        }
        Ok(())
    }

    fn eject(&self, i: usize, reason: &str) {
        if self.pool.servers[i].eject(reason, Duration::from_secs_f64(self.cfg.probe_interval_secs)) {
            log(format!("{} ejected: {reason}", self.pool.servers[i].url));
        }
    }

    /// Unloads retired LoRA versions that no generation uses any more.
    async fn unload_retired(&self) {
        let idle: Vec<String> = {
            let inflight = lock(&self.inflight);
            let mut retired = lock(&self.retired);
            let (idle, busy): (Vec<String>, Vec<String>) = retired.drain(..).partition(|n| inflight.get(&Some(n.clone())).copied().unwrap_or(0) == 0);
            *retired = busy;
            idle
        };
        for name in idle {
            for i in 0..self.pool.servers.len() {
                if !self.pool.servers[i].has_loaded(&name) {
                    continue;
                }
                let (p, body) = wire::unload_lora(self.cfg.kind, &name);
                match self.pool.post(i, p, &body).await {
                    Ok((s, t)) => {
                        if let PushReply::Failed(m) = wire::push_reply(self.cfg.kind, s, &t) {
                            log(format!("{}: unloading {name}: {m}", self.pool.servers[i].url));
                        }
                    }
                    Err(e) => log(format!("{}: unloading {name}: {e:#}", self.pool.servers[i].url)),
                }
                self.pool.servers[i].mark_unloaded(&name);
            }
        }
    }
}

/// Background readmission of ejected servers.
async fn probe_loop(shared: std::sync::Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = shared.upgrade() else { return };
        let ejected: Vec<usize> = (0..s.pool.servers.len()).filter(|&i| s.pool.servers[i].due()).collect();
        let tries = ejected.iter().map(|&i| {
            let s = s.clone();
            // A server that does not answer yet stays out, with the reason it left.
            async move { s.try_admit(i).await.ok(); }
        });
        futures::future::join_all(tries).await;
    }
}

/// The pinned version of one generation call; unpins on drop.
struct Pinned<'a> {
    shared: &'a Shared,
    lora: Option<String>,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        let mut m = lock(&self.shared.inflight);
        if let Some(c) = m.get_mut(&self.lora) {
            *c = c.saturating_sub(1);
        }
    }
}

impl RemoteEngine {
    /// Connects to the pool for the model directory `model_dir` (its tokenizer and chat
    /// template). `served` = (step, dir) of the weights to serve from the start, pushed to every
    /// server before it is used (a resumed run's served version); None = the base model.
    pub async fn connect(cfg: &RemoteConfig, model_dir: &Path, served: Option<(u64, PathBuf)>) -> Result<Self> {
        let prompt = PromptTemplate::load(model_dir)?;
        let vocab = prompt.vocab_size();
        let api_key = if cfg.api_key_env.is_empty() {
            None
        } else {
            match std::env::var(&cfg.api_key_env) {
                Ok(k) if !k.is_empty() => Some(k),
                _ => bail!("engine.remote.api_key_env: environment variable {} is not set", cfg.api_key_env),
            }
        };
        let pool = Pool::new(
            &cfg.servers,
            api_key.as_deref(),
            Duration::from_secs_f64(cfg.connect_timeout_secs),
            Duration::from_secs_f64(cfg.request_timeout_secs),
            cfg.max_in_flight_per_server,
        )?;
        let current = match served {
            Some((step, dir)) if cfg.weight_push != WeightPush::None => Version {
                lora: (cfg.weight_push == WeightPush::Lora).then(|| version_name(step)),
                dir: Some(dir),
                step,
            },
            _ => Version { lora: None, dir: None, step: 0 },
        };
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            pool,
            current: Mutex::new(current),
            inflight: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            push_lock: tokio::sync::Mutex::new(()),
        });
        let n = shared.pool.servers.len();
        let results = futures::future::join_all((0..n).map(|i| {
            let s = shared.clone();
            async move { (i, s.try_admit(i).await) }
        }))
        .await;
        for (i, r) in &results {
            if let Err(e) = r {
                log(format!("{} not usable yet: {e:#}", shared.pool.servers[*i].url));
                shared.eject(*i, &format!("{e:#}"));
            }
        }
        if !shared.pool.any_healthy() {
            bail!("no server of engine.remote.servers is usable: {}", shared.pool.ejected_summary());
        }
        let probe = tokio::spawn(probe_loop(Arc::downgrade(&shared), Duration::from_secs_f64(cfg.probe_interval_secs)));
        Ok(Self { shared, prompt, vocab, probe })
    }

    /// The prompt ids the pool is sent for `messages`.
    pub fn prompt_ids(&self, messages: &[super::ChatMessage]) -> Result<Vec<u32>> {
        self.prompt.encode(messages)
    }

    /// Healthy servers by index, and the groups each completed so far.
    pub fn server_stats(&self) -> Vec<(String, bool, usize)> {
        self.shared.pool.servers.iter().map(|s| (s.url.clone(), s.healthy(), s.groups_done.load(Ordering::SeqCst))).collect()
    }

    /// The version name new generations use (the base model's name before any push).
    pub fn serving(&self) -> String {
        lock(&self.shared.current).lora.clone().unwrap_or_else(|| self.shared.cfg.model.clone())
    }

    /// Samples one group on server `i`; every sample must come back and check out.
    async fn run_group(&self, i: usize, ri: usize, req: &GenRequest, prompt: &[u32], lora: Option<&str>, s: &SamplingConfig) -> Result<Vec<Rollout>> {
        let cfg = &self.shared.cfg;
        let path = wire::generate_path(cfg.kind);
        let samples = (0..req.n).map(|si| {
            let body = wire::generate_body(cfg.kind, &cfg.model, lora, prompt, s, req.seed.sample_seed(si as u64));
            async move {
                let reply = self.shared.pool.post_json(i, path, &body).await?;
                let got = wire::parse(cfg.kind, &reply, self.vocab, s.max_new_tokens)?;
                let mut text = self.prompt.decode(&got.ids)?;
                if got.finish_reason == FinishReason::Stop {
                    if let Some(cut) = s.stop.iter().filter_map(|st| text.find(st.as_str())).min() {
                        text.truncate(cut);
                    }
                }
                Ok::<_, anyhow::Error>(Rollout {
                    request: ri,
                    sample: si,
                    prompt_ids: prompt.to_vec(),
                    ids: got.ids,
                    logprobs: got.logprobs,
                    finish_reason: got.finish_reason,
                    text,
                })
            }
        });
        futures::future::try_join_all(samples).await
    }
}

#[async_trait]
impl Engine for RemoteEngine {
    async fn generate_into(&self, requests: &[GenRequest], sampling: &SamplingConfig, done: mpsc::UnboundedSender<Rollout>) -> Result<()> {
        let prompts = requests.iter().map(|r| self.prompt.encode(&r.messages)).collect::<Result<Vec<_>>>()?;
        let sh = &*self.shared;
        let lora = lock(&sh.current).lora.clone();
        *lock(&sh.inflight).entry(lora.clone()).or_insert(0) += 1;
        let pin = Pinned { shared: sh, lora: lora.clone() };

        let mut queue: VecDeque<usize> = (0..requests.len()).filter(|&r| requests[r].n > 0).collect();
        let mut attempts = vec![0usize; requests.len()];
        let mut failed: Vec<(usize, String)> = Vec::new();
        let mut running = FuturesUnordered::new();
        let mut idle_since: Option<Instant> = None;
        let patience = Duration::from_secs_f64(sh.cfg.connect_timeout_secs + 2.0 * sh.cfg.probe_interval_secs);
        loop {
            while let Some(&ri) = queue.front() {
                let n = requests[ri].n;
                let Some(i) = sh.pool.pick(n) else { break };
                queue.pop_front();
                sh.pool.servers[i].outstanding.fetch_add(n, Ordering::SeqCst);
                let (req, prompt, lora) = (&requests[ri], &prompts[ri], lora.as_deref());
                running.push(async move {
                    let r = self.run_group(i, ri, req, prompt, lora, sampling).await;
                    sh.pool.servers[i].outstanding.fetch_sub(n, Ordering::SeqCst);
                    (i, ri, r)
                });
            }
            if running.is_empty() {
                if queue.is_empty() {
                    break;
                }
                // Nothing runs and nothing can start: every server is out. Wait a while for
                // the probe to bring one back, then give the remaining groups up.
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= patience {
                    let why = format!("no usable server: {}", sh.pool.ejected_summary());
                    failed.extend(queue.drain(..).map(|ri| (ri, why.clone())));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            idle_since = None;
            let (i, ri, r) = running.next().await.expect("running is not empty");
            match r {
                Ok(rollouts) => {
                    sh.pool.servers[i].groups_done.fetch_add(1, Ordering::SeqCst);
                    sh.pool.servers[i].succeeded();
                    for r in rollouts {
                        let _ = done.send(r);
                    }
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    sh.eject(i, &why);
                    attempts[ri] += 1;
                    if attempts[ri] > sh.cfg.max_group_retries {
                        failed.push((ri, format!("{} attempts, last on {}: {why}", attempts[ri], sh.pool.servers[i].url)));
                    } else {
                        queue.push_front(ri);
                    }
                }
            }
        }
        drop(pin);
        sh.unload_retired().await;

        // Groups that could not be generated come back canceled: counted, never judged.
        for (ri, why) in &failed {
            log(format!("prompt group {ri} could not be generated: {why}"));
            for si in 0..requests[*ri].n {
                let _ = done.send(Rollout {
                    request: *ri,
                    sample: si,
                    prompt_ids: prompts[*ri].clone(),
                    ids: Vec::new(),
                    logprobs: Vec::new(),
                    finish_reason: FinishReason::Canceled,
                    text: String::new(),
                });
            }
        }
        let total = requests.iter().filter(|r| r.n > 0).count();
        let arrived = total - failed.len();
        if !failed.is_empty() && (arrived as f64) < sh.cfg.min_groups_share * total as f64 - 1e-9 {
            return Err(PoolShort(format!(
                "the remote pool generated {arrived} of {total} prompt groups, fewer than engine.remote.min_groups_share = {} asks for; first failure: group {}: {}",
                sh.cfg.min_groups_share, failed[0].0, failed[0].1
            ))
            .into());
        }
        Ok(())
    }

    fn weight_format(&self) -> WeightFormat {
        match self.shared.cfg.weight_push {
            WeightPush::Lora => WeightFormat::Adapter,
            WeightPush::Disk => WeightFormat::HfDir,
            WeightPush::None => WeightFormat::Nothing,
        }
    }

    async fn push(&self, step: u64, dir: &Path) -> Result<()> {
        let sh = &*self.shared;
        if sh.cfg.weight_push == WeightPush::None {
            return Ok(());
        }
        let _push = sh.push_lock.lock().await;
        let v = Version { lora: (sh.cfg.weight_push == WeightPush::Lora).then(|| version_name(step)), dir: Some(dir.to_path_buf()), step };
        let targets = sh.pool.healthy();
        let results = futures::future::join_all(targets.iter().map(|&i| {
            let v = &v;
            async move { (i, sh.push_to(i, v).await) }
        }))
        .await;
        let mut ok = 0;
        for (i, r) in results {
            match r {
                Ok(()) => ok += 1,
                Err(e) => sh.eject(i, &format!("push of {} failed: {e:#}", v.lora.as_deref().unwrap_or("full weights"))),
            }
        }
        if ok == 0 {
            bail!("pushing the weights of step {step} ({}) failed on every server: {}", dir.display(), sh.pool.ejected_summary());
        }
        let old = std::mem::replace(&mut *lock(&sh.current), v);
        if let Some(name) = old.lora {
            lock(&sh.retired).push(name);
        }
        drop(_push);
        sh.unload_retired().await;
        Ok(())
    }

    async fn reload(&self, dir: &Path) -> Result<()> {
        bail!("the remote engine takes versioned pushes, not reloads ({})", dir.display())
    }
}
