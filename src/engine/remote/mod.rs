//! [`Engine`] on a pool of vLLM or SGLang servers.
//!
//! Prompts are templated and tokenised here ([`prompt`]) and sent as ids, so the rollout's
//! prompt ids are exactly what the server saw. All samples of a prompt group go to one server
//! (they share its prefix cache): the healthy server with the fewest requests outstanding that
//! has room. A server that fails (connection, timeout, 5xx, a reply that does not check out) is
//! ejected and its groups are sent elsewhere, up to `max_group_retries` times each; a group
//! that cannot be generated comes back as canceled rollouts (never judged, never trained on),
//! and a step with fewer than `min_groups_share` of its groups is a [`PoolShort`] error. A
//! reply about the request itself (HTTP 400/404/413/422: a prompt longer than the server's
//! context, a field it rejects) fails that group alone: it would fail on any server, so it is
//! not retried and the server stays in; it does not count against `min_groups_share`, but a
//! step whose every group was refused is an error. Ejected servers are probed (`/health`) in
//! the background and get the current weights before they are admitted again; adapters they
//! held from before are unloaded then.
//!
//! Weights are pushed as versions named `policy-vNNNNNN-<hash>` (the learner step and, for a
//! LoRA adapter, a hash of its files): vLLM keys its prefix cache by adapter name and path and
//! keeps it past an unload, so a name is never reused for other weights (a new run in the same
//! `export_dir`, a step redone after a crash). Pushes go to every healthy server in parallel,
//! each bounded by `push_timeout_secs`; generations switch to a version only once every healthy
//! server has acknowledged it, and a server whose push failed is ejected (never left serving
//! old weights). A LoRA version nothing is generating with any more is unloaded. With
//! `weight_push = "disk"` (SGLang) every push names its version as `weight_version` and every
//! reply's `meta_info.weight_version` is checked against it, so a server that restarted with
//! its start-up weights is caught and given the current ones; a run that starts from the base
//! model first resets every server to it.

pub mod config;
pub mod pool;
pub mod prompt;
mod version;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

pub use config::{RemoteConfig, RemoteKind, WeightPush, VERSION_PREFIX};
pub use pool::{Refused, ServerStats};
use pool::{Outstanding, Pool};
use version::{process_nonce, version_of, Version};
pub use version::{content_hash, version_name, versioned_name};
use prompt::PromptTemplate;
use wire::PushReply;

use super::{Engine, GenRequest, Rollout, SamplingConfig, WeightFormat};
use crate::engine::FinishReason;


/// Fewer prompt groups arrived than `min_groups_share` asks for: the step cannot go on.
#[derive(Debug)]
pub struct PoolShort(pub String);

impl std::fmt::Display for PoolShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PoolShort {}


struct Shared {
    cfg: RemoteConfig,
    pool: Pool,
    /// Tells this process's full-weight versions from any other's (SGLang `weight_version`).
    nonce: String,
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

