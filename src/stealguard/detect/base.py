"""The detector interface: per-key state updated by every answered query, an alarm flag.

A detector watches the stream of queries of one API key and raises an alarm when the stream
looks like model stealing. It never changes an answer; what happens to an alarmed key is the
policy's business (`stealguard.detect.policy`: flag, throttle, lock).

    det = build_detector("prada", {"delta": "0.95"})
    state = det.new_state()                   # one per key
    det.update(state, x, logits)              # x (B, C, H, W) in [0, 1], logits (B, K)
    state.alarm_at                            # None, or the key's query number of the alarm

Every detector is registered by name in `DETECTORS` with a typed parameter model (`Params`,
pydantic, unknown fields refused), like the defenses, so `serve --detector`, LocalBlackBox
and specs build it from `key=value` strings. A state is a handful of numpy arrays
(`to_arrays` / `from_arrays`), so it can live in the store and survive a restart (no pickle).
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from stealguard.defenses.base import _describe_error
from stealguard.errors import ConfigError
from stealguard.registry import Registry


class DetectorParams(BaseModel):
    """Typed, validated parameters of one detector. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def validate_detector_params(name: str, params_cls: type[DetectorParams],
                             values: Mapping[str, Any]) -> DetectorParams:
    """`values` (typed, or CLI strings) -> params; ConfigError naming each bad parameter."""
    try:
        return params_cls.model_validate(dict(values))
    except ValidationError as e:
        problems = [_describe_error(params_cls, err)  # type: ignore[arg-type]
                    for err in e.errors()]
        raise ConfigError(f"detector {name!r}: " + "; ".join(problems)) from None


@dataclass
class DetectorState:
    """What a detector remembers of one key. Subclasses add their arrays."""

    seen: int = 0                   # queries observed
    tests: int = 0                  # statistical tests run
    tests_alarmed: int = 0          # tests whose statistic crossed the threshold
    alarm_at: int | None = None     # query number (1-based) of the first alarm; sticky
    statistic: float | None = None  # the last test's statistic

    def header(self) -> dict[str, np.ndarray]:
        return {"_seen": np.asarray(self.seen, np.int64),
                "_tests": np.asarray(self.tests, np.int64),
                "_tests_alarmed": np.asarray(self.tests_alarmed, np.int64),
                "_alarm_at": np.asarray(-1 if self.alarm_at is None else self.alarm_at,
                                        np.int64),
                "_statistic": np.asarray(np.nan if self.statistic is None else self.statistic,
                                         np.float64)}

    def load_header(self, a: Mapping[str, np.ndarray]) -> None:
        self.seen, self.tests = int(a["_seen"]), int(a["_tests"])
        self.tests_alarmed = int(a["_tests_alarmed"])
        self.alarm_at = None if int(a["_alarm_at"]) < 0 else int(a["_alarm_at"])
        s = float(a["_statistic"])
        self.statistic = None if np.isnan(s) else s


@dataclass(frozen=True)
class Alarm:
    """A detector's first alarm on a key."""

    key_id: str
    detector: str
    queries: int            # the key's query number at the alarm
    statistic: float
    detail: str = ""


class Detector(ABC):
    """Stateless itself; all per-key memory is in the `DetectorState` it makes."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[DetectorParams]] = DetectorParams
    needs_logits: ClassVar[bool] = False  # True: the score needs real logits, not log-probs

    @abstractmethod
    def new_state(self) -> DetectorState: ...

    @abstractmethod
    def update(self, state: DetectorState, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Observe a batch in order: x (B, C, H, W) in [0, 1], the model's logits (B, K).
        Sets state.alarm_at at the first alarm (the query number within the key's stream)."""

    @abstractmethod
    def state_arrays(self, state: DetectorState) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def load_state(self, arrays: Mapping[str, np.ndarray]) -> DetectorState: ...

    def describe(self, state: DetectorState) -> str:
        """One line for the audit log: what the alarm was based on."""
        return f"statistic {state.statistic:.4g}" if state.statistic is not None else ""

    def dumps(self, state: DetectorState) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, **state.header(), **self.state_arrays(state))  # type: ignore[arg-type]
        return buf.getvalue()

    def loads(self, blob: bytes) -> DetectorState:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        state = self.load_state(arrays)
        state.load_header(arrays)
        return state


@dataclass
class DetectorComponents:
    """What a detector may need from the deployment, beyond its parameters."""

    model: Any = None                          # the victim (for reference scores)
    reference: torch.Tensor | None = None      # held-out in-distribution images (N, C, H, W)
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


DetectorFactory = Callable[..., Detector]
DETECTORS: Registry[type[Detector]] = Registry("detector")


def build_detector(name: str, params: Mapping[str, Any] | None = None, *,
                   components: DetectorComponents | None = None) -> Detector:
    """The registered detector `name` with validated params (UnknownNameError lists names)."""
    cls = DETECTORS.get(name)
    p = validate_detector_params(name, cls.Params, params or {})
    return cls.from_params(p, components or DetectorComponents())  # type: ignore[attr-defined]
