//! Loopback stand-ins for the vLLM and SGLang servers of a remote rollout pool, for tests and
//! benchmarks: real HTTP on 127.0.0.1, each dialect's real endpoints and reply shapes (see
//! `wire`), generation by our own [`MistralEngine`] from the request's prompt ids, so ids and
//! log-probs are real. A LoRA push merges the PEFT adapter into the base weights and serves the
//! merged model under the pushed name (one engine per served name).
//!
//! Faults a test can inject: [`PoolServer::kill`] (the listener and every open connection go at
//! once, like a crashed process), failing pushes, a delay per generation request, death on the
//! n-th generation request; [`PoolServer::start_on`] rejoins on the same port. [`Counts`] says
//! what the server did.
//!
//! Seeds: the request's `seed` (vLLM) or `sampling_seed` (SGLang) is the sample's random stream
//! itself (what [`crate::engine::SeedKey::sample_seed`] gives the embedded engine), so a client
//! sending `key.sample_seed(i)` gets exactly the embedded engine's sample `i`.
//!
//! What the real servers do that a client must cope with, reproduced: seeds above 2^63 - 1 are a
//! 400 (vLLM's pydantic check); prompt plus `max_tokens` beyond the model's context is a 400;
//! sampling fields left out take the model's `generation_config.json` values (a repetition
//! penalty there is applied); a LoRA name loaded again from the same path serves what was
//! computed the first time (vLLM keys its prefix cache by adapter name and path, and unloading
//! does not drop it); LoRA replies are plain text (vLLM) or `{"success": ..}` (SGLang); SGLang
//! stamps every reply with `meta_info.weight_version` ("default" at start-up, replaced by
//! `/update_weights_from_disk`'s `weight_version`).
//!
//! The server is stricter than the real ones: every field the pool client always sends is
//! required, and unknown fields are a 400, so a misspelt field fails a test instead of silently
//! taking the server's default.

mod http;
mod merge;
mod wire;

use http::handle;

pub use merge::{merge_adapter, AdapterConfig};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

use super::gauge::InFlightGauge;
use crate::engine::{EngineConfig, MistralEngine};
use crate::model::{ModelConfig, ModelFormat};

/// Which server's API to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dialect {
    Vllm,
    Sglang,
}

#[derive(Debug, Clone)]
pub struct PoolServerOptions {
    pub dialect: Dialect,
    /// HF directory of the base model (a tiny model in tests).
    pub model_dir: PathBuf,
    /// The name the base model is served under (vLLM `--served-model-name`).
    pub served_name: String,
    /// When set, every endpoint but `/health` wants `Authorization: Bearer <key>` (401 otherwise).
    pub api_key: Option<String>,
    /// Engine settings of every served model (`serial` for bit-exact tests).
    pub engine: EngineConfig,
}

impl PoolServerOptions {
    pub fn new(dialect: Dialect, model_dir: impl Into<PathBuf>, served_name: impl Into<String>) -> Self {
        Self { dialect, model_dir: model_dir.into(), served_name: served_name.into(), api_key: None, engine: EngineConfig::default() }
    }
}

/// What the server did so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Generation requests that passed authentication, answered or not.
    pub generations_arrived: usize,
    /// Generation requests answered with a completion.
    pub generations: usize,
    /// Completions by the model name they were served under (base name or LoRA name).
    pub by_model: BTreeMap<String, usize>,
    /// Adapter loads and full-weight updates that succeeded.
    pub pushes_ok: usize,
    /// Adapter loads and full-weight updates that failed (bad adapter, injected failure).
    pub pushes_failed: usize,
    /// Loads of a name already loaded (vLLM: 400 "already been loaded"; SGLang: success false).
    pub pushes_duplicate: usize,
    pub unloads: usize,
    /// Loaded LoRA names, sorted.
    pub loaded: Vec<String>,
    /// The most generation requests ever in flight at once.
    pub max_in_flight: usize,
}

/// One request as the server saw it (after authentication).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub path: String,
    /// The JSON body, `Null` when there was none or it was not JSON.
    pub body: Value,
}

/// One served model: its engine and where its weights came from.
struct Served {
    engine: MistralEngine,
    /// The model directory (base) or adapter directory (LoRA) it was loaded from.
    source: PathBuf,
    /// The merged weights of a LoRA version, removed with it.
    _merged: Option<OwnedDir>,
}

/// A directory removed when dropped.
struct OwnedDir(PathBuf);