    fn push_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.push_timeout_secs)
    }

    /// A weight-push call on server `i`, bounded by `push_timeout_secs`.
    async fn push_call(&self, i: usize, path: &str, body: &serde_json::Value) -> Result<(u16, String)> {
        self.pool.post(i, path, body, Some(self.push_timeout())).await
    }

    /// Loads `v` on server `i` (nothing for the base model as started). A name is only ever
    /// used for one set of weights, but the server may hold it from before an ejection or from
    /// an earlier process, possibly half loaded: it is loaded again.
    async fn push_to(&self, i: usize, v: &Version) -> Result<()> {
        let (Some(dir), Some(name)) = (&v.dir, &v.name) else { return Ok(()) };
        let path = dir.to_string_lossy();
        let kind = self.cfg.kind;
        if v.lora {
            if self.pool.servers[i].has_loaded(name) {
                return Ok(());
            }
            let (p, body) = wire::load_lora(kind, name, &path);
            let (status, text) = self.push_call(i, p, &body).await?;
            match wire::push_reply(kind, status, &text) {
                PushReply::Ok => {}
                PushReply::AlreadyLoaded => {
                    let (up, ubody) = wire::unload_lora(kind, name);
                    let (us, ut) = self.push_call(i, up, &ubody).await?;
                    if let PushReply::Failed(m) = wire::push_reply(kind, us, &ut) {
                        bail!("unloading the stale {name}: {m}");
                    }
                    let (status, text) = self.push_call(i, p, &body).await?;
                    if let PushReply::Failed(m) = wire::push_reply(kind, status, &text) {
                        bail!("loading {name}: {m}");
                    }
                }
                PushReply::Failed(m) => bail!("loading {name}: {m}"),
            }
            self.pool.servers[i].mark_loaded(name);
        } else {
            let (p, body) = wire::update_from_disk(&path, name);
            let (status, text) = self.push_call(i, p, &body).await?;
            match wire::push_reply(kind, status, &text) {
                PushReply::Ok | PushReply::AlreadyLoaded => {}
                PushReply::Failed(m) => bail!("update_weights_from_disk {path}: {m}"),
            }
        }
        Ok(())
    }

    /// Unloads from server `i` the adapters it held before its ejection, but `v`'s. A name the
    /// server no longer has (it restarted) is fine.
    async fn unload_stale(&self, i: usize, v: &Version) {
        for name in self.pool.servers[i].take_stale(v.lora()) {
            let (p, body) = wire::unload_lora(self.cfg.kind, &name);
            match self.push_call(i, p, &body).await {
                Ok((s, t)) => match wire::push_reply(self.cfg.kind, s, &t) {
                    PushReply::Failed(_) if s == 404 || t.contains("not loaded") || t.contains("does not exist") => {}
                    PushReply::Failed(m) => log(format!("{}: unloading {name} (from before its ejection): {m}", self.pool.servers[i].url)),
                    _ => {}
                },
                Err(e) => log(format!("{}: unloading {name} (from before its ejection): {e:#}", self.pool.servers[i].url)),
            }
        }
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

    /// Probes server `i` and, if it answers, pushes the current version, unloads what it held
    /// from before and admits it. The push lock is held for at most `push_timeout_secs`, so a
    /// server that hangs in its push never holds up the trainer's next push.
    async fn try_admit(&self, i: usize) -> Result<()> {
        let epoch = self.pool.servers[i].epoch();
        self.check(i).await?;
        let _push = self.push_lock.lock().await;
        let v = lock(&self.current).clone();
        let pushed = tokio::time::timeout(self.push_timeout(), async {
            self.push_to(i, &v).await?;
            self.unload_stale(i, &v).await;
            Ok::<_, anyhow::Error>(())
        })
        .await;
        match pushed {
            Ok(r) => r?,
            Err(_) => bail!("pushing the current weights took longer than engine.remote.push_timeout_secs = {}", self.cfg.push_timeout_secs),
        }
        if self.pool.servers[i].admit(epoch) {
            log(format!("{} admitted (serving {})", self.pool.servers[i].url, v.name.as_deref().unwrap_or(&self.cfg.model)));
        }
        Ok(())
    }

    fn eject(&self, i: usize, reason: &str) {
        if self.pool.servers[i].eject(reason, Duration::from_secs_f64(self.cfg.probe_interval_secs)) {
            log(format!("{} ejected: {reason}", self.pool.servers[i].url));
        }
    }

    /// New generations use `v` from now on; the LoRA version it replaces is retired (unloaded
    /// by [`Shared::unload_retired`] once nothing generates with it).
    fn make_current(&self, v: Version) {
        let old = std::mem::replace(&mut *lock(&self.current), v);
        if let Some(name) = old.lora() {
            lock(&self.retired).push(name.to_string());
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
                match self.push_call(i, p, &body).await {
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
        let nonce = process_nonce();
        let current = match (served, cfg.weight_push) {
            (Some((step, dir)), WeightPush::Lora | WeightPush::Disk) => version_of(cfg, &nonce, step, &dir).await?,
            // A run from the base model with full-weight pushes: the servers may still hold an
            // earlier run's weights, so they are reset to the base first.
            (None, WeightPush::Disk) => {
                let base = if cfg.base_path.as_os_str().is_empty() { model_dir.to_path_buf() } else { cfg.base_path.clone() };
                Version { name: Some(format!("{}-base-{nonce}", cfg.model)), dir: Some(base), lora: false, step: 0 }
            }
            _ => Version { name: None, dir: None, lora: false, step: 0 },
        };
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            pool,
            nonce,
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

    /// Every server's cumulative counts.
    pub fn pool_stats(&self) -> Vec<ServerStats> {
        self.shared.pool.servers.iter().map(|s| s.stats()).collect()
    }

    /// Samples handed to each server and not finished.
    pub fn outstanding(&self) -> Vec<usize> {
        self.shared.pool.servers.iter().map(|s| s.outstanding.load(Ordering::SeqCst)).collect()
    }

    /// The version name new generations use (the base model's name before any push).
    pub fn serving(&self) -> String {
        lock(&self.shared.current).name.clone().unwrap_or_else(|| self.shared.cfg.model.clone())
    }

    /// Samples one group on server `i` with version `v`; every sample must come back and check
    /// out.
    async fn run_group(&self, i: usize, ri: usize, req: &GenRequest, prompt: &[u32], v: &Version, s: &SamplingConfig) -> Result<Vec<Rollout>> {
        let cfg = &self.shared.cfg;
        let path = wire::generate_path(cfg.kind);
        let server = &self.shared.pool.servers[i];
        let asked = v.lora().unwrap_or(&cfg.model);
        let samples = (0..req.n).map(|si| {
            let body = wire::generate_body(cfg.kind, &cfg.model, v.lora(), prompt, s, req.seed.sample_seed(si as u64));
            async move {
                let t0 = Instant::now();
                server.counters.requests.fetch_add(1, Ordering::Relaxed);
                let reply = self.shared.pool.post_json(i, path, &body, asked).await?;
                let got = wire::parse(cfg.kind, &reply, self.vocab, s.max_new_tokens)?;
                if let (Some(want), Some(got)) = (v.weight_version(), got.weight_version.as_deref()) {
                    // A restarted server serves its start-up weights under another version.
                    ensure!(got == want, "the reply was generated with weight_version {got:?}, not the pushed {want:?} (did the server restart?)");
                }
                server.counters.samples.fetch_add(1, Ordering::Relaxed);
                server.counters.generated_tokens.fetch_add(got.ids.len() as u64, Ordering::Relaxed);
                server.counters.busy_micros.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
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
        let version = lock(&sh.current).clone();
        let lora = version.lora().map(str::to_string);
        *lock(&sh.inflight).entry(lora.clone()).or_insert(0) += 1;
        let pin = Pinned { shared: sh, lora: lora.clone() };

        let mut queue: VecDeque<usize> = (0..requests.len()).filter(|&r| requests[r].n > 0).collect();
        let mut attempts = vec![0usize; requests.len()];
        let mut failed: Vec<(usize, String)> = Vec::new();
        let mut refused: Vec<(usize, String)> = Vec::new();
        let mut running = FuturesUnordered::new();
        let mut idle_since: Option<Instant> = None;
        let patience = Duration::from_secs_f64(sh.cfg.connect_timeout_secs + 2.0 * sh.cfg.probe_interval_secs);
        loop {
            while let Some(&ri) = queue.front() {
                let n = requests[ri].n;
                let Some(i) = sh.pool.pick(n) else { break };
                queue.pop_front();
                let held = Outstanding::new(&sh.pool.servers[i], n);
                let (req, prompt, version) = (&requests[ri], &prompts[ri], &version);
                running.push(async move {
                    let r = self.run_group(i, ri, req, prompt, version, sampling).await;
                    drop(held);
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
                Err(e) if e.downcast_ref::<Refused>().is_some() => {
                    sh.pool.servers[i].counters.refused.fetch_add(1, Ordering::Relaxed);
                    refused.push((ri, format!("{e:#}")));
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    sh.pool.servers[i].counters.failures.fetch_add(1, Ordering::Relaxed);
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
        for (ri, why) in &refused {
            log(format!("prompt group {ri} was refused: {why}"));
        }
        for (ri, why) in &failed {
            log(format!("prompt group {ri} could not be generated: {why}"));
        }
        for (ri, _) in failed.iter().chain(&refused) {
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
        if total > 0 && refused.len() == total {
            // Every request wrong: a config or input problem that waiting will not fix.
            bail!("the servers refused every prompt group of the step ({total}); first: group {}: {}", refused[0].0, refused[0].1);
        }
        // Refused groups would fail anywhere: the share is of the groups a pool could make.
        let possible = total - refused.len();
        let arrived = possible - failed.len();
        if !failed.is_empty() && (arrived as f64) < sh.cfg.min_groups_share * possible as f64 - 1e-9 {
            return Err(PoolShort(format!(
                "the remote pool generated {arrived} of {possible} prompt groups, fewer than engine.remote.min_groups_share = {} asks for; first failure: group {}: {}",
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
        let v = version_of(&sh.cfg, &sh.nonce, step, dir).await?;
        let _push = sh.push_lock.lock().await;
        let targets = sh.pool.healthy();
        let results = futures::future::join_all(targets.iter().map(|&i| {
            let v = &v;
            async move {
                let r = match tokio::time::timeout(sh.push_timeout(), sh.push_to(i, v)).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("took longer than engine.remote.push_timeout_secs = {}", sh.cfg.push_timeout_secs)),
                };
                (i, r)
            }
        }))
        .await;
        let mut ok = 0;
        for (i, r) in results {
            match r {
                Ok(()) => ok += 1,
                Err(e) => sh.eject(i, &format!("push of {} failed: {e:#}", v.name.as_deref().unwrap_or("full weights"))),
            }
        }
        if ok == 0 {
            bail!("pushing the weights of step {step} ({}) failed on every server: {}", dir.display(), sh.pool.ejected_summary());
        }
        sh.make_current(v);
        drop(_push);
        sh.unload_retired().await;
        Ok(())
    }

    async fn reload(&self, dir: &Path) -> Result<()> {
        bail!("the remote engine takes versioned pushes, not reloads ({})", dir.display())
    }

    /// Unloads the LoRA version this engine pushed for itself (`eval`'s adapter), once nothing
    /// generates with it, and goes back to the base model.
    async fn release(&self) -> Result<()> {
        let sh = &*self.shared;
        if sh.cfg.weight_push != WeightPush::Lora {
            return Ok(());
        }
        let _push = sh.push_lock.lock().await;
        sh.make_current(Version { name: None, dir: None, lora: false, step: 0 });
        drop(_push);
        sh.unload_retired().await;
        Ok(())
    }
}
