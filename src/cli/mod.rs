//! Subcommand implementations; `main.rs` only parses arguments.

pub mod bench_learner;
pub mod generate;
pub mod judge;
pub mod import;
pub mod select;
