//! What tests, benchmarks and `orchestrator tiny-model` share: tiny random models written on the
//! spot, a scripted OpenAI-compatible judge server on 127.0.0.1, vLLM and SGLang stand-ins for a
//! remote rollout pool, and the letter task with its judge. Real components on small inputs, so
//! a test needs no download and no GPU; nothing in a training run uses them.

pub mod gauge;
pub mod letters;
pub mod pool;
pub mod scripted;
pub mod tiny;
