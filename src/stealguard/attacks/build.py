"""Build a registered attack by name from the attacker's data and its typed parameters.

    attack = build_attack("jbda", load_dataset("mnist", "train"), {"preset": "edm",
                          "seed_size": 128, "labels": "hard"})
    attack = build_attack("knockoff", load_dataset("fashionmnist", "train"),
                          {"clone": {"epochs": 50, "lr": 0.1}})

Values may be typed or strings from the command line ("0.5", "true", "budget"); the attack's
`Params` model converts and validates them. Unknown names raise UnknownNameError (listing the
valid names); bad parameters raise ConfigError naming the parameter and its valid range.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pydantic import BaseModel

from stealguard.attacks.base import ATTACKS, Attack, AttackParams, validate_attack_params
from stealguard.data import ImageDataset
from stealguard.errors import ConfigError
from stealguard.keyvalues import split_items


def attack_params_class(name: str) -> type[AttackParams]:
    """The `Params` model of the attack registered as `name`."""
    factory = ATTACKS.get(name)  # UnknownNameError lists the valid names
    params_cls = getattr(factory, "Params", None)
    if not (isinstance(params_cls, type) and issubclass(params_cls, AttackParams)):
        raise TypeError(f"attack {name!r} declares no Params (an AttackParams subclass)")
    return params_cls


def validate_attack(name: str, params: BaseModel | Mapping[str, Any] | None = None
                    ) -> AttackParams:
    """`params` validated by attack `name`'s Params (ConfigError names each bad field)."""
    return validate_attack_params(name, attack_params_class(name), params)


def build_attack(name: str, data: ImageDataset | torch.Tensor | None = None,
                 params: BaseModel | Mapping[str, Any] | None = None, *,
                 device: str | torch.device | None = "cpu", progress: bool = False) -> Attack:
    """The attack registered as `name`, on the attacker's `data`, with validated `params`.

    data: the attacker's images: the surrogate set of KnockoffNets, the in-distribution images
        the Jacobian family draws its seed set from (None for a data-free attack).
    params: the attack's `Params`, or a mapping of its fields (typed or strings).
    device, progress: where the clone trains; progress bars.
    """
    typed = validate_attack(name, params)
    return ATTACKS.get(name)(data, typed, device=device, progress=progress)


def parse_attack_params(items: Iterable[str]) -> dict[str, Any]:
    """["seed_size=20", "clone.lr=0.1"] -> {"seed_size": "20", "clone": {"lr": "0.1"}}
    (values stay strings; a dotted key sets a field of a nested model)."""
    out: dict[str, Any] = {}
    for key, value in split_items(items, what="attack parameter",
                                  example="seed_size=100 or clone.epochs=10"):
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"attack parameter {key!r} sets a field of {part!r}, "
                                  "which was given a value")
        if leaf in node:
            raise ConfigError(f"attack parameter {key!r} given twice")
        node[leaf] = value
    return out


def describe_attacks() -> dict[str, dict[str, str]]:
    """{attack name: {parameter: "default ...: valid range"}} for help texts."""
    out: dict[str, dict[str, str]] = {}
    for name in ATTACKS:
        fields = attack_params_class(name).model_fields
        out[name] = {f: (("required" if info.is_required() else
                          f"default {info.get_default(call_default_factory=True)!r}")
                         + f": {info.description or ''}") for f, info in fields.items()}
    return out
