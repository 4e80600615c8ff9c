//! Subcommand implementations; `main.rs` only parses arguments.

pub mod bench_learner;
pub mod check;
pub mod eval;
pub mod export;
pub mod generate;
pub mod judge;
pub mod report;
pub mod import;
pub mod select;

use std::path::{Path, PathBuf};

/// A command's config file. Positional is the preferred form (as `run` and `check` always took
/// it); `--config FILE` is still accepted for this release.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// Config file (TOML).
    #[arg(value_name = "CONFIG", required_unless_present = "config_flag")]
    config: Option<PathBuf>,
    /// Same as the positional CONFIG (accepted for this release; prefer the positional form).
    #[arg(long = "config", value_name = "CONFIG", conflicts_with = "config")]
    config_flag: Option<PathBuf>,
}

impl ConfigArg {
    pub fn new(path: PathBuf) -> Self {
        Self { config: Some(path), config_flag: None }
    }
    pub fn path(&self) -> &Path {
        self.config.as_deref().or(self.config_flag.as_deref()).expect("clap requires one of the two")
    }
}
