"""Results are data: re-run three stored quick-scale cells of results/runs.db and match their
stored metrics (RobustBench's habit). Slow: trains a LeNet victim and an N = 5 EDM victim.

    python -m pytest -m slow tests/test_stored_cells.py

The cells (the cheapest of their kind in the store):
- KnockoffNets, undefended:   mad-fig4, LeNet on 5,000 MNIST, 5,000 KMNIST queries, soft;
- MAD (epsilon 0.5):          mad-fig4, the same victim and queries;
- EDM:                        edm-table3, N = 5 conv3 on 10,000 MNIST, hard-label KnockoffNets
                              with 5,000 FashionMNIST queries.
Each cell is rebuilt from its stored parameters (validated by today's task model) and run
by the runner's local engine on the CPU with one torch thread, as it was stored.

Tolerance: accuracies and agreements (fractions in [0, 1]) within TOL_ACC = 0.02 absolute
(2 points); query counts exactly; other metrics (L1 / KL of the defense) within TOL_REL =
10 % relative. Training is seeded, so on the machine and torch that wrote the store the
numbers repeat exactly; the tolerance absorbs float-level changes (thread count, BLAS,
the members' CPU layout) that a long training run amplifies.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from pathlib import Path

import pytest

STORE = Path(__file__).resolve().parent.parent / "results" / "runs.db"
CELLS = {  # cell key -> what it is
    "ae4f4eea5fe3780861b3855ab99d7cb4": "mad-fig4 KnockoffNets, undefended LeNet",
    "81ddcfa0637c6731cd1cd313532a2034": "mad-fig4 MAD epsilon 0.5",
    "eebdce39608053d1120185d8531d9028": "edm-table3 EDM, hard-label KnockoffNets",
}
TOL_ACC, TOL_REL = 0.02, 0.10


def _stored() -> dict[str, tuple[str, dict, dict]]:
    with sqlite3.connect(STORE) as c:
        rows = c.execute(f"SELECT cell_key, task, params, metrics FROM runs WHERE cell_key IN "
                         f"({','.join('?' * len(CELLS))})", list(CELLS)).fetchall()
    return {k: (task, json.loads(p), json.loads(m)) for k, task, p, m in rows}


def _close(name: str, stored: float | None, now: float) -> bool:
    if stored is None:  # stored as null (not finite)
        return not math.isfinite(now)
    if name == "queries":
        return now == stored
    if "accuracy" in name or "agreement" in name or name == "argmax_changed":
        return abs(now - stored) <= TOL_ACC
    return abs(now - stored) <= TOL_REL * abs(stored) + 1e-9


@pytest.mark.slow
def test_stored_quick_cells_reproduce(tmp_path: Path) -> None:
    data_root = os.environ.get("STEALGUARD_DATA")
    from stealguard.reproduce.runner import Job, LocalEngine, WorkerConfig, dataset_available
    from stealguard.reproduce.tasks import TASKS

    stored = _stored()
    assert set(stored) == set(CELLS), f"cells missing from {STORE}: {set(CELLS) - set(stored)}"
    jobs = []
    for key, (task, params, _) in stored.items():
        cell = TASKS.get(task).Cell.model_validate(params)  # today's schema must accept it
        lacking = [d for d in cell.datasets() if not dataset_available(d, data_root)]
        if lacking:
            pytest.skip(f"datasets {lacking} are not under the data root")
        jobs.append(Job("cell", task, cell.model_dump(mode="json"), key))
    worker = WorkerConfig(device="cpu", artifacts=str(tmp_path), data_root=data_root, threads=1)
    failures, report = [], []
    for res in LocalEngine().run(jobs, worker):
        assert res.ok, f"{CELLS[res.job.key]} failed: {res.error}"
        metrics = stored[res.job.key][2]
        for name, was in sorted(metrics.items()):
            now = res.metrics.get(name, float("nan"))
            ok = _close(name, was, now)
            report.append(f"{CELLS[res.job.key]:42s} {name:20s} stored {was!s:>22} now {now:<22} "
                          f"{'ok' if ok else 'MOVED'} ({res.seconds:.0f} s)")
            if not ok:
                failures.append(report[-1])
    print("\n".join(report))
    assert not failures, "stored metrics moved:\n" + "\n".join(failures)
