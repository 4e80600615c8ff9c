#!/usr/bin/env bash
# Batched against one-at-a-time generation (README, "Batching and reproducibility"): the same
# prompts and seeds through `orchestrator generate`, once with every prompt in flight together
# (engine.max_num_seqs = N) and once with engine.serial = true. Prints the share of token ids that
# agree (each rollout's common prefix over the serial rollout's length), the sequences that are
# identical, and the largest |ln p| difference where the ids agree.
#   scripts/batch_vs_serial.sh MODEL_DIR [PROMPTS=8] [MAX_NEW_TOKENS=64] [TEMPERATURE=1.0] [ROUNDS=3]
# ORCHESTRATOR_BIN overrides the binary. A tiny model to try it on: `orchestrator tiny-model --arch llama --out DIR`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bin="${ORCHESTRATOR_BIN:-$ORCH_BIN}"
model="$(cd "$1" && pwd)"; n="${2:-8}"; max="${3:-64}"; temp="${4:-1.0}"; rounds="${5:-3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/c.toml" <<EOF
[model]
path = "$model"
dtype = "f32"
[engine]
max_num_seqs = $n
[engine.sampling]
temperature = $temp
max_new_tokens = $max
EOF
"$ORCH_VENV/bin/python" - "$work/prompts.jsonl" "$n" <<'PY'
import json, sys
base = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the morning market in a small coastal town.",
    "Write a cover letter for a junior data analyst position.",
    "Summarise the main arguments for and against remote work.",
    "Write a poem about the first snow of winter.",
    "Explain to a child why the sky is blue.",
    "Draft an email inviting colleagues to a farewell lunch.",
    "Give three tips for writing a persuasive essay.",
]
n = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    for i in range(n):
        f.write(json.dumps({"id": f"p{i}", "prompt": base[i % len(base)] + ("" if i < len(base) else f" (variant {i})")}) + "\n")
PY
for r in $(seq 1 "$rounds"); do
  seed=$((1000 + r))
  "$bin" generate --config "$work/c.toml" --prompts "$work/prompts.jsonl" --out "$work/batched-$r.jsonl" \
    --n 1 --seed "$seed" --with-tokens >/dev/null 2>&1
  ORCHESTRATOR__ENGINE__SERIAL=true "$bin" generate --config "$work/c.toml" --prompts "$work/prompts.jsonl" \
    --out "$work/serial-$r.jsonl" --n 1 --seed "$seed" --with-tokens >/dev/null 2>&1
done
"$ORCH_VENV/bin/python" - "$work" "$rounds" "$n" <<'PY'
import json, sys
work, rounds, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
same_tok = tokens = same_seq = seqs = 0
worst = 0.0
for r in range(1, rounds + 1):
    load = lambda name: {(d["id"], d["sample"]): d for d in map(json.loads, open(f"{work}/{name}-{r}.jsonl"))}
    b, s = load("batched"), load("serial")
    for key, one in s.items():
        many = b[key]
        seqs += 1
        tokens += len(one["ids"])
        same_seq += many["ids"] == one["ids"]
        for k, (x, y) in enumerate(zip(many["ids"], one["ids"])):
            if x != y:
                break
            same_tok += 1
            worst = max(worst, abs(many["logprobs"][k] - one["logprobs"][k]))
print(f"batch {n} vs serial, {rounds} rounds: {same_seq}/{seqs} sequences identical, "
      f"{same_tok}/{tokens} token ids agree ({100 * same_tok / max(tokens, 1):.2f}%), "
      f"{tokens - same_tok} differ; max |ln p diff| where they agree {worst:.3e}")
PY
