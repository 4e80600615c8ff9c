//! The binary: config checking, `generate`, and libtorch being linked.

use crate::common;

use std::path::Path;
use std::process::Command;

use orchestrator::config::Config;
use orchestrator::testkit::tiny::TinySpec;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load_err(path: &Path, env: &[(&str, &str)]) -> String {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    format!("{:#}", Config::load_with_env(path, env).expect_err("must fail"))
}

#[test]
fn libtorch_is_linked() {
    assert_eq!(orchestrator::libtorch_matmul_check(), vec![19.0, 22.0, 43.0, 50.0]);
}

#[test]
fn config_errors_name_the_file_and_key_path() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = "[model]\npath = \"m\"\n";

    let p = write(d, "range.toml", &format!("{base}[engine.sampling]\ntop_p = 1.7\n"));
    let e = load_err(&p, &[]);
    assert!(e.contains("range.toml"), "{e}");
    assert!(e.contains("engine.sampling.top_p: must be in (0, 1], got 1.7"), "{e}");

    let p = write(d, "unknown.toml", &format!("{base}[engine.sampling]\ntop_q = 0.5\n"));
    let e = load_err(&p, &[]);
    assert!(e.contains("unknown.toml") && e.contains("engine.sampling") && e.contains("top_q"), "{e}");

    let p = write(d, "type.toml", &format!("{base}[engine]\nmax_num_seqs = \"many\"\n"));
    let e = load_err(&p, &[]);
    assert!(e.contains("type.toml") && e.contains("engine.max_num_seqs"), "{e}");

    let p = write(d, "section.toml", &format!("{base}[enigne]\nmax_num_seqs = 2\n"));
    let e = load_err(&p, &[]);
    assert!(e.contains("enigne"), "{e}");

    let p = write(d, "syntax.toml", "[model\npath = 1\n");
    let e = load_err(&p, &[]);
    assert!(e.contains("syntax.toml") && e.contains("line 1"), "{e}");

    // The file's name says nothing about the problem, so only the message can match.
    let p = write(d, "c1.toml", "[engine]\nmax_num_seqs = 2\n");
    let e = load_err(&p, &[]);
    assert!(e.contains("c1.toml") && e.contains("missing field `model`"), "{e}");

    // Several problems are reported together.
    let p = write(d, "many.toml", &format!("{base}[engine]\nmax_num_seqs = 0\n[engine.sampling]\ntemperature = -1\nmax_new_tokens = 0\n"));
    let e = load_err(&p, &[]);
    for key in ["engine.max_num_seqs", "engine.sampling.temperature", "engine.sampling.max_new_tokens"] {
        assert!(e.contains(key), "{key} missing in {e}");
    }

    // Paged attention needs the CUDA build.
    let p = write(d, "paged.toml", &format!("{base}[engine.paged_attention]\nenabled = true\n"));
    if cfg!(feature = "cuda") {
        Config::load_with_env(&p, vec![]).unwrap();
    } else {
        let e = load_err(&p, &[]);
        assert!(e.contains("engine.paged_attention.enabled") && e.contains("CUDA"), "{e}");
    }
}

#[test]
fn checking_for_a_cuda_build_still_checks_everything_else() {
    use orchestrator::config::Build;
    let tmp = tempfile::tempdir().unwrap();
    let gpu = "[model]\npath = \"m\"\n[engine.paged_attention]\nenabled = true\n[learner]\ndevice = \"cuda\"\n";
    let p = write(tmp.path(), "gpu.toml", gpu);
    Config::load_for(&p, vec![], Build::Cuda).unwrap();
    if !cfg!(feature = "cuda") {
        let e = format!("{:#}", Config::load_for(&p, vec![], Build::This).unwrap_err());
        assert!(e.contains("engine.paged_attention.enabled: paged attention needs a CUDA build"), "{e}");
    }
    if !cfg!(feature = "torch-cuda") {
        let e = load_err(&p, &[]);
        assert!(e.contains("learner.device: a cuda learner needs a CUDA libtorch build"), "{e}");
    }
    // Range errors are not excused by the target build.
    let p = write(
        tmp.path(),
        "bad.toml",
        "[model]\npath = \"m\"\n[engine.paged_attention]\nenabled = true\nblock_size = 7\n[learner]\ndevice = \"tpu\"\n",
    );
    let e = format!("{:#}", Config::load_for(&p, vec![], Build::Cuda).unwrap_err());
    assert!(e.contains("engine.paged_attention.block_size: must be one of") && e.contains("learner.device: must be cpu"), "{e}");
    assert!(!e.contains("needs a CUDA"), "{e}");
}

