//! The remote pool (`engine.backend = "remote"`) in the rest of the product: `generate` and
//! `eval` on a pool, the per-server pool metrics of `orchestrator run` (metrics.jsonl and
//! TensorBoard), and the last step's weights reaching the pool when a one-step-off run ends.
//! Loopback vLLM stand-ins of `testkit::pool` generating with our own engine on a tiny model.

use crate::common;

use std::ffi::OsStr;
use std::path::Path;

use orchestrator::config::ModelConfig;
use orchestrator::engine::remote::{version_name, RemoteConfig, WeightPush};
use orchestrator::engine::{ChatMessage, Engine, EngineConfig, GenRequest, MistralEngine, Role, SamplingConfig, SeedKey};
use orchestrator::eval::PoolWeights;
use orchestrator::metrics::read_jsonl;
use orchestrator::testkit::letters::more_a_judge;
use orchestrator::testkit::pool::{Dialect, PoolServer};
use orchestrator::testkit::scripted::ScriptedServer;
use orchestrator::testkit::tiny::TinySpec;
use serde_json::Value;

const SERVED: &str = "tiny-base";
/// Never contacted: a pool the command must refuse before it connects.
const NOWHERE: &str = "http://127.0.0.1:9";
/// The eval's own versions (`eval::EVAL_VERSIONS` and up).
const EVAL_VERSION: &str = "policy-v9";

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn urls(pool: &[PoolServer]) -> Vec<String> {
    pool.iter().map(|p| p.base_url()).collect()
}

/// What the embedded serial engine answers for `prompts` (one user message each), seeded as
/// `generate` and `eval` seed them.
async fn embedded_answers(model: &Path, prompts: &[String], n: usize, seed: u64, sampling: &SamplingConfig) -> Vec<Vec<orchestrator::engine::Rollout>> {
    let m = ModelConfig { path: model.to_path_buf(), format: Default::default(), dtype: Default::default() };
    let engine = MistralEngine::load(&m, &EngineConfig { serial: true, ..EngineConfig::default() }).await.unwrap();
    let reqs: Vec<GenRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest { messages: vec![ChatMessage::new(Role::User, p)], n, seed: SeedKey::new(seed, 0, i as u64) })
        .collect();
    engine.generate(&reqs, sampling).await.unwrap()
}

fn task_prompts(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["prompt"].as_str().unwrap().to_string()).collect()
}

/// Completions each server served, by model name, summed over the pool.
fn served_by_model(pool: &[PoolServer]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for p in pool {
        for (k, v) in p.counts().by_model {
            *m.entry(k).or_default() += v;
        }
    }
    m
}

/// `orchestrator generate` on a pool of 2: the answers (ids, log-probs, texts) the embedded
/// engine samples for the same prompts and seeds, from both servers, under the base model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_on_a_pool_writes_what_the_embedded_engine_samples() {
    let s = common::RunSetup::new(3);
    let pool = common::pool_of(Dialect::Vllm, &s.model, SERVED, 2).await;
    let config = s.config("generate", NOWHERE, "steps = 1", "");
    common::use_pool(&config, &urls(&pool), "vllm", SERVED, "weight_push = \"none\"\nconnect_timeout_secs = 2\n");
    let (tasks, out) = (s.path("tasks.jsonl"), s.path("answers.jsonl"));
    let args = [os("generate"), config.as_os_str(), os("--prompts"), tasks.as_os_str(), os("--out"), out.as_os_str()];
    let child = common::spawn_bin(&[&args[..], &[os("--n"), os("2"), os("--seed"), os("5"), os("--with-tokens")]].concat(), &[]);
    let (code, _, err) = common::finish_bin(child).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("connected to the pool of 2 server(s)"), "{err}");

    let lines: Vec<Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6);
    let sampling = SamplingConfig { temperature: 1.0, max_new_tokens: 16, ..SamplingConfig::default() };
    let want = embedded_answers(&s.model, &task_prompts(&tasks), 2, 5, &sampling).await;
    for (line, r) in lines.iter().zip(want.iter().flatten()) {
        assert_eq!(line["sample"], r.sample as u64);
        assert_eq!(line["response"], r.text.as_str(), "{line}");
        assert_eq!(line["ids"], serde_json::json!(r.ids));
        assert_eq!(line["prompt_ids"], serde_json::json!(r.prompt_ids));
        let lp: Vec<f32> = serde_json::from_value(line["logprobs"].clone()).unwrap();
        assert!(lp.iter().zip(&r.logprobs).all(|(a, b)| (a - b).abs() <= 1e-6), "{line}");
        assert_eq!(line["source"], "remote:tiny-base T=1 top_p=1 top_k=0");
    }
    for p in &pool {
        assert!(p.counts().generations > 0, "a server got nothing: {:?}", p.counts());
    }
    assert_eq!(served_by_model(&pool), [(SERVED.to_string(), 6)].into());
}

