"""The analysis tasks of `stealguard reproduce` (coherence, hash_histogram, angular_deviation)
run through `Task.run` on tiny image folders, with hand-built victims put in the cache."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stealguard.ensemble import DNNHash, EDMPredictor, EDMVictim, train_ensemble
from stealguard.errors import ConfigError
from stealguard.models import Classifier, build_model
from stealguard.pipeline import Victim
from stealguard.reproduce.spec import load_spec
from stealguard.reproduce.tasks import TASKS, RunContext
from stealguard.reproduce.tasks.angular_deviation import (
    _answerer,
    gradient_angle,
    step_gradients,
)
from stealguard.reproduce.victims import TrainedVictim, VictimConfig
from stealguard.training import TrainConfig, train
from synthetic import quadrant_images

CLASSES = ["tl", "tr", "bl", "br"]


def _write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, split: str) -> None:
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / split / CLASSES[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy(), mode="L").save(d / f"{i}.png")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`quads`: the 4-class 8x8 quadrant task (train 256, test 128); `noise`: uniform noise
    images, out of distribution for it (train 96, labels arbitrary)."""
    root = tmp_path_factory.mktemp("folders")
    for split, n, seed in (("train", 256, 0), ("test", 128, 1)):
        _write_folder(root / "quads", *quadrant_images(n, seed=seed), split)
    g = torch.Generator().manual_seed(2)
    noise = torch.randint(0, 256, (96, 1, 8, 8), generator=g, dtype=torch.uint8)
    _write_folder(root / "noise", noise, torch.arange(96) % 4, "train")
    return {"quads": f"imagefolder:{root / 'quads'}", "noise": f"imagefolder:{root / 'noise'}"}


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    return RunContext(device=torch.device("cpu"), artifacts=tmp_path)


def _conv3(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return build_model("conv3", in_channels=1, image_size=8, num_classes=4)


@pytest.fixture(scope="module")
def trained_conv3() -> Classifier:
    x, y = quadrant_images(256, seed=0)
    net = _conv3()
    train(net, x, y, config=TrainConfig(epochs=3, batch_size=32, lr=0.05), progress=False)
    return net.eval()


def _cfg(dataset: str, training: str = "standard") -> VictimConfig:
    return VictimConfig(dataset=dataset, arch="conv3", training=training)


def _edm_victim(members: list[Classifier], hash_net: Classifier, dataset: str,
                lambda_d: float) -> TrainedVictim:
    edm = EDMPredictor(members, hash_fn=DNNHash(hash_net, subclasses=2))
    return TrainedVictim(EDMVictim(model=edm, dataset=dataset, classes=CLASSES,  # type: ignore[arg-type]
                                   test_accuracy=0.9, train_config={}, lambda_d=lambda_d),
                         info={"hash_accuracy": 0.5})


# ---------------------------------------------------------------------------- coherence


@pytest.fixture(scope="module")
def ensembles(folders: dict[str, str], trained_conv3: Classifier
              ) -> tuple[list[Classifier], list[Classifier]]:
    """(regular, diverse): three copies of one trained model, trained on with lambda_D = 0
    (so they stay identical), and three differently initialised members trained on eq. 3
    with lambda_D = 2 and noise images as the OOD set."""
    x, y = quadrant_images(256, seed=0)
    ood = torch.randint(0, 256, (256, 1, 8, 8), generator=torch.Generator().manual_seed(3),
                        dtype=torch.uint8)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05)
    regular = [copy.deepcopy(trained_conv3) for _ in range(3)]
    train_ensemble(regular, x, y, None, lambda_d=0.0, config=cfg, progress=False)
    diverse = [_conv3(seed) for seed in (10, 11, 12)]
    train_ensemble(diverse, x, y, ood, lambda_d=2.0, config=cfg, progress=False)
    return [m.eval() for m in regular], [m.eval() for m in diverse]


