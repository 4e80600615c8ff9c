//! Typed configuration: one section per module, loaded from TOML with
//! `ORCHESTRATOR__SECTION__KEY` environment overrides.
//!
//! Loading goes TOML + env -> `config::Value` -> `serde_json::Value` -> typed struct through
//! `serde_path_to_error`, so a wrong type or an unknown key is reported with its full key path
//! and the file it came from. Range checks run afterwards in [`Config::validate`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;

/// Environment prefix for overrides: `ORCHESTRATOR__ENGINE__SAMPLING__TOP_P=0.9`.
pub const ENV_PREFIX: &str = "ORCHESTRATOR";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub judge: crate::judge::JudgeConfig,
    #[serde(default)]
    pub reward: crate::reward::RewardConfig,
    #[serde(default)]
    pub data: crate::data::DataConfig,
    #[serde(default)]
    pub curriculum: crate::curriculum::CurriculumConfig,
    #[serde(default)]
    pub selection: crate::selection::SelectionConfig,
    #[serde(default)]
    pub learner: crate::learner::LearnerConfig,
}

/// The policy model: an HF directory (config.json, tokenizer.json, safetensors) or a GGUF file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub format: ModelFormat,
    #[serde(default)]
    pub dtype: DType,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFormat {
    /// `.gguf` file -> gguf, otherwise an HF safetensors directory.
    #[default]
    Auto,
    Safetensors,
    Gguf,
}

/// Compute dtype. There is no `auto`: mistral.rs picks BF16 on CPU (slow) and, in a CUDA build,
/// shells out to nvidia-smi to decide, so we always say what we want.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DType {
    #[default]
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Root of every random stream in a run (sampling, task order, learner).
    pub seed: u64,
    /// Run name: the run directory is `<root>/<name>` unless `--run-dir` is given. Empty = the
    /// config file's stem.
    pub name: String,
    /// Where run directories live, relative to the working directory.
    pub root: PathBuf,
    /// Training steps in the whole run (a resumed run continues up to this step).
    pub steps: u64,
    /// Prompts per step.
    pub batch_prompts: usize,
    /// Rollouts per prompt.
    pub n_samples: usize,
    /// Export the learner's weights to the engine every N steps (1 = on-policy).
    pub sync_every: u64,
    /// Write a checkpoint every N steps (the last step always gets one).
    pub save_every: u64,
    /// Checkpoints kept: the newest `keep_last`, plus every step divisible by `keep_every` (0 = none).
    pub keep_last: usize,
    pub keep_every: u64,
    /// Rollouts judged at once while the engine is still generating.
    pub judge_concurrency: usize,
    /// When the judge's circuit breaker is open at the end of a step's judging: `stop` saves a
    /// checkpoint and exits; `pause` waits for the judge and re-asks the unscored rollouts.
    pub on_judge_down: OnJudgeDown,
    /// `pause`: give up (checkpoint and exit) after waiting this long for the judge.
    pub judge_down_max_wait_secs: f64,
    /// Shuffle the task order each epoch.
    pub shuffle: bool,
    /// Write TensorBoard event files into the run directory as steps end (one scalar per
    /// numeric metric), for `tensorboard --logdir <run.root>`.
    pub tensorboard: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnJudgeDown {
    #[default]
    Stop,
    Pause,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            name: String::new(),
            root: PathBuf::from("runs"),
            steps: 100,
            batch_prompts: 8,
            n_samples: 4,
            sync_every: 1,
            save_every: 10,
            keep_last: 3,
            keep_every: 0,
            judge_concurrency: 32,
            on_judge_down: OnJudgeDown::Stop,
            judge_down_max_wait_secs: 600.0,
            shuffle: true,
            tensorboard: true,
        }
    }
}

impl RunConfig {
    pub fn validate(&self, key: &str, p: &mut Problems) {
        for (name, v) in [
            ("steps", self.steps),
            ("batch_prompts", self.batch_prompts as u64),
            ("n_samples", self.n_samples as u64),
            ("sync_every", self.sync_every),
            ("save_every", self.save_every),
            ("keep_last", self.keep_last as u64),
            ("judge_concurrency", self.judge_concurrency as u64),
        ] {
            if v == 0 {
                p.push(&format!("{key}.{name}"), "must be >= 1, got 0");
            }
        }
        p.at_least(&format!("{key}.judge_down_max_wait_secs"), self.judge_down_max_wait_secs, 0.0);
        if self.name.contains('/') || self.name == ".." || self.name == "." {
            p.push(&format!("{key}.name"), format!("must be a plain directory name, got {:?}", self.name));
        }
    }
}