/// `eval` on a pool takes the base model, runs and checkpoints trained with LoRA, and adapter
/// directories; anything the pool cannot serve is refused with the setting to change, before
/// any server is contacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_on_a_pool_refuses_what_the_pool_cannot_serve() {
    let s = common::RunSetup::new(2);
    let other = common::tiny_model(&s.path("other"), &TinySpec::llama(4));
    let adapter = s.path("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), "{}").unwrap();
    let remote = |push| RemoteConfig { servers: vec![NOWHERE.into()], model: SERVED.into(), weight_push: push, export_dir: s.path("x"), ..RemoteConfig::default() };
    let lora = remote(WeightPush::Lora);
    let w = |arg: &Path, r: &RemoteConfig| orchestrator::eval::pool_weights(arg, "--policy", &s.model, r);

    assert_eq!(w(&s.model, &lora).unwrap(), PoolWeights::Base);
    assert_eq!(w(&s.model.join("."), &remote(WeightPush::None)).unwrap(), PoolWeights::Base, "the same directory by another path");
    assert_eq!(w(&adapter, &lora).unwrap(), PoolWeights::Adapter(adapter.clone()));
    for (arg, r, want) in [
        (&other, &lora, "a run or checkpoint trained with LoRA"),
        (&adapter, &remote(WeightPush::None), "engine.remote.weight_push = \"none\""),
        (&other, &remote(WeightPush::Disk), "engine.remote.weight_push = \"disk\""),
    ] {
        let e = format!("{:#}", w(arg, r).unwrap_err());
        assert!(e.contains(want) && e.contains("engine.backend = \"embedded\"") && e.contains("--policy"), "{e}");
    }
    assert!(format!("{:#}", w(&s.path("nope"), &lora).unwrap_err()).contains("does not exist"));

    // The command: refused before it connects (nothing listens at NOWHERE).
    let judge = ScriptedServer::start(more_a_judge()).await.unwrap();
    let config = s.config("refuse", &judge.base_url(), "steps = 1", "[learner.lora]\nenabled = true\n");
    common::use_pool(&config, &[NOWHERE.to_string()], "vllm", SERVED, "export_dir = \"exports\"\n");
    let (tasks, out) = (s.path("tasks.jsonl"), s.path("eval-refused"));
    let args = [os("eval"), config.as_os_str(), os("--policy"), other.as_os_str(), os("--baseline"), s.model.as_os_str(), os("--tasks"), tasks.as_os_str(), os("--out"), out.as_os_str()];
    let (code, _, err) = common::finish_bin(common::spawn_bin(&args, &[])).await;
    assert_ne!(code, 0);
    assert!(err.contains("--policy") && err.contains("engine.backend = \"remote\"") && !err.contains("connection"), "{err}");
}

