#!/usr/bin/env bash
# The 7B path in one command, for a lent GPU machine (no Rust, no network): run it from a copy
# of the working tree with the CUDA binary from scripts/build-cuda.sh carried beside it
# (orchestrator.zst, orchestrator.xz or orchestrator in the tree's root, or --bin). It finds the CUDA and libtorch
# libraries of the machine's torch installation itself, writes a random model of Qwen2.5-7B's
# exact shape (bf16), and measures, each stage under its own time budget:
#   model    writing the synthetic model (seconds, bytes/s)
#   plan     `orchestrator plan` of every configuration measured below
#   engine   tokens/s with paged attention at 1, 16 and 64 concurrent sequences x 512 new tokens
#   learner  LoRA + recompute forward/backward tokens/s at one 8k-token sequence
#   run      a 2-step `orchestrator bench run` in configs/7b.toml's shape (LoRA, paged attention,
#            bf16) against the scripted judge: phase times, weight sync (merge, export, reload),
#            engine-vs-learner log-prob max |diff| on the step's rollouts
# and checks that no matrix product of the engine and run stages took our CPU kernel's path
# (`cpu_kernel_products` 0; the CPU smoke run must count some),
# and writes one JSON (--out, default gpu-check.json) with plan's prediction beside every
# measured peak GPU memory (nvidia-smi, sampled every 200 ms; it includes the CUDA context and
# what the caching allocators hold). A stage cut short by its budget is reported as such, with
# the tail of its log and whatever it measured before.
#
#   scripts/gpu-check.sh [--bin BIN] [--out FILE] [--work DIR] [--like qwen2.5-7b]
#   scripts/gpu-check.sh --cpu-smoke [--bin BIN] [--out FILE]   # the same stages, tiny shapes, CPU
#
# Budgets (seconds) can be changed with GPU_CHECK_BUDGET_<STAGE>=N, e.g. GPU_CHECK_BUDGET_RUN=300;
# GPU_CHECK_PYTHON names the Python whose torch to use, GPU_CHECK_LIBS the library path outright.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE=0; BIN=""; OUT=""; WORK=""; LIKE="qwen2.5-7b"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --bin) BIN="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    --like) LIKE="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$PWD/gpu-check.json}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
mkdir -p "$WORK" "$WORK/tmp"
WORK="$(cd "$WORK" && pwd)"
# Run directories, exports and the engine's link directories stay in the work directory.
export TMPDIR="$WORK/tmp"
PY="$(command -v python3 || command -v python || true)"
[ -n "$PY" ] || { echo "gpu-check: python3 is needed to assemble the JSON" >&2; exit 2; }
T_START=$(date +%s)
log() { echo "[gpu-check +$(( $(date +%s) - T_START ))s] $*" >&2; }

# --- the binary and its libraries ----------------------------------------------------------
find_bin() {
  if [ -n "$BIN" ]; then echo "$BIN"; return; fi
  if [ "$SMOKE" = 1 ]; then
    for b in "${CARGO_TARGET_DIR:-}/release/orchestrator" "$HOME/.cache/orchestrator/target/release/orchestrator"; do
      [ -x "$b" ] && { echo "$b"; return; }
    done
  fi
  for b in "$ROOT/orchestrator" "$ROOT/orchestrator.zst" "$ROOT/orchestrator.xz" "$HOME/.cache/orchestrator/target-cuda/release/orchestrator"; do
    [ -f "$b" ] && { echo "$b"; return; }
  done
}
BIN="$(find_bin)"
[ -n "$BIN" ] && [ -f "$BIN" ] || { echo "gpu-check: no binary found (pass --bin, or put orchestrator[.zst] in $ROOT)" >&2; exit 2; }
if [[ "$BIN" == *.zst || "$BIN" == *.xz ]]; then
  dest="$WORK/orchestrator"
  if [[ "$BIN" == *.zst ]] && command -v zstd >/dev/null; then
    zstd -q -d -f "$BIN" -o "$dest" || exit 2
  elif [[ "$BIN" == *.xz ]] && command -v xz >/dev/null; then
    xz -d -c "$BIN" >"$dest" || exit 2
  else
    # Python's lzma is always there; zstd is in the standard library from 3.14 (or the
    # zstandard package). Without either, carry an .xz: `xz -T0 -9 -k orchestrator`.
    "$PY" - "$BIN" "$dest" <<'EOF' || { echo "gpu-check: cannot decompress $BIN (no zstd tool or Python module; carry orchestrator.xz instead)" >&2; exit 2; }
