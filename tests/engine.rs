//! The real mistral.rs engine on tiny random models written by the test.

mod common;

use std::collections::HashMap;

use mistralrs::{RequestBuilder, TextMessageRole};
use orchestrator::config::ModelConfig;
use orchestrator::engine::{
    ChatMessage, Engine, EngineConfig, FinishReason, GenRequest, MistralEngine, Role, Rollout,
    SamplingConfig, SeedKey,
};
use orchestrator::tiny::{Arch, TinySpec};

const PROMPTS: &[&str] = &[
    "Write a short story about a lighthouse.",
    "Describe the morning market.",
    "Dear hiring manager, I am writing to apply.",
    "Summarise the main points of the report.",
    "Poetry asks the reader to slow down.",
    "The committee will meet on Thursday.",
    "She opened the letter slowly.",
    "In conclusion, the evidence shows",
];

async fn engine_for(dir: &std::path::Path) -> MistralEngine {
    let model = ModelConfig {
        path: dir.to_path_buf(),
        format: Default::default(),
        dtype: Default::default(),
    };
    MistralEngine::load(&model, &EngineConfig::default()).await.expect("engine loads")
}

fn requests(prompts: &[&str], n: usize, run_seed: u64) -> Vec<GenRequest> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest {
            messages: vec![ChatMessage::new(Role::User, *p)],
            n,
            seed: SeedKey::new(run_seed, 0, i as u64),
        })
        .collect()
}

fn sampling(t: f64, max: usize) -> SamplingConfig {
    SamplingConfig { temperature: t, max_new_tokens: max, ..SamplingConfig::default() }
}

