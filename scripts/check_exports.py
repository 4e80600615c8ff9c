#!/usr/bin/env python3
"""Proves that what `orchestrator export` writes loads in the tools people deploy with.

For each model (the two tiny test architectures, and SmolLM2-135M when its f32 directory is
there) it trains one real step with LoRA (`orchestrator run`, GRPO, a stub judge on 127.0.0.1
that gives mixed verdicts, so the adapters move), then:

  1. `orchestrator export RUN --out merged`: transformers' AutoModelForCausalLM and AutoTokenizer
     load it as is; its f32 logits equal the learner's own (`orchestrator logits RUN`, adapters
     applied, not merged) within 1e-4; AutoTokenizer gives the ids tokenizer.json gives.
  2. `orchestrator export RUN --out adapter --adapter`: PeftModel.from_pretrained(base, adapter)
     loads it (no missing or unexpected keys), and its logits equal the merged export's within
     1e-4, while differing from the base model's (the adapter is not a no-op).
  3. The adapter passes the checks vLLM's `load_lora_adapter` makes on a PEFT directory (vLLM
     itself needs a GPU): adapter_config.json has r, lora_alpha and target_modules, bias "none",
     no DoRA, no modules_to_save; every tensor is `base_model.model.<module>.lora_{A,B}.weight`
     with <module> ending in one of target_modules.
A full fine-tune (no LoRA) of the tiny Llama is checked for (1) too.

Needs the full torch 2.11.0 with transformers and peft (the set-up venv has libtorch only):
    python3 -m venv ~/.cache/orchestrator/venv-torchfull
    ~/.cache/orchestrator/venv-torchfull/bin/pip install torch==2.11.0 transformers==4.57.1 peft==0.17.1
Usage:
    ~/.cache/orchestrator/venv-torchfull/bin/python scripts/check_exports.py \
        [--orchestrator BIN] [--smollm2 ~/.cache/orchestrator/models/smollm2-f32] [--work DIR]
Exits 0 when every check passes, 1 otherwise.
"""
import argparse
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
import transformers
import peft
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

TOL = 1e-4
TEXT = "The sea at night keeps its own counsel; write me a short letter about it."


class StubJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI chat endpoint answering [[A]] or [[B]] by a hash of the request: mixed,
    deterministic verdicts, so GRPO groups have different rewards and the adapters move."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        verdict = "[[A]]" if hashlib.sha256(body).digest()[0] % 2 else "[[B]]"
        reply = json.dumps({
            "id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Verdict: {verdict}"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def sh(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout}\n{r.stderr[-3000:]}")
    return r.stdout


def train(bin_, work, name, model, judge_url, lora_targets, rank):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    tasks = os.path.join(d, "tasks.jsonl")
    with open(tasks, "w") as f:
        for i in range(2):
            f.write(json.dumps({"id": f"t{i}", "prompt": f"Write two sentences about the sea, number {i}.",
                                "references": ["The sea is wide.", "The sea is wide and grey at dawn."]}) + "\n")
    lora = ""
    if lora_targets:
        lora = (f"[learner.lora]\nenabled = true\nrank = {rank}\nalpha = {2 * rank}.0\n"
                f"target_modules = {json.dumps(lora_targets)}\n")
    cfg = os.path.join(d, "config.toml")
    with open(cfg, "w") as f:
        f.write(f"""[model]
path = {json.dumps(model)}
dtype = "f32"
[engine.sampling]
temperature = 1.0
max_new_tokens = 12
[run]
seed = 7
steps = 1
batch_prompts = 2
n_samples = 4
save_every = 1
tensorboard = false
[data]
tasks = "tasks.jsonl"
[judge]
kind = "openai"
[judge.openai]
base_url = "{judge_url}"
model = "stub"
api_key_env = ""
max_retries = 0
[learner]
algorithm = "grpo"
lr = 2e-2
threads = 2
{lora}""")
    run = os.path.join(d, "run")
    t0 = time.time()
    sh([bin_, "run", cfg, "--run-dir", run])
    return d, run, time.time() - t0


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


def vllm_checks(adapter_dir):
    """The conditions vLLM's PEFTHelper and LoRAModel.from_local_checkpoint enforce."""
    problems = []
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in cfg:
            problems.append(f"adapter_config.json lacks {k}")
    if cfg.get("bias", "none") != "none":
        problems.append("bias != none")
    if cfg.get("use_dora"):
        problems.append("DoRA")
    if cfg.get("modules_to_save"):
        problems.append("modules_to_save set")
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')}")
    targets = cfg.get("target_modules") or []
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    for name, t in tensors.items():
        if not name.startswith("base_model.model."):
            problems.append(f"{name}: no base_model.model. prefix")
            continue
        module, _, kind = name[len("base_model.model."):].rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            problems.append(f"{name}: not lora_A/lora_B .weight")
        if module.rsplit(".", 1)[-1] not in targets:
            problems.append(f"{name}: module not in target_modules {targets}")
        if kind == "A.weight" and t.shape[0] != cfg.get("r"):
            problems.append(f"{name}: rank {t.shape[0]} != r {cfg.get('r')}")
        if kind == "B.weight" and t.shape[1] != cfg.get("r"):
            problems.append(f"{name}: rank {t.shape[1]} != r {cfg.get('r')}")
    return problems, len(tensors)


def check(bin_, work, name, model, judge_url, lora_targets, rank=4):
    out = []
    ok = True
    d, run, secs = train(bin_, work, name, model, judge_url, lora_targets, rank)
    merged = os.path.join(d, "merged")
    sh([bin_, "export", run, "--out", merged])
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok(TEXT)["input_ids"]
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(os.path.join(merged, "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    same_tok = raw == ids[-len(raw):] and tok.decode(raw) == TEXT
    ok &= same_tok
    out.append(f"  AutoTokenizer ({type(tok).__name__}): {len(ids)} ids, same as tokenizer.json and decodes back: {same_tok}")
    lp = os.path.join(d, "learner-logits.safetensors")
    sh([bin_, "logits", run, "--ids", ",".join(map(str, ids)), "--out", lp])
    learner = load_file(lp)["logits"].float()
    m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    m.eval()
    lm = logits_of(m, ids)
    diff = (lm - learner).abs().max().item()
    ok &= diff <= TOL and lm.shape == learner.shape
    out.append(f"  merged export in transformers ({type(m).__name__}): logits {tuple(lm.shape)}, "
               f"max |transformers - learner| = {diff:.2e} (<= {TOL}: {diff <= TOL})")
    if lora_targets:
        adapter = os.path.join(d, "adapter")
        sh([bin_, "export", run, "--out", adapter, "--adapter"])
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        base.eval()
        lb = logits_of(base, ids)
        pm = peft.PeftModel.from_pretrained(base, adapter)
        pm.eval()
        # What PEFT holds after loading, in its save format, is exactly the file's tensors.
        held = get_peft_model_state_dict(pm)
        saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        same_keys = set(held) == set(saved) and all(torch.equal(held[k], saved[k]) for k in saved)
        ok &= same_keys
        out.append(f"  PEFT loaded all {len(saved)} adapter tensors, none missing or unexpected, values equal: {same_keys}")
        lpft = logits_of(pm, ids)
        d_merged = (lpft - lm).abs().max().item()
        d_base = (lpft - lb).abs().max().item()
        ok &= d_merged <= TOL and d_base > 1e-3
        out.append(f"  PeftModel.from_pretrained(base, adapter): max |peft - merged| = {d_merged:.2e} (<= {TOL}: {d_merged <= TOL}); "
                   f"max |peft - base| = {d_base:.2e} (adapter not a no-op: {d_base > 1e-3})")
        problems, n = vllm_checks(adapter)
        ok &= not problems
        out.append(f"  vLLM load_lora_adapter checks on {n} tensors: {'pass' if not problems else problems}")
    head = f"{name}: model {model}, {'LoRA ' + ','.join(lora_targets) if lora_targets else 'full fine-tune'}, 1 step trained in {secs:.0f}s"
    return ok, [head] + out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = os.environ.get("ORCHESTRATOR_CACHE", os.path.expanduser("~/.cache/orchestrator"))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(cache, "target"))
    ap.add_argument("--orchestrator", default=os.path.join(target, "release/orchestrator"))
    ap.add_argument("--smollm2", default=os.path.join(cache, "models/smollm2-f32"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = a.work or tempfile.mkdtemp(prefix="check-exports-")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; work {work}")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"

    cases = []
    for arch in ("llama", "qwen2"):
        model = os.path.join(work, f"tiny-{arch}")
        if not os.path.isdir(model):
            sh([a.orchestrator, "tiny-model", "--arch", arch, "--out", model, "--seed", "5"])
        cases.append((f"tiny-{arch}", model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    cases.append(("tiny-llama-full", os.path.join(work, "tiny-llama"), []))
    if os.path.isfile(os.path.join(a.smollm2, "config.json")):
        cases.append(("smollm2-135m", os.path.abspath(a.smollm2), ["q_proj", "v_proj"]))
    else:
        print(f"SmolLM2 not found at {a.smollm2} (scripts/fetch-assets.sh, then orchestrator import gguf): skipped")
    all_ok = True
    for name, model, targets in cases:
        try:
            ok, lines = check(a.orchestrator, work, name, model, url, targets, rank=8 if "smollm2" in name else 4)
        except Exception as e:  # report and go on with the other models
            ok, lines = False, [f"{name}: FAILED: {e}"]
        all_ok &= ok
        print("\n".join(lines), flush=True)
    server.shutdown()
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