#[test]
fn environment_overrides_are_typed_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "c.toml", "[model]\npath = \"m\"\n[engine.sampling]\ntop_p = 0.9\n");
    let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let cfg = Config::load_with_env(&p, env("ORCHESTRATOR__ENGINE__SAMPLING__TOP_P", "0.5")).unwrap();
    assert_eq!(cfg.engine.sampling.top_p, 0.5);
    let cfg = Config::load_with_env(&p, env("ORCHESTRATOR__ENGINE__SAMPLING__STOP", "\n\n,END")).unwrap();
    assert_eq!(cfg.engine.sampling.stop, vec!["\n\n".to_string(), "END".to_string()]);
    let cfg = Config::load_with_env(&p, env("ORCHESTRATOR__MODEL__PATH", "/abs/model")).unwrap();
    assert_eq!(cfg.model.path, Path::new("/abs/model"));
    // Relative paths resolve against the config file's directory.
    let cfg = Config::load_with_env(&p, vec![]).unwrap();
    assert_eq!(cfg.model.path, tmp.path().join("m"));

    let e = load_err(&p, &[("ORCHESTRATOR__ENGINE__SAMPLING__TOP_P", "2")]);
    assert!(e.contains("engine.sampling.top_p: must be in (0, 1], got 2"), "{e}");
    let e = load_err(&p, &[("ORCHESTRATOR__ENGINE__SAMPLING__TOP_P", "high")]);
    assert!(e.contains("engine.sampling.top_p") && e.contains("ORCHESTRATOR__ENGINE__SAMPLING__TOP_P"), "{e}");
    let e = load_err(&p, &[("ORCHESTRATOR__ENGINE__NOPE", "1")]);
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn non_finite_and_endless_values_are_rejected_with_their_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let base = "[model]\npath = \"m\"\n";
    let p = write(tmp.path(), "inf.toml", &format!("{base}[judge.openai]\ntimeout_secs = inf\nbreaker_cooldown_secs = nan\n[learner]\nlr = -inf\n"));
    let e = load_err(&p, &[]);
    for key in ["judge.openai.timeout_secs", "judge.openai.breaker_cooldown_secs", "learner.lr"] {
        assert!(e.contains(&format!("{key} = ")) && e.contains("must be a finite number"), "{key} missing in {e}");
    }
    let p = write(tmp.path(), "ok.toml", base);
    let e = load_err(&p, &[("ORCHESTRATOR__JUDGE__OPENAI__TIMEOUT_SECS", "inf")]);
    assert!(e.contains("judge.openai.timeout_secs (from ORCHESTRATOR__JUDGE__OPENAI__TIMEOUT_SECS): must be a finite number"), "{e}");
    // Finite but past what a Duration holds: bounded, with the key named.
    let p = write(tmp.path(), "huge.toml", &format!("{base}[judge.openai]\ntimeout_secs = 1e300\nmax_retry_after_secs = 1e20\nbackoff_max_ms = 9000000000000\n[run]\njudge_down_max_wait_secs = 1e30\n"));
    let e = load_err(&p, &[]);
    for key in ["judge.openai.timeout_secs", "judge.openai.max_retry_after_secs", "judge.openai.backoff_max_ms", "run.judge_down_max_wait_secs"] {
        assert!(e.contains(&format!("{key}: must be")), "{key} missing in {e}");
    }
    // The binary reports it and exits non-zero instead of panicking.
    let out = Command::new(common::bin()).arg("check").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// A temperature in (0, 1e-5) makes 1/T overflow the logits to infinity (NaN log-probs): an error
/// naming the key, from the file or the environment; 0 (greedy) and 1e-5 are fine.
#[test]
fn tiny_nonzero_temperatures_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let base = "[model]\npath = \"m\"\n";
    for t in ["1e-6", "5e-324", "9.99e-6"] {
        let p = write(tmp.path(), "t.toml", &format!("{base}[engine.sampling]\ntemperature = {t}\n"));
        let e = load_err(&p, &[]);
        assert!(e.contains("engine.sampling.temperature: must be 0 (greedy) or >= 1e-5"), "T={t}: {e}");
    }
    let p = write(tmp.path(), "ok.toml", base);
    let e = load_err(&p, &[("ORCHESTRATOR__ENGINE__SAMPLING__TEMPERATURE", "1e-7")]);
    assert!(e.contains("engine.sampling.temperature: must be 0 (greedy) or >= 1e-5"), "{e}");
    for t in ["0", "1e-5", "0.7"] {
        let p = write(tmp.path(), "t.toml", &format!("{base}[engine.sampling]\ntemperature = {t}\n"));
        if let Err(e) = Config::load_with_env(&p, Vec::<(String, String)>::new()) {
            assert!(!format!("{e:#}").contains("temperature"), "T={t}: {e:#}");
        }
    }
}

