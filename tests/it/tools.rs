//! What other tools see of a run: TensorBoard's own reader on the event files of a real tiny run
//! (live, after kill -9 and resume), `report` while the run is going, the lines a run ends with,
//! and `export` (merged HF directory, PEFT adapter) checked file by file, name by name.
//! Real mistral.rs engine and tch learner on a tiny model, a real HTTP judge on 127.0.0.1.

use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator::testkit::scripted::{Behavior, ScriptedServer};
use orchestrator::learner::model::{read_all, CausalLm, Fwd};
use orchestrator::metrics::read_jsonl;
use orchestrator::testkit::tiny::TinySpec;
use orchestrator::testkit::letters::more_a_judge;
use serde_json::Value;

use common::{check_tensorboard, RunSetup as Setup};

fn event_files(run_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("tfevents"))
        .collect();
    v.sort();
    v
}

fn steps_of(run_dir: &Path) -> Vec<u64> {
    read_jsonl(&run_dir.join("metrics.jsonl")).unwrap().iter().map(|v| v["step"].as_u64().unwrap()).collect()
}

fn orchestrator(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(common::bin());
    cmd.args(args).envs(env.iter().copied()).stdin(Stdio::null());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorboard_events_equal_metrics_live_and_after_kill_9_and_resume() {
    let s = Setup::new(6);
    // 6 judge calls a step; step 5's calls hang (while `slow`), so the run is caught in step 5
    // with steps 1-4 written and the checkpoint at step 3.
    let (seen, slow) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(true)));
    let (count, hang) = (seen.clone(), slow.clone());
    let judge = more_a_judge();
    let server = ScriptedServer::start(Behavior::rule(move |_| {
        if count.fetch_add(1, Ordering::SeqCst) >= 24 && hang.load(Ordering::SeqCst) {
            Behavior::delay(Duration::from_secs(120), judge.clone())
        } else {
            judge.clone()
        }
    }))
    .await
    .unwrap();
    let run = "steps = 8\nbatch_prompts = 2\nn_samples = 3\nsave_every = 3\njudge_concurrency = 4";
    let config = s.config("tb", &server.base_url(), run, "");
    let dir = s.path("runs/tb");

    let mut child = tokio::process::Command::new(common::bin())
        .arg("run")
        .arg(&config)
        .arg("--run-dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while seen.load(Ordering::SeqCst) <= 24 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t0.elapsed() < Duration::from_secs(240), "step 5 not reached within 240 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Live, mid-run: TensorBoard's reader sees steps 1-4, equal to metrics.jsonl; `report`
    // reads the growing file.
    assert_eq!(steps_of(&dir), vec![1, 2, 3, 4]);
    let (code, text) = check_tensorboard(&dir);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("ok: 1 event file(s), 4 steps (1..4)"), "{text}");
    let (code, out, err) = orchestrator(args!["report", dir.as_os_str()], &[]);
    assert_eq!(code, 0, "report while running: {out}{err}");
    assert!(dir.join("report/summary.md").is_file() && dir.join("report/reward.png").is_file());
    assert!(child.try_wait().unwrap().is_none());
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap().trim(), "step-000003");
    assert_eq!(event_files(&dir).len(), 1);
    slow.store(false, Ordering::SeqCst);

    // Resume to the end: steps 4.. run again (step 4 is rolled back); the events hold each step once, equal to metrics.
    let (code, out, err) = orchestrator(args!["run", config.as_os_str(), "--run-dir", dir.as_os_str()], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(steps_of(&dir), (1..=8).collect::<Vec<_>>());
    let files = event_files(&dir);
    assert_eq!(files.len(), 1, "one event file after the resume: {files:?}");
    let (code, text) = check_tensorboard(&dir);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("ok: 1 event file(s), 8 steps (1..8)"), "{text}");
    eprintln!("{text}");

    // The run's last words: where everything is. The progress line carries the run's state.
    assert!(out.contains("run complete at step 8"), "{out}");
    for want in ["tensorboard --logdir", "metrics.jsonl", "orchestrator report", "samples", "checkpoints/step-000008"] {
        assert!(out.contains(want), "{want:?} missing from the run's closing lines:\n{out}");
    }
    assert!(err.contains("| win ") && err.contains("levels ["), "no run state on the progress line:\n{err}");

    // Turned off on resume: the old event files go (they could hold rolled-back steps).
    let (code, out, err) = orchestrator(
        args!["run", config.as_os_str(), "--run-dir", dir.as_os_str(), "--allow-config-change", "run.tensorboard"],
        &[("ORCHESTRATOR__RUN__TENSORBOARD", "false")],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(event_files(&dir).is_empty() && err.contains("removed 1 event file"), "{err}");
    assert!(!out.contains("tensorboard --logdir"), "{out}");
}

