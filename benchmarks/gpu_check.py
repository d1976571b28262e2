"""The prepared device check (issue #17): every CUDA path and every GPU figure in one run.

A GPU machine is lent rarely and briefly (about 15 minutes in all, start-up included), so one
script does everything, in order of value, and stops each part at its deadline:

1. smoke: every CUDA path (train a victim, a clone, an EDM ensemble; MAD and MAD-argmax with
   the full and the last-layer Jacobian; every registered attack for a few rounds; the HTTP
   service answering on CUDA), each compared with the same computation on the CPU;
2. ratios, measured side by side in this run: MAD full-Jacobian throughput against the
   per-query loop of K backward passes (target >= 100x), EDM N = 5 training against one model
   (target <= 2x), EDM inference against one member (target >= 0.9x);
3. CIFAR-10 `wrn16_4`: seconds to 93 % test accuracy (target < 180 s);
4. with the time left: the full-scale MNIST cells of `edm-table3` into the run store.

    make gpu-check                                   # python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run         # CPU, tiny sizes, seconds (in the tests)

Writes <out>/gpu_check.json (machine, versions, each section's figures, checks and seconds)
and, for part 4, the run store <out>/runs.db; commit both with the machine named. A section
that fails is recorded with its error and the next one still runs.

Tolerances (CPU against CUDA, float32 forward passes on the same weights): probabilities
within 1e-4; MAD answers within 2e-3 (the perturbation solves an argmax over K candidates
from float32 Jacobians: a near tie may pick another extreme, so at most 1 % of rows may
differ by more); EDM routing identical (the hash is a pure function of the image).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks
from bench_defenses import per_query_loop

from stealguard.blackbox import LocalBlackBox
from stealguard.data import ImageDataset, load_dataset
from stealguard.defenses import build_defense
from stealguard.ensemble.hashing import DNNHash
from stealguard.ensemble.joint import train_ensemble
from stealguard.ensemble.predictor import EDMPredictor
from stealguard.models import Classifier, build_model
from stealguard.training import TrainConfig, accuracy, resolve_device, train

TOL_PROBS = 1e-4
TOL_MAD = 2e-3
MAD_ROWS_OFF = 0.01  # at most this fraction of MAD rows may pick another extreme (near ties)
KEY = b"gpu-check-key-0123456789abcdef!!"


@dataclass(frozen=True)
class Sizes:
    """How big each part is: `real` on a GPU, `dry` for the CPU dry run in the tests."""

    train: int
    epochs: int
    budget: int
    batch: int
    loop_queries: int
    cifar_epochs: int
    cifar_arch: str
    cifar_target: float
    deadlines: dict[str, float]  # section -> seconds it may take at most


REAL = Sizes(train=20_000, epochs=3, budget=2_000, batch=256, loop_queries=64, cifar_epochs=30,
             cifar_arch="wrn16_4", cifar_target=0.93,
             deadlines={"smoke": 90, "ratios": 90, "cifar10": 180, "edm_table3": 120})
DRY = Sizes(train=256, epochs=6, budget=64, batch=16, loop_queries=4, cifar_epochs=2,
            cifar_arch="conv3", cifar_target=0.5,
            deadlines={"smoke": 60, "ratios": 60, "cifar10": 30, "edm_table3": 30})


# ---------------------------------------------------------------- data

def synthetic(n: int, *, channels: int, size: int, seed: int, split: str = "train"
              ) -> ImageDataset:
    """A learnable 4-class problem (class k lights quadrant k): the dry run's data."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, channels, size, size, generator=g) * 0.3
    half = size // 2
    for k in range(4):
        r, c = divmod(k, 2)
        x[labels == k, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 0.7
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageDataset("quadrants", split, images, labels, ["tl", "tr", "bl", "br"],
                        (0.5,) * channels, (0.5,) * channels)


def mnist_like(dry: bool, n: int, split: str, seed: int) -> ImageDataset:
    if dry:
        return synthetic(n, channels=1, size=8, seed=seed, split=split)
    return load_dataset("mnist", split).subset(n, seed=seed)


def classifier(ds: ImageDataset, arch: str = "conv3", seed: int = 0) -> Classifier:
    c, h, _ = ds.image_shape
    torch.manual_seed(seed)
    return build_model(arch, in_channels=c, image_size=h, num_classes=ds.num_classes,
                       mean=ds.mean, std=ds.std)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max().item()) if a.numel() else 0.0


