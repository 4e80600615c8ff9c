//! The tch learner against the real mistral.rs engine on tiny random models written by the test.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use orchestrator::config::ModelConfig;
use orchestrator::engine::{ChatMessage, Engine, EngineConfig, GenRequest, MistralEngine, Role, Rollout, SamplingConfig, SeedKey};
use orchestrator::learner::lora::LoraConfig;
use orchestrator::learner::model::{read_all, write_all, CausalLm};
use orchestrator::learner::{Algorithm, Learner, LearnerConfig, Trajectory};
use orchestrator::testkit::tiny::{TinySpec, EOS, PAD};
use tch::{Device, Kind, Tensor};

const PROMPTS: &[&str] = &[
    "Write a short story about a lighthouse.",
    "Describe the morning market.",
    "Dear hiring manager, I am writing to apply.",
    "Summarise the main points of the report.",
];

fn cfg() -> LearnerConfig {
    LearnerConfig { threads: 2, ..LearnerConfig::default() }
}

/// libtorch has one global random generator, and `Learner::new` seeds it (LoRA init, dropout
/// masks draw from it). Tests of this binary run in parallel threads, so each holds this lock:
/// otherwise one test's draws land between another's seeding and its draws, and a bit-exact
/// comparison fails at random. (A training process has one learner.)
fn tch_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// One sequence at a time: mistral.rs 0.8.1's batched CPU decode mixes the attention outputs
/// of sequences that share a step (see tests/it/engine.rs), which would corrupt the reference.
async fn engine_for(dir: &Path) -> MistralEngine {
    let model = ModelConfig { path: dir.to_path_buf(), format: Default::default(), dtype: Default::default() };
    MistralEngine::load(&model, &EngineConfig::default()).await.expect("engine loads")
}

fn requests(prompts: &[&str], n: usize, seed: u64) -> Vec<GenRequest> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest { messages: vec![ChatMessage::new(Role::User, *p)], n, seed: SeedKey::new(seed, 0, i as u64) })
        .collect()
}

fn sampling(t: f64, top_p: f64, max: usize) -> SamplingConfig {
    SamplingConfig { temperature: t, top_p, max_new_tokens: max, ..SamplingConfig::default() }
}

fn seqs(rs: &[Rollout]) -> Vec<(&[u32], &[u32])> {
    rs.iter().map(|r| (&r.prompt_ids[..], &r.ids[..])).collect()
}

fn eos_ids(dir: &Path) -> Vec<u32> {
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    vec![tok.token_to_id(EOS).unwrap(), tok.token_to_id(PAD).unwrap()]
}

/// The learner's teacher-forced ln-probs equal the ln-probs the engine recorded while sampling,
/// for Llama (tied) and Qwen2 (untied, q/k/v bias), at several temperatures, with micro-batches
/// and logit chunks small enough that both code paths split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprob_parity_with_the_engine() {
    let _tch = tch_lock();
    for spec in [TinySpec::llama(21), TinySpec::qwen2(22)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = common::tiny_model(tmp.path(), &spec);
        let engine = engine_for(&dir).await;
        let learner = Learner::new(&LearnerConfig { micro_batch_tokens: 150, logprob_chunk: 7, ..cfg() }, &dir, 0).unwrap();
        let mut worst = 0f32;
        let mut tokens = 0;
        for (t, top_p) in [(1.0, 1.0), (0.7, 0.9), (1.3, 1.0), (0.0, 1.0)] {
            // The whole batch at once with two samples per prompt, as the trainer asks for it.
            let mut rs: Vec<Rollout> = Vec::new();
            for seed in [5, 6] {
                rs.extend(engine.generate(&requests(PROMPTS, 2, seed), &sampling(t, top_p, 48)).await.unwrap().into_iter().flatten());
            }
            let ours = learner.logprobs(&seqs(&rs), t).unwrap();
            for (r, lp) in rs.iter().zip(&ours) {
                assert_eq!(lp.len(), r.logprobs.len());
                for (a, b) in lp.iter().zip(&r.logprobs) {
                    worst = worst.max((a - b).abs());
                    tokens += 1;
                }
            }
        }
        println!("{:?}: max |learner - engine| ln p = {worst:.2e} over {tokens} tokens", spec.arch);
        assert!(tokens > 200, "too few tokens compared: {tokens}");
        assert!(worst <= 1e-4, "{:?}: max diff {worst}", spec.arch);
    }
}

fn rewrite_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", CausalLm::load(dir, Device::Cpu, Kind::Float, None, true).unwrap_err())
}

