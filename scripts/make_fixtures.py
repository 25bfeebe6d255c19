#!/usr/bin/env python3
"""Reference fixtures, made by the reference libraries themselves.

Writes small checkpoints with random weights and the outputs Hugging Face
transformers (and, in later sections, sentence-transformers and peft) gives
for them, under tests/fixtures/. The outputs are committed so CI needs no
Python; rerun this script (CPU or GPU, torch installed) to regenerate them.

usage: python3 scripts/make_fixtures.py [qwen2 ...]   (default: all sections)
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def save_tensors(path, tensors):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def randomize(model, std=0.1, seed=0):
    """transformers' init (std 0.02) gives near-zero logits that would make a
    parity test weak; larger random weights make every op matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------- qwen2
QWEN2_TINY = dict(
    vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rope_theta=10000.0, rms_norm_eps=1e-6,
)


def qwen2_reference(model, seed):
    """Logits for unpadded, left-padded and right-padded batches.

    Padded batches pass position_ids = cumsum(mask) - 1 (clamped at 0), the
    positions transformers' generate() uses, so a padded row's logits at real
    tokens equal the unpadded row's."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    out = {"input_ids": ids.to(torch.int64)}
    with torch.no_grad():
        out["logits"] = model(input_ids=ids).logits.float()
        for side in ["left", "right"]:
            lengths = [7, 4]
            pad_ids = torch.zeros(2, 9, dtype=torch.int64)
            mask = torch.zeros(2, 9, dtype=torch.int64)
            for b, n in enumerate(lengths):
                sl = slice(9 - n, 9) if side == "left" else slice(0, n)
                pad_ids[b, sl] = ids[b, :n]
                mask[b, sl] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out[f"input_ids_{side}"] = pad_ids
            out[f"attention_mask_{side}"] = mask
            out[f"logits_{side}"] = model(input_ids=pad_ids, attention_mask=mask, position_ids=pos).logits.float()
    return out


def make_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    for name, tied, seed in [("qwen2-tiny", False, 1), ("qwen2-tiny-tied", True, 2)]:
        torch.manual_seed(seed)
        cfg = Qwen2Config(**QWEN2_TINY, tie_word_embeddings=tied, attn_implementation="eager")
        model = Qwen2ForCausalLM(cfg).eval()
        randomize(model, seed=seed)
        d = os.path.join(ROOT, name)
        model.save_pretrained(d, safe_serialization=True)
        save_tensors(os.path.join(d, "reference.safetensors"), qwen2_reference(model, seed))
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump({"num_parameters": model.num_parameters()}, f)
        if not tied:
            # The same weights as a sharded checkpoint, in transformers' own format.
            model.save_pretrained(os.path.join(ROOT, "qwen2-tiny-sharded"), max_shard_size="100KB")
        print(f"wrote {d}")


SECTIONS = {"qwen2": make_qwen2}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", help=f"any of {list(SECTIONS)}")
    args = ap.parse_args()
    os.makedirs(ROOT, exist_ok=True)
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}", file=sys.stderr)
    for s in args.sections or list(SECTIONS):
        SECTIONS[s]()


if __name__ == "__main__":
    main()
