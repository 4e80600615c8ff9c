//! orchestrator: Writing-RL (arXiv 2506.05760) in one binary. See DESIGN.md for the method and
//! the shape of a training step.

pub mod chatml;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod curriculum;
pub mod data;
pub mod engine;
pub mod eval;
pub mod fsutil;
pub mod gguf;
pub mod jsonl;
pub mod judge;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod learner;
pub mod progress;
pub mod report;
pub mod rundir;
pub mod reward;
pub mod seed;
pub mod selection;
pub mod tensorboard;
pub mod testkit;
pub mod synth;
pub mod trainer;
pub mod validate;

/// Proof that libtorch is linked and usable: a 2x2 matmul through tch.
pub fn libtorch_matmul_check() -> Vec<f32> {
    let a = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
    let b = tch::Tensor::from_slice(&[5.0f32, 6.0, 7.0, 8.0]).reshape([2, 2]);
    Vec::<f32>::try_from(a.matmul(&b).reshape([4])).expect("f32 tensor")
}