import sys
src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
if src.endswith(".xz"):
    import lzma
    out = lzma.decompress(data)
else:
    try:
        from compression import zstd
        out = zstd.decompress(data)
    except ImportError:
        import zstandard
        out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
open(dst, "wb").write(out)
EOF
  fi
  chmod +x "$dest"; BIN="$dest"
fi

if [ "$SMOKE" = 0 ]; then
  # torch's own lib directory (libtorch) and every nvidia/*/lib of its CUDA wheels, found
  # without importing torch.
  LIBS=""
  for cand in ${GPU_CHECK_PYTHON:-} python3 python /usr/bin/python3 /opt/conda/bin/python; do
    command -v "$cand" >/dev/null || continue
    LIBS="$("$cand" - <<'EOF'
import importlib.util, os, glob
out = []
t = importlib.util.find_spec("torch")
if t and t.origin:
    out.append(os.path.join(os.path.dirname(t.origin), "lib"))
n = importlib.util.find_spec("nvidia")
for base in (n.submodule_search_locations if n else []):
    out += sorted(glob.glob(os.path.join(base, "cu13", "lib")))
    out += sorted(d for d in glob.glob(os.path.join(base, "*", "lib")) if not d.endswith("cu13/lib"))
print(":".join(d for d in out if os.path.isdir(d)))
EOF
)" || true
    [[ "$LIBS" == *torch/lib* ]] && break
  done
  LIBS="${GPU_CHECK_LIBS:-$LIBS}"
  [ -n "$LIBS" ] || { echo "gpu-check: no torch installation found by $PY (torch/lib, nvidia/*/lib)" >&2; exit 2; }
  export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: is this a GPU machine? (--cpu-smoke for CPU)" >&2; exit 2; }
fi
"$BIN" --version >/dev/null 2>"$WORK/version.err" || { echo "gpu-check: $BIN does not start:" >&2; cat "$WORK/version.err" >&2; exit 2; }
log "binary $BIN; work directory $WORK"
# mistral.rs must never reach for the hub.
export HF_HOME="$WORK/hf-home" HF_HUB_OFFLINE=1
mkdir -p "$HF_HOME"

# --- per-mode settings -------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
  GPU_MEM="80GiB"
  MODEL_ARGS=(--like smollm2-135m --layers 2 --dtype f32)
  ENGINE_BATCHES="1,2"; ENGINE_TOKENS=16
  LEARNER_ARGS=(--dtype f32 --device cpu --threads 2 --batch 1 --seq-len 256 --recompute --lora-rank 8 --steps 1)
  LEARNER_PLAN_ENV=(ORCHESTRATOR__LEARNER__DEVICE=cpu ORCHESTRATOR__LEARNER__DTYPE=f32 ORCHESTRATOR__LEARNER__LORA__RANK=8
                    ORCHESTRATOR__LEARNER__MICRO_BATCH_TOKENS=256)
  RUN_ARGS=(--steps 2 --prompts 2 --n 2 --max-new-tokens 16 --repeats 1 --latency-ms 5 --off-policy 0)
  # configs/7b.toml with what a CPU binary can run.
  RUN_ENV=(ORCHESTRATOR__MODEL__DTYPE=f32 ORCHESTRATOR__ENGINE__PAGED_ATTENTION__ENABLED=false
           ORCHESTRATOR__ENGINE__MAX_NUM_SEQS=4 ORCHESTRATOR__LEARNER__DEVICE=cpu ORCHESTRATOR__LEARNER__DTYPE=f32
           ORCHESTRATOR__LEARNER__THREADS=2 ORCHESTRATOR__LEARNER__LORA__RANK=8 ORCHESTRATOR__LEARNER__MICRO_BATCH_TOKENS=1024)
  ENGINE_ENV=("${RUN_ENV[@]}")
  declare -A BUDGET=([model]=60 [plan]=30 [engine]=90 [learner]=90 [run]=180)