def clock(fn: Callable[[], object], dev: torch.device, repeats: int = 3) -> float:
    """Best of `repeats` wall times of fn(), synchronised on CUDA."""
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------- 1. smoke

def smoke(dev: torch.device, s: Sizes, dry: bool) -> dict[str, Any]:
    """Every CUDA path, compared with the CPU. Returns figures and named checks."""
    cpu = torch.device("cpu")
    train_set, test = mnist_like(dry, s.train, "train", 0), mnist_like(dry, 512, "test", 1)
    cfg = TrainConfig(epochs=s.epochs, batch_size=128, lr=0.05)
    out: dict[str, Any] = {"checks": {}}
    checks = out["checks"]

    victim = classifier(train_set)
    log = train(victim, train_set.images, train_set.labels, config=cfg, device=dev,
                progress=False)
    out["victim_accuracy"] = accuracy(victim, test.images, test.labels, device=dev)
    out["victim_train_img_s"] = log.samples_per_second
    on_cpu = copy.deepcopy(victim).to(cpu).eval()
    x = test.images[:256].float().div(255)
    p_dev = LocalBlackBox(victim, device=dev).query(x)
    p_cpu = LocalBlackBox(on_cpu, device=cpu).query(x)
    checks["victim_probs_cpu_vs_device"] = _within(max_diff(p_dev, p_cpu), TOL_PROBS)
    checks["victim_learned"] = {"ok": out["victim_accuracy"] > 0.5,
                                "value": out["victim_accuracy"], "bound": "> 0.5"}

    for name in ("mad", "mad_argmax"):
        for jac in ("full", "last_layer"):
            params = {"epsilon": 0.5, "jacobian": jac}
            d_dev = build_defense(name, params, victim=victim, key=KEY)
            d_cpu = build_defense(name, params, victim=on_cpu, key=KEY)
            xs = x[: s.batch]
            y_dev = LocalBlackBox(victim, defense=d_dev, device=dev).query(xs)
            y_cpu = LocalBlackBox(on_cpu, defense=d_cpu, device=cpu).query(xs)
            rows_off = float(((y_dev - y_cpu).abs().amax(1) > TOL_MAD).float().mean())
            l1 = float((y_dev - p_dev[: s.batch]).abs().sum(1).max())
            checks[f"{name}_{jac}_cpu_vs_device"] = {
                "ok": rows_off <= MAD_ROWS_OFF and l1 <= 0.5 + 1e-3,
                "rows_off": rows_off, "max_l1": l1, "bound": f"rows > {TOL_MAD}: <= "
                f"{MAD_ROWS_OFF}; L1 <= epsilon"}

    out.update(_edm_smoke(dev, train_set, test, cfg, checks))
    out["attacks"] = _attack_smoke(victim, dev, s, dry, checks)
    checks["service_cuda"] = _service_smoke(victim, on_cpu, x[:8], dev)
    return out


def _within(value: float, tol: float) -> dict[str, Any]:
    return {"ok": value <= tol, "value": value, "bound": f"<= {tol}"}


def _edm_smoke(dev: torch.device, train_set: ImageDataset, test: ImageDataset,
               cfg: TrainConfig, checks: dict[str, Any]) -> dict[str, Any]:
    members = [classifier(train_set, seed=i) for i in range(3)]
    ood = train_set.images.flip(-1)  # any images unlike the task; mirrored digits will do
    log = train_ensemble(members, train_set.images, train_set.labels, ood, lambda_d=0.5,
                         config=cfg, device=dev, progress=False)
    hash_net = classifier(train_set, seed=9)
    edm = EDMPredictor(members, hash_fn=DNNHash(hash_net)).to(dev).eval()
    edm_cpu = copy.deepcopy(edm).to("cpu").eval()
    x = test.images[:256].float().div(255)
    same_route = bool((edm.member_index(x.to(dev)).cpu() == edm_cpu.member_index(x)).all())
    checks["edm_routing_cpu_vs_device"] = {"ok": same_route, "value": same_route}
    checks["edm_probs_cpu_vs_device"] = _within(
        max_diff(edm.predict_proba(x.to(dev)), edm_cpu.predict_proba(x)), TOL_PROBS)
    return {"edm_train_img_s": log.samples_per_second,
            "edm_accuracy": accuracy(edm, test.images, test.labels, device=dev)}


