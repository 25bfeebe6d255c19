"""Sums an `ncu --csv --metrics gpu__time_duration.sum` log by kernel name:
count, total and share of GPU time, heaviest first.

    python3 scripts/profile/ncu_sum.py ncu.csv [--from-last REGEX]

`--from-last REGEX`: only the kernels from the last one whose name matches
(e.g. the first kernel of a forward, to leave out a warm-up run)."""
import argparse
import csv
import re
from collections import defaultdict


def main(path, from_last=None):
    rows = []
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            rows.append((r["Kernel Name"], float(r["Metric Value"].replace(",", ""))))
    if from_last:
        starts = [i for i, (name, _) in enumerate(rows) if re.search(from_last, name)]
        if starts:
            rows = rows[starts[-1]:]
    by = defaultdict(lambda: [0, 0.0])
    for name, ns in rows:
        short = name.split("(")[0][:90]
        by[short][0] += 1
        by[short][1] += ns
    total = sum(v[1] for v in by.values())
    print(f"{len(rows)} kernels, {total / 1e6:.2f} ms GPU time")
    print(f"{'ms':>9} {'share':>6} {'count':>6}  kernel")
    for name, (n, ns) in sorted(by.items(), key=lambda kv: -kv[1][1])[:45]:
        print(f"{ns / 1e6:9.3f} {100 * ns / total:5.1f}% {n:6d}  {name}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv")
    ap.add_argument("--from-last")
    a = ap.parse_args()
    main(a.csv, a.from_last)