else
  GPU_MEM="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n1 | tr -d ' ')MiB"
  MODEL_ARGS=(--like "$LIKE" --dtype bf16)
  ENGINE_BATCHES="1,16,64"; ENGINE_TOKENS=512
  LEARNER_ARGS=(--dtype bf16 --device cuda --batch 1 --seq-len 8192 --recompute --lora-rank 64 --steps 2)
  LEARNER_PLAN_ENV=(ORCHESTRATOR__LEARNER__MICRO_BATCH_TOKENS=8192)
  RUN_ARGS=(--steps 2 --prompts 8 --n 4 --max-new-tokens 256 --repeats 1 --latency-ms 50 --off-policy 0)
  RUN_ENV=()
  # The engine alone on the GPU (learner on the host for plan's arithmetic: nothing of it loads).
  ENGINE_ENV=(ORCHESTRATOR__LEARNER__DEVICE=cpu)
  declare -A BUDGET=([model]=75 [plan]=20 [engine]=150 [learner]=80 [run]=220)
fi
for s in model plan engine learner run; do
  v="GPU_CHECK_BUDGET_${s^^}"; [ -n "${!v:-}" ] && BUDGET[$s]="${!v}"
done
MODEL="$WORK/model"
COMMON_ENV=(ORCHESTRATOR__MODEL__PATH="$MODEL" ORCHESTRATOR__RUN__ROOT="$WORK/runs")

# --- stage runner ------------------------------------------------------------------------
# stage NAME CMD...: runs CMD under the stage's budget (SIGINT, then SIGKILL 15 s later),
# sampling GPU memory; writes $WORK/stage-NAME.json with status, seconds and memory.
stage() {
  local name="$1"; shift
  local budget="${BUDGET[$name]}" logf="$WORK/$name.log" mem="$WORK/$name.mem" smi=""
  log "stage $name (budget ${budget}s): $*"
  local base=""
  if [ "$SMOKE" = 0 ]; then
    base="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n1 | tr -d ' ')"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$mem" 2>/dev/null &
    smi=$!
  fi
  local t0 rc
  t0=$(date +%s.%N)
  timeout --signal=INT --kill-after=15 "$budget" "$@" >"$logf" 2>&1
  rc=$?
  local secs; secs=$(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || "$PY" -c "print($(date +%s.%N) - $t0)")
  [ -n "$smi" ] && { kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null; }
  "$PY" - "$name" "$rc" "$secs" "$budget" "$logf" "$mem" "${base:-}" "$WORK/stage-$name.json" <<'EOF'
import json, sys
name, rc, secs, budget, logf, mem, base, out = sys.argv[1:9]
rc = int(rc)
lines = open(logf, errors="replace").read().splitlines()
st = {"stage": name, "rc": rc, "secs": round(float(secs), 2), "budget_s": int(budget),
      "status": "ok" if rc == 0 else ("cut_short" if rc in (124, 137) else "failed"),
      "log_tail": lines[-15:]}
try:
    used = [int(x.split(",")[0]) for x in open(mem) if x.strip() and x.split(",")[0].strip().isdigit()]
    if used:
        st["gpu_mem_peak_mib"] = max(used)
        st["gpu_mem_base_mib"] = int(base) if base else None
        st["gpu_mem_peak_over_base_gib"] = round((max(used) - (int(base) if base else 0)) / 1024, 2)
except FileNotFoundError:
    pass
json.dump(st, open(out, "w"), indent=1)
EOF
  log "stage $name: rc $rc in ${secs}s"
  return $rc
}

