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
    Ok(())
}
