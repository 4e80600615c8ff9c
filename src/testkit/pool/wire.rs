//! The two dialects on the wire: request parsing (strict, by explicit field names, never a
//! panic) and reply shapes, as vLLM's OpenAI-compatible server (`/v1/completions` with prompt
//! ids, runtime LoRA endpoints) and SGLang's native server (`/generate` with `input_ids`) send
//! them.

use hyper::StatusCode;
use serde_json::{json, Map, Value};

use super::http::{json_reply, reply, ApiError};
use super::{Dialect, GenDefaults, Limits, PushError, Shared};
use crate::engine::{FinishReason, Rollout, SamplingConfig};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Response;

type Reply = Result<Response<Full<Bytes>>, ApiError>;

/// A parsed generation request of either dialect.
#[derive(Debug, Clone)]
pub(super) struct GenCall {
    /// vLLM's `model` / SGLang's `lora_path`; None (SGLang null) is the base model.
    pub lora: Option<String>,
    pub prompt: Vec<u32>,
    pub sampling: SamplingConfig,
    pub seed: u64,
    /// As sent, or the model's `generation_config.json` default when left out (1 = off).
    pub repetition_penalty: f32,
    pub skip_special: bool,
    /// Keep a matched stop string (and an end-of-sequence token's text) in `text`.
    pub keep_stop: bool,
    /// vLLM: `return_token_ids`.
    pub token_ids: bool,
    /// vLLM: `return_tokens_as_token_ids`.
    pub tokens_as_ids: bool,
    /// vLLM `logprobs: 0` / SGLang `return_logprob: true`.
    pub logprobs: bool,
}

