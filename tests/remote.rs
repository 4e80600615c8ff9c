//! The remote rollout pool (engine.backend = "remote") against real HTTP servers on 127.0.0.1:
//! the vLLM and SGLang stand-ins of `testkit::pool`, which generate with our own engine on the
//! tiny model from the prompt ids they are sent, so ids and log-probs are real.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrator::config::ModelConfig;
use orchestrator::engine::remote::prompt::PromptTemplate;
use orchestrator::engine::remote::{version_name, RemoteConfig, RemoteEngine, RemoteKind, WeightPush};
use orchestrator::engine::{ChatMessage, Engine, EngineConfig, FinishReason, GenRequest, MistralEngine, Role, Rollout, SamplingConfig, SeedKey};
use orchestrator::learner::lora::LoraConfig;
use orchestrator::learner::{Algorithm, Learner, LearnerConfig, Trajectory};
use orchestrator::testkit::pool::{Dialect, PoolServer, PoolServerOptions};
use orchestrator::testkit::tiny::TinySpec;

const SERVED: &str = "tiny-base";
const PROMPTS: &[&str] = common::PROMPTS.split_at(6).0;

fn requests(n_prompts: usize, n: usize, seed: u64) -> Vec<GenRequest> {
    PROMPTS[..n_prompts]
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest { messages: vec![ChatMessage::new(Role::User, *p)], n, seed: SeedKey::new(seed, 1, i as u64) })
        .collect()
}

fn sampling(max: usize) -> SamplingConfig {
    SamplingConfig { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: max, stop: vec![] }
}

fn serial() -> EngineConfig {
    EngineConfig { serial: true, ..EngineConfig::default() }
}

fn dialect(kind: RemoteKind) -> Dialect {
    match kind {
        RemoteKind::Vllm => Dialect::Vllm,
        RemoteKind::Sglang => Dialect::Sglang,
    }
}

async fn servers(kind: RemoteKind, model: &Path, n: usize) -> Vec<PoolServer> {
    let mut v = Vec::new();
    for _ in 0..n {
        let opts = PoolServerOptions { engine: serial(), ..PoolServerOptions::new(dialect(kind), model, SERVED) };
        v.push(PoolServer::start(opts).await.expect("pool server starts"));
    }
    v
}

fn remote_cfg(kind: RemoteKind, servers: &[PoolServer], export: &Path, push: WeightPush) -> RemoteConfig {
    RemoteConfig {
        kind,
        servers: servers.iter().map(|s| s.base_url()).collect(),
        model: SERVED.into(),
        max_in_flight_per_server: 4,
        connect_timeout_secs: 2.0,
        request_timeout_secs: 60.0,
        weight_push: push,
        export_dir: export.to_path_buf(),
        max_group_retries: 3,
        min_groups_share: 1.0,
        probe_interval_secs: 0.1,
        ..RemoteConfig::default()
    }
}

async fn embedded(model: &Path) -> MistralEngine {
    let m = ModelConfig { path: model.to_path_buf(), format: Default::default(), dtype: Default::default() };
    MistralEngine::load(&m, &serial()).await.expect("engine loads")
}

fn flat(groups: Vec<Vec<Rollout>>) -> Vec<Rollout> {
    groups.into_iter().flatten().collect()
}

/// Same prompt ids, sampled ids, log-probs (to float printing), finish reasons and texts.
fn assert_same(a: &[Rollout], b: &[Rollout], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.request, x.sample), (y.request, y.sample), "{what}");
        assert_eq!(x.prompt_ids, y.prompt_ids, "{what}: prompt ids of {}/{}", x.request, x.sample);
        assert_eq!(x.ids, y.ids, "{what}: ids of {}/{}", x.request, x.sample);
        assert_eq!(x.finish_reason, y.finish_reason, "{what}");
        assert_eq!(x.text, y.text, "{what}");
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() <= 1e-6, "{what}: log-prob {p} vs {q}");
        }
    }
}

