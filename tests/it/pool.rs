//! The vLLM and SGLang stand-ins of `testkit::pool` over real HTTP on 127.0.0.1: reply shapes,
//! ids and log-probs against the embedded engine, strict request checking, auth, faults (kill,
//! death after n requests, delay, failing pushes), restart on the same port, LoRA pushes that
//! serve exactly the learner's policy, and the `serve-test-pool` subcommand.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrator::config::ModelConfig;
use orchestrator::engine::{ChatMessage, Engine, EngineConfig, GenRequest, MistralEngine, Role, Rollout, SamplingConfig, SeedKey};
use orchestrator::learner::lora::LoraConfig;
use orchestrator::learner::{Algorithm, Learner, LearnerConfig, Trajectory};
use orchestrator::testkit::pool::{Dialect, PoolServer, PoolServerOptions};
use orchestrator::testkit::tiny::TinySpec;
use serde_json::{json, Value};

const PROMPTS: &[&str] = &[
    "Write a short story about a lighthouse.",
    "Describe the morning market.",
    "Dear hiring manager, I am writing to apply.",
    "Summarise the main points of the report.",
];

const NAME: &str = "tiny";

/// The model of tests/it/engine.rs `stop_strings_end_generation`, whose greedy text takes a stop string.
fn model(tmp: &Path) -> PathBuf {
    common::tiny_model(&tmp.join("model"), &TinySpec::llama(6))
}

fn serial() -> EngineConfig {
    EngineConfig { serial: true, ..EngineConfig::default() }
}

fn opts(dialect: Dialect, dir: &Path) -> PoolServerOptions {
    PoolServerOptions { engine: serial(), ..PoolServerOptions::new(dialect, dir, NAME) }
}

async fn embedded(dir: &Path) -> MistralEngine {
    let m = ModelConfig { path: dir.to_path_buf(), format: Default::default(), dtype: Default::default() };
    MistralEngine::load(&m, &serial()).await.expect("engine loads")
}

fn requests(n: usize, seed: u64) -> Vec<GenRequest> {
    PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest { messages: vec![ChatMessage::new(Role::User, *p)], n, seed: SeedKey::new(seed, 0, i as u64) })
        .collect()
}

/// Every field the pool client sends, for a sample of `s` from `prompt` with stream `seed`.
fn body(d: Dialect, prompt: &[u32], model: Option<&str>, seed: u64, s: &SamplingConfig) -> Value {
    let top_k = if s.top_k == 0 { -1 } else { s.top_k as i64 };
    match d {
        Dialect::Vllm => json!({
            "model": model.unwrap_or(NAME), "prompt": prompt, "n": 1, "max_tokens": s.max_new_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": top_k, "min_p": 0.0, "seed": seed,
            "logprobs": 0, "return_tokens_as_token_ids": true, "return_token_ids": true, "stop": s.stop,
            "include_stop_str_in_output": true, "skip_special_tokens": false, "ignore_eos": false, "stream": false,
        }),
        Dialect::Sglang => json!({
            "input_ids": prompt,
            "sampling_params": {
                "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "top_k": top_k,
                "min_p": 0.0, "stop": s.stop, "skip_special_tokens": false, "no_stop_trim": true, "ignore_eos": false,
                "sampling_seed": seed,
            },
            "return_logprob": true, "logprob_start_len": -1, "lora_path": model, "stream": false,
        }),
    }
}

fn gen_path(d: Dialect) -> &'static str {
    match d {
        Dialect::Vllm => "/v1/completions",
        Dialect::Sglang => "/generate",
    }
}

async fn post(base: &str, path: &str, body: &Value) -> reqwest::Result<(u16, String)> {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(body).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.text().await?))
}

async fn get(base: &str, path: &str) -> reqwest::Result<(u16, String)> {
    let r = reqwest::Client::new().get(format!("{base}{path}")).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.text().await?))
}

/// A sample as the reply carries it, with the reply's shape checked on the way.
#[derive(Debug)]
struct Sample {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    /// "stop", "length" or "abort".
    finish: String,
    text: String,
}

