//! A scripted OpenAI-compatible chat server on 127.0.0.1, for tests and `orchestrator bench judge`.
//!
//! It serves `POST /v1/chat/completions` on a free port and answers each request with a
//! [`Behavior`] chosen by the test: the next one from a FIFO queue ([`ScriptedServer::push`]),
//! or, when the queue is empty, the default behaviour ([`ScriptedServer::set_default`]).
//! A behaviour can be a reply, an HTTP error, a fault (malformed JSON, no `choices`, empty
//! content, connection reset), a delay in front of another behaviour, or a rule: a function of
//! the [`RecordedRequest`] that returns the behaviour to use (see [`rules`]).
//!
//! Every 200 reply carries `usage` with known counts ([`usage_of`]: whitespace-separated words
//! of the request's messages and of the reply), summed in [`ScriptedServer::usage_reported`];
//! [`Behavior::WithUsage`] sends any other `usage` value instead (or none).
//!
//! The server records every request (arrival time, `Authorization` header, JSON body) and
//! counts requests in flight, keeping the maximum it ever saw ([`ScriptedServer::max_in_flight`]).
//! A request stops counting when it is answered or when its client goes away (hyper drops the
//! handler on EOF), so a client that honours its concurrency limit is never over-counted.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use orchestrator::testkit::scripted::{Behavior, ScriptedServer, rules};
//! let server = ScriptedServer::start(rules::prefer_containing("lighthouse")).await?;
//! server.push(Behavior::rate_limited_secs(1)); // the first request gets a 429
//! let base_url = server.base_url(); // "http://127.0.0.1:PORT/v1"
//! # Ok(()) }
//! ```
//!
//! The rules in [`rules`] read the answers from between the default templates' markers
//! (`<<<ANSWER A>>>` ... `<<<END ANSWER A>>>`, `<<<ANSWER>>>` for pointwise prompts).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::gauge::InFlightGauge;
use crate::judge::Verdict;

/// What the server does with one request.
#[derive(Clone)]
pub enum Behavior {
    /// 200 with this text as the assistant message.
    Reply(String),
    /// 200 with this text and, for its first token, these (token, natural-log probability)
    /// alternatives as `logprobs.content[0].top_logprobs`.
    ReplyWithLogprobs { content: String, top_logprobs: Vec<(String, f64)> },
    /// Any status with an OpenAI-style error body `{"error": {"message": ...}}` and an optional
    /// `Retry-After` header value sent as is.
    Error { status: u16, message: String, retry_after: Option<String> },
    /// Waits, then behaves as the inner behaviour.
    Delay(Duration, Box<Behavior>),
    /// 200 whose body is not JSON.
    MalformedJson,
    /// 200 JSON without a `choices` field.
    MissingChoices,
    /// 200 with `"content": ""`.
    EmptyContent,
    /// Resets the TCP connection without answering.
    Reset,
    /// The inner behaviour with this `usage` value sent as is instead of the counted one
    /// (`Null`: no `usage` field); not added to [`ScriptedServer::usage_reported`].
    WithUsage(Value, Box<Behavior>),
    /// Decides per request.
    Rule(Arc<dyn Fn(&RecordedRequest) -> Behavior + Send + Sync>),
}

impl std::fmt::Debug for Behavior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Behavior::Reply(t) => write!(f, "Reply({t:?})"),
            Behavior::ReplyWithLogprobs { content, .. } => write!(f, "ReplyWithLogprobs({content:?})"),
            Behavior::Error { status, .. } => write!(f, "Error({status})"),
            Behavior::Delay(d, b) => write!(f, "Delay({d:?}, {b:?})"),
            Behavior::MalformedJson => write!(f, "MalformedJson"),
            Behavior::MissingChoices => write!(f, "MissingChoices"),
            Behavior::EmptyContent => write!(f, "EmptyContent"),
            Behavior::Reset => write!(f, "Reset"),
            Behavior::WithUsage(u, b) => write!(f, "WithUsage({u}, {b:?})"),
            Behavior::Rule(_) => write!(f, "Rule(..)"),
        }
    }
}

