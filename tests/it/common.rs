//! Shared test fixtures: tiny model directories and configs on disk.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Once;

use orchestrator::config::Config;
use orchestrator::engine::EngineConfig;
use orchestrator::testkit::pool::{Dialect, PoolServer, PoolServerOptions};
use orchestrator::testkit::tiny::TinySpec;

static INIT: Once = Once::new();

/// Chat prompts of different lengths for engine tests.
pub const PROMPTS: &[&str] = &[
    "Write a short story about a lighthouse.",
    "Describe the morning market.",
    "Dear hiring manager, I am writing to apply.",
    "Summarise the main points of the report.",
    "Poetry asks the reader to slow down.",
    "The committee will meet on Thursday.",
    "She opened the letter slowly.",
    "In conclusion, the evidence shows",
];

/// Keeps mistral.rs away from any real hub cache: no token, an empty HF_HOME.
pub fn init() {
    INIT.call_once(|| {
        let home = std::env::temp_dir().join(format!("orchestrator-test-hf-{}", std::process::id()));
        std::fs::create_dir_all(&home).unwrap();
        // Set once, before any engine exists, from a single thread (Once).
        std::env::set_var("HF_HOME", &home);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    });
}

pub fn tiny_model(dir: &Path, spec: &TinySpec) -> PathBuf {
    init();
    spec.write(dir).expect("writing tiny model");
    dir.to_path_buf()
}

/// Writes a config for `model` with the given extra TOML and loads it.
pub fn config_for(dir: &Path, model: &Path, extra: &str) -> (PathBuf, Config) {
    let path = dir.join("config.toml");
    let text = format!(
        "[model]\npath = {:?}\ndtype = \"f32\"\n\n[engine]\nmax_num_seqs = 16\n{extra}\n",
        model.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load_with_env(&path, Vec::<(String, String)>::new()).expect("config loads");
    (path, cfg)
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orchestrator"))
}

/// A tiny model, letter tasks and run configs against a judge URL, in a temp dir (run tests).
pub struct RunSetup {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
}

impl RunSetup {
    pub fn new(tasks: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(&dir.path().join("model"), &TinySpec::llama(3));
        orchestrator::data::write_tasks(&dir.path().join("tasks.jsonl"), &orchestrator::testkit::letters::letter_tasks(tasks), orchestrator::data::References::Required).unwrap();
        Self { dir, model }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A config for a run against `judge_url`; `extra` is appended to `[learner]` (with no
    /// `lr` in it, learner.lr is 2e-3; later keys of a section must not repeat the ones here).
    pub fn config(&self, name: &str, judge_url: &str, run: &str, extra: &str) -> PathBuf {
        let lr = if extra.lines().any(|l| l.trim_start().starts_with("lr ")) { "" } else { "lr = 2e-3\n" };
        let extra = format!("{lr}{extra}");
        let text = format!(
            "[model]\npath = {:?}\ndtype = \"f32\"\n\n[engine]\nmax_num_seqs = 16\n[engine.sampling]\n\
             temperature = 1.0\nmax_new_tokens = 16\n\n[run]\nseed = 11\n{run}\n\n[data]\ntasks = \"tasks.jsonl\"\n\n\
             [judge]\nkind = \"openai\"\n[judge.openai]\nbase_url = \"{judge_url}\"\nmodel = \"scripted\"\n\
             api_key_env = \"\"\nmax_concurrency = 16\nmax_retries = 0\nbreaker_failures = 0\n\n\
             [learner]\nalgorithm = \"grpo\"\nthreads = 1\n{extra}\n",
            self.model.display().to_string()
        );
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// Every file under `dir`, at any depth.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Asserts that no file under `dir` holds `secret` anywhere in its bytes; returns how many files
/// were read (so a test can require that there was something to check).
pub fn assert_secret_in_no_file(dir: &Path, secret: &str) -> usize {
    let files = files_under(dir);
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "key found in {}", f.display());
    }
    files.len()
}

/// The set-up venv's Python (scripts/setup.sh installs tensorboard there).
pub fn venv_python() -> PathBuf {
    let venv = match (std::env::var_os("ORCHESTRATOR_VENV"), std::env::var_os("ORCHESTRATOR_CACHE")) {
        (Some(v), _) => PathBuf::from(v),
        (None, Some(c)) => PathBuf::from(c).join("venv"),
        (None, None) => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/orchestrator/venv"),
    };
    let py = venv.join("bin/python");
    assert!(py.is_file(), "{} missing: run scripts/setup.sh", py.display());
    py
}

/// scripts/check_tensorboard.py on `run_dir`: (exit code, output).
pub fn check_tensorboard(run_dir: &Path) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_tensorboard.py");
    let out = std::process::Command::new(venv_python()).arg(script).arg(run_dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// `n` loopback pool servers of `dialect` serving `model` as `served`, each generating with a
/// serial engine (so their rollouts are exactly the embedded serial engine's).
pub async fn pool_of(dialect: Dialect, model: &Path, served: &str, n: usize) -> Vec<PoolServer> {
    let mut v = Vec::new();
    for _ in 0..n {
        let opts = PoolServerOptions { engine: EngineConfig { serial: true, ..EngineConfig::default() }, ..PoolServerOptions::new(dialect, model, served) };
        v.push(PoolServer::start(opts).await.expect("pool server starts"));
    }
    v
}

/// Rewrites the config file at `path` (one of [`RunSetup::config`]) to generate on a remote pool:
/// `backend = "remote"` in `[engine]` and an `[engine.remote]` section of `kind` ("vllm" or
/// "sglang") on `servers` (base URLs) serving `served`, with `extra` lines of that section.
pub fn use_pool(path: &Path, servers: &[String], kind: &str, served: &str, extra: &str) {
    let urls: Vec<String> = servers.iter().map(|u| format!("{u:?}")).collect();
    let section = format!("\n[engine.remote]\nkind = \"{kind}\"\nservers = [{}]\nmodel = \"{served}\"\n{extra}\n", urls.join(", "));
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("[engine]\n"), "{}: no [engine] section", path.display());
    std::fs::write(path, text.replacen("[engine]\n", "[engine]\nbackend = \"remote\"\n", 1) + &section).unwrap();
}

/// The orchestrator binary with `args` (and `env` added), stdout and stderr captured, killed
/// if the test drops it.
pub fn spawn_bin(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> tokio::process::Child {
    tokio::process::Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn orchestrator")
}

/// Waits (at most 300 s) for a child of [`spawn_bin`]: (exit code, stdout, stderr).
pub async fn finish_bin(child: tokio::process::Child) -> (i32, String, String) {
    let out = tokio::time::timeout(std::time::Duration::from_secs(300), child.wait_with_output()).await.expect("the command finishes").unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}
