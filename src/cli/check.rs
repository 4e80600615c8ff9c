//! What `orchestrator check` says about a config's task file: how many tasks, how many carry
//! reference answers, and which `reward.reference` modes the file supports.

use anyhow::{Context, Result};

use crate::config::Config;
use crate::data::{read_tasks, References};
use crate::reward::Reference;

/// One line about `data.tasks` (None without one), e.g.
/// `data.tasks: 12 tasks, 0 with references: reward.reference = "group" only`. An error naming
/// `FILE:LINE` when the configured `reward.reference` cannot use the file (the ladder needs a
/// reference on every task), or when the file does not read; a file not there yet is said.
pub fn tasks_summary(cfg: &Config) -> Result<Option<String>> {
    let Some(path) = &cfg.data.tasks else { return Ok(None) };
    if !path.exists() {
        // `check` also vets configs written before their data exists; `run` refuses it.
        return Ok(Some(format!("data.tasks: {} does not exist yet (not checked)", path.display())));
    }
    let tasks = read_tasks(path, References::Optional).context("data.tasks")?;
    let with = tasks.iter().filter(|t| !t.references.is_empty()).count();
    if cfg.reward.reference == Reference::Ladder && with < tasks.len() {
        // The reader's own error names the first task without one, by file and line.
        read_tasks(path, References::Required).context("data.tasks with reward.reference = \"ladder\"")?;
    }
    let modes = if with == tasks.len() {
        "reward.reference = \"ladder\" or \"group\"".to_string()
    } else {
        format!("reward.reference = \"group\" only ({} without references)", tasks.len() - with)
    };
    let using = match cfg.reward.reference {
        Reference::Ladder => "ladder",
        Reference::Group if with > 0 => "group; its references are not used",
        Reference::Group => "group",
    };
    Ok(Some(format!("data.tasks: {} tasks, {with} with references: {modes} (this config: {using})", tasks.len())))
}