/// A JSON object read field by field; unknown fields are an error.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    at: &'static str,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, at: &'static str, known: &[&str]) -> Result<Self, ApiError> {
        let map = v.as_object().ok_or_else(|| ApiError::bad(format!("{at}: a JSON object expected")))?;
        if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::bad(format!("unknown field `{at}{k}` (the test server is strict; known: {})", known.join(", "))));
        }
        Ok(Self { map, at })
    }

    fn field(&self, k: &str) -> Result<&'a Value, ApiError> {
        self.map.get(k).ok_or_else(|| ApiError::bad(format!("missing field `{}{k}`", self.at)))
    }

    fn err(&self, k: &str, want: &str, got: &Value) -> ApiError {
        ApiError::bad(format!("field `{}{k}`: {want} expected, got {got}", self.at))
    }

    fn u64(&self, k: &str) -> Result<u64, ApiError> {
        let v = self.field(k)?;
        v.as_u64().ok_or_else(|| self.err(k, "a non-negative integer", v))
    }

    /// A seed: both servers take a signed 64-bit integer (vLLM's pydantic check, in its words).
    fn seed(&self, k: &str) -> Result<u64, ApiError> {
        let v = self.field(k)?;
        match v.as_u64() {
            Some(x) if x <= i64::MAX as u64 => Ok(x),
            Some(_) => Err(ApiError::bad(format!(
                "1 validation error:\n  {{'type': 'less_than_equal', 'loc': ('body', '{}{k}'), 'msg': 'Input should be less than or equal to 9223372036854775807', 'input': {v}}}",
                self.at
            ))),
            None => Err(self.err(k, "a non-negative integer", v)),
        }
    }

    /// An optional number: `default` when left out or null (the server's own default).
    fn f64_or(&self, k: &str, default: f64) -> Result<f64, ApiError> {
        match self.map.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.f64(k),
        }
    }

    /// Penalty fields: left out, they take the model's `generation_config.json` values, as
    /// vLLM's and SGLang's servers do. The stand-in applies a repetition penalty; presence and
    /// frequency penalties and a minimum length it supports at their neutral values only.
    fn penalties(&self, min_key: &str, d: &GenDefaults) -> Result<f32, ApiError> {
        let rep = self.f64_or("repetition_penalty", d.repetition_penalty)?;
        if !(rep > 0.0 && rep <= 10.0) {
            return Err(ApiError::bad(format!("field `{}repetition_penalty` must be in (0, 10], got {rep}", self.at)));
        }
        for (k, default) in [("presence_penalty", d.presence_penalty), ("frequency_penalty", d.frequency_penalty), (min_key, 0.0)] {
            let x = self.f64_or(k, default)?;
            if x != 0.0 {
                return Err(ApiError::bad(format!("field `{}{k}` = {x}: the test server supports 0 only", self.at)));
            }
        }
        Ok(rep as f32)
    }

    fn i64(&self, k: &str) -> Result<i64, ApiError> {
        let v = self.field(k)?;
        v.as_i64().ok_or_else(|| self.err(k, "an integer", v))
    }

    fn f64(&self, k: &str) -> Result<f64, ApiError> {
        let v = self.field(k)?;
        v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| self.err(k, "a number", v))
    }

    fn bool(&self, k: &str) -> Result<bool, ApiError> {
        let v = self.field(k)?;
        v.as_bool().ok_or_else(|| self.err(k, "true or false", v))
    }

    fn str(&self, k: &str) -> Result<&'a str, ApiError> {
        let v = self.field(k)?;
        v.as_str().filter(|s| !s.is_empty()).ok_or_else(|| self.err(k, "a non-empty string", v))
    }

    fn ids(&self, k: &str) -> Result<Vec<u32>, ApiError> {
        let v = self.field(k)?;
        let arr = v.as_array().ok_or_else(|| self.err(k, "a list of token ids (the test server takes ids only)", v))?;
        if arr.is_empty() {
            return Err(ApiError::bad(format!("field `{}{k}`: the prompt is empty", self.at)));
        }
        arr.iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| self.err(k, "token ids (integers >= 0)", x)))
            .collect()
    }

    /// A string, a list of non-empty strings, or null.
    fn stops(&self, k: &str) -> Result<Vec<String>, ApiError> {
        let v = self.field(k)?;
        let list = match v {
            Value::Null => Vec::new(),
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().map(|x| x.as_str().map(String::from).ok_or_else(|| self.err(k, "a list of strings", v))).collect::<Result<_, _>>()?,
            _ => return Err(self.err(k, "a string or a list of strings", v)),
        };
        if list.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad(format!("field `{}{k}`: stop strings must not be empty", self.at)));
        }
        Ok(list)
    }

    /// Sampling fields shared by both dialects.
    fn sampling(&self, max_key: &str) -> Result<SamplingConfig, ApiError> {
        let max_new_tokens = self.u64(max_key)? as usize;
        if max_new_tokens == 0 {
            return Err(ApiError::bad(format!("field `{}{max_key}` must be >= 1", self.at)));
        }
        let temperature = self.f64("temperature")?;
        if temperature < 0.0 {
            return Err(ApiError::bad(format!("field `{}temperature` must be >= 0, got {temperature}", self.at)));
        }
        // Below 1e-5 is greedy, as on vLLM (1 / T would overflow to inf and the ln-probs to NaN).
        let temperature = if temperature < 1e-5 { 0.0 } else { temperature };
        let top_p = self.f64("top_p")?;
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(format!("field `{}top_p` must be in (0, 1], got {top_p}", self.at)));
        }
        let top_k = match self.i64("top_k")? {
            -1 | 0 => 0,
            k if k > 0 => k as usize,
            k => return Err(ApiError::bad(format!("field `{}top_k` must be -1 (off) or >= 1, got {k}", self.at))),
        };
        if self.f64("min_p")? != 0.0 {
            return Err(ApiError::bad(format!("field `{}min_p`: the test server supports 0 only", self.at)));
        }
        if self.bool("ignore_eos")? {
            return Err(ApiError::bad(format!("field `{}ignore_eos`: the test server supports false only", self.at)));
        }
        Ok(SamplingConfig { temperature, top_p, top_k, max_new_tokens, stop: self.stops("stop")? })
    }
}

fn no_stream(o: &Obj) -> Result<(), ApiError> {
    if o.bool("stream")? {
        return Err(ApiError::bad("field `stream`: the test server supports false only"));
    }
    Ok(())
}

const VLLM_FIELDS: &[&str] = &[
    "model", "prompt", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens",
    "return_tokens_as_token_ids", "return_token_ids", "stop", "include_stop_str_in_output", "skip_special_tokens",
    "ignore_eos", "stream",
];