def _attack_smoke(victim: Classifier, dev: torch.device, s: Sizes, dry: bool,
                  checks: dict[str, Any]) -> dict[str, Any]:
    """Every registered attack, a few rounds each, through a budgeted black box on `dev`."""
    from stealguard.attacks import ATTACKS, build_attack

    seeds = mnist_like(dry, 256, "train", 2)
    test = mnist_like(dry, 512, "test", 1)
    surrogate = (synthetic(1024, channels=1, size=8, seed=3) if dry
                 else load_dataset("fashionmnist", "train").subset(4096, seed=3))
    clone = {"epochs": 1, "batch_size": 128, "lr": 0.05}
    results = {}
    for name in ATTACKS:
        t0 = time.perf_counter()
        try:
            bb = LocalBlackBox(victim, budget=s.budget, device=dev)
            atk = build_attack(name, _attack_data(name, seeds, surrogate),
                               {"arch": "conv3", **_few_rounds(name, clone)}, device=dev,
                               progress=False)
            r = atk(bb, s.budget)
            ok = bb.queries_used == r.queries <= s.budget
            results[name] = {"ok": ok, "queries": r.queries, "seconds": time.perf_counter() - t0,
                             "clone_accuracy": accuracy(r.clone, test.images, test.labels,
                                                        device=dev)}
        except Exception as e:  # one attack failing must not hide the others
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        checks[f"attack_{name}"] = {"ok": results[name]["ok"]}
    return results


def _attack_data(name: str, seeds: ImageDataset, surrogate: ImageDataset) -> Any:
    """The Jacobian family starts from in-distribution seeds, a data-free attack from nothing,
    the others query the attacker's own surrogate images."""
    from stealguard.attacks import ATTACKS

    cls = ATTACKS.get(name)
    if getattr(cls, "data_free", False):
        return None
    return seeds if "seed_size" in cls.Params.model_fields else surrogate  # type: ignore[attr-defined]


def _few_rounds(name: str, clone: dict[str, Any]) -> dict[str, Any]:
    """The attack's Params at smoke size: its own fields only, a few rounds, a short clone."""
    from stealguard.attacks import ATTACKS

    cls = ATTACKS.get(name)
    fields = cls.Params.model_fields  # type: ignore[attr-defined]
    if getattr(cls, "data_free", False):  # the clone trains online, between generator steps
        small: dict[str, Any] = {"batch": 8, "directions": 1}
    elif "rounds" in fields:
        small = {"rounds": 2, "seed_size": 32, "round_config": clone}
    else:
        small = {"clone": clone}
    return {k: v for k, v in small.items() if k in fields}


def _service_smoke(victim: Classifier, on_cpu: Classifier, x: torch.Tensor,
                   dev: torch.device) -> dict[str, Any]:
    """The HTTP service answering on `dev` (in process, through the ASGI app)."""
    from fastapi.testclient import TestClient

    from stealguard.service.app import create_app
    from stealguard.service.store import KeyStore

    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(Path(tmp) / "keys.db")
        _, secret = store.create_key(name="gpu-check", budget=100)
        app = create_app(victim, store=store, device=dev)
        pixels = (x * 255).round().to(torch.uint8).tolist()
        with TestClient(app) as client:
            r = client.post("/v1/predict", json={"dtype": "uint8", "pixels": pixels},
                            headers={"Authorization": f"Bearer {secret}"})
        store.close()
    if r.status_code != 200:
        return {"ok": False, "status": r.status_code, "body": r.text[:300]}
    got = torch.tensor(r.json()["outputs"])
    want = LocalBlackBox(on_cpu).query((x * 255).round().div(255))
    return _within(max_diff(got, want), TOL_PROBS)


# ---------------------------------------------------------------- 2. ratios