#[test]
fn model_files_are_checked_by_name() {
    let _tch = tch_lock();
    tch::set_num_threads(2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(&tmp.path().join("m"), &TinySpec::qwen2(3));
    let good = CausalLm::load(&dir, Device::Cpu, Kind::Float, None, true).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 100, 7, 3]).unsqueeze(0);
    let want = tch::no_grad(|| good.logits(&ids, None, orchestrator::learner::Fwd::EVAL));

    // Sharded: two files and an index give the same model.
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), sharded.join(f)).unwrap();
    }
    let all = read_all(&dir.join("model.safetensors")).unwrap();
    let (mut a, mut b, mut map) = (Vec::new(), Vec::new(), BTreeMap::new());
    for (i, (n, t)) in all.iter().enumerate() {
        let file = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        if i % 2 == 0 { a.push((n.clone(), t.shallow_clone())) } else { b.push((n.clone(), t.shallow_clone())) }
        map.insert(n.clone(), file);
    }
    write_all(&sharded.join("model-00001-of-00002.safetensors"), &a, None).unwrap();
    write_all(&sharded.join("model-00002-of-00002.safetensors"), &b, None).unwrap();
    std::fs::write(sharded.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    let sh = CausalLm::load(&sharded, Device::Cpu, Kind::Float, None, true).unwrap();
    assert!(tch::no_grad(|| sh.logits(&ids, None, orchestrator::learner::Fwd::EVAL)).equal(&want));

    // bf16 loads and stays close.
    let bf = CausalLm::load(&dir, Device::Cpu, Kind::BFloat16, None, true).unwrap();
    assert_eq!(bf.kind(), Kind::BFloat16);
    let got = tch::no_grad(|| bf.logits(&ids, None, orchestrator::learner::Fwd::EVAL)).to_kind(Kind::Float);
    let diff = (got - &want).abs().max().double_value(&[]);
    assert!(diff < 0.25, "bf16 logits differ by {diff}");

    // Missing, extra and misshapen weights are named.
    let edit = |name: &str, f: &dyn Fn(&mut Vec<(String, Tensor)>)| {
        let d = tmp.path().join(name);
        common::tiny_model(&d, &TinySpec::qwen2(3));
        let mut ts: Vec<(String, Tensor)> = read_all(&d.join("model.safetensors")).unwrap().into_iter().collect();
        f(&mut ts);
        write_all(&d.join("model.safetensors"), &ts, None).unwrap();
        load_err(&d)
    };
    let e = edit("missing", &|ts| ts.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight"));
    assert!(e.contains("missing weight model.layers.1.mlp.up_proj.weight"), "{e}");
    let e = edit("extra", &|ts| ts.push(("model.layers.0.self_attn.o_proj.bias".into(), Tensor::zeros([64], (Kind::Float, Device::Cpu)))));
    assert!(e.contains("unexpected tensor model.layers.0.self_attn.o_proj.bias"), "{e}");
    let e = edit("shape", &|ts| {
        for (n, t) in ts.iter_mut() {
            if n == "model.layers.0.self_attn.k_proj.bias" {
                *t = Tensor::zeros([31], (Kind::Float, Device::Cpu));
            }
        }
    });
    assert!(e.contains("model.layers.0.self_attn.k_proj.bias") && e.contains("shape"), "{e}");

    // Architecture and RoPE scaling.
    let d = common::tiny_model(&tmp.path().join("arch"), &TinySpec::llama(3));
    rewrite_config(&d, |v| v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]));
    let e = load_err(&d);
    assert!(e.contains("unsupported architecture GPT2LMHeadModel") && e.contains("config.json"), "{e}");
    rewrite_config(&d, |v| {
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    });
    let e = load_err(&d);
    assert!(e.contains("rope_scaling type \"yarn\" is not supported"), "{e}");
    rewrite_config(&d, |v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    });
    let scaled = CausalLm::load(&d, Device::Cpu, Kind::Float, None, true).unwrap();
    let plain = CausalLm::load(&common::tiny_model(&tmp.path().join("plain"), &TinySpec::llama(3)), Device::Cpu, Kind::Float, None, true).unwrap();
    let f = orchestrator::learner::Fwd::EVAL;
    let (x, y) = tch::no_grad(|| (scaled.logits(&ids, None, f), plain.logits(&ids, None, f)));
    assert!(!x.allclose(&y, 1e-5, 1e-5, false), "llama3 scaling must change the low frequencies");
}