fn parse(d: Dialect, prompt: &[u32], v: &Value) -> Sample {
    let as_ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    match d {
        Dialect::Vllm => {
            assert_eq!(v["object"], "text_completion", "{v}");
            let c = &v["choices"][0];
            assert_eq!(c["index"], 0);
            let ids = as_ids(&c["token_ids"]);
            let lp = &c["logprobs"];
            let tokens: Vec<String> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
            assert_eq!(tokens, ids.iter().map(|t| format!("token_id:{t}")).collect::<Vec<_>>(), "{v}");
            let logprobs: Vec<f32> = lp["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            assert!(lp["top_logprobs"].is_null());
            assert_eq!(lp["text_offset"].as_array().unwrap().len(), ids.len());
            assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
            assert_eq!(v["usage"]["completion_tokens"], ids.len());
            assert_eq!(v["usage"]["total_tokens"], prompt.len() + ids.len());
            let finish = c["finish_reason"].as_str().unwrap().to_string();
            Sample { ids, logprobs, finish, text: c["text"].as_str().unwrap().to_string() }
        }
        Dialect::Sglang => {
            let m = &v["meta_info"];
            let ids = as_ids(&v["output_ids"]);
            let lps = m["output_token_logprobs"].as_array().unwrap();
            assert_eq!(lps.len(), ids.len(), "{v}");
            for (e, id) in lps.iter().zip(&ids) {
                let e = e.as_array().unwrap();
                assert_eq!(e.len(), 3);
                assert_eq!(e[1].as_u64(), Some(*id as u64), "{v}");
                assert!(e[2].is_null());
            }
            let logprobs = lps.iter().map(|e| e[0].as_f64().unwrap() as f32).collect();
            assert_eq!(m["prompt_tokens"], prompt.len());
            assert_eq!(m["completion_tokens"], ids.len());
            let finish = m["finish_reason"]["type"].as_str().unwrap().to_string();
            Sample { ids, logprobs, finish, text: v["text"].as_str().unwrap().to_string() }
        }
    }
}

async fn sample(server: &PoolServer, prompt: &[u32], model: Option<&str>, seed: u64, s: &SamplingConfig) -> Sample {
    let d = server.dialect();
    let (status, text) = post(&server.base_url(), gen_path(d), &body(d, prompt, model, seed, s)).await.unwrap();
    assert_eq!(status, 200, "{text}");
    parse(d, prompt, &serde_json::from_str(&text).unwrap())
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Sent the embedded engine's prompt ids with its per-sample stream seeds, both dialects return
/// the embedded engine's ids and log-probs (greedy, full sampling, top-p/top-k, a stop string),
/// in their own reply shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_carry_the_embedded_engines_ids_and_logprobs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path());
    let engine = embedded(&dir).await;
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let eos = tok.token_to_id(orchestrator::testkit::tiny::EOS).unwrap();
    // A stop string from the first prompt's greedy text, greedy and on that prompt only, so it
    // is sure to match (stops after invalid UTF-8 under random sampling, which panicked
    // unpatched 0.8.1, are tests/it/engine.rs `stop_string_after_invalid_utf8_is_no_panic`).
    let greedy = engine.generate(&requests(1, 0)[..1], &SamplingConfig::greedy(40)).await.unwrap();
    let chars: Vec<char> = greedy[0][0].text.chars().collect();
    let stop: String = chars[8..11].iter().collect();
    let configs = [
        (SamplingConfig::greedy(12), 4),
        (SamplingConfig { temperature: 1.0, max_new_tokens: 16, ..SamplingConfig::default() }, 4),
        (SamplingConfig { temperature: 0.7, top_p: 0.9, top_k: 20, max_new_tokens: 16, stop: vec![] }, 4),
        (SamplingConfig { stop: vec![stop], ..SamplingConfig::greedy(40) }, 1),
    ];
    let mut want: Vec<(SamplingConfig, Vec<GenRequest>, Vec<Vec<Rollout>>)> = Vec::new();
    for (s, prompts) in &configs {
        let reqs = requests(2, 5)[..*prompts].to_vec();
        let out = engine.generate(&reqs, s).await.unwrap();
        want.push((s.clone(), reqs, out));
    }
    drop(engine);
    for d in [Dialect::Vllm, Dialect::Sglang] {
        let server = PoolServer::start(opts(d, &dir)).await.unwrap();
        let (st, _) = get(&server.base_url(), "/health").await.unwrap();
        assert_eq!(st, 200);
        let mut finishes = std::collections::BTreeSet::new();
        let mut n = 0;
        for (s, reqs, out) in &want {
            for (req, group) in reqs.iter().zip(out) {
                for r in group {
                    let got = sample(&server, &r.prompt_ids, None, req.seed.sample_seed(r.sample as u64), s).await;
                    assert_eq!(got.ids, r.ids, "{d:?} {s:?}");
                    assert!(worst(&got.logprobs, &r.logprobs) <= 1e-6, "{d:?}: {:?} vs {:?}", got.logprobs, r.logprobs);
                    // The text is the ids' decode; a stop string ends it (kept, as asked).
                    let full = tok.decode(&got.ids, false).unwrap();
                    if got.finish == "stop" && !s.stop.is_empty() && *got.ids.last().unwrap() != eos {
                        assert!(got.text.ends_with(s.stop[0].as_str()) && full.starts_with(&got.text), "{got:?}");
                    } else {
                        assert_eq!(got.text, full);
                    }
                    finishes.insert(got.finish.clone());
                    n += 1;
                }
            }
        }
        assert_eq!(server.counts().generations, n);
        assert_eq!(server.counts().by_model[NAME], n);
        assert!(finishes.contains("stop") && finishes.contains("length"), "{finishes:?}");
        match d {
            Dialect::Vllm => {
                let (st, t) = get(&server.base_url(), "/v1/models").await.unwrap();
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!((st, v["object"].clone(), v["data"][0]["id"].clone()), (200, json!("list"), json!(NAME)));
            }
            Dialect::Sglang => {
                let (st, t) = get(&server.base_url(), "/get_model_info").await.unwrap();
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!((st, v["model_path"].as_str().unwrap()), (200, dir.to_str().unwrap()));
            }
        }
    }
}

/// Malformed requests get a 400 with a JSON error naming the problem, unknown models the real
/// servers' answer (vLLM 404, SGLang 400), unknown routes a 404; nothing reaches the engine,
/// and the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_400_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path());
    let s = SamplingConfig::greedy(4);
    for d in [Dialect::Vllm, Dialect::Sglang] {
        let server = PoolServer::start(opts(d, &dir)).await.unwrap();
        let base = server.base_url();
        let good = body(d, &[1, 2, 3], None, 0, &s);
        // (what, path into the body, new value or None to remove, expected words)
        let (sp, p) = match d {
            Dialect::Vllm => ("", "prompt"),
            Dialect::Sglang => ("sampling_params/", "input_ids"),
        };
        let max = if d == Dialect::Vllm { "max_tokens" } else { "max_new_tokens" };
        let seed = if d == Dialect::Vllm { "seed" } else { "sampling_seed" };
        let cases: Vec<(String, Option<Value>, &str)> = vec![
            (p.into(), Some(json!("a text prompt")), "token ids"),
            (p.into(), Some(json!([])), "empty"),
            (p.into(), Some(json!([1, -2])), "token ids"),
            (p.into(), Some(json!([1, 100000])), "out of vocabulary"),
            (p.into(), None, "missing"),
            (format!("{sp}{max}"), Some(json!(0)), ">= 1"),
            (format!("{sp}{max}"), Some(json!(100000)), "maximum context length"),
            (format!("{sp}temperature"), Some(json!(-1.0)), ">= 0"),
            (format!("{sp}temperature"), Some(json!("hot")), "a number"),
            (format!("{sp}top_p"), Some(json!(0.0)), "(0, 1]"),
            (format!("{sp}top_k"), Some(json!(-2)), "top_k"),
            (format!("{sp}min_p"), Some(json!(0.1)), "min_p"),
            (format!("{sp}{seed}"), Some(json!(-5)), "non-negative integer"),
            // vLLM and SGLang take a signed 64-bit seed; vLLM's 400 in its own words.
            (format!("{sp}{seed}"), Some(json!(u64::MAX)), "less than or equal to 9223372036854775807"),
            (format!("{sp}{seed}"), Some(json!(1u64 << 63)), "less than or equal to 9223372036854775807"),
            (format!("{sp}repetition_penalty"), Some(json!(0.0)), "(0, 10]"),
            (format!("{sp}presence_penalty"), Some(json!(0.5)), "supports 0 only"),
            (format!("{sp}stop"), Some(json!([""])), "empty"),
            (format!("{sp}ignore_eos"), None, "missing"),
            (format!("{sp}max_new_token"), Some(json!(4)), "unknown field"),
            ("stream".into(), Some(json!(true)), "stream"),
        ];
        let mut cases = cases;
        if d == Dialect::Vllm {
            cases.push(("n".into(), Some(json!(2)), "`n`"));
            cases.push(("logprobs".into(), Some(json!(5)), "logprobs"));
            cases.push(("max_new_tokens".into(), Some(json!(4)), "unknown field"));
        } else {
            cases.push(("lora_path".into(), Some(json!(7)), "lora_path"));
        }
        for (at, value, words) in &cases {
            let mut b = good.clone();
            let (parent, key) = match at.split_once('/') {
                Some((a, k)) => (&mut b[a], k),
                None => (&mut b, at.as_str()),
            };
            match value {
                Some(v) => parent[key] = v.clone(),
                None => {
                    parent.as_object_mut().unwrap().remove(key);
                }
            }
            let (st, text) = post(&base, gen_path(d), &b).await.unwrap();
            assert_eq!(st, 400, "{d:?} {at}={value:?}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
            let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{text}"));
            assert!(msg.contains(words), "{d:?} {at}={value:?}: {msg:?} lacks {words:?}");
        }
        for raw in ["not json", "[1, 2]", ""] {
            let r = reqwest::Client::new().post(format!("{base}{}", gen_path(d))).body(raw).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 400, "{d:?} {raw:?}");
        }
        let unknown = body(d, &[1, 2, 3], Some("policy-v000099"), 0, &s);
        let (st, text) = post(&base, gen_path(d), &unknown).await.unwrap();
        let want = if d == Dialect::Vllm { 404 } else { 400 };
        assert_eq!(st, want, "{text}");
        assert!(text.contains("policy-v000099"), "{text}");
        assert_eq!(get(&base, "/no/such/route").await.unwrap().0, 404);
        assert_eq!(server.counts().generations, 0);
        // Bodies that are not a JSON object never reach the generation handler.
        assert_eq!(server.counts().generations_arrived, cases.len() + 1);
        // Any odd value in any field: an answer (200 or 400), never a 5xx or a dropped connection.
        let odd = [json!(null), json!("x"), json!(-1), json!(1e300), json!(5e-324), json!(u64::MAX), json!([[1]]), json!({"a": 1}), json!(true)];
        let mut fields: Vec<String> = good.as_object().unwrap().keys().filter(|k| *k != "sampling_params").cloned().collect();
        if d == Dialect::Sglang {
            fields.extend(good["sampling_params"].as_object().unwrap().keys().map(|k| format!("sampling_params/{k}")));
        }
        let mut answered = [0usize; 2];
        for f in &fields {
            for v in &odd {
                let mut b = good.clone();
                match f.split_once('/') {
                    Some((a, k)) => b[a][k] = v.clone(),
                    None => b[f.as_str()] = v.clone(),
                }
                let (st, text) = post(&base, gen_path(d), &b).await.unwrap_or_else(|e| panic!("{d:?} {f}={v}: {e}"));
                assert!(st == 200 || st == 400 || (st == 404 && f == "model"), "{d:?} {f}={v}: {st} {text}");
                answered[usize::from(st == 200)] += 1;
                if st == 200 {
                    // Whatever log-probs the reply carries (a field may have turned them off) are real.
                    let v: Value = serde_json::from_str(&text).unwrap();
                    let lps = match d {
                        Dialect::Vllm => v["choices"][0]["logprobs"]["token_logprobs"].as_array().cloned().unwrap_or_default(),
                        Dialect::Sglang => v["meta_info"]["output_token_logprobs"].as_array().map(|a| a.iter().map(|e| e[0].clone()).collect()).unwrap_or_default(),
                    };
                    assert!(lps.iter().all(|l| l.as_f64().is_some_and(|l| l.is_finite() && l <= 0.0)), "{d:?} {f}={v}: {text}");
                }
            }
        }
        println!("{d:?}: odd values: {} answered 200, {} rejected", answered[1], answered[0]);
        // Pushes with odd bodies fail cleanly too (SGLang: 200 with success false), and load nothing.
        let (load, unload) = if d == Dialect::Vllm { ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") } else { ("/load_lora_adapter", "/unload_lora_adapter") };
        for path in [load, unload, "/update_weights_from_disk"] {
            for v in &odd {
                for b in [json!({"lora_name": v, "lora_path": "/nonexistent"}), json!({"lora_name": "x", "lora_path": v}), json!({"model_path": v}), json!({"lora_name": "x", "extra": v})] {
                    let (st, text) = post(&base, path, &b).await.unwrap();
                    let failed = st == 400 || st == 404 || (st == 200 && text.contains("\"success\":false"));
                    assert!(failed, "{d:?} {path} {b}: {st} {text}");
                }
            }
        }
        assert_eq!((server.loaded(), server.counts().pushes_ok), (Vec::<String>::new(), 0));
        assert!(answered[1] > 0 && answered[0] > 0);
        // Still serving.
        let before = server.counts().generations;
        sample(&server, &[1, 2, 3], None, 0, &s).await;
        assert_eq!(server.counts().generations, before + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_required_when_set() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path());
    let s = SamplingConfig::greedy(4);
    for d in [Dialect::Vllm, Dialect::Sglang] {
        let server = PoolServer::start(PoolServerOptions { api_key: Some("sekrit".into()), ..opts(d, &dir) }).await.unwrap();
        let url = format!("{}{}", server.base_url(), gen_path(d));
        let b = body(d, &[1, 2, 3], None, 0, &s);
        let client = reqwest::Client::new();
        let none = client.post(&url).json(&b).send().await.unwrap();
        assert_eq!(none.status().as_u16(), 401);
        let wrong = client.post(&url).bearer_auth("guess").json(&b).send().await.unwrap();
        assert_eq!(wrong.status().as_u16(), 401);
        let right = client.post(&url).bearer_auth("sekrit").json(&b).send().await.unwrap();
        assert_eq!(right.status().as_u16(), 200);
        // Health checks need no key, as on the real servers.
        assert_eq!(get(&server.base_url(), "/health").await.unwrap().0, 200);
        assert_eq!(server.counts().generations_arrived, 1);
    }
}

/// Kill: a request in flight sees its connection close with no answer (long before its delay
/// would end), new connections are refused; a fresh server rejoins on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_aborts_requests_in_flight_and_a_restart_rejoins_on_the_same_port() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path());
    let s = SamplingConfig::greedy(4);
    for d in [Dialect::Vllm, Dialect::Sglang] {
        let server = PoolServer::start(opts(d, &dir)).await.unwrap();
        let (base, port) = (server.base_url(), server.port());
        server.set_delay(Duration::from_secs(60));
        let b = body(d, &[1, 2, 3], None, 0, &s);
        let t0 = Instant::now();
        let pending = tokio::spawn({
            let (base, b) = (base.clone(), b.clone());
            async move { post(&base, gen_path(d), &b).await }
        });
        while server.in_flight() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.kill().await;
        let got = pending.await.unwrap();
        assert!(got.is_err(), "{d:?}: a killed server answered: {got:?}");
        assert!(t0.elapsed() < Duration::from_secs(30), "the request waited out its delay");
        let refused = get(&base, "/health").await.unwrap_err();
        assert!(refused.is_connect(), "{refused:?}");
        assert_eq!(server.counts().generations, 0);

        let again = PoolServer::start_on(opts(d, &dir), port).await.unwrap();
        assert_eq!(again.base_url(), base);
        assert_eq!(get(&base, "/health").await.unwrap().0, 200);
        sample(&again, &[1, 2, 3], None, 0, &s).await;
        assert_eq!((again.counts().generations, again.loaded()), (1, Vec::<String>::new()));
    }
}

/// Death on the n-th generation request (counted from the call), and the per-request delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn die_after_n_generations_and_a_slow_server() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path());
    let s = SamplingConfig::greedy(4);
    for d in [Dialect::Vllm, Dialect::Sglang] {
        let server = PoolServer::start(opts(d, &dir)).await.unwrap();
        let base = server.base_url();
        sample(&server, &[1, 2, 3], None, 0, &s).await;
        server.set_delay(Duration::from_millis(400));
        let t0 = Instant::now();
        sample(&server, &[1, 2, 3], None, 0, &s).await;
        assert!(t0.elapsed() >= Duration::from_millis(400), "{:?}", t0.elapsed());
        server.set_delay(Duration::ZERO);
        server.set_die_after(Some(3));
        for _ in 0..2 {
            sample(&server, &[4, 5, 6], None, 1, &s).await;
        }
        assert!(!server.is_killed());
        let third = post(&base, gen_path(d), &body(d, &[4, 5, 6], None, 1, &s)).await;
        assert!(third.is_err(), "{d:?}: the third request was answered: {third:?}");
        assert!(server.is_killed());
        assert!(get(&base, "/health").await.unwrap_err().is_connect());
        let c = server.counts();
        assert_eq!((c.generations, c.generations_arrived), (4, 5));
    }
}