# --- stages ----------------------------------------------------------------------------
stage model "$BIN" tiny-model "${MODEL_ARGS[@]}" --out "$MODEL"
if [ -d "$MODEL" ]; then
  du -sb "$MODEL" | cut -f1 >"$WORK/model.bytes"
else # cut short: what it had written
  du -scb "$WORK"/.model.partial-* 2>/dev/null | tail -n1 | cut -f1 >"$WORK/model.partial_bytes"
fi

# Configs: configs/7b.toml as it is (GPU) or made CPU-runnable (smoke), plus the engine bench's.
cp "$ROOT/configs/7b.toml" "$WORK/7b.toml"
# GPU: plan reads the shape itself, so its figures survive a model stage cut short.
PLAN_LIKE=(); [ "$SMOKE" = 0 ] && PLAN_LIKE=(--like "$LIKE")
plan_all() {
  env "${COMMON_ENV[@]}" "${RUN_ENV[@]}" "$BIN" plan "$WORK/7b.toml" --gpu-memory "$GPU_MEM" "${PLAN_LIKE[@]}" --json "$WORK/plan-run.json" &&
  env "${COMMON_ENV[@]}" "${RUN_ENV[@]}" "${ENGINE_ENV[@]}" "$BIN" plan "$WORK/7b.toml" --gpu-memory "$GPU_MEM" "${PLAN_LIKE[@]}" --json "$WORK/plan-engine.json" &&
  env "${COMMON_ENV[@]}" "${RUN_ENV[@]}" "${LEARNER_PLAN_ENV[@]}" "$BIN" plan "$WORK/7b.toml" --gpu-memory "$GPU_MEM" "${PLAN_LIKE[@]}" --json "$WORK/plan-learner.json"
}
stage plan bash -c "$(declare -p BIN WORK GPU_MEM COMMON_ENV RUN_ENV ENGINE_ENV LEARNER_PLAN_ENV PLAN_LIKE); $(declare -f plan_all); plan_all"

# The engine bench reads a config: the 7B one with the engine alone in mind.
stage engine env "${COMMON_ENV[@]}" "${RUN_ENV[@]}" "${ENGINE_ENV[@]}" "$BIN" bench engine --config "$WORK/7b.toml" \
  --batches "$ENGINE_BATCHES" --repeats 1 --max-new-tokens "$ENGINE_TOKENS" --no-serial --json "$WORK/engine.json"

stage learner "$BIN" bench learner --model "$MODEL" "${LEARNER_ARGS[@]}" --json "$WORK/learner.json"

stage run env "${COMMON_ENV[@]}" "${RUN_ENV[@]}" "$BIN" bench run --config "$WORK/7b.toml" --skip-overlap \
  "${RUN_ARGS[@]}" --json "$WORK/run.json"

# --- one JSON ---------------------------------------------------------------------------
"$PY" - "$WORK" "$OUT" "$SMOKE" "$GPU_MEM" "$(( $(date +%s) - T_START ))" <<'EOF'
import json, os, re, sys
work, out, smoke, gpu_mem, wall = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], int(sys.argv[5])
def load(name):
    p = os.path.join(work, name)
    try:
        return json.load(open(p))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
GIB = 2**30
res = {"mode": "cpu-smoke" if smoke else "gpu", "gpu_memory": gpu_mem, "wall_s": wall, "work": work, "stages": {}}
for s in ["model", "plan", "engine", "learner", "run"]:
    res["stages"][s] = load(f"stage-{s}.json") or {"stage": s, "status": "not_run"}
st = res["stages"]
# model: size and speed
try:
    b = int(open(os.path.join(work, "model.bytes")).read().strip())
    st["model"]["bytes"] = b
    st["model"]["mb_per_s"] = round(b / 1e6 / max(st["model"]["secs"], 1e-9), 1)
except (FileNotFoundError, ValueError, KeyError):
    pass
try:
    st["model"]["partial_bytes"] = int(open(os.path.join(work, "model.partial_bytes")).read().strip())
except (FileNotFoundError, ValueError):
    pass