/// Our templating and tokenisation give exactly the embedded engine's prompt ids, on the tiny
/// models and on any real model cached in ~/.cache/orchestrator/models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_ids_equal_the_embedded_engines() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = vec![
        common::tiny_model(&tmp.path().join("llama"), &TinySpec::llama(3)),
        common::tiny_model(&tmp.path().join("qwen2"), &TinySpec::qwen2(4)),
    ];
    let cache = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/orchestrator/models"));
    match cache.as_ref().and_then(|c| std::fs::read_dir(c).ok()) {
        Some(rd) => {
            for e in rd.flatten() {
                let p = e.path();
                if p.join("tokenizer.json").is_file() && p.join("config.json").is_file() {
                    dirs.push(p);
                }
            }
        }
        None => println!("note: no ~/.cache/orchestrator/models: compared on the tiny models only"),
    }
    let conversations: Vec<Vec<ChatMessage>> = vec![
        vec![ChatMessage::new(Role::User, "Write a short story about a lighthouse.")],
        vec![ChatMessage::new(Role::System, "You are terse."), ChatMessage::new(Role::User, "Describe the morning market, in detail: colours & voices <b>.")],
        vec![ChatMessage::new(Role::User, "  leading and trailing spaces  \n\nand newlines\n")],
        vec![ChatMessage::new(Role::User, "Ünïcödé — “quotes” 😀 and 'apostrophes'")],
    ];
    for dir in &dirs {
        let ours = PromptTemplate::load(dir).unwrap();
        let engine = embedded(dir).await;
        for (i, messages) in conversations.iter().enumerate() {
            let req = GenRequest { messages: messages.clone(), n: 1, seed: SeedKey::new(0, 0, i as u64) };
            let got = engine.generate(std::slice::from_ref(&req), &SamplingConfig::greedy(1)).await.unwrap();
            assert_eq!(ours.encode(messages).unwrap(), got[0][0].prompt_ids, "{}: conversation {i}", dir.display());
        }
        println!("prompt ids equal on {}", dir.display());
    }
}

/// Both dialects, a pool of 2: the same rollouts as the embedded engine for the same prompts and
/// seeds, and both servers get groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_generates_what_the_embedded_engine_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(3));
    let reqs = requests(6, 2, 41);
    let want = flat(embedded(&model).await.generate(&reqs, &sampling(20)).await.unwrap());
    for kind in [RemoteKind::Vllm, RemoteKind::Sglang] {
        let pool = servers(kind, &model, 2).await;
        let cfg = remote_cfg(kind, &pool, &tmp.path().join("export"), WeightPush::None);
        let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
        let got = flat(engine.generate(&reqs, &sampling(20)).await.unwrap());
        assert_same(&want, &got, &format!("{kind:?}"));
        for s in &pool {
            let c = s.counts();
            assert!(c.generations >= 2, "{kind:?}: a server got no group: {c:?}");
            assert_eq!(c.by_model.keys().cloned().collect::<Vec<_>>(), vec![SERVED.to_string()]);
        }
        assert_eq!(pool.iter().map(|s| s.counts().generations).sum::<usize>(), 12);
    }
}

fn lora_learner(model: &Path, is_correction: &str) -> Learner {
    let c = LearnerConfig {
        threads: 2,
        algorithm: Algorithm::Grpo,
        lr: 5e-2,
        lora: LoraConfig { enabled: true, rank: 4, alpha: 16.0, target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], ..LoraConfig::default() },
        is_correction: serde_json::from_value(serde_json::json!(is_correction)).unwrap(),
        ..LearnerConfig::default()
    };
    Learner::new(&c, model, 7).unwrap()
}

/// Rewards the shorter answer of each group: mixed outcomes, so an update moves the adapters.
fn trajectories(rs: &[Rollout]) -> Vec<Trajectory> {
    rs.iter()
        .map(|r| Trajectory {
            prompt_ids: r.prompt_ids.clone(),
            response_ids: r.ids.clone(),
            behaviour_logprobs: r.logprobs.clone(),
            reward: if r.ids.len() < 10 { 1.0 } else { (r.sample % 2) as f64 },
            group: r.request as u64,
        })
        .collect()
}