/// The tensor names, shapes and values of a safetensors file.
fn tensors(p: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    read_all(p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_a_merged_hf_directory_and_a_peft_adapter() {
    let s = Setup::new(4);
    // Prefers the shorter answer: mixed outcomes, so the update moves the adapters.
    let server = ScriptedServer::start(orchestrator::testkit::letters::shorter_judge()).await.unwrap();
    let run = "steps = 2\nbatch_prompts = 2\nn_samples = 4\nsave_every = 2";
    let lora = "lr = 5e-2\n[learner.lora]\nenabled = true\nrank = 4\nalpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";
    let config = s.config("lora", &server.base_url(), run, lora);
    let dir = s.path("runs/lora");
    let opts = orchestrator::trainer::RunOptions {
        config,
        run_dir: Some(dir.clone()),
        resume: orchestrator::trainer::Resume::Auto,
        allow_config_change: vec![],
    };
    orchestrator::trainer::run(opts).await.unwrap();

    // Merged: the source model's files, every base weight under its HF name and shape, the
    // targeted projections equal to W + (alpha / r) B A of the adapter export.
    let merged = s.path("out/merged");
    let (code, out, err) = orchestrator(args!["export", dir.as_os_str(), "--out", merged.as_os_str()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("merged HF model") && out.contains("model.safetensors"), "{out}");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert_eq!(std::fs::read(merged.join(f)).unwrap(), std::fs::read(s.model.join(f)).unwrap(), "{f}");
    }
    let base = tensors(&s.model.join("model.safetensors"));
    let m = tensors(&merged.join("model.safetensors"));
    assert_eq!(m.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>());
    for (n, t) in &m {
        assert_eq!((t.size(), t.kind()), (base[n].size(), base[n].kind()), "{n}");
    }

    let adapter = s.path("out/adapter");
    let (code, out, err) = orchestrator(args!["export", dir.as_os_str(), "--out", adapter.as_os_str(), "--adapter"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("base model: {}", s.model.display())), "{out}");
    let cfg: Value = serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
    // What PEFT's LoraConfig and vLLM's PEFTHelper read (vLLM refuses DoRA, modules_to_save and
    // a bias without bias support).
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(8.0));
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["use_dora"], false);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert!(cfg["modules_to_save"].is_null());
    assert_eq!(cfg["base_model_name_or_path"].as_str(), Some(s.model.to_str().unwrap()));
    let a = tensors(&adapter.join("adapter_model.safetensors"));
    let spec = TinySpec::llama(3);
    let mut want = Vec::new();
    for i in 0..spec.num_hidden_layers {
        for p in ["q_proj", "v_proj"] {
            for x in ["A", "B"] {
                want.push(format!("base_model.model.model.layers.{i}.self_attn.{p}.lora_{x}.weight"));
            }
        }
    }
    want.sort();
    assert_eq!(a.keys().cloned().collect::<Vec<_>>(), want, "PEFT tensor names");
    let scale = 8.0 / 4.0;
    let mut moved = 0.0f64;
    for (n, w) in &base {
        let key = |x: &str| format!("base_model.model.{}.lora_{x}.weight", n.trim_end_matches(".weight"));
        let expect = match (a.get(&key("A")), a.get(&key("B"))) {
            (Some(la), Some(lb)) => {
                assert_eq!(la.size(), vec![4, w.size()[1]], "{n} lora_A");
                assert_eq!(lb.size(), vec![w.size()[0], 4], "{n} lora_B");
                moved = moved.max(lb.abs().max().double_value(&[]));
                w + lb.matmul(la) * scale
            }
            _ => w.shallow_clone(),
        };
        let diff = (&m[n] - expect).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{n}: merged weight differs from W + scale B A by {diff}");
    }
    assert!(moved > 1e-4, "training left the adapters at zero; the test would prove nothing");

    // The learner's logits (adapters applied, unmerged) equal the merged export's.
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % spec.vocab_size as i64).collect();
    let ids_arg = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let lp = s.path("out/learner-logits.safetensors");
    let (code, out, err) = orchestrator(args!["logits", dir.as_os_str(), "--ids", &ids_arg, "--out", lp.as_os_str()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let learner = tensors(&lp)["logits"].shallow_clone();
    let lm = CausalLm::load(&merged, tch::Device::Cpu, tch::Kind::Float, None, false).unwrap();
    let x = tch::Tensor::from_slice(&ids).view([1, ids.len() as i64]);
    let ours = tch::no_grad(|| lm.logits(&x, None, Fwd::EVAL));
    assert_eq!(learner.size(), vec![1, ids.len() as i64, spec.vocab_size as i64]);
    let diff = (&learner - &ours).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "learner vs merged export logits differ by {diff}");

    // Nothing is overwritten; wrong sources and flags fail with the reason.
    let before = std::fs::read(merged.join("model.safetensors")).unwrap();
    let (code, _, err) = orchestrator(args!["export", dir.as_os_str(), "--out", merged.as_os_str()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("already exists") && err.contains("nothing was written"), "{err}");
    assert_eq!(std::fs::read(merged.join("model.safetensors")).unwrap(), before);
    let (code, _, err) = orchestrator(args!["export", s.model.as_os_str(), "--out", s.path("out/x").as_os_str()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("neither a run directory"), "{err}");
    assert!(!s.path("out/x").exists());
    let (code, _, err) = orchestrator(args!["logits", dir.as_os_str(), "--ids", "1,100000", "--out", lp.as_os_str()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("outside the vocabulary"), "{err}");

    // A run without LoRA has a merged model but no adapter.
    let full = s.config("full", &server.base_url(), "steps = 1\nbatch_prompts = 2\nn_samples = 2\nsave_every = 1", "");
    let fdir = s.path("runs/full");
    let (code, out, err) = orchestrator(args!["run", full.as_os_str(), "--run-dir", fdir.as_os_str()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = orchestrator(args!["export", fdir.as_os_str(), "--out", s.path("out/fa").as_os_str(), "--adapter"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("without LoRA"), "{err}");
    assert!(!s.path("out/fa").exists(), "nothing written for a refused export");
    let ck = fdir.join("checkpoints/step-000001");
    let (code, out, err) = orchestrator(args!["export", ck.as_os_str(), "--out", s.path("out/full").as_os_str()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tensors(&s.path("out/full/model.safetensors")).len(), base.len());
}
