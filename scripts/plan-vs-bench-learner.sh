#!/usr/bin/env bash
# plan's learner estimate (weights + trainable + gradients + activations + log-prob chunk) next
# to the peak memory `orchestrator bench learner` measures, on the CPU (peak RSS minus the RSS
# before loading) or a GPU (nvidia-smi, when --device cuda).
#   scripts/plan-vs-bench-learner.sh BIN MODEL_DIR [--dtype f32] [--device cpu] [--batch 4] [--seq-len 512]
# Cases: full fine-tuning and LoRA r16, each with and without recompute.
set -euo pipefail
BIN="$1"; MODEL="$2"; shift 2
DTYPE=f32; DEVICE=cpu; BATCH=4; SEQ=512
while [ $# -gt 0 ]; do
  case "$1" in
    --dtype) DTYPE="$2"; shift ;; --device) DEVICE="$2"; shift ;;
    --batch) BATCH="$2"; shift ;; --seq-len) SEQ="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
W="$(mktemp -d)"; trap 'rm -rf "$W"' EXIT
T=$((BATCH * SEQ))
printf '%-8s %-10s %12s %12s %7s\n' lora recompute plan_MiB measured_MiB ratio
for rank in 0 16; do
  for rc in false true; do
    lora="enabled = false"
    [ "$rank" -gt 0 ] && lora="enabled = true
rank = $rank
alpha = $((2 * rank)).0"
    cat >"$W/c.toml" <<EOF
[model]
path = "$MODEL"
dtype = "f32"
[learner]
algorithm = "grpo"
device = "$DEVICE"
dtype = "$DTYPE"
micro_batch_tokens = $T
logprob_chunk = 1024
activation_recompute = $rc
[learner.lora]
$lora
EOF
    "$BIN" plan "$W/c.toml" --json "$W/p.json" >/dev/null
    flags=(); [ "$rc" = true ] && flags=(--recompute)
    "$BIN" bench learner --model "$MODEL" --dtype "$DTYPE" --device "$DEVICE" --batch "$BATCH" --seq-len "$SEQ" \
      --steps 0 --lora-rank "$rank" "${flags[@]}" --json "$W/b.json" >/dev/null 2>&1
    python3 - "$W/p.json" "$W/b.json" "$rank" "$rc" <<'EOF'
import json, sys
p, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
plan = p["learner_fwd_bwd"] / 2**20
meas = b["peak_rss_mb"] - b["rss_start_mb"]
print(f"{sys.argv[3]:<8} {sys.argv[4]:<10} {plan:12.0f} {meas:12.0f} {meas / plan:7.2f}")
EOF
  done
done
