//! Every integration test in one binary: one link of the whole dependency graph instead of one
//! per file (16 links cost about 400 s of CPU on a cold build). Each module is the file of the
//! same name; `cargo test --test it run::` runs one of them.

mod architecture;
mod cli;
mod common;
mod data;
mod engine;
mod eval;
mod gpu_check;
mod judge;
mod learner;
mod plan;
mod pool;
mod remote;
mod remote_product;
mod run;
mod synth;
mod tools;