fn ids(out: &[Vec<Rollout>]) -> Vec<Vec<u32>> {
    out.iter().flatten().map(|r| r.ids.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_ids_different_seed_different_ids() {
    for spec in [TinySpec::llama(1), TinySpec::qwen2(2)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = common::tiny_model(tmp.path(), &spec);
        let engine = engine_for(&dir).await;
        let s = sampling(1.0, 24);
        let a = engine.generate(&requests(PROMPTS, 2, 7), &s).await.unwrap();
        let b = engine.generate(&requests(PROMPTS, 2, 7), &s).await.unwrap();
        assert_eq!(ids(&a), ids(&b), "{:?}: same seed, same batch", spec.arch);
        let c = engine.generate(&requests(PROMPTS, 2, 8), &s).await.unwrap();
        let differing = ids(&a).iter().zip(ids(&c)).filter(|(x, y)| *x != y).count();
        assert!(differing >= 12, "{:?}: only {differing}/16 samples changed with the seed", spec.arch);
        // The two samples of one prompt use different streams.
        assert!(a.iter().filter(|g| g[0].ids != g[1].ids).count() >= 6);
        // A fresh engine in the same process gives the same ids.
        drop(engine);
        let fresh = engine_for(&dir).await;
        let d = fresh.generate(&requests(PROMPTS, 2, 7), &s).await.unwrap();
        assert_eq!(ids(&a), ids(&d), "{:?}: fresh engine", spec.arch);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_decode_to_text_and_logprobs_are_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(tmp.path(), &TinySpec::llama(3));
    let engine = engine_for(&dir).await;
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let eos = tok.token_to_id(orchestrator::tiny::EOS).unwrap();
    let s = SamplingConfig { temperature: 0.9, top_p: 0.9, top_k: 40, max_new_tokens: 32, stop: vec![] };
    let out = engine.generate(&requests(PROMPTS, 3, 11), &s).await.unwrap();
    let mut stopped = 0;
    for r in out.iter().flatten() {
        assert_eq!(r.ids.len(), r.logprobs.len());
        assert!(!r.ids.is_empty());
        assert!(r.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0), "{:?}", r.logprobs);
        let decoded = engine.detokenize(&r.ids, true).await.unwrap();
        assert_eq!(decoded, r.text, "ids must decode to the returned text");
        // Our own tokenizer agrees with the engine's.
        assert_eq!(tok.decode(&r.ids, true).unwrap(), r.text);
        // The prompt ids are the chat template's tokens.
        let templ = format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", PROMPTS[r.request]);
        let want = tok.encode(templ, false).unwrap().get_ids().to_vec();
        assert_eq!(r.prompt_ids, want);
        match r.finish_reason {
            FinishReason::Length => assert_eq!(r.ids.len(), 32),
            FinishReason::Stop => {
                stopped += 1;
                assert_eq!(*r.ids.last().unwrap(), eos, "a stop without a stop string ends in EOS");
            }
        }
    }
    println!("{stopped}/24 samples ended with EOS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_equals_the_engines_own_argmax() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(tmp.path(), &TinySpec::qwen2(4));
    let engine = engine_for(&dir).await;
    let ours = engine.generate(&requests(&PROMPTS[..4], 1, 0), &sampling(0.0, 20)).await.unwrap();
    for (i, p) in PROMPTS[..4].iter().enumerate() {
        // mistral.rs's own deterministic (argmax) sampler, no processor of ours involved.
        let plain = engine
            .raw()
            .send_chat_request(RequestBuilder::new().add_message(TextMessageRole::User, *p).set_sampler_max_len(20))
            .await
            .unwrap();
        let text = plain.choices[0].message.content.clone().unwrap_or_default();
        assert_eq!(ours[i][0].text, text, "prompt {i}");
        assert_eq!(ours[i][0].ids.len(), plain.usage.completion_tokens);
    }
    // Greedy ignores the seed.
    let other = engine.generate(&requests(&PROMPTS[..4], 1, 99), &sampling(0.0, 20)).await.unwrap();
    assert_eq!(ids(&ours), ids(&other));
}

/// Batch size 1 vs 8: the same seeds should give the same ids. Batching may change logits in
/// the last bits; this measures how often tokens diverge and bounds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_size_one_and_eight_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(tmp.path(), &TinySpec::llama(5));
    let engine = engine_for(&dir).await;
    let s = sampling(1.0, 24);
    let batched = engine.generate(&requests(PROMPTS, 1, 21), &s).await.unwrap();
    let all = requests(PROMPTS, 1, 21);
    let (mut same_seq, mut tokens, mut same_tokens, mut max_lp_diff) = (0, 0, 0, 0f32);
    for (i, req) in all.iter().enumerate() {
        let single = engine.generate(std::slice::from_ref(req), &s).await.unwrap();
        let (a, b) = (&batched[i][0], &single[0][0]);
        if a.ids == b.ids {
            same_seq += 1;
        }
        // Compare up to the first divergence (after it the contexts differ).
        for (k, (x, y)) in a.ids.iter().zip(&b.ids).enumerate() {
            tokens += 1;
            if x != y {
                break;
            }
            same_tokens += 1;
            max_lp_diff = max_lp_diff.max((a.logprobs[k] - b.logprobs[k]).abs());
        }
    }
    println!(
        "batch 1 vs 8: {same_seq}/8 sequences identical, {same_tokens}/{tokens} tokens before divergence agree, \
         max |ln p diff| {max_lp_diff:.2e}"
    );
    assert!(same_seq >= 7, "batching changed {} of 8 sequences", 8 - same_seq);
    assert!(max_lp_diff < 1e-3, "ln-prob drift {max_lp_diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(tmp.path(), &TinySpec::llama(6));
    let engine = engine_for(&dir).await;
    let full = engine.generate(&requests(&PROMPTS[..1], 1, 0), &sampling(0.0, 40)).await.unwrap();
    let text = &full[0][0].text;
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 12, "greedy text too short for the test: {text:?}");
    let stop: String = chars[8..11].iter().collect();
    let mut s = sampling(0.0, 40);
    s.stop = vec![stop.clone()];
    let cut = engine.generate(&requests(&PROMPTS[..1], 1, 0), &s).await.unwrap();
    let r = &cut[0][0];
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert!(r.ids.len() < full[0][0].ids.len());
    assert_eq!(r.ids[..], full[0][0].ids[..r.ids.len()], "same greedy prefix");
    assert!(text.starts_with(r.text.as_str()), "{:?} is not a prefix of {text:?}", r.text);
    let first = text.find(&stop).unwrap();
    assert!(r.text.len() <= first + stop.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_new_weights_like_a_fresh_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let a = common::tiny_model(&tmp.path().join("a"), &TinySpec::llama(10));
    let b = common::tiny_model(&tmp.path().join("b"), &TinySpec::llama(11));
    let greedy = sampling(0.0, 24);
    let reqs = requests(PROMPTS, 1, 0);
    let engine = engine_for(&a).await;
    let before = ids(&engine.generate(&reqs, &greedy).await.unwrap());
    engine.reload(&b).await.unwrap();
    let after = ids(&engine.generate(&reqs, &greedy).await.unwrap());
    let fresh_b = ids(&engine_for(&b).await.generate(&reqs, &greedy).await.unwrap());
    assert_eq!(after, fresh_b, "after reload the engine must equal a fresh engine on the new weights");
    assert_ne!(before, after, "the two models must differ for this test to mean anything");
    // And back.
    engine.reload(&a).await.unwrap();
    assert_eq!(ids(&engine.generate(&reqs, &greedy).await.unwrap()), before);
    // A missing directory is an error and leaves the engine serving.
    let err = engine.reload(&tmp.path().join("nope")).await.unwrap_err();
    assert!(format!("{err:#}").contains("nope"), "{err:#}");
    assert_eq!(ids(&engine.generate(&reqs, &greedy).await.unwrap()), before);
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb / 1024.0
}

/// 20 reloads alternating between two ~17 MB models: memory must not grow by the weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_do_not_leak() {
    let tmp = tempfile::tempdir().unwrap();
    let medium = |seed| TinySpec {
        hidden_size: 256,
        intermediate_size: 1024,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        ..TinySpec::llama(seed)
    };
    let a = common::tiny_model(&tmp.path().join("a"), &medium(1));
    let b = common::tiny_model(&tmp.path().join("b"), &medium(2));
    let weights_mb = std::fs::metadata(a.join("model.safetensors")).unwrap().len() as f64 / 1e6;
    let engine = engine_for(&a).await;
    let reqs = requests(&PROMPTS[..2], 1, 0);
    let greedy = sampling(0.0, 4);
    for dir in [&b, &a] {
        engine.reload(dir).await.unwrap();
        engine.generate(&reqs, &greedy).await.unwrap();
    }
    let start = rss_mb();
    for i in 0..20 {
        engine.reload(if i % 2 == 0 { &b } else { &a }).await.unwrap();
        engine.generate(&reqs, &greedy).await.unwrap();
    }
    let grown = rss_mb() - start;
    println!("RSS growth over 20 reloads: {grown:.1} MB (weights {weights_mb:.1} MB each)");
    assert!(grown < 3.0 * weights_mb, "RSS grew {grown:.1} MB over 20 reloads of {weights_mb:.1} MB weights");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_model_path_is_an_error_naming_it() {
    common::init();
    let model = ModelConfig {
        path: "/definitely/not/here/HuggingFaceTB/SmolLM2".into(),
        format: Default::default(),
        dtype: Default::default(),
    };
    let t = std::time::Instant::now();
    let err = MistralEngine::load(&model, &EngineConfig::default()).await.err().expect("must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("/definitely/not/here/HuggingFaceTB/SmolLM2"), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(t.elapsed().as_secs() < 2, "no hub lookup");
    // A directory without weights is named too.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), "{}").unwrap();
    let model = ModelConfig { path: tmp.path().into(), ..model };
    let msg = format!("{:#}", MistralEngine::load(&model, &EngineConfig::default()).await.err().unwrap());
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
}

#[test]
fn spec_arch_layouts_differ() {
    let l = TinySpec::llama(0).weights();
    let q = TinySpec::qwen2(0).weights();
    assert!(!l.contains_key("lm_head.weight") && q.contains_key("lm_head.weight"));
    assert!(q.contains_key("model.layers.0.self_attn.q_proj.bias"));
    assert_eq!(TinySpec::qwen2(0).arch, Arch::Qwen2);
    let names: HashMap<_, _> = l.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    assert_eq!(names["model.layers.1.self_attn.k_proj.weight"], vec![32, 64]);
}