fn max_ratio_gap(l: &Learner, rs: &[Rollout]) -> f32 {
    let seqs: Vec<(&[u32], &[u32])> = rs.iter().map(|r| (&r.prompt_ids[..], &r.ids[..])).collect();
    let ours = l.logprobs(&seqs, 1.0).unwrap();
    let mut worst = 0f32;
    for (r, lp) in rs.iter().zip(&ours) {
        assert_eq!(lp.len(), r.logprobs.len());
        for (a, b) in lp.iter().zip(&r.logprobs) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

/// LoRA pushes, both dialects: after a push the learner's ln p of the pool's rollouts equals
/// the behaviour ln p (ratio 1 within 1e-4); generating from stale weights (push skipped) makes
/// them differ and token-TIS engages; a server whose push fails is ejected and the others serve
/// only the new version; when its pushes work again it gets the current version before it
/// serves; the old version is unloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_pushes_keep_the_ratio_at_one_and_stale_weights_engage_token_tis() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(5));
    for kind in [RemoteKind::Vllm, RemoteKind::Sglang] {
        let export = tmp.path().join(format!("export-{kind:?}"));
        let pool = servers(kind, &model, 2).await;
        let cfg = remote_cfg(kind, &pool, &export, WeightPush::Lora);
        let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
        let mut learner = lora_learner(&model, "token-tis");
        let reqs = requests(4, 4, 3);

        // Step 1: train on the base model's rollouts, push v1, generate from it.
        let base = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        learner.update(&trajectories(&base), 1.0).unwrap();
        let v1 = export.join(version_name(1));
        std::fs::create_dir_all(&export).unwrap();
        learner.export_adapter(&v1).unwrap();
        engine.push(1, &v1).await.unwrap();
        assert_eq!(engine.serving(), version_name(1));
        let fresh = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        let gap = max_ratio_gap(&learner, &fresh);
        println!("{kind:?}: after a push, max |ln pi - ln mu| = {gap:.2e}");
        assert!(gap <= 1e-4, "{kind:?}: ratio off by {gap} after a push");
        assert!(max_ratio_gap(&learner, &base) > 1e-3, "the update changed nothing");
        for s in &pool {
            assert_eq!(s.loaded(), vec![version_name(1)], "{kind:?}");
        }

        // Step 2 without a push: the pool still serves v1, the learner moved on.
        let stats_fresh = learner.update(&trajectories(&fresh), 1.0).unwrap();
        let stale = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        let gap = max_ratio_gap(&learner, &stale);
        assert!(gap > 1e-3, "{kind:?}: stale rollouts match the learner ({gap})");
        let stats_stale = learner.update(&trajectories(&stale), 1.0).unwrap();
        println!(
            "{kind:?}: token-TIS on fresh rollouts: mismatch KL {:.2e}, clipped {:.3}; on stale ones: {:.2e}, {:.3}",
            stats_fresh.is_mismatch_kl, stats_fresh.is_clipped_share, stats_stale.is_mismatch_kl, stats_stale.is_clipped_share
        );
        assert!(stats_fresh.is_mismatch_kl < 1e-5 && stats_fresh.is_clipped_share == 0.0, "{stats_fresh:?}");
        assert!(stats_stale.is_mismatch_kl > 1e-3 && stats_stale.is_clipped_share > 0.0, "{stats_stale:?}");

        // A push that fails on one server: it is ejected, the other serves only v3 from then on.
        pool[0].set_fail_pushes(true);
        let before = pool[0].counts().generations;
        let v3 = export.join(version_name(3));
        learner.export_adapter(&v3).unwrap();
        engine.push(3, &v3).await.unwrap();
        let after = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        assert!(max_ratio_gap(&learner, &after) <= 1e-4);
        assert_eq!(pool[0].counts().generations, before, "{kind:?}: the server whose push failed still served");
        assert!(pool[1].counts().by_model.get(&version_name(3)).copied().unwrap_or(0) >= 16);
        assert_eq!(pool[1].loaded(), vec![version_name(3)], "{kind:?}: v1 is unloaded once nothing uses it");
        let stats = engine.server_stats();
        assert!(!stats[0].1 && stats[1].1, "{stats:?}");

        // Its pushes work again: the probe pushes v3, then admits it.
        pool[0].set_fail_pushes(false);
        let t0 = Instant::now();
        while !engine.server_stats()[0].1 {
            assert!(t0.elapsed() < Duration::from_secs(20), "{kind:?}: the server never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(pool[0].loaded().contains(&version_name(3)), "{kind:?}: admitted without the current version");
        let served_before = pool[0].counts().by_model;
        let again = flat(engine.generate(&requests(6, 2, 9), &sampling(12)).await.unwrap());
        assert!(max_ratio_gap(&learner, &again) <= 1e-4);
        let served_after = pool[0].counts().by_model;
        let new_on_0: usize = served_after.iter().map(|(k, v)| v - served_before.get(k).copied().unwrap_or(0)).sum();
        assert!(new_on_0 > 0, "{kind:?}: the readmitted server got nothing");
        assert_eq!(served_after.get(&version_name(1)), served_before.get(&version_name(1)), "{kind:?}: old weights served after rejoining");
    }
}

/// A server killed mid-step: its groups go to the other, every group arrives with the embedded
/// engine's rollouts; the server is ejected, and when it comes back on its port (fresh, no
/// adapters) it is probed, handed the current version and used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_step_is_replaced_and_a_restarted_one_rejoins() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(3));
    let reqs = requests(6, 2, 17);
    let want = flat(embedded(&model).await.generate(&reqs, &sampling(16)).await.unwrap());
    for kind in [RemoteKind::Vllm, RemoteKind::Sglang] {
        let pool = servers(kind, &model, 2).await;
        let cfg = remote_cfg(kind, &pool, &tmp.path().join("export"), WeightPush::None);
        let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
        pool[0].set_die_after(Some(3));
        let got = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        assert_same(&want, &got, &format!("{kind:?} with a server killed mid-step"));
        assert!(got.iter().all(|r| r.finish_reason != FinishReason::Canceled));
        assert!(pool[0].is_killed());
        assert!(!engine.server_stats()[0].1, "{kind:?}: the dead server is still in rotation");

        let port = pool[0].port();
        let opts = PoolServerOptions { engine: serial(), ..PoolServerOptions::new(dialect(kind), &model, SERVED) };
        let back = PoolServer::start_on(opts, port).await.unwrap();
        let t0 = Instant::now();
        while !engine.server_stats()[0].1 {
            assert!(t0.elapsed() < Duration::from_secs(20), "{kind:?}: the restarted server never rejoined");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        assert_same(&want, &got, &format!("{kind:?} after the rejoin"));
        assert!(back.counts().generations > 0, "{kind:?}: the rejoined server got nothing");
    }
}

/// A slow server gets fewer groups; with every server dead the groups come back canceled and
/// the step is short of `min_groups_share`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_gets_fewer_groups_and_a_dead_pool_is_a_short_step() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(3));
    let pool = servers(RemoteKind::Vllm, &model, 2).await;
    pool[0].set_delay(Duration::from_millis(400));
    let mut cfg = remote_cfg(RemoteKind::Vllm, &pool, &tmp.path().join("export"), WeightPush::None);
    cfg.max_in_flight_per_server = 2;
    let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
    let reqs = requests(6, 2, 5);
    let mut reqs2 = reqs.clone();
    for (i, r) in reqs2.iter_mut().enumerate() {
        r.seed = SeedKey::new(6, 1, i as u64);
    }
    engine.generate(&[reqs, reqs2].concat(), &sampling(8)).await.unwrap();
    let stats = engine.server_stats();
    println!("groups per server: {stats:?}");
    assert!(stats[0].2 < stats[1].2, "the slow server got as many groups: {stats:?}");

    pool[0].kill().await;
    pool[1].kill().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let err = engine.generate_into(&requests(3, 2, 1), &sampling(8), tx).await.unwrap_err();
    assert!(err.downcast_ref::<orchestrator::engine::remote::PoolShort>().is_some(), "{err:#}");
    assert!(format!("{err}").contains("0 of 3 prompt groups"), "{err}");
    let mut canceled = 0;
    while let Some(r) = rx.recv().await {
        assert_eq!(r.finish_reason, FinishReason::Canceled);
        assert!(r.ids.is_empty() && !r.prompt_ids.is_empty());
        canceled += 1;
    }
    assert_eq!(canceled, 6);
}

/// The API key goes in the Authorization header: without it the servers refuse (401), a
/// missing variable is an error naming the variable, and no error carries the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_sent_and_never_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(3));
    let secret = "sk-pool-5be1c0ffee5be1c0ffee";
    let opts = PoolServerOptions { engine: serial(), api_key: Some(secret.into()), ..PoolServerOptions::new(Dialect::Vllm, &model, SERVED) };
    let pool = vec![PoolServer::start(opts).await.unwrap()];
    let mut cfg = remote_cfg(RemoteKind::Vllm, &pool, &tmp.path().join("export"), WeightPush::None);
    cfg.api_key_env = "ORCH_REMOTE_TEST_KEY_UNSET".into();
    let e = format!("{:#}", RemoteEngine::connect(&cfg, &model, None).await.err().unwrap());
    assert!(e.contains("ORCH_REMOTE_TEST_KEY_UNSET") && e.contains("engine.remote.api_key_env"), "{e}");
    // A wrong key: refused, and the error shows neither key.
    cfg.api_key_env = "ORCH_REMOTE_TEST_WRONG_KEY".into();
    std::env::set_var("ORCH_REMOTE_TEST_WRONG_KEY", "sk-wrong-0123456789");
    let e = format!("{:#}", RemoteEngine::connect(&cfg, &model, None).await.err().unwrap());
    assert!(e.contains("401") && !e.contains("sk-wrong") && !e.contains(secret), "{e}");
    cfg.api_key_env = "ORCH_REMOTE_TEST_KEY".into();
    std::env::set_var("ORCH_REMOTE_TEST_KEY", secret);
    let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
    let got = engine.generate(&requests(2, 1, 1), &sampling(4)).await.unwrap();
    assert_eq!(got.len(), 2);
}

/// Waits for a child run to exit, with its stderr.
async fn finish(child: tokio::process::Child) -> (i32, String) {
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output()).await.expect("run finishes").unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

fn spawn_run(config: &Path, run_dir: &Path, key: &str) -> tokio::process::Child {
    tokio::process::Command::new(common::bin())
        .arg("run")
        .arg(config)
        .arg("--run-dir")
        .arg(run_dir)
        .env("ORCH_POOL_KEY", key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn orchestrator run")
}

/// `orchestrator run` with `backend = "remote"` on a pool of 2 (LoRA pushes, token-TIS, an API
/// key): runs to the end; killed with SIGKILL mid-run and resumed, it finishes every step once,
/// the resumed process pushes the version its checkpoint served before generating, and the key
/// is nowhere in the run directory or the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_run_on_a_pool_killed_with_sigkill_and_resumed() {
    use orchestrator::metrics::read_jsonl;
    use orchestrator::testkit::letters::more_a_judge;
    use orchestrator::testkit::scripted::ScriptedServer;

    let s = common::RunSetup::new(4);
    let judge = ScriptedServer::start(more_a_judge()).await.unwrap();
    let secret = "sk-pool-e2e-0f1e2d3c4b5a69788796a5b4";
    let mut pool = Vec::new();
    for _ in 0..2 {
        let opts = PoolServerOptions { engine: serial(), api_key: Some(secret.into()), ..PoolServerOptions::new(Dialect::Vllm, &s.model, SERVED) };
        pool.push(PoolServer::start(opts).await.unwrap());
    }
    let run = "steps = 6\nbatch_prompts = 2\nn_samples = 2\nsave_every = 1\nkeep_last = 2";
    let lora = "is_correction = \"token-tis\"\n[learner.lora]\nenabled = true\nrank = 4\nalpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";
    let config = s.config("remote", &judge.base_url(), run, lora);
    let servers: Vec<String> = pool.iter().map(|p| format!("{:?}", p.base_url())).collect();
    let text = std::fs::read_to_string(&config).unwrap().replace("[engine]\n", "[engine]\nbackend = \"remote\"\n")
        + &format!(
            "\n[engine.remote]\nkind = \"vllm\"\nservers = [{}]\nmodel = \"{SERVED}\"\napi_key_env = \"ORCH_POOL_KEY\"\n\
             export_dir = \"exports\"\nmax_in_flight_per_server = 4\nprobe_interval_secs = 0.2\nconnect_timeout_secs = 2\n",
            servers.join(", ")
        );
    std::fs::write(&config, text).unwrap();

    let straight = s.path("runs/straight");
    let (code, err) = finish(spawn_run(&config, &straight, secret)).await;
    assert_eq!(code, 0, "{err}");
    let m = read_jsonl(&straight.join("metrics.jsonl")).unwrap();
    assert_eq!(m.len(), 6);
    for r in &m {
        assert_eq!(r["canceled"], 0, "{r}");
        assert!(r["is_mismatch_kl"].as_f64().unwrap() < 1e-6, "a pushed version's ratio is 1: {r}");
    }
    for p in &pool {
        assert_eq!(p.loaded(), vec![version_name(6)], "old versions unloaded, the last one served");
        assert!(p.counts().by_model.keys().any(|k| k == &version_name(5)), "{:?}", p.counts());
    }

    // SIGKILL once a checkpoint past step 2 exists, then resume to the end.
    let crashed = s.path("runs/crashed");
    let mut child = spawn_run(&config, &crashed, secret);
    let t0 = Instant::now();
    loop {
        let n = read_jsonl(&crashed.join("metrics.jsonl")).map(|m| m.len()).unwrap_or(0);
        if n >= 3 {
            child.start_kill().unwrap();
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(240), "the run never reached step 3");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the run ended before it was killed: {st}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.wait().await;
    let pushes_before: usize = pool.iter().map(|p| p.counts().pushes_ok).sum();
    let (code, err) = finish(spawn_run(&config, &crashed, secret)).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed from"), "{err}");
    assert!(err.contains("admitted (serving policy-v"), "the resumed run pushed its served version first: {err}");
    let m = read_jsonl(&crashed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = m.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "a step missing or repeated");
    // Serial servers and per-sample seeds: the resumed run is the uninterrupted one, step by step.
    let a = read_jsonl(&straight.join("metrics.jsonl")).unwrap();
    let timing = |k: &str| k.starts_with("t_") || k.ends_with("_per_s") || k.starts_with("judge_latency") || k == "timestamp" || k == "sync_bytes";
    for (x, y) in a.iter().zip(&m) {
        for (k, v) in x.as_object().unwrap() {
            if !timing(k) {
                assert_eq!(v, &y[k], "step {}: {k} differs after SIGKILL and resume", x["step"]);
            }
        }
    }
    let learner = |d: &Path| std::fs::read(d.join("checkpoints/step-000006/learner/trainable.safetensors")).unwrap();
    assert!(learner(&straight) == learner(&crashed), "the final adapters differ after SIGKILL and resume");
    assert!(pool.iter().map(|p| p.counts().pushes_ok).sum::<usize>() > pushes_before);
    for p in &pool {
        assert_eq!(p.loaded(), vec![version_name(6)]);
    }

    for dir in [&straight, &crashed] {
        assert!(common::assert_secret_in_no_file(dir, secret) > 10);
    }
    assert!(!err.contains(secret));
}

/// SGLang full-weight pushes (`weight_push = "disk"`): the learner's HF export, reloaded by
/// `update_weights_from_disk`, serves the learner's policy (ratio 1 within 1e-4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_disk_pushes_serve_the_learners_full_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::qwen2(8));
    let export = tmp.path().join("export");
    let pool = servers(RemoteKind::Sglang, &model, 2).await;
    let cfg = remote_cfg(RemoteKind::Sglang, &pool, &export, WeightPush::Disk);
    let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
    let mut learner = Learner::new(&LearnerConfig { threads: 2, algorithm: Algorithm::Grpo, lr: 2e-2, ..LearnerConfig::default() }, &model, 3).unwrap();
    let reqs = requests(4, 4, 8);
    let base = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
    learner.update(&trajectories(&base), 1.0).unwrap();
    assert!(max_ratio_gap(&learner, &base) > 1e-3, "the update changed nothing");
    let (dir, _) = orchestrator::trainer::sync::export_to(&learner, &export, &version_name(1)).unwrap();
    engine.push(1, &dir).await.unwrap();
    let fresh = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
    let gap = max_ratio_gap(&learner, &fresh);
    println!("sglang disk push: max |ln pi - ln mu| = {gap:.2e}");
    assert!(gap <= 1e-4, "ratio off by {gap} after a disk push");
    for s in &pool {
        assert_eq!(s.counts().pushes_ok, 1);
        assert!(s.loaded().is_empty(), "a disk push loads no adapter");
    }
}

/// Every server gone mid-run: the step cannot get `min_groups_share` of its groups, so the run
/// checkpoints the last finished step and exits with an error naming the setting; with the
/// servers back on their ports it resumes and finishes every step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_pool_dies_checkpoints_stops_and_resumes() {
    pool_dies_then_resume(0).await;
}

