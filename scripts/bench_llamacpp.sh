#!/usr/bin/env bash
# Our engine against what a CPU user would run instead: llama.cpp's own HTTP server
# (`llama-server`, which decodes its parallel slots together in one batch), on the same model.
# Server used: llama-server built from the llama.cpp sources vendored in the llama-cpp-python
# 0.3.36 sdist on PyPI (MIT), with CMake from PyPI, GGML_NATIVE=OFF and AVX/AVX2/FMA/F16C/BMI2
# on (a native build crashes in its AMX path on these machines), only the server target, into
# ~/.cache/orchestrator/llamacpp/ (kept: a second run builds nothing).
# The model: the f32 HF directory (default ~/.cache/orchestrator/models/smollm2-f32, which
# scripts/demo.sh makes) written as an f32 GGUF by scripts/hf_to_gguf.py (same weights; llama.cpp's
# own converter needs torch and transformers).
# Both sides: the same chat prompt (bench engine's BENCH_PROMPT through the model's chat template),
# temperature 1, no top-k/top-p, exactly MAX_NEW_TOKENS tokens per request (end of sequence
# ignored), the same thread count, no prompt cache, 1 and 8 requests in flight. Prints tokens/s
# (generated tokens over wall time, prefill included, both sides) and ours/llama.cpp.
#   scripts/bench_llamacpp.sh [MODEL_DIR] [MAX_NEW_TOKENS=64] [ROUNDS=2]
# THREADS (default: nproc) sets both thread counts (ours: RAYON_NUM_THREADS; llama.cpp: -t/-tb);
# REPEATS (default 2) timed batches per concurrency per round; ORCHESTRATOR_BIN overrides our
# binary; LLAMACPP_PORT (default 18571); LLAMACPP_DIR (default ~/.cache/orchestrator/llamacpp). Rounds alternate ours and llama.cpp so load drift hits
# both. On a machine shared with other work, llama.cpp with more than one thread slows down by
# an order of magnitude (its threads meet at a barrier after every operation, and a descheduled
# thread stalls the others): compare at THREADS=1 too, and note the load average printed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
model="${1:-$ORCH_CACHE/models/smollm2-f32}"
max="${2:-64}"; rounds="${3:-2}"; repeats="${REPEATS:-2}"
threads="${THREADS:-$(nproc)}"
port="${LLAMACPP_PORT:-18571}"
version="0.3.36"
if [ ! -f "$model/config.json" ] || ! ls "$model"/*.safetensors >/dev/null 2>&1; then
  echo "bench_llamacpp: skipped: no HF model directory at $model (scripts/demo.sh writes ~/.cache/orchestrator/models/smollm2-f32)"
  exit 0
fi
model="$(cd "$model" && pwd)"
bin="${ORCHESTRATOR_BIN:-$ORCH_BIN}"
[ -x "$bin" ] || { echo "bench_llamacpp: no orchestrator binary at $bin (scripts/setup.sh builds it)" >&2; exit 1; }
ll="${LLAMACPP_DIR:-$ORCH_CACHE/llamacpp}"
mkdir -p "$ll"

# 1. A venv with CMake and gguf (from the sdist), from PyPI.
if [ ! -x "$ll/venv/bin/cmake" ]; then
  rm -rf "$ll/venv"
  "$ORCH_PYTHON" -m venv "$ll/venv"
  "$ll/venv/bin/pip" install --quiet --disable-pip-version-check "cmake==4.1.0"
fi
# 2. The sdist (pip builds no metadata from it with --no-binary for this package only: pip's
#    `--no-binary :all:` would also compile CMake from source to prepare it).
src="$ll/src/llama_cpp_python-$version"
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  mkdir -p "$ll/src"
  "$ll/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$version" -d "$ll/src"
  tar xzf "$ll/src/llama_cpp_python-$version.tar.gz" -C "$ll/src"
fi
"$ll/venv/bin/python" -c 'import gguf' 2>/dev/null \
  || "$ll/venv/bin/pip" install --quiet --disable-pip-version-check "$src/vendor/llama.cpp/gguf-py"
# 3. llama-server (only that target; ~10 min on 2 busy cores).
server="$ll/build/bin/llama-server"
if [ ! -x "$server" ]; then
  echo "bench_llamacpp: building llama-server into $ll/build (log: $ll/build.log)"
  { "$ll/venv/bin/cmake" -S "$src/vendor/llama.cpp" -B "$ll/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
      -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    && "$ll/venv/bin/cmake" --build "$ll/build" --target llama-server -j "$(nproc)"; } > "$ll/build.log" 2>&1 \
    || { tail -20 "$ll/build.log" >&2; echo "bench_llamacpp: llama-server build failed (log: $ll/build.log)" >&2; exit 1; }
fi
# 4. The GGUF, rewritten when the model's weights are newer.
gguf="$ll/$(basename "$model").gguf"
if [ ! -f "$gguf" ] || [ "$model/config.json" -nt "$gguf" ] || [ -n "$(find "$model" -name '*.safetensors' -newer "$gguf")" ]; then
  "$ll/venv/bin/python" "$ORCH_ROOT/scripts/hf_to_gguf.py" "$model" "$gguf.tmp"
  mv "$gguf.tmp" "$gguf"
fi

work="$(mktemp -d)"
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
cat > "$work/c.toml" <<EOF
[model]
path = "$model"
dtype = "f32"
[engine]
max_num_seqs = 8
[engine.sampling]
temperature = 1.0
top_p = 1.0
top_k = 0
max_new_tokens = $max
EOF

"$server" -m "$gguf" --host 127.0.0.1 --port "$port" -t "$threads" -tb "$threads" --parallel 8 \
  -c $((8 * (max + 256))) --jinja --no-ui > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { tail -20 "$work/server.log" >&2; echo "bench_llamacpp: llama-server exited" >&2; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "bench_llamacpp: llama-server not up after 120 s" >&2; exit 1; }

for r in $(seq 1 "$rounds"); do
  echo "bench_llamacpp: round $r of $rounds: ours"
  RAYON_NUM_THREADS="$threads" "$bin" bench engine "$work/c.toml" --batches 1,8 --repeats "$repeats" --no-serial --no-plain \
    --ignore-eos --json "$work/ours-$r.json" >/dev/null
  echo "bench_llamacpp: round $r of $rounds: llama.cpp"
  "$ll/venv/bin/python" - "$port" "$work/ours-$r.json" "$max" "$work/llama-$r.json" "$repeats" <<'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
port, ours, max_new, out, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
prompt = json.load(open(ours))["prompt"]  # the prompt our bench used
def one(_):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_new, "n_predict": max_new,
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "ignore_eos": True, "cache_prompt": False}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    u = json.load(urllib.request.urlopen(req, timeout=3600))["usage"]
    return u["completion_tokens"], u["prompt_tokens"]
rows = []
one(0)  # warm-up, as ours has
for c in (1, 8):
    tokens = secs = 0.0
    per = []
    for _ in range(repeats):
        t = time.time()
        with ThreadPoolExecutor(c) as ex:
            res = list(ex.map(one, range(c)))
        secs += time.time() - t
        tokens += sum(x[0] for x in res)
        per += [x[0] for x in res]
    rows.append({"batch": c, "tok_s": tokens / secs, "tokens_per_request": sum(per) / len(per), "prompt_tokens": res[0][1]})
json.dump({"rows": rows}, open(out, "w"))
PY
done

"$ll/venv/bin/python" - "$work" "$rounds" "$threads" "$max" "$repeats" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
work, rounds, threads, max_new, repeats, load = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
print(f"llama.cpp: llama-server (llama-cpp-python 0.3.36 sdist), f32 GGUF, --parallel 8 | threads {threads} both | "
      f"{max_new} new tokens per request, temperature 1 | {rounds} rounds x {repeats} repeats | load average at the end {load}")
tot = {}
for r in range(1, rounds + 1):
    ours = {row["batch"]: row for row in json.load(open(f"{work}/ours-{r}.json"))["rows"]}
    llama = {row["batch"]: row for row in json.load(open(f"{work}/llama-{r}.json"))["rows"]}
    for c in (1, 8):
        o, l = ours[c], llama[c]
        if o["ours_tokens_per_request"] != max_new or l["tokens_per_request"] != max_new:
            print(f"  warning: lengths differ from {max_new}: ours {o['ours_tokens_per_request']}, llama.cpp {l['tokens_per_request']}")
        print(f"round {r}, {c} in flight: ours {o['ours_tok_s']:7.1f} tok/s  llama.cpp {l['tok_s']:7.1f} tok/s  "
              f"ours/llama.cpp {o['ours_tok_s'] / l['tok_s']:.3f}  (prompt tokens: ours {o['prompt_tokens']}, llama.cpp {l['prompt_tokens']})")
        t = tot.setdefault(c, [0.0, 0.0])
        t[0] += o["ours_tok_s"]; t[1] += l["tok_s"]
for c, (o, l) in tot.items():
    print(f"mean over rounds, {c} in flight: ours {o / rounds:7.1f} tok/s  llama.cpp {l / rounds:7.1f} tok/s  ours/llama.cpp {o / l:.3f}")
PY
