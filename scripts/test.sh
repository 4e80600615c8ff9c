#!/usr/bin/env bash
# README command 2: set up (idempotent) and run every test in the release profile, the one the
# binary ships in, so mistral.rs is compiled once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ORCH_ROOT/scripts/setup.sh" --no-build
source "$ORCH_ROOT/scripts/env.sh"
cd "$ORCH_ROOT"
# Tests use 2 threads each; fixed thread counts keep tensor sums reproducible.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --release --locked "$@" 2>&1
# Our patches of mistral.rs and candle carry their own regression tests (README, "Patched
# crates"). Naming orchestrator too keeps every shared dependency's features as above, so only the
# patched crates' test harnesses are compiled.
cargo test --release --locked -p orchestrator -p mistralrs-core --lib -- flash_attn_cpu prefix_cache_cpu 2>&1
cargo test --release --locked -p orchestrator -p candle-core --lib rowdot 2>&1