/// Right padding with causal attention, and left padding with an explicit key mask, give each
/// sequence the logits it has alone.
#[test]
fn padding_does_not_change_logits() {
    let _tch = tch_lock();
    tch::set_num_threads(2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(tmp.path(), &TinySpec::llama(8));
    let lm = CausalLm::load(&dir, Device::Cpu, Kind::Float, None, true).unwrap();
    let f = orchestrator::learner::Fwd::EVAL;
    let short = [4i64, 8, 15];
    let long = [16i64, 23, 42, 99, 7];
    let alone = |s: &[i64]| tch::no_grad(|| lm.logits(&Tensor::from_slice(s).unsqueeze(0), None, f)).squeeze_dim(0);
    let (a, b) = (alone(&short), alone(&long));
    let right = Tensor::from_slice(&[4i64, 8, 15, 0, 0, 16, 23, 42, 99, 7]).view([2, 5]);
    let r = tch::no_grad(|| lm.logits(&right, None, f));
    assert!(r.get(0).narrow(0, 0, 3).allclose(&a, 1e-5, 1e-5, false));
    assert!(r.get(1).allclose(&b, 1e-5, 1e-5, false));
    let left = Tensor::from_slice(&[0i64, 0, 4, 8, 15, 16, 23, 42, 99, 7]).view([2, 5]);
    let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 5]);
    let l = tch::no_grad(|| lm.logits(&left, Some(&mask), f));
    assert!(l.get(0).narrow(0, 2, 3).allclose(&a, 1e-5, 1e-5, false));
    assert!(l.get(1).allclose(&b, 1e-5, 1e-5, false));
}

async fn rollouts(dir: &Path, n: usize, t: f64, max: usize) -> Vec<Vec<Rollout>> {
    let engine = engine_for(dir).await;
    engine.generate(&requests(PROMPTS, n, 77), &sampling(t, 1.0, max)).await.unwrap()
}

/// Rewards: sample 0 and 1 of each prompt win, the others lose.
fn scored(groups: &[Vec<Rollout>]) -> Vec<Trajectory> {
    groups
        .iter()
        .enumerate()
        .flat_map(|(g, rs)| rs.iter().map(move |r| orchestrator::trainer::trajectory(r, if r.sample < 2 { 1.0 } else { 0.0 }, g as u64)))
        .collect()
}