plans = {k: load(f"plan-{k}.json") for k in ["run", "engine", "learner"]}
def gib(x):
    return None if x is None else round(x / GIB, 2)
# engine: rows, or the rows printed before a cut
eng = load("engine.json")
if eng is None:
    rows = []
    for line in st["engine"].get("log_tail", []):
        m = re.match(r"batch\s+(\d+): serial\s+\S+ tok/s\s+batched\s+([\d.]+) tok/s.*plain mistral.rs batched\s+([\d.]+) tok/s", line)
        if m:
            rows.append({"batch": int(m[1]), "ours_tok_s": float(m[2]), "plain_tok_s": float(m[3])})
    eng = {"rows": rows, "partial": True} if rows else None
st["engine"]["result"] = eng
pe = plans["engine"]
if pe:
    # engine only: its weights, KV cache, workspace, CUDA overhead
    st["engine"]["plan_gib"] = gib(pe["at_engine_start"] + pe["engine"][1]["bytes"] + pe["engine"][3]["bytes"])
    st["engine"]["plan_kv_tokens"] = pe["kv_tokens"]
st["learner"]["result"] = load("learner.json")
pl = plans["learner"]
if pl:
    st["learner"]["plan_gib"] = gib(pl["learner_fwd_bwd"] + (0 if smoke else 2**30))
    st["learner"]["plan_note"] = "weights + trainable + gradients + activations + log-prob chunk" + ("" if smoke else " + CUDA overhead")
    lr = st["learner"]["result"]
    if smoke and lr and lr.get("peak_rss_mb") and lr.get("rss_start_mb"):
        st["learner"]["measured_host_gib"] = round((lr["peak_rss_mb"] - lr["rss_start_mb"]) / 1024, 3)
run = load("run.json")
st["run"]["result"] = run
pr = plans["run"]
if pr:
    st["run"]["plan_gib"] = gib(pr["peak"])
    st["run"]["plan_fits"] = pr["fits"]
    st["run"]["plan_problems"] = pr["problems"]
    st["run"]["plan_kv_tokens"] = pr["kv_tokens"]
    st["run"]["plan_kv_tokens_after_sync"] = pr["kv_tokens_after_sync"]
if run and run.get("steps"):
    diffs = [s.get("logprob_max_diff") for s in run["steps"] if s.get("logprob_max_diff") is not None]
    res["parity_logprob_max_abs_diff"] = max(diffs) if diffs else None
    res["phase_times"] = [{k: s.get(k) for k in ["step", "t_generate", "t_judge_tail", "t_learn", "t_sync", "t_checkpoint", "t_other", "t_step", "gen_tokens_per_s", "learn_tokens_per_s", "sync_bytes"]} for s in run["steps"]]
if run and run.get("sync"):
    res["weight_sync"] = run["sync"]
# On a GPU no matrix product may take our CPU kernel's path (candle's CPU MatMul): a count above 0
# means the engine or the learner computed on the CPU. On the CPU smoke run it must count some.
for s in ["engine", "run"]:
    r = st[s].get("result") or {}
    if "cpu_kernel_products" in r:
        st[s]["cpu_kernel_products"] = r["cpu_kernel_products"]
        if not smoke and r["cpu_kernel_products"] > 0 and st[s].get("status") == "ok":
            st[s]["status"] = "cpu_kernel"
            st[s]["error"] = f"{r['cpu_kernel_products']} matrix products took the CPU kernel's path on a GPU build"
res["ok"] = all(st[s].get("status") == "ok" for s in st)
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({k: res.get(k) for k in ["mode", "ok", "wall_s", "parity_logprob_max_abs_diff"]}))
for s in st:
    x = st[s]
    extra = {k: x[k] for k in ["gpu_mem_peak_over_base_gib", "plan_gib", "measured_host_gib", "cpu_kernel_products", "error"] if k in x}
    print(f"{s:8} {x.get('status'):10} {x.get('secs', '-')}s {extra}")
sys.exit(0 if res["ok"] else 1)
EOF
rc=$?
log "wrote $OUT"
exit $rc
