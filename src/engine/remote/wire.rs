//! Request bodies and reply checks of the two dialects (vLLM `/v1/completions`, SGLang
//! `/generate`). Every field a server would otherwise fill from its own defaults is sent: both
//! read sampling defaults (repetition penalty among them) from the model's
//! `generation_config.json` and from server flags, and a field we leave out would sample from
//! another distribution than the learner's. A reply is accepted only whole: one log-prob <= 0,
//! finite as an f32, per sampled id, at least one id, ids inside the vocabulary, a known finish
//! reason; anything else is an error for that request (the group is sent elsewhere), never a
//! panic, never a rollout.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::config::RemoteKind;
use crate::engine::{FinishReason, SamplingConfig};

/// A log-prob a little above 0 is float rounding of ln 1 on the server; more is a broken reply.
const LOGPROB_SLACK: f64 = 1e-4;

/// One sampled answer as a server returned it, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// SGLang's `meta_info.weight_version`: the weights that generated it.
    pub weight_version: Option<String>,
}

/// The generation endpoint of a dialect.
pub fn generate_path(kind: RemoteKind) -> &'static str {
    match kind {
        RemoteKind::Vllm => "/v1/completions",
        RemoteKind::Sglang => "/generate",
    }
}

/// Largest seed vLLM and SGLang accept (a signed 64-bit integer; vLLM answers a larger one with
/// HTTP 400).
pub const MAX_SEED: u64 = i64::MAX as u64;

/// The body of one sample's generation request. `version` is the LoRA name to generate with
/// (None: the base model `model`). `seed` must be at most [`MAX_SEED`] (what
/// [`crate::engine::SeedKey::sample_seed`] gives); the top bit is cleared regardless.
pub fn generate_body(kind: RemoteKind, model: &str, version: Option<&str>, prompt: &[u32], s: &SamplingConfig, seed: u64) -> Value {
    let top_k: i64 = if s.top_k == 0 { -1 } else { s.top_k as i64 };
    let seed = seed & MAX_SEED;
    match kind {
        RemoteKind::Vllm => json!({
            "model": version.unwrap_or(model),
            "prompt": prompt,
            "n": 1,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": top_k,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "min_tokens": 0,
            "seed": seed,
            "logprobs": 0,
            "return_tokens_as_token_ids": true,
            "return_token_ids": true,
            "stop": s.stop,
            "include_stop_str_in_output": true,
            "skip_special_tokens": false,
            "ignore_eos": false,
            "stream": false,
        }),
        RemoteKind::Sglang => json!({
            "input_ids": prompt,
            "sampling_params": {
                "max_new_tokens": s.max_new_tokens,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "top_k": top_k,
                "min_p": 0.0,
                "repetition_penalty": 1.0,
                "presence_penalty": 0.0,
                "frequency_penalty": 0.0,
                "min_new_tokens": 0,
                "stop": s.stop,
                "skip_special_tokens": false,
                "no_stop_trim": true,
                "ignore_eos": false,
                "sampling_seed": seed,
            },
            "return_logprob": true,
            "logprob_start_len": -1,
            "lora_path": version,
            "stream": false,
        }),
    }
}

fn finish(s: &str) -> Result<FinishReason> {
    Ok(match s {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "abort" => FinishReason::Canceled,
        other => bail!("unknown finish reason {other:?}"),
    })
}

fn id_of(v: &Value, what: &str) -> Result<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok()).with_context(|| format!("{what} is not a token id: {v}"))
}

fn logprob_of(v: &Value, at: usize) -> Result<f32> {
    let lp = v.as_f64().with_context(|| format!("log-prob {at} is not a number: {v}"))?;
    // Finite as an f32 too: -1e39 is a number in JSON and -inf once stored.
    ensure!(lp.is_finite() && (lp as f32).is_finite() && lp <= LOGPROB_SLACK, "log-prob {at} is {lp} (must be finite and <= 0)");
    Ok(lp.min(0.0) as f32)
}

