"""The data path in a few calls: dataset -> victim -> black box -> attack -> metrics.

The CLI, the demo and (later) experiment specs all go through these functions, so a number
printed by `stealguard demo` and one stored by a sweep are computed the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stealguard.attacks import ATTACKS, build_attack
from stealguard.blackbox import BlackBox, LocalBlackBox
from stealguard.data import ImageDataset, load_dataset
from stealguard.data.augment import to_shape
from stealguard.defenses import Defense
from stealguard.formats import load_victim, save_victim
from stealguard.metrics import clone_metrics
from stealguard.models import build_model
from stealguard.training import TrainConfig, accuracy, train
from stealguard.victim import Victim, clone_arch

__all__ = ["Victim", "load_victim", "save_victim", "steal", "steal_knockoff", "test_set_for",
           "train_victim"]


def train_victim(
    dataset: str, arch: str, config: TrainConfig, *, data_root: str | Path | None = None,
    train_subset: int | None = None, device: str | torch.device | None = "cpu",
    progress: bool = True,
) -> Victim:
    """Train an undefended victim on `dataset`'s train split, evaluate the final model on test."""
    train_set = load_dataset(dataset, "train", data_root=data_root)
    test_set = load_dataset(dataset, "test", data_root=data_root)
    if train_subset is not None:
        train_set = train_set.subset(train_subset, seed=config.seed)
    c, h, _ = train_set.image_shape
    torch.manual_seed(config.seed)
    model = build_model(arch, in_channels=c, image_size=h, num_classes=train_set.num_classes,
                        mean=train_set.mean, std=train_set.std)
    train(model, train_set.images, train_set.labels, config=config, device=device,
          progress=progress, desc=f"victim {dataset}/{arch}")
    acc = accuracy(model, test_set.images, test_set.labels, device=device)
    return Victim(model.cpu(), dataset, train_set.classes, acc, config.model_dump())


def test_set_for(victim: Victim, *, data_root: str | Path | None = None) -> ImageDataset:
    """The victim's test split, shaped as the victim's input."""
    ds = load_dataset(victim.dataset, "test", data_root=data_root)
    c, h, _ = victim.model.input_shape
    if ds.image_shape != tuple(victim.model.input_shape):
        ds = ImageDataset(ds.name, ds.split, to_shape(ds.images, c, h), ds.labels, ds.classes,
                          ds.mean, ds.std)
    return ds


def steal(
    victim: Victim, *, attack: str = "knockoff", data: str, budget: int,
    data_split: str = "train", options: Mapping[str, Any] | None = None,
    config: TrainConfig | None = None, preset: str = "edm", seed_size: int | None = None,
    defense: Defense | None = None, output: str = "probs", data_root: str | Path | None = None,
    device: str | torch.device | None = "cpu", progress: bool = True,
    blackbox: BlackBox | None = None, jacobian: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a registered attack against the (optionally defended) victim through a black box;
    return the papers' metrics, the query counts and the clone (key "clone").

    data: the attacker's images: the surrogate set (knockoff, adaptive_averaging) or the
    in-distribution seed set (the Jacobian family), read from `data_split`.
    options: AttackerOptions fields; the clone's architecture defaults to the victim's.
    blackbox: query this black box (for example an HttpBlackBox in front of a service serving
    the victim) instead of a LocalBlackBox around `victim.model`; the budget still applies.
    jacobian: overrides of the Jacobian family's preset (rounds, step, ...).
    """
    images = load_dataset(data, data_split, data_root=data_root)
    opts = dict(options or {})
    if "arch" not in opts:  # the victim's, or a registered default (with a warning)
        opts["arch"] = clone_arch(victim.model)
    role = getattr(ATTACKS.get(attack), "data_role", "surrogate")
    extra = {"jacobian": jacobian} if jacobian is not None else {}
    atk = build_attack(attack, **{role: images}, options=opts, config=config, preset=preset,
                       seed_size=seed_size, device=device, progress=progress, **extra)
    bb = blackbox or LocalBlackBox(victim.model, defense=defense, budget=budget, output=output,
                                   device=device)
    before = bb.queries_used
    result = atk(bb, budget)
    test = test_set_for(victim, data_root=data_root)
    metrics = clone_metrics(result.clone, victim.model, test.images, test.labels, device=device,
                            victim_accuracy=victim.test_accuracy)
    return {"attack": attack, "data": f"{data}/{data_split}", "labels": opts.get("labels", "soft"),
            "queries": result.queries, "blackbox_count": bb.queries_used - before, **metrics,
            "clone": result.clone}


def steal_knockoff(
    victim: Victim, *, surrogate: str, budget: int, labels: str, config: TrainConfig,
    arch: str | None = None, defense: Defense | None = None, output: str = "probs",
    data_root: str | Path | None = None, device: str | torch.device | None = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """KnockoffNets (random strategy) against the victim: `steal` with the demo's arguments."""
    options = {"labels": labels, "seed": config.seed, **({"arch": arch} if arch else {})}
    return steal(victim, attack="knockoff", data=surrogate, budget=budget, options=options,
                 config=config, defense=defense, output=output, data_root=data_root,
                 device=device, progress=progress)
