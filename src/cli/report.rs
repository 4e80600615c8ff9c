//! `orchestrator report RUN_DIR`: plots and a markdown summary of a run's metrics.

use std::path::PathBuf;

use anyhow::Result;

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// A run directory holding metrics.jsonl; the report goes to RUN_DIR/report/.
    pub run_dir: PathBuf,
    /// TrueType font for plot text (default: fontconfig's sans-serif, else DejaVu Sans).
    #[arg(long)]
    pub font: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> Result<()> {
    let out = crate::report::run(&args.run_dir, args.font.as_deref())?;
    for (file, caption) in crate::report::PLOTS {
        println!("{caption:<28} {}", out.join(file).display());
    }
    println!("{:<28} {}", "summary", out.join("summary.md").display());
    // A run still going (or stopped early): say how far it is. `report` reads only the
    // complete lines of metrics.jsonl, so it is safe to run while the run writes it.
    let planned = std::fs::read_to_string(args.run_dir.join(crate::rundir::CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["run"]["steps"].as_u64());
    let done = crate::metrics::read_jsonl_lenient(&args.run_dir.join("metrics.jsonl"))?
        .last()
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0);
    if let Some(planned) = planned.filter(|&p| p > done) {
        println!("steps {done} of {planned} (the run is still going, or stopped early: run `report` again for newer steps)");
    }
    Ok(())
}
