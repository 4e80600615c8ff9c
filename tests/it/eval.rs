//! `orchestrator eval` against the scripted judge on 127.0.0.1 with two real tiny models, and
//! `orchestrator report` on a metrics file written here; both run as the real binary.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use orchestrator::config::{Config, DType, ModelConfig, ModelFormat};
use orchestrator::engine::{ChatMessage, Engine, GenRequest, MistralEngine, Role, SeedKey};
use orchestrator::eval::{wilson, Z95};
use orchestrator::testkit::scripted::{rules, Behavior, ScriptedServer};
use orchestrator::judge::verdict::neutralise;
use orchestrator::judge::Verdict;
use orchestrator::testkit::tiny::TinySpec;
use serde_json::{json, Value};

const SEED: u64 = 7;

/// 11 tasks over two domains and none; task "t05" carries a marker the judge refuses (HTTP 400).
fn write_tasks(dir: &Path) -> PathBuf {
    let mut lines = String::new();
    for i in 0..11 {
        let domain = match i % 3 {
            0 => json!("poetry"),
            1 => json!("essay"),
            _ => Value::Null,
        };
        let marker = if i == 5 { " UNSCORABLE" } else { "" };
        let mut t = json!({"id": format!("t{i:02}"), "prompt": format!("Write piece number {i} about the sea.{marker}")});
        if !domain.is_null() {
            t["domain"] = domain;
        }
        lines.push_str(&t.to_string());
        lines.push('\n');
    }
    let p = dir.join("tasks.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

/// The answer as the judge's rule sees it: neutralised by the template, trimmed by the rule.
fn shown(a: &str) -> String {
    neutralise(a).trim().to_string()
}

/// A judge preferring the longer answer (as shown), a tie on equal length; prompts with
/// UNSCORABLE get an HTTP 400 (not retried, so the call is unscored).
fn longer_wins() -> Behavior {
    length_judge(std::cmp::Ordering::Greater)
}

/// Prefers the answer whose length compares to the other's as `preferred` (as shown), a tie on
/// equal length; prompts with UNSCORABLE get an HTTP 400.
fn length_judge(preferred: std::cmp::Ordering) -> Behavior {
    let by_len = rules::verdict_by(move |a, b| match a.len().cmp(&b.len()) {
        std::cmp::Ordering::Equal => Verdict::Tie,
        o if o == preferred => Verdict::First,
        _ => Verdict::Second,
    });
    Behavior::rule(move |req| {
        if req.prompt().contains("UNSCORABLE") {
            Behavior::error(400, "this prompt is refused")
        } else {
            by_len.clone()
        }
    })
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    policy: PathBuf,
    baseline: PathBuf,
    tasks: PathBuf,
    config: PathBuf,
    cfg: Config,
}

fn fixture(server: &ScriptedServer) -> Fixture {
    common::init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let policy = common::tiny_model(&dir.join("policy"), &TinySpec::llama(11));
    let baseline = common::tiny_model(&dir.join("baseline"), &TinySpec::llama(22));
    let tasks = write_tasks(&dir);
    let extra = format!(
        "[engine.sampling]\nmax_new_tokens = 20\n[run]\nseed = {SEED}\n[judge]\nkind = \"openai\"\n\
         [judge.openai]\nbase_url = \"{}\"\napi_key_env = \"\"\nmax_retries = 0\ntimeout_secs = 10.0\n\
         breaker_failures = 0\nmax_concurrency = 4\n",
        server.base_url()
    );
    // The config's own model is the policy (an openai judge never loads it).
    let (config, cfg) = common::config_for(&dir, &policy, &extra);
    Fixture { _tmp: tmp, dir, policy, baseline, tasks, config, cfg }
}

async fn run_eval(f: &Fixture, out: &Path, extra: &[&str]) -> std::process::Output {
    tokio::process::Command::new(common::bin())
        .arg("eval")
        .arg("--config")
        .arg(&f.config)
        .arg("--policy")
        .arg(&f.policy)
        .arg("--baseline")
        .arg(&f.baseline)
        .arg("--tasks")
        .arg(&f.tasks)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .await
        .unwrap()
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The same answers the eval should have produced, generated here with the same seeds.
async fn regenerate(f: &Fixture, model: &Path, tasks: &[String]) -> Vec<String> {
    let mc = ModelConfig { path: model.to_path_buf(), format: ModelFormat::Safetensors, dtype: DType::F32 };
    let engine = MistralEngine::load(&mc, &f.cfg.engine).await.unwrap();
    let reqs: Vec<GenRequest> = tasks
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest {
            messages: vec![ChatMessage::new(Role::User, p)],
            n: 1,
            seed: SeedKey::new(SEED, 0, i as u64),
        })
        .collect();
    let out = engine.generate(&reqs, &f.cfg.engine.sampling).await.unwrap();
    out.into_iter().map(|g| g[0].text.clone()).collect()
}

#[derive(Default, Debug, PartialEq)]
struct Counts {
    wins: u64,
    ties: u64,
    losses: u64,
    unscored: u64,
}

fn assert_tally(t: &Value, c: &Counts, consistency: Option<f64>, first_rate: Option<f64>) {
    let scored = c.wins + c.ties + c.losses;
    assert_eq!(t["wins"], c.wins, "{t}");
    assert_eq!(t["ties"], c.ties, "{t}");
    assert_eq!(t["losses"], c.losses, "{t}");
    assert_eq!(t["unscored"], c.unscored, "{t}");
    assert_eq!(t["scored"], scored, "{t}");
    assert_eq!(t["pairs"], scored + c.unscored, "{t}");
    let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-12;
    let k = c.wins as f64 + 0.5 * c.ties as f64;
    if scored == 0 {
        assert!(t["win_rate"].is_null() && t["ci95"].is_null(), "{t}");
        return;
    }
    assert!(close(&t["win_rate"], k / scored as f64), "{t}");
    let (lo, hi) = wilson(k, scored as f64, Z95).unwrap();
    assert!(close(&t["ci95"][0], lo) && close(&t["ci95"][1], hi), "{t} vs [{lo}, {hi}]");
    assert!(t["ci95"][0].as_f64().unwrap() <= t["win_rate"].as_f64().unwrap());
    match consistency {
        Some(want) => assert!(close(&t["position_consistency"], want), "{t}"),
        None => assert!(t["position_consistency"].is_null(), "{t}"),
    }
    if let Some(want) = first_rate {
        assert!(close(&t["first_position_rate"], want), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_against_a_length_judge_gives_the_expected_counts_rate_and_interval() {
    let server = ScriptedServer::start(longer_wins()).await.unwrap();
    let f = fixture(&server);
    let out_dir = f.dir.join("eval");
    let o = run_eval(&f, &out_dir, &["--limit", "10"]).await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&o.stderr));

    let records = read_jsonl(&out_dir.join("judgements.jsonl"));
    assert_eq!(records.len(), 20, "10 tasks (--limit) x 2 orders");
    // Every task in both orders, with its domain.
    let mut by_task: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in &records {
        by_task.entry(r["task_id"].as_str().unwrap().to_string()).or_default().push(r);
    }
    assert_eq!(by_task.len(), 10);
    assert!(!by_task.contains_key("t10"));

    // The answers are the two models' own, with the eval's seeds: regenerate and compare.
    let prompts: Vec<String> = (0..10)
        .map(|i| format!("Write piece number {i} about the sea.{}", if i == 5 { " UNSCORABLE" } else { "" }))
        .collect();
    let policy = regenerate(&f, &f.policy, &prompts).await;
    let baseline = regenerate(&f, &f.baseline, &prompts).await;
    assert_ne!(policy, baseline, "two different tiny models should write different answers");

    // The judge saw exactly those answers, in both orders.
    let seen: Vec<(String, String)> = server.requests().iter().filter_map(|r| rules::answers(&r.prompt())).collect();
    assert_eq!(seen.len(), 20, "one request per task and order (the refused task's get a 400, no retry)");

    let mut overall = Counts::default();
    let mut domains: BTreeMap<String, Counts> = BTreeMap::new();
    let mut first_choices = 0u64;
    for (i, (id, rs)) in by_task.iter().enumerate() {
        assert_eq!(id, &format!("t{i:02}"));
        let orders: Vec<&str> = rs.iter().map(|r| r["order"].as_str().unwrap()).collect();
        assert!(orders.contains(&"policy-first") && orders.contains(&"baseline-first"), "{orders:?}");
        for r in rs {
            assert_eq!(r["policy_answer"], policy[i], "task {id}: policy answer");
            assert_eq!(r["baseline_answer"], baseline[i], "task {id}: baseline answer");
            assert!(r["latency_ms"].is_u64() && !r["raw"].is_null());
        }
        let domain = match i % 3 {
            0 => "poetry",
            1 => "essay",
            _ => "unknown",
        };
        assert_eq!(rs[0]["domain"], domain);
        let d = domains.entry(domain.to_string()).or_default();
        if i == 5 {
            for r in rs {
                assert!(r["verdict"].is_null() && r["preferred"].is_null(), "{r}");
                assert!(r["unscored_reason"].as_str().unwrap().contains("HTTP 400"), "{r}");
            }
            overall.unscored += 1;
            d.unscored += 1;
            continue;
        }
        let (p, b) = (shown(&policy[i]), shown(&baseline[i]));
        assert!(seen.contains(&(p.clone(), b.clone())) && seen.contains(&(b.clone(), p.clone())), "task {id}");
        let want = match p.len().cmp(&b.len()) {
            std::cmp::Ordering::Greater => "policy",
            std::cmp::Ordering::Less => "baseline",
            std::cmp::Ordering::Equal => "tie",
        };
        for r in rs {
            assert_eq!(r["preferred"], want, "task {id}: {r}");
            first_choices += (r["verdict"] == "first") as u64;
        }
        let slot = match want {
            "policy" => (&mut overall.wins, &mut d.wins),
            "baseline" => (&mut overall.losses, &mut d.losses),
            _ => (&mut overall.ties, &mut d.ties),
        };
        *slot.0 += 1;
        *slot.1 += 1;
    }
    // The fixture must discriminate: both models win somewhere.
    assert!(overall.wins > 0 && overall.losses > 0, "{overall:?}");

    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["tasks"], 10);
    let scored = (overall.wins + overall.ties + overall.losses) as f64;
    // An order-blind judge: both orders always agree; one "first" per decided pair.
    assert_tally(&summary["overall"], &overall, Some(1.0), Some(first_choices as f64 / (2.0 * scored)));
    let got_domains: Vec<&String> = summary["domains"].as_object().unwrap().keys().collect();
    assert_eq!(got_domains, domains.keys().collect::<Vec<_>>());
    for (d, c) in &domains {
        assert_tally(&summary["domains"][d], c, Some(1.0), None);
    }
    assert!(stdout.contains("all") && stdout.contains("poetry") && stdout.contains("unknown"), "{stdout}");

    // Bad input: a broken task line names FILE:LINE; a model without config.json is refused;
    // the earlier results stay as they were.
    let before = std::fs::read(out_dir.join("summary.json")).unwrap();
    std::fs::write(&f.tasks, "{\"id\": \"a\", \"prompt\": \"ok\"}\n{\"id\": \"b\", \"prompt\": 3}\n").unwrap();
    let o = run_eval(&f, &out_dir, &[]).await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("tasks.jsonl:2"), "{err}");
    let o = tokio::process::Command::new(common::bin())
        .args(["eval", "--config"])
        .arg(&f.config)
        .arg("--policy")
        .arg(&f.dir)
        .arg("--baseline")
        .arg(&f.baseline)
        .arg("--tasks")
        .arg(&f.tasks)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no config.json"), "{err}");
    assert_eq!(std::fs::read(out_dir.join("summary.json")).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_judge_that_always_says_first_gives_all_ties_and_zero_consistency() {
    let server = ScriptedServer::start(rules::always(Verdict::First)).await.unwrap();
    let f = fixture(&server);
    let out_dir = f.dir.join("eval");
    let o = run_eval(&f, &out_dir, &[]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = read_jsonl(&out_dir.join("judgements.jsonl"));
    assert_eq!(records.len(), 22);
    for r in &records {
        let want = if r["order"] == "policy-first" { "policy" } else { "baseline" };
        assert_eq!((&r["verdict"], r["preferred"].as_str().unwrap()), (&json!("first"), want), "{r}");
    }
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    let all = Counts { ties: 11, ..Counts::default() };
    assert_tally(&summary["overall"], &all, Some(0.0), Some(1.0));
    assert_eq!(summary["overall"]["win_rate"], 0.5);
    assert_eq!(summary["overall"]["mean_reward"], 0.5);
    for (d, n) in [("essay", 4), ("poetry", 4), ("unknown", 3)] {
        assert_tally(&summary["domains"][d], &Counts { ties: n, ..Counts::default() }, Some(0.0), Some(1.0));
    }
}

/// A realistic metrics.jsonl: every key the trainer writes, with nulls where a step has no
/// update (1 and 6), no scored rollout (9), or a missing position consistency.
fn metrics_rows() -> Vec<Value> {
    let mut levels = [8u64, 0, 0];
    (1..=12u64)
        .map(|s| {
            let unscored = if s == 9 { 16 } else { (s % 4 == 0) as u64 };
            let scored = 16 - unscored;
            let wins = if s == 9 { 0 } else { 2 + s / 2 };
            let losses = if s == 9 { 0 } else { 4 - (s % 3) };
            let ties = scored - wins - losses;
            if s % 3 == 0 && levels[0] > 0 {
                levels[0] -= 1;
                levels[1] += 1;
            }
            if s % 5 == 0 && levels[1] > 0 {
                levels[1] -= 1;
                levels[2] += 1;
            }
            let update = s != 1 && s != 6;
            let opt = |v: f64| if update { json!(v) } else { Value::Null };
            let (tg, tj, tl, ts, tc, to) = (40.0 + s as f64, 3.0, if update { 12.5 } else { 0.0 }, 1.0, if s % 5 == 0 { 4.0 } else { 0.0 }, 0.5);
            json!({
                "step": s, "epoch": 1 + s / 7, "timestamp": 1.79e9 + 60.0 * s as f64,
                "rollouts": 16, "scored": scored, "unscored": unscored, "wins": wins, "ties": ties, "losses": losses,
                "skipped_groups": 0, "trained": if update { scored } else { 0 },
                "reward_mean": if scored > 0 { json!((wins as f64 + 0.5 * ties as f64) / scored as f64) } else { Value::Null },
                "reward_std": if scored > 0 { json!(0.3) } else { Value::Null },
                "position_consistency": if s % 2 == 0 { json!(0.7) } else { Value::Null },
                "levels": levels.to_vec(), "share_at_top": levels[2] as f64 / 8.0, "advanced": (s % 3 == 0) as u64,
                "kl": opt(0.001 * s as f64), "entropy": opt(2.0 - 0.05 * s as f64), "clip_fraction": opt(0.04),
                "value_loss": opt(0.2), "policy_loss": opt(-0.01), "grad_norm": opt(0.9), "lr": opt(1e-6),
                "response_tokens_mean": 90.0 + 3.0 * s as f64, "response_tokens_max": 160, "truncated": s % 3,
                "gen_tokens_per_s": 35.0, "learn_tokens_per_s": 150.0, "judge_calls": 32, "judge_retries": 0,
                "t_generate": tg, "t_judge_tail": tj, "t_learn": opt(tl), "t_sync": ts, "t_checkpoint": tc, "t_other": to,
                "t_step": tg + tj + tl + ts + tc + to, "sync_bytes": 1000,
            })
        })
        .collect()
}

#[test]
fn report_writes_readable_pngs_and_a_summary_with_the_totals() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let rows = metrics_rows();
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(run.join("metrics.jsonl"), text).unwrap();

    let o = std::process::Command::new(common::bin()).arg("report").arg(&run).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = run.join("report");
    for name in ["reward", "outcomes", "levels", "kl_entropy", "response_length", "phase_times"] {
        let bytes = std::fs::read(report.join(format!("{name}.png"))).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name}.png is not a PNG");
        // A blank 1000x560 white PNG compresses to a few KB; plots with text and lines do not.
        assert!(bytes.len() > 20_000, "{name}.png is only {} bytes", bytes.len());
    }
    let md = std::fs::read_to_string(report.join("summary.md")).unwrap();
    let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
    let (w, t, l, u) = (sum("wins"), sum("ties"), sum("losses"), sum("unscored"));
    assert!(md.contains("- Steps: 12 (step 1 to 12)"), "{md}");
    assert!(md.contains(&format!("{w} wins, {t} ties, {l} losses, {u} unscored ({} rollouts", 12 * 16)), "{md}");
    let last = rows.last().unwrap()["levels"].as_array().unwrap().clone();
    assert!(md.contains(&format!("level 0: {}, level 1: {}, level 2: {}", last[0], last[1], last[2])), "{md}");
    let wall: f64 = rows.iter().map(|r| r["t_step"].as_f64().unwrap()).sum();
    assert!(md.contains(&format!("Total wall time (sum of step times): {wall:.1} s")), "{md}");
    // t_learn is null on the two steps without an update: they add nothing to the learn phase.
    let learn: f64 = rows.iter().filter_map(|r| r["t_learn"].as_f64()).sum();
    assert_eq!(learn, 10.0 * 12.5);
    assert!(md.contains(&format!("| learn | {learn:.1} | {:.1}% |", 100.0 * learn / wall)), "{md}");
    for name in ["reward.png", "phase_times.png", "levels.png"] {
        assert!(md.contains(&format!("]({name})")), "{md}");
    }

    // A bad line names FILE:LINE and the report already there is left alone.
    let before = std::fs::read(report.join("summary.md")).unwrap();
    let mut bad = rows.clone();
    bad[4]["kl"] = json!("large");
    let text: String = bad.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(run.join("metrics.jsonl"), text).unwrap();
    let o = std::process::Command::new(common::bin()).arg("report").arg(&run).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("metrics.jsonl:5: kl"), "{err}");
    assert_eq!(std::fs::read(report.join("summary.md")).unwrap(), before);
}

/// A judge preferring the shorter answer (the length judge reversed), a tie on equal length.
fn shorter_wins() -> Behavior {
    length_judge(std::cmp::Ordering::Less)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panel_of_two_opposite_judges_scores_one_half_and_eval_prints_each_member() {
    let long = ScriptedServer::start(longer_wins()).await.unwrap();
    let short = ScriptedServer::start(shorter_wins()).await.unwrap();
    let f = fixture(&long);
    let member = |name: &str, url: &str| {
        format!(
            "[[judge.panel.members]]\nname = \"{name}\"\nkind = \"openai\"\n[judge.panel.members.openai]\nbase_url = \"{url}\"\n\
             api_key_env = \"\"\nmax_retries = 0\ntimeout_secs = 10.0\nbreaker_failures = 0\nmax_concurrency = 4\n\
             price_prompt_per_mtok = 1.0\nprice_completion_per_mtok = 2.0\n"
        )
    };
    let text = std::fs::read_to_string(&f.config).unwrap().replace("[judge]\nkind = \"openai\"\n", "[judge]\nkind = \"panel\"\n");
    let text = format!("{text}\n{}\n{}", member("long", &long.base_url()), member("short", &short.base_url()));
    std::fs::write(&f.config, text).unwrap();
    let out_dir = f.dir.join("eval");
    let o = run_eval(&f, &out_dir, &["--limit", "8"]).await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));

    // Each member judged each of the 8 tasks in both orders; records name the member.
    let records = read_jsonl(&out_dir.join("judgements.jsonl"));
    assert_eq!(records.len(), 32, "8 tasks x 2 orders x 2 members");
    for m in ["long", "short"] {
        assert_eq!(records.iter().filter(|r| r["member"] == m).count(), 16, "{m}");
    }
    assert_eq!((long.request_count(), short.request_count()), (16, 16));

    // Opposite judges: each pair is a win for one and a loss for the other (or a tie for both),
    // so the panel's reward is 0.5 on every scored pair and its outcome a tie.
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    let overall = &summary["overall"];
    assert_eq!((overall["unscored"].as_u64(), overall["scored"].as_u64()), (Some(1), Some(7)), "t05 is refused by both: {overall}");
    assert_eq!(overall["ties"], 7, "{overall}");
    assert_eq!(overall["mean_reward"], 0.5, "{overall}");
    // Per member: a decided pair is half agreement with a tied panel; an equal-length pair is a
    // tie for both members and the panel (full agreement).
    let (l, s) = (&summary["members"]["long"], &summary["members"]["short"]);
    let long_reward = l["reward_mean"].as_f64().unwrap();
    assert!((long_reward + s["reward_mean"].as_f64().unwrap() - 1.0).abs() < 1e-12, "{l} {s}");
    let decided = records
        .iter()
        .filter(|r| r["member"] == "long" && r["order"] == "policy-first" && !r["preferred"].is_null() && r["preferred"] != "tie")
        .count() as f64;
    let want_agreement = (decided * 0.5 + (7.0 - decided)) / 7.0;
    for m in [l, s] {
        assert_eq!((m["pairs"].as_u64(), m["scored"].as_u64(), m["failed_calls"].as_u64()), (Some(8), Some(7), Some(2)), "{m}");
        assert!((m["agreement"].as_f64().unwrap() - want_agreement).abs() < 1e-9, "{m}: want {want_agreement}");
        assert!(m["agreement"].as_f64().unwrap() <= 0.75, "two opposite judges agree with their panel about half the time: {m}");
        assert_eq!(m["position_consistency"], 1.0, "a length judge is position-consistent: {m}");
        assert_eq!(m["weight"], 1.0);
        // Its tokens are what its server reported; its cost is at its prices.
        let (p, c) = if m == l { long.usage_reported() } else { short.usage_reported() };
        assert_eq!((m["prompt_tokens"].as_u64(), m["completion_tokens"].as_u64()), (Some(p), Some(c)), "{m}");
        assert!((m["cost"].as_f64().unwrap() - (p as f64 + 2.0 * c as f64) / 1e6).abs() < 1e-12, "{m}");
    }
    assert!(decided > 0.0, "the two tiny models should write answers of different lengths");
    for m in ["long", "short"] {
        assert!(stdout.lines().any(|line| line.starts_with(m) && line.contains("1.00")), "{m} missing from the table:\n{stdout}");
    }
    assert!(stdout.contains("agree"), "{stdout}");
}
