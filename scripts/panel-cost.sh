#!/usr/bin/env bash
# What a judge panel costs against one judge on the same run. The demo's model (SmolLM2-135M f32)
# and its 8 training prompts from WritingBench, `reward.reference = "group"` (no ladders to build
# first), PANEL_COST_STEPS steps (default 2) with the same seed, twice: once judged by the demo's
# judge (embedded, label-probability), once by a panel of that judge and a generate-mode judge on
# the same weights (quorum 1, equal weights). Prints, per run, judge tokens, judge calls, the
# judge's wall time and the step time, the panel/one-judge ratios, and the panel's members.
#
# Needs the release binary (scripts/demo.sh or `cargo build --release` builds it). Outputs go to
# PANEL_COST_OUT (default: a new temporary directory), which is printed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ORCH_ROOT/scripts/setup.sh"
source "$ORCH_ROOT/scripts/env.sh"
STEPS="${PANEL_COST_STEPS:-2}"
OUT="${PANEL_COST_OUT:-$(mktemp -d /tmp/panel-cost.XXXXXX)}"
mkdir -p "$OUT"

ASSETS="$("$ORCH_ROOT/scripts/fetch-assets.sh")"
MODEL="$ORCH_CACHE/models/smollm2-f32"
if [ ! -f "$MODEL/model.safetensors" ]; then
  rm -rf "$MODEL"
  "$ORCH_BIN" import gguf "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$MODEL"
fi
"$ORCH_BIN" import writingbench "$ASSETS/writingbench/benchmark_all.jsonl" --out "$OUT/writingbench-en.jsonl" --lang en
# The demo's 8 training prompts (the shortest English ones, criteria condensed as there).
"$ORCH_VENV/bin/python" - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
tasks = [json.loads(l) for l in open(f"{out}/writingbench-en.jsonl")]
tasks.sort(key=lambda t: (len(t["prompt"]), t["id"]))
with open(f"{out}/tasks.jsonl", "w") as f:
    for t in tasks[:16:2]:
        t["criteria"] = "\n".join(l for l in (t.get("criteria") or "").splitlines() if re.match(r"^\d+\.", l))
        t.pop("references", None)
        f.write(json.dumps(t) + "\n")
PY

common() {
  cat <<EOF
[model]
path = "$MODEL"
dtype = "f32"
[engine]
max_num_seqs = 16
[engine.sampling]
temperature = 0.8
top_p = 0.95
max_new_tokens = 48
[run]
seed = 2026
steps = $STEPS
batch_prompts = 2
n_samples = 4
save_every = $STEPS
judge_concurrency = 8
tensorboard = false
[data]
tasks = "$OUT/tasks.jsonl"
[reward]
reference = "group"
position = "both"
soft = true
[learner]
algorithm = "grpo"
threads = 2
lr = 5e-4
[learner.lora]
enabled = true
rank = 16
alpha = 32.0
EOF
}
{ common; printf '[judge]\nkind = "embedded"\nmode = "label-probability"\n[judge.embedded]\nmax_new_tokens = 16\n'; } > "$OUT/one.toml"
{ common; cat <<'EOF'
[judge]
kind = "panel"
[[judge.panel.members]]
name = "label"
kind = "embedded"
mode = "label-probability"
[judge.panel.members.embedded]
max_new_tokens = 16
[[judge.panel.members]]
name = "generate"
kind = "embedded"
mode = "generate"
[judge.panel.members.embedded]
max_new_tokens = 48
EOF
} > "$OUT/panel.toml"

for which in one panel; do
  echo "== $which judge: $STEPS steps"
  "$ORCH_BIN" run "$OUT/$which.toml" --run-dir "$OUT/run-$which" --resume never
done

"$ORCH_VENV/bin/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(which):
    return [json.loads(l) for l in open(f"{out}/run-{which}/metrics.jsonl")]
rows = {w: load(w) for w in ("one", "panel")}
def total(w, k):
    return sum((r.get(k) or 0) for r in rows[w])
print()
print(f"{'':24} {'one judge':>12} {'panel of 2':>12} {'panel/one':>10}")
for label, key in [("judge tokens", None), ("judge calls", "judge_calls"), ("judge tail s", "t_judge_tail"),
                   ("generate s", "t_generate"), ("step s", "t_step")]:
    a, b = ((total(w, "judge_prompt_tokens") + total(w, "judge_completion_tokens")) if key is None else total(w, key)
            for w in ("one", "panel"))
    ratio = f"{b / a:.2f}" if a else "-"
    print(f"{label:24} {a:>12.1f} {b:>12.1f} {ratio:>10}")
rm = lambda w: [r["reward_mean"] for r in rows[w]]
print(f"{'reward mean by step':24} {str([round(x, 3) if x is not None else None for x in rm('one')]):>12} "
      f"{str([round(x, 3) if x is not None else None for x in rm('panel')]):>12}")
print()
print("panel members (sums over the steps; agreement: mean over steps):")
for m in ("label", "generate"):
    g = lambda k: [r.get(f"judge/{m}/{k}") for r in rows["panel"]]
    vals = [v for v in g("agreement") if v is not None]
    agree = f"{sum(vals) / len(vals):.3f}" if vals else "-"
    tok = sum((v or 0) for v in g("prompt_tokens")) + sum((v or 0) for v in g("completion_tokens"))
    print(f"  {m:9} scored {sum(v or 0 for v in g('scored')):3}  unscored {sum(v or 0 for v in g('unscored')):3}  "
          f"agreement {agree}  tokens {tok}  mean latency ms {[round(v) for v in g('latency_ms_mean') if v is not None]}")
PY
echo "runs and configs: $OUT"