pub(super) fn parse_vllm(body: &Value, defaults: &GenDefaults) -> Result<GenCall, ApiError> {
    let o = Obj::new(body, "", VLLM_FIELDS)?;
    let n = o.u64("n")?;
    if n != 1 {
        return Err(ApiError::bad(format!("field `n`: the test server supports 1 only, got {n}")));
    }
    no_stream(&o)?;
    let logprobs = match o.field("logprobs")? {
        Value::Null => false,
        v if v.as_u64() == Some(0) => true,
        v => return Err(o.err("logprobs", "0 or null (the test server returns the sampled token's only)", v)),
    };
    Ok(GenCall {
        lora: Some(o.str("model")?.to_string()),
        prompt: o.ids("prompt")?,
        sampling: o.sampling("max_tokens")?,
        seed: o.seed("seed")?,
        repetition_penalty: o.penalties("min_tokens", defaults)?,
        skip_special: o.bool("skip_special_tokens")?,
        keep_stop: o.bool("include_stop_str_in_output")?,
        token_ids: o.bool("return_token_ids")?,
        tokens_as_ids: o.bool("return_tokens_as_token_ids")?,
        logprobs,
    })
}

const SGLANG_FIELDS: &[&str] = &["input_ids", "sampling_params", "return_logprob", "logprob_start_len", "lora_path", "stream"];
const SGLANG_SAMPLING: &[&str] = &[
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "skip_special_tokens", "no_stop_trim",
    "ignore_eos", "sampling_seed", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_new_tokens",
];

pub(super) fn parse_sglang(body: &Value, defaults: &GenDefaults) -> Result<GenCall, ApiError> {
    let o = Obj::new(body, "", SGLANG_FIELDS)?;
    no_stream(&o)?;
    o.i64("logprob_start_len")?;
    let lora = match o.field("lora_path")? {
        Value::Null => None,
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        v => return Err(o.err("lora_path", "null or an adapter name", v)),
    };
    let sp = Obj::new(o.field("sampling_params")?, "sampling_params.", SGLANG_SAMPLING)?;
    Ok(GenCall {
        lora,
        prompt: o.ids("input_ids")?,
        sampling: sp.sampling("max_new_tokens")?,
        seed: sp.seed("sampling_seed")?,
        repetition_penalty: sp.penalties("min_new_tokens", defaults)?,
        skip_special: sp.bool("skip_special_tokens")?,
        keep_stop: sp.bool("no_stop_trim")?,
        token_ids: true,
        tokens_as_ids: true,
        logprobs: o.bool("return_logprob")?,
    })
}

/// Ids inside the vocabulary and prompt plus completion inside the context, as the real
/// servers check before scheduling.
pub(super) fn check_limits(call: &GenCall, l: Limits) -> Result<(), ApiError> {
    if let Some(bad) = call.prompt.iter().find(|&&t| t as usize >= l.vocab_size) {
        return Err(ApiError::bad(format!("Token id {bad} is out of vocabulary (size {})", l.vocab_size)));
    }
    let (p, c) = (call.prompt.len(), call.sampling.max_new_tokens);
    if p.saturating_add(c) > l.max_len {
        return Err(ApiError::bad(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({p} in the messages, {c} in the completion). Please reduce the length of the messages or completion.",
            l.max_len,
            p.saturating_add(c)
        )));
    }
    Ok(())
}

/// How a sequence ended, as both servers report it.
enum Ended {
    StopString(String),
    Eos(u32),
    Length,
    Abort,
}

fn decode(sh: &Shared, ids: &[u32], skip_special: bool) -> String {
    sh.tokenizer.decode(ids, skip_special).unwrap_or_default()
}

/// The reply text and how the sequence ended. The text is the decode of the ids; a stop string
/// (matched, like the engine does, in the text without special tokens; it ends in the last
/// token) is kept or cut with what follows it, an end-of-sequence token's text kept or dropped,
/// as `keep_stop` says.
fn text_and_end(sh: &Shared, call: &GenCall, r: &Rollout) -> (String, Ended) {
    let full = decode(sh, &r.ids, call.skip_special);
    let last = r.ids.last().copied().unwrap_or_default();
    match r.finish_reason {
        FinishReason::Length => (full, Ended::Length),
        FinishReason::Canceled => (full, Ended::Abort),
        FinishReason::Stop if sh.eos.contains(&last) => {
            let text = if call.keep_stop { full } else { decode(sh, &r.ids[..r.ids.len().saturating_sub(1)], call.skip_special) };
            (text, Ended::Eos(last))
        }
        FinishReason::Stop => {
            let plain = decode(sh, &r.ids, true);
            let Some((_, stop)) = call.sampling.stop.iter().filter_map(|s| plain.find(s.as_str()).map(|at| (at, s))).min_by_key(|x| x.0) else {
                return (full, Ended::Eos(last));
            };
            // The occurrence that ends inside the last token's text.
            let before = decode(sh, &r.ids[..r.ids.len().saturating_sub(1)], call.skip_special);
            let floor = if full.starts_with(&before) { before.len() } else { 0 };
            let at = full.match_indices(stop.as_str()).map(|m| m.0).find(|&at| at + stop.len() > floor).or_else(|| full.find(stop.as_str()));
            let text = match at {
                Some(at) if call.keep_stop => full[..at + stop.len()].to_string(),
                Some(at) => full[..at].to_string(),
                None => full,
            };
            (text, Ended::StopString(stop.clone()))
        }
    }
}