fn seq_logp(l: &Learner, ts: &[Trajectory]) -> Vec<f64> {
    let s: Vec<(&[u32], &[u32])> = ts.iter().map(|t| (&t.prompt_ids[..], &t.response_ids[..])).collect();
    l.logprobs(&s, 1.0).unwrap().iter().map(|v| v.iter().map(|&x| x as f64).sum()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ppo_and_grpo_raise_rewarded_and_lower_penalised_sequences() {
    let _tch = tch_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(tmp.path(), &TinySpec::qwen2(31));
    let groups = rollouts(&dir, 4, 1.0, 16).await;
    let ts = scored(&groups);
    for algorithm in [Algorithm::Grpo, Algorithm::Ppo] {
        let c = LearnerConfig {
            algorithm,
            lr: 3e-3,
            ppo_epochs: 2,
            mini_batches: 2,
            kl_coef: 0.01,
            kl_estimator: orchestrator::learner::loss::KlEstimator::K3,
            entropy_coef: 0.001,
            ..cfg()
        };
        let mut l = Learner::new(&c, &dir, 1).unwrap();
        let before = seq_logp(&l, &ts);
        let mut last = None;
        for _ in 0..3 {
            last = Some(l.update(&ts, 1.0).unwrap());
        }
        let st = last.unwrap();
        let after = seq_logp(&l, &ts);
        println!("{algorithm:?}: {st:?}");
        for (i, t) in ts.iter().enumerate() {
            let d = after[i] - before[i];
            if t.reward > 0.5 {
                assert!(d > 0.0, "{algorithm:?}: rewarded sequence {i} went from {} to {}", before[i], after[i]);
            } else {
                assert!(d < 0.0, "{algorithm:?}: penalised sequence {i} went from {} to {}", before[i], after[i]);
            }
        }
        assert_eq!(st.optimizer_steps, 4);
        assert!(st.kl > 0.0 && st.grad_norm > 0.0 && st.entropy > 0.0);
        assert!(st.behaviour_logprob_max_diff > 0.0, "the policy moved, so the engine's ln-probs are stale");
        if algorithm == Algorithm::Ppo {
            assert!(st.value_loss > 0.0);
        }
    }
}

fn trainable_snapshot(l: &Learner) -> Vec<(String, Tensor)> {
    l.trainable().iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect()
}

/// 4 updates straight equal 2 updates, save, a fresh learner, load, 2 updates: bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_is_bit_exact() {
    let _tch = tch_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(&tmp.path().join("m"), &TinySpec::llama(41));
    let groups = rollouts(&dir, 3, 1.0, 12).await;
    let ts = scored(&groups);
    let lora = LoraConfig { enabled: true, rank: 4, alpha: 8.0, dropout: 0.1, ..LoraConfig::default() };
    let variants = [
        ("full-ppo", LearnerConfig { kl_coef: 0.05, ..cfg() }),
        ("lora-grpo", LearnerConfig { algorithm: Algorithm::Grpo, lora: lora.clone(), kl_coef: 0.05, kl_estimator: orchestrator::learner::loss::KlEstimator::K3, ..cfg() }),
    ];
    for (name, base) in variants {
        let c = LearnerConfig {
            lr: 1e-3,
            ppo_epochs: 2,
            mini_batches: 2,
            micro_batch_tokens: 64,
            activation_recompute: name.starts_with("lora"),
            schedule: orchestrator::learner::optim::Schedule::Cosine,
            warmup_steps: 2,
            total_steps: 16,
            weight_decay: 0.01,
            ..base
        };
        let mut straight = Learner::new(&c, &dir, 9).unwrap();
        for _ in 0..4 {
            straight.update(&ts, 1.0).unwrap();
        }
        let mut first = Learner::new(&c, &dir, 9).unwrap();
        for _ in 0..2 {
            first.update(&ts, 1.0).unwrap();
        }
        let ck = tmp.path().join(format!("ck-{name}"));
        first.save(&ck).unwrap();
        drop(first);
        let mut resumed = Learner::new(&c, &dir, 9).unwrap();
        resumed.load(&ck).unwrap();
        assert_eq!(resumed.optimizer_steps(), 8);
        for _ in 0..2 {
            resumed.update(&ts, 1.0).unwrap();
        }
        let (a, b) = (trainable_snapshot(&straight), trainable_snapshot(&resumed));
        assert_eq!(a.len(), b.len());
        for ((n, x), (m, y)) in a.iter().zip(&b) {
            assert_eq!(n, m);
            assert!(x.equal(y), "{name}: {n} differs after resume (max {})", (x - y).abs().max().double_value(&[]));
        }
        // And training moved them.
        let init = trainable_snapshot(&Learner::new(&c, &dir, 9).unwrap());
        let moved = init.iter().zip(&a).filter(|((_, x), (_, y))| !x.equal(y)).count();
        assert!(moved * 2 > a.len(), "{name}: only {moved}/{} tensors changed", a.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_checkpoints_name_the_tensor() {
    let _tch = tch_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(&tmp.path().join("m"), &TinySpec::llama(51));
    let l = Learner::new(&cfg(), &dir, 0).unwrap();
    let ck = tmp.path().join("ck");
    l.save(&ck).unwrap();
    let w = ck.join("trainable.safetensors");
    let orig = std::fs::read(&w).unwrap();
    let tamper = |f: &dyn Fn(&mut Vec<(String, Tensor)>)| {
        std::fs::write(&w, &orig).unwrap();
        let mut ts: Vec<(String, Tensor)> = read_all(&w).unwrap().into_iter().collect();
        f(&mut ts);
        write_all(&w, &ts, None).unwrap();
        let mut fresh = Learner::new(&cfg(), &dir, 0).unwrap();
        format!("{:#}", fresh.load(&ck).unwrap_err())
    };
    let e = tamper(&|ts| {
        for (n, _) in ts.iter_mut() {
            if n == "model.norm.weight" {
                *n = "model.norm.scale".into();
            }
        }
    });
    assert!(e.contains("missing tensor model.norm.weight"), "{e}");
    let e = tamper(&|ts| ts.push(("value_head.extra".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu)))));
    assert!(e.contains("unexpected tensor value_head.extra"), "{e}");
    let e = tamper(&|ts| {
        for (n, t) in ts.iter_mut() {
            if n == "model.layers.1.self_attn.v_proj.weight" {
                *t = Tensor::zeros([32, 63], (Kind::Float, Device::Cpu));
            }
        }
    });
    assert!(e.contains("model.layers.1.self_attn.v_proj.weight") && e.contains("[32, 63]"), "{e}");
    // A LoRA learner refuses a full-model checkpoint.
    std::fs::write(&w, &orig).unwrap();
    let c = LearnerConfig { lora: LoraConfig { enabled: true, ..LoraConfig::default() }, ..cfg() };
    let e = format!("{:#}", Learner::new(&c, &dir, 0).unwrap().load(&ck).unwrap_err());
    assert!(e.contains("lora"), "{e}");
}

/// Full fine-tuning and LoRA: the exported HF directory, served by a fresh engine, decodes the
/// same greedy tokens as the learner's own greedy decode; the adapter uses PEFT's names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_serve_the_trained_policy() {
    let _tch = tch_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(&tmp.path().join("m"), &TinySpec::llama(61));
    let groups = rollouts(&dir, 2, 1.0, 12).await;
    let ts = scored(&groups);
    let eos = eos_ids(&dir);
    let lora = LoraConfig { enabled: true, rank: 4, alpha: 16.0, target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], ..LoraConfig::default() };
    for (name, c) in [("full", LearnerConfig { lr: 2e-2, ..cfg() }), ("lora", LearnerConfig { lr: 5e-2, lora, ..cfg() })] {
        let mut l = Learner::new(&c, &dir, 3).unwrap();
        let base_greedy: Vec<Vec<u32>> = groups.iter().map(|g| l.greedy(&g[0].prompt_ids, 24, &eos)).collect();
        for _ in 0..3 {
            l.update(&ts, 1.0).unwrap();
        }
        let out = tmp.path().join(format!("export-{name}"));
        l.export(&out).unwrap();
        let engine = engine_for(&out).await;
        let served = engine.generate(&requests(PROMPTS, 1, 0), &sampling(0.0, 1.0, 24)).await.unwrap();
        let mut changed = 0;
        for (i, g) in served.iter().enumerate() {
            let ours = l.greedy(&g[0].prompt_ids, 24, &eos);
            assert_eq!(g[0].ids, ours, "{name}: prompt {i}");
            changed += usize::from(ours != base_greedy[i]);
        }
        assert!(changed > 0, "{name}: training must change some greedy output for the test to mean anything");
        if name == "lora" {
            let ad = tmp.path().join("adapter");
            l.export_adapter(&ad).unwrap();
            let cfgj: serde_json::Value = serde_json::from_slice(&std::fs::read(ad.join("adapter_config.json")).unwrap()).unwrap();
            assert_eq!(cfgj["peft_type"], "LORA");
            assert_eq!(cfgj["r"], 4);
            let names: Vec<String> = read_all(&ad.join("adapter_model.safetensors")).unwrap().into_keys().collect();
            assert_eq!(names.len(), 2 * 3 * 2, "{names:?}");
            assert!(names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()), "{names:?}");
            assert!(names.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight".to_string()), "{names:?}");
            // Only adapters (and the value head) trained: base weights are untouched.
            let base = read_all(&dir.join("model.safetensors")).unwrap();
            let vars = l.policy().vs.variables();
            assert!(base.iter().all(|(n, t)| vars[n].equal(t)));
            assert!(l.trainable().iter().all(|(n, _)| n.contains("lora_") || n.starts_with("value_head")));
        }
    }
}

