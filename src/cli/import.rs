//! `orchestrator import writingbench|parquet IN --out tasks.jsonl`: convert a dataset to native
//! task JSONL (written atomically; nothing is written when any line or row is bad).
//! `orchestrator import gguf MODEL.gguf --out DIR`: a GGUF model to an HF model directory.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::{self, References, Task};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// WritingBench `benchmark_all.jsonl` (tasks without references; build ladders with `select`).
    Writingbench,
    /// The official Writing-RL training parquet (references from `reward_model.ground_truth.target`).
    Parquet,
    /// A GGUF model (llama or qwen2) -> an HF model directory (`--out` must not exist).
    Gguf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    pub format: ImportFormat,
    pub input: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// WritingBench: keep only these languages (e.g. `en` or `en,zh`; given or inferred).
    #[arg(long, value_delimiter = ',')]
    pub lang: Vec<String>,
    /// GGUF: dtype of the written safetensors.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: crate::gguf::OutDType,
}

pub fn load(args: &ImportArgs) -> Result<(Vec<Task>, References)> {
    Ok(match args.format {
        ImportFormat::Writingbench => (data::writingbench::read(&args.input, &args.lang)?, References::Optional),
        ImportFormat::Parquet => {
            if !args.lang.is_empty() {
                anyhow::bail!("--lang applies to writingbench only");
            }
            (read_parquet(&args.input)?, References::Required)
        }
        ImportFormat::Gguf => anyhow::bail!("gguf imports a model, not tasks"),
    })
}

#[cfg(feature = "parquet")]
fn read_parquet(path: &std::path::Path) -> Result<Vec<Task>> {
    data::parquet::read(path)
}

#[cfg(not(feature = "parquet"))]
fn read_parquet(_path: &std::path::Path) -> Result<Vec<Task>> {
    anyhow::bail!("this binary was built without the `parquet` feature")
}

pub fn run(args: ImportArgs) -> Result<()> {
    if args.format == ImportFormat::Gguf {
        let s = crate::gguf::import_gguf(&args.input, &args.out, args.dtype)?;
        eprintln!(
            "wrote {} ({}, {} tensors, {:.1}M parameters, vocab {}, tied embeddings: {}) to {}",
            args.input.display(),
            s.architecture,
            s.tensors,
            s.parameters as f64 / 1e6,
            s.vocab_size,
            s.tied_embeddings,
            args.out.display()
        );
        return Ok(());
    }
    let (tasks, refs) = load(&args)?;
    data::write_tasks(&args.out, &tasks, refs)?;
    let with_refs = tasks.iter().filter(|t| !t.references.is_empty()).count();
    let rungs: usize = tasks.iter().map(|t| t.references.len()).sum();
    eprintln!(
        "wrote {} tasks ({} with references, {} references in all) to {}",
        tasks.len(),
        with_refs,
        rungs,
        args.out.display()
    );
    Ok(())
}
