"""A per-key distribution-shift test for natural-image stealing (KnockoffNets).

PRADA watches distances between queries and misses attackers who send natural images of
another distribution (KnockoffNets). This detector watches what the victim *thinks* of a
key's queries instead. It follows black-box shift detection (BBSD) of Rabanser, Guennemann,
Lipton, "Failing Loudly: An Empirical Study of Methods for Detecting Dataset Shift",
NeurIPS 2019: a univariate two-sample Kolmogorov-Smirnov test between a score of the
classifier's outputs on the new data and on held-out data, here run per key on a sliding
window, as account-aware detectors (D-ADD, Mahalanobis features) do. The score is one of

    energy  E(x) = -T * logsumexp(f(x) / T)   Liu, Wang, Owens, Li, "Energy-based
            Out-of-distribution Detection", NeurIPS 2020 (T = 1; needs logits)
    msp     max_k softmax(f(x))_k             Hendrycks & Gimpel, ICLR 2017

For one key, with R the scores of `reference_size / 2` held-out in-distribution images and
w the key's last `window` scores, every `test_every` queries:

    D = sup_t | F_w(t) - F_R(t) |               (the two-sample KS statistic)

and the key is flagged when D > tau. Calibration (our choice, stated): the KS p-value is
meaningless after hundreds of overlapping tests on one key, so tau is the (1 - alpha)
quantile of max_tests D over `simulations` benign streams of `horizon` queries drawn (with
replacement) from the *other* half of the held-out images. Hence: a benign key whose queries
are like the held-out data is flagged with probability about alpha within its first
`horizon` queries (alpha = 1 %, horizon = 10,000 by default).

Memory per key: `window` floats (1.6 kB with the defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from stealguard.detect.base import (
    DETECTORS,
    Detector,
    DetectorComponents,
    DetectorParams,
    DetectorState,
)
from stealguard.errors import ConfigError


class ShiftParams(DetectorParams):
    score: Literal["energy", "msp"] = Field("energy", description="energy or msp")
    temperature: float = Field(1.0, gt=0, description="energy temperature T, > 0")
    window: int = Field(200, ge=10, description="recent scores per key in the test, >= 10")
    test_every: int = Field(50, ge=1, description="queries between two tests, >= 1")
    alpha: float = Field(0.01, gt=0, lt=1, description="benign false-alarm probability per "
                         "key within `horizon` queries, in (0, 1)")
    horizon: int = Field(10_000, ge=10, description="queries per key the calibration covers")
    reference_size: int = Field(5000, ge=100, description="held-out images used: half "
                                "reference, half calibration, >= 100")
    simulations: int = Field(500, ge=20, description="simulated benign streams, >= 20")
    reference: str | None = Field(None, description="held-out images as dataset@split (serve; "
                                  "default: the victim's dataset, test split)")
    seed: int = Field(0, description="seed of the reference split and the simulations")

    @model_validator(mode="after")
    def _sizes(self) -> ShiftParams:
        if self.window > self.horizon:
            raise ValueError(f"window ({self.window}) must be <= horizon ({self.horizon})")
        return self


@dataclass
class ShiftState(DetectorState):
    scores: list[float] = field(default_factory=list)  # the key's last `window` scores


def scores_of(logits: torch.Tensor, score: str, temperature: float = 1.0) -> np.ndarray:
    """(B, K) logits -> (B,) scores (higher: more in-distribution for msp, less for energy)."""
    z = logits.detach().float().cpu()
    if score == "energy":
        return (-temperature * torch.logsumexp(z / temperature, 1)).numpy().astype(np.float64)
    if score == "msp":
        return torch.softmax(z, 1).max(1).values.numpy().astype(np.float64)
    raise ConfigError(f"unknown score {score!r}; valid: energy, msp")


def ks_statistic(window: np.ndarray, ref_sorted: np.ndarray) -> np.ndarray:
    """Two-sample KS statistic, exact with ties: window (..., n), ref_sorted (m,) -> (...,).

    Both ECDFs are step functions, so sup_t |F_w - F_R| is reached at, or just before, a
    point of the window; ref jumps in between only move F_R toward the next window point.
    """
    w = np.sort(window, axis=-1)
    n, m = w.shape[-1], len(ref_sorted)
    fr_le = np.searchsorted(ref_sorted, w, side="right") / m    # F_R(w_i)
    fr_lt = np.searchsorted(ref_sorted, w, side="left") / m     # F_R(w_i^-)
    fw_le = _count(w, side="right") / n
    fw_lt = _count(w, side="left") / n
    return np.maximum(np.abs(fw_le - fr_le), np.abs(fw_lt - fr_lt)).max(-1)


def _count(w_sorted: np.ndarray, side: str) -> np.ndarray:
    """For each element of each sorted row, how many of the row are <= it (side="right") or
    < it (side="left"): the end / start of its run of equal values."""
    n = w_sorted.shape[-1]
    idx = np.broadcast_to(np.arange(n), w_sorted.shape)
    change = np.diff(w_sorted, axis=-1) != 0                     # (..., n - 1)
    edge = np.ones(w_sorted.shape[:-1] + (1,), bool)
    if side == "right":  # a run ends where the next value differs (or at the row's end)
        ends = np.where(np.concatenate([change, edge], -1), idx + 1, n)
        return np.minimum.accumulate(ends[..., ::-1], axis=-1)[..., ::-1]
    starts = np.where(np.concatenate([edge, change], -1), idx, 0)  # a run starts after a change
    return np.maximum.accumulate(starts, axis=-1)


def calibrate(calibration: np.ndarray, ref_sorted: np.ndarray, *, window: int,
              test_every: int, horizon: int, alpha: float, simulations: int,
              seed: int) -> float:
    """tau: the (1 - alpha) quantile of the largest D over simulated benign streams."""
    rng = np.random.default_rng(seed)
    ends = np.arange(window, horizon + 1, test_every)  # the stream lengths at which we test
    maxima = np.empty(simulations)
    for i in range(simulations):
        stream = rng.choice(calibration, size=horizon, replace=True)
        wins = np.lib.stride_tricks.sliding_window_view(stream, window)[ends - window]
        maxima[i] = ks_statistic(wins, ref_sorted).max()
    return float(np.quantile(maxima, 1 - alpha, method="higher"))


@DETECTORS.register("shift")
class Shift(Detector):
    """Per-key KS test of the victim's scores against held-out data (BBSD, Rabanser 2019)."""

    name = "shift"
    Params = ShiftParams

    def __init__(self, params: ShiftParams, reference_scores: np.ndarray) -> None:
        self.p = params
        if len(reference_scores) < 100:
            raise ConfigError(f"detector 'shift' needs >= 100 held-out images, got "
                              f"{len(reference_scores)}")
        perm = np.random.default_rng(params.seed).permutation(len(reference_scores))
        half = len(perm) // 2
        self.ref_sorted = np.sort(reference_scores[perm[:half]])
        self.tau = calibrate(reference_scores[perm[half:]], self.ref_sorted,
                             window=params.window, test_every=params.test_every,
                             horizon=params.horizon, alpha=params.alpha,
                             simulations=params.simulations, seed=params.seed)

    @property
    def needs_logits(self) -> bool:  # type: ignore[override]
        return self.p.score == "energy"

    @classmethod
    def from_params(cls, params: ShiftParams, components: DetectorComponents) -> Shift:
        ref, logits_fn = components.reference, components.logits_fn
        if ref is None or logits_fn is None:
            raise ConfigError("detector 'shift' needs the victim and held-out in-distribution "
                              "images (reference=<dataset>@<split>, default the victim's "
                              "dataset's test split)")
        ref = ref[: params.reference_size]
        scores = np.concatenate([scores_of(logits_fn(xb), params.score, params.temperature)
                                 for xb in ref.split(512)])
        return cls(params, scores)

    def new_state(self) -> ShiftState:
        return ShiftState()

    def update(self, state: DetectorState, x: torch.Tensor, logits: torch.Tensor) -> None:
        assert isinstance(state, ShiftState)
        for s in scores_of(logits, self.p.score, self.p.temperature).tolist():
            state.scores.append(s)
            if len(state.scores) > self.p.window:
                del state.scores[0]
            state.seen += 1
            if state.seen >= self.p.window and (state.seen - self.p.window) % self.p.test_every == 0:
                d = float(ks_statistic(np.asarray(state.scores), self.ref_sorted))
                state.tests += 1
                state.statistic = d
                if d > self.tau:
                    state.tests_alarmed += 1
                    if state.alarm_at is None:
                        state.alarm_at = state.seen

    def describe(self, state: DetectorState) -> str:
        return (f"KS D = {state.statistic:.4f} > tau = {self.tau:.4f} ({self.p.score} scores "
                f"of the last {self.p.window} queries vs held-out data)")

    def state_arrays(self, state: DetectorState) -> dict[str, np.ndarray]:
        assert isinstance(state, ShiftState)
        return {"scores": np.asarray(state.scores, np.float64)}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> ShiftState:
        return ShiftState(scores=[float(t) for t in arrays["scores"]])