/// Per-layer recompute gives the same update as keeping every activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_recompute_gives_the_same_update() {
    let _tch = tch_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(&tmp.path().join("m"), &TinySpec::qwen2(71));
    // Four samples per prompt, two rewarded: with two, every reward is 1, every advantage 0 and
    // nothing but the value head moves, so equal snapshots would prove nothing.
    let ts = scored(&rollouts(&dir, 4, 1.0, 16).await);
    let mut snaps = Vec::new();
    let mut start = None;
    for recompute in [false, true] {
        let mut l = Learner::new(&LearnerConfig { lr: 1e-3, activation_recompute: recompute, ..cfg() }, &dir, 0).unwrap();
        start.get_or_insert_with(|| trainable_snapshot(&l));
        l.update(&ts, 1.0).unwrap();
        snaps.push(trainable_snapshot(&l));
    }
    // Both updates moved the weights, and by the same amount: equal snapshots of unmoved weights
    // would prove nothing.
    let start = start.unwrap();
    for snap in &snaps {
        let moved = start.iter().zip(snap).filter(|((_, a), (_, b))| !a.equal(b)).count();
        assert!(moved * 2 > start.len(), "only {moved} of {} tensors moved", start.len());
    }
    for ((n, a), (_, b)) in snaps[0].iter().zip(&snaps[1]) {
        assert!(a.allclose(b, 1e-6, 1e-7, false), "{n}: max diff {}", (a - b).abs().max().double_value(&[]));
    }
}

/// Weights whose logits overflow give NaN gradients: every such optimizer step is skipped
/// (weights, f32 state and counters untouched, counted in the stats) and after
/// `max_skipped_steps` in a row the update fails with `Diverged`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_gradients_skip_the_step_and_then_stop() {
    let _tch = tch_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(&tmp.path().join("m"), &TinySpec::llama(73));
    let ts = scored(&rollouts(&dir, 4, 1.0, 8).await);
    // A final norm weight near f32::MAX overflows the hidden states to +-inf and the loss to NaN.
    let path = dir.join("model.safetensors");
    let mut w: Vec<(String, Tensor)> = read_all(&path).unwrap().into_iter().collect();
    for (n, t) in &mut w {
        if n == "model.norm.weight" {
            *t = t.full_like(3e38);
        }
    }
    write_all(&path, &w, None).unwrap();
    let c = LearnerConfig { lr: 1e-3, mini_batches: 1, ppo_epochs: 1, max_skipped_steps: 2, algorithm: Algorithm::Grpo, ..cfg() };
    let mut l = Learner::new(&c, &dir, 0).unwrap();
    let before = trainable_snapshot(&l);
    let st = l.update(&ts, 1.0).unwrap();
    assert_eq!((st.skipped_steps, st.optimizer_steps), (1, 0), "{st:?}");
    assert!(st.grad_norm.is_nan(), "no applied step, no norm: {st:?}");
    for ((n, a), (_, b)) in before.iter().zip(l.trainable()) {
        assert!(a.equal(b), "{n} changed by a skipped step");
    }
    let ck = tmp.path().join("ck");
    l.save(&ck).unwrap();
    let opt = read_all(&ck.join("optimizer.safetensors")).unwrap();
    assert!(opt.values().all(|t| t.isfinite().all().int64_value(&[]) == 1), "optimizer state took a non-finite value");
    let e = l.update(&ts, 1.0).unwrap_err();
    let d = e.downcast_ref::<orchestrator::learner::Diverged>().expect("a Diverged error");
    assert_eq!(d.skipped_in_a_row, 2);
    assert!(e.to_string().contains("non-finite gradient norm"), "{e}");
    for ((n, a), (_, b)) in before.iter().zip(l.trainable()) {
        assert!(a.equal(b), "{n} changed");
    }
}