def ratios(dev: torch.device, s: Sizes, dry: bool) -> dict[str, Any]:
    """Side-by-side throughput ratios on `dev` (random weights, random MNIST-shaped inputs)."""
    size = 8 if dry else 28
    torch.manual_seed(0)
    victim = build_model("lenet" if not dry else "conv3", in_channels=1, image_size=size,
                         num_classes=10).eval()
    x = torch.rand(s.batch, 1, size, size)
    mad = build_defense("mad", {"epsilon": 1.0, "jacobian": "full"}, victim=victim, key=KEY)
    bb = LocalBlackBox(victim, defense=mad, device=dev, batch_size=s.batch)
    bb.query(x[:8])  # warm-up
    batched = s.batch / clock(lambda: bb.query(x), dev)
    torch.manual_seed(1)
    sur = build_model("lenet" if not dry else "conv3", in_channels=1, image_size=size,
                      num_classes=10).to(dev)
    xs = x[: s.loop_queries].to(dev)
    v_dev = victim.to(dev)
    per_query_loop(v_dev, sur, xs[:1], epsilon=1.0, last_layer=False)
    loop = s.loop_queries / clock(
        lambda: per_query_loop(v_dev, sur, xs, epsilon=1.0, last_layer=False), dev, repeats=1)
    out: dict[str, Any] = {"mad_full_batched_q_s": batched, "mad_full_loop_q_s": loop,
                           "mad_full_vs_loop": batched / loop}

    images = torch.randint(0, 256, (s.batch * 8, 1, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (s.batch * 8,))
    cfg = TrainConfig(epochs=1, batch_size=s.batch // 2, lr=0.05)

    def members(n: int) -> list[Classifier]:
        torch.manual_seed(0)
        return [build_model("conv3", in_channels=1, image_size=size, num_classes=10)
                for _ in range(n)]

    one = clock(lambda: train(members(1)[0], images, labels, config=cfg, device=dev,
                              progress=False), dev)
    five = clock(lambda: train_ensemble(members(5), images, labels, images.flip(-1),
                                        lambda_d=0.5, config=cfg, device=dev, progress=False),
                 dev)
    edm = EDMPredictor(members(5), hash_fn=DNNHash(members(1)[0])).to(dev).eval()
    xq = x.to(dev)
    with torch.no_grad():
        t_one = clock(lambda: torch.softmax(edm.members[0](xq), 1), dev)
        t_edm = clock(lambda: edm.predict_proba(xq), dev)
    out.update({"edm5_train_vs_one": five / one, "edm_inference_vs_member": t_one / t_edm})
    out["targets"] = {"mad_full_vs_loop": {"ok": out["mad_full_vs_loop"] >= 100, "bound": ">= 100"},
                      "edm5_train_vs_one": {"ok": out["edm5_train_vs_one"] <= 2, "bound": "<= 2"},
                      "edm_inference_vs_member": {"ok": out["edm_inference_vs_member"] >= 0.9,
                                                  "bound": ">= 0.9"}}
    return out


# ---------------------------------------------------------------- 3. CIFAR-10

def cifar10(dev: torch.device, s: Sizes, dry: bool, deadline: float) -> dict[str, Any]:
    """Train CIFAR-10 `wrn16_4` (cosine, augmented) and time it to the target accuracy,
    evaluating the test set after every epoch; stops at the target or the deadline."""
    if dry:
        train_set = synthetic(512, channels=3, size=8, seed=4)
        test = synthetic(256, channels=3, size=8, seed=5, split="test")
    else:
        train_set, test = load_dataset("cifar10", "train"), load_dataset("cifar10", "test")
    model = classifier(train_set, arch=s.cifar_arch)
    cfg = TrainConfig(epochs=s.cifar_epochs, batch_size=512, lr=0.2, nesterov=True,
                      weight_decay=5e-4, augment=True)
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def after_epoch(epoch: int, m: torch.nn.Module) -> bool:
        acc = accuracy(m, test.images, test.labels, device=dev)
        m.train()
        curve.append({"epoch": epoch, "seconds": time.perf_counter() - t0, "accuracy": acc})
        return acc >= s.cifar_target or time.monotonic() > deadline  # True: stop here

    train(model, train_set.images, train_set.labels, config=cfg, device=dev, progress=False,
          on_epoch=after_epoch)
    hit = next((c for c in curve if c["accuracy"] >= s.cifar_target), None)
    return {"arch": s.cifar_arch, "target": s.cifar_target, "curve": curve,
            "seconds_to_target": hit["seconds"] if hit else None,
            "best_accuracy": max((c["accuracy"] for c in curve), default=float("nan")),
            "targets": {"seconds_to_target": {"ok": bool(hit and hit["seconds"] < 180),
                                              "bound": "< 180 s"}}}


# ---------------------------------------------------------------- 4. edm-table3, full scale

def edm_table3(dev: torch.device, dry: bool, out: Path, seconds: float) -> dict[str, Any]:
    """The full-scale MNIST cells of edm-table3 into <out>/runs.db, for `seconds` at most
    (the store resumes: what finished is kept, the rest runs next time)."""
    import yaml

    from stealguard.reproduce.spec import SPEC_DIR

    spec = yaml.safe_load((SPEC_DIR / "edm-table3.yaml").read_text())  # the MNIST rows only
    spec.setdefault("scales", {}).setdefault("full", {})["where"] = {"victim.dataset": ["mnist"]}
    path = out / "edm-table3-mnist.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [str(Path(sys.executable).with_name("stealguard")), "reproduce", str(path), "--scale",
           "full", "--device", str(dev), "--results", str(out)]
    if dry:
        cmd.append("--dry-run")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(seconds, 1))
        return {"command": " ".join(["stealguard", *cmd[1:]]), "returncode": p.returncode,
                "tail": (p.stdout + p.stderr)[-2000:], "ok": p.returncode == 0}
    except subprocess.TimeoutExpired:
        return {"command": " ".join(["stealguard", *cmd[1:]]), "timed_out_after_s": seconds, "ok": True,
                "note": "stopped at the deadline; finished cells are in the store"}