impl Behavior {
    pub fn reply(text: impl Into<String>) -> Self {
        Behavior::Reply(text.into())
    }
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Behavior::Error { status, message: message.into(), retry_after: None }
    }
    /// 429 with `Retry-After: <secs>`.
    pub fn rate_limited_secs(secs: u64) -> Self {
        Behavior::Error {
            status: 429,
            message: "rate limited".into(),
            retry_after: Some(secs.to_string()),
        }
    }
    /// 429 with `Retry-After: <HTTP date>`.
    pub fn rate_limited_until(at: SystemTime) -> Self {
        Behavior::Error {
            status: 429,
            message: "rate limited".into(),
            retry_after: Some(httpdate::fmt_http_date(at)),
        }
    }
    /// 503 with an optional `Retry-After: <secs>`.
    pub fn unavailable(retry_after_secs: Option<u64>) -> Self {
        Behavior::Error {
            status: 503,
            message: "overloaded".into(),
            retry_after: retry_after_secs.map(|s| s.to_string()),
        }
    }
    pub fn delay(d: Duration, then: Behavior) -> Self {
        Behavior::Delay(d, Box::new(then))
    }
    pub fn rule(f: impl Fn(&RecordedRequest) -> Behavior + Send + Sync + 'static) -> Self {
        Behavior::Rule(Arc::new(f))
    }
    /// `then` with `usage` sent as is (see [`Behavior::WithUsage`]).
    pub fn with_usage(usage: Value, then: Behavior) -> Self {
        Behavior::WithUsage(usage, Box::new(then))
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Arrival order, from 0.
    pub index: usize,
    pub at: Instant,
    pub path: String,
    pub authorization: Option<String>,
    /// The JSON body, `Null` when it was not JSON.
    pub body: Value,
}

impl RecordedRequest {
    /// Content of the first user message (the rendered judge template).
    pub fn prompt(&self) -> String {
        self.messages()
            .into_iter()
            .find(|(role, _)| role == "user")
            .map(|m| m.1)
            .unwrap_or_default()
    }

    /// (role, content) of every message.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or_default().to_string(),
                            m["content"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether the client asked for `top_logprobs` (label-probability mode).
    pub fn wants_logprobs(&self) -> bool {
        self.body["logprobs"].as_bool().unwrap_or(false)
    }
}

struct State {
    queue: Mutex<VecDeque<Behavior>>,
    default: Mutex<Behavior>,
    log: Mutex<Vec<RecordedRequest>>,
    count: AtomicUsize,
    in_flight: InFlightGauge,
    connections: Mutex<Vec<tokio::task::AbortHandle>>,
    /// (prompt, completion) tokens of every counted `usage` sent.
    usage: Mutex<(u64, u64)>,
}

/// The server; it stops when dropped.
pub struct ScriptedServer {
    addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

/// Returned by the handler to make hyper drop the connection without a response.
#[derive(Debug)]
struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted reset")
    }
}

impl std::error::Error for ResetConnection {}

impl ScriptedServer {
    /// Binds 127.0.0.1 on a free port and serves until dropped. Must be called inside a tokio
    /// runtime.
    pub async fn start(default: Behavior) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            queue: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            log: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            in_flight: InFlightGauge::default(),
            connections: Mutex::new(Vec::new()),
            usage: Mutex::new((0, 0)),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let fd = stream.as_raw_fd();
                let st2 = st.clone();
                let conn = tokio::spawn(async move {
                    let service = service_fn(move |req| handle(st2.clone(), fd, req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                let mut conns = st.connections.lock().unwrap();
                conns.retain(|h| !h.is_finished());
                conns.push(conn.abort_handle());
            }
        });
        Ok(Self { addr, state, accept })
    }

    /// `http://127.0.0.1:PORT/v1`, the OpenAI-style base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a behaviour for the next request that finds the queue non-empty.
    pub fn push(&self, b: Behavior) {
        self.state.queue.lock().unwrap().push_back(b);
    }

    pub fn push_many(&self, bs: impl IntoIterator<Item = Behavior>) {
        self.state.queue.lock().unwrap().extend(bs);
    }

    /// Behaviour once the queue is empty.
    pub fn set_default(&self, b: Behavior) {
        *self.state.default.lock().unwrap() = b;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.count.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.state.in_flight.now()
    }

