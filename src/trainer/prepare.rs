//! Everything `orchestrator run` settles before a model is loaded (options, config, tasks, run
//! directory, the checkpoint to resume from), and exporting a finished checkpoint.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::curriculum::Curriculum;
use crate::data::{read_tasks, References, Task};
use crate::reward::Reference;
use crate::rundir::RunDir;


/// Where a run starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest complete checkpoint of the run directory, if any.
    Auto,
    /// A fresh run; refused if the run directory already holds checkpoints or metrics.
    Never,
    /// This checkpoint directory.
    Path(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Resume::Auto,
            "never" => Resume::Never,
            p => Resume::Path(PathBuf::from(p)),
        })
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    pub run_dir: Option<PathBuf>,
    pub resume: Resume,
    /// Config keys (or prefixes) allowed to differ from the run's saved config on resume.
    pub allow_config_change: Vec<String>,
}

/// The run directory `opts` and `cfg` name.
pub fn run_dir_for(opts: &RunOptions, cfg: &Config) -> PathBuf {
    if let Some(d) = &opts.run_dir {
        return d.clone();
    }
    let name = if cfg.run.name.is_empty() {
        opts.config.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "run".into())
    } else {
        cfg.run.name.clone()
    };
    cfg.run.root.join(name)
}

/// Everything read and checked before any model is loaded.
pub struct Prepared {
    pub cfg: Config,
    pub tasks: Vec<Task>,
    pub run: RunDir,
    pub checkpoint: Option<PathBuf>,
    pub warnings: Vec<String>,
}

/// Loads the config and tasks, opens the run directory (config diff on resume) and finds the
/// checkpoint to resume from. No model is touched, so every mistake here fails fast.
pub fn prepare(opts: &RunOptions) -> Result<Prepared> {
    let cfg = Config::load(&opts.config)?;
    let tasks_path = cfg
        .data
        .tasks
        .clone()
        .with_context(|| format!("{}: data.tasks: `orchestrator run` needs a task file", opts.config.display()))?;
    // The ladder needs references (an error naming FILE:LINE without one); in-group comparison
    // needs none.
    let refs = match cfg.reward.reference {
        Reference::Ladder => References::Required,
        Reference::Group => References::Optional,
    };
    let tasks = read_tasks(&tasks_path, refs)?;
    Curriculum::new_for(&cfg.curriculum, &tasks, cfg.reward.reference)?;
    for (key, j) in cfg.judge.endpoints() {
        let var = &j.openai.api_key_env;
        if !var.is_empty() && std::env::var(var).map(|v| v.is_empty()).unwrap_or(true) {
            bail!(
                "{}: {key}.openai.api_key_env: the environment variable {var} is not set (export it, or set \
                 api_key_env = \"\" for an endpoint without a key)",
                opts.config.display()
            );
        }
    }
    let root = run_dir_for(opts, &cfg);
    let ckpts_dir = root.join("checkpoints");
    let mut warnings = cfg.warnings();
    let checkpoint = match &opts.resume {
        Resume::Never => {
            let has_ckpt = ckpts_dir.is_dir() && !Checkpoints::open(&ckpts_dir)?.steps()?.is_empty();
            let has_metrics = std::fs::metadata(root.join("metrics.jsonl")).map(|m| m.len() > 0).unwrap_or(false);
            if has_ckpt || has_metrics {
                bail!(
                    "--resume never: {} already holds a run (checkpoints or metrics); choose another --run-dir \
                     or resume it with --resume auto",
                    root.display()
                );
            }
            None
        }
        Resume::Auto => {
            if ckpts_dir.is_dir() {
                let (found, warns) = Checkpoints::open(&ckpts_dir)?.latest_valid()?;
                warnings.extend(warns);
                found.map(|(d, _)| d)
            } else {
                None
            }
        }
        Resume::Path(p) => {
            Checkpoints::verify(p).with_context(|| format!("--resume {}", p.display()))?;
            Some(p.clone())
        }
    };
    let run = RunDir::open(&root, &cfg, &opts.allow_config_change)?;
    Ok(Prepared { cfg, tasks, run, checkpoint, warnings })
}
