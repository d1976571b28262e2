"""Format benchmarks/datafree_mnist.py's JSON lines as the BENCHMARKS.md table:

    .venv/bin/python benchmarks/datafree_table.py results/datafree-mnist/run.jsonl
"""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
print("| attack | defense | budget spent | clone acc (10k test) | normalized | agreement | defender acc (1k) | wall s | loop q/s |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    d = r["defense"] + ("(" + ",".join(f"{k}={v}" for k, v in r["defense_params"].items()) + ")" if r["defense_params"] else "")
    da = r.get("defender_accuracy")
    print(f"| {r['attack']} | {d} | {r['queries']:,} | {100*r['clone_accuracy']:.2f} % | {r['normalized_accuracy']:.2f}x | {100*r['agreement']:.2f} % | "
          f"{'-' if da is None else f'{100*da:.1f} %'} | {r['seconds']:.0f} | {r['queries_per_second']:.0f} |")
for r in rows:
    if len(r["curve"]) > 2:
        print(f"\n{r['attack']} vs {r['defense']} (probe: 1,000 test images): " + ", ".join(
            f"{c['queries']:,}: {100*c['probe_accuracy']:.1f} %" for c in r["curve"]))
