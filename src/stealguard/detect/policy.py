"""What happens to a key once a detector has flagged it. Detectors never change answers.

    flag      (default) the alarm is recorded in the audit log (`stealguard audit <key>`);
              the key is answered exactly as before, so nothing reaches the client
    throttle  a flagged key gets at most `rate` images per `window_s` seconds; the rest are
              refused with 429 and Retry-After (nothing counted)
    lock      a flagged key is refused with 403 (nothing counted); the flag is in the store,
              so the lock holds across restarts

A policy acts from the key's first request after the alarming batch has been observed (the
service observes a batch after sending its response, so a request already in flight is
answered).

    policy = build_policy("throttle", {"rate": "60"})
    policy.admit(key_id, n, flagged=True)   # raises DetectionRefusal, or returns
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from stealguard.detect.base import DetectorParams, validate_detector_params
from stealguard.errors import ConfigError, StealguardError
from stealguard.registry import Registry


class DetectionRefusal(StealguardError):
    """A policy refused a flagged key's request; nothing was counted or answered.
    `status` is the HTTP status the service answers (403 lock, 429 throttle)."""

    def __init__(self, message: str, *, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class Policy(ABC):
    name: ClassVar[str] = ""
    Params: ClassVar[type[DetectorParams]] = DetectorParams

    @abstractmethod
    def admit(self, key_id: str, n: int, *, flagged: bool, now: float | None = None) -> None:
        """Return if `n` images of `key_id` may be answered; raise DetectionRefusal if not."""


POLICIES: Registry[type[Policy]] = Registry("detection policy")


@POLICIES.register("flag")
class Flag(Policy):
    """Record only: a flagged key is answered byte for byte as any other."""

    name = "flag"

    def admit(self, key_id: str, n: int, *, flagged: bool, now: float | None = None) -> None:
        return None


@POLICIES.register("lock")
class Lock(Policy):
    """Refuse a flagged key with 403."""

    name = "lock"

    def admit(self, key_id: str, n: int, *, flagged: bool, now: float | None = None) -> None:
        if flagged:
            raise DetectionRefusal(
                f"API key {key_id} is locked: its queries were flagged as model stealing; "
                "contact the service operator", status=403)


class ThrottleParams(DetectorParams):
    rate: int = Field(60, ge=1, description="images per window for a flagged key, >= 1")
    window_s: float = Field(60.0, gt=0, description="window length in seconds, > 0")


@POLICIES.register("throttle")
class Throttle(Policy):
    """At most `rate` images per `window_s` for a flagged key (fixed windows, in memory)."""

    name = "throttle"
    Params = ThrottleParams

    def __init__(self, params: ThrottleParams | None = None) -> None:
        self.p = params or ThrottleParams()
        self._used: dict[str, tuple[int, int]] = {}  # key -> (window number, images in it)
        self._lock = threading.Lock()

    def admit(self, key_id: str, n: int, *, flagged: bool, now: float | None = None) -> None:
        if not flagged:
            return
        now = time.time() if now is None else now
        window = int(now // self.p.window_s)
        with self._lock:
            w, used = self._used.get(key_id, (window, 0))
            used = used if w == window else 0
            if used + n > self.p.rate:
                retry = (window + 1) * self.p.window_s - now
                raise DetectionRefusal(
                    f"API key {key_id} is throttled to {self.p.rate} images per "
                    f"{self.p.window_s:g} s ({used} used in this window); retry in "
                    f"{math.ceil(retry)} s", status=429, retry_after=retry)
            self._used[key_id] = (window, used + n)


def build_policy(name: str, params: Mapping[str, Any] | None = None) -> Policy:
    cls = POLICIES.get(name)
    if cls.Params is DetectorParams:
        if params:
            raise ConfigError(f"policy {name!r} takes no parameters, got "
                                  f"{', '.join(params)}")
        return cls()
    return cls(validate_detector_params(name, cls.Params, params or {}))  # type: ignore[call-arg]