/// Checks a parsed reply against the request: lengths, vocabulary, max tokens.
fn check(ids: Vec<u32>, logprobs: Vec<f32>, finish_reason: FinishReason, vocab: usize, max_new: usize) -> Result<Sampled> {
    ensure!(ids.len() == logprobs.len(), "{} ids but {} log-probs", ids.len(), logprobs.len());
    // A finished answer holds at least the token that ended it (the EOS id is returned with its
    // log-prob): an empty one would be judged and then refused by the learner.
    ensure!(!ids.is_empty(), "no token ids with finish reason {finish_reason:?}");
    ensure!(ids.len() <= max_new, "{} ids for max_tokens = {max_new}", ids.len());
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary ({vocab} tokens)");
    }
    Ok(Sampled { ids, logprobs, finish_reason, weight_version: None })
}

/// Parses and checks a `/v1/completions` reply (n = 1, `return_token_ids`, `logprobs: 0`).
pub fn parse_vllm(body: &Value, vocab: usize, max_new: usize) -> Result<Sampled> {
    let choices = body.get("choices").and_then(|c| c.as_array()).context("reply has no choices array")?;
    ensure!(choices.len() == 1, "reply has {} choices, 1 asked for", choices.len());
    let c = &choices[0];
    let ids = c
        .get("token_ids")
        .and_then(|t| t.as_array())
        .context("choice has no token_ids (vLLM >= 0.10.2 with return_token_ids is needed)")?
        .iter()
        .map(|v| id_of(v, "token_ids entry"))
        .collect::<Result<Vec<u32>>>()?;
    let lp = c.get("logprobs").filter(|l| !l.is_null()).context("choice has no logprobs")?;
    let logprobs = lp
        .get("token_logprobs")
        .and_then(|t| t.as_array())
        .context("logprobs has no token_logprobs")?
        .iter()
        .enumerate()
        .map(|(i, v)| logprob_of(v, i))
        .collect::<Result<Vec<f32>>>()?;
    // With return_tokens_as_token_ids the tokens say which id each log-prob belongs to.
    if let Some(tokens) = lp.get("tokens").and_then(|t| t.as_array()) {
        ensure!(tokens.len() == ids.len(), "{} logprobs tokens for {} token_ids", tokens.len(), ids.len());
        for (i, (t, &id)) in tokens.iter().zip(&ids).enumerate() {
            let named = t.as_str().and_then(|s| s.strip_prefix("token_id:")).and_then(|s| s.parse::<u32>().ok());
            ensure!(named == Some(id), "logprobs token {i} is {t}, token_ids says {id}");
        }
    }
    let reason = c.get("finish_reason").and_then(|f| f.as_str()).context("choice has no finish_reason")?;
    check(ids, logprobs, finish(reason)?, vocab, max_new)
}

/// Parses and checks a `/generate` reply (`return_logprob`, `output_token_logprobs` as
/// `[logprob, id, text]`).
pub fn parse_sglang(body: &Value, vocab: usize, max_new: usize) -> Result<Sampled> {
    let ids = body
        .get("output_ids")
        .and_then(|t| t.as_array())
        .context("reply has no output_ids")?
        .iter()
        .map(|v| id_of(v, "output_ids entry"))
        .collect::<Result<Vec<u32>>>()?;
    let meta = body.get("meta_info").context("reply has no meta_info")?;
    let entries = meta.get("output_token_logprobs").and_then(|t| t.as_array()).context("meta_info has no output_token_logprobs")?;
    ensure!(entries.len() == ids.len(), "{} output_token_logprobs for {} output_ids", entries.len(), ids.len());
    let mut logprobs = Vec::with_capacity(ids.len());
    for (i, (e, &id)) in entries.iter().zip(&ids).enumerate() {
        let e = e.as_array().filter(|e| e.len() >= 2).with_context(|| format!("output_token_logprobs[{i}] is not [logprob, id, text]: {e}"))?;
        let named = id_of(&e[1], "output_token_logprobs id")?;
        ensure!(named == id, "output_token_logprobs[{i}] is for id {named}, output_ids says {id}");
        logprobs.push(logprob_of(&e[0], i)?);
    }
    let reason = meta
        .get("finish_reason")
        .and_then(|f| f.get("type"))
        .and_then(|t| t.as_str())
        .context("meta_info has no finish_reason.type")?;
    let mut sampled = check(ids, logprobs, finish(reason)?, vocab, max_new)?;
    sampled.weight_version = meta.get("weight_version").and_then(|v| v.as_str()).map(str::to_string);
    Ok(sampled)
}

pub fn parse(kind: RemoteKind, body: &Value, vocab: usize, max_new: usize) -> Result<Sampled> {
    match kind {
        RemoteKind::Vllm => parse_vllm(body, vocab, max_new),
        RemoteKind::Sglang => parse_sglang(body, vocab, max_new),
    }
}