/// With LoRA the untouched weights are written once per run directory and reused; they are
/// written again when the model they came from or the LoRA targets change (both may, on resume
/// with --allow-config-change), never served stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_sync_weights_follow_the_model_and_targets() {
    let _tch = tch_lock();
    use orchestrator::trainer::sync::export;
    let tmp = tempfile::tempdir().unwrap();
    let a = common::tiny_model(&tmp.path().join("a"), &TinySpec::llama(91));
    let b = common::tiny_model(&tmp.path().join("b"), &TinySpec::llama(92));
    let lora = |targets: &[&str]| LearnerConfig {
        lora: LoraConfig { enabled: true, rank: 4, target_modules: targets.iter().map(|s| s.to_string()).collect(), ..LoraConfig::default() },
        ..cfg()
    };
    let root = tmp.path().join("policy");
    let frozen = |name: &str| read_all(&root.join("frozen.safetensors")).unwrap().remove(name);
    let embed = "model.embed_tokens.weight";
    let la = Learner::new(&lora(&["q_proj", "v_proj"]), &a, 0).unwrap();
    let (_, e1) = export(&la, &root, 1).unwrap();
    assert!(e1.frozen_bytes > 0);
    let (_, e2) = export(&la, &root, 2).unwrap();
    assert_eq!(e2.frozen_bytes, 0, "same model and targets: the frozen file is reused");
    let want_a = read_all(&a.join("model.safetensors")).unwrap().remove(embed).unwrap();
    assert!(frozen(embed).unwrap().equal(&want_a));

    // Another model at another path: rewritten from it.
    let lb = Learner::new(&lora(&["q_proj", "v_proj"]), &b, 0).unwrap();
    let (dir, e3) = export(&lb, &root, 3).unwrap();
    assert!(e3.frozen_bytes > 0, "a changed model.path must rewrite the frozen weights");
    let want_b = read_all(&b.join("model.safetensors")).unwrap().remove(embed).unwrap();
    assert!(frozen(embed).unwrap().equal(&want_b));
    assert!(read_all(&dir.join("model-00001-of-00002.safetensors")).unwrap()[embed].equal(&want_b));

    // Other targets: k_proj is no longer frozen (it is trained), v_proj now is.
    let lk = Learner::new(&lora(&["q_proj", "k_proj"]), &b, 0).unwrap();
    let (dir, e4) = export(&lk, &root, 4).unwrap();
    assert!(e4.frozen_bytes > 0);
    let f = read_all(&root.join("frozen.safetensors")).unwrap();
    assert!(f.contains_key("model.layers.0.self_attn.v_proj.weight") && !f.contains_key("model.layers.0.self_attn.k_proj.weight"));
    let trained = read_all(&dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert!(trained.contains_key("model.layers.0.self_attn.k_proj.weight") && !trained.contains_key("model.layers.0.self_attn.v_proj.weight"));
}

/// The log-prob head works in f32 whatever the weights' dtype: bf16 logits have about three
/// significant digits, which would put every ln-prob of a bf16 learner off by as much.
#[test]
fn bf16_logprobs_use_an_f32_head() {
    let _tch = tch_lock();
    use orchestrator::learner::batch::{token_stats, Entropy};
    // Data from our own RNG: libtorch's global generator is shared with the other tests of this
    // binary (the learner seeds it), and drawing from it here would make their runs differ.
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut normal = |n: usize, scale: f32| -> Vec<f32> {
        (0..n).map(|_| (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5) * 2.0 * scale).collect()
    };
    let h = Tensor::from_slice(&normal(64 * 128, 2.0)).reshape([64, 128]).to_kind(Kind::BFloat16);
    let w = Tensor::from_slice(&normal(1000 * 128, 0.5)).reshape([1000, 128]).to_kind(Kind::BFloat16);
    let ids: Vec<i64> = (0..64).map(|i| (i * 37 % 1000) as i64).collect();
    let tgt = Tensor::from_slice(&ids);
    let (lp, _) = token_stats(&h, &w, &tgt, 1.0, 16, Entropy::Skip);
    assert_eq!(lp.kind(), Kind::Float);
    let want = h.to_kind(Kind::Float).matmul(&w.to_kind(Kind::Float).tr()).log_softmax(-1, Kind::Float).gather(1, &tgt.unsqueeze(1), false).squeeze_dim(1);
    let diff = (&lp - &want).abs().max().double_value(&[]);
    let bf16_logits = h.matmul(&w.tr()).to_kind(Kind::Float).log_softmax(-1, Kind::Float).gather(1, &tgt.unsqueeze(1), false).squeeze_dim(1);
    let old = (&bf16_logits - &want).abs().max().double_value(&[]);
    println!("max |ln p - f32 reference|: f32 head {diff:.2e}, bf16 head {old:.2e}");
    assert!(diff < 1e-4, "{diff}");
    assert!(old > 10.0 * diff.max(1e-6), "the reference check must be able to tell the two apart ({old})");
}