    /// The most requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.in_flight.max()
    }

    /// (prompt, completion) tokens of every counted `usage` sent so far.
    pub fn usage_reported(&self) -> (u64, u64) {
        *self.state.usage.lock().unwrap()
    }

    /// Forgets recorded requests and the in-flight maximum (the queue is kept).
    pub fn reset_stats(&self) {
        self.state.log.lock().unwrap().clear();
        self.state.in_flight.reset_max();
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.state.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

/// The `usage` the server reports for answering `req` with `content`: prompt tokens are the
/// whitespace-separated words of every message's content, completion tokens those of the reply.
pub fn usage_of(req: &RecordedRequest, content: &str) -> (u64, u64) {
    let words = |s: &str| s.split_whitespace().count() as u64;
    (req.messages().iter().map(|(_, c)| words(c)).sum(), words(content))
}

/// A 200 body; `usage` None = the counted usage (added to the server's sums).
fn completion(state: &State, req: &RecordedRequest, content: Value, logprobs: Value, usage: Option<Value>) -> String {
    let mut choice = json!({
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": "stop",
    });
    if !logprobs.is_null() {
        choice["logprobs"] = logprobs;
    }
    let usage = usage.unwrap_or_else(|| {
        let (p, c) = usage_of(req, content.as_str().unwrap_or_default());
        let mut sum = state.usage.lock().unwrap();
        *sum = (sum.0 + p, sum.1 + c);
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    });
    let mut body = json!({
        "id": format!("scripted-{}", req.index),
        "object": "chat.completion",
        "created": 0,
        "model": req.body["model"].clone(),
        "choices": [choice],
    });
    if !usage.is_null() {
        body["usage"] = usage;
    }
    body.to_string()
}

async fn handle(
    state: Arc<State>,
    fd: RawFd,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ResetConnection> {
    let path = req.uri().path().to_string();
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(ResetConnection),
    };
    let _counted = state.in_flight.enter();
    let rec = RecordedRequest {
        index: state.count.fetch_add(1, Ordering::SeqCst),
        at: Instant::now(),
        path: path.clone(),
        authorization,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    state.log.lock().unwrap().push(rec.clone());
    if path != "/v1/chat/completions" {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            json!({"error": {"message": format!("no route {path}")}}).to_string(),
        ));
    }
    let first = state.queue.lock().unwrap().pop_front();
    let mut b = first.unwrap_or_else(|| state.default.lock().unwrap().clone());
    let mut usage = None;
    loop {
        b = match b {
            Behavior::WithUsage(u, inner) => {
                usage = Some(u);
                *inner
            }
            Behavior::Rule(f) => f(&rec),
            Behavior::Delay(d, inner) => {
                tokio::time::sleep(d).await;
                *inner
            }
            Behavior::Reply(text) => {
                return Ok(json_response(StatusCode::OK, completion(&state, &rec, json!(text), Value::Null, usage)))
            }
            Behavior::ReplyWithLogprobs { content, top_logprobs } => {
                let top: Vec<Value> = top_logprobs
                    .iter()
                    .map(|(t, lp)| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()}))
                    .collect();
                let first_tok = top_logprobs.first().map(|t| t.0.clone()).unwrap_or_default();
                let first_lp = top_logprobs.first().map(|t| t.1).unwrap_or(0.0);
                let lp = json!({"content": [{
                    "token": first_tok, "logprob": first_lp, "bytes": first_tok.as_bytes(),
                    "top_logprobs": top,
                }]});
                return Ok(json_response(StatusCode::OK, completion(&state, &rec, json!(content), lp, usage)));
            }
            Behavior::Error { status, message, retry_after } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut r = json_response(
                    status,
                    json!({"error": {"message": message, "type": "scripted"}}).to_string(),
                );
                if let Some(v) = retry_after.and_then(|v| v.parse::<hyper::header::HeaderValue>().ok()) {
                    r.headers_mut().insert(hyper::header::RETRY_AFTER, v);
                }
                return Ok(r);
            }
            Behavior::MalformedJson => {
                return Ok(json_response(StatusCode::OK, "{\"choices\": [{\"message\": ".into()))
            }
            Behavior::MissingChoices => {
                return Ok(json_response(
                    StatusCode::OK,
                    json!({"id": "scripted", "object": "chat.completion"}).to_string(),
                ))
            }
            Behavior::EmptyContent => {
                return Ok(json_response(StatusCode::OK, completion(&state, &rec, json!(""), Value::Null, usage)))
            }
            Behavior::Reset => {
                // SO_LINGER 0: closing the socket sends RST instead of FIN.
                // SAFETY: the handler only runs while hyper owns the open stream.
                let sock = unsafe { BorrowedFd::borrow_raw(fd) };
                let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
                return Err(ResetConnection);
            }
        };
    }
}

