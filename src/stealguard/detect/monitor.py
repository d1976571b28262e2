"""The detectors of one deployment, per key, behind one policy: what the black box and the
service call around every answered batch.

    monitor = build_monitor([("prada", {}), ("shift", {"alpha": "0.01"})], model=victim,
                            reference=held_out_images, policy="flag", store="service.db")
    monitor.admit(key_id, n)          # the policy: raises DetectionRefusal (403 / 429) or returns
    ...answer the batch...
    monitor.observe(key_id, x)        # update every detector's state; returns new alarms

The monitor computes the model's logits itself (one more forward pass per answered image;
`logits=` skips it when the caller has them), so it sees the undefended model whatever the
defense or output mode. It changes nothing that is returned: under `flag` the answers of a
flagged key are the answers of any key. State is flushed to the store at most every
`persist_every_s` seconds per key (0: after every batch) and on close; alarms are written at
once. Thread-safe (one lock: detectors are cheap next to the model).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import Engine

from stealguard.detect.base import (
    DETECTORS,
    Alarm,
    Detector,
    DetectorComponents,
    DetectorState,
    build_detector,
)
from stealguard.detect.policy import Policy, build_policy
from stealguard.detect.store import DetectorStore
from stealguard.errors import ConfigError

log = logging.getLogger("stealguard.detect")


def model_logits(model: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], bool]:
    """(x -> (B, K) logits, whether they are real logits). A stealguard Classifier's forward
    gives logits; any other predictor (an EDM ensemble routing each image to one member)
    gives log-probabilities of its `predict_proba`."""
    from stealguard.models import Classifier

    own = getattr(model, "predict_proba", None)
    if isinstance(model, Classifier) or not callable(own):
        return (lambda x: model(x).float()), True
    return (lambda x: own(x).float().clamp_min(1e-12).log()), False


class Monitor:
    def __init__(self, detectors: Sequence[Detector], *, policy: Policy | None = None,
                 store: DetectorStore | Engine | str | Path | None = None,
                 logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: str | torch.device = "cpu", persist_every_s: float = 1.0) -> None:
        names = [d.name for d in detectors]
        if len(set(names)) != len(names):
            raise ConfigError(f"each detector may be given once, got {', '.join(names)}")
        self.detectors = {d.name: d for d in detectors}
        self.policy = policy or build_policy("flag")
        self.own_store = store is not None and not isinstance(store, DetectorStore)
        self.store = (store if isinstance(store, DetectorStore) or store is None
                      else DetectorStore(store))
        self.logits_fn, self.device = logits_fn, torch.device(device)
        self.persist_every_s = persist_every_s
        self._states: dict[tuple[str, str], DetectorState] = {}
        self._configs = {n: json.dumps(d.p.model_dump(mode="json"), sort_keys=True)  # type: ignore[attr-defined]
                         for n, d in self.detectors.items()}
        self._dirty: set[tuple[str, str]] = set()
        self._last_flush: dict[str, float] = {}
        self._flagged = self.store.flagged_keys() if self.store is not None else set()
        self._lock = threading.RLock()

    # the policy ------------------------------------------------------------------------

    def flagged(self, key_id: str) -> bool:
        return key_id in self._flagged

    def admit(self, key_id: str, n: int) -> None:
        """Raise DetectionRefusal if the policy refuses `n` more images of this key."""
        self.policy.admit(key_id, n, flagged=self.flagged(key_id))

    # observing -------------------------------------------------------------------------

    def state(self, key_id: str, detector: str) -> DetectorState:
        with self._lock:
            k = (key_id, detector)
            if k not in self._states:
                det = self.detectors[detector]
                blob = (self.store.load(key_id, detector, self._configs[detector])
                        if self.store is not None else None)
                self._states[k] = det.loads(blob) if blob is not None else det.new_state()
            return self._states[k]

    @torch.no_grad()
    def observe(self, key_id: str, x: torch.Tensor, logits: torch.Tensor | None = None
                ) -> list[Alarm]:
        """Update every detector with an answered batch x (B, C, H, W) in [0, 1]."""
        if x.shape[0] == 0:
            return []
        if logits is None:
            if self.logits_fn is None:
                raise ConfigError("the monitor needs the model's logits: give logits_fn")
            logits = torch.cat([self.logits_fn(xb.to(self.device)).float().cpu()
                                for xb in x.split(1024)])
        new: list[Alarm] = []
        with self._lock:
            for name, det in self.detectors.items():
                st = self.state(key_id, name)
                before = st.alarm_at
                det.update(st, x, logits)
                self._dirty.add((key_id, name))
                if before is None and st.alarm_at is not None:
                    new.append(Alarm(key_id, name, st.alarm_at, float(st.statistic or 0.0),
                                     det.describe(st)))
            for a in new:
                self._flagged.add(key_id)
                if self.store is not None:
                    self.store.record(a)
                log.warning("detector %s flagged key %s after %d queries: %s", a.detector,
                            a.key_id, a.queries, a.detail)
            now = time.monotonic()
            if new or now - self._last_flush.get(key_id, 0.0) >= self.persist_every_s:
                self.flush(key_id)
                self._last_flush[key_id] = now
        return new

    def alarms(self, key_id: str) -> dict[str, int]:
        """{detector: query number of its first alarm} for the detectors that fired."""
        with self._lock:
            return {n: s.alarm_at for n in self.detectors
                    if (s := self.state(key_id, n)).alarm_at is not None}

    def flush(self, key_id: str | None = None) -> None:
        """Write the changed states (of one key, or all) to the store."""
        with self._lock:
            todo = [k for k in self._dirty if key_id is None or k[0] == key_id]
            if self.store is not None:
                self.store.save([(k, d, self._configs[d], self._states[(k, d)].seen,
                                  self.detectors[d].dumps(self._states[(k, d)]))
                                 for k, d in todo])
            self._dirty.difference_update(todo)

    def close(self) -> None:
        self.flush()
        if self.own_store and self.store is not None:
            self.store.close()


def build_monitor(detectors: Iterable[tuple[str, Mapping[str, Any]]], *, model: Any,
                  policy: str = "flag", policy_params: Mapping[str, Any] | None = None,
                  reference: torch.Tensor | None = None,
                  store: DetectorStore | Engine | str | Path | None = None,
                  device: str | torch.device = "cpu", persist_every_s: float = 1.0) -> Monitor:
    """Detectors by registered name and params (validated here: a bad name or parameter
    fails before anything is served, listing the valid ones), on `model`."""
    specs = list(detectors)
    for name, _ in specs:
        DETECTORS.get(name)
    pol = build_policy(policy, policy_params)
    logits_fn, real = model_logits(model)
    dev = torch.device(device)
    comps = DetectorComponents(model=model, logits_fn=lambda x: logits_fn(x.to(dev)).cpu(),
                               reference=None if reference is None
                               else _float_images(reference))
    built = [build_detector(n, p, components=comps) for n, p in specs]
    for d in built:
        if d.needs_logits and not real:
            raise ConfigError(f"detector {d.name!r} with score=energy needs the model's logits; "
                              "this model answers probabilities only (an EDM ensemble): use "
                              "score=msp")
    return Monitor(built, policy=pol, store=store, logits_fn=logits_fn, device=dev,
                   persist_every_s=persist_every_s)


def _float_images(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def parse_detector_args(names: Sequence[str], params: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """CLI: `--detector prada --detector shift -P shift.alpha=0.01 -P delta=0.9` -> specs.
    A param without `<detector>.` goes to the only detector (an error with several)."""
    specs: dict[str, dict[str, str]] = {}
    for n in names:
        DETECTORS.get(n)
        if n in specs:
            raise ConfigError(f"--detector {n} given twice")
        specs[n] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--detector-param {item!r}: expected [detector.]name=value")
        det, dot, field = key.partition(".")
        if not dot:
            if len(specs) != 1:
                raise ConfigError(f"--detector-param {item!r}: say which detector "
                                  f"(<detector>.{key}=...; detectors: "
                                  f"{', '.join(specs) or 'none given'})")
            det, field = next(iter(specs)), key
        if det not in specs:
            raise ConfigError(f"--detector-param {item!r}: detector {det!r} is not enabled "
                              f"(--detector {det})")
        specs[det][field] = value
    return list(specs.items())
