"""The measurement behind issue #19's numbers: DFME and MAZE against an undefended MNIST conv3
victim (clone accuracy on the whole MNIST test set, against the queries spent, with the
wall time), then MAZE at a small budget against each output defense.

    .venv/bin/python benchmarks/datafree_mnist.py --victim artifacts/mnist-conv3 \
        --out results/datafree-mnist.jsonl [--dfme-budget 50000] [--maze-budget 30000]
        [--defense-budget 6000] [--threads 1]

One JSON object per line (a run's accuracy curve, queries, seconds, queries/s), written as
each run ends, so a run cut short keeps what it measured. The victim is any classifier
artifact (`stealguard train --dataset mnist --arch conv3 ...`). The attack settings are the
datafree-table spec's quick scale (the `QUICK` mapping below, kept equal to it by a test).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stealguard.attacks import build_attack
from stealguard.blackbox import LocalBlackBox
from stealguard.data import load_dataset
from stealguard.defenses import build_defense
from stealguard.defenses.metrics import defense_metrics
from stealguard.formats import load_victim
from stealguard.metrics import clone_metrics
from stealguard.training import accuracy

QUICK = {  # = specs/datafree-table.yaml, scale quick
    "dfme": {"batch": 32, "generator": {"ngf": 16}, "clone_optimizer": "adam",
             "lr_clone": 0.003, "lr_generator": 0.0001, "schedule": "constant"},
    "maze": {"batch": 64, "directions": 4, "generator": {"ngf": 16}, "lr_generator": 0.001},
}
DEFENSES = [("none", {}), ("mad", {"epsilon": 0.9, "jacobian": "last_layer"}),  # = the spec's
            ("mad_argmax", {"epsilon": 0.9, "jacobian": "last_layer"}),
            ("reverse_sigmoid", {"gamma": 0.2, "beta": 0.7}), ("topk", {"k": 1}),
            ("rounding", {"decimals": 1})]


def run(victim, test, probe, name: str, budget: int, defense: str, dparams: dict,
        log_every: int) -> dict:
    dfn = None if defense == "none" else build_defense(defense, dparams, victim=victim.model,
                                                       key=b"datafree-mnist")
    bb = LocalBlackBox(victim.model, defense=dfn, budget=budget)

    def monitor(clone):
        return {"probe_accuracy": accuracy(clone, probe.images, probe.labels)}

    attack = build_attack(name, None, {**QUICK[name], "arch": "conv3", "log_every": log_every})
    attack.monitor = monitor
    t0 = time.perf_counter()
    result = attack(bb, budget)
    seconds = time.perf_counter() - t0
    m = clone_metrics(result.clone, victim.model, test.images, test.labels,
                      victim_accuracy=victim.test_accuracy)
    row = {"attack": name, "defense": defense, "defense_params": dparams, "budget": budget,
           "queries": result.queries, "blackbox_count": bb.queries_used, "seconds": seconds,
           "queries_per_second": result.queries / seconds, **m,
           "curve": [{k: e[k] for k in ("queries", "seconds", "probe_accuracy")}
                     for e in result.log]}
    if dfn is not None:
        row["defender_accuracy"] = defense_metrics(victim.model, dfn, probe.images,
                                                   probe.labels)["accuracy"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victim", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dfme-budget", type=int, default=50_000)
    ap.add_argument("--maze-budget", type=int, default=30_000)
    ap.add_argument("--defense-budget", type=int, default=6_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    victim = load_victim(args.victim)
    test = load_dataset("mnist", "test")
    probe = test.subset(1000, seed=0)  # the curve's and the defender's accuracy
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = [("maze", args.maze_budget, "none", {}, 5000),
            ("dfme", args.dfme_budget, "none", {}, 10_000)]
    plan += [("maze", args.defense_budget, d, p, 10**9) for d, p in DEFENSES]
    for name, budget, defense, dparams, every in plan:
        row = run(victim, test, probe, name, budget, defense, dparams, every)
        row["victim_accuracy"] = victim.test_accuracy
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name} vs {defense}: {row['clone_accuracy']:.4f} at {row['queries']} queries, "
              f"{row['seconds']:.0f} s, {row['queries_per_second']:.0f} q/s", flush=True)


if __name__ == "__main__":
    main()
