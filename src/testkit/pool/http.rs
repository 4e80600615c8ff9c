//! The stand-ins' HTTP layer: authentication, routing of each dialect's endpoints, the
//! generation handler and the reply helpers `wire` renders bodies with.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;

use super::{wire, Dialect, RecordedRequest, Shared};

/// An error reply: status and message; each dialect renders its own body.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn bad(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

pub(super) fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

pub(super) fn json_reply(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

pub(super) async fn handle(sh: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let authorized = match &sh.api_key {
        None => true,
        Some(key) => req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {key}")),
    };
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(wire::error(sh.dialect, &ApiError::bad(format!("reading the body: {e}")))),
    };
    if path == "/health" {
        return Ok(reply(StatusCode::OK, "text/plain", ""));
    }
    if !authorized {
        return Ok(json_reply(StatusCode::UNAUTHORIZED, &serde_json::json!({"error": "Unauthorized"})));
    }
    let body: Option<Value> = if bytes.is_empty() { None } else { serde_json::from_slice(&bytes).ok() };
    sh.requests.lock().unwrap().push(RecordedRequest { path: path.clone(), body: body.clone().unwrap_or(Value::Null) });
    let needs_body = method == Method::POST;
    let body = match (needs_body, body) {
        (true, Some(b)) if b.is_object() => b,
        (true, _) => return Ok(wire::error(sh.dialect, &ApiError::bad("the body must be a JSON object"))),
        (false, _) => Value::Null,
    };
    let routed = match (sh.dialect, &method, path.as_str()) {
        (Dialect::Vllm, &Method::GET, "/v1/models") => Ok(wire::vllm_models(&sh)),
        (Dialect::Vllm, &Method::POST, "/v1/completions") => generate(&sh, &body).await,
        (Dialect::Vllm, &Method::POST, "/v1/load_lora_adapter") => wire::vllm_load(&sh, &body).await,
        (Dialect::Vllm, &Method::POST, "/v1/unload_lora_adapter") => wire::vllm_unload(&sh, &body),
        (Dialect::Sglang, &Method::GET, "/get_model_info") => Ok(wire::sglang_model_info(&sh)),
        (Dialect::Sglang, &Method::POST, "/generate") => generate(&sh, &body).await,
        (Dialect::Sglang, &Method::POST, "/load_lora_adapter") => wire::sglang_load(&sh, &body).await,
        (Dialect::Sglang, &Method::POST, "/unload_lora_adapter") => wire::sglang_unload(&sh, &body),
        (Dialect::Sglang, &Method::POST, "/update_weights_from_disk") => wire::sglang_update_weights(&sh, &body).await,
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no route {method} {path}"))),
    };
    Ok(routed.unwrap_or_else(|e| wire::error(sh.dialect, &e)))
}

/// A generation request of either dialect: die or wait as told, parse, check, generate, reply.
async fn generate(sh: &Arc<Shared>, body: &Value) -> Result<Response<Full<Bytes>>, ApiError> {
    if sh.arrive() {
        // Dying takes this connection with it: kill from another task and never answer.
        let s = sh.clone();
        tokio::spawn(async move { s.kill().await });
        std::future::pending::<()>().await;
    }
    let _counted = sh.in_flight.enter();
    let delay = *sh.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let call = match sh.dialect {
        Dialect::Vllm => wire::parse_vllm(body, &sh.gen_defaults)?,
        Dialect::Sglang => wire::parse_sglang(body, &sh.gen_defaults)?,
    };
    wire::check_limits(&call, sh.limits)?;
    let served = sh.served(call.lora.as_deref()).ok_or_else(|| {
        let name = call.lora.clone().unwrap_or_default();
        match sh.dialect {
            Dialect::Vllm => ApiError::new(StatusCode::NOT_FOUND, format!("The model `{name}` does not exist.")),
            Dialect::Sglang => ApiError::bad(format!("LoRA adapter {name:?} is not loaded. Loaded adapters: {:?}", sh.adapters.lock().unwrap().keys().collect::<Vec<_>>())),
        }
    })?;
    let rollout = served
        .engine
        .generate_ids_penalized(&call.prompt, &call.sampling, call.seed, call.repetition_penalty)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("generation failed: {e:#}")))?;
    let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
    let model = call.lora.clone().unwrap_or_else(|| sh.served_name.clone());
    let out = wire::completion(sh, &call, &rollout, &model, id);
    sh.note_served(&model);
    Ok(json_reply(StatusCode::OK, &out))
}
