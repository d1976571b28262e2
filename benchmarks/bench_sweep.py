"""Wall time of one quick-scale sweep with the local engine and with Ray, on this machine.

    python benchmarks/bench_sweep.py --spec edm-table4 --cpus 2

Both engines run the same spec into fresh results directories (so nothing is resumed and
every victim is trained), side by side in this one process:

    local   one process, torch with `--threads` threads (default 1: on a busy 2-core machine
            two torch threads thrash), cells one after another
    ray     ray.init(num_cpus=--cpus); one task per victim, then one per cell, each task
            1 CPU and 1 torch thread, so up to `--cpus` cells run at once

It prints the wall times, the ratio, Ray's start-up time, and whether the two run stores
hold the same metrics. Run it on a quiet machine: the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from stealguard.reproduce.runner import reproduce
from stealguard.reproduce.store import RunStore


def _metrics(results: Path) -> dict[str, dict[str, float]]:
    store = RunStore(results / "runs.db")
    try:
        return {r.cell_key: r.metrics for r in store.all()}
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="edm-table4")
    ap.add_argument("--scale", default="quick")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, local engine")
    args = ap.parse_args()
    import ray

    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        local = reproduce(args.spec, scale=args.scale, results=root / "local", progress=False,
                          threads=args.threads)
        t_local = time.perf_counter() - t0

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        remote = reproduce(args.spec, scale=args.scale, results=root / "ray", progress=False,
                           threads=1, engine="ray", engine_options={"num_cpus": 1})
        t_ray = time.perf_counter() - t0
        ray.shutdown()

        a, b = _metrics(root / "local"), _metrics(root / "ray")
        same_acc = a.keys() == b.keys() and all(
            a[k].get("clone_accuracy") == b[k].get("clone_accuracy") for k in a)
        print(f"spec {args.spec} ({args.scale}): {local.cells} cells, {args.cpus} CPUs, "
              f"torch {torch.__version__}, ray {ray.__version__}")
        print(f"  local engine ({args.threads} torch thread(s)):  {t_local:7.1f} s  "
              f"(ran {local.ran}, failed {len(local.failed)})")
        print(f"  ray engine ({args.cpus} tasks x 1 thread): {t_ray:7.1f} s  "
              f"(ran {remote.ran}, failed {len(remote.failed)}) + ray.init {t_init:.1f} s")
        print(f"  ray / local wall time: {(t_ray + t_init) / t_local:.2f}x with start-up, "
              f"{t_ray / t_local:.2f}x without")
        print(f"  same cells and clone accuracies in both stores: {same_acc} "
              "(with different torch threads, equal only up to float rounding)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