/// `cargo build` and `cargo test` must resolve every shared crate with the same features, or one
/// rebuilds mistral.rs after the other (the feature pins in Cargo.toml).
#[test]
fn build_and_test_share_one_feature_set() {
    // A crate built for the host (build scripts, proc macros) and for the target shows up once
    // per feature set: compare the sets.
    type Sets = std::collections::BTreeMap<String, std::collections::BTreeSet<String>>;
    let tree = |edges: &str| -> Sets {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["tree", "--locked", "--offline", "--prefix", "none", "-f", "{p}|{f}", "-e", edges, "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim_end_matches(" (*)").split_once('|'))
            .fold(Sets::new(), |mut m, (p, f)| {
                m.entry(p.to_string()).or_default().insert(f.to_string());
                m
            })
    };
    let build = tree("normal,build");
    let test = tree("normal,build,dev");
    assert!(build.len() > 300, "{} crates", build.len());
    let differ: Vec<String> = build
        .iter()
        .filter_map(|(p, f)| test.get(p).filter(|g| *g != f).map(|g| format!("{p}: build {f:?} vs test {g:?}")))
        .collect();
    assert!(differ.is_empty(), "features differ between cargo build and cargo test:\n{}", differ.join("\n"));
}

#[test]
fn sync_every_above_one_warns_that_updates_are_off_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let check = |body: &str| {
        let p = write(tmp.path(), "w.toml", &format!("[model]\npath = \"m\"\n{body}"));
        let out = Command::new(common::bin()).arg("check").arg(&p).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = check("[run]\nsync_every = 3\n[learner]\nalgorithm = \"ppo\"\n");
    assert!(out.contains("warning: run.sync_every = 3 with learner.algorithm = \"ppo\"") && out.contains("off-policy"), "{out}");
    assert!(!check("[run]\nsync_every = 1\n[learner]\nalgorithm = \"ppo\"\n").contains("warning"));
    // Corrected with the engine's behaviour log-probs: no warning.
    assert!(!check("[run]\nsync_every = 3\n[learner]\nis_correction = \"token-tis\"\n").contains("warning"));
    // GRPO takes the same clipped ratio from the learner's log-probs.
    assert!(check("[run]\nsync_every = 2\n[learner]\nalgorithm = \"grpo\"\n").contains("warning: run.sync_every = 2"));
}

/// Options with fixed values list them in `--help`; every option says what it is; the config is
/// positional everywhere, `--config` still accepted, never both.
#[test]
fn help_lists_fixed_values_and_every_option_has_help() {
    let help = |args: &[&str]| {
        let out = Command::new(common::bin()).args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(help(&["tiny-model"]).contains("[possible values: llama, qwen2]"));
    assert!(help(&["select"]).contains("[possible values: pointwise, pairwise]"));
    let bl = help(&["bench", "learner"]);
    assert!(bl.contains("[possible values: f32, bf16]") && bl.contains("cpu, cuda or cuda:N"), "{bl}");
    assert!(help(&["import"]).contains("[possible values: f32, bf16]"));
    let import = help(&["import"]);
    assert_eq!(import.matches("or a GGUF").count(), 1, "the about text says it once: {import}");
    for cmd in ["generate", "judge"] {
        let h = help(&[cmd]);
        for opt in ["--out <OUT>", "--config <CONFIG>"] {
            let line = h.lines().find(|l| l.trim_start().starts_with(opt)).unwrap_or_else(|| panic!("{cmd}: no {opt} in {h}"));
            let at = h.find(line).unwrap() + line.len();
            let described = line.trim_start().len() > opt.len() + 2 || h[at..].lines().nth(1).is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
            assert!(described, "{cmd}: {opt} has no help: {h}");
        }
        assert!(h.contains("[CONFIG]"), "{cmd}: {h}");
    }
    let both = Command::new(common::bin()).args(["check", "a.toml", "--config", "b.toml"]).output().unwrap();
    assert_eq!(both.status.code(), Some(2), "{both:?}");
    let neither = Command::new(common::bin()).args(["check"]).output().unwrap();
    assert_eq!(neither.status.code(), Some(2));
    let run = help(&["run"]);
    for code in ["130", "  3 ", "  4 "] {
        assert!(run.contains(code), "run --help must document exit status {code}: {run}");
    }
}

#[test]
fn check_passes_on_every_shipped_config_and_fails_on_a_bad_one() {
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    let mut for_cuda = Vec::new();
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(common::bin()).arg("check").arg(&path).output().unwrap();
            n += 1;
            if out.status.success() {
                continue;
            }
            // A config for the GPU build: this (CPU) binary names the CUDA-only keys and nothing
            // else, and the check for a CUDA build passes and lists them.
            let err = String::from_utf8_lossy(&out.stderr);
            let cuda_only = err.lines().filter(|l| l.contains("needs a CUDA")).count();
            let problems = err.lines().filter(|l| l.contains(": ")).count();
            assert!(cuda_only > 0 && cuda_only == problems, "{}: {err}", path.display());
            let out = Command::new(common::bin()).args(["check", "--for-build", "cuda"]).arg(&path).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            assert_eq!(stdout.lines().filter(|l| l.starts_with("note: ")).count(), cuda_only, "{stdout}");
            for_cuda.push(path.file_name().unwrap().to_string_lossy().to_string());
        }
    }
    assert!(n >= 3, "expected the shipped configs, found {n}");
    if !cfg!(all(feature = "cuda", feature = "torch-cuda")) {
        for_cuda.sort();
        assert_eq!(for_cuda, vec!["7b.toml".to_string(), "remote-vllm.toml".to_string()]);
    }
    let tmp = tempfile::tempdir().unwrap();
    let bad = write(tmp.path(), "bad.toml", "[model]\npath = \"m\"\n[engine.sampling]\ntop_p = 1.7\n");
    let t = std::time::Instant::now();
    let out = Command::new(common::bin()).arg("check").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("engine.sampling.top_p: must be in (0, 1], got 1.7"), "{err}");
    assert!(t.elapsed().as_secs_f64() < 5.0);
}

