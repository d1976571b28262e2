"""One attack configuration for specs, the CLI and the library: name, params, data.

    cfg = AttackConfig(name="jbda", data="mnist@train", params={"seed_size": 128})
    attack = cfg.build(images)                  # = build_attack(cfg.name, images, cfg.params)
    steal(victim, cfg, budget=10_000)           # steal loads cfg.data itself

`data` names the attacker's images: a registered dataset or `imagefolder:<path>`, with an
optional `@split` (default `train`): the surrogate set of KnockoffNets, the in-distribution
images of the Jacobian family (the victim's own training distribution, disjoint from its
test set), None for a data-free attack. The params are validated against the attack's
typed `Params` when the config is made, so a spec with a bad attack parameter fails when it
is loaded, naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stealguard.attacks.base import ATTACKS, Attack, AttackParams
from stealguard.attacks.build import build_attack, validate_attack
from stealguard.data import DATASETS, ImageDataset
from stealguard.errors import ConfigError


def split_data_name(data: str) -> tuple[str, str]:
    """"mnist@test" -> ("mnist", "test"); "mnist" -> ("mnist", "train")."""
    name, _, split = data.partition("@")
    return name, split or "train"


class AttackConfig(BaseModel):
    """A registered attack, its typed parameters, and the attacker's data. Unknown fields
    are refused."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("knockoff", description="a registered attack")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the attack's Params fields")
    data: str | None = Field(None, description="the attacker's images: dataset[@split]")

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        ATTACKS.get(v)  # UnknownNameError lists the valid names
        return v

    @field_validator("data")
    @classmethod
    def _known_data(cls, v: str | None) -> str | None:
        if v is not None:
            name, split = split_data_name(v)
            if not name.startswith("imagefolder:"):
                DATASETS.get(name)
            if split not in ("train", "test"):
                raise ValueError(f"data {v!r}: unknown split {split!r}; valid: train, test")
        return v

    @model_validator(mode="after")
    def _valid_params(self) -> AttackConfig:
        validate_attack(self.name, self.params)
        return self

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> AttackConfig:
        """Validate `values` (name, params, data), raising ConfigError (not pydantic's
        ValidationError) with one clause per problem: for callers outside a spec."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as e:
            problems = []
            for err in e.errors():
                msg = err["msg"].removeprefix("Value error, ")
                loc = ".".join(str(p) for p in err["loc"])
                problems.append(msg if not loc or msg.startswith("attack ") else f"{loc}: {msg}")
            raise ConfigError("; ".join(problems)) from None

    def typed_params(self) -> AttackParams:
        return validate_attack(self.name, self.params)

    def dataset(self) -> tuple[str, str] | None:
        """(name, split) of the attacker's data, or None."""
        return None if self.data is None else split_data_name(self.data)

    def build(self, data: ImageDataset | torch.Tensor | None, *,
              device: str | torch.device | None = "cpu", progress: bool = False) -> Attack:
        return build_attack(self.name, data, self.params, device=device, progress=progress)

    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"