/// The `[learner]` section loads from TOML with the rest of the config; bad values name their key.
#[test]
fn learner_config_section_loads_and_names_bad_keys() {
    let _tch = tch_lock();
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let extra = "[learner]\nalgorithm = \"grpo\"\nlr = 2e-5\ndual_clip = 3.0\n[learner.lora]\nenabled = true\nrank = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";
    let (_, c) = common::config_for(tmp.path(), &model, extra);
    assert_eq!(c.learner.algorithm, Algorithm::Grpo);
    assert_eq!(c.learner.lora.rank, 8);
    assert_eq!(c.learner.dual_clip, Some(3.0));
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, format!("[model]\npath = {:?}\n[learner]\nclip_range = 0.0\n[learner.lora]\nenabled = true\nalpha = -1.0\n", model.display().to_string())).unwrap();
    let e = format!("{:#}", orchestrator::config::Config::load_with_env(&path, Vec::<(String, String)>::new()).unwrap_err());
    assert!(e.contains("learner.clip_range") && e.contains("learner.lora.alpha") && e.contains("bad.toml"), "{e}");
    std::fs::write(&path, format!("[model]\npath = {:?}\n[learner]\nalgorithm = \"dpo\"\n", model.display().to_string())).unwrap();
    let e = format!("{:#}", orchestrator::config::Config::load_with_env(&path, Vec::<(String, String)>::new()).unwrap_err());
    assert!(e.contains("learner.algorithm"), "{e}");
}

/// bf16 weights train through f32 master copies, and the masters survive save/load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_updates_through_f32_masters() {
    let _tch = tch_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(&tmp.path().join("m"), &TinySpec::qwen2(81));
    let ts = scored(&rollouts(&dir, 4, 1.0, 12).await);
    let c = LearnerConfig { dtype: orchestrator::learner::config::LearnerDType::Bf16, lr: 1e-3, algorithm: Algorithm::Grpo, ..cfg() };
    let mut l = Learner::new(&c, &dir, 0).unwrap();
    assert!(l.trainable().iter().all(|(_, t)| t.kind() == Kind::BFloat16));
    let before = trainable_snapshot(&l);
    let st = l.update(&ts, 1.0).unwrap();
    assert!(st.loss.is_finite() && st.grad_norm > 0.0, "{st:?}");
    let moved = before.iter().zip(l.trainable()).filter(|((_, a), (_, b))| !a.equal(b)).count();
    assert!(moved > 0);
    let ck = tmp.path().join("ck");
    l.save(&ck).unwrap();
    let names: Vec<String> = read_all(&ck.join("optimizer.safetensors")).unwrap().into_keys().collect();
    assert!(names.iter().any(|n| n.starts_with("master.")), "{names:?}");
    let mut r = Learner::new(&c, &dir, 0).unwrap();
    r.load(&ck).unwrap();
    l.update(&ts, 1.0).unwrap();
    r.update(&ts, 1.0).unwrap();
    for ((n, a), (_, b)) in l.trainable().iter().zip(r.trainable()) {
        assert!(a.equal(b), "{n} differs after a bf16 resume");
    }
}

