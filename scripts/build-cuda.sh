#!/usr/bin/env bash
# Builds the CUDA binary (mistral.rs with CUDA + paged attention, tch on libtorch_cuda) on a
# machine without a GPU, with the CUDA 13 toolchain from PyPI. About 20 minutes on 2 cores; not
# part of CI. Output: $ORCH_CACHE/target-cuda/release/orchestrator (+ a .zst copy to carry).
#   CUDA_COMPUTE_CAP  target compute capability (default 90: H100/H200)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
VENV_CUDA="${ORCHESTRATOR_VENV_CUDA:-$ORCH_CACHE/venv-cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

if [ ! -x "$VENV_CUDA/bin/python" ]; then
  "$ORCH_PYTHON" -m venv "$VENV_CUDA"
fi
# The full torch wheel brings cudart, cublas, curand, nvrtc (site-packages/nvidia/cu13); nvcc,
# cccl (headers such as nv/target), nvvm (cicc) and crt compile the kernels. crt must match nvcc:
# left unpinned, pip brings crt 13.5 and nvcc 13.0 rejects its host_runtime.h.
"$VENV_CUDA/bin/pip" install --quiet --disable-pip-version-check "torch==$ORCH_TORCH_VERSION" \
  "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
SP="$("$VENV_CUDA/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU="$SP/nvidia/cu13"
export CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU" PATH="$CU/bin:$PATH"
export LIBTORCH="$SP/torch"
export CARGO_TARGET_DIR="${ORCHESTRATOR_CUDA_TARGET:-$ORCH_CACHE/target-cuda}"

# The linker wants unversioned lib*.so names and a libcuda (the driver is only on GPU machines:
# a stub with the same soname satisfies the link; the real one is found at run time).
LINK="$ORCH_CACHE/cuda-link"
mkdir -p "$LINK"
for f in "$CU"/lib/lib*.so.*; do
  base="$(basename "$f")"; ln -sf "$f" "$LINK/${base%%.so.*}.so"
done
if [ ! -f "$LINK/libcuda.so" ]; then
  hdr="$(find "$CU" -name cuda.h | head -n1)"
  [ -n "$hdr" ] || { echo "build-cuda: cuda.h not found under $CU" >&2; exit 1; }
  # One empty function per driver entry point named in cuda.h, plain and versioned (_v2)
  # names alike: the #define lines name the versioned symbols the library really exports.
  grep -oE '\bcu[A-Z][A-Za-z0-9_]*' "$hdr" | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$LINK/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
fi
export LIBRARY_PATH="$LINK${LIBRARY_PATH:+:$LIBRARY_PATH}"

cd "$ORCH_ROOT"
"$ORCH_ROOT/scripts/patch-crates.sh"
cargo build --release --locked --features cuda,torch-cuda
BIN="$CARGO_TARGET_DIR/release/orchestrator"
zstd -q -19 -f "$BIN" -o "$BIN.zst" 2>/dev/null || echo "build-cuda: zstd not installed; skipped $BIN.zst" >&2
echo "build-cuda: $BIN ($(du -h "$BIN" | cut -f1))"
