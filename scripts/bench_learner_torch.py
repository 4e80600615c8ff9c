#!/usr/bin/env python3
"""PyTorch eager reference for `orchestrator bench learner`.

Same model directory, batch, sequence length, dtype, thread count and seeded token ids as the
Rust bench (the ids are read back from the file the Rust bench writes with --save-logits, so
both run on identical input). Runs transformers' model (sdpa attention) forward + backward of
-mean ln p(next token), reports tokens/s and peak RSS, runs the Rust bench in a subprocess and
prints the ratio tch / torch. With --parity it also prints max |logits diff| between the tch
model and transformers on the first sequence.

Needs a venv with the full torch 2.11.0 and transformers:
    python -m venv ~/.cache/orchestrator/venv-torchfull
    ~/.cache/orchestrator/venv-torchfull/bin/pip install torch==2.11.0 transformers==4.57.1
Usage:
    ~/.cache/orchestrator/venv-torchfull/bin/python scripts/bench_learner_torch.py \
        --orchestrator target/release/orchestrator --model DIR --batch 4 --seq-len 512 --threads 2
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--orchestrator", required=True, help="path to the orchestrator binary")
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recompute", action="store_true", help="pass --recompute to the Rust bench only")
    ap.add_argument("--parity", action="store_true", help="also compare logits on the first sequence")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ids_file = os.path.join(tmp, "ids.safetensors")
        cmd = [
            args.orchestrator, "bench", "learner", "--model", args.model, "--batch", str(args.batch),
            "--seq-len", str(args.seq_len), "--dtype", args.dtype, "--threads", str(args.threads),
            "--steps", str(args.steps), "--seed", str(args.seed), "--save-logits", ids_file,
        ]
        if args.recompute:
            cmd.append("--recompute")
        rust = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(rust.stdout)
        if rust.returncode != 0:
            sys.stderr.write(rust.stderr)
            sys.exit(f"rust bench failed with exit code {rust.returncode}")
        m = re.search(r"tch fwd\+bwd: ([0-9.]+) tokens/s", rust.stdout)
        if not m:
            sys.exit("could not parse the rust bench output")
        tch_tps = float(m.group(1))

        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        saved = load_file(ids_file)

    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype, attn_implementation="sdpa")
    model.train()
    if args.parity:
        with torch.no_grad():
            ref = model(saved["ids"][:1]).logits.float()
        diff = (ref - saved["logits"]).abs().max().item()
        print(f"logits parity vs transformers (first sequence, {args.seq_len} tokens): max |diff| {diff:.3e}")

    ids = saved["ids"]  # the Rust bench's seeded batch
    n = args.batch * (args.seq_len - 1)

    def step():
        logits = model(ids).logits
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -lp.sum() / n
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    step()
    reset = reset_peak()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    secs = time.perf_counter() - t0
    tps = args.batch * args.seq_len * args.steps / secs
    peak = f"{peak_rss_mb():.0f} MB" if reset else "unavailable"
    print(f"torch eager fwd+bwd: {tps:.1f} tokens/s ({secs / args.steps:.3f} s/step), peak RSS {peak}, loss {loss:.6f}")
    print(f"ratio tch / torch: {tch_tps / tps:.3f}")


if __name__ == "__main__":
    main()
