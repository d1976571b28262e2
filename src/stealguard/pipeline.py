"""The data path in a few calls: dataset -> victim -> black box -> attack -> metrics.

The CLI and the experiment specs (the demo is one) go through these functions, so a number
printed by `stealguard attack` and one stored by a sweep are computed the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from stealguard.attacks import AttackConfig, AttackParams, build_attack, validate_attack
from stealguard.attacks.config import split_data_name
from stealguard.blackbox import BlackBox, LocalBlackBox
from stealguard.data import ImageDataset, check_disjoint_splits, load_dataset
from stealguard.data.augment import to_shape
from stealguard.defenses import Defense
from stealguard.errors import ConfigError
from stealguard.formats import load_victim, save_victim
from stealguard.metrics import clone_metrics
from stealguard.models import build_model
from stealguard.progress import query_progress
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
    check_disjoint_splits(dataset, data_root=data_root)
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
    victim: Victim, attack: str | AttackConfig = "knockoff", *,
    data: str | ImageDataset | torch.Tensor | None = None,
    params: AttackParams | Mapping[str, Any] | None = None, budget: int,
    defense: Defense | None = None, output: str = "probs", data_root: str | Path | None = None,
    device: str | torch.device | None = "cpu", progress: bool = True,
    blackbox: BlackBox | None = None,
) -> dict[str, Any]:
    """Run a registered attack against the (optionally defended) victim through a black box;
    return the papers' metrics, the query counts and the clone (key "clone").

    attack: a registered attack's name, or an `AttackConfig` (name, params, data; then
        `data` and `params` are not given here).
    data: the attacker's images: a dataset name (`name` or `name@split`, default split
        train) or an `ImageDataset` / image tensor; None for a data-free attack.
    params: the attack's `Params` (or a mapping of its fields); the clone's architecture
        defaults to the victim's.
    blackbox: query this black box (for example an HttpBlackBox in front of a service serving
    the victim) instead of a LocalBlackBox around `victim.model`; the budget still applies.
    """
    if isinstance(attack, AttackConfig):
        if data is not None or params is not None:
            raise ConfigError("steal: give data= and params= in the AttackConfig, not beside it")
        data, params, attack = attack.data, attack.params, attack.name
    values = (params.model_dump(exclude_unset=True) if isinstance(params, BaseModel)
              else dict(params or {}))
    if "arch" not in values:  # the victim's, or a registered default (with a warning)
        values["arch"] = clone_arch(victim.model)
    typed = validate_attack(attack, values)
    images, data_label = _attacker_data(data, data_root)
    atk = build_attack(attack, images, typed, device=device, progress=progress)
    bb = blackbox or LocalBlackBox(victim.model, defense=defense, budget=budget, output=output,
                                   device=device or "cpu")
    before = bb.queries_used
    with query_progress(bb, total=budget, enabled=progress, desc=f"{attack} queries"):
        result = atk(bb, budget)
    test = test_set_for(victim, data_root=data_root)
    known = victim.test_accuracy == victim.test_accuracy  # NaN: not recorded (an import)
    metrics = clone_metrics(result.clone, victim.model, test.images, test.labels, device=device,
                            victim_accuracy=victim.test_accuracy if known else None)
    return {"attack": attack, "data": data_label, "labels": getattr(typed, "labels", "soft"),
            "queries": result.queries, "blackbox_count": bb.queries_used - before, **metrics,
            "clone": result.clone}


def _attacker_data(data: str | ImageDataset | torch.Tensor | None,
                   data_root: str | Path | None
                   ) -> tuple[ImageDataset | torch.Tensor | None, str | None]:
    """The attacker's images and how to name them in a result ("mnist/train")."""
    if isinstance(data, str):
        name, split = split_data_name(data)
        return load_dataset(name, split, data_root=data_root), f"{name}/{split}"
    if isinstance(data, ImageDataset):
        return data, f"{data.name}/{data.split}"
    return data, None if data is None else "tensor"


def steal_knockoff(
    victim: Victim, *, surrogate: str, budget: int, labels: str, config: TrainConfig,
    arch: str | None = None, defense: Defense | None = None, output: str = "probs",
    data_root: str | Path | None = None, device: str | torch.device | None = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """KnockoffNets (random strategy) against the victim: `steal` with the demo's arguments."""
    params = {"labels": labels, "seed": config.seed, "clone": config,
              **({"arch": arch} if arch else {})}
    return steal(victim, "knockoff", data=surrogate, params=params, budget=budget,
                 defense=defense, output=output, data_root=data_root, device=device,
                 progress=progress)
