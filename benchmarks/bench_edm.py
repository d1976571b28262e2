"""EDM costs, as ratios measured in one run (EDM App. A.4):

1. inference: EDMPredictor.predict_proba at batch 256 (the DNN hash, then one pass per member
   over its share) vs one member alone on the same batches: images/s and the ratio;
2. training: N = 5 members jointly on eq. 3 (lambda_D > 0 with an OOD batch, and the
   regular ensemble lambda_D = 0), as `train_ensemble` runs them on this device (on a CPU:
   the members as separate modules), with `channels_last=True`, and forced to the vmapped
   form (`batched=True`), vs one model trained with `stealguard.training.train` on the same
   images, epochs and batch size: seconds and ratios, next to the floor N (B + B') / B (every
   member processes the B images and the B' OOD images; N for lambda_D = 0);
3. hash analysis (App. A.2): the mean sorted member-index histogram over random
   perturbations of MNIST test images, for the DNN hash (hash_cnn3 trained on a KMNIST
   half), the DCT pHash and SHA-1 (an invariant hash puts everything in the first bin).

    STEALGUARD_DATA=../shared/datasets .venv/bin/python benchmarks/bench_edm.py [--quick]
        [--training-only]

The demo's EDM rows are timed by `stealguard demo` itself (its wall time is printed under
the table); the coherence of EDM and of a regular ensemble is the `edm-fig5` spec.

Needs MNIST and KMNIST under the data root. Each contender runs once to warm up, then the
contenders alternate and the best of --repeats is kept, so a change of load hits all of them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from stealguard.data import load_dataset
from stealguard.ensemble import (
    HASHES,
    DNNHash,
    EDMPredictor,
    aux_sets,
    sorted_index_histogram,
    train_ensemble,
    train_hash_net,
)
from stealguard.models import Classifier, build_model
from stealguard.training import TrainConfig, train


def _best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per contender: one warm-up call each, then alternating runs, best kept."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _members(n: int) -> list[Classifier]:
    torch.manual_seed(0)
    return [build_model("conv3", in_channels=1, image_size=28, num_classes=10) for _ in range(n)]


@torch.no_grad()
def bench_inference(hash_net: Classifier, images: torch.Tensor, *, repeats: int
                    ) -> dict[str, float]:
    xs = [b.float() / 255 for b in images.split(256)]  # (256, 1, 28, 28) each
    edm = EDMPredictor(_members(5), hash_fn=DNNHash(hash_net)).eval()
    single = edm.members[0]
    t = _best_of({"one": lambda: [torch.softmax(single(xb), 1) for xb in xs],
                  "edm": lambda: [edm.predict_proba(xb) for xb in xs],
                  "hash": lambda: [edm.member_index(xb) for xb in xs]}, repeats)
    counts = torch.bincount(torch.cat([edm.member_index(xb) for xb in xs]), minlength=5)
    n = len(images)
    return {"one_img_s": n / t["one"], "edm_img_s": n / t["edm"], "ratio": t["one"] / t["edm"],
            "hash_share": t["hash"] / t["edm"], "largest_share": counts.max().item() / n}


def bench_training(images: torch.Tensor, labels: torch.Tensor, ood: torch.Tensor, *,
                   batch: int, ood_batch: int, repeats: int) -> dict[str, float]:
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.05)

    def edm(lambda_d: float, batched: bool | None, cl: bool = False) -> Callable[[], object]:
        return lambda: train_ensemble(_members(5), images, labels, ood, lambda_d=lambda_d,
                                      config=cfg, ood_batch_size=ood_batch, progress=False,
                                      batched=batched, channels_last=cl)

    t = _best_of({
        "one": lambda: train(_members(1)[0], images, labels, config=cfg, progress=False),
        "edm": edm(0.5, None), "regular": edm(0.0, None), "edm_cl": edm(0.5, None, True),
        "regular_cl": edm(0.0, None, True),
        "edm_vmapped": edm(0.5, True), "regular_vmapped": edm(0.0, True),
    }, repeats)
    return {**t, **{f"{k}_ratio": t[k] / t["one"] for k in t if k != "one"},
            "edm_floor": 5 * (batch + ood_batch) / batch, "regular_floor": 5.0}


def _print_training(train_set, ood_set, *, repeats: int,  # type: ignore[no-untyped-def]
                    batches: str = "128:32,64:16,32:8") -> None:
    for pair in batches.split(","):
        batch, ood_batch = (int(v) for v in pair.split(":"))
        t = bench_training(train_set.images, train_set.labels, ood_set.images, batch=batch,
                           ood_batch=ood_batch, repeats=repeats)
        print(f"training 1 epoch, {len(train_set)} MNIST images, batch {batch} (+{ood_batch} OOD):"
              f" one model {t['one']:.2f} s")
        for k, floor in (("edm", "edm_floor"), ("regular", "regular_floor")):
            name = "EDM (lambda_D=0.5)" if k == "edm" else "regular (lambda_D=0)"
            print(f"  N=5 {name:20s} {t[k]:6.2f} s -> {t[k + '_ratio']:5.2f}x one model "
                  f"(floor {t[floor]:.2f}x, target {1.2 * 5:.1f}x); channels-last "
                  f"{t[k + '_cl']:6.2f} s -> {t[k + '_cl_ratio']:5.2f}x; vmapped "
                  f"{t[k + '_vmapped']:6.2f} s -> {t[k + '_vmapped_ratio']:5.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--training-only", action="store_true", help="only the training ratios")
    p.add_argument("--batches", default="128:32,64:16,32:8",
                   help="training batch:OOD batch pairs to time (comma-separated)")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    n_inf, n_train, n_hash, n_pert = (1024, 640, 20, 50) if a.quick else (5120, 2560, 200, 200)
    print(f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    test = load_dataset("mnist", "test")
    train_set = load_dataset("mnist", "train").subset(n_train, seed=0)
    hash_set, ood_set = aux_sets("kmnist", "kmnist", input_shape=(1, 28, 28))
    if a.training_only:
        return _print_training(train_set, ood_set, repeats=a.repeats, batches=a.batches)
    hash_net, acc = train_hash_net(hash_set, config=TrainConfig(epochs=5, lr=0.05),
                                   progress=False)
    print(f"hash network: hash_cnn3 on KMNIST half 0 ({len(hash_set)} images, 5 epochs), "
          f"held-out accuracy {acc:.3f}")
    r = bench_inference(hash_net, test.images[:n_inf], repeats=a.repeats)
    print(f"inference, batch 256, {n_inf} MNIST test images: one member {r['one_img_s']:.0f} "
          f"img/s, EDM (N=5, DNN hash) {r['edm_img_s']:.0f} img/s -> EDM/member throughput "
          f"{r['ratio']:.2f}x (hash {100 * r['hash_share']:.0f} % of EDM time, largest member "
          f"share {r['largest_share']:.2f})")
    _print_training(train_set, ood_set, repeats=a.repeats, batches=a.batches)
    hashes = {"dnn": DNNHash(hash_net), "dct": HASHES.get("dct")(), "sha1": HASHES.get("sha1")()}
    print(f"hash analysis (App. A.2), {n_hash} MNIST test images x {n_pert} random perturbations,"
          f" N=5, mean sorted index histogram:")
    for name, h in hashes.items():
        hist = sorted_index_histogram(h, test.images[:n_hash], members=5, perturbations=n_pert)
        print(f"  {name:5s} " + " ".join(f"{v:.3f}" for v in hist.mean(0).tolist()))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
