//! `scripts/gpu-check.sh --cpu-smoke`: the GPU machine's one-shot script, run here on the CPU
//! binary with tiny shapes, so it cannot rot between the rare times a GPU is lent.

use crate::common;

use std::path::Path;
use std::process::Command;

#[test]
fn gpu_check_cpu_smoke_runs_every_stage_and_writes_one_json() {
    common::init();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gpu-check.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh");
    let run = Command::new("bash")
        .arg(&script)
        .args(["--cpu-smoke", "--bin"])
        .arg(common::bin())
        .arg("--out")
        .arg(&out)
        .arg("--work")
        .arg(tmp.path().join("work"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{}\n{stderr}", String::from_utf8_lossy(&run.stdout));
    assert!(run.status.success(), "gpu-check.sh failed");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let st = &v["stages"];
    for s in ["model", "plan", "engine", "learner", "run"] {
        assert_eq!(st[s]["status"], "ok", "stage {s}: {}", st[s]);
    }
    assert_eq!(v["ok"], true);
    assert!(st["model"]["bytes"].as_u64().unwrap() > 100_000_000, "a 2-layer SmolLM2 shape in f32");
    let rows = st["engine"]["result"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["ours_tok_s"].as_f64().unwrap() > 0.0 && r["plain_tok_s"].as_f64().unwrap() > 0.0));
    let learner = &st["learner"]["result"];
    assert!(learner["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(learner["lora_rank"], 8);
    assert!(st["learner"]["plan_gib"].as_f64().unwrap() > 0.0);
    assert!(st["learner"]["measured_host_gib"].as_f64().unwrap() > 0.0);
    let run = &st["run"]["result"];
    assert_eq!(run["steps"].as_array().unwrap().len(), 2);
    assert!(run["sync"]["secs"].as_f64().unwrap() > 0.0);
    assert!(st["run"]["plan_gib"].as_f64().unwrap() > 0.0);
    // f32 on the CPU: the learner recomputes what the engine sampled, to float rounding.
    let parity = v["parity_logprob_max_abs_diff"].as_f64().unwrap();
    assert!(parity < 1e-3, "{parity}");
    assert_eq!(v["phase_times"].as_array().unwrap().len(), 2);
    // The count a GPU run must keep at 0 does count here: f32 products on a CPU with the kernel.
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        for s in ["engine", "run"] {
            let n = st[s]["cpu_kernel_products"].as_u64().unwrap();
            assert!(n > 0, "stage {s}: {n} CPU kernel products");
        }
    }
}
