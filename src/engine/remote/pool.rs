//! The servers of a remote pool: who is healthy, what each has in flight and which weight
//! versions it has loaded; the HTTP calls, with the API key in a header and nowhere else.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde::Serialize;
use serde_json::Value;

/// The largest reply body read from a server. A 32k-token completion with log-probs is a few
/// MB; anything past this is a broken or hostile server, not a reply to hold in memory.
pub const MAX_REPLY_BYTES: usize = 64 << 20;

/// A server's error reply about one request, not about the server (see
/// [`super::wire::refused_request`]): the same request would fail anywhere, so it is neither
/// retried nor held against the server.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server refused the request: HTTP {}: {}", self.status, self.message)
    }
}

impl std::error::Error for Refused {}

/// One server's cumulative counts, as the trainer's metrics report them (per-step figures are
/// differences of two snapshots).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerStats {
    pub url: String,
    pub healthy: bool,
    /// Generation requests (samples) sent.
    pub requests: u64,
    /// Samples that came back whole.
    pub samples: u64,
    /// Completion tokens of those samples.
    pub generated_tokens: u64,
    /// Seconds spent on those samples' requests, summed (requests overlap, so the trainer's
    /// tokens/s of a step is tokens over the step's generation time, not over this).
    pub busy_secs: f64,
    /// Prompt groups that failed for the server's sake (connection, timeout, 5xx, a broken
    /// reply); each one ejects it.
    pub failures: u64,
    /// Prompt groups the server refused for the request's own sake (HTTP 400/404/413/422).
    pub refused: u64,
    pub ejections: u64,
    pub groups_done: u64,
    /// Samples handed to it and not finished, now.
    pub outstanding: u64,
}

/// Counters behind [`ServerStats`].
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub samples: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub busy_micros: AtomicU64,
    pub failures: AtomicU64,
    pub refused: AtomicU64,
    pub ejections: AtomicU64,
}

pub struct Server {
    /// Base URL without a trailing slash.
    pub url: String,
    /// Generation requests (samples) handed to this server and not finished.
    pub outstanding: AtomicUsize,
    /// Prompt groups it completed (for the metrics and the slow-server test).
    pub groups_done: AtomicUsize,
    pub counters: Counters,
    state: Mutex<State>,
    /// Bumped at each ejection, so a readmission probe that raced another ejection is dropped.
    epoch: AtomicU64,
}

#[derive(Debug, Clone)]
struct State {
    healthy: bool,
    reason: String,
    /// LoRA names loaded on the server by this process. At an ejection they move to `stale`: a
    /// server that comes back may have restarted (and lost them) or not (and still hold them).
    loaded: BTreeSet<String>,
    /// Names that may still be loaded from before an ejection: unloaded at readmission.
    stale: BTreeSet<String>,
    /// Ejections since its last completed group, and when the probe may readmit it: a server
    /// that answers `/health` but keeps failing is tried less and less often.
    strikes: u32,
    retry_at: Instant,
}

impl Server {
    fn new(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            outstanding: AtomicUsize::new(0),
            groups_done: AtomicUsize::new(0),
            counters: Counters::default(),
            state: Mutex::new(State {
                healthy: false,
                reason: "not contacted yet".into(),
                loaded: BTreeSet::new(),
                stale: BTreeSet::new(),
                strikes: 0,
                retry_at: Instant::now(),
            }),
            epoch: AtomicU64::new(0),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn healthy(&self) -> bool {
        self.st().healthy
    }

    pub fn reason(&self) -> String {
        self.st().reason.clone()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Takes the server out of rotation; the probe tries it again after `backoff` doubled per
    /// strike (at most 64 times). Returns false if it already was out.
    pub fn eject(&self, reason: &str, backoff: Duration) -> bool {
        let mut st = self.st();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let loaded = std::mem::take(&mut st.loaded);
        st.stale.extend(loaded);
        st.strikes = st.strikes.saturating_add(1);
        st.retry_at = Instant::now() + backoff * (1u32 << (st.strikes - 1).min(6));
        let was = st.healthy;
        st.healthy = false;
        st.reason = reason.to_string();
        if was {
            self.counters.ejections.fetch_add(1, Ordering::Relaxed);
        }
        was
    }

    /// Names loaded before an ejection, minus `keep`; forgotten here (the caller unloads them).
    pub fn take_stale(&self, keep: Option<&str>) -> Vec<String> {
        let mut st = self.st();
        let stale = std::mem::take(&mut st.stale);
        stale.into_iter().filter(|n| Some(n.as_str()) != keep && !st.loaded.contains(n)).collect()
    }

    pub fn stats(&self) -> ServerStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            url: self.url.clone(),
            healthy: self.healthy(),
            requests: get(&c.requests),
            samples: get(&c.samples),
            generated_tokens: get(&c.generated_tokens),
            busy_secs: get(&c.busy_micros) as f64 * 1e-6,
            failures: get(&c.failures),
            refused: get(&c.refused),
            ejections: get(&c.ejections),
            groups_done: self.groups_done.load(Ordering::Relaxed) as u64,
            outstanding: self.outstanding.load(Ordering::SeqCst) as u64,
        }
    }

    /// Puts the server back, unless it was ejected again since `epoch`.
    pub fn admit(&self, epoch: u64) -> bool {
        let mut st = self.st();
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return false;
        }
        st.healthy = true;
        st.reason.clear();
        true
    }

    /// Whether the probe may try to readmit it now.
    pub fn due(&self) -> bool {
        let st = self.st();
        !st.healthy && Instant::now() >= st.retry_at
    }

    /// A group came back whole: its strikes are forgiven.
    pub fn succeeded(&self) {
        self.st().strikes = 0;
    }

    pub fn has_loaded(&self, name: &str) -> bool {
        self.st().loaded.contains(name)
    }

    pub fn mark_loaded(&self, name: &str) {
        self.st().loaded.insert(name.to_string());
    }

    pub fn mark_unloaded(&self, name: &str) {
        self.st().loaded.remove(name);
    }
}

