//! Subcommand implementations; `main.rs` only parses arguments.

pub mod bench_learner;
pub mod eval;
pub mod export;
pub mod generate;
pub mod judge;
pub mod report;
pub mod import;
pub mod select;