/// Endpoints and bodies of weight pushes.
pub fn load_lora(kind: RemoteKind, name: &str, path: &str) -> (&'static str, Value) {
    let p = match kind {
        RemoteKind::Vllm => "/v1/load_lora_adapter",
        RemoteKind::Sglang => "/load_lora_adapter",
    };
    (p, json!({"lora_name": name, "lora_path": path}))
}

pub fn unload_lora(kind: RemoteKind, name: &str) -> (&'static str, Value) {
    let p = match kind {
        RemoteKind::Vllm => "/v1/unload_lora_adapter",
        RemoteKind::Sglang => "/unload_lora_adapter",
    };
    (p, json!({"lora_name": name}))
}

/// SGLang's full-weight reload; `version` becomes the `meta_info.weight_version` of every reply
/// generated with these weights, so a server that restarted with its start-up weights is seen.
pub fn update_from_disk(path: &str, version: &str) -> (&'static str, Value) {
    ("/update_weights_from_disk", json!({"model_path": path, "weight_version": version}))
}

/// Whether a generation request's error reply is about that request (the same request would
/// fail on any server: a seed out of range, a prompt longer than the context, a bad field),
/// rather than about the server. `model` is the name the request asked for: a 404 saying it
/// does not exist means the server lost a pushed adapter (a restart) and needs it again.
pub fn refused_request(status: u16, body: &str, model: &str) -> bool {
    match status {
        400 | 413 | 422 => !mentions_missing(body, model),
        404 => !mentions_missing(body, model),
        _ => false,
    }
}

fn mentions_missing(body: &str, model: &str) -> bool {
    let b = body.to_ascii_lowercase();
    b.contains(&model.to_ascii_lowercase()) && (b.contains("does not exist") || b.contains("not found") || b.contains("not loaded"))
}

/// How a weight-push endpoint answered.
#[derive(Debug, PartialEq, Eq)]
pub enum PushReply {
    Ok,
    /// The name is loaded already (from an earlier process, or before the server was ejected).
    AlreadyLoaded,
    Failed(String),
}