/// Samples handed to a server, counted in its `outstanding` until dropped (also when the
/// generation that held them is dropped mid-way).
pub struct Outstanding<'a> {
    server: &'a Server,
    n: usize,
}

impl<'a> Outstanding<'a> {
    pub fn new(server: &'a Server, n: usize) -> Self {
        server.outstanding.fetch_add(n, Ordering::SeqCst);
        Self { server, n }
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.server.outstanding.fetch_sub(self.n, Ordering::SeqCst);
    }
}

/// Reads a reply body, at most `cap` bytes (a declared longer one is refused before reading).
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<String> {
    if let Some(len) = resp.content_length() {
        if len > cap as u64 {
            bail!("reply body of {len} bytes is over the {cap}-byte limit");
        }
    }
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        if buf.len() + chunk.len() > cap {
            bail!("reply body is over the {cap}-byte limit");
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|e| anyhow::anyhow!("reply body is not UTF-8 (at byte {})", e.utf8_error().valid_up_to()))
}

/// The servers and one HTTP client for all of them.
pub struct Pool {
    pub servers: Vec<Server>,
    http: reqwest::Client,
    /// Requests at once per server.
    pub capacity: usize,
    /// Longest reply body read ([`MAX_REPLY_BYTES`]).
    pub max_reply_bytes: usize,
}

/// A failed HTTP exchange: what to say about it (never the key).
fn describe(e: reqwest::Error) -> anyhow::Error {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reply body broken"
    } else {
        "request failed"
    };
    // reqwest's own text is generic ("error sending request"); the cause is in its sources
    // (hyper's and the OS's, which carry neither the URL nor any header).
    let mut causes = String::new();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        causes.push_str(&format!(": {c}"));
        src = c.source();
    }
    anyhow::anyhow!("{kind}: {}{causes}", e.without_url())
}

impl Pool {
    pub fn new(urls: &[String], api_key: Option<&str>, connect_timeout: Duration, request_timeout: Duration, capacity: usize) -> Result<Self> {
        let mut headers = HeaderMap::new();
        if let Some(k) = api_key {
            let mut v = HeaderValue::from_str(&format!("Bearer {k}")).context("the API key has characters an HTTP header cannot carry")?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .pool_max_idle_per_host(capacity)
            .build()
            .context("building the HTTP client")?;
        Ok(Self { servers: urls.iter().map(|u| Server::new(u)).collect(), http, capacity, max_reply_bytes: MAX_REPLY_BYTES })
    }

    /// POSTs JSON; returns the status and body text (a transport failure is an error).
    /// `timeout` replaces the client's request timeout (pushes have their own).
    pub async fn post(&self, server: usize, path: &str, body: &Value, timeout: Option<Duration>) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.servers[server].url);
        let mut req = self.http.post(&url).json(body);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(describe)?;
        let status = resp.status().as_u16();
        let text = read_capped(resp, self.max_reply_bytes).await?;
        Ok((status, text))
    }

    /// POSTs a generation request for `model` (the name it asks for); anything but a 200 with a
    /// JSON body is an error, a [`Refused`] one when the reply is about the request.
    pub async fn post_json(&self, server: usize, path: &str, body: &Value, model: &str) -> Result<Value> {
        let (status, text) = self.post(server, path, body, None).await?;
        if status != 200 {
            let message = text.chars().take(300).collect::<String>();
            if super::wire::refused_request(status, &text, model) {
                return Err(Refused { status, message }.into());
            }
            bail!("HTTP {status}: {message}");
        }
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("reply is not JSON ({e}): {}", text.chars().take(200).collect::<String>()))
    }

    /// `GET path` with the connect timeout as the whole budget; Ok with the body on a 200.
    pub async fn get(&self, server: usize, path: &str, timeout: Duration) -> Result<String> {
        let url = format!("{}{path}", self.servers[server].url);
        let resp = self.http.get(&url).timeout(timeout).send().await.map_err(describe)?;
        let status = resp.status().as_u16();
        let text = read_capped(resp, self.max_reply_bytes).await?;
        if status != 200 {
            bail!("GET {path}: HTTP {status}: {}", text.chars().take(200).collect::<String>());
        }
        Ok(text)
    }

    /// The healthy server with the fewest requests outstanding that has room for `n` more
    /// (an idle server always has room). Ties go to the lower index.
    pub fn pick(&self, n: usize) -> Option<usize> {
        self.servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.healthy())
            .map(|(i, s)| (i, s.outstanding.load(Ordering::SeqCst)))
            .filter(|&(_, o)| o == 0 || o + n <= self.capacity)
            .min_by_key(|&(i, o)| (o, i))
            .map(|(i, _)| i)
    }

    pub fn healthy(&self) -> Vec<usize> {
        (0..self.servers.len()).filter(|&i| self.servers[i].healthy()).collect()
    }

    pub fn any_healthy(&self) -> bool {
        self.servers.iter().any(|s| s.healthy())
    }

    /// One line per ejected server with its reason.
    pub fn ejected_summary(&self) -> String {
        self.servers.iter().filter(|s| !s.healthy()).map(|s| format!("{} ({})", s.url, s.reason())).collect::<Vec<_>>().join("; ")
    }
}
