//! [`Judge`] on any OpenAI-compatible `/v1/chat/completions` endpoint.
//!
//! Every HTTP attempt holds a semaphore permit, so at most `max_concurrency` requests are in
//! flight. Failures are sorted into retryable (5xx, 408, 429, timeouts, connection errors,
//! unreadable bodies) and final (other 4xx, reported with the server's message). Retries use
//! exponential backoff with jitter (`backon`); 429 and 503 wait exactly as long as their
//! `Retry-After` asks (seconds or HTTP date). A call that still fails is `Unscored` with its
//! reason, never a verdict; `breaker_failures` such calls in a row open a circuit breaker
//! ([`Judge::health`]) so a dead endpoint stops a run instead of unscoring it.
//!
//! The API key is read once from the environment variable the config names, kept in an
//! [`ApiKey`] whose `Debug` hides it, sent only as `Authorization: Bearer`, and scrubbed from
//! any server message we report.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::templates::Templates;
use super::verdict::{self, Labels};
use super::{
    Comparison, Judge, JudgeConfig, JudgeHealth, JudgeOutput, Judgement, OpenAiConfig, RatingOutput,
    Usage, VerdictMode,
};

/// A secret read from the environment. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> Self {
        Self(key)
    }
    fn expose(&self) -> &str {
        &self.0
    }
    /// Replaces every occurrence of the key in `text`.
    pub fn scrub(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.0, "[redacted]")
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

/// A timed-out or reset request may still be running on the server; its permit is held this
/// much longer so the server never sees more than `max_concurrency` requests.
const ABANDON_GRACE: Duration = Duration::from_millis(25);

const REASK_TAG: &str = "Your reply did not end with exactly one verdict tag. Reply with the tag only: [[A]] if answer A is better, [[B]] if answer B is better, [[TIE]] if they are equally good.";
const REASK_SCORE: &str = "Your reply did not end with a score tag. Reply with the tag only, for example [[SCORE: 6]].";

/// One failed HTTP attempt.
#[derive(Debug)]
enum Failure {
    Retryable { msg: String, retry_after: Option<Duration> },
    Final(String),
}

impl Failure {
    fn msg(&self) -> &str {
        match self {
            Failure::Retryable { msg, .. } | Failure::Final(msg) => msg,
        }
    }
}

/// A successful reply.
struct Reply {
    content: String,
    /// (token, ln p) alternatives of the first generated token, when returned.
    top: Option<Vec<(String, f64)>>,
}

/// Longer than any `judge.openai.max_retry_after_secs` may be (30 days).
const RETRY_AFTER_CAP_SECS: f64 = 2.0 * crate::validate::MAX_SECS;

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        // Any size a server sends: capped far above every wait we would accept, so it is refused
        // as too long instead of overflowing a Duration (which panics).
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(RETRY_AFTER_CAP_SECS)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[derive(Debug, Default)]
struct BreakerState {
    consecutive: u32,
    open_since: Option<Instant>,
    /// When the current probe call was let through.
    probing: Option<Instant>,
    last_error: String,
}

/// Opens after `threshold` consecutive failed calls; after `cooldown` one probe call may go
/// through, and its success closes it again.
#[derive(Debug)]
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

impl Breaker {
    fn admit(&self) -> Result<(), String> {
        let mut s = self.state.lock().unwrap();
        let Some(since) = s.open_since else { return Ok(()) };
        // A probe whose caller was cancelled never reports back: after another cooldown the
        // next call may probe instead.
        let probe_free = s.probing.is_none_or(|p| p.elapsed() >= self.cooldown);
        if since.elapsed() >= self.cooldown && probe_free {
            s.probing = Some(Instant::now());
            return Ok(());
        }
        Err(format!(
            "judge is down: circuit breaker open after {} consecutive failed calls; last error: {}",
            s.consecutive, s.last_error
        ))
    }

    fn success(&self) {
        let mut s = self.state.lock().unwrap();
        *s = BreakerState::default();
    }

    fn failure(&self, msg: &str) {
        let mut s = self.state.lock().unwrap();
        s.consecutive += 1;
        s.last_error = msg.to_string();
        s.probing = None;
        if self.threshold > 0 && (s.consecutive >= self.threshold || s.open_since.is_some()) {
            s.open_since = Some(Instant::now());
        }
    }

    fn health(&self) -> JudgeHealth {
        let s = self.state.lock().unwrap();
        match s.open_since {
            None => JudgeHealth::Up,
            Some(since) => JudgeHealth::Down {
                consecutive_failures: s.consecutive,
                last_error: s.last_error.clone(),
                retry_in_secs: self.cooldown.saturating_sub(since.elapsed()).as_secs_f64(),
            },
        }
    }
}