def test_coherence_identical_members_is_one_and_edm_is_lower(folders, ensembles, ctx,
                                                              trained_conv3):
    task = TASKS.get("coherence")
    regular, diverse = ensembles
    rows = {}
    for training, members, lam in (("ensemble", regular, 0.0), ("edm", diverse, 2.0)):
        cfg = _cfg(folders["quads"], training)
        ctx.victims.put(cfg, _edm_victim(members, trained_conv3, folders["quads"], lam))
        cell = task.Cell.model_validate({"victim": cfg.model_dump(), "queries": folders["noise"],
                                         "n": 80, "max_series": 16})
        rows[training] = task.run(cell, ctx)
    reg, edm = rows["ensemble"], rows["edm"]
    assert reg.metrics["coherence_median"] == pytest.approx(1.0, abs=1e-5)
    assert reg.metrics["coherence_mean"] == pytest.approx(1.0, abs=1e-5)
    assert reg.metrics["frac_below_half"] == 0.0
    assert reg.metrics["queries"] == 80
    assert edm.metrics["coherence_median"] < reg.metrics["coherence_median"] - 0.2
    assert edm.metrics["coherence_mean"] < 0.8
    series = edm.series["coherence"]
    assert len(series) == 16 and series == sorted(series)
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in series)


def test_coherence_refuses_a_single_model_victim(folders):
    # pydantic wraps the ConfigError in a ValidationError (a ValueError); specs re-raise a
    # ConfigError naming the grid block
    with pytest.raises(ValueError, match="needs an ensemble victim"):
        TASKS.get("coherence").Cell.model_validate(
            {"victim": _cfg(folders["quads"]).model_dump(), "queries": "mnist"})


# ---------------------------------------------------------------------------- hash_histogram


def test_sha1_spreads_perturbations_evenly(folders, ctx):
    task = TASKS.get("hash_histogram")
    cell = task.Cell.model_validate({"hash": "sha1", "images": folders["quads"],
                                     "n_images": 20, "n_perturb": 300})
    r = task.run(cell, ctx)
    hist = r.series["histogram"]
    assert len(hist) == 5 and r.metrics["members"] == 5  # the paper's N by default
    assert sum(hist) == pytest.approx(1.0) and hist == sorted(hist, reverse=True)
    assert r.metrics["top1_share"] < 0.3  # 1/5 plus the noise of 300 draws
    assert r.metrics["entropy_normalized"] > 0.97


def test_invariant_dnn_hash_is_concentrated(folders, ctx, trained_conv3):
    """f_H answering one class with one confidence for every input: an invariant hash."""
    task = TASKS.get("hash_histogram")
    hash_net = _conv3(1)
    with torch.no_grad():
        hash_net.classifier.weight.zero_()
        hash_net.classifier.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    cfg = _cfg(folders["quads"], "edm")
    ctx.victims.put(cfg, _edm_victim([_conv3(i) for i in range(3)], hash_net, folders["quads"],
                                     0.5))
    cell = task.Cell.model_validate({"hash": "dnn", "victim": cfg.model_dump(),
                                     "images": folders["quads"], "n_images": 10,
                                     "n_perturb": 50})
    r = task.run(cell, ctx)
    assert r.series["histogram"] == pytest.approx([1.0, 0.0, 0.0])  # N = the EDM's 3 members
    assert r.metrics["top1_share"] == 1.0 and r.metrics["entropy"] == 0.0
    assert r.metrics["hash_accuracy"] == 0.5


def test_hash_histogram_cell_checks_the_victim(folders):
    cell = TASKS.get("hash_histogram").Cell
    with pytest.raises(ValueError, match="needs victim: an EDM"):
        cell.model_validate({"hash": "dnn", "images": "cifar10"})
    with pytest.raises(ValueError, match="takes no victim"):
        cell.model_validate({"hash": "sha1", "images": "cifar10",
                             "victim": _cfg(folders["quads"], "edm").model_dump()})


# ---------------------------------------------------------------------------- angular_deviation


