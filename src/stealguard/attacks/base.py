"""The attack interface, its typed parameters, and the one clone-training path.

An attack takes a black box and a query budget and returns an `AttackResult`: the clone,
the transfer set it was trained on (inputs and the black box's answers), the number of
queries it spent, and a log. Attacks only ever see the victim through `BlackBox.query`.

Attacks are declared like defenses: each registered attack has a typed `Params` model
(pydantic, frozen, unknown fields refused, every field's description gives its valid range)
and is built from the attacker's data and those params:

    class MyAttack(Attack):
        class Params(CloneOptions):            # labels, arch, seed, query_batch, clone
            rounds: int = Field(3, ge=1, description="query rounds, >= 1")
        def __init__(self, data, params=None, *, device="cpu", progress=False, **fields): ...

    attack = build_attack("my_attack", images, {"rounds": 5})   # stealguard.attacks.build
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from stealguard.blackbox import BlackBox
from stealguard.errors import ConfigError
from stealguard.models import Classifier, build_model
from stealguard.registry import Registry
from stealguard.training import TrainConfig, TrainLog, train

LabelMode = Literal["soft", "hard"]


class AttackParams(BaseModel):
    """Typed, validated parameters of one attack. Unknown fields are refused; frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=BaseModel)


def validate_attack_params(attack: str, params_cls: type[P],
                           values: BaseModel | Mapping[str, Any] | None = None,
                           **overrides: Any) -> P:
    """`values` (an instance, a mapping of typed values or CLI strings like "0.5", or None)
    with `overrides` applied (None = keep), validated into `params_cls`.

    Raises ConfigError naming the attack, each bad parameter and its valid range, and for an
    unknown one the valid names.
    """
    base = (values.model_dump(exclude_unset=True) if isinstance(values, BaseModel)
            else dict(values or {}))
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return params_cls.model_validate(base)
    except ValidationError as e:
        problems = [_describe_error(params_cls, err) for err in e.errors()]
        raise ConfigError(f"attack {attack!r}: " + "; ".join(problems)) from None


def _describe_error(params_cls: type[BaseModel], err: Any) -> str:
    loc = [str(p) for p in err["loc"]]
    field = ".".join(loc) or "?"
    info = params_cls.model_fields.get(loc[0]) if loc else None
    valid = info.description if info is not None and info.description else "see the docs"
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        names = ", ".join(params_cls.model_fields) or "(none)"
        return f"unknown parameter {field!r}; valid parameters: {names}"
    if err["type"] == "missing":
        return f"parameter {field!r} is required: {valid}"
    if len(loc) > 1:  # inside a nested model (clone.lr, jitter.hue): pydantic's message says it
        return f"{field}={err.get('input')!r} is invalid ({err['msg']})"
    return f"{field}={err.get('input')!r} is invalid ({err['msg']}); valid: {valid}"


@dataclass
class AttackResult:
    clone: Classifier
    transfer_x: torch.Tensor  # (Q, C, H, W) uint8 or float: the images queried
    transfer_y: torch.Tensor  # (Q, K) the black box's answers
    queries: int
    log: list[dict[str, Any]] = field(default_factory=list)
    queries_per_row: int = 1  # queries behind each transfer-set row (nquery in "average" mode)


class Attack(ABC):
    """Subclasses declare `Params` and implement `run`; `__call__` checks the budget
    accounting around it. `params` holds the validated parameters the attack was built with."""

    Params: ClassVar[type[AttackParams]] = AttackParams
    registered_name: ClassVar[str] = ""  # set by ATTACKS.register
    params: AttackParams

    @abstractmethod
    def run(self, blackbox: BlackBox, budget: int) -> AttackResult: ...

    def __call__(self, blackbox: BlackBox, budget: int) -> AttackResult:
        if budget < 1:
            raise ConfigError(f"query budget must be >= 1, got {budget}")
        before = blackbox.queries_used
        result = self.run(blackbox, budget)
        spent = blackbox.queries_used - before
        if spent != result.queries or spent > budget:  # an attack that lies about its count is a bug
            raise RuntimeError(f"attack reported {result.queries} queries, black box counted "
                               f"{spent} (budget {budget})")
        return result


def query_all(blackbox: BlackBox, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Query `images` (N, C, H, W) in batches -> (N, K) answers (CPU float)."""
    outs = [blackbox.query(xb) for xb in images.split(batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, blackbox.num_classes)


def answers_to_targets(answers: torch.Tensor, labels: str) -> torch.Tensor:
    """soft: the answered probability vectors (N, K); hard: their argmax (N,)."""
    if labels == "soft":
        return answers.float()
    if labels == "hard":
        return answers.argmax(1)
    raise ConfigError(f"unknown label mode {labels!r}; valid: soft, hard")


def train_clone(
    images: torch.Tensor, answers: torch.Tensor, *, labels: str, arch: str,
    input_shape: tuple[int, int, int], num_classes: int, mean: tuple[float, ...],
    std: tuple[float, ...], config: TrainConfig, device: str | torch.device | None = "cpu",
    progress: bool = False, clone: Classifier | None = None,
) -> tuple[Classifier, TrainLog]:
    """Build (or continue) a clone and train it on the transfer set. Shared by all attacks."""
    c, h, _ = input_shape
    if clone is None:
        torch.manual_seed(config.seed)
        clone = build_model(arch, in_channels=c, image_size=h, num_classes=num_classes,
                            mean=mean, std=std)
    targets = answers_to_targets(answers, labels)
    log = train(clone, images, targets, config=config, device=device, progress=progress,
                desc="clone")
    return clone, log


AttackFactory = Callable[..., Attack]


class AttackRegistry(Registry[AttackFactory]):
    """The attack registry; a registered class learns its name (`registered_name`), so its
    errors can say which attack refused what."""

    def register(self, name: str) -> Callable[[AttackFactory], AttackFactory]:
        add = super().register(name)

        def decorator(obj: AttackFactory) -> AttackFactory:
            if isinstance(obj, type):
                obj.registered_name = name  # type: ignore[attr-defined]
            return add(obj)

        return decorator


ATTACKS: AttackRegistry = AttackRegistry("attack")
