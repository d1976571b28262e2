"""What the stealing detectors cost the service: throughput with each detector on, as a
ratio to the same service with none, measured side by side.

    .venv/bin/python benchmarks/bench_detect.py [--images 4096] [--batch 64] [--rounds 2]
        [--threads 1]

One run: an MNIST-shaped (1, 28, 28) conv3 classifier (random weights; the detectors' cost
does not depend on the weights) served by `create_app` in this process (FastAPI's test
client: requests one after another, so each figure is the time of the whole request path,
detector included), keys and detector state in one SQLite file. Configurations: no
detector, `prada`, `shift`, both (policy `flag`). Each round sends, for every configuration
in turn, --images MNIST test images in requests of --batch on a fresh key (a key's first
queries: PRADA's growing sets fill as it goes; the bound is 1,000 per class). Ratios are
images/s with the detector over images/s without it in the same round, then the median
over rounds; the shift detector's calibration at start is timed separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from stealguard.data import load_dataset
from stealguard.detect import build_monitor
from stealguard.models import build_model
from stealguard.service import KeyStore, create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

CONFIGS = {"none": [], "prada": [("prada", {})], "shift": [("shift", {})],
           "prada+shift": [("prada", {}), ("shift", {})]}


def run_config(name: str, model, reference, images, *, batch: int, db: Path) -> float:
    store = KeyStore(db)
    monitor = (build_monitor(CONFIGS[name], model=model, reference=reference,
                             store=store.engine) if CONFIGS[name] else None)
    _, secret = store.create_key(name=name)
    with TestClient(create_app(model, store=store, monitor=monitor)) as client:
        headers = {"X-API-Key": secret}
        t = time.perf_counter()
        for xb in images.split(batch):
            r = client.post("/v1/predict", json={"pixels": xb.tolist(), "dtype": "uint8"},
                            headers=headers)
            assert r.status_code == 200, r.text
        seconds = time.perf_counter() - t
    store.close()
    return len(images) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model("conv3", in_channels=1, image_size=28, num_classes=10).eval()
    test = load_dataset("mnist", "test").subset(seed=0)
    reference, images = test.images[:5000], test.images[5000:5000 + a.images]
    t = time.perf_counter()
    build_monitor([("shift", {})], model=model, reference=reference)
    calibration_s = time.perf_counter() - t
    rates: dict[str, list[float]] = {n: [] for n in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name in CONFIGS:
                rates[name].append(run_config(name, model, reference, images, batch=a.batch,
                                              db=Path(tmp) / f"{name}-{r}.db"))
    ratios = {n: statistics.median(x / y for x, y in zip(rates[n], rates["none"]))
              for n in CONFIGS}
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "threads": a.threads, "images_per_key": a.images, "batch": a.batch,
                      "rounds": a.rounds, "shift_calibration_s": round(calibration_s, 2),
                      "images_per_s": {n: [round(v, 1) for v in x] for n, x in rates.items()},
                      "ratio_to_none": {n: round(v, 3) for n, v in ratios.items()}}, indent=1))


if __name__ == "__main__":
    main()