def test_gradient_angle_by_hand():
    u = torch.tensor([1.0, 0.0, 0.0])
    assert gradient_angle(u, u * 3) == 0.0
    assert gradient_angle(u, torch.tensor([0.0, 2.0, 0.0])) == pytest.approx(90.0)
    assert gradient_angle(u, -u) == pytest.approx(180.0)
    assert gradient_angle(u, torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(45.0)
    assert np.isnan(gradient_angle(u, torch.zeros(3)))


def _angular(folders, setting: str, epsilon: float, **extra) -> dict:
    return {"victim": _cfg(folders["quads"]).model_dump(), "setting": setting,
            "defense": {"name": "mad", "params": {"epsilon": epsilon}},
            "queries": folders["noise"], "n": 64, "test_subset": 64, "evals": 4, **extra}


@pytest.fixture
def angular_ctx(ctx, folders, trained_conv3) -> RunContext:
    victim = Victim(trained_conv3, folders["quads"], CLASSES, 0.9, {})
    ctx.victims.put(_cfg(folders["quads"]), TrainedVictim(victim))
    return ctx


def test_whitebox_angle_is_zero_without_perturbation_and_grows_with_epsilon(folders,
                                                                           angular_ctx):
    task = TASKS.get("angular_deviation")
    means = {}
    for eps in (0.0, 0.2, 2.0):
        cell = task.Cell.model_validate(_angular(folders, "whitebox", eps, iterations=40))
        r = task.run(cell, angular_ctx)
        means[eps] = r.metrics["angle_mean"]
        assert len(r.series["angles"]) == 40 and r.metrics["steps"] == 40
        assert r.metrics["l1_mean"] <= eps + 1e-6
        assert r.series["test_loss_step"] == [0.0, 10.0, 20.0, 30.0, 40.0]
        assert all(np.isfinite(v) for v in (*r.metrics.values(), *r.series["test_loss"]))
    assert means[0.0] == 0.0
    assert 0.0 < means[0.2] < means[2.0]
    assert means[2.0] > 90.0  # the full budget flips the attacker's gradient (sec. 5.2.3)


def test_blackbox_runs_epochs_of_batches(folders, angular_ctx):
    task = TASKS.get("angular_deviation")
    cell = task.Cell.model_validate(_angular(folders, "blackbox", 2.0, epochs=2))
    assert (cell.lr, cell.momentum, cell.batch_size) == (0.01, 0.5, 64)  # appendix F.4
    r = task.run(cell, angular_ctx)
    assert r.metrics["steps"] == 2  # 64 images, batches of 64
    assert len(r.series["angles"]) == 2 and r.metrics["angle_mean"] > 0
    assert 0.0 <= r.metrics["attacker_accuracy"] <= 1.0


def test_whitebox_mad_follows_the_attackers_current_weights(folders, trained_conv3):
    """MAD's white-box answer is the vertex that turns the attacker's gradient the most,
    for the weights the attacker has now (its surrogate copy takes them before each query)."""
    cell = TASKS.get("angular_deviation").Cell.model_validate(
        _angular(folders, "whitebox", 2.0))  # epsilon 2 (L1): y~ is the chosen vertex itself
    attacker = _conv3(5).train()
    x = quadrant_images(4, seed=9)[0].float() / 255
    y = torch.softmax(trained_conv3(x), 1).detach()
    answer = _answerer(cell, trained_conv3, attacker, x, y)
    for _ in range(2):
        for b in range(4):
            xb, yb = x[b:b + 1], y[b:b + 1]
            angles = [gradient_angle(*step_gradients(attacker, xb, yb, v[None])[:2])
                      for v in torch.eye(4)]
            chosen = answer(torch.tensor([b]), xb, yb)
            u, a, _ = step_gradients(attacker, xb, yb, chosen)
            assert gradient_angle(u, a) == pytest.approx(max(angles), abs=1e-3)
        with torch.no_grad():  # the attacker moves on: MAD must follow
            for p in attacker.parameters():
                p.add_(torch.randn_like(p) * 0.3)


def test_angular_cell_defaults_and_errors(folders):
    cell = TASKS.get("angular_deviation").Cell
    wb = cell.model_validate(_angular(folders, "whitebox", 0.5))
    assert (wb.lr, wb.momentum, wb.batch_size, wb.iterations, wb.epochs) == (
        0.001, 0.0, 1, 50_000, None)  # sec. 5.2.3: online SGD, Fig. 7's 50K steps
    bb = cell.model_validate(_angular(folders, "blackbox", 0.5))
    assert (bb.iterations, bb.epochs) == (None, 50)
    assert bb.steps(100) == 50 * 2
    with pytest.raises(ValueError, match="not both"):
        cell.model_validate(_angular(folders, "blackbox", 0.5, iterations=3, epochs=2))


# ---------------------------------------------------------------------------- specs


@pytest.mark.parametrize("name", ["edm-fig5", "edm-fig6", "edm-fig7", "mad-fig6"])
def test_specs_load_at_both_scales(name):
    spec = load_spec(name)
    quick, full = spec.cells("quick"), spec.cells("full")
    assert 0 < len(quick) < len(full)


def test_a_spec_names_the_bad_cell(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\npaper: edm\nref: Figure 5\ntitle: t\ntask: coherence\n"
                    "grid:\n  - {victim: {dataset: mnist, arch: conv3, training: standard},"
                    " queries: fashionmnist}\n")
    with pytest.raises(ConfigError, match=r"grid\[0\].*needs an ensemble victim"):
        load_spec(path).cells("quick")