/// One-step-off: the pool dies while the next step's rollouts are made alongside the update; the
/// step being trained still ends with a checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_step_off_run_whose_pool_dies_checkpoints_the_trained_step_and_resumes() {
    pool_dies_then_resume(1).await;
}

async fn pool_dies_then_resume(off: u64) {
    use orchestrator::metrics::read_jsonl;
    use orchestrator::testkit::letters::more_a_judge;
    use orchestrator::testkit::scripted::ScriptedServer;

    let s = common::RunSetup::new(4);
    let judge = ScriptedServer::start(more_a_judge()).await.unwrap();
    let pool = servers(RemoteKind::Sglang, &s.model, 2).await;
    let run = format!("steps = 5\nbatch_prompts = 2\nn_samples = 2\nsave_every = 10\nmax_off_policy_steps = {off}");
    let config = s.config(&format!("dies{off}"), &judge.base_url(), &run, "[learner.lora]\nenabled = true\nrank = 4\n");
    let servers: Vec<String> = pool.iter().map(|p| format!("{:?}", p.base_url())).collect();
    let text = std::fs::read_to_string(&config).unwrap().replace("[engine]\n", "[engine]\nbackend = \"remote\"\n")
        + &format!(
            "\n[engine.remote]\nkind = \"sglang\"\nservers = [{}]\nmodel = \"{SERVED}\"\nexport_dir = \"exports-dies{off}\"\n\
             max_in_flight_per_server = 4\nprobe_interval_secs = 0.2\nconnect_timeout_secs = 1\nmax_group_retries = 1\n",
            servers.join(", ")
        );
    std::fs::write(&config, text).unwrap();
    let dir = s.path(&format!("runs/dies{off}"));
    let child = spawn_run(&config, &dir, "");
    let t0 = Instant::now();
    while read_jsonl(&dir.join("metrics.jsonl")).map(|m| m.len()).unwrap_or(0) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(240), "the run never reached step 2");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ports: Vec<u16> = pool.iter().map(|p| p.port()).collect();
    for p in &pool {
        p.kill().await;
    }
    let (code, err) = finish(child).await;
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("engine.remote.min_groups_share") && err.contains("resume once the pool is back"), "{err}");
    if off == 1 {
        // The pool died while the next step's rollouts were made beside the update.
        assert!(err.contains("stopped after step"), "{err}");
    }
    let done = read_jsonl(&dir.join("metrics.jsonl")).unwrap().len() as u64;
    assert!(dir.join(format!("checkpoints/step-{done:06}")).is_dir(), "no checkpoint of step {done}: {err}");

    let mut back = Vec::new();
    for port in ports {
        let opts = PoolServerOptions { engine: serial(), ..PoolServerOptions::new(Dialect::Sglang, &s.model, SERVED) };
        back.push(PoolServer::start_on(opts, port).await.unwrap());
    }
    let (code, err) = finish(spawn_run(&config, &dir, "")).await;
    assert_eq!(code, 0, "{err}");
    let steps: Vec<u64> = read_jsonl(&dir.join("metrics.jsonl")).unwrap().iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=5).collect::<Vec<_>>(), "a step missing or repeated");
    // One-step-off syncs a step's weights only once the next step's rollouts exist: the last
    // step's never go out.
    let last = version_name(5 - off);
    assert!(back.iter().all(|p| p.loaded() == vec![last.clone()]), "{:?}", back.iter().map(|p| p.loaded()).collect::<Vec<_>>());
}
