"""A Llama-architecture HF model directory (config.json, model.safetensors, tokenizer.json with a
byte-level BPE, tokenizer_config.json) -> one GGUF file with the weights at full precision, for
llama.cpp (scripts/bench_llamacpp.sh). Needs only numpy and the `gguf` package (its writer and
key names); llama.cpp's own converter would need torch and transformers.

    python scripts/hf_to_gguf.py MODEL_DIR OUT.gguf [--pre smollm]

Written for the bench: one safetensors file, f32/bf16/f16 tensors, written as f32; llama.cpp's
q/k row order (its RoPE pairs adjacent rows, HF pairs row i with row i + d/2)."""

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf


def read_safetensors(path):
    """name -> f32 array, from one .safetensors file (8-byte header length, JSON header, data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[base + a:base + b]
        dt = info["dtype"]
        if dt == "F32":
            t = raw.view(np.float32)
        elif dt == "F16":
            t = raw.view(np.float16).astype(np.float32)
        elif dt == "BF16":
            t = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            sys.exit(f"{path}: tensor {name} has dtype {dt}; only F32, F16 and BF16 are handled")
        out[name] = np.asarray(t, dtype=np.float32).reshape(info["shape"])
    return out


def rope_rows(w, heads):
    """HF's q/k row order -> llama.cpp's (rows of each head's two halves interleaved)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--pre", default="smollm", help="llama.cpp pre-tokenizer name (SmolLM2: smollm)")
    a = ap.parse_args()
    d = Path(a.model)
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        sys.exit(f"{d}/config.json: model_type {cfg.get('model_type')!r}; only llama is handled")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hidden = cfg["hidden_size"]
    tok = json.loads((d / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        sys.exit(f"{d}/tokenizer.json: model type {tok['model']['type']}; only byte-level BPE is handled")

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(d.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg.get("head_dim", hidden // heads))
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])

    # Vocabulary in id order; added tokens marked special are CONTROL, as llama.cpp expects.
    tokens = {i: t for t, i in tok["model"]["vocab"].items()}
    special = set()
    for at in tok.get("added_tokens", []):
        tokens[at["id"]] = at["content"]
        if at.get("special"):
            special.add(at["id"])
    n = cfg["vocab_size"]
    names, types = [], []
    for i in range(n):
        if i in tokens:
            names.append(tokens[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            names.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(a.pre)
    w.add_token_list(names)
    w.add_token_types(types)
    gguf.SpecialVocab(d, load_merges=True, n_vocab=n).add_to_gguf(w, quiet=True)

    files = sorted(d.glob("*.safetensors"))
    if len(files) != 1:
        sys.exit(f"{d}: want exactly one .safetensors file, found {len(files)}")
    t = read_safetensors(files[0])
    out = {"token_embd.weight": t.pop("model.embed_tokens.weight"), "output_norm.weight": t.pop("model.norm.weight")}
    if "lm_head.weight" in t:
        head = t.pop("lm_head.weight")
        if not cfg.get("tie_word_embeddings", False):
            out["output.weight"] = head
    for name, v in t.items():
        parts = name.split(".", 3)
        if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in LAYER:
            sys.exit(f"{files[0]}: unexpected tensor {name}")
        if parts[3].startswith("self_attn.q_proj"):
            v = rope_rows(v, heads)
        elif parts[3].startswith("self_attn.k_proj"):
            v = rope_rows(v, kv)
        out[f"blk.{parts[2]}.{LAYER[parts[3]]}"] = v
    for name, v in out.items():
        w.add_tensor(name, np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}: {len(out)} tensors, vocab {n}")


if __name__ == "__main__":
    main()
