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
// Leaves re-exported under their old paths; modules import them from their own homes.
pub use crate::model::{DType, ModelConfig, ModelFormat};
pub use crate::validate::Problems;

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
    /// 0: each step generates, judges, then learns (synchronous). 1: one-step-off, the next
    /// step's rollouts are generated and judged while the learner trains on this step's (see
    /// `trainer::offpolicy`). Deeper pipelines are not implemented.
    pub max_off_policy_steps: u64,
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
    /// Judge-token budget of the whole run (prompt + completion tokens, resumes included; 0 =
    /// none): the step that reaches it is the last, then the run checkpoints and exits with
    /// status 6.
    pub max_judge_tokens: u64,
    /// Judge-cost budget, in the currency of `judge.openai.price_*_per_mtok` (0 = none; needs
    /// the prices): as `max_judge_tokens`.
    pub max_judge_cost: f64,
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
            max_off_policy_steps: 0,
            save_every: 10,
            keep_last: 3,
            keep_every: 0,
            judge_concurrency: 32,
            on_judge_down: OnJudgeDown::Stop,
            judge_down_max_wait_secs: 600.0,
            shuffle: true,
            tensorboard: true,
            max_judge_tokens: 0,
            max_judge_cost: 0.0,
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
        p.seconds(&format!("{key}.judge_down_max_wait_secs"), self.judge_down_max_wait_secs, 0.0);
        if self.max_off_policy_steps > 1 {
            p.push(
                &format!("{key}.max_off_policy_steps"),
                format!(
                    "must be 0 (synchronous) or 1 (one-step-off), got {}: deeper pipelines are not implemented",
                    self.max_off_policy_steps
                ),
            );
        }
        p.at_least(&format!("{key}.max_judge_cost"), self.max_judge_cost, 0.0);
        if self.name.contains('/') || self.name == ".." || self.name == "." {
            p.push(&format!("{key}.name"), format!("must be a plain directory name, got {:?}", self.name));
        }
    }
}

/// Key paths of every non-finite float under `v`.
fn non_finite_keys(v: &toml::Value, at: &str, out: &mut Vec<String>) {
    let join = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
    match v {
        toml::Value::Float(f) if !f.is_finite() => out.push(format!("{at} = {f}")),
        toml::Value::Table(t) => t.iter().for_each(|(k, v)| non_finite_keys(v, &join(k), out)),
        toml::Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| non_finite_keys(v, &format!("{at}[{i}]"), out)),
        _ => {}
    }
}

