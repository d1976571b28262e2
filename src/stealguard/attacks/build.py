"""One entry point from a name and plain options to a ready attack (for the CLI and specs).

    attack = build_attack("jbda", seed_set=load_dataset("mnist", "test"), preset="edm",
                          options={"labels": "hard"})
    attack = build_attack("knockoff", surrogate=load_dataset("fashionmnist", "train"),
                          config=TrainConfig(epochs=50, lr=0.1))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from stealguard.attacks.base import ATTACKS, Attack
from stealguard.attacks.jacobian import (
    DEFAULT_SEED_SIZE,
    MAD_SEED_SIZES,
    JacobianAttack,
    JacobianConfig,
)
from stealguard.attacks.options import AttackerOptions
from stealguard.data import ImageDataset
from stealguard.errors import ConfigError
from stealguard.training import TrainConfig


def build_attack(
    name: str, *, seed_set: ImageDataset | None = None, surrogate: ImageDataset | None = None,
    options: AttackerOptions | Mapping[str, Any] | None = None,
    config: TrainConfig | None = None, preset: str = "edm",
    jacobian: JacobianConfig | Mapping[str, Any] | None = None, seed_size: int | None = None,
    device: str | torch.device | None = "cpu", progress: bool = False,
) -> Attack:
    """Build the registered attack `name`.

    seed_set: in-distribution images, for the Jacobian family (jbda, jbda_tr, jb_self,
        jb_top3); `seed_size` of them are drawn at random (seeded by options.seed); default:
        MAD's size for the dataset under preset "mad", else 128 (or all, if fewer).
    surrogate: the attacker's own images, for knockoff and adaptive_averaging.
    options: AttackerOptions or a mapping of its fields (labels, arch, nquery, nquery_mode,
        query_aug, ...); unknown fields are refused.
    config: the training of the clone the attack returns (None: the attack's / preset's).
    preset, jacobian: the Jacobian family's settings ("edm" / "mad", field overrides).
    """
    cls = ATTACKS.get(name)
    role = getattr(cls, "data_role", "surrogate")
    given = {"seed_set": seed_set, "surrogate": surrogate}
    data, other = given.pop(role), next(iter(given))
    if data is None or given[other] is not None:
        what = "in-distribution seed images" if role == "seed_set" else "the attacker's images"
        raise ConfigError(f"attack {name!r} takes {role}= ({what}), not {other}=")
    if _is_jacobian(cls):
        data = _seed_subset(data, preset, seed_size, options)
        return cls(data, preset=preset, jacobian=jacobian, options=options, config=config,
                   device=device, progress=progress)
    if jacobian is not None or seed_size is not None:
        raise ConfigError(f"attack {name!r} takes no jacobian= or seed_size= "
                          "(Jacobian family only)")
    return cls(data, options=options, config=config, device=device, progress=progress)


def _is_jacobian(factory: object) -> bool:
    return isinstance(factory, type) and issubclass(factory, JacobianAttack)


def _seed_subset(data: ImageDataset, preset: str, seed_size: int | None,
                 options: AttackerOptions | Mapping[str, Any] | None) -> ImageDataset:
    if seed_size is None:  # the preset's size, or all of a smaller set
        default = MAD_SEED_SIZES.get(data.name, 100) if preset == "mad" else DEFAULT_SEED_SIZE
        seed_size = min(default, len(data))
    if seed_size < 1:
        raise ConfigError(f"seed_size must be >= 1, got {seed_size}")
    if seed_size > len(data):
        raise ConfigError(f"seed_size {seed_size} exceeds the {len(data)} images of "
                          f"{data.name}/{data.split}")
    seed = (options.seed if isinstance(options, AttackerOptions)
            else int((options or {}).get("seed", 0)))
    return data.subset(seed_size, seed=seed)