/// Reads a push reply: vLLM answers with the HTTP status (400 "... has already been loaded"),
/// SGLang with 200 and `{"success": bool, "error_message"|"message": ..}`.
pub fn push_reply(kind: RemoteKind, status: u16, body: &str) -> PushReply {
    let short: String = body.chars().take(300).collect();
    let already = |s: &str| s.contains("already been loaded") || s.contains("already loaded") || s.contains("already exists");
    match kind {
        RemoteKind::Vllm => {
            if (200..300).contains(&status) {
                PushReply::Ok
            } else if already(body) {
                PushReply::AlreadyLoaded
            } else {
                PushReply::Failed(format!("HTTP {status}: {short}"))
            }
        }
        RemoteKind::Sglang => {
            if !(200..300).contains(&status) {
                return if already(body) { PushReply::AlreadyLoaded } else { PushReply::Failed(format!("HTTP {status}: {short}")) };
            }
            let v: Value = match serde_json::from_str(body) {
                Ok(v) => v,
                Err(_) => return PushReply::Failed(format!("reply is not JSON: {short}")),
            };
            match v.get("success").and_then(|s| s.as_bool()) {
                Some(true) => PushReply::Ok,
                Some(false) => {
                    let msg = v.get("error_message").or_else(|| v.get("message")).and_then(|m| m.as_str()).unwrap_or("").to_string();
                    if already(&msg) {
                        PushReply::AlreadyLoaded
                    } else {
                        PushReply::Failed(format!("success = false: {}", msg.chars().take(300).collect::<String>()))
                    }
                }
                None => PushReply::Failed(format!("reply has no success field: {short}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vllm_reply(ids: &[u32], lps: &[f64], finish: &str) -> Value {
        json!({"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [{"index": 0, "text": "x",
            "token_ids": ids, "logprobs": {"tokens": ids.iter().map(|i| format!("token_id:{i}")).collect::<Vec<_>>(),
            "token_logprobs": lps, "top_logprobs": null, "text_offset": vec![0; ids.len()]},
            "finish_reason": finish, "stop_reason": null}], "usage": {"prompt_tokens": 3, "completion_tokens": ids.len(), "total_tokens": 3 + ids.len()}})
    }

    fn sglang_reply(ids: &[u32], lps: &[f64], finish: &str) -> Value {
        json!({"text": "x", "output_ids": ids, "meta_info": {"id": "a", "finish_reason": {"type": finish, "matched": null},
            "prompt_tokens": 3, "completion_tokens": ids.len(),
            "output_token_logprobs": ids.iter().zip(lps).map(|(i, l)| json!([l, i, null])).collect::<Vec<_>>()}})
    }

    #[test]
    fn good_replies_parse_in_both_dialects() {
        let want = Sampled { ids: vec![5, 7, 2], logprobs: vec![-0.5, -1.25, 0.0], finish_reason: FinishReason::Stop, weight_version: None };
        let v = parse_vllm(&vllm_reply(&[5, 7, 2], &[-0.5, -1.25, 0.0], "stop"), 10, 8).unwrap();
        assert_eq!(v, want);
        let s = parse_sglang(&sglang_reply(&[5, 7, 2], &[-0.5, -1.25, 0.0], "stop"), 10, 8).unwrap();
        assert_eq!(s, want);
        assert_eq!(parse_vllm(&vllm_reply(&[1], &[-0.1], "length"), 10, 8).unwrap().finish_reason, FinishReason::Length);
        assert_eq!(parse_sglang(&sglang_reply(&[1], &[-0.1], "abort"), 10, 8).unwrap().finish_reason, FinishReason::Canceled);
        // Rounding just above 0 is clamped to 0.
        assert_eq!(parse_vllm(&vllm_reply(&[1], &[1e-6], "stop"), 10, 8).unwrap().logprobs, vec![0.0]);
    }

    #[test]
    fn bad_replies_are_errors_never_panics() {
        let bad: Vec<(Value, &str)> = vec![
            (vllm_reply(&[5, 7], &[-0.5], "stop"), "log-probs"),
            (vllm_reply(&[5], &[0.5], "stop"), "must be finite"),
            (vllm_reply(&[5], &[-1e39], "stop"), "must be finite"),
            (vllm_reply(&[], &[], "stop"), "no token ids"),
            (vllm_reply(&[], &[], "length"), "no token ids"),
            (vllm_reply(&[50], &[-0.5], "stop"), "outside the vocabulary"),
            (vllm_reply(&[5], &[-0.5], "eos"), "unknown finish reason"),
            (vllm_reply(&[1, 2, 3, 4, 5, 6, 7, 8, 9], &[-0.1; 9], "length"), "max_tokens"),
            (json!({"choices": []}), "0 choices"),
            (json!({"error": "boom"}), "no choices"),
            (json!({"choices": [{"text": "x", "finish_reason": "stop"}]}), "token_ids"),
            (json!({"choices": [{"token_ids": [-1], "finish_reason": "stop"}]}), "not a token id"),
            (json!({"choices": [{"token_ids": [1], "logprobs": {"token_logprobs": [null]}, "finish_reason": "stop"}]}), "not a number"),
        ];
        for (body, want) in bad {
            let e = parse_vllm(&body, 10, 8).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
        let mut mismatched = vllm_reply(&[5], &[-0.5], "stop");
        mismatched["choices"][0]["logprobs"]["tokens"] = json!(["token_id:6"]);
        assert!(parse_vllm(&mismatched, 10, 8).unwrap_err().to_string().contains("token_ids says 5"));
        let bad: Vec<(Value, &str)> = vec![
            (sglang_reply(&[5, 7], &[-0.5, -0.1], "stop"), ""),
            (json!({"output_ids": [1], "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-0.1, 2, null]]}}), "output_ids says 1"),
            (json!({"output_ids": [1], "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[null, 1, null]]}}), "not a number"),
            (json!({"output_ids": [1], "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-0.1]]}}), "not [logprob"),
            (json!({"output_ids": [1], "meta_info": {"finish_reason": null, "output_token_logprobs": [[-0.1, 1, null]]}}), "finish_reason.type"),
            (json!({"output_ids": [1, 2], "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-0.1, 1, null]]}}), "for 2 output_ids"),
            (json!("nope"), "output_ids"),
        ];
        assert!(parse_sglang(&bad[0].0, 10, 8).is_ok());
        for (body, want) in &bad[1..] {
            let e = parse_sglang(body, 10, 8).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
        assert!(parse_sglang(&sglang_reply(&[], &[], "stop"), 10, 8).unwrap_err().to_string().contains("no token ids"));
        assert!(parse_sglang(&sglang_reply(&[1], &[-1e39], "stop"), 10, 8).unwrap_err().to_string().contains("must be finite"));
        let mut versioned = sglang_reply(&[1], &[-0.1], "stop");
        versioned["meta_info"]["weight_version"] = json!("policy-v000002-ab");
        assert_eq!(parse_sglang(&versioned, 10, 8).unwrap().weight_version.as_deref(), Some("policy-v000002-ab"));
        // A NaN cannot travel in JSON; an infinite one arrives as a huge number or a string.
        assert!(parse_sglang(&json!({"output_ids": [1], "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [["-Infinity", 1, null]]}}), 10, 8).is_err());
    }

    #[test]
    fn request_bodies_carry_every_sampling_field() {
        let s = SamplingConfig { temperature: 0.7, top_p: 0.9, top_k: 0, max_new_tokens: 12, stop: vec!["\n\n".into()] };
        let v = generate_body(RemoteKind::Vllm, "base", Some("policy-v000003"), &[1, 2], &s, u64::MAX);
        for k in ["model", "prompt", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "seed", "logprobs", "return_tokens_as_token_ids", "return_token_ids", "stop", "include_stop_str_in_output", "skip_special_tokens", "ignore_eos", "stream"] {
            assert!(v.get(k).is_some(), "vllm body lacks {k}");
        }
        assert_eq!(v["model"], "policy-v000003");
        assert_eq!(v["top_k"], -1);
        // vLLM refuses seeds above 2^63 - 1 with a 400.
        assert_eq!(v["seed"], json!(i64::MAX));
        assert_eq!(v["repetition_penalty"], 1.0);
        let v = generate_body(RemoteKind::Sglang, "base", None, &[1, 2], &s, 7);
        assert_eq!(v["lora_path"], Value::Null);
        assert_eq!(v["input_ids"], json!([1, 2]));
        for k in ["max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_new_tokens", "stop", "skip_special_tokens", "no_stop_trim", "ignore_eos", "sampling_seed"] {
            assert!(v["sampling_params"].get(k).is_some(), "sglang sampling_params lacks {k}");
        }
        assert_eq!(generate_body(RemoteKind::Vllm, "base", None, &[1], &s, 1)["model"], "base");
    }

    #[test]
    fn request_faults_are_told_from_server_faults() {
        let long = r#"{"error":{"message":"This model's maximum context length is 2048 tokens. However, you requested 2100 tokens","type":"BadRequestError","code":400}}"#;
        assert!(refused_request(400, long, "policy-v000001-aa"));
        assert!(refused_request(400, "Input should be less than or equal to 9223372036854775807", "base"));
        assert!(refused_request(413, "too large", "base"));
        assert!(refused_request(422, "bad field", "base"));
        // A restarted server lost the adapter: the server needs it again, the request is fine.
        assert!(!refused_request(404, r#"{"error":{"message":"The model `policy-v000003-ab` does not exist."}}"#, "policy-v000003-ab"));
        assert!(refused_request(404, "no such route", "base"));
        for s in [401, 403, 408, 429, 500, 502, 503] {
            assert!(!refused_request(s, "x", "base"), "{s}");
        }
    }

    #[test]
    fn push_replies() {
        assert_eq!(push_reply(RemoteKind::Vllm, 200, "Success"), PushReply::Ok);
        assert_eq!(push_reply(RemoteKind::Vllm, 400, r#"{"message":"The lora adapter 'x' has already been loaded."}"#), PushReply::AlreadyLoaded);
        assert!(matches!(push_reply(RemoteKind::Vllm, 500, "oops"), PushReply::Failed(_)));
        assert_eq!(push_reply(RemoteKind::Sglang, 200, r#"{"success":true}"#), PushReply::Ok);
        assert!(matches!(push_reply(RemoteKind::Sglang, 200, r#"{"success":false,"error_message":"disk full"}"#), PushReply::Failed(m) if m.contains("disk full")));
        assert_eq!(push_reply(RemoteKind::Sglang, 200, r#"{"success":false,"error_message":"LoRA adapter x is already loaded"}"#), PushReply::AlreadyLoaded);
        assert!(matches!(push_reply(RemoteKind::Sglang, 200, "<html>"), PushReply::Failed(_)));
    }
}
