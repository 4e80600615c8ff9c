//! Subcommand implementations; `main.rs` only parses arguments.

pub mod generate;
pub mod judge;
pub mod import;
pub mod select;