pub struct OpenAiJudge {
    client: reqwest::Client,
    url: String,
    cfg: OpenAiConfig,
    key: Option<ApiKey>,
    templates: Templates,
    mode: VerdictMode,
    labels: Labels,
    tie_margin: f64,
    reask: bool,
    permits: Semaphore,
    breaker: Breaker,
}

impl std::fmt::Debug for OpenAiJudge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiJudge")
            .field("url", &self.url)
            .field("model", &self.cfg.model)
            .field("key", &self.key)
            .field("mode", &self.mode)
            .finish()
    }
}

impl OpenAiJudge {
    /// Reads the key from the process environment.
    pub fn new(judge: &JudgeConfig) -> Result<Self> {
        Self::with_env(judge, |name| std::env::var(name).ok())
    }

    /// As [`OpenAiJudge::new`] with an explicit environment lookup.
    pub fn with_env(judge: &JudgeConfig, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let cfg = judge.openai.clone();
        let key = if cfg.api_key_env.is_empty() {
            None
        } else {
            match env(&cfg.api_key_env) {
                Some(k) if !k.trim().is_empty() => Some(ApiKey(k.trim().to_string())),
                _ => bail!(
                    "judge.openai.api_key_env: environment variable {} is not set (set it, or set \
                     api_key_env = \"\" for an endpoint without authentication)",
                    cfg.api_key_env
                ),
            }
        };
        let templates = Templates::load(judge.templates.as_deref())?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(cfg.max_concurrency)
            .connect_timeout(Duration::from_secs_f64(cfg.timeout_secs))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            client,
            url: format!("{}/chat/completions", cfg.base_url.trim_end_matches('/')),
            permits: Semaphore::new(cfg.max_concurrency),
            breaker: Breaker {
                threshold: cfg.breaker_failures,
                cooldown: Duration::from_secs_f64(cfg.breaker_cooldown_secs),
                state: Mutex::new(BreakerState::default()),
            },
            cfg,
            key,
            templates,
            mode: judge.mode,
            labels: judge.labels.clone(),
            tie_margin: judge.tie_margin,
            reask: judge.reask,
        })
    }

    fn scrub(&self, s: &str) -> String {
        match &self.key {
            Some(k) => k.scrub(s),
            None => s.to_string(),
        }
    }

    fn body(&self, messages: &[(&str, String)], label_mode: bool) -> Value {
        let msgs: Vec<Value> =
            messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
        let mut b = json!({
            "model": self.cfg.model,
            "messages": msgs,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        });
        if label_mode {
            b["max_tokens"] = json!(1);
            b["logprobs"] = json!(true);
            b["top_logprobs"] = json!(self.cfg.top_logprobs);
        }
        b
    }

    /// One HTTP exchange, holding a concurrency permit. Every 2xx reply's token usage is added
    /// to `usage` (a reply without a usable `usage` as missing), whether or not it is usable.
    async fn attempt(&self, body: &Value, usage: &Mutex<Usage>) -> Result<Reply, Failure> {
        let _permit = self.permits.acquire().await.expect("semaphore never closed");
        let timeout = Duration::from_secs_f64(self.cfg.timeout_secs);
        let mut req = self.client.post(&self.url).json(body).timeout(timeout);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k.expose());
        }
        let abandoned = |msg: String| async move {
            tokio::time::sleep(ABANDON_GRACE).await;
            Failure::Retryable { msg, retry_after: None }
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(abandoned(format!("timed out after {:.1}s", timeout.as_secs_f64())).await)
            }
            Err(e) => return Err(abandoned(format!("connection error: {}", error_chain(&e))).await),
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) if e.is_timeout() => {
                return Err(abandoned(format!("timed out after {:.1}s reading the body", timeout.as_secs_f64())).await)
            }
            Err(e) => return Err(abandoned(format!("connection error reading the body: {}", error_chain(&e))).await),
        };
        if !status.is_success() {
            let msg = format!("HTTP {}: {}", status.as_u16(), self.scrub(&server_message(&bytes)));
            let code = status.as_u16();
            return Err(if code == 429 || code == 503 {
                Failure::Retryable { msg, retry_after }
            } else if status.is_server_error() || code == 408 {
                Failure::Retryable { msg, retry_after: None }
            } else {
                Failure::Final(msg)
            });
        }
        let parsed = serde_json::from_slice::<Value>(&bytes);
        usage.lock().unwrap().add(parsed.as_ref().map(Usage::from_reply).unwrap_or(Usage { usage_missing: 1, ..Usage::default() }));
        let v: Value = parsed.map_err(|e| Failure::Retryable {
            msg: format!("malformed JSON response: {e}"),
            retry_after: None,
        })?;
        let Some(choice) = v["choices"].as_array().and_then(|c| c.first()) else {
            return Err(Failure::Retryable { msg: "response has no choices".into(), retry_after: None });
        };
        let content = choice["message"]["content"].as_str().unwrap_or_default().to_string();
        let top = choice["logprobs"]["content"][0]["top_logprobs"].as_array().map(|alts| {
            alts.iter()
                .filter_map(|a| Some((a["token"].as_str()?.to_string(), a["logprob"].as_f64()?)))
                .collect::<Vec<_>>()
        });
        Ok(Reply { content, top })
    }

    /// One chat call with retries: Ok(reply) or Err(reason), the retries, and the tokens every
    /// attempt's reply reported.
    async fn chat(&self, messages: &[(&str, String)], label_mode: bool) -> (Result<Reply, String>, u32, Usage) {
        if let Err(down) = self.breaker.admit() {
            return (Err(down), 0, Usage::default());
        }
        let body = self.body(messages, label_mode);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.cfg.backoff_initial_ms))
            .with_max_delay(Duration::from_millis(self.cfg.backoff_max_ms))
            .with_factor(2.0)
            .with_max_times(self.cfg.max_retries as usize)
            .with_jitter();
        let max_wait = Duration::from_secs_f64(self.cfg.max_retry_after_secs);
        let retries = std::sync::atomic::AtomicU32::new(0);
        let gave_up_on_wait = Mutex::new(None::<Duration>);
        let usage = Mutex::new(Usage::default());
        let result = (|| self.attempt(&body, &usage))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|f: &Failure| matches!(f, Failure::Retryable { .. }))
            .adjust(|f: &Failure, next: Option<Duration>| {
                let next = next?;
                match f {
                    Failure::Retryable { retry_after: Some(ra), .. } if *ra > max_wait => {
                        *gave_up_on_wait.lock().unwrap() = Some(*ra);
                        None
                    }
                    Failure::Retryable { retry_after: Some(ra), .. } => Some(*ra),
                    _ => Some(next),
                }
            })
            .notify(|_: &Failure, _| {
                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .await;
        let retries = retries.into_inner();
        let usage = usage.into_inner().unwrap();
        match result {
            Ok(reply) => {
                self.breaker.success();
                (Ok(reply), retries, usage)
            }
            Err(f) => {
                let mut msg = match &f {
                    Failure::Final(m) => m.clone(),
                    Failure::Retryable { msg, .. } => format!("{msg} (gave up after {retries} retries)"),
                };
                if let Some(ra) = *gave_up_on_wait.lock().unwrap() {
                    msg = format!(
                        "{}; server asked to wait {:.0}s, more than judge.openai.max_retry_after_secs",
                        f.msg(),
                        ra.as_secs_f64()
                    );
                }
                self.breaker.failure(&msg);
                (Err(msg), retries, usage)
            }
        }
    }

    /// Reads a verdict from one reply, or says why not.
    fn read_verdict(&self, reply: &Reply, label_mode: bool) -> Result<Judgement, String> {
        if label_mode {
            if let Some(p) = reply.top.as_deref().and_then(|t| self.labels.probs_from_top(t)) {
                return Ok(Judgement::Scored {
                    verdict: verdict::verdict_from_probs(&p, self.tie_margin),
                    probs: Some(p),
                });
            }
            // The server gave no usable logprobs: the label text still counts, without probs.
            return self
                .labels
                .parse(&reply.content)
                .map(|v| Judgement::Scored { verdict: v, probs: None })
                .ok_or_else(|| "no verdict label".to_string());
        }
        verdict::parse_verdict(&reply.content)
            .map(|v| Judgement::Scored { verdict: v, probs: None })
            .map_err(|f| f.to_string())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The server's error message: `error.message` of an OpenAI-style body, else the body text.
fn server_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(m) = v["error"]["message"].as_str().or(v["error"].as_str()).or(v["message"].as_str()) {
            return m.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    let t = text.trim();
    if t.is_empty() {
        "(empty body)".into()
    } else {
        t.chars().take(300).collect()
    }
}

#[async_trait]
impl Judge for OpenAiJudge {
    async fn compare(&self, c: Comparison<'_>) -> JudgeOutput {
        let start = Instant::now();
        let label_mode = self.mode == VerdictMode::LabelProbability;
        let prompt = self.templates.pairwise(&c, label_mode.then_some(&self.labels));
        let mut messages = vec![("user", prompt)];
        let mut raw = Vec::new();
        let mut retries = 0;
        let mut usage = Usage::default();
        let asks = if self.reask { 2 } else { 1 };
        let mut why = String::new();
        for ask in 0..asks {
            let (reply, r, u) = self.chat(&messages, label_mode).await;
            retries += r;
            usage.add(u);
            let ms = start.elapsed().as_millis() as u64;
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => return JudgeOutput::unscored(e, raw.join("\n--- re-ask ---\n"), ms, retries).with_usage(usage),
            };
            raw.push(reply.content.clone());
            match self.read_verdict(&reply, label_mode) {
                Ok(judgement) => {
                    return JudgeOutput { judgement, raw: raw.join("\n--- re-ask ---\n"), latency_ms: ms, retries, usage }
                }
                Err(e) => why = e,
            }
            if ask + 1 < asks {
                messages.push(("assistant", reply.content));
                let reask = if label_mode {
                    format!(
                        "Reply with one letter only: {}, {} or {}.",
                        self.labels.first, self.labels.second, self.labels.tie
                    )
                } else {
                    REASK_TAG.to_string()
                };
                messages.push(("user", reask));
            }
        }
        let reason = if self.reask { format!("{why} (after one re-ask)") } else { why };
        JudgeOutput::unscored(reason, raw.join("\n--- re-ask ---\n"), start.elapsed().as_millis() as u64, retries)
            .with_usage(usage)
    }

    async fn rate(&self, prompt: &str, criteria: Option<&str>, answer: &str) -> RatingOutput {
        let start = Instant::now();
        let mut messages = vec![("user", self.templates.pointwise(prompt, criteria, answer))];
        let mut raw = Vec::new();
        let mut retries = 0;
        let mut usage = Usage::default();
        let asks = if self.reask { 2 } else { 1 };
        let mut why = String::new();
        for ask in 0..asks {
            let (reply, r, u) = self.chat(&messages, false).await;
            retries += r;
            usage.add(u);
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    return RatingOutput {
                        score: None,
                        reason: Some(e),
                        raw: raw.join("\n--- re-ask ---\n"),
                        latency_ms: start.elapsed().as_millis() as u64,
                        retries,
                        usage,
                    }
                }
            };
            raw.push(reply.content.clone());
            match verdict::parse_score(&reply.content) {
                Ok(s) => {
                    return RatingOutput {
                        score: Some(s),
                        reason: None,
                        raw: raw.join("\n--- re-ask ---\n"),
                        latency_ms: start.elapsed().as_millis() as u64,
                        retries,
                        usage,
                    }
                }
                Err(f) => why = f.to_string(),
            }
            if ask + 1 < asks {
                messages.push(("assistant", reply.content));
                messages.push(("user", REASK_SCORE.to_string()));
            }
        }
        RatingOutput {
            score: None,
            reason: Some(if self.reask { format!("{why} (after one re-ask)") } else { why }),
            raw: raw.join("\n--- re-ask ---\n"),
            latency_ms: start.elapsed().as_millis() as u64,
            retries,
            usage,
        }
    }

    fn health(&self) -> JudgeHealth {
        self.breaker.health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
        // Remote input never panics: huge values are capped (and then refused as too long).
        for huge in ["1e20", "1e308", "18446744073709551616"] {
            let d = parse_retry_after(huge, now).unwrap();
            assert!(d.as_secs_f64() > crate::validate::MAX_SECS, "{huge}: {d:?}");
        }
        assert_eq!(parse_retry_after("inf", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
        let far = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_000));
        assert!(parse_retry_after(&far, now).is_some());
    }

    #[test]
    fn key_never_shows() {
        let k = ApiKey::new("sk-secret-123".into());
        assert!(!format!("{k:?}").contains("sk-secret-123"));
        assert_eq!(k.scrub("bad key sk-secret-123 given"), "bad key [redacted] given");
        let cfg = JudgeConfig { openai: OpenAiConfig { api_key_env: "MY_KEY".into(), ..Default::default() }, ..Default::default() };
        let j = OpenAiJudge::with_env(&cfg, |n| (n == "MY_KEY").then(|| "sk-secret-123".to_string())).unwrap();
        assert!(!format!("{j:?}").contains("sk-secret-123"));
        let e = OpenAiJudge::with_env(&cfg, |_| None).unwrap_err().to_string();
        assert!(e.contains("MY_KEY") && e.contains("judge.openai.api_key_env"), "{e}");
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let b = Breaker { threshold: 2, cooldown: Duration::from_millis(30), state: Mutex::new(Default::default()) };
        assert!(b.admit().is_ok());
        b.failure("x");
        assert_eq!(b.health(), JudgeHealth::Up);
        b.failure("y");
        assert!(matches!(b.health(), JudgeHealth::Down { consecutive_failures: 2, .. }));
        assert!(b.admit().unwrap_err().contains("last error: y"));
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.admit().is_ok(), "one probe after the cooldown");
        assert!(b.admit().is_err(), "only one probe at a time");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.admit().is_ok(), "a probe that never reported back is replaced");
        b.success();
        assert_eq!(b.health(), JudgeHealth::Up);
        // A failed probe reopens at once.
        b.failure("a");
        b.failure("b");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.admit().is_ok());
        b.failure("c");
        assert!(b.admit().is_err());
    }
}
