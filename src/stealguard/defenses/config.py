"""One defense configuration: a registered name, its parameters and (for keyed defenses) its key.

Specs, the CLI (`--defense mad --defense-param epsilon=0.5 --defense-key-file k.bin`), the
single-process service and every Ray Serve router build their defense from a `DefenseConfig`:

    cfg = DefenseConfig(name="mad", params={"epsilon": "0.5"})   # parameters checked here
    defense = cfg.build(victim)                                  # a Defense on that victim
    cfg.label()                                                  # "mad(epsilon=0.5)"

The parameters are validated when the config is made (the defense's typed `Params`), so a
bad name or value fails before anything is trained or deployed. The key (`key`, or
`key_file`, read when the defense is built, so only the path travels) is secret: it is never
in the repr nor in `model_dump` (a spec cell's identity does not depend on it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stealguard.defenses.base import DEFENSES, Defense, validate_params
from stealguard.defenses.builder import build_defense, parse_defense_params
from stealguard.errors import ConfigError


class DefenseConfig(BaseModel):
    """An output defense by registered name, with its typed parameters and optional key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)
    key: bytes | None = Field(None, exclude=True, repr=False,
                              description="the secret of keyed defenses (never dumped)")
    key_file: str | None = Field(None, exclude=True, repr=False,
                                 description="a file holding the key, read at build time")

    def __init__(self, **data: Any) -> None:
        """As pydantic's, but a bad config raises ConfigError (inside a spec cell it stays a
        field error of the cell, with its location)."""
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError("; ".join(_message(err) for err in e.errors())) from None

    @model_validator(mode="after")
    def _known(self) -> DefenseConfig:
        params_cls = getattr(DEFENSES.get(self.name), "Params", None)  # lists valid names
        if params_cls is not None:
            validate_params(self.name, params_cls, self.params)
        return self

    @classmethod
    def from_cli(cls, name: str | None, params: Iterable[str] = (),
                 key_file: str | Path | None = None) -> DefenseConfig:
        """`--defense NAME --defense-param k=v ... --defense-key-file F` as a config."""
        items = list(params)
        if name is None:
            if items:
                raise ConfigError("--defense-param given without --defense")
            name = "none"
        return cls(name=name, params=parse_defense_params(items),
                   key_file=None if key_file is None else str(key_file))

    @property
    def is_none(self) -> bool:
        return self.name == "none"

    def secret(self) -> bytes | None:
        """The key: `key`, else the contents of `key_file`, else None (a fresh one per build)."""
        if self.key is not None:
            return self.key
        return Path(self.key_file).read_bytes() if self.key_file is not None else None

    def build(self, victim: Any = None, *, key: bytes | None = None,
              components: dict[str, Any] | None = None) -> Defense:
        """The defense on `victim` (NoDefense for `none`). `key` overrides the config's."""
        return build_defense(self.name, self.params, victim=victim,
                             key=key if key is not None else self.secret(),
                             **(components or {}))

    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"


def _message(err: Any) -> str:
    ctx = err.get("ctx") or {}
    if "error" in ctx:  # our validator's ConfigError, as it was raised
        return str(ctx["error"])
    where = ".".join(str(p) for p in err.get("loc", ())) or "defense"
    return f"defense config {where}: {err.get('msg')}"
