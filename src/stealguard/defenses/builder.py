"""Build a registered defense by name from CLI-style `key=value` parameters.

    params = parse_defense_params(["epsilon=0.5", "dist=l2"])   # {"epsilon": "0.5", "dist": "l2"}
    mad = build_defense("mad", params, victim=victim, key=secret)

Values may be strings (converted and validated by the defense's typed `Params`: "0.5" ->
0.5, "true" -> True) or already typed. Unknown names raise UnknownNameError (listing the
valid names); bad parameters raise ConfigError naming the parameter and its valid range.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from stealguard.defenses.base import DEFENSES, Defense, DefenseParams, validate_params
from stealguard.keyvalues import split_items

ParamValue = str | float | int | bool


def parse_defense_params(items: Iterable[str]) -> dict[str, str]:
    """["epsilon=0.5", "dist=l2"] -> {"epsilon": "0.5", "dist": "l2"} (values stay strings)."""
    return dict(split_items(items, what="defense parameter", example="epsilon=0.5"))


def build_defense(name: str, params: Mapping[str, ParamValue] | None = None, *,
                  victim: torch.nn.Module | None = None, key: bytes | None = None,
                  **components: Any) -> Defense:
    """The defense registered as `name`, with validated `params`.

    victim: the defended model (MAD copies its architecture and input shape for its
        surrogate; top-k checks k <= K). key: the secret of keyed randomness (random_noise,
        MAD's random-extreme ablation); a fresh one when None, so keep it with the model
        to get the same answers across restarts. components: models a defense needs
        (adaptive_misinformation: misinformation_model=; mad: surrogate=).
    """
    factory = DEFENSES.get(name)  # UnknownNameError lists the valid names
    params_cls: type[DefenseParams] | None = getattr(factory, "Params", None)
    if params_cls is None:  # a plain factory function: hand the raw values over
        return factory(**dict(params or {}))
    typed = validate_params(name, params_cls, params or {})
    return factory.from_params(typed, victim=victim, key=key, **components)  # type: ignore[attr-defined]


def describe_defenses() -> dict[str, dict[str, str]]:
    """{defense name: {parameter: "type, default: valid range"}} for help texts."""
    out: dict[str, dict[str, str]] = {}
    for name in DEFENSES:
        params_cls = getattr(DEFENSES.get(name), "Params", None)
        fields = params_cls.model_fields if params_cls is not None else {}
        out[name] = {f: (("required" if info.is_required() else f"default {info.default!r}")
                         + f": {info.description or ''}") for f, info in fields.items()}
    return out
