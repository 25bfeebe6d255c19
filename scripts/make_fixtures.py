#!/usr/bin/env python3
"""Reference fixtures, made by the reference libraries themselves.

Each section (a module in scripts/fixtures/, e.g. qwen2, embeddings, lora,
generation) writes small checkpoints with random weights, or reads the real
models fetched by scripts/fetch-models.sh, and saves the outputs Hugging Face
transformers / sentence-transformers / peft give for them under
tests/fixtures/. The outputs are committed so CI needs no Python; rerun this
script (CPU or GPU, with torch transformers peft sentence-transformers gguf
installed) to regenerate them.

usage: python3 scripts/make_fixtures.py [SECTION ...]   (default: all)
"""
import argparse
import glob
import importlib
import os
import sys

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
sys.path.insert(0, HERE)


def sections():
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py")))
    return [n for n in names if n != "common"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", help=f"any of {sections()}")
    args = ap.parse_args()
    import torch
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}", file=sys.stderr)
    for s in args.sections or sections():
        if s not in sections():
            raise SystemExit(f"unknown section {s}; known: {sections()}")
        importlib.import_module(s).make()


if __name__ == "__main__":
    main()
