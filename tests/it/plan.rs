//! `orchestrator plan` through the real binary on real config files: every figure of a small
//! shape checked against a hand computation, the shipped 7B config on 80 GB and 141 GB GPUs,
//! and bad input named by its key.

use crate::common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const MODEL_CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
  "tie_word_embeddings": true, "rms_norm_eps": 1e-5, "rope_theta": 10000.0
}"#;

const RUN_CONFIG: &str = r#"
[model]
path = "model"
dtype = "bf16"

[engine]
max_num_seqs = 4
[engine.sampling]
max_new_tokens = 100
[engine.paged_attention]
enabled = true
block_size = 32
memory_fraction = 0.5

[judge]
kind = "openai"
[judge.openai]
base_url = "http://127.0.0.1:9/v1"
model = "judge"
api_key_env = ""

[learner]
algorithm = "grpo"
device = "cuda"
dtype = "bf16"
micro_batch_tokens = 1024
logprob_chunk = 256
activation_recompute = true
[learner.lora]
enabled = true
rank = 4
alpha = 8.0
target_modules = ["q_proj", "v_proj"]
"#;

fn setup(dir: &Path, run_config: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::write(dir.join("model/config.json"), MODEL_CONFIG).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, run_config).unwrap();
    cfg
}

fn plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::bin()).arg("plan").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn plan_json(cfg: &Path, extra: &[&str]) -> Value {
    let json = cfg.with_extension("plan.json");
    let mut args = vec![cfg.to_str().unwrap(), "--json", json.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = plan(&args);
    assert!(ok, "plan failed: {stdout}\n{stderr}");
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn item(v: &Value, part: &str, name: &str) -> u64 {
    v[part].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap_or_else(|| panic!("{name}"))["bytes"].as_u64().unwrap()
}

/// Every figure of a 2-layer Llama (hidden 64, intermediate 128, 4 heads, 2 KV heads, vocab
/// 1000, tied), worked out by hand from the assumptions in `plan --help`.
#[test]
fn small_shape_matches_the_hand_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), RUN_CONFIG);
    let v = plan_json(&cfg, &["--gpu-memory", "8GiB"]);
    // Per layer: q 64x64 + k, v 64x32 + o 64x64 + MLP 3 x 64x128 + 2 norms of 64 = 36,992;
    // 2 layers + embedding 1000 x 64 + final norm 64.
    assert_eq!(v["parameters"], 138_048);
    assert_eq!(item(&v, "engine", "engine weights"), 276_096);
    // 2 layers x (K and V) x 2 KV heads x head_dim 16 x 2 bytes.
    assert_eq!(v["kv_bytes_per_token"], 256);
    // 4 sequences x (512 prompt + 100 new).
    assert_eq!(v["kv_tokens_demand"], 2448);
    // Logits 4 x 1000 x 4 bytes x 2, prefill 4 x 512 tokens x 3 x 128 x 2 bytes.
    assert_eq!(item(&v, "engine", "engine workspace"), 32_000 + 1_572_864);
    // LoRA r4 on q (4 x (64 + 64)) and v (4 x (64 + 32)) in 2 layers: 1,792 parameters, bf16.
    assert_eq!(item(&v, "learner", "trainable parameters"), 3_584);
    assert_eq!(item(&v, "learner", "gradients"), 3_584);
    // f32 m, v and master copy.
    assert_eq!(item(&v, "learner", "AdamW state"), 1_792 * 12);
    assert_eq!(item(&v, "learner", "reference copy"), 0);
    // 3 f32 copies of the largest adapter matrix, 4 x 128.
    assert_eq!(item(&v, "learner", "optimizer step temporaries"), 6_144);
    // One layer at T = 1024, s = 2: T x [16 x 64 + 2 x (5 x 64 + 4 x 32) + 4 x 4 + 8 x 128 + 2 x 8]
    // = 3,047,424, plus 3 T x 128 x 2 = 786,432 of backward temporaries: 3,833,856.
    // Recompute keeps 2 + 2 inputs of T x 64 x 2: 524,288.
    assert_eq!(v["activations_recompute"], 524_288 + 3_833_856);
    assert_eq!(v["activations_no_recompute"], 262_144 + 2 * 3_833_856);
    assert_eq!(item(&v, "learner", "activations"), 4_358_144);
    // 256 rows x 1000 x (16 + 4) + the selected hidden states and their gradient, 2 x T x 64 x 2.
    assert_eq!(item(&v, "learner", "log-prob chunk"), 5_120_000 + 262_144);
    let update = 3_584 + 4_358_144 + 5_382_144 + 6_144u64;
    // 1 GiB CUDA overhead + engine weights + learner weights, adapters, AdamW state.
    let at_start = (1u64 << 30) + 276_096 + 276_096 + 3_584 + 21_504;
    assert_eq!(v["at_engine_start"], at_start);
    let kv = (4u64 << 30) - at_start;
    assert_eq!(item(&v, "engine", "KV cache"), kv);
    assert_eq!(v["kv_tokens"], kv / 8192 * 32);
    assert_eq!(v["kv_bytes_after_sync"], kv - update);
    assert_eq!(v["peak"], (4u64 << 30) + update);
    assert_eq!(v["learner_fwd_bwd"], 276_096 + 3_584 + 3_584 + 4_358_144 + 5_382_144);
    assert_eq!(v["fits"], true);
    // The largest micro-batch leaves the KV cache at least a block after a sync (multiples of 256).
    let mbt = v["max_micro_batch_tokens"].as_u64().unwrap();
    assert!(mbt > 1024 && mbt % 256 == 0, "{mbt}");
}

