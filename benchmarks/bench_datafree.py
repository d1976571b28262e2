"""Data-free attacks: queries per second of the DFME / MAZE loop against the black box's own
throughput, side by side in one run, on an MNIST-shaped conv3 victim (random weights: speed
does not depend on what the victim learnt).

    .venv/bin/python benchmarks/bench_datafree.py [--budget 20000] [--ngf 16] [--batch 64]
        [--threads 1]

The black box's throughput is LocalBlackBox.query on batches of the size the attack sends
(B images for a clone step, B (m + 1) for a round's finite differences). The attack loop's
is its budget over its wall time, which includes the victim's answers, the clone's forward
passes on every finite-difference point, the clone's and the generator's training steps and
(MAZE) the replay steps. The ratio says how much of the loop's time the victim itself costs.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from stealguard.attacks import build_attack
from stealguard.blackbox import LocalBlackBox
from stealguard.models import build_model


def blackbox_qps(victim: torch.nn.Module, batch: int, seconds: float = 3.0) -> float:
    bb = LocalBlackBox(victim)
    x = torch.rand(batch, 1, 28, 28)
    bb.query(x)  # warm-up
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        bb.query(x)
        n += batch
    return n / (time.perf_counter() - t0)


def attack_qps(victim: torch.nn.Module, name: str, params: dict, budget: int) -> float:
    attack = build_attack(name, None, params)
    bb = LocalBlackBox(victim, budget=budget)
    t0 = time.perf_counter()
    result = attack(bb, budget)
    assert result.queries == bb.queries_used == budget
    return budget / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=20_000)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    victim = build_model("conv3", in_channels=1, image_size=28, num_classes=10).eval()
    common = {"batch": args.batch, "generator": {"ngf": args.ngf}, "log_every": 10**9}
    runs = {
        "dfme (m=1)": ("dfme", {**common, "clone_optimizer": "adam", "lr_clone": 1e-3}, 2),
        "maze (m=4)": ("maze", {**common, "directions": 4}, 5),
        "maze (m=10, paper)": ("maze", {**common}, 11),
    }
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), budget {args.budget}, B={args.batch}, ngf={args.ngf}")
    print("| attack | loop queries/s | black box queries/s (ZO batch) | loop / black box |")
    print("|---|---:|---:|---:|")
    for label, (name, params, per_image) in runs.items():
        loop = attack_qps(victim, name, params, args.budget)
        box = blackbox_qps(victim, args.batch * per_image)
        print(f"| {label} | {loop:,.0f} | {box:,.0f} (batch {args.batch * per_image}) | "
              f"{loop / box:.2f} |", flush=True)


if __name__ == "__main__":
    main()