# ---------------------------------------------------------------- driver

def section(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # record it, go on with the next section
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-3000:]}
    report[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"[gpu-check] {name}: {report[name]['seconds']} s", flush=True)


def machine(dev: torch.device) -> dict[str, Any]:
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "device": str(dev),
            "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (seconds)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/gpu", help="folder for gpu_check.json and runs.db")
    p.add_argument("--seconds", type=float, default=480, help="wall-time budget in all")
    a = p.parse_args(argv)
    dev = torch.device("cpu") if a.dry_run else resolve_device(a.device)
    if dev.type != "cuda" and not a.dry_run:
        print("error: no CUDA device; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    s, start = (DRY if a.dry_run else REAL), time.monotonic()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(dev), "dry_run": a.dry_run,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    section(report, "smoke", lambda: smoke(dev, s, a.dry_run))
    section(report, "ratios", lambda: ratios(dev, s, a.dry_run))
    section(report, "cifar10", lambda: cifar10(dev, s, a.dry_run,
                                               time.monotonic() + s.deadlines["cifar10"]))
    left = a.seconds - (time.monotonic() - start) - 10
    section(report, "edm_table3", lambda: edm_table3(dev, a.dry_run, out,
                                                     min(left, s.deadlines["edm_table3"])))
    report["seconds"] = round(time.monotonic() - start, 1)
    report["failed"] = sorted(failed_checks(report))
    (out / "gpu_check.json").write_text(json.dumps(finite(report), indent=2, default=str,
                                                   allow_nan=False) + "\n")
    print(f"[gpu-check] wrote {out / 'gpu_check.json'} in {report['seconds']} s; "
          f"failed: {', '.join(report['failed']) or 'none'}")
    return 0


def finite(v: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [finite(x) for x in v]
    return v


def failed_checks(report: dict[str, Any]) -> list[str]:
    """Names of every check or target with ok = False, and of sections that raised."""
    bad = []
    for name, sec in report.items():
        if not isinstance(sec, dict):
            continue
        if sec.get("ok") is False:
            bad.append(name)
        for group in ("checks", "targets"):
            bad += [f"{name}.{k}" for k, v in sec.get(group, {}).items() if not v.get("ok")]
    return bad


if __name__ == "__main__":
    sys.exit(main())