/// The reply to a generation request, in the server's dialect.
pub(super) fn completion(sh: &Shared, call: &GenCall, r: &Rollout, model: &str, id: usize) -> Value {
    let (text, ended) = text_and_end(sh, call, r);
    let (p, c) = (call.prompt.len(), r.ids.len());
    match sh.dialect {
        Dialect::Vllm => {
            let (finish, stop_reason) = match &ended {
                Ended::StopString(s) => ("stop", json!(s)),
                Ended::Eos(_) => ("stop", Value::Null),
                Ended::Length => ("length", Value::Null),
                Ended::Abort => ("abort", Value::Null),
            };
            let logprobs = if call.logprobs {
                let tokens: Vec<String> = r
                    .ids
                    .iter()
                    .map(|&t| if call.tokens_as_ids { format!("token_id:{t}") } else { sh.tokenizer.id_to_token(t).unwrap_or_default() })
                    .collect();
                // Each token's start in characters, from each token's own decode: linear in the
                // length (the client does not read it; exact unless a character spans tokens).
                let offsets: Vec<usize> = r
                    .ids
                    .iter()
                    .scan(0usize, |at, &t| {
                        let start = *at;
                        *at += decode(sh, &[t], call.skip_special).chars().count();
                        Some(start)
                    })
                    .collect();
                json!({"tokens": tokens, "token_logprobs": r.logprobs, "top_logprobs": null, "text_offset": offsets})
            } else {
                Value::Null
            };
            let mut choice = json!({
                "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason,
            });
            if call.token_ids {
                choice["token_ids"] = json!(r.ids);
                choice["prompt_token_ids"] = json!(call.prompt);
            }
            json!({
                "id": format!("cmpl-{id}"), "object": "text_completion", "created": 0, "model": model,
                "choices": [choice],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            })
        }
        Dialect::Sglang => {
            let finish = match &ended {
                Ended::StopString(s) => json!({"type": "stop", "matched": s}),
                Ended::Eos(t) => json!({"type": "stop", "matched": t}),
                Ended::Length => json!({"type": "length", "length": call.sampling.max_new_tokens}),
                Ended::Abort => json!({"type": "abort", "message": "the engine ended the sequence"}),
            };
            let mut meta = json!({
                "id": format!("{id:032x}"), "finish_reason": finish, "prompt_tokens": p, "completion_tokens": c,
                "cached_tokens": 0, "weight_version": sh.weight_version.lock().unwrap().clone(),
            });
            if call.logprobs {
                let lps: Vec<Value> = r.ids.iter().zip(&r.logprobs).map(|(t, lp)| json!([lp, t, null])).collect();
                meta["output_token_logprobs"] = json!(lps);
            }
            json!({"text": text, "output_ids": r.ids, "meta_info": meta})
        }
    }
}

/// An error body as each server writes it.
pub(super) fn error(dialect: Dialect, e: &ApiError) -> Response<Full<Bytes>> {
    let code = e.status.as_u16();
    let v = match dialect {
        Dialect::Vllm => {
            let kind = match code {
                400 => "BadRequestError",
                404 => "NotFoundError",
                _ => "InternalServerError",
            };
            json!({"error": {"message": e.message, "type": kind, "param": null, "code": code}})
        }
        Dialect::Sglang => json!({"error": {"message": e.message, "code": code}}),
    };
    json_reply(e.status, &v)
}

fn push_fields(body: &Value, extra: &[&str]) -> Result<(String, String), ApiError> {
    let mut known = vec!["lora_name", "lora_path"];
    known.extend_from_slice(extra);
    let o = Obj::new(body, "", &known)?;
    Ok((o.str("lora_name")?.to_string(), o.str("lora_path")?.to_string()))
}

fn unload_field(body: &Value, extra: &[&str]) -> Result<String, ApiError> {
    let mut known = vec!["lora_name"];
    known.extend_from_slice(extra);
    Ok(Obj::new(body, "", &known)?.str("lora_name")?.to_string())
}

