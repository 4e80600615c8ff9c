# Sourced by the other scripts: where the cache, the venv with libtorch and the cargo target
# directory live. Everything is overridable; nothing here writes anything.
ORCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORCH_CACHE="${ORCHESTRATOR_CACHE:-$HOME/.cache/orchestrator}"
ORCH_VENV="${ORCHESTRATOR_VENV:-$ORCH_CACHE/venv}"
ORCH_PYTHON="${ORCHESTRATOR_PYTHON:-python3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ORCH_CACHE/target}"
ORCH_TORCH_VERSION="2.11.0"
ORCH_TENSORBOARD_VERSION="2.21.0"
orch_site_packages() {
  "$ORCH_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}
if [ -x "$ORCH_VENV/bin/python" ]; then
  export LIBTORCH="$(orch_site_packages)/torch"
fi
export LIBTORCH_BYPASS_VERSION_CHECK="${LIBTORCH_BYPASS_VERSION_CHECK:-0}"
ORCH_BIN="$CARGO_TARGET_DIR/release/orchestrator"
# libtorch's OpenMP workers busy-wait between parallel regions by default. On a few cores shared
# with the engine's threads (or other jobs) the spinning worker starves the thread doing the work:
# `orchestrator bench learner --batch 2 --seq-len 256 --lora-rank 16 --steps 2` on SmolLM2 under
# load ran at 3.9 and 6.5 tok/s by default against 52.0 with PASSIVE. Changes no result.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