#[test]
fn generate_writes_samples_and_rejects_bad_lines() {
    common::init();
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&tmp.path().join("model"), &TinySpec::llama(1));
    // Serial engine: a rerun must be identical byte for byte (batched, ln-p may differ in the
    // last bits; README, "Batching and reproducibility").
    let (cfg_path, _) =
        common::config_for(tmp.path(), &model, "serial = true\n[engine.sampling]\nmax_new_tokens = 12\n[run]\nseed = 5\n");
    let prompts = write(
        tmp.path(),
        "prompts.jsonl",
        "{\"id\": \"a\", \"prompt\": \"Write a poem.\"}\n{\"id\": 2, \"prompt\": \"Describe a market.\", \"system\": \"Be brief.\", \"references\": [\"x\"]}\n",
    );
    let out = tmp.path().join("out.jsonl");
    // The config positional (preferred) or as --config (accepted for this release): same result.
    let positional = std::cell::Cell::new(false);
    let run = |prompts: &Path, out: &Path| {
        let mut c = Command::new(common::bin());
        c.args(["generate", "--n", "3", "--with-tokens"]);
        if !positional.get() {
            c.arg("--config");
        }
        c.arg(&cfg_path)
            .arg("--prompts")
            .arg(prompts)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let o = run(&prompts, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[0]["id"], "a");
    assert_eq!(lines[3]["id"], "2");
    assert_eq!(lines[5]["sample"], 2);
    for l in &lines {
        let n = l["ids"].as_array().unwrap().len();
        assert_eq!(n, l["completion_tokens"].as_u64().unwrap() as usize);
        assert_eq!(n, l["logprobs"].as_array().unwrap().len());
        assert!(n >= 1 && n <= 12);
    }
    // Same seed from the config: a rerun is identical.
    positional.set(true);
    let out2 = tmp.path().join("out2.jsonl");
    assert!(run(&prompts, &out2).status.success());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());

    // A bad line names FILE:LINE and the existing output is left as it was.
    let before = std::fs::read(&out).unwrap();
    let bad = write(tmp.path(), "bad.jsonl", "{\"prompt\": \"ok\"}\n\n{\"prompt\": 3}\n");
    let o = run(&bad, &out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.jsonl:3"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let empty = write(tmp.path(), "empty.jsonl", "{\"prompt\": \"  \"}\n");
    let err = String::from_utf8_lossy(&run(&empty, &out).stderr).to_string();
    assert!(err.contains("empty.jsonl:1") && err.contains("empty prompt"), "{err}");
}
