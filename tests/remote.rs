//! The remote rollout pool (engine.backend = "remote") against real HTTP servers on 127.0.0.1:
//! the vLLM and SGLang stand-ins of `testkit::pool`, which generate with our own engine on the
//! tiny model from the prompt ids they are sent, so ids and log-probs are real.

mod common;

use std::path::{Path, PathBuf};

use orchestrator::config::ModelConfig;
use orchestrator::engine::remote::prompt::PromptTemplate;
use orchestrator::engine::{ChatMessage, Engine, EngineConfig, GenRequest, MistralEngine, Role, SamplingConfig, SeedKey};
use orchestrator::testkit::tiny::TinySpec;

fn serial() -> EngineConfig {
    EngineConfig { serial: true, ..EngineConfig::default() }
}

async fn embedded(model: &Path) -> MistralEngine {
    let m = ModelConfig { path: model.to_path_buf(), format: Default::default(), dtype: Default::default() };
    MistralEngine::load(&m, &serial()).await.expect("engine loads")
}

/// Our templating and tokenisation give exactly the embedded engine's prompt ids, on the tiny
/// models and on any real model cached in ~/.cache/orchestrator/models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_ids_equal_the_embedded_engines() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = vec![
        common::tiny_model(&tmp.path().join("llama"), &TinySpec::llama(3)),
        common::tiny_model(&tmp.path().join("qwen2"), &TinySpec::qwen2(4)),
    ];
    let cache = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/orchestrator/models"));
    match cache.as_ref().and_then(|c| std::fs::read_dir(c).ok()) {
        Some(rd) => {
            for e in rd.flatten() {
                let p = e.path();
                if p.join("tokenizer.json").is_file() && p.join("config.json").is_file() {
                    dirs.push(p);
                }
            }
        }
        None => println!("note: no ~/.cache/orchestrator/models: compared on the tiny models only"),
    }
    let conversations: Vec<Vec<ChatMessage>> = vec![
        vec![ChatMessage::new(Role::User, "Write a short story about a lighthouse.")],
        vec![ChatMessage::new(Role::System, "You are terse."), ChatMessage::new(Role::User, "Describe the morning market, in detail: colours & voices <b>.")],
        vec![ChatMessage::new(Role::User, "  leading and trailing spaces  \n\nand newlines\n")],
        vec![ChatMessage::new(Role::User, "Ünïcödé — “quotes” 😀 and 'apostrophes'")],
    ];
    for dir in &dirs {
        let ours = PromptTemplate::load(dir).unwrap();
        let engine = embedded(dir).await;
        for (i, messages) in conversations.iter().enumerate() {
            let req = GenRequest { messages: messages.clone(), n: 1, seed: SeedKey::new(0, 0, i as u64) };
            let got = engine.generate(std::slice::from_ref(&req), &SamplingConfig::greedy(1)).await.unwrap();
            assert_eq!(ours.encode(messages).unwrap(), got[0][0].prompt_ids, "{}: conversation {i}", dir.display());
        }
        println!("prompt ids equal on {}", dir.display());
    }
}