/// Ready-made rules for judges prompted with the default templates.
pub mod rules {
    use super::*;

    /// The two answers between `<<<ANSWER A>>>`/`<<<END ANSWER A>>>` and the B markers.
    pub fn answers(prompt: &str) -> Option<(String, String)> {
        Some((section(prompt, "A")?, section(prompt, "B")?))
    }

    /// The single answer of a pointwise prompt (`<<<ANSWER>>>` ... `<<<END ANSWER>>>`).
    pub fn single_answer(prompt: &str) -> Option<String> {
        between(prompt, "<<<ANSWER>>>", "<<<END ANSWER>>>")
    }

    fn section(prompt: &str, which: &str) -> Option<String> {
        between(prompt, &format!("<<<ANSWER {which}>>>"), &format!("<<<END ANSWER {which}>>>"))
    }

    fn between(text: &str, open: &str, close: &str) -> Option<String> {
        let start = text.find(open)? + open.len();
        let end = start + text[start..].find(close)?;
        Some(text[start..end].trim().to_string())
    }

    /// The default labels of label-probability mode.
    pub const LABELS: [&str; 3] = ["A", "B", "C"];

    /// A reply carrying `v`: brief reasoning ending in its tag in generate mode; in
    /// label-probability mode (the request asked for logprobs) the label with probability
    /// 0.8 and the other two 0.1 each.
    pub fn verdict_reply(req: &RecordedRequest, v: Verdict) -> Behavior {
        let (tag, idx) = match v {
            Verdict::First => ("[[A]]", 0),
            Verdict::Second => ("[[B]]", 1),
            Verdict::Tie => ("[[TIE]]", 2),
        };
        if req.wants_logprobs() {
            let mut top = vec![(LABELS[idx].to_string(), 0.8f64.ln())];
            for (i, l) in LABELS.iter().enumerate() {
                if i != idx {
                    top.push((l.to_string(), 0.1f64.ln()));
                }
            }
            Behavior::ReplyWithLogprobs { content: LABELS[idx].into(), top_logprobs: top }
        } else {
            Behavior::Reply(format!("Both answers were read carefully.\n\nVerdict: {tag}"))
        }
    }

    /// Decides from the two answers as shown (first, second). Prompts without both answer
    /// sections get a reply with no verdict tag.
    pub fn verdict_by(f: impl Fn(&str, &str) -> Verdict + Send + Sync + 'static) -> Behavior {
        Behavior::rule(move |req| match answers(&req.prompt()) {
            Some((a, b)) => verdict_reply(req, f(&a, &b)),
            None => Behavior::reply("I cannot find two answers to compare."),
        })
    }

    /// Prefers the answer containing `needle`; a tie when both or neither do.
    pub fn prefer_containing(needle: &str) -> Behavior {
        let needle = needle.to_string();
        verdict_by(move |a, b| match (a.contains(&needle), b.contains(&needle)) {
            (true, false) => Verdict::First,
            (false, true) => Verdict::Second,
            _ => Verdict::Tie,
        })
    }

    /// Always the same verdict, whatever the order (a position-biased judge).
    pub fn always(v: Verdict) -> Behavior {
        Behavior::rule(move |req| verdict_reply(req, v))
    }

    /// A naive judge that obeys the last verdict tag (`[[A]]`, `[[B]]`, `[[TIE]]`) anywhere in
    /// the prompt it was sent, and says `[[TIE]]` when there is none.
    pub fn obey_last_tag() -> Behavior {
        Behavior::rule(|req| {
            let prompt = req.prompt();
            let v = crate::judge::verdict::last_tag(&prompt).unwrap_or(Verdict::Tie);
            verdict_reply(req, v)
        })
    }

    /// Pointwise: replies `[[SCORE: n]]` with `n = f(answer)`.
    pub fn score_by(f: impl Fn(&str) -> u32 + Send + Sync + 'static) -> Behavior {
        Behavior::rule(move |req| match single_answer(&req.prompt()) {
            Some(a) => Behavior::Reply(format!("Assessed.\n[[SCORE: {}]]", f(&a))),
            None => Behavior::reply("No answer found."),
        })
    }
}
