"""Sums an `ncu --csv --metrics gpu__time_duration.sum` log by kernel name:
count, total and share of GPU time, heaviest first."""
import csv
import sys
from collections import defaultdict


def main(path):
    rows = []
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            rows.append((r["Kernel Name"], float(r["Metric Value"].replace(",", ""))))
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
    main(sys.argv[1])