/// Four samples per prompt at T = 1; samples 0 and 1 of each prompt win.
async fn trajectories(dir: &Path) -> Vec<Trajectory> {
    let engine = embedded(dir).await;
    let s = SamplingConfig { temperature: 1.0, max_new_tokens: 12, ..SamplingConfig::default() };
    let groups = engine.generate(&requests(4, 77), &s).await.unwrap();
    groups
        .iter()
        .enumerate()
        .flat_map(|(g, rs)| rs.iter().map(move |r| orchestrator::trainer::trajectory(r, if r.sample < 2 { 1.0 } else { 0.0 }, g as u64)))
        .collect()
}

/// The pushed version's log-probs against the learner's for the same (prompt, response), at
/// T = 1 and 0.7: (worst difference, largest change from the base model's).
async fn compare_with_learner(server: &PoolServer, name: Option<&str>, learner: &Learner, ts: &[Trajectory]) -> (f32, f32) {
    let (mut worst_diff, mut moved) = (0f32, 0f32);
    for (k, t) in ts.iter().step_by(3).enumerate() {
        for temp in [1.0, 0.7] {
            let s = SamplingConfig { temperature: temp, max_new_tokens: 10, ..SamplingConfig::default() };
            let got = sample(server, &t.prompt_ids, name, 1000 + k as u64, &s).await;
            let ours = learner.logprobs(&[(&t.prompt_ids[..], &got.ids[..])], temp).unwrap().remove(0);
            worst_diff = worst_diff.max(worst(&got.logprobs, &ours));
            let base = sample(server, &t.prompt_ids, None, 1000 + k as u64, &s).await;
            let n = base.ids.iter().zip(&got.ids).take_while(|(a, b)| a == b).count();
            moved = moved.max(worst(&got.logprobs[..n], &base.logprobs[..n]));
            if base.ids != got.ids {
                moved = f32::INFINITY;
            }
        }
    }
    (worst_diff, moved)
}

