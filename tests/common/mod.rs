//! Shared test fixtures: tiny model directories and configs on disk.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Once;

use orchestrator::config::Config;
use orchestrator::testkit::tiny::TinySpec;

static INIT: Once = Once::new();

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