/// Measures what the f32 head buys on a real model in bf16: ln-probs of a text under the bf16
/// learner, computed the old way (bf16 logits, then f32) and the new way (f32 head), each against
/// the f32 model. `ORCH_PARITY_MODEL=~/.cache/orchestrator/models/smollm2-f32 cargo test --release
/// --test learner bf16_head_parity_on_a_real_model -- --ignored --nocapture`.
#[test]
#[ignore = "needs a real model directory in ORCH_PARITY_MODEL"]
fn bf16_head_parity_on_a_real_model() {
    let _tch = tch_lock();
    tch::set_num_threads(2);
    let dir = std::path::PathBuf::from(std::env::var("ORCH_PARITY_MODEL").expect("ORCH_PARITY_MODEL"));
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = "The lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had \
                taught him. Out at sea the fishing boats were turning home, their lamps small against the dark water, \
                and the wind carried the smell of salt and rain. He trimmed the wick, wound the clockwork, and waited \
                for the first beam to sweep across the rocks below, where the waves broke white and loud.";
    let ids: Vec<u32> = tok.encode(text, false).unwrap().get_ids().to_vec();
    let (prompt, response) = ids.split_at(8);
    let t_ids = Tensor::from_slice(&ids.iter().map(|&i| i as i64).collect::<Vec<_>>()).unsqueeze(0);
    let tgt = Tensor::from_slice(&response.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let lp_of = |logits: Tensor| -> Tensor {
        let l = logits.squeeze_dim(0).to_kind(Kind::Float).narrow(0, prompt.len() as i64 - 1, response.len() as i64);
        l.log_softmax(-1, Kind::Float).gather(1, &tgt.unsqueeze(1), false).squeeze_dim(1)
    };
    let f32m = CausalLm::load(&dir, Device::Cpu, Kind::Float, None, true).unwrap();
    let want = tch::no_grad(|| lp_of(f32m.logits(&t_ids, None, orchestrator::learner::Fwd::EVAL)));
    drop(f32m);
    let bf = CausalLm::load(&dir, Device::Cpu, Kind::BFloat16, None, true).unwrap();
    let old = tch::no_grad(|| lp_of(bf.logits(&t_ids, None, orchestrator::learner::Fwd::EVAL)));
    drop(bf);
    let l = Learner::new(&LearnerConfig { dtype: orchestrator::learner::config::LearnerDType::Bf16, ..cfg() }, &dir, 0).unwrap();
    let new = Tensor::from_slice(&l.logprobs(&[(prompt, response)], 1.0).unwrap()[0]);
    let stats = |t: &Tensor| {
        let d = (t - &want).abs();
        (d.max().double_value(&[]), d.mean(Kind::Float).double_value(&[]))
    };
    let (om, oa) = stats(&old);
    let (nm, na) = stats(&new);
    println!("{} tokens of {}: |ln p(bf16) - ln p(f32)| max/mean: bf16 head {om:.4}/{oa:.4}, f32 head {nm:.4}/{na:.4}", response.len(), dir.display());
}

/// Truncated importance sampling with the engine's behaviour log-probs: on-policy the weights
/// are 1 (ratio within 1e-4) and the update is the uncorrected one; with rollouts from older
/// weights the mismatch shows, the correction changes the update, and ratios above the cap are
/// truncated and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_tis_is_one_on_policy_and_engages_off_policy() {
    let _tch = tch_lock();
    use orchestrator::learner::config::IsCorrection;
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model(&tmp.path().join("m"), &TinySpec::llama(95));
    let ts = scored(&rollouts(&dir, 4, 1.0, 12).await);
    let base = LearnerConfig { lr: 1e-2, algorithm: Algorithm::Grpo, ..cfg() };
    let tis = LearnerConfig { is_correction: IsCorrection::TokenTis, is_cap: 2.0, ..base.clone() };

    // On-policy: same weights in the engine and the learner.
    let (mut a, mut b) = (Learner::new(&base, &dir, 0).unwrap(), Learner::new(&tis, &dir, 0).unwrap());
    let (sa, sb) = (a.update(&ts, 1.0).unwrap(), b.update(&ts, 1.0).unwrap());
    assert!(sb.behaviour_logprob_max_diff < 1e-4, "{sb:?}");
    assert!(sb.is_mismatch_kl.abs() < 1e-5 && sb.is_clipped_share == 0.0, "{sb:?}");
    // Same loss and gradient (Adam would magnify 1e-6 differences of near-zero gradients, so the
    // gradient norm is compared rather than the weights).
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-4 * x.abs().max(1e-3);
    assert!(close(sa.loss, sb.loss) && close(sa.grad_norm, sb.grad_norm), "on-policy TIS changed the update: {sa:?} vs {sb:?}");

    // Off-policy: the learners moved, the rollouts did not. Shift some behaviour log-probs down
    // by 3 so their ratio exp(3) > cap is truncated.
    let mut stale = ts.clone();
    let mut shifted = 0;
    for t in stale.iter_mut().step_by(3) {
        for lp in t.behaviour_logprobs.iter_mut().step_by(2) {
            *lp -= 3.0;
            shifted += 1;
        }
    }
    let tokens: usize = stale.iter().map(|t| t.response_ids.len()).sum();
    let (sa, sb) = (a.update(&stale, 1.0).unwrap(), b.update(&stale, 1.0).unwrap());
    println!("off-policy: mismatch KL {:.4}, clipped share {:.3} ({shifted} of {tokens} tokens shifted)", sb.is_mismatch_kl, sb.is_clipped_share);
    assert!(sb.is_mismatch_kl.abs() > 0.05, "the learner moved and mu was shifted: {sb:?}");
    assert!(sb.is_clipped_share >= shifted as f64 / tokens as f64 - 1e-9, "{sb:?}");
    assert!((sa.is_clipped_share - sb.is_clipped_share).abs() <= 1.0 / tokens as f64, "measured either way: {sa:?} vs {sb:?}");
    assert!(!close(sa.grad_norm, sb.grad_norm), "the correction must change an off-policy update: {sa:?} vs {sb:?}");
}