/// A LoRA push serves exactly the learner's policy: after one real update, the served version's
/// log-probs equal `Learner::logprobs` within 1e-4 (importance ratio 1), and differ from the
/// base model's. Re-pushing a name is the dialect's duplicate answer; corrupt, missing and
/// injected-failure pushes fail cleanly and the server keeps serving; unload drops the name.
/// SGLang's full-weight update serves the merged export under the base name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_pushes_serve_the_learners_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path());
    let ts = trajectories(&dir).await;
    let lora = LoraConfig { enabled: true, rank: 4, alpha: 8.0, ..LoraConfig::default() };
    let cfg = LearnerConfig { algorithm: Algorithm::Grpo, lr: 5e-2, threads: 2, lora, ..LearnerConfig::default() };
    let mut learner = Learner::new(&cfg, &dir, 3).unwrap();
    learner.update(&ts, 1.0).unwrap();
    let adapter = tmp.path().join("adapter");
    learner.export_adapter(&adapter).unwrap();
    let full = tmp.path().join("full");
    learner.export(&full).unwrap();
    let corrupt = tmp.path().join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::copy(adapter.join("adapter_config.json"), corrupt.join("adapter_config.json")).unwrap();
    std::fs::write(corrupt.join("adapter_model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors").unwrap();
    let missing = tmp.path().join("no-such-adapter");
    let s = SamplingConfig::greedy(4);

    for d in [Dialect::Vllm, Dialect::Sglang] {
        let server = PoolServer::start(opts(d, &dir)).await.unwrap();
        let base = server.base_url();
        let (load, unload) = match d {
            Dialect::Vllm => ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
            Dialect::Sglang => ("/load_lora_adapter", "/unload_lora_adapter"),
        };
        let push = |name: &str, path: &Path| json!({"lora_name": name, "lora_path": path.to_str().unwrap()});
        // Whether a push succeeded, from the dialect's answer.
        let ok = |st: u16, text: &str| match d {
            Dialect::Vllm => st == 200,
            Dialect::Sglang => {
                assert_eq!(st, 200, "{text}");
                serde_json::from_str::<Value>(text).unwrap()["success"] == json!(true)
            }
        };
        let (st, text) = post(&base, load, &push("policy-v000001", &adapter)).await.unwrap();
        assert!(ok(st, &text), "{d:?}: {st} {text}");
        assert_eq!(server.loaded(), vec!["policy-v000001".to_string()]);
        let (diff, moved) = compare_with_learner(&server, Some("policy-v000001"), &learner, &ts).await;
        println!("{d:?}: pushed LoRA vs learner: max |ln p diff| {diff:.2e}; largest change from base {moved:.2e}");
        assert!(diff <= 1e-4, "{d:?}: served log-probs differ from the learner's by {diff:.2e}");
        assert!(moved > 1e-3, "{d:?}: the update must change the policy for the test to mean anything ({moved:.2e})");

        // The same name again: vLLM's 400 "already been loaded", SGLang's success false.
        let (st, text) = post(&base, load, &push("policy-v000001", &adapter)).await.unwrap();
        assert!(!ok(st, &text));
        match d {
            Dialect::Vllm => assert!(st == 400 && text.contains("already been loaded"), "{st} {text}"),
            Dialect::Sglang => assert!(text.contains("already"), "{text}"),
        }
        for (name, path) in [("policy-v000002", &corrupt), ("policy-v000003", &missing)] {
            let (st, text) = post(&base, load, &push(name, path)).await.unwrap();
            assert!(!ok(st, &text), "{d:?}: {name} loaded");
            if d == Dialect::Vllm {
                assert_eq!(st, 400, "{text}");
            }
            assert!(text.contains(path.file_name().unwrap().to_str().unwrap()), "the error names the adapter: {text}");
        }
        if d == Dialect::Vllm {
            // vLLM's `load_inplace` replaces the adapter of a loaded name (a push, not a duplicate).
            let (st, text) = post(&base, load, &json!({"lora_name": "policy-v000001", "lora_path": adapter.to_str().unwrap(), "load_inplace": true})).await.unwrap();
            assert_eq!(st, 200, "{text}");
        }
        server.set_fail_pushes(true);
        let (st, text) = post(&base, load, &push("policy-v000004", &adapter)).await.unwrap();
        assert!(!ok(st, &text), "{text}");
        server.set_fail_pushes(false);
        let (st, text) = post(&base, load, &push("policy-v000004", &adapter)).await.unwrap();
        assert!(ok(st, &text), "{text}");
        let c = server.counts();
        let inplace = usize::from(d == Dialect::Vllm);
        assert_eq!((c.pushes_ok, c.pushes_failed, c.pushes_duplicate), (2 + inplace, 3, 1));
        assert_eq!(c.loaded, vec!["policy-v000001".to_string(), "policy-v000004".to_string()]);
        if d == Dialect::Vllm {
            let v: Value = serde_json::from_str(&get(&base, "/v1/models").await.unwrap().1).unwrap();
            let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
            assert_eq!(ids, [NAME, "policy-v000001", "policy-v000004"]);
        }

        // Unload: the name is gone; the other version and the base still serve.
        let (st, text) = post(&base, unload, &json!({"lora_name": "policy-v000001"})).await.unwrap();
        assert!(ok(st, &text), "{text}");
        let (st, text) = post(&base, unload, &json!({"lora_name": "policy-v000001"})).await.unwrap();
        assert!(!ok(st, &text), "{text}");
        if d == Dialect::Vllm {
            assert_eq!(st, 404);
        }
        let (st, _) = post(&base, gen_path(d), &body(d, &[1, 2, 3], Some("policy-v000001"), 0, &s)).await.unwrap();
        assert_eq!(st, if d == Dialect::Vllm { 404 } else { 400 });
        sample(&server, &[1, 2, 3], Some("policy-v000004"), 0, &s).await;
        sample(&server, &[1, 2, 3], None, 0, &s).await;
        assert_eq!(server.counts().unloads, 1);

        if d == Dialect::Sglang {
            // Full weights: the base name serves the merged export.
            let (st, text) = post(&base, "/update_weights_from_disk", &json!({"model_path": missing.to_str().unwrap()})).await.unwrap();
            assert_eq!(st, 400, "{text}");
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["success"], false);
            let (st, text) = post(&base, "/update_weights_from_disk", &json!({"model_path": full.to_str().unwrap()})).await.unwrap();
            assert_eq!(st, 200, "{text}");
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["success"], true);
            let v: Value = serde_json::from_str(&get(&base, "/get_model_info").await.unwrap().1).unwrap();
            assert_eq!(v["model_path"], full.to_str().unwrap());
            let (diff, _) = compare_with_learner(&server, None, &learner, &ts).await;
            println!("Sglang: full-weight update vs learner: max |ln p diff| {diff:.2e}");
            assert!(diff <= 1e-4, "full-weight update: {diff:.2e}");
        }
    }
}