#[test]
fn a_fraction_below_what_is_in_use_is_refused_and_the_fix_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), &RUN_CONFIG.replace("memory_fraction = 0.5", "memory_fraction = 0.1"));
    // 0.1 x 8 GiB < the 1 GiB in use when the engine starts.
    let v = plan_json(&cfg, &["--gpu-memory", "8GiB"]);
    assert_eq!(v["fits"], false);
    let p = v["problems"][0].as_str().unwrap();
    assert!(p.starts_with("engine.paged_attention.memory_fraction:") && p.contains("Num GPU blocks is 0"), "{p}");
    let (ok, stdout, _) = plan(&[cfg.to_str().unwrap(), "--gpu-memory", "8GiB"]);
    assert!(ok, "a verdict is not an error");
    assert!(stdout.contains("verdict: DOES NOT FIT"), "{stdout}");
}

/// The shipped 7B config, with Qwen2.5-7B's shape, on nvidia-smi's totals of an H100 80GB and an H200.
#[test]
fn the_7b_config_fits_80_and_141_gb() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/7b.toml");
    for gpu in ["81559MiB", "143771MiB"] {
        let (ok, stdout, stderr) = plan(&[cfg.to_str().unwrap(), "--like", "qwen2.5-7b", "--gpu-memory", gpu]);
        assert!(ok, "{stderr}");
        println!("{stdout}");
        assert!(stdout.contains("verdict: FITS"), "{gpu}: {stdout}");
        assert!(stdout.contains("7.616 B parameters"), "{stdout}");
    }
    // A 40 GB card does not hold two bf16 copies of 7.6 B parameters and a cache.
    let (ok, stdout, _) = plan(&[cfg.to_str().unwrap(), "--like", "qwen2.5-7b", "--gpu-memory", "40GB"]);
    assert!(ok);
    assert!(stdout.contains("verdict: DOES NOT FIT"), "{stdout}");
}

#[test]
fn bad_input_names_the_key_or_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), &RUN_CONFIG.replace("micro_batch_tokens = 1024", "micro_batch_tokens = 0"));
    let (ok, _, err) = plan(&[cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("learner.micro_batch_tokens"), "{err}");

    let cfg = setup(tmp.path(), RUN_CONFIG);
    let (ok, _, err) = plan(&[cfg.to_str().unwrap(), "--gpu-memory", "80 parsecs"]);
    assert!(!ok);
    assert!(err.contains("--gpu-memory") && err.contains("unknown unit"), "{err}");

    std::fs::write(tmp.path().join("model/config.json"), r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": "wide"}"#).unwrap();
    let (ok, _, err) = plan(&[cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("model.path") && err.contains("hidden_size"), "{err}");

    std::fs::remove_file(tmp.path().join("model/config.json")).unwrap();
    let (ok, _, err) = plan(&[cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("model.path") && err.contains("--like"), "{err}");
}

#[test]
fn help_states_the_assumptions() {
    let out = Command::new(common::bin()).args(["plan", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for s in ["Assumptions", "memory_fraction x GPU memory - memory in use", "AdamW", "activation_recompute"] {
        assert!(text.contains(s), "{s} not in --help:\n{text}");
    }
}
