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
# Our patch of mistral.rs carries its own regression test (README, "Patched mistral.rs"). Naming
# orchestrator too keeps every shared dependency's features as above, so only mistralrs-core's
# test harness is compiled.
cargo test --release --locked -p orchestrator -p mistralrs-core --lib flash_attn_cpu_single_q 2>&1