/// The hidden subcommand: prints its URL, serves, requires the key from the named variable,
/// and dies with kill -9 like any server process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_test_pool_subcommand_serves_until_killed() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path());
    let s = SamplingConfig::greedy(4);
    for d in [Dialect::Vllm, Dialect::Sglang] {
        let dialect = if d == Dialect::Vllm { "vllm" } else { "sglang" };
        let mut child = std::process::Command::new(common::bin())
            .args(["serve-test-pool", "--dialect", dialect, "--model", dir.to_str().unwrap(), "--name", NAME, "--serial"])
            .args(["--api-key-env", "POOL_TEST_KEY"])
            .env("POOL_TEST_KEY", "k3y")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("listening on ") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the server exited before listening");
        }
        let base = line.trim().strip_prefix("listening on ").unwrap().to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        let url = format!("{base}{}", gen_path(d));
        let b = body(d, &[1, 2, 3], None, 0, &s);
        let client = reqwest::Client::new();
        assert_eq!(client.post(&url).json(&b).send().await.unwrap().status().as_u16(), 401);
        let r = client.post(&url).bearer_auth("k3y").json(&b).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        parse(d, &[1, 2, 3], &r.json().await.unwrap());
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(get(&base, "/health").await.unwrap_err().is_connect());
    }
    // A missing key variable is an error naming it, before anything is served.
    let out = std::process::Command::new(common::bin())
        .args(["serve-test-pool", "--dialect", "vllm", "--model", dir.to_str().unwrap(), "--name", NAME, "--api-key-env", "POOL_TEST_NO_SUCH_VAR"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("POOL_TEST_NO_SUCH_VAR"));
}

/// The binary runs with libgomp's passive wait policy unless the user chose one: it re-executes
/// itself with `OMP_WAIT_POLICY=PASSIVE` (same process id, same arguments).
#[test]
fn the_binary_runs_with_a_passive_openmp_wait_policy_unless_one_is_set() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path());
    for (set, want) in [(None, "PASSIVE"), (Some("ACTIVE"), "ACTIVE")] {
        let mut cmd = std::process::Command::new(common::bin());
        cmd.args(["serve-test-pool", "--dialect", "vllm", "--model", dir.to_str().unwrap(), "--name", NAME, "--serial"])
            .env_remove("OMP_WAIT_POLICY")
            .stdout(std::process::Stdio::piped());
        if let Some(v) = set {
            cmd.env("OMP_WAIT_POLICY", v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("listening on ") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the server exited before listening");
        }
        let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
        let vars: Vec<String> = environ.split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).to_string()).collect();
        let got: Vec<&String> = vars.iter().filter(|v| v.starts_with("OMP_WAIT_POLICY=")).collect();
        assert_eq!(got, vec![&format!("OMP_WAIT_POLICY={want}")], "set {set:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
