#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/seeds/<target>/), small valid
inputs the fuzzer mutates from. Deterministic; standard library only.

    python3 fuzz/make_seeds.py
"""
import json
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FIX = ROOT.parent / "tests" / "fixtures"
SEEDS = ROOT / "seeds"


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def safetensors(tensors, metadata=None):
    """tensors: {name: (dtype, shape, bytes)}"""
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


# --- safetensors ---------------------------------------------------------
write("safetensors", "two_tensors", safetensors(
    {"a.weight": ("F32", [2, 3], f32([0.5] * 6)),
     "b.bias": ("BF16", [4], b"\x80\x3f" * 4)},
    {"format": "pt"}))
write("safetensors", "empty", safetensors({}))
write("safetensors", "scalar_and_zero", safetensors(
    {"s": ("F32", [], f32([1.0])), "z": ("I64", [0, 5], b"")}))

# --- gguf ------------------------------------------------------------------
GGUF_TYPES = {"u32": 4, "i32": 5, "f32": 6, "bool": 7, "str": 8, "arr": 9, "u64": 10}


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gval(kind, v):
    if kind == "u32":
        return struct.pack("<I", v)
    if kind == "i32":
        return struct.pack("<i", v)
    if kind == "f32":
        return struct.pack("<f", v)
    if kind == "bool":
        return struct.pack("<B", int(v))
    if kind == "str":
        return gstr(v)
    if kind == "u64":
        return struct.pack("<Q", v)
    inner, items = v
    return struct.pack("<I", GGUF_TYPES[inner]) + struct.pack("<Q", len(items)) + b"".join(
        gval(inner, x) for x in items)


def gguf(metadata, tensors, alignment=32):
    """metadata: [(key, kind, value)]; tensors: [(name, dims (ggml order), f32 values)]"""
    out = b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", len(tensors)) + struct.pack(
        "<Q", len(metadata))
    for k, kind, v in metadata:
        out += gstr(k) + struct.pack("<I", GGUF_TYPES[kind]) + gval(kind, v)
    data, off = b"", 0
    for name, dims, values in tensors:
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(
            struct.pack("<Q", d) for d in dims) + struct.pack("<I", 0) + struct.pack("<Q", off)
        raw = f32(values)
        raw += b"\0" * (-len(raw) % alignment)
        data += raw
        off += len(raw)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def tiny_llama_gguf(arch="llama", pre="smollm"):
    hidden, heads, layers, ff, vocab = 8, 2, 1, 16, 8
    tokens = ["a", "b", "c", "ab", "<s>", "</s>", "\u0120", "x"]
    md = [
        ("general.architecture", "str", arch),
        (f"{arch}.embedding_length", "u32", hidden),
        (f"{arch}.attention.head_count", "u32", heads),
        (f"{arch}.attention.head_count_kv", "u32", heads),
        (f"{arch}.block_count", "u32", layers),
        (f"{arch}.context_length", "u32", 64),
        (f"{arch}.feed_forward_length", "u32", ff),
        (f"{arch}.rope.freq_base", "f32", 10000.0),
        (f"{arch}.attention.layer_norm_rms_epsilon", "f32", 1e-6),
        ("tokenizer.ggml.model", "str", "gpt2"),
        ("tokenizer.ggml.pre", "str", pre),
        ("tokenizer.ggml.tokens", "arr", ("str", tokens)),
        ("tokenizer.ggml.token_type", "arr", ("i32", [1, 1, 1, 1, 3, 3, 1, 1])),
        ("tokenizer.ggml.merges", "arr", ("str", ["a b"])),
        ("tokenizer.ggml.bos_token_id", "u32", 4),
        ("tokenizer.ggml.eos_token_id", "u32", 5),
        ("tokenizer.chat_template", "str",
         "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"),
    ]

    def w(*dims):
        n = 1
        for d in dims:
            n *= d
        return [((i * 7) % 11 - 5) / 10 for i in range(n)]

    # GGUF dims are innermost first: a [out, in] matrix is (in, out).
    t = [("token_embd.weight", (hidden, vocab), w(hidden, vocab)),
         ("output_norm.weight", (hidden,), [1.0] * hidden)]
    for i in range(layers):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", (hidden,), [1.0] * hidden),
              (p + "ffn_norm.weight", (hidden,), [1.0] * hidden),
              (p + "attn_q.weight", (hidden, hidden), w(hidden, hidden)),
              (p + "attn_k.weight", (hidden, hidden), w(hidden, hidden)),
              (p + "attn_v.weight", (hidden, hidden), w(hidden, hidden)),
              (p + "attn_output.weight", (hidden, hidden), w(hidden, hidden)),
              (p + "ffn_gate.weight", (hidden, ff), w(hidden, ff)),
              (p + "ffn_up.weight", (hidden, ff), w(hidden, ff)),
              (p + "ffn_down.weight", (ff, hidden), w(ff, hidden))]
    return gguf(md, t)


write("gguf", "tiny_llama", tiny_llama_gguf())
write("gguf", "tiny_qwen2", tiny_llama_gguf("qwen2", "qwen2"))
write("gguf", "metadata_only", gguf([("general.architecture", "str", "llama"),
                                      ("general.alignment", "u32", 32)], []))

# --- configs ---------------------------------------------------------------
for d in ["qwen2-tiny", "llama3-tiny", "mistral-tiny", "qwen3-tiny", "llama-tiny-yarn",
          "qwen2-tiny-window", "embed-tiny-bge", "embed-tiny-mpnet"]:
    write("configs", f"{d}-config.json", (FIX / d / "config.json").read_bytes())
for f in ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
          "1_Pooling/config.json"]:
    write("configs", "bge-" + f.replace("/", "-"), (FIX / "embed-tiny-bge" / f).read_bytes())

# --- tokenizer -------------------------------------------------------------
byte_chars = [chr(c) for c in range(33, 127)]
vocab = {c: i for i, c in enumerate(byte_chars)}
vocab["\u0120"] = len(vocab)
vocab["he"] = len(vocab)
tiny_bpe = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": len(vocab), "content": "<|end|>", "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False, "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None,
              "continuing_subword_prefix": None, "end_of_word_suffix": None,
              "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": vocab, "merges": [["h", "e"]]},
}
tiny_cfg = {"eos_token": "<|end|>", "bos_token": None,
            "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}"
                             "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}
write("tokenizer", "tiny_bpe", json.dumps(tiny_bpe) + "\0" + json.dumps(tiny_cfg))
write("tokenizer", "tiny_bpe_no_config", json.dumps(tiny_bpe))
write("tokenizer", "qwen2_tiny",
      (FIX / "qwen2-tiny" / "tokenizer.json").read_text() + "\0"
      + (FIX / "qwen2-tiny" / "tokenizer_config.json").read_text())

# --- jsonl -----------------------------------------------------------------
write("jsonl", "formats", "\n".join([
    json.dumps({"text": "hello world"}),
    json.dumps({"prompt": "2+2=", "completion": " 4"}),
    json.dumps({"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}]}),
    "",
    json.dumps({"messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"},
                             {"role": "assistant", "content": "d"}]}),
]) + "\n")
write("jsonl", "unicode", json.dumps({"text": "héllo \u4e16\u754c \U0001F600"}) + "\n")

# --- peft --------------------------------------------------------------------
cfg = json.loads((FIX / "lora-peft" / "adapter_config.json").read_text())
cfg["target_modules"] = ["q_proj", "v_proj"]
r, hidden = 2, 4
weights = {}
for m in ["q_proj", "v_proj"]:
    p = f"base_model.model.model.layers.0.self_attn.{m}"
    weights[p + ".lora_A.weight"] = ("F32", [r, hidden], f32([0.1] * (r * hidden)))
    weights[p + ".lora_B.weight"] = ("F32", [hidden, r], f32([0.0] * (r * hidden)))
cfg["r"] = r
write("peft", "two_modules",
      json.dumps(cfg).encode() + b"\0" + safetensors(weights, {"format": "pt"}))
cfg2 = dict(cfg, use_rslora=True, lora_alpha=16)
write("peft", "rslora", json.dumps(cfg2).encode() + b"\0" + safetensors(weights))
print("seeds written to", SEEDS)