/// A one-step-off run on a pool of 2 whose server 0 fails every push: each step's metrics line
/// (and TensorBoard) has every server's requests, tokens (equal to the rollouts it made),
/// tokens/s, failures, refusals, ejections, health and served version; the last step's weights reach the
/// pool after the last checkpoint, which still holds the weights served before. Then `eval`
/// evaluates the run's checkpoint on the same pool against the base model: the baseline's answers
/// are the embedded engine's, the policy's come from an adapter version of the eval's own, which
/// is unloaded afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_step_off_run_reports_each_server_and_leaves_its_last_step_served_then_eval_uses_the_pool() {
    let s = common::RunSetup::new(4);
    let judge = ScriptedServer::start(more_a_judge()).await.unwrap();
    let pool = common::pool_of(Dialect::Vllm, &s.model, SERVED, 2).await;
    pool[0].set_fail_pushes(true);
    let run = "steps = 3\nbatch_prompts = 2\nn_samples = 2\nsave_every = 10\nmax_off_policy_steps = 1";
    let lora = "is_correction = \"token-tis\"\n[learner.lora]\nenabled = true\nrank = 4\nalpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";
    let config = s.config("offpool", &judge.base_url(), run, lora);
    let extra = "export_dir = \"exports\"\nmax_in_flight_per_server = 4\nprobe_interval_secs = 0.2\nconnect_timeout_secs = 2\n";
    common::use_pool(&config, &urls(&pool), "vllm", SERVED, extra);
    let dir = s.path("runs/offpool");
    let child = common::spawn_bin(&[os("run"), config.as_os_str(), os("--run-dir"), dir.as_os_str()], &[]);
    let (code, _, err) = common::finish_bin(child).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("step 3's weights pushed to the pool"), "{err}");

    // The pool serves the last step; the checkpoint is what it was: the engine's weights (v2)
    // in policy/, the learner's moved on.
    let loaded = pool[1].loaded();
    assert!(loaded.len() == 1 && loaded[0].starts_with(&version_name(3)), "{loaded:?}");
    assert!(pool[0].loaded().is_empty());
    let ckpt = dir.join("checkpoints/step-000003");
    let state: Value = serde_json::from_slice(&std::fs::read(ckpt.join("trainer.json")).unwrap()).unwrap();
    assert_eq!((state["served_step"].as_u64(), state["dirty"].as_bool()), (Some(2), Some(true)), "{state}");
    assert!(ckpt.join("policy/adapter_config.json").is_file());

    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(m.len(), 3);
    let tokens_of = |step: u64| -> u64 {
        let p = dir.join(format!("samples/step-{step:06}.jsonl"));
        read_jsonl(&p).unwrap().iter().map(|r| r["response_tokens"].as_u64().unwrap()).sum()
    };
    // One-step-off: step 1 makes its own rollouts and step 2's, step 2 makes step 3's, step 3 none.
    let made = [(8, tokens_of(1) + tokens_of(2)), (4, tokens_of(3)), (0, 0)];
    for (r, (requests, tokens)) in m.iter().zip(made) {
        let step = r["step"].as_u64().unwrap();
        let key = |i: usize, k: &str| r[format!("pool/{i}/{k}").as_str()].clone();
        let num = |i: usize, k: &str| key(i, k).as_u64().unwrap_or_else(|| panic!("step {step}: pool/{i}/{k} = {}", key(i, k)));
        assert_eq!(r["canceled"], 0, "{r}");
        assert_eq!(num(0, "requests") + num(1, "requests"), requests, "step {step}: {r}");
        assert_eq!(num(0, "generated_tokens") + num(1, "generated_tokens"), tokens, "step {step}: {r}");
        // Server 0 went out at step 1's sync (its push failed) and never came back.
        assert_eq!((num(0, "healthy"), num(1, "healthy")), (0, 1), "step {step}: {r}");
        assert_eq!(num(0, "ejections"), u64::from(step == 1), "step {step}: {r}");
        assert_eq!(num(1, "ejections") + num(1, "failures") + num(0, "failures") + num(0, "refused") + num(1, "refused"), 0, "step {step}: {r}");
        assert_eq!(key(0, "serving"), "", "step {step}: {r}");
        assert!(key(1, "serving").as_str().unwrap().starts_with(&version_name(step)), "step {step}: {r}");
        let rate = key(1, "tok_per_s");
        if step < 3 {
            assert!(rate.as_f64().unwrap() > 0.0, "step {step}: {r}");
        } else {
            assert!(rate.is_null(), "step 3 generates nothing: {r}");
        }
        if step > 1 {
            assert_eq!(num(0, "requests"), 0, "step {step}: the ejected server got work: {r}");
        }
    }
    assert!(m[0]["pool/0/requests"].as_u64().unwrap() > 0, "{}", m[0]);
    let (code, text) = common::check_tensorboard(&dir);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ok:"), "{text}");

    // eval: the run's checkpoint (an adapter of the eval's own) against the base model.
    pool[0].set_fail_pushes(false);
    let before = served_by_model(&pool);
    let (tasks, out) = (s.path("tasks.jsonl"), s.path("eval"));
    let args = [os("eval"), config.as_os_str(), os("--policy"), dir.as_os_str(), os("--baseline"), s.model.as_os_str(), os("--tasks"), tasks.as_os_str(), os("--out"), out.as_os_str(), os("--seed"), os("3")];
    let (code, stdout, err) = common::finish_bin(common::spawn_bin(&args, &[])).await;
    assert_eq!(code, 0, "{err}");
    let summary: Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["overall"]["pairs"], 4, "{summary}\n{stdout}");
    assert!(summary["policy"].as_str().unwrap().ends_with("step-000003"), "{summary}");
    let after = served_by_model(&pool);
    let grew = |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    assert_eq!(grew(SERVED), 4, "the baseline is the base model: {before:?} -> {after:?}");
    let eval_versions: Vec<&String> = after.keys().filter(|k| k.starts_with(EVAL_VERSION)).collect();
    assert_eq!(eval_versions.len(), 1, "{after:?}");
    assert_eq!(grew(eval_versions[0]), 4, "the policy came from the eval's adapter: {after:?}");
    for p in &pool {
        assert!(p.loaded().iter().all(|n| !n.starts_with(EVAL_VERSION)), "the eval's adapter stayed loaded: {:?}", p.loaded());
    }
    assert!(!std::fs::read_dir(s.path("exports")).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("eval-")));

    let judged: Vec<Value> = std::fs::read_to_string(out.join("judgements.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(judged.len(), 8);
    let prompts = task_prompts(&tasks);
    let sampling = SamplingConfig { temperature: 1.0, max_new_tokens: 16, ..SamplingConfig::default() };
    let want = embedded_answers(&s.model, &prompts, 1, 3, &sampling).await;
    let ids: Vec<String> = read_jsonl(&tasks).unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()).collect();
    for j in &judged {
        let i = ids.iter().position(|id| id == j["task_id"].as_str().unwrap()).unwrap();
        assert_eq!(j["baseline_answer"], want[i][0].text.as_str(), "{j}");
    }
}