impl OwnedDir {
    fn new(tag: &str) -> Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("orchestrator-pool-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sizes a request is checked against before it reaches the engine.
#[derive(Debug, Clone, Copy)]
struct Limits {
    vocab_size: usize,
    max_len: usize,
}

/// Sampling defaults a server takes from the model's `generation_config.json` for fields a
/// request leaves out.
#[derive(Debug, Clone, Copy)]
pub(super) struct GenDefaults {
    pub repetition_penalty: f64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
}

fn read_gen_defaults(dir: &Path) -> GenDefaults {
    let v: Value = std::fs::read(dir.join("generation_config.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let get = |k: &str, d: f64| v.get(k).and_then(Value::as_f64).unwrap_or(d);
    GenDefaults {
        repetition_penalty: get("repetition_penalty", 1.0),
        presence_penalty: get("presence_penalty", 0.0),
        frequency_penalty: get("frequency_penalty", 0.0),
    }
}

fn read_limits(dir: &Path) -> Result<Limits> {
    let p = dir.join("config.json");
    let v: Value = serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)
        .with_context(|| format!("parsing {}", p.display()))?;
    let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize).with_context(|| format!("{}: no {k}", p.display()));
    Ok(Limits { vocab_size: get("vocab_size")?, max_len: get("max_position_embeddings")? })
}

/// `eos_token_id` (a number or a list) of config.json and generation_config.json.
fn eos_ids(dir: &Path) -> Vec<u32> {
    let mut ids = Vec::new();
    for f in ["config.json", "generation_config.json"] {
        let v: Value = std::fs::read(dir.join(f)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        match &v["eos_token_id"] {
            Value::Number(n) => ids.extend(n.as_u64().map(|x| x as u32)),
            Value::Array(a) => ids.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32)),
            _ => {}
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

struct Shared {
    dialect: Dialect,
    served_name: String,
    api_key: Option<String>,
    engine_cfg: EngineConfig,
    limits: Limits,
    tokenizer: tokenizers::Tokenizer,
    /// End-of-sequence ids (config.json and generation_config.json).
    eos: Vec<u32>,
    gen_defaults: GenDefaults,
    /// SGLang's `weight_version` of the weights served now.
    weight_version: Mutex<String>,
    base: Mutex<Arc<Served>>,
    adapters: Mutex<BTreeMap<String, Arc<Served>>>,
    /// Every adapter ever loaded, by (name, path): vLLM's prefix cache outlives an unload.
    lora_cache: Mutex<BTreeMap<(String, String), Arc<Served>>>,
    push_delay: Mutex<Duration>,
    /// One push at a time, so two loads of one name cannot both succeed.
    push_lock: tokio::sync::Mutex<()>,
    fail_pushes: AtomicBool,
    delay: Mutex<Duration>,
    /// The arrival count at which the server dies.
    die_at: Mutex<Option<usize>>,
    arrived: AtomicUsize,
    served: AtomicUsize,
    by_model: Mutex<BTreeMap<String, usize>>,
    pushes_ok: AtomicUsize,
    pushes_failed: AtomicUsize,
    pushes_duplicate: AtomicUsize,
    unloads: AtomicUsize,
    in_flight: InFlightGauge,
    next_id: AtomicUsize,
    requests: Mutex<Vec<RecordedRequest>>,
    accept: Mutex<Option<JoinHandle<()>>>,
    connections: Mutex<Vec<JoinHandle<()>>>,
    killed: AtomicBool,
}

/// A vLLM or SGLang stand-in on 127.0.0.1; it stops when dropped.
pub struct PoolServer {
    port: u16,
    shared: Arc<Shared>,
}

impl PoolServer {
    /// Loads the base model and serves it on a free port of 127.0.0.1.
    pub async fn start(opts: PoolServerOptions) -> Result<Self> {
        Self::start_on(opts, 0).await
    }

    /// As [`PoolServer::start`], on `port` (a restarted server rejoining where it was; a fresh
    /// server: the base model only, no adapters, zero counts).
    pub async fn start_on(opts: PoolServerOptions, port: u16) -> Result<Self> {
        let limits = read_limits(&opts.model_dir)?;
        let tok_path = opts.model_dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", tok_path.display()))?;
        let engine = load_engine(&opts.model_dir, &opts.engine).await?;
        let base = Served { engine, source: opts.model_dir.clone(), _merged: None };
        // SO_REUSEADDR, so a restart can bind the port its predecessor's connections linger on.
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(([127, 0, 0, 1], port).into()).with_context(|| format!("binding 127.0.0.1:{port}"))?;
        let listener = socket.listen(1024)?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            dialect: opts.dialect,
            served_name: opts.served_name,
            api_key: opts.api_key,
            engine_cfg: opts.engine,
            limits,
            tokenizer,
            eos: eos_ids(&opts.model_dir),
            gen_defaults: read_gen_defaults(&opts.model_dir),
            weight_version: Mutex::new("default".into()),
            base: Mutex::new(Arc::new(base)),
            adapters: Mutex::new(BTreeMap::new()),
            lora_cache: Mutex::new(BTreeMap::new()),
            push_delay: Mutex::new(Duration::ZERO),
            push_lock: tokio::sync::Mutex::new(()),
            fail_pushes: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            die_at: Mutex::new(None),
            arrived: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            by_model: Mutex::new(BTreeMap::new()),
            pushes_ok: AtomicUsize::new(0),
            pushes_failed: AtomicUsize::new(0),
            pushes_duplicate: AtomicUsize::new(0),
            unloads: AtomicUsize::new(0),
            in_flight: InFlightGauge::default(),
            next_id: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            accept: Mutex::new(None),
            connections: Mutex::new(Vec::new()),
            killed: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let sh2 = sh.clone();
                let conn = tokio::spawn(async move {
                    let service = service_fn(move |req| handle(sh2.clone(), req));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
                let mut conns = sh.connections.lock().unwrap();
                conns.retain(|h| !h.is_finished());
                conns.push(conn);
            }
        });
        *shared.accept.lock().unwrap() = Some(accept);
        Ok(Self { port, shared })
    }

    /// `http://127.0.0.1:PORT` (no `/v1`: the vLLM paths carry it).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dialect(&self) -> Dialect {
        self.shared.dialect
    }

    /// Closes the listener and every open connection at once: requests in flight get no
    /// answer (their clients see the connection close), new connections are refused. When
    /// this returns the port is free for [`PoolServer::start_on`].
    pub async fn kill(&self) {
        self.shared.kill().await
    }

    pub fn is_killed(&self) -> bool {
        self.shared.killed.load(Ordering::SeqCst)
    }

    /// Adapter loads and full-weight updates fail while set (vLLM 500, SGLang success false).
    pub fn set_fail_pushes(&self, fail: bool) {
        self.shared.fail_pushes.store(fail, Ordering::SeqCst);
    }

    /// Every generation request waits this long before it is served (a slow server).
    pub fn set_delay(&self, per_request: Duration) {
        *self.shared.delay.lock().unwrap() = per_request;
    }

    /// Every adapter load and full-weight update waits this long first (a slow shared disk).
    pub fn set_push_delay(&self, delay: Duration) {
        *self.shared.push_delay.lock().unwrap() = delay;
    }

    /// SGLang's weight version of what it serves now ("default" at start-up).
    pub fn weight_version(&self) -> String {
        self.shared.weight_version.lock().unwrap().clone()
    }

    /// `Some(n)`: the server dies (as [`PoolServer::kill`]) when the n-th generation request
    /// counted from this call arrives (n = 1: the next one); that request is not answered.
    pub fn set_die_after(&self, n_generations: Option<usize>) {
        let now = self.shared.arrived.load(Ordering::SeqCst);
        *self.shared.die_at.lock().unwrap() = n_generations.map(|n| now.saturating_add(n.max(1)));
    }

    pub fn counts(&self) -> Counts {
        let s = &self.shared;
        Counts {
            generations_arrived: s.arrived.load(Ordering::SeqCst),
            generations: s.served.load(Ordering::SeqCst),
            by_model: s.by_model.lock().unwrap().clone(),
            pushes_ok: s.pushes_ok.load(Ordering::SeqCst),
            pushes_failed: s.pushes_failed.load(Ordering::SeqCst),
            pushes_duplicate: s.pushes_duplicate.load(Ordering::SeqCst),
            unloads: s.unloads.load(Ordering::SeqCst),
            loaded: self.loaded(),
            max_in_flight: s.in_flight.max(),
        }
    }

    /// Loaded LoRA names, sorted.
    pub fn loaded(&self) -> Vec<String> {
        self.shared.adapters.lock().unwrap().keys().cloned().collect()
    }

    /// Generation requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.now()
    }

    /// Every request after authentication, in arrival order (`/health` excluded).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }
}

impl Drop for PoolServer {
    fn drop(&mut self) {
        if let Some(h) = self.shared.accept.lock().unwrap().take() {
            h.abort();
        }
        for c in self.shared.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

/// Serves until SIGINT or SIGTERM (or kill -9), after printing `listening on <base url>` on
/// stdout (`orchestrator serve-test-pool`).
pub async fn serve_foreground(opts: PoolServerOptions, port: u16) -> Result<()> {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let server = PoolServer::start_on(opts, port).await?;
    println!("listening on {}", server.base_url());
    std::io::stdout().flush()?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(server);
    Ok(())
}

async fn load_engine(dir: &Path, cfg: &EngineConfig) -> Result<MistralEngine> {
    let model = ModelConfig { path: dir.to_path_buf(), format: ModelFormat::Safetensors, dtype: Default::default() };
    MistralEngine::load(&model, cfg).await
}

impl Shared {
    async fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let accept = self.accept.lock().unwrap().take();
        if let Some(h) = accept {
            h.abort();
            let _ = h.await;
        }
        let conns: Vec<JoinHandle<()>> = self.connections.lock().unwrap().drain(..).collect();
        for c in &conns {
            c.abort();
        }
        for c in conns {
            let _ = c.await;
        }
    }

    /// The engine serving `name` (None: the base model), if it is served.
    fn served(&self, lora: Option<&str>) -> Option<Arc<Served>> {
        match lora {
            None => Some(self.base.lock().unwrap().clone()),
            Some(n) if n == self.served_name => Some(self.base.lock().unwrap().clone()),
            Some(n) => self.adapters.lock().unwrap().get(n).cloned(),
        }
    }

    /// Counts one arriving generation request; true when it is the one the server dies on.
    fn arrive(&self) -> bool {
        let n = self.arrived.fetch_add(1, Ordering::SeqCst) + 1;
        self.die_at.lock().unwrap().is_some_and(|at| n >= at)
    }

    fn note_served(&self, model: &str) {
        self.served.fetch_add(1, Ordering::SeqCst);
        *self.by_model.lock().unwrap().entry(model.to_string()).or_default() += 1;
    }

    /// Loads the PEFT adapter at `path` as `name`; `inplace` (vLLM's `load_inplace`) replaces a
    /// loaded adapter of that name instead of refusing it.
    async fn load_adapter(&self, name: &str, path: &str, inplace: bool) -> Result<(), PushError> {
        let _one = self.push_lock.lock().await;
        let exists = self.adapters.lock().unwrap().contains_key(name);
        if name == self.served_name || (exists && !inplace) {
            self.pushes_duplicate.fetch_add(1, Ordering::SeqCst);
            return Err(PushError::Duplicate);
        }
        if self.fail_pushes.load(Ordering::SeqCst) {
            self.pushes_failed.fetch_add(1, Ordering::SeqCst);
            return Err(PushError::Injected);
        }
        self.push_wait().await;
        let key = (name.to_string(), path.to_string());
        let cached = self.lora_cache.lock().unwrap().get(&key).cloned();
        let result = match cached {
            Some(served) => Ok(served),
            None => self.merge_and_load(name, path).await,
        };
        if let Ok(served) = &result {
            self.lora_cache.lock().unwrap().insert(key, served.clone());
        }
        match &result {
            Ok(served) => {
                self.adapters.lock().unwrap().insert(name.to_string(), served.clone());
                self.pushes_ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => {
                self.pushes_failed.fetch_add(1, Ordering::SeqCst);
            }
        }
        result.map(|_| ()).map_err(|e| PushError::Failed(format!("{e:#}")))
    }

    async fn merge_and_load(&self, name: &str, path: &str) -> Result<Arc<Served>> {
        let base = self.base.lock().unwrap().source.clone();
        let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        let dir = OwnedDir::new(&format!("lora-{safe}"))?;
        let (adapter, out) = (PathBuf::from(path), dir.0.clone());
        tokio::task::spawn_blocking(move || merge_adapter(&base, &adapter, &out))
            .await
            .context("merge task failed")??;
        let engine = load_engine(&dir.0, &self.engine_cfg).await?;
        Ok(Arc::new(Served { engine, source: PathBuf::from(path), _merged: Some(dir) }))
    }

    async fn push_wait(&self) {
        let d = *self.push_delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    fn unload_adapter(&self, name: &str) -> bool {
        let removed = self.adapters.lock().unwrap().remove(name).is_some();
        if removed {
            self.unloads.fetch_add(1, Ordering::SeqCst);
        }
        removed
    }

    /// SGLang's `update_weights_from_disk`: a fresh engine on `path`, swapped in for the base
    /// model only once it loaded (requests in flight finish on the old one).
    async fn update_base(&self, path: &str) -> Result<()> {
        let _one = self.push_lock.lock().await;
        self.push_wait().await;
        let result = async {
            anyhow::ensure!(!self.fail_pushes.load(Ordering::SeqCst), "injected push failure");
            let dir = PathBuf::from(path);
            crate::engine::mistral::check_hf_dir(&dir)?;
            let engine = load_engine(&dir, &self.engine_cfg).await?;
            *self.base.lock().unwrap() = Arc::new(Served { engine, source: dir, _merged: None });
            Ok::<(), anyhow::Error>(())
        }
        .await;
        let counter = if result.is_ok() { &self.pushes_ok } else { &self.pushes_failed };
        counter.fetch_add(1, Ordering::SeqCst);
        result
    }
}

#[derive(Debug)]
enum PushError {
    Duplicate,
    /// `set_fail_pushes(true)`.
    Injected,
    Failed(String),
}
