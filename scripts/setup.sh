#!/usr/bin/env bash
# Idempotent set-up on a machine with only the OS, Rust and Python: checks the toolchain,
# makes the patched mistral.rs crate (scripts/patch-crates.sh), installs libtorch (torch 2.11.0
# from PyPI, the two CUDA runtime wheels it links against, no other dependency) and tensorboard
# into a venv in the cache, and builds the release binary.
#   scripts/setup.sh             set up and build
#   scripts/setup.sh --no-build  set up only (scripts/test.sh builds through cargo test)
#   scripts/setup.sh --cuda      also build the CUDA binary (scripts/build-cuda.sh, ~20 min)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

build=1; cuda=0
for a in "$@"; do
  case "$a" in
    --no-build) build=0 ;;
    --cuda) cuda=1 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

need_rust="1.88"
if ! command -v cargo >/dev/null; then
  echo "setup.sh: cargo not found; install Rust >= $need_rust (https://rustup.rs)" >&2; exit 1
fi
have_rust="$(rustc --version | awk '{print $2}')"
if [ "$(printf '%s\n%s\n' "$need_rust" "$have_rust" | sort -V | head -n1)" != "$need_rust" ]; then
  echo "setup.sh: rustc $have_rust is older than $need_rust" >&2; exit 1
fi

# Our fix for mistral.rs 0.8.1's batched CPU decode attention; before any cargo command, which
# needs the patched crate's directory to load Cargo.toml at all.
"$ORCH_ROOT/scripts/patch-crates.sh"

mkdir -p "$ORCH_CACHE"
if [ ! -x "$ORCH_VENV/bin/python" ]; then
  echo "setup: creating venv $ORCH_VENV"
  "$ORCH_PYTHON" -m venv "$ORCH_VENV"
fi
sp="$(orch_site_packages)"
if [ ! -f "$sp/torch/lib/libtorch_cpu.so" ] || ! ls "$sp"/torch-"$ORCH_TORCH_VERSION"*.dist-info >/dev/null 2>&1; then
  echo "setup: installing libtorch (torch==$ORCH_TORCH_VERSION, no dependencies) into $ORCH_VENV"
  # torch pins these two through cuda-toolkit[cudart,cupti]; libtorch_cpu links them. We never
  # import torch at build time, so nothing else is needed.
  "$ORCH_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    "torch==$ORCH_TORCH_VERSION" "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*"
fi
# TensorBoard reads the event files runs write (`tensorboard --logdir runs/`), and the tests
# read them back with its EventAccumulator. pip's resolver warns about torch's CUDA
# dependencies, which were left out on purpose above.
if ! ls "$sp"/tensorboard-"$ORCH_TENSORBOARD_VERSION".dist-info >/dev/null 2>&1; then
  echo "setup: installing tensorboard==$ORCH_TENSORBOARD_VERSION into $ORCH_VENV"
  "$ORCH_VENV/bin/pip" install --quiet --disable-pip-version-check "tensorboard==$ORCH_TENSORBOARD_VERSION" 2>&1 \
    | grep -v -e "dependency resolver does not currently" -e "^torch .* requires " || true
  "$ORCH_VENV/bin/python" -c 'import tensorboard' || { echo "setup: tensorboard failed to install" >&2; exit 1; }
fi
export LIBTORCH="$sp/torch"
echo "setup: LIBTORCH=$LIBTORCH"
echo "setup: CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

if [ "$build" = 1 ]; then
  (cd "$ORCH_ROOT" && cargo build --release --locked)
  echo "setup: built $ORCH_BIN"
fi
if [ "$cuda" = 1 ]; then
  "$ORCH_ROOT/scripts/build-cuda.sh"
fi
