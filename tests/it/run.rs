//! `orchestrator run` end to end: a real mistral.rs engine and tch learner on a tiny model, a
//! real HTTP judge on 127.0.0.1, real files. Most runs are child processes so they can be killed.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orchestrator::testkit::scripted::{Behavior, ScriptedServer};
use orchestrator::metrics::read_jsonl;
use orchestrator::testkit::letters::more_a_judge;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use common::RunSetup as Setup;

/// A child `orchestrator run` whose stderr lines are collected as they come.
struct Child {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<String>>,
}

fn spawn(config: &Path, run_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = tokio::process::Command::new(common::bin());
    cmd.arg("run").arg(config).arg("--run-dir").arg(run_dir).args(extra_args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn orchestrator run");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stdout = Arc::new(Mutex::new(String::new()));
    let (l, o) = (lines.clone(), stdout.clone());
    let err = child.stderr.take().unwrap();
    let out = child.stdout.take().unwrap();
    tokio::spawn(async move {
        let mut r = BufReader::new(err).lines();
        while let Ok(Some(line)) = r.next_line().await {
            l.lock().unwrap().push(line);
        }
    });
    tokio::spawn(async move {
        let mut r = BufReader::new(out).lines();
        while let Ok(Some(line)) = r.next_line().await {
            let mut s = o.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    Child { child, lines, stdout }
}

impl Child {
    async fn wait(mut self) -> (i32, String, String) {
        let status = tokio::time::timeout(Duration::from_secs(300), self.child.wait()).await.expect("run finishes").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let err = self.lines.lock().unwrap().join("\n");
        let out = self.stdout.lock().unwrap().clone();
        (status.code().unwrap_or(-1), out, err)
    }
    fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

async fn run_to_end(config: &Path, run_dir: &Path, args: &[&str]) -> (i32, String, String) {
    spawn(config, run_dir, args, &[]).wait().await
}

fn steps_of(metrics: &[Value]) -> Vec<u64> {
    metrics.iter().map(|v| v["step"].as_u64().unwrap()).collect()
}

/// A metrics line without the fields that measure time.
fn deterministic_part(v: &Value) -> BTreeMap<String, Value> {
    v.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !(k.starts_with("t_") || k.ends_with("_per_s") || k.contains("latency") || *k == "timestamp"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn sha(p: &Path) -> String {
    orchestrator::checkpoint::sha256_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).0
}

/// A judge that prefers more 'a' and answers 503 to the requests (counted from 0 by the
/// returned counter, which the test may reset) for which `down` holds.
async fn judge_down_when(down: impl Fn(usize) -> bool + Send + Sync + 'static) -> (ScriptedServer, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let judge = more_a_judge();
    let server = ScriptedServer::start(Behavior::rule(move |_| {
        if down(c.fetch_add(1, Ordering::SeqCst)) {
            Behavior::unavailable(None)
        } else {
            judge.clone()
        }
    }))
    .await
    .unwrap();
    (server, count)
}

/// Turns the test config's breaker on: open after `failures`, probe again after `cooldown_secs`.
fn with_breaker(config: &Path, failures: u32, cooldown_secs: f64) {
    let text = std::fs::read_to_string(config).unwrap().replace(
        "breaker_failures = 0",
        &format!("breaker_failures = {failures}\nbreaker_cooldown_secs = {cooldown_secs}"),
    );
    std::fs::write(config, text).unwrap();
}

fn samples(run_dir: &Path, step: u64) -> Vec<Value> {
    read_jsonl(&run_dir.join(format!("samples/step-{step:06}.jsonl"))).unwrap()
}

/// A step's samples without the judge calls' latencies (the one thing a rerun cannot repeat).
fn samples_timeless(run_dir: &Path, step: u64) -> Vec<Value> {
    samples(run_dir, step)
        .into_iter()
        .map(|mut x| {
            for c in x["calls"].as_array_mut().unwrap() {
                c.as_object_mut().unwrap().remove("latency_ms");
            }
            x
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_learns_what_the_judge_rewards_and_the_ladders_move() {
    let s = Setup::new(8);
    let server = ScriptedServer::start(more_a_judge()).await.unwrap();
    let run = "steps = 10\nbatch_prompts = 4\nn_samples = 4\nsave_every = 5";
    let config = s.config("learn", &server.base_url(), run, "");
    let run_dir = s.path("runs/learn");
    let opts = orchestrator::trainer::RunOptions {
        config,
        run_dir: Some(run_dir.clone()),
        resume: orchestrator::trainer::Resume::Auto,
        allow_config_change: vec![],
    };
    let ended = orchestrator::trainer::run(opts).await.unwrap();
    assert!(matches!(ended, orchestrator::trainer::Ended::Completed { step: 10, .. }), "{ended:?}");

    let m = read_jsonl(&run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), (1..=10).collect::<Vec<_>>());
    let reward = |r: std::ops::Range<usize>| r.clone().map(|i| m[i]["reward_mean"].as_f64().unwrap()).sum::<f64>() / r.len() as f64;
    let (first, last) = (reward(0..3), reward(7..10));
    // The letter count the judge rewards, straight from the responses.
    let a_rate = |steps: std::ops::RangeInclusive<u64>| {
        let (mut a, mut n) = (0usize, 0usize);
        for st in steps {
            for v in samples(&run_dir, st) {
                let text = v["response"].as_str().unwrap();
                a += text.matches('a').count();
                n += 1;
            }
        }
        a as f64 / n as f64
    };
    let (a_first, a_last) = (a_rate(1..=3), a_rate(8..=10));
    eprintln!("reward first 3 steps {first:.3}, last 3 {last:.3}; 'a' per response {a_first:.2} -> {a_last:.2}");
    // The references get harder as tasks climb, so a rising reward needs a policy that improves.
    assert!(last > first + 0.15, "mean reward did not rise: {first:.3} -> {last:.3}");
    assert!(a_last > 1.5 * a_first + 0.5, "responses did not gain the rewarded letter: {a_first:.2} -> {a_last:.2}");
    let advanced: u64 = m.iter().map(|v| v["advanced"].as_u64().unwrap()).sum();
    let levels: Vec<u64> = m[9]["levels"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert!(advanced >= 4 && levels[0] < 8, "ladders did not move: advanced {advanced}, levels {levels:?}");
    assert_eq!(levels.iter().sum::<u64>(), 8);
    for v in &m {
        assert_eq!(v["trained"], v["scored"], "every scored rollout is trained on");
        assert_eq!(v["rollouts"].as_u64(), Some(16));
        assert!(v["lr"].as_f64().unwrap() > 0.0 && v["entropy"].as_f64().unwrap() > 0.0);
        assert!(v["logprob_max_diff"].as_f64().unwrap() < 1e-3, "engine and learner disagree: {v}");
        assert!(v["sync_bytes"].as_u64().unwrap() > 0, "sync_every = 1 syncs every step");
    }
    // Samples name the task, its level, the verdict and the judge's text.
    let s1 = samples(&run_dir, 1);
    assert_eq!(s1.len(), 16);
    assert!(s1[0]["calls"][0]["judge_text"].as_str().unwrap().contains("Verdict"));
    assert!(s1[0]["task_id"].as_str().unwrap().starts_with('t') && s1[0]["level"].as_u64() == Some(0));
    // Checkpoints at 5 and 10, latest -> 10; only the newest export is left.
    let ck = run_dir.join("checkpoints");
    assert_eq!(std::fs::read_to_string(ck.join("latest")).unwrap().trim(), "step-000010");
    assert!(ck.join("step-000005/manifest.json").is_file());
    let exports: Vec<_> = std::fs::read_dir(run_dir.join("policy")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(exports.len(), 1, "{exports:?}");

    // `report` on this run's own metrics: every plot is a non-trivial PNG and the summary
    // carries the run's numbers.
    let report = orchestrator::report::run(&run_dir, None).unwrap();
    for (file, _) in orchestrator::report::PLOTS {
        let bytes = std::fs::read(report.join(file)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{file} is not a PNG");
        assert!(bytes.len() > 20_000, "{file} is only {} bytes", bytes.len());
    }
    let md = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(md.contains("10") && md.contains("reward"), "{md}");
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// As soon as the first judge request of this process arrives: the other rollouts are
    /// still generating.
    MidGeneration,
    /// With `k` requests seen and one in flight.
    MidJudge(usize),
    /// While a checkpoint's temporary directory exists.
    MidCheckpoint,
    After(Duration),
    /// SIGINT (not SIGKILL) as for `MidJudge(k)`: the run must checkpoint and exit 130.
    Interrupt(usize),
}

/// Sets `engine.serial = true` in a config written by [`Setup::config`]: generation then does
/// not depend on timing, so a resumed run can be compared with an uninterrupted one bit for bit.
fn serial_engine(config: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains("[engine]\n"));
    std::fs::write(config, text.replace("[engine]\n", "[engine]\nserial = true\n")).unwrap();
}

/// A judge preferring more 'a' after 100 ms, and a counter of the requests it has seen.
async fn counting_judge() -> (ScriptedServer, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let judge = more_a_judge();
    let server = ScriptedServer::start(Behavior::rule(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Behavior::delay(Duration::from_millis(100), judge.clone())
    }))
    .await
    .unwrap();
    (server, seen)
}

/// Runs `config` once straight through into `straight`, then into `crashed` killed (SIGKILL)
/// at each moment of `plan`, each time resumed by the next process, then to the end.
async fn straight_and_killed(
    config: &Path,
    straight: &Path,
    crashed: &Path,
    server: &ScriptedServer,
    seen: &AtomicUsize,
    plan: &[Kill],
) {
    let (code, _, err) = run_to_end(config, straight, &[]).await;
    assert_eq!(code, 0, "{err}");
    let mut landed = Vec::new();
    for &kill in plan {
        let start_requests = seen.load(Ordering::SeqCst);
        let mut child = spawn(config, crashed, &[], &[]);
        let t0 = Instant::now();
        let hit = loop {
            if let Ok(Some(_)) = child.child.try_wait() {
                break false;
            }
            let got = seen.load(Ordering::SeqCst) - start_requests;
            let fire = match kill {
                Kill::MidGeneration => got >= 1,
                Kill::MidJudge(k) | Kill::Interrupt(k) => got >= k && server.in_flight() > 0,
                Kill::MidCheckpoint => std::fs::read_dir(crashed.join("checkpoints"))
                    .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with(".tmp-step-")))
                    .unwrap_or(false),
                Kill::After(d) => t0.elapsed() >= d,
            };
            if fire {
                match kill {
                    Kill::Interrupt(_) => assert_eq!(unsafe_kill(child.child.id().unwrap() as i32, 2), 0),
                    _ => child.child.start_kill().unwrap(), // SIGKILL
                }
                break true;
            }
            tokio::time::sleep(Duration::from_micros(300)).await;
        };
        let tail = child.stderr().lines().last().unwrap_or_default().to_string();
        let (code, out, err) = child.wait().await;
        if hit && matches!(kill, Kill::Interrupt(_)) {
            assert!(code == 130 && out.contains("Resume with"), "SIGINT: exit {code}\n{out}\n{err}");
        }
        landed.push(format!("{kill:?}: {} (last log: {tail})", if hit { "killed" } else { "finished first" }));
        if !hit {
            assert_eq!(code, 0);
            break;
        }
    }
    eprintln!("kills:\n  {}", landed.join("\n  "));
    let want = (plan.len() * 4).div_ceil(7);
    assert!(landed.iter().filter(|l| l.contains("killed")).count() >= want, "too few kills landed: {landed:?}");
    let (code, _, err) = run_to_end(config, crashed, &[]).await;
    assert_eq!(code, 0, "{err}");
}

/// `engine.serial = true`: one sequence in flight, so generation does not depend on timing and
/// a run killed at any moment and resumed equals an uninterrupted one bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_then_resume_bit_exact() {
    let s = Setup::new(6);
    let (server, seen) = counting_judge().await;
    // sync_every 3 and save_every 2: some checkpoints hold an engine export older than the learner.
    let run = "steps = 16\nbatch_prompts = 2\nn_samples = 3\nsync_every = 3\nsave_every = 2\nkeep_last = 2\njudge_concurrency = 4";
    let config = s.config("kill", &server.base_url(), run, "[learner.lora]\nenabled = false\n");
    serial_engine(&config);

    let (straight, crashed) = (s.path("runs/straight"), s.path("runs/crashed"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let plan = [
        Kill::MidGeneration,
        Kill::MidJudge(3),
        Kill::MidCheckpoint,
        Kill::After(Duration::from_millis(rng.random_range(300..1500))),
        Kill::MidJudge(rng.random_range(2..6)),
        Kill::MidCheckpoint,
        Kill::After(Duration::from_millis(rng.random_range(300..1500))),
    ];
    straight_and_killed(&config, &straight, &crashed, &server, &seen, &plan).await;

    let (a, b) = (read_jsonl(&straight.join("metrics.jsonl")).unwrap(), read_jsonl(&crashed.join("metrics.jsonl")).unwrap());
    assert_eq!(steps_of(&b), (1..=16).collect::<Vec<_>>(), "a step missing or repeated");
    for (x, y) in a.iter().zip(&b) {
        // Same rewards, verdicts, ladder moves, losses: the same training, step by step.
        assert_eq!(deterministic_part(x), deterministic_part(y), "step {} differs", x["step"]);
    }
    let last = |d: &Path| d.join("checkpoints/step-000016");
    for f in ["learner/trainable.safetensors", "learner/optimizer.safetensors", "trainer.json"] {
        if f == "trainer.json" {
            let (x, y) = (
                serde_json::from_str::<Value>(&std::fs::read_to_string(last(&straight).join(f)).unwrap()).unwrap(),
                serde_json::from_str::<Value>(&std::fs::read_to_string(last(&crashed).join(f)).unwrap()).unwrap(),
            );
            assert_eq!(x["curriculum"], y["curriculum"]);
            assert_eq!(x["sampler"], y["sampler"]);
        } else {
            assert_eq!(sha(&last(&straight).join(f)), sha(&last(&crashed).join(f)), "{f} differs after kills");
        }
    }
    for st in 1..=16 {
        assert_eq!(samples_timeless(&straight, st), samples_timeless(&crashed, st), "samples of step {st}");
    }
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Batched (the default): which sequences share a decode step depends on timing, so tokens may
/// differ from an uninterrupted run in the last bits (README, "Batching and reproducibility").
/// What a resume must still guarantee: every step once with all its rollouts, the same prompts
/// per step, ladders continuing from where they were, and the learner's and optimizer's counters
/// counting every update once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_batched_then_resume_loses_nothing() {
    let s = Setup::new(6);
    let (server, seen) = counting_judge().await;
    let steps = 8u64;
    let run = format!(
        "steps = {steps}\nbatch_prompts = 2\nn_samples = 3\nsync_every = 3\nsave_every = 2\nkeep_last = 2\njudge_concurrency = 4"
    );
    let config = s.config("batched", &server.base_url(), &run, "[learner.lora]\nenabled = false\n");
    assert!(!std::fs::read_to_string(&config).unwrap().contains("serial"));
    let (straight, crashed) = (s.path("runs/straight"), s.path("runs/crashed"));
    let plan = [Kill::MidGeneration, Kill::MidJudge(4), Kill::MidCheckpoint, Kill::After(Duration::from_millis(900))];
    straight_and_killed(&config, &straight, &crashed, &server, &seen, &plan).await;

    let b = read_jsonl(&crashed.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&b), (1..=steps).collect::<Vec<_>>(), "a step missing or repeated");
    // Ladders: each step's level histogram is the previous one moved up by its advances, across
    // every resume (a lost or stale curriculum would break the chain).
    let level_sum = |v: &Value| -> u64 {
        v["levels"].as_array().unwrap().iter().enumerate().map(|(l, n)| l as u64 * n.as_u64().unwrap()).sum()
    };
    let mut before = 0;
    for v in &b {
        assert_eq!(v["rollouts"].as_u64(), Some(6), "{v}");
        assert_eq!(v["trained"], v["scored"], "{v}");
        assert_eq!(v["levels"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum::<u64>(), 6);
        assert_eq!(level_sum(v), before + v["advanced"].as_u64().unwrap(), "ladders at step {}", v["step"]);
        before = level_sum(v);
    }
    for st in 1..=steps {
        let (x, y) = (samples(&straight, st), samples(&crashed, st));
        assert_eq!(y.len(), 6, "rollouts of step {st}");
        let tasks = |v: &[Value]| v.iter().map(|r| r["task_id"].clone()).collect::<Vec<_>>();
        assert_eq!(tasks(&x), tasks(&y), "prompts of step {st}");
    }
    let last = |d: &Path| d.join(format!("checkpoints/step-{steps:06}"));
    let (x, y) = (json(&last(&straight).join("trainer.json")), json(&last(&crashed).join("trainer.json")));
    assert_eq!(x["sampler"], y["sampler"], "sampler cursor");
    let levels = y["curriculum"]["levels"].as_object().unwrap();
    let total: u64 = levels.values().map(|l| l.as_u64().unwrap()).sum();
    assert_eq!(total, level_sum(b.last().unwrap()), "checkpointed ladders vs the last step's histogram");
    let (x, y) = (json(&last(&straight).join("learner/learner.json")), json(&last(&crashed).join("learner/learner.json")));
    let updates = b.iter().filter(|v| v["trained"].as_u64().unwrap() > 0).count() as u64;
    assert_eq!(y["updates"].as_u64(), Some(updates), "one learner update per trained step");
    assert_eq!(x["optimizer_steps"], y["optimizer_steps"], "optimizer steps");
    assert!(std::fs::read_dir(crashed.join("checkpoints"))
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(".tmp-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_newest_checkpoint_resumes_from_the_previous_one() {
    let s = Setup::new(4);
    let server = ScriptedServer::start(more_a_judge()).await.unwrap();
    let run = "steps = 4\nbatch_prompts = 2\nn_samples = 2\nsave_every = 2";
    let config = s.config("corrupt", &server.base_url(), run, "");
    // Redone steps must equal the lost ones bit for bit: one sequence at a time.
    serial_engine(&config);
    let dir = s.path("runs/corrupt");
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 0, "{err}");
    let want = sha(&dir.join("checkpoints/step-000004/learner/trainable.safetensors"));
    let before = read_jsonl(&dir.join("metrics.jsonl")).unwrap();

    // Truncate the newest checkpoint's weights and drop the last metrics lines, as a crash
    // mid-write would.
    let victim = dir.join("checkpoints/step-000004/learner/trainable.safetensors");
    let len = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&victim).unwrap().set_len(len / 2).unwrap();
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: skipping checkpoint") && err.contains("step-000004") && err.contains("checksum"), "{err}");
    assert!(err.contains("resumed from") && err.contains("step-000002"), "{err}");
    let after = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&after), vec![1, 2, 3, 4]);
    for (x, y) in before.iter().zip(&after) {
        assert_eq!(deterministic_part(x), deterministic_part(y));
    }
    assert_eq!(sha(&victim), want, "steps 3-4 redone give the same weights");
    orchestrator::checkpoint::Checkpoints::verify(&dir.join("checkpoints/step-000004")).expect("rewritten checkpoint verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judge_outage_leaves_rollouts_unscored_or_stops_the_run() {
    let s = Setup::new(4);
    // Requests 6..18 fail with 503: a window inside the run.
    let (server, count) = judge_down_when(|i| (6..18).contains(&i)).await;
    let run = "steps = 6\nbatch_prompts = 2\nn_samples = 2\nsave_every = 2";
    let config = s.config("outage", &server.base_url(), run, "");
    let dir = s.path("runs/outage");
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 0, "{err}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), (1..=6).collect::<Vec<_>>());
    let unscored: u64 = m.iter().map(|v| v["unscored"].as_u64().unwrap()).sum();
    assert_eq!(unscored, 12, "every failed call is an unscored rollout");
    for v in &m {
        let (sc, un) = (v["scored"].as_u64().unwrap(), v["unscored"].as_u64().unwrap());
        assert_eq!(sc + un, 4);
        assert_eq!(v["trained"].as_u64().unwrap(), sc, "trained only on scored rollouts: {v}");
        assert_eq!(v["wins"].as_u64().unwrap() + v["ties"].as_u64().unwrap() + v["losses"].as_u64().unwrap(), sc);
        if sc == 0 {
            assert!(v["reward_mean"].is_null() && v["kl"].is_null() && v["lr"].is_null(), "no update without scores: {v}");
            assert_eq!(v["skipped_groups"].as_u64(), Some(2));
        }
    }
    let reasons: Vec<String> = (1..=6)
        .flat_map(|st| samples(&dir, st))
        .filter(|v| v["reward"].is_null())
        .map(|v| v["unscored_reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons.len(), 12);
    assert!(reasons.iter().all(|r| r.contains("503")), "{reasons:?}");

    // With a breaker, the run stops with a checkpoint and a clear message instead.
    count.store(0, Ordering::SeqCst);
    let config = s.config("breaker", &server.base_url(), run, "");
    with_breaker(&config, 3, 30.0);
    let dir = s.path("runs/breaker");
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("judge unavailable") && err.contains("resume with"), "{err}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    let stopped_at = m.last().map(|v| v["step"].as_u64().unwrap()).unwrap_or(0);
    assert!(stopped_at < 6);
    if stopped_at > 0 {
        assert!(dir.join(format!("checkpoints/step-{stopped_at:06}/manifest.json")).is_file(), "checkpoint at the stop");
    }
    // The judge is back (the window has passed): resuming finishes the run.
    count.store(100, Ordering::SeqCst);
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(steps_of(&read_jsonl(&dir.join("metrics.jsonl")).unwrap()), (1..=6).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_mode_waits_for_the_judge_and_rejudges() {
    let s = Setup::new(4);
    let (server, _) = judge_down_when(|i| (4..10).contains(&i)).await;
    let run = "steps = 3\nbatch_prompts = 2\nn_samples = 2\non_judge_down = \"pause\"\njudge_down_max_wait_secs = 60";
    let config = s.config("pause", &server.base_url(), run, "");
    with_breaker(&config, 2, 0.3);
    let dir = s.path("runs/pause");
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("pausing"), "{err}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), vec![1, 2, 3]);
    // Rollouts refused while the breaker was open were asked again once it closed.
    let unscored: u64 = m.iter().map(|v| v["unscored"].as_u64().unwrap()).sum();
    assert!(unscored < 6, "pause re-asks the judge: {unscored} unscored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_paused_for_the_judge_checkpoints_and_resume_path_starts_a_new_history() {
    let s = Setup::new(4);
    // Up for the first 3 steps (2 x 2 rollouts each), then down until `recovered`.
    let recovered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = recovered.clone();
    let (server, _) = judge_down_when(move |i| i >= 12 && !up.load(Ordering::SeqCst)).await;
    let run = "steps = 6\nbatch_prompts = 2\nn_samples = 2\nsave_every = 1\nkeep_last = 5\non_judge_down = \"pause\"\njudge_down_max_wait_secs = 600";
    let config = s.config("paused", &server.base_url(), run, "");
    with_breaker(&config, 2, 5.0);
    let dir = s.path("runs/paused");
    let child = spawn(&config, &dir, &[], &[]);
    let t0 = Instant::now();
    while !child.stderr().contains("pausing") {
        assert!(t0.elapsed() < Duration::from_secs(120), "{}", child.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.child.id().unwrap() as i32;
    let t_signal = Instant::now();
    assert_eq!(unsafe_kill(pid, 15), 0);
    let (code, out, err) = child.wait().await;
    assert_eq!(code, 130, "an interrupted run must not look finished: {err}");
    assert!(t_signal.elapsed() < Duration::from_secs(20), "the pause ignored SIGTERM for {:?}", t_signal.elapsed());
    assert!(out.contains("Resume with"), "{out}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), vec![1, 2, 3], "the paused step is dropped, not trained on");
    assert_eq!(std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap().trim(), "step-000003");

    // Resuming from step 1 replaces steps 2-3: their checkpoints are set aside, not resumed
    // from later and not counted by pruning; metrics restart after step 1.
    recovered.store(true, Ordering::SeqCst);
    let older = dir.join("checkpoints/step-000001");
    let (code, _, err) = run_to_end(&config, &dir, &["--resume", older.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("newer than the resume point"), "{err}");
    for st in [2, 3] {
        assert!(dir.join(format!("checkpoints/abandoned-step-{st:06}/manifest.json")).is_file());
    }
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), (1..=6).collect::<Vec<_>>());
    assert_eq!(std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap().trim(), "step-000006");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_never_reaches_the_run_directory_or_logs() {
    let s = Setup::new(4);
    let server = ScriptedServer::start(more_a_judge()).await.unwrap();
    let run = "steps = 2\nbatch_prompts = 2\nn_samples = 2\nsave_every = 1";
    let config = s.config("secret", &server.base_url(), run, "");
    let text = std::fs::read_to_string(&config).unwrap().replace("api_key_env = \"\"", "api_key_env = \"ORCH_RUN_TEST_KEY\"");
    std::fs::write(&config, text).unwrap();
    let dir = s.path("runs/secret");
    let secret = "sk-test-7f3a9c1e5b2d4680aa11bb22cc33dd44";

    // Without the variable: a clear error before any model is loaded.
    let t0 = Instant::now();
    let (code, _, err) = spawn(&config, &dir, &[], &[]).wait().await;
    assert_ne!(code, 0);
    assert!(err.contains("ORCH_RUN_TEST_KEY") && err.contains("judge.openai.api_key_env"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(3));

    let (code, out, err) = spawn(&config, &dir, &[], &[("ORCH_RUN_TEST_KEY", secret)]).wait().await;
    assert_eq!(code, 0, "{err}");
    let auth = server.requests()[0].authorization.clone().unwrap();
    assert!(auth.contains(secret), "the key is sent to the judge");
    assert!(!out.contains(secret) && !err.contains(secret));
    let files = common::assert_secret_in_no_file(&dir, secret);
    assert!(files > 10, "checked {files} files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_errors_fail_fast_and_sigint_checkpoints() {
    let s = Setup::new(4);
    let server = ScriptedServer::start(Behavior::delay(Duration::from_millis(150), more_a_judge())).await.unwrap();
    let run = "steps = 40\nbatch_prompts = 2\nn_samples = 2\nsave_every = 100";
    let config = s.config("ops", &server.base_url(), run, "");
    let dir = s.path("runs/ops");

    // Config mistakes: named key, non-zero exit, well under a second, nothing created.
    let bad = s.path("bad.toml");
    std::fs::write(&bad, std::fs::read_to_string(&config).unwrap().replace("n_samples = 2", "n_samples = 0")).unwrap();
    let t0 = Instant::now();
    let (code, _, err) = run_to_end(&bad, &s.path("runs/bad"), &[]).await;
    assert!(code == 1 && err.contains("run.n_samples") && err.contains("bad.toml"), "{code}: {err}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(!s.path("runs/bad").exists());

    // SIGINT mid-run: exit 130 (not 0: a scheduler must tell it from a finished run), a checkpoint at the last finished step, and how to resume.
    let child = spawn(&config, &dir, &[], &[]);
    let t0 = Instant::now();
    while !child.stderr().contains("step 2/40") {
        assert!(t0.elapsed() < Duration::from_secs(120), "{}", child.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.child.id().unwrap() as i32;
    assert_eq!(unsafe_kill(pid, 2), 0);
    let (code, out, err) = child.wait().await;
    assert_eq!(code, 130, "{err}");
    assert!(out.contains("Resume with") && out.contains("--run-dir"), "{out}");
    let latest = std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap();
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    let last = m.last().unwrap()["step"].as_u64().unwrap();
    assert_eq!(latest.trim(), format!("step-{last:06}"));

    // --resume never over an existing run, and a changed config, are refused.
    let (code, _, err) = run_to_end(&config, &dir, &["--resume", "never"]).await;
    assert!(code != 0 && err.contains("already holds a run"), "{err}");
    let changed = std::fs::read_to_string(&config).unwrap().replace("lr = 2e-3", "lr = 5e-3").replace("steps = 40", "steps = 3");
    std::fs::write(&config, changed).unwrap();
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert!(code != 0 && err.contains("learner.lr: 0.002 -> 0.005") && err.contains("--allow-config-change"), "{err}");
    let (code, _, err) = run_to_end(&config, &dir, &["--allow-config-change", "run.steps"]).await;
    assert!(code != 0 && err.contains("learner.lr"), "{err}");
    // Allowed: it resumes and, with fewer steps than done, has nothing to do (or finishes).
    let (code, out, err) = run_to_end(&config, &dir, &["--allow-config-change", "run.steps,learner.lr"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("run complete"), "{out}");
}

/// `path` relative to `base` (both absolute), with `..` steps.
fn pathdiff(path: &Path, base: &Path) -> PathBuf {
    let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out
}

fn unsafe_kill(pid: i32, sig: i32) -> i32 {
    std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().map(|s| if s.success() { 0 } else { 1 }).unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_sync_writes_only_the_adapted_weights_and_the_engine_serves_them() {
    use orchestrator::engine::{Engine, GenRequest, MistralEngine, SamplingConfig, SeedKey};
    let s = Setup::new(4);
    // Prefers the shorter answer: mixed outcomes, so the update moves the adapters.
    let server = ScriptedServer::start(orchestrator::testkit::letters::shorter_judge()).await.unwrap();
    let run = "steps = 2\nbatch_prompts = 2\nn_samples = 4\nsave_every = 2";
    let lora = "[learner.lora]\nenabled = true\nrank = 4\nalpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";
    let config = s.config("lora", &server.base_url(), run, lora);
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap().replace("lr = 2e-3", "lr = 5e-2")).unwrap();
    let dir = s.path("runs/lora");
    let opts = orchestrator::trainer::RunOptions {
        config: config.clone(),
        run_dir: Some(dir.clone()),
        resume: orchestrator::trainer::Resume::Auto,
        allow_config_change: vec![],
    };
    orchestrator::trainer::run(opts).await.unwrap();

    let export = dir.join("policy/step-000002");
    let trained = orchestrator::learner::model::read_all(&export.join("model-00002-of-00002.safetensors")).unwrap();
    let names: Vec<&String> = trained.keys().collect();
    assert_eq!(names.len(), 4, "2 layers x (q_proj, v_proj): {names:?}");
    assert!(names.iter().all(|n| n.ends_with("q_proj.weight") || n.ends_with("v_proj.weight")), "{names:?}");
    let base = orchestrator::learner::model::read_all(&s.model.join("model.safetensors")).unwrap();
    assert!(trained.iter().any(|(n, t)| !t.allclose(&base[n], 0.0, 0.0, false)), "the adapters changed nothing");
    let frozen = orchestrator::learner::model::read_all(&export.join("model-00001-of-00002.safetensors")).unwrap();
    assert_eq!(frozen.len() + trained.len(), base.len());
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    let shard = std::fs::metadata(export.join("model-00002-of-00002.safetensors")).unwrap().len();
    let (first, second) = (m[0]["sync_bytes"].as_u64().unwrap(), m[1]["sync_bytes"].as_u64().unwrap());
    assert!(second >= shard && second < shard + 200_000, "a sync writes the adapted projections (+ config): {second} vs {shard}");
    assert!(first > second, "the frozen weights are written once, at the first sync");

    // The engine on the split export serves exactly the learner's merged weights, which is also
    // what `eval` gets when it is handed the run directory (its newest checkpoint, exported).
    let cfg = orchestrator::config::Config::load(&config).unwrap();
    let full = orchestrator::eval::resolve_model(&dir, &s.path("eval-models")).unwrap();
    assert_eq!(full.parent().unwrap(), s.path("eval-models"));
    assert!(full.file_name().unwrap().to_string_lossy().starts_with("lora-step-000002-"), "{}", full.display());
    // The checkpoint directory itself, named relative to the working directory, resolves alike.
    let ckpt = dir.join("checkpoints/step-000002");
    let rel = pathdiff(&ckpt, &std::env::current_dir().unwrap());
    assert_eq!(orchestrator::eval::resolve_model(&rel, &s.path("eval-models")).unwrap(), full);
    let merged = orchestrator::learner::model::read_all(&full.join("model.safetensors")).unwrap();
    assert_eq!(merged.len(), base.len());
    for (n, t) in &trained {
        assert!(t.equal(&merged[n]), "{n}: the split export and the checkpoint's merged export differ");
    }
    let e = format!("{:#}", orchestrator::eval::resolve_model(&s.path("runs"), &s.path("eval-models")).unwrap_err());
    assert!(e.contains("no config.json"), "{e}");
    let greedy = |path: PathBuf| {
        let mut model = cfg.model.clone();
        model.path = path;
        let engine_cfg = cfg.engine.clone();
        async move {
            let e = MistralEngine::load(&model, &engine_cfg).await.unwrap();
            let reqs: Vec<GenRequest> = ["a poem", "the sea", "a letter"]
                .iter()
                .enumerate()
                .map(|(i, p)| GenRequest {
                    messages: vec![orchestrator::engine::ChatMessage::new(orchestrator::engine::Role::User, *p)],
                    n: 1,
                    seed: SeedKey::new(0, 0, i as u64),
                })
                .collect();
            e.generate(&reqs, &SamplingConfig::greedy(12)).await.unwrap().into_iter().map(|g| g[0].ids.clone()).collect::<Vec<_>>()
        }
    };
    assert_eq!(greedy(export).await, greedy(full).await);
}

/// `run.max_off_policy_steps = 1` with the TIS correction, appended to a config's `[run]` and
/// `[learner]` by [`Setup::config`]'s arguments.
const OFF: &str = "max_off_policy_steps = 1";
const TIS: &str = "is_correction = \"token-tis\"\n";

/// One-step-off: every step once, its rollouts one step stale from step 2 on, the learner's
/// time spent while the next step's rollouts were made, and every rollout judged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_step_off_trains_on_rollouts_one_step_stale_while_the_next_are_made() {
    let s = Setup::new(6);
    // A slow judge, one call at a time: making a step's 6 rollouts takes >= 2.4 s, far longer
    // than a tiny model's update, so the whole update can hide behind it.
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let judge = more_a_judge();
    let server = ScriptedServer::start(Behavior::rule(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Behavior::delay(Duration::from_millis(400), judge.clone())
    }))
    .await
    .unwrap();
    let steps = 6u64;
    let run = format!("steps = {steps}\nbatch_prompts = 2\nn_samples = 3\nsave_every = 3\njudge_concurrency = 1\n{OFF}");
    let config = s.config("off", &server.base_url(), &run, &format!("lr = 2e-2\n{TIS}"));
    let dir = s.path("runs/off");
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("off-policy and uncorrected"), "token-tis is set: no warning\n{err}");

    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), (1..=steps).collect::<Vec<_>>(), "every step once");
    let off: Vec<u64> = m.iter().map(|v| v["off_policy_steps"].as_u64().unwrap()).collect();
    assert_eq!(off, vec![0, 1, 1, 1, 1, 1], "rollouts of step s come from v(s-2)");
    assert_eq!(seen.load(Ordering::SeqCst), (steps * 6) as usize, "every rollout judged once, none made twice");
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    for v in &m {
        let st = v["step"].as_u64().unwrap();
        assert_eq!(v["rollouts"].as_u64(), Some(6));
        assert!(f(v, "t_overlap") <= f(v, "t_learn") + 1e-9, "{v}");
        if st < steps {
            // The next step's rollouts were made alongside the whole update.
            assert!(f(v, "t_overlap") >= 0.8 * f(v, "t_learn") && f(v, "t_overlap") > 0.0, "step {st}: {v}");
            assert!(f(v, "t_generate") > 0.0, "step {st}: the next step's generation ran in this step: {v}");
        } else {
            assert_eq!(f(v, "t_overlap"), 0.0, "nothing is made ahead of the last step: {v}");
        }
        // Where the step's wall time went adds up.
        let parts = f(v, "t_generate") + f(v, "t_judge_tail") + f(v, "t_learn") - f(v, "t_overlap") + f(v, "t_sync")
            + v["t_checkpoint"].as_f64().unwrap_or(0.0)
            + f(v, "t_other");
        assert!((parts - f(v, "t_step")).abs() < 0.05 * f(v, "t_step") + 0.01, "step {st}: phases {parts} vs step {}", f(v, "t_step"));
    }
    // The engine sampled step 1 with the learner's own weights, later steps with older ones.
    assert!(f(&m[0], "logprob_max_diff") < 1e-3, "{}", m[0]);
    let stale = m[1..].iter().map(|v| f(v, "logprob_max_diff")).fold(0.0, f64::max);
    assert!(stale > 1e-3, "one-step-off rollouts match the learner's weights: max diff {stale}");
    // Off-policy metrics are in TensorBoard too (every numeric field is mirrored).
    let ev = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().contains("tfevents")).unwrap();
    let bytes = std::fs::read(ev).unwrap();
    for tag in ["off_policy_steps", "t_overlap"] {
        assert!(bytes.windows(tag.len()).any(|w| w == tag.as_bytes()), "{tag} not in the event file");
    }
    // The last step has no next step: its checkpoint holds no pending rollouts; the middle one does.
    assert!(dir.join("checkpoints/step-000003/pending.json").is_file());
    assert_eq!(json(&dir.join("checkpoints/step-000003/trainer.json"))["pending"].as_u64(), Some(4));
    assert!(!dir.join("checkpoints/step-000006/pending.json").exists());
}

/// One-step-off with `engine.serial = true`: killed with SIGKILL at random moments, and stopped
/// with SIGINT while the next step's rollouts were being made, the resumed run equals an
/// uninterrupted one bit for bit. A SIGINT checkpoint holds the weights the next step's
/// rollouts must come from (the engine's, one version behind the learner's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_step_off_kill_9_and_sigint_then_resume_bit_exact() {
    let s = Setup::new(6);
    let (server, seen) = counting_judge().await;
    let steps = 14u64;
    let run = format!("steps = {steps}\nbatch_prompts = 2\nn_samples = 3\nsync_every = 1\nsave_every = 3\nkeep_last = 3\njudge_concurrency = 4\n{OFF}");
    let config = s.config("offkill", &server.base_url(), &run, &format!("{TIS}[learner.lora]\nenabled = false\n"));
    serial_engine(&config);

    let (straight, crashed) = (s.path("runs/straight"), s.path("runs/crashed"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0ff1);
    // A process's first step makes its own 6 rollouts (requests 1-6), then the next step's
    // (7-12) alongside the update: Interrupt(8) lands there, so the checkpoint it writes has
    // no pending rollouts and the resumed run must make them on the same weights.
    let plan = [
        Kill::Interrupt(8),
        Kill::MidGeneration,
        Kill::MidJudge(9),
        Kill::MidCheckpoint,
        Kill::Interrupt(rng.random_range(14..17)),
        Kill::After(Duration::from_millis(rng.random_range(1500..3000))),
        Kill::MidJudge(rng.random_range(2..12)),
    ];
    straight_and_killed(&config, &straight, &crashed, &server, &seen, &plan).await;

    let (a, b) = (read_jsonl(&straight.join("metrics.jsonl")).unwrap(), read_jsonl(&crashed.join("metrics.jsonl")).unwrap());
    assert_eq!(steps_of(&b), (1..=steps).collect::<Vec<_>>(), "a step missing or repeated");
    let off: Vec<u64> = a.iter().map(|v| v["off_policy_steps"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=steps).map(|s| u64::from(s > 1)).collect();
    assert_eq!(off, want, "rollouts of step s come from v(s-2)");
    // A SIGINT during the next step's generation defers the engine's sync to the resumed run's
    // first step (see `trainer::offpolicy`): the same exports, counted one step later.
    let part = |v: &Value| {
        let mut p = deterministic_part(v);
        p.remove("sync_bytes");
        p
    };
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(part(x), part(y), "step {} differs", x["step"]);
    }
    let sync_bytes = |m: &[Value]| m.iter().map(|v| v["sync_bytes"].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sync_bytes(&a), sync_bytes(&b), "weight bytes synced");
    let last = |d: &Path| d.join(format!("checkpoints/step-{steps:06}"));
    for f in ["learner/trainable.safetensors", "learner/optimizer.safetensors"] {
        assert_eq!(sha(&last(&straight).join(f)), sha(&last(&crashed).join(f)), "{f} differs after kills");
    }
    let (x, y) = (json(&last(&straight).join("trainer.json")), json(&last(&crashed).join("trainer.json")));
    assert_eq!(x["curriculum"], y["curriculum"]);
    assert_eq!(x["sampler"], y["sampler"]);
    for st in 1..=steps {
        assert_eq!(samples_timeless(&straight, st), samples_timeless(&crashed, st), "samples of step {st}");
    }
}

/// SIGINT in a one-step-off run while the next step's rollouts are being made: exit 130, a
/// checkpoint without them whose engine weights are the ones they must come from, and a resume
/// that makes them there (still one step stale) and finishes every step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_step_off_sigint_checkpoints_the_weights_the_next_rollouts_need() {
    let s = Setup::new(4);
    let (server, seen) = counting_judge().await;
    let run = format!("steps = 5\nbatch_prompts = 2\nn_samples = 2\nsave_every = 100\njudge_concurrency = 1\n{OFF}");
    let config = s.config("offint", &server.base_url(), &run, TIS);
    let dir = s.path("runs/offint");
    let child = spawn(&config, &dir, &[], &[]);
    // Step 1: requests 1-4 (its own), 5-8 (step 2's, alongside the update); step 2: 9-12 are
    // step 3's, made on v(1) while the learner makes v(2).
    let t0 = Instant::now();
    while !(seen.load(Ordering::SeqCst) >= 10 && server.in_flight() > 0) {
        assert!(t0.elapsed() < Duration::from_secs(120), "{}", child.stderr());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(unsafe_kill(child.child.id().unwrap() as i32, 2), 0);
    let (code, out, err) = child.wait().await;
    assert_eq!(code, 130, "{err}");
    assert!(out.contains("Resume with"), "{out}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), vec![1, 2], "{err}");
    let ck = dir.join("checkpoints/step-000002");
    let state = json(&ck.join("trainer.json"));
    assert!(state.get("pending").is_none() && !ck.join("pending.json").exists(), "step 3's rollouts were not complete: {state}");
    assert_eq!(state["served_step"].as_u64(), Some(1), "the engine kept v(1), which step 3 is made with: {state}");
    assert!(ck.join("policy/config.json").is_file(), "the checkpoint holds the served export");

    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 0, "{err}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), vec![1, 2, 3, 4, 5]);
    let off: Vec<u64> = m.iter().map(|v| v["off_policy_steps"].as_u64().unwrap()).collect();
    assert_eq!(off, vec![0, 1, 1, 1, 1], "the resumed run keeps the schedule");
}

/// One-step-off with the judge going down while the next step's rollouts are judged: the step
/// being trained finishes, the next is dropped, a checkpoint is written and the run exits 3;
/// resumed with the judge back, it finishes every step once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_step_off_judge_down_stops_after_the_step_in_training() {
    let s = Setup::new(4);
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = up.clone();
    // Steps 1 and 2's rollouts (8 requests) are judged; step 3's fail until `up`.
    let (server, _) = judge_down_when(move |i| i >= 8 && !flag.load(Ordering::SeqCst)).await;
    let run = format!("steps = 4\nbatch_prompts = 2\nn_samples = 2\nsave_every = 100\n{OFF}");
    let config = s.config("offdown", &server.base_url(), &run, TIS);
    with_breaker(&config, 2, 30.0);
    let dir = s.path("runs/offdown");
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("judge unavailable") && err.contains("step 3"), "{err}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), vec![1, 2], "step 2 was trained while step 3 was judged; step 3 is dropped");
    assert_eq!(std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap().trim(), "step-000002");
    assert!(!dir.join("checkpoints/step-000002/pending.json").exists());

    up.store(true, Ordering::SeqCst);
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 0, "{err}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), vec![1, 2, 3, 4]);
    assert!(m.iter().all(|v| v["unscored"].as_u64() == Some(0)), "the dropped step was made again and judged");
    let off: Vec<u64> = m.iter().map(|v| v["off_policy_steps"].as_u64().unwrap()).collect();
    assert_eq!(off, vec![0, 1, 1, 1]);
}

/// `run.max_off_policy_steps` above 1 is refused with its key; 1 without TIS is warned about.
#[test]
fn max_off_policy_steps_is_checked_and_warned_about() {
    let s = Setup::new(2);
    let config = s.config("deep", "http://127.0.0.1:9", "steps = 2\nmax_off_policy_steps = 2", "");
    let e = format!("{:#}", orchestrator::config::Config::load(&config).unwrap_err());
    assert!(e.contains("run.max_off_policy_steps") && e.contains("got 2") && e.contains("deep.toml"), "{e}");
    let config = s.config("one", "http://127.0.0.1:9", "steps = 2\nmax_off_policy_steps = 1", "");
    let w = orchestrator::config::Config::load(&config).unwrap().warnings().join("\n");
    assert!(w.contains("run.max_off_policy_steps = 1") && w.contains("token-tis") && w.contains("1 updates"), "{w}");
    let config = s.config("tis", "http://127.0.0.1:9", "steps = 2\nmax_off_policy_steps = 1", TIS);
    assert!(orchestrator::config::Config::load(&config).unwrap().warnings().is_empty());
}

/// Judge tokens in the metrics are what the server reported, per step, per call and for the
/// run; with prices, costs too. A token budget stops the run after the step that reached it,
/// with a checkpoint and exit status 6; resumed as it is, it stops at once; resumed with a
/// higher budget, it finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judge_tokens_are_metered_and_a_token_budget_stops_the_run_until_raised() {
    let s = Setup::new(4);
    let server = ScriptedServer::start(more_a_judge()).await.unwrap();
    let run = "steps = 3\nbatch_prompts = 2\nn_samples = 2\nsave_every = 10";
    let config = s.config("meter", &server.base_url(), run, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "breaker_failures = 0",
        "breaker_failures = 0\nprice_prompt_per_mtok = 2.0\nprice_completion_per_mtok = 10.0",
    );
    std::fs::write(&config, text).unwrap();
    let dir = s.path("runs/meter");
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 0, "{err}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), vec![1, 2, 3]);
    let num = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    let (p, c): (u64, u64) = (m.iter().map(|v| num(v, "judge_prompt_tokens")).sum(), m.iter().map(|v| num(v, "judge_completion_tokens")).sum());
    assert_eq!((p, c), server.usage_reported());
    assert!(p > 0 && c > 0);
    let mut total = 0;
    let mut cost_total = 0.0;
    for v in &m {
        let (sp, sc) = (num(v, "judge_prompt_tokens"), num(v, "judge_completion_tokens"));
        total += sp + sc;
        assert_eq!(num(v, "judge_tokens_total"), total, "{v}");
        assert_eq!(num(v, "judge_usage_missing"), 0);
        let cost = v["judge_cost"].as_f64().unwrap();
        assert!((cost - (sp as f64 * 2.0 + sc as f64 * 10.0) / 1e6).abs() < 1e-12, "{v}");
        cost_total += cost;
        assert!((v["judge_cost_total"].as_f64().unwrap() - cost_total).abs() < 1e-12, "{v}");
        // Each call's tokens are in the samples log.
        let calls: Vec<Value> = samples(&dir, num(v, "step")).iter().flat_map(|x| x["calls"].as_array().unwrap().clone()).collect();
        assert_eq!(calls.iter().map(|c| num(c, "prompt_tokens")).sum::<u64>(), sp);
        assert_eq!(calls.iter().map(|c| num(c, "completion_tokens")).sum::<u64>(), sc);
        // TensorBoard gets every one as a scalar.
        let scalars = orchestrator::tensorboard::scalars(&v.to_string());
        for k in ["judge_prompt_tokens", "judge_completion_tokens", "judge_tokens_total", "judge_cost", "judge_cost_total", "judge_usage_missing"] {
            assert!(scalars.iter().any(|(t, _)| t == &format!("judge/{k}")), "{k}: {scalars:?}");
        }
    }
    let report = orchestrator::report::run(&dir, None).unwrap();
    assert!(std::fs::metadata(report.join("judge_tokens.png")).unwrap().len() > 10_000);
    let md = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(md.contains(&format!("Judge tokens, these steps: {}", p + c)) && md.contains("Judge cost"), "{md}");

    // A budget of one token: the first step reaches it.
    let server = ScriptedServer::start(more_a_judge()).await.unwrap();
    let run = "steps = 4\nbatch_prompts = 2\nn_samples = 2\nsave_every = 10\nmax_judge_tokens = 1";
    let config = s.config("budget", &server.base_url(), run, "");
    let dir = s.path("runs/budget");
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("judge budget reached: run.max_judge_tokens = 1") && err.contains("--allow-config-change run.max_judge_tokens"), "{err}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), vec![1]);
    let used = server.usage_reported();
    assert_eq!(num(&m[0], "judge_tokens_total"), used.0 + used.1);
    assert!(err.contains(&format!("{} judge tokens used", used.0 + used.1)), "{err}");
    let state = json(&dir.join("checkpoints/step-000001/trainer.json"));
    assert_eq!(state["judge_spent"]["prompt_tokens"].as_u64(), Some(used.0), "{state}");
    assert!(dir.join("checkpoints/step-000001/manifest.json").is_file());

    // Resumed as it is: past its budget, it stops at once with the same status.
    let requests = server.request_count();
    let (code, _, err) = run_to_end(&config, &dir, &[]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("run.max_judge_tokens"), "{err}");
    assert_eq!(server.request_count(), requests, "no judge call past the budget");
    assert_eq!(steps_of(&read_jsonl(&dir.join("metrics.jsonl")).unwrap()), vec![1]);

    // A higher budget: the run goes on to its end, the total carried over.
    let text = std::fs::read_to_string(&config).unwrap().replace("max_judge_tokens = 1\n", "max_judge_tokens = 1000000000\n");
    std::fs::write(&config, text).unwrap();
    let (code, _, err) = run_to_end(&config, &dir, &["--allow-config-change", "run.max_judge_tokens"]).await;
    assert_eq!(code, 0, "{err}");
    let m = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&m), vec![1, 2, 3, 4]);
    let used = server.usage_reported();
    assert_eq!(num(m.last().unwrap(), "judge_tokens_total"), used.0 + used.1);
    assert!(m.iter().all(|v| v["judge_cost"].is_null()), "no prices, no cost");
}

/// `reward.reference = "group"` on a task file without references: every rollout is judged
/// against a rollout of its own group (both orders), the partners in the samples are the seeded
/// ones (a resumed run draws the same), the curriculum stays off, and the rewards follow the
/// judge's in-group verdicts. The same file is refused by the ladder, naming the file and line;
/// a group with one rollout and curriculum settings are refused naming their keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_reference_compares_each_rollout_with_a_seeded_partner_of_its_group() {
    use orchestrator::data::{write_tasks, References};
    use orchestrator::reward::group_partner;
    use orchestrator::testkit::scripted::rules;
    let s = Setup::new(4);
    let tasks: Vec<_> = orchestrator::testkit::letters::letter_tasks(4)
        .into_iter()
        .map(|mut t| {
            t.references.clear();
            t
        })
        .collect();
    write_tasks(&s.path("tasks.jsonl"), &tasks, References::Optional).unwrap();
    let server = ScriptedServer::start(more_a_judge()).await.unwrap();
    let n = 3usize;
    let group = "\n[reward]\nreference = \"group\"\nposition = \"both\"\n";
    let make = |name: &str, steps: u64, extra: &str| {
        let run = format!("steps = {steps}\nbatch_prompts = 2\nn_samples = {n}\nsave_every = 1");
        let config = s.config(name, &server.base_url(), &run, "");
        serial_engine(&config);
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{text}{extra}")).unwrap();
        config
    };

    // The ladder refuses the file, naming it and the first line without references; `check`'s
    // line says which modes the file supports.
    let ladder = make("ladder", 3, "");
    let (code, _, err) = run_to_end(&ladder, &s.path("runs/ladder"), &[]).await;
    assert!(code != 0 && err.contains("tasks.jsonl:1:") && err.contains("no references") && err.contains("needs none"), "{err}");
    let cfg = orchestrator::config::Config::load(&ladder).unwrap();
    let e = format!("{:#}", orchestrator::cli::check::tasks_summary(&cfg).unwrap_err());
    assert!(e.contains("tasks.jsonl:1:") && e.contains("no references"), "{e}");
    let config = make("group", 3, group);
    let cfg = orchestrator::config::Config::load(&config).unwrap();
    let line = orchestrator::cli::check::tasks_summary(&cfg).unwrap().unwrap();
    assert!(line.starts_with("data.tasks: 4 tasks, 0 with references: reward.reference = \"group\" only"), "{line}");

    // Bad group configs, refused with their keys.
    for (name, run_n, extra, key) in [
        ("one", 1, "", "reward.reference"),
        ("mode", n, "\n[curriculum]\nmode = \"static-strongest\"\n", "curriculum.mode"),
        ("rule", n, "\n[curriculum]\nadvance_rule = \"majority\"\n", "curriculum.advance_rule"),
    ] {
        let run = format!("steps = 1\nn_samples = {run_n}");
        let c = s.config(name, &server.base_url(), &run, "");
        let text = std::fs::read_to_string(&c).unwrap();
        std::fs::write(&c, format!("{text}{group}{extra}")).unwrap();
        let e = format!("{:#}", orchestrator::config::Config::load(&c).unwrap_err());
        assert!(e.contains(&format!("{key}:")) && e.contains(&format!("{name}.toml")), "{e}");
        if name == "one" {
            assert!(e.contains("run.n_samples >= 2, got 1"), "{e}");
        }
    }

    // A straight run, and one stopped after step 2 and resumed to step 3.
    let straight = s.path("runs/straight");
    let (code, _, err) = run_to_end(&config, &straight, &[]).await;
    assert_eq!(code, 0, "{err}");
    let requests = server.requests();
    let resumed_cfg = make("resumed", 2, group);
    let resumed = s.path("runs/resumed");
    let (code, _, err) = run_to_end(&resumed_cfg, &resumed, &[]).await;
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&resumed_cfg).unwrap().replace("steps = 2", "steps = 3");
    std::fs::write(&resumed_cfg, text).unwrap();
    let (code, _, err) = run_to_end(&resumed_cfg, &resumed, &["--allow-config-change", "run.steps"]).await;
    assert_eq!(code, 0, "{err}");

    // What the judge saw: the two answers of every request.
    let seen: Vec<(String, String)> = requests.iter().filter_map(|r| rules::answers(&r.prompt())).collect();
    assert_eq!(seen.len(), requests.len());
    let mut wanted = Vec::new();
    for step in 1..=3u64 {
        let ss = samples(&straight, step);
        assert_eq!(ss.len(), 2 * n);
        for x in &ss {
            let (pi, si) = (x["prompt"].as_u64().unwrap(), x["sample"].as_u64().unwrap() as usize);
            let partner = x["partner"].as_u64().expect("partner recorded") as usize;
            assert_eq!(partner, group_partner(11, step, pi, si, n), "step {step} prompt {pi} sample {si}");
            assert_ne!(partner, si);
            let other = ss.iter().find(|y| y["prompt"].as_u64() == Some(pi) && y["sample"].as_u64() == Some(partner as u64)).unwrap();
            assert_eq!(other["task_id"], x["task_id"], "the partner is of the same prompt");
            let (me, them) = (x["response"].as_str().unwrap().trim().to_string(), other["response"].as_str().unwrap().trim().to_string());
            let calls = x["calls"].as_array().unwrap();
            assert_eq!(calls.len(), 2, "position = both: two calls");
            for c in calls {
                let pair = if c["response_first"].as_bool().unwrap() { (me.clone(), them.clone()) } else { (them.clone(), me.clone()) };
                assert!(seen.contains(&pair), "the judge never saw {pair:?}");
                wanted.push(pair);
            }
            // The reward is the in-group verdict of the 'a'-counting judge.
            let want = match me.matches('a').count().cmp(&them.matches('a').count()) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            };
            assert_eq!(x["reward"].as_f64(), Some(want), "{x}");
            assert_eq!(x["level"].as_u64(), Some(0));
        }
        // The resumed run repeats the straight run's pairs and texts.
        let rs = samples(&resumed, step);
        let key = |v: &Value| (v["prompt"].clone(), v["sample"].clone(), v["partner"].clone(), v["response"].clone(), v["reward"].clone());
        assert_eq!(rs.iter().map(key).collect::<Vec<_>>(), ss.iter().map(key).collect::<Vec<_>>(), "step {step}");
    }
    assert_eq!(wanted.len(), seen.len(), "every judge request was an in-group pair of a sample");
    // The curriculum is off: nothing advanced, every task at level 0.
    for v in read_jsonl(&straight.join("metrics.jsonl")).unwrap() {
        assert_eq!(v["advanced"].as_u64(), Some(0));
        assert_eq!(v["levels"], serde_json::json!([4]));
        assert_eq!(v["trained"], v["scored"]);
    }
}

/// A two-member judge panel with the k-of-m promotion rule: killed with SIGKILL at random
/// moments (mid-judging, mid-checkpoint) and resumed, the run equals an uninterrupted one step by
/// step: rewards, per-member metrics, ladder moves and the k-of-m windows bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panel_run_with_k_of_m_promotion_survives_kill_9_bit_for_bit() {
    let s = Setup::new(4);
    let (server, seen) = counting_judge().await;
    let shorter = ScriptedServer::start(orchestrator::testkit::letters::shorter_judge()).await.unwrap();
    let run = "steps = 10\nbatch_prompts = 2\nn_samples = 3\nsync_every = 2\nsave_every = 2\nkeep_last = 3\njudge_concurrency = 4";
    let extra = "[learner.lora]\nenabled = false\n[curriculum]\nadvance_rule = \"k-of-m\"\nadvance_k = 2\nadvance_window = 3\n";
    let config = s.config("panel", &server.base_url(), run, extra);
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(
        "[judge]\nkind = \"openai\"\n[judge.openai]\n",
        "[judge]\nkind = \"panel\"\n[[judge.panel.members]]\nname = \"more-a\"\nweight = 1.0\n[judge.panel.members.openai]\n",
    );
    let second = format!(
        "[[judge.panel.members]]\nname = \"shorter\"\nweight = 2.0\n[judge.panel.members.openai]\nbase_url = \"{}\"\nmodel = \"scripted\"\n\
         api_key_env = \"\"\nmax_concurrency = 16\nmax_retries = 0\nbreaker_failures = 0\n\n[learner]\n",
        shorter.base_url()
    );
    std::fs::write(&config, text.replacen("[learner]\n", &second, 1)).unwrap();
    serial_engine(&config);

    let (straight, crashed) = (s.path("runs/straight"), s.path("runs/crashed"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9a7e1);
    // A step asks the counting member 6 times: kills land mid-judging two to three steps after
    // the checkpoint each process resumes from, so later resumes restore non-empty windows.
    let plan = [
        Kill::MidJudge(rng.random_range(14..18)),
        Kill::MidCheckpoint,
        Kill::MidJudge(rng.random_range(14..18)),
        Kill::MidJudge(rng.random_range(8..12)),
        Kill::MidCheckpoint,
        Kill::MidJudge(rng.random_range(8..12)),
    ];
    straight_and_killed(&config, &straight, &crashed, &server, &seen, &plan).await;

    let (a, b) = (read_jsonl(&straight.join("metrics.jsonl")).unwrap(), read_jsonl(&crashed.join("metrics.jsonl")).unwrap());
    assert_eq!(steps_of(&b), (1..=10).collect::<Vec<_>>(), "a step missing or repeated");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(deterministic_part(x), deterministic_part(y), "step {} differs", x["step"]);
    }
    // Each member's numbers are in every line, and the two members disagree sometimes.
    let mut agreement = Vec::new();
    for x in &a {
        for m in ["more-a", "shorter"] {
            let scored = x[format!("judge/{m}/scored")].as_u64().unwrap_or_else(|| panic!("judge/{m}/scored in {x}"));
            assert!(scored > 0 && x[format!("judge/{m}/prompt_tokens")].as_u64().unwrap() > 0, "{x}");
            let ag = x[format!("judge/{m}/agreement")].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&ag), "{x}");
            agreement.push(ag);
        }
        assert_eq!(x["judge_calls"].as_u64().unwrap(), 2 * x["rollouts"].as_u64().unwrap(), "one call per member and rollout");
    }
    assert!(agreement.iter().any(|&g| g < 1.0), "the members never disagreed: {agreement:?}");
    assert!(a.iter().map(|x| x["advanced"].as_u64().unwrap()).sum::<u64>() > 0, "no ladder moved under k-of-m");

    let state = |d: &Path, step: u64| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(format!("checkpoints/step-{step:06}/trainer.json"))).unwrap()).unwrap()
    };
    let (x, y) = (state(&straight, 10), state(&crashed, 10));
    assert_eq!(x["curriculum"], y["curriculum"], "the k-of-m windows after the kills");
    assert_eq!(x["curriculum"]["advance_window"], 3, "{}", x["curriculum"]);
    // The checkpoints a resume starts from hold part-filled windows.
    assert!(
        [6, 8].iter().any(|&st| state(&crashed, st)["curriculum"]["windows"].as_object().is_some_and(|w| !w.is_empty())),
        "no kept checkpoint held a k-of-m window"
    );
    assert_eq!(x["judge_spent"], y["judge_spent"]);
    for st in 1..=10 {
        let (p, q) = (samples_timeless(&straight, st), samples_timeless(&crashed, st));
        assert_eq!(p, q, "samples of step {st}");
        assert!(p.iter().all(|r| r["members"].as_array().map(|m| m.len()) == Some(2)), "step {st}: {p:?}");
    }
    // TensorBoard's own reader finds every per-member number under its key, after six kills.
    let (code, text) = common::check_tensorboard(&crashed);
    assert_eq!(code, 0, "{text}");
}