/// The build a config is checked for: this binary, or a CUDA build of it, so CI on a CPU
/// machine can check a GPU config (`orchestrator check --for-build cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Build {
    This,
    Cuda,
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
        let table = toml::from_str::<toml::Table>(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;

        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        let env_keys: Vec<String> = env_map.keys().cloned().collect();
        // `inf` and `nan` would reach the typed config as JSON nulls (JSON has no such numbers):
        // name them here instead, from the file and from the environment.
        let mut bad = Vec::new();
        non_finite_keys(&toml::Value::Table(table), "", &mut bad);
        for (k, v) in &env_map {
            if v.trim().parse::<f64>().is_ok_and(|x| !x.is_finite()) {
                let key = k[ENV_PREFIX.len() + 2..].to_lowercase().replace("__", ".");
                bad.push(format!("{key} (from {k})"));
            }
        }
        if !bad.is_empty() {
            bail!("{}: {}", path.display(), bad.iter().map(|k| format!("{k}: must be a finite number")).collect::<Vec<_>>().join("\n  "));
        }
        let built = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("engine.sampling.stop")
                    .with_list_parse_key("engine.remote.servers")
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
        let export = &mut self.engine.remote.export_dir;
        if !export.as_os_str().is_empty() && export.is_relative() {
            *export = base.join(&*export);
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
        self.engine.validate_with("engine", self.learner.lora.enabled, &mut p);
        self.run.validate("run", &mut p);
        self.judge.validate("judge", &mut p);
        if self.run.max_judge_cost > 0.0 {
            if !self.judge.is_panel() && self.judge.openai.prices().is_none() {
                p.push(
                    "run.max_judge_cost",
                    "needs judge.openai.price_prompt_per_mtok and judge.openai.price_completion_per_mtok (a cost budget without prices would never be reached)",
                );
            }
            // A panel's cost is its members'; an unpriced endpoint would spend without counting.
            for (i, m) in self.judge.panel.members.iter().enumerate() {
                if self.judge.is_panel() && m.kind == crate::judge::JudgeKind::Openai && m.openai.prices().is_none() {
                    p.push(
                        "run.max_judge_cost",
                        format!("needs judge.panel.members[{i}].openai.price_prompt_per_mtok and price_completion_per_mtok (member {:?} would spend uncounted)", m.name),
                    );
                }
            }
            if self.judge.is_panel() && !self.judge.priced() {
                p.push("run.max_judge_cost", "needs prices on at least one panel member (a cost budget without prices would never be reached)");
            }
        }
        self.reward.validate("reward", &mut p);
        self.validate_group_reference(&mut p);
        self.data.validate("data", &mut p);
        self.curriculum.validate("curriculum", &mut p);
        self.selection.validate("selection", &mut p);
        self.learner.validate("learner", &mut p);
        if p.0.is_empty() {
            Ok(())
        } else {
            bail!("{}", p.0.join("\n  "))
        }
    }

    /// `reward.reference = "group"`: a group of at least two rollouts to draw partners from, and
    /// no curriculum settings (there is no ladder to move: they would pretend otherwise).
    fn validate_group_reference(&self, p: &mut Problems) {
        if self.reward.reference != crate::reward::Reference::Group {
            return;
        }
        if self.run.n_samples < 2 {
            p.push(
                "reward.reference",
                format!(
                    "\"group\" compares each rollout with another rollout of its prompt: needs run.n_samples >= 2, got {}",
                    self.run.n_samples
                ),
            );
        }
        let (c, d) = (&self.curriculum, crate::curriculum::CurriculumConfig::default());
        let off = "has no effect with reward.reference = \"group\" (no reference ladder: the curriculum is off, every task stays at level 0); remove it";
        if c.mode != d.mode {
            p.push("curriculum.mode", off);
        }
        if c.advance_rule != d.advance_rule {
            p.push("curriculum.advance_rule", off);
        }
        for (key, v) in [("curriculum.advance_k", c.advance_k), ("curriculum.advance_window", c.advance_window)] {
            if v.is_some() {
                p.push(key, off);
            }
        }
    }

    /// Settings that are valid but probably not what the user wants, one line each.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let (sync_every, off) = (self.run.sync_every, self.run.max_off_policy_steps);
        if (sync_every > 1 || off >= 1) && self.learner.is_correction == crate::learner::config::IsCorrection::None {
            let algo = match self.learner.algorithm {
                crate::learner::Algorithm::Ppo => "ppo",
                crate::learner::Algorithm::Grpo => "grpo",
            };
            // Rollouts of step s come from the weights last synced before they were generated:
            // up to sync_every - 1 updates old, plus one more when generated a step ahead.
            let mut why = Vec::new();
            if sync_every > 1 {
                why.push(format!("run.sync_every = {sync_every}"));
            }
            if off >= 1 {
                why.push(format!("run.max_off_policy_steps = {off}"));
            }
            let fix = match (sync_every > 1, off >= 1) {
                (true, true) => "sync_every = 1 and max_off_policy_steps = 0",
                (true, false) => "sync_every = 1",
                _ => "max_off_policy_steps = 0",
            };
            w.push(format!(
                "{} with learner.algorithm = \"{algo}\": rollouts come from weights up to {} updates \
                 old, but the clipped ratio's old log-probs are the learner's current ones, so the update is \
                 off-policy and uncorrected; set learner.is_correction = \"token-tis\" or {fix}",
                why.join(" and "),
                sync_every - 1 + off,
            ));
        }
        let (e, s) = (&self.engine, &self.engine.sampling);
        if e.backend == crate::engine::Backend::Remote {
            w.extend(e.remote.max_loras_warning("engine.remote", off >= 1));
        }
        if e.backend == crate::engine::Backend::Remote
            && e.remote.kind == crate::engine::remote::RemoteKind::Vllm
            && (s.top_p < 1.0 || s.top_k > 0)
        {
            w.push(format!(
                "engine.remote.kind = \"vllm\" with engine.sampling.top_p = {} / top_k = {}: vLLM's processed log-probs \
                 are renormalised over the tokens top-p/top-k keep, so they sit above the learner's full-vocabulary \
                 ones (the importance ratio is < 1 on every token); keep top_p = 1 and top_k = 0 for exact ratios",
                s.top_p, s.top_k
            ));
        }
        w
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
}