pub(super) fn vllm_models(sh: &Shared) -> Response<Full<Bytes>> {
    let base = sh.base.lock().unwrap().source.display().to_string();
    let mut data = vec![json!({"id": sh.served_name, "object": "model", "created": 0, "owned_by": "vllm", "root": base, "parent": null})];
    for (name, s) in sh.adapters.lock().unwrap().iter() {
        data.push(json!({"id": name, "object": "model", "created": 0, "owned_by": "vllm", "root": s.source.display().to_string(), "parent": sh.served_name}));
    }
    json_reply(StatusCode::OK, &json!({"object": "list", "data": data}))
}

pub(super) async fn vllm_load(sh: &Shared, body: &Value) -> Reply {
    let (name, path) = push_fields(body, &["load_inplace"])?;
    let inplace = match body.get("load_inplace") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::bad(format!("field `load_inplace`: true or false expected, got {v}")))?,
    };
    match sh.load_adapter(&name, &path, inplace).await {
        Ok(()) => Ok(reply(StatusCode::OK, "text/plain", format!("Success: LoRA adapter '{name}' added successfully."))),
        Err(PushError::Duplicate) => Err(ApiError::bad(format!(
            "The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to true."
        ))),
        Err(PushError::Injected) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "injected push failure")),
        Err(PushError::Failed(m)) => Err(ApiError::bad(format!("loading the lora adapter '{name}' from {path} failed: {m}"))),
    }
}

pub(super) fn vllm_unload(sh: &Shared, body: &Value) -> Reply {
    let name = unload_field(body, &["lora_int_id"])?;
    if sh.unload_adapter(&name) {
        Ok(reply(StatusCode::OK, "text/plain", format!("Success: LoRA adapter '{name}' removed successfully.")))
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, format!("The lora adapter '{name}' cannot be found.")))
    }
}

fn loaded_map(sh: &Shared) -> Value {
    let m: Map<String, Value> = sh.adapters.lock().unwrap().iter().map(|(n, s)| (n.clone(), json!(s.source.display().to_string()))).collect();
    Value::Object(m)
}

pub(super) async fn sglang_load(sh: &Shared, body: &Value) -> Reply {
    let (name, path) = push_fields(body, &["pinned"])?;
    let error = match sh.load_adapter(&name, &path, false).await {
        Ok(()) => Value::Null,
        Err(PushError::Duplicate) => json!(format!("LoRA adapter with name {name} already exists (already loaded).")),
        Err(PushError::Injected) => json!("injected push failure"),
        Err(PushError::Failed(m)) => json!(format!("loading LoRA adapter {name} from {path} failed: {m}")),
    };
    let v = json!({"success": error.is_null(), "error_message": error, "loaded_adapters": loaded_map(sh)});
    Ok(json_reply(StatusCode::OK, &v))
}

pub(super) fn sglang_unload(sh: &Shared, body: &Value) -> Reply {
    let name = unload_field(body, &[])?;
    let ok = sh.unload_adapter(&name);
    let error = if ok { Value::Null } else { json!(format!("LoRA adapter {name} is not loaded.")) };
    Ok(json_reply(StatusCode::OK, &json!({"success": ok, "error_message": error, "loaded_adapters": loaded_map(sh)})))
}

pub(super) async fn sglang_update_weights(sh: &Shared, body: &Value) -> Reply {
    let o = Obj::new(body, "", &["model_path", "load_format", "abort_all_requests", "weight_version"])?;
    let path = o.str("model_path")?.to_string();
    let version = match o.map.get("weight_version") {
        None | Some(Value::Null) => None,
        Some(_) => Some(o.str("weight_version")?.to_string()),
    };
    match sh.update_base(&path).await {
        Ok(()) => {
            // As SGLang: the version is replaced only when the request names one.
            if let Some(v) = version {
                *sh.weight_version.lock().unwrap() = v;
            }
            Ok(json_reply(StatusCode::OK, &json!({"success": true, "message": "Succeeded to update model weights.", "num_paused_requests": 0})))
        }
        Err(e) => Ok(json_reply(StatusCode::BAD_REQUEST, &json!({"success": false, "message": format!("Failed to update weights: {e:#}")}))),
    }
}

pub(super) fn sglang_model_info(sh: &Shared) -> Response<Full<Bytes>> {
    let path = sh.base.lock().unwrap().source.display().to_string();
    let version = sh.weight_version.lock().unwrap().clone();
    json_reply(StatusCode::OK, &json!({"model_path": path, "tokenizer_path": path, "is_generation": true, "weight_version": version}))
}