/// The build a config is checked for: this binary, or a CUDA build of it, so CI on a CPU
/// machine can check a GPU config (`orchestrator check --for-build cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Build {
    This,
    Cuda,
}

/// Collects range errors as `key.path: message` lines.
#[derive(Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    pub fn push(&mut self, key: &str, msg: impl std::fmt::Display) {
        self.0.push(format!("{key}: {msg}"));
    }
    /// Checks `lo < v <= hi`.
    pub fn open_closed(&mut self, key: &str, v: f64, lo: f64, hi: f64) {
        if !(v > lo && v <= hi) {
            self.push(key, format!("must be in ({lo}, {hi}], got {v}"));
        }
    }
    pub fn at_least(&mut self, key: &str, v: f64, lo: f64) {
        if !(v >= lo) {
            self.push(key, format!("must be >= {lo}, got {v}"));
        }
    }
    pub fn positive(&mut self, key: &str, v: f64) {
        if !(v > 0.0) {
            self.push(key, format!("must be > 0, got {v}"));
        }
    }
}

impl Config {
    /// Loads, type-checks and validates `path` (plus environment overrides).
    /// Relative paths inside the file are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`] with an explicit environment, so tests need not mutate the process env.
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        Self::load_for(path, env, Build::This)
    }

    /// As [`Config::load_with_env`], checking what the given build can run (see [`Build`]).
    pub fn load_for(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
        build: Build,
    ) -> Result<Self> {
        if !path.is_file() {
            bail!("config file {} does not exist", path.display());
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        // Syntax errors: toml reports line and column.
        toml::from_str::<toml::Table>(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;

        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        let env_keys: Vec<String> = env_map.keys().cloned().collect();
        let built = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("engine.sampling.stop")
                    .source(Some(env_map)),
            )
            .build()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let value: serde_json::Value = built
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            let origin = if env_keys.is_empty() {
                String::new()
            } else {
                format!(" (after environment overrides {})", env_keys.join(", "))
            };
            anyhow::anyhow!("{}: {key}: {}{origin}", path.display(), e.inner())
        })?;
        // Absolute, so a run's saved config (and `eval` on its checkpoints) works from any
        // working directory.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::path::absolute(dir).with_context(|| format!("{}: resolving its directory", path.display()))?;
        cfg.resolve_paths(&base);
        cfg.validate_for(build)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if self.model.path.is_relative() {
            self.model.path = base.join(&self.model.path);
        }
        self.judge.resolve_paths(base);
        self.data.resolve_paths(base);
    }

    /// Range checks; every problem is reported, each with its key path.
    pub fn validate(&self) -> Result<()> {
        self.validate_for(Build::This)
    }

    /// Range checks plus what `build` can run.
    pub fn validate_for(&self, build: Build) -> Result<()> {
        let mut p = Problems::default();
        for (key, msg, here) in self.needs_cuda() {
            if build == Build::This && !here {
                p.push(key, format!("{msg}; this binary has no CUDA (scripts/build-cuda.sh builds one)"));
            }
        }
        self.engine.validate("engine", &mut p);
        self.run.validate("run", &mut p);
        self.judge.validate("judge", &mut p);
        self.reward.validate("reward", &mut p);
        self.data.validate("data", &mut p);
        self.selection.validate("selection", &mut p);
        self.learner.validate("learner", &mut p);
        if p.0.is_empty() {
            Ok(())
        } else {
            bail!("{}", p.0.join("\n  "))
        }
    }

    /// Settings only a CUDA build can run, as (key path, why, whether this binary can).
    pub fn needs_cuda(&self) -> Vec<(&'static str, &'static str, bool)> {
        let mut v = Vec::new();
        if self.engine.paged_attention.enabled {
            v.push((
                "engine.paged_attention.enabled",
                "paged attention needs a CUDA build (--features cuda)",
                cfg!(feature = "cuda"),
            ));
        }
        if self.learner.device.starts_with("cuda") {
            v.push((
                "learner.device",
                "a cuda learner needs a CUDA libtorch build (--features torch-cuda)",
                cfg!(feature = "torch-cuda"),
            ));
        }
        v
    }

    /// The model's format after resolving `auto`.
    pub fn model_format(&self) -> ModelFormat {
        match self.model.format {
            ModelFormat::Auto
                if self.model.path.extension().is_some_and(|e| e == "gguf") =>
            {
                ModelFormat::Gguf
            }
            ModelFormat::Auto => ModelFormat::Safetensors,
            f => f,
        }
    }
}
