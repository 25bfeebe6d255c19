#!/usr/bin/env python3
"""Merges the JSON lines of examples/bench_compare.rs (ours) and
scripts/peers.py (peers) into one markdown table: ours, each peer, and the
speed ratio (> 1 means ours is faster; for throughput ours/peer, for
latency peer/ours).

usage: python3 scripts/bench_table.py ours.jsonl peers.jsonl [--title TEXT]
"""
import json
import math
import sys
from collections import OrderedDict


def load(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    rows.append(json.loads(line))
    return rows


def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:,.1f}" if v >= 10 else f"{v:.3g}"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rows = load(args)
    keys = OrderedDict()
    for r in rows:
        if r["row"] == "error":
            continue
        keys.setdefault((r["job"], r["row"], r["shape"], r["dtype"]), {})[r["impl"]] = r
    print("| job | row | shape | dtype | unit | metal-candle | peer | peer value | ratio (>1: ours faster) |")
    print("|---|---|---|---|---|---:|---|---:|---:|")
    for (job, row, shape, dtype), impls in keys.items():
        ours = impls.get("metal-candle")
        peers = [i for i in impls if i != "metal-candle"] or [None]
        for peer in peers:
            p = impls.get(peer) if peer else None
            unit = (ours or p)["unit"]
            ratio = None
            if ours and p and p["value"] and ours["value"]:
                ratio = ours["value"] / p["value"] if unit.endswith("/s") else p["value"] / ours["value"]
            print(f"| {job} | {row} | {shape} | {dtype} | {unit} | {fmt(ours['value']) if ours else 'n/a'} | "
                  f"{peer or '-'} | {fmt(p['value']) if p else 'n/a'} | {fmt(ratio) if ratio else 'n/a'} |")
    for r in rows:
        if r["row"] == "error":
            print(f"\n{r['impl']} did not run: {r['shape']}")


if __name__ == "__main__":
    main()
