//! The servers of a remote pool: who is healthy, what each has in flight and which weight
//! versions it has loaded; the HTTP calls, with the API key in a header and nowhere else.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde_json::Value;

pub struct Server {
    /// Base URL without a trailing slash.
    pub url: String,
    /// Generation requests (samples) handed to this server and not finished.
    pub outstanding: AtomicUsize,
    /// Prompt groups it completed (for the metrics and the slow-server test).
    pub groups_done: AtomicUsize,
    state: Mutex<State>,
    /// Bumped at each ejection, so a readmission probe that raced another ejection is dropped.
    epoch: AtomicU64,
}

#[derive(Debug, Clone)]
struct State {
    healthy: bool,
    reason: String,
    /// LoRA names loaded on the server by this process (forgotten at ejection: a server that
    /// comes back may have restarted).
    loaded: BTreeSet<String>,
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
            state: Mutex::new(State { healthy: false, reason: "not contacted yet".into(), loaded: BTreeSet::new(), strikes: 0, retry_at: Instant::now() }),
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
        st.loaded.clear();
        st.strikes = st.strikes.saturating_add(1);
        st.retry_at = Instant::now() + backoff * (1u32 << (st.strikes - 1).min(6));
        let was = st.healthy;
        st.healthy = false;
        st.reason = reason.to_string();
        was
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

/// The servers and one HTTP client for all of them.
pub struct Pool {
    pub servers: Vec<Server>,
    http: reqwest::Client,
    /// Requests at once per server.
    pub capacity: usize,
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
        Ok(Self { servers: urls.iter().map(|u| Server::new(u)).collect(), http, capacity })
    }

    /// POSTs JSON; returns the status and body text (a transport failure is an error).
    pub async fn post(&self, server: usize, path: &str, body: &Value) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.servers[server].url);
        let resp = self.http.post(&url).json(body).send().await.map_err(describe)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(describe)?;
        Ok((status, text))
    }

    /// POSTs a generation request; anything but a 200 with a JSON body is an error.
    pub async fn post_json(&self, server: usize, path: &str, body: &Value) -> Result<Value> {
        let (status, text) = self.post(server, path, body).await?;
        if status != 200 {
            bail!("HTTP {status}: {}", text.chars().take(300).collect::<String>());
        }
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("reply is not JSON ({e}): {}", text.chars().take(200).collect::<String>()))
    }

    /// `GET path` with the connect timeout as the whole budget; Ok with the body on a 200.
    pub async fn get(&self, server: usize, path: &str, timeout: Duration) -> Result<String> {
        let url = format!("{}{path}", self.servers[server].url);
        let resp = self.http.get(&url).timeout(timeout).send().await.map_err(describe)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(describe)?;
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
