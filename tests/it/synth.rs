//! Real-shape synthetic models (`src/synth.rs`): the writer's files on a reduced shape, and the
//! real mistral.rs engine and tch learner loading what it wrote, sampling from it and agreeing
//! on the ln-probs of the sampled ids.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;

use orchestrator::config::ModelConfig;
use orchestrator::engine::{ChatMessage, Engine, EngineConfig, GenRequest, MistralEngine, Role, Rollout, SamplingConfig, SeedKey};
use orchestrator::learner::{Learner, LearnerConfig};
use orchestrator::synth::{Family, Like, Shape, SynthDType, SynthSpec};

/// Qwen2.5-0.5B's layout (qwen2, q/k/v bias, tied embeddings) at a width the CPU runs quickly,
/// with a vocabulary past 65,792 so the tokenizer needs its third level of merge tokens.
fn reduced(family: Family, tie: bool) -> Shape {
    Shape {
        family,
        vocab_size: 70_000,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 4096,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        tie_word_embeddings: tie,
        rms_norm_eps: 1e-6,
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn writer_shards_like_hf_and_every_file_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let shape = reduced(Family::Qwen2, false);
    // ~9 M parameters in f32 (36 MB) in shards of at most 6 MB: the two 70,000 x 64 matrices
    // (17.9 MB each) get shards of their own, the layers share one.
    let spec = SynthSpec { shape: shape.clone(), dtype: SynthDType::F32, seed: 3, max_shard_bytes: 6_000_000 };
    let w = spec.write(&out, false).unwrap();
    assert_eq!(w.parameters, shape.parameters());
    assert_eq!(w.shards, 3, "embed, layers + norm, lm_head");
    let index = json(&out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let names: BTreeSet<String> = shape.tensors().into_iter().map(|t| t.name).collect();
    assert_eq!(map.keys().cloned().collect::<BTreeSet<_>>(), names);
    let mut total = 0u64;
    let files: BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(files.len(), 3);
    for f in files {
        let bytes = std::fs::read(out.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            assert_eq!(map[&name].as_str().unwrap(), f);
            total += view.data().len() as u64;
            let vals: Vec<f32> = view.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert!(vals.iter().all(|v| v.is_finite()));
            if name.ends_with("layernorm.weight") {
                assert!(vals.iter().all(|v| (0.9..=1.1).contains(v)), "{name}");
            }
        }
    }
    assert_eq!(total, index["metadata"]["total_size"].as_u64().unwrap());
    assert_eq!(total, w.bytes);
    let cfg = json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "Qwen2ForCausalLM");
    assert_eq!(cfg["vocab_size"], 70_000);
    assert_eq!(cfg["eos_token_id"], 69_999);
    // Same seed, same bytes; nothing is written over an existing directory.
    let again = tmp.path().join("m2");
    spec.write(&again, false).unwrap();
    for f in ["model-00002-of-00003.safetensors", "tokenizer.json", "config.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(again.join(f)).unwrap(), "{f}");
    }
    let err = spec.write(&out, false).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn published_configs_are_exact() {
    let q = Shape::like(Like::Qwen25_7b).config_json(SynthDType::Bf16);
    for (k, v) in [
        ("hidden_size", 3584),
        ("intermediate_size", 18944),
        ("num_hidden_layers", 28),
        ("num_attention_heads", 28),
        ("num_key_value_heads", 4),
        ("vocab_size", 152_064),
        ("max_position_embeddings", 32_768),
    ] {
        assert_eq!(q[k], v, "qwen2.5-7b {k}");
    }
    assert_eq!(q["rope_theta"], 1_000_000.0);
    assert_eq!(q["tie_word_embeddings"], false);
    assert_eq!(q["torch_dtype"], "bfloat16");
    let l = Shape::like(Like::Llama31_8b).config_json(SynthDType::F32);
    assert_eq!(l["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(l["rope_scaling"]["factor"], 8.0);
    assert_eq!(l["num_key_value_heads"], 8);
    assert_eq!(l["rms_norm_eps"], 1e-5);
    let s = Shape::like(Like::Qwen25_0_5b).config_json(SynthDType::Bf16);
    assert_eq!(s["tie_word_embeddings"], true);
    assert_eq!(s["num_key_value_heads"], 2);
    // The learner's parser accepts every one of them.
    for like in [Like::Qwen25_7b, Like::Qwen25_0_5b, Like::Llama31_8b, Like::Smollm2_135m] {
        let v = Shape::like(like).config_json(SynthDType::Bf16);
        let c: orchestrator::learner::model::Config = serde_json::from_value(v).unwrap();
        c.arch().unwrap();
        assert!(c.llama3_scaling().is_ok());
    }
}

async fn sample(dir: &Path, n: usize, max: usize) -> Vec<Rollout> {
    let model = ModelConfig { path: dir.to_path_buf(), format: Default::default(), dtype: Default::default() };
    let engine = MistralEngine::load(&model, &EngineConfig::default()).await.expect("engine loads");
    let req = GenRequest { messages: vec![ChatMessage::new(Role::User, "Write about the sea.")], n, seed: SeedKey::new(4, 0, 0) };
    let s = SamplingConfig { temperature: 1.0, max_new_tokens: max, ..SamplingConfig::default() };
    engine.generate(&[req], &s).await.unwrap().into_iter().flatten().collect()
}

/// mistral.rs and the learner load the synthetic directory (bf16 weights read as f32, tied and
/// untied, Qwen2 and Llama), rollouts sample ids all over the vocabulary and decode, and the
/// learner's ln-probs of those ids equal the engine's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_and_learner_load_it_and_agree() {
    common::init();
    for (family, tie) in [(Family::Qwen2, true), (Family::Llama, false)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        SynthSpec { shape: reduced(family, tie), dtype: SynthDType::Bf16, seed: 5, max_shard_bytes: 4_000_000 }.write(&dir, false).unwrap();
        let rs = sample(&dir, 3, 24).await;
        let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let mut high = 0;
        for r in &rs {
            assert!(!r.ids.is_empty());
            assert!(r.ids.iter().all(|&i| i < 70_000));
            high += r.ids.iter().filter(|&&i| i >= 256).count();
            assert_eq!(tok.decode(&r.ids, true).unwrap(), r.text, "the text is the decode of the ids");
            assert!(r.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
        }
        assert!(high > 0, "samples reach merge tokens");
        let learner = Learner::new(&LearnerConfig { threads: 2, ..LearnerConfig::default() }, &dir, 0).unwrap();
        let seqs: Vec<(&[u32], &[u32])> = rs.iter().map(|r| (&r.prompt_ids[..], &r.ids[..])).collect();
        let lp = learner.logprobs(&seqs, 1.0).unwrap();
        let worst = rs.iter().zip(&lp).flat_map(|(r, l)| r.logprobs.iter().zip(l).map(|(a, b)| (a - b).abs())).fold(0f32, f32::max);
        println!("{family:?} tied {tie}: max |engine - learner| ln p = {worst:.2e}");
        assert!(worst < 1e-3, "{family:?}: {worst}");
    }
}
