"""PRADA: per-key detection of synthetic-query stealing by the shape of query distances.

Juuti, Szyller, Marchal, Asokan. "PRADA: Protecting against DNN Model Stealing Attacks",
EuroS&P 2019 (Algorithm 1; the authors' code, SSGAalto/prada-protecting-against-dnn-model-
stealing-attacks, `GrowingDistanceAgent`, fixes the details the paper leaves open).

For one client, each query x with predicted class c = argmax F(x):

    if G_c is empty:  G_c <- {x},  D_Gc <- {0},  T_c <- 0
    else:
        d_min = min_{y in G_c} ||x - y||_2               (L2 on the input pixels)
        D_c  <- D_c u {d_min}
        if d_min > T_c:
            G_c  <- G_c u {x},  D_Gc <- D_Gc u {d_min}
            T_c  <- max(T_c, mean(D_Gc) - std(D_Gc))

Every `test_every` queries (the authors' 10): D = the union of D_c over the classes with at
least 10 distances, without the values more than 3 standard deviations from its mean; once
|D| > `min_distances` (100), W = Shapiro-Wilk(D) (scipy.stats.shapiro) and the client is
flagged when W < delta. Benign natural queries give roughly normal distances; JBDA-style
synthetic queries (small steps from earlier queries) give a spike of small distances, W falls.

delta: the paper sets it per model as the highest W seen on benign streams (no false
positives); our default 0.95 is set the same way on the MNIST / FashionMNIST benign clients
of `detect-table` (the paper's values are around 0.9 to 0.96; tune on your own traffic).

Memory per key (bounded; ours): each growing set holds at most `max_set` queries (further
distant queries are still measured but no longer added), kept as 8-bit pixels; each D_c
keeps the last `max_distances` values. At most K * max_set * C*H*W bytes
+ K * (max_set + max_distances) * 8 bytes: 7.8 MB for MNIST (K = 10, 784 pixels) with the
defaults, 31 MB for CIFAR-10. The authors' sets are unbounded.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field
from scipy import stats

from stealguard.detect.base import (
    DETECTORS,
    Detector,
    DetectorComponents,
    DetectorParams,
    DetectorState,
)


class PradaParams(DetectorParams):
    delta: float = Field(0.95, gt=0, le=1, description="alarm when Shapiro-Wilk W < delta, in (0, 1]")
    test_every: int = Field(10, ge=1, description="queries between two tests (authors: 10), >= 1")
    min_distances: int = Field(100, ge=3, description="test once more distances are pooled, >= 3")
    min_class_distances: int = Field(10, ge=1, description="a class's distances join the test "
                                     "pool once it has this many (authors: 10), >= 1")
    outlier_std: float = Field(3.0, gt=0, description="drop pooled distances this many std "
                               "from the mean before the test (authors: 3), > 0")
    max_set: int = Field(1000, ge=1, description="growing-set size bound per class, >= 1")
    max_distances: int = Field(1000, ge=10, description="distances kept per class, >= 10")


@dataclass
class PradaState(DetectorState):
    sets: dict[int, np.ndarray] = field(default_factory=dict)        # c -> (n_c, D) uint8
    set_dists: dict[int, list[float]] = field(default_factory=dict)  # c -> D_Gc
    thresholds: dict[int, float] = field(default_factory=dict)       # c -> T_c
    dists: dict[int, list[float]] = field(default_factory=dict)      # c -> D_c (recent)


@DETECTORS.register("prada")
class Prada(Detector):
    """PRADA (Juuti et al. 2019): Shapiro-Wilk on the minimum L2 distances, per class."""

    name = "prada"
    Params = PradaParams

    def __init__(self, params: PradaParams | None = None) -> None:
        self.p = params or PradaParams()

    @classmethod
    def from_params(cls, params: PradaParams, components: DetectorComponents) -> Prada:
        return cls(params)

    def new_state(self) -> PradaState:
        return PradaState()

    def update(self, state: DetectorState, x: torch.Tensor, logits: torch.Tensor) -> None:
        """The queries one at a time, as Algorithm 1; the distances of a batch are computed
        at once (to the sets before the batch, and among the batch's queries of one class),
        in float64 on 8-bit pixels, so every squared distance is exact."""
        assert isinstance(state, PradaState)
        pixels = quantize(x)  # (B, D) uint8: what an image API receives
        classes = logits.argmax(1).numpy()
        rows = pixels.astype(np.float64)
        to_old = np.full(len(rows), np.inf)   # (B,) min distance to G_c before this batch
        within: dict[int, np.ndarray] = {}    # c -> (b_c, b_c) distances among the batch
        where: dict[int, np.ndarray] = {}     # c -> the batch positions of class c
        for c in np.unique(classes).tolist():
            idx = np.flatnonzero(classes == c)
            where[c], within[c] = idx, l2(rows[idx], rows[idx])
            g = state.sets.get(c)
            if g is not None:
                to_old[idx] = l2(rows[idx], g.astype(np.float64)).min(1)
        added: dict[int, list[int]] = {c: [] for c in where}  # positions within where[c]
        pos = {i: j for c in where for j, i in enumerate(where[c])}
        for i, c in enumerate(classes.tolist()):
            j = pos[i]
            new = added[c]
            d_min = min(to_old[i], within[c][j, new].min() if new else np.inf)
            self._add(state, c, j, float(d_min), new)
            state.seen += 1
            if state.seen % self.p.test_every == 0:
                self._test(state)
        for c, new in added.items():
            if new:
                fresh = pixels[where[c][new]]
                g = state.sets.get(c)
                state.sets[c] = fresh if g is None else np.concatenate([g, fresh])

    def _add(self, s: PradaState, c: int, j: int, d_min: float, new: list[int]) -> None:
        """One query of class c at distance d_min from G_c; `new`: its additions so far."""
        if np.isinf(d_min):  # G_c is empty
            new.append(j)
            s.set_dists[c], s.thresholds[c] = [0.0], 0.0
            return
        dc = s.dists.setdefault(c, [])
        dc.append(d_min)
        if len(dc) > self.p.max_distances:
            del dc[: len(dc) - self.p.max_distances]
        size = len(s.sets[c]) if c in s.sets else 0
        if d_min > s.thresholds[c] and size + len(new) < self.p.max_set:
            new.append(j)
            s.set_dists[c].append(d_min)
            s.thresholds[c] = max(s.thresholds[c], threshold_update(s.set_dists[c]))

    def _test(self, s: PradaState) -> None:
        w = shapiro_w(s.dists, min_class=self.p.min_class_distances,
                      outlier_std=self.p.outlier_std, min_total=self.p.min_distances)
        if w is None:
            return
        s.tests += 1
        s.statistic = w
        if w < self.p.delta:
            s.tests_alarmed += 1
            if s.alarm_at is None:
                s.alarm_at = s.seen

    def describe(self, state: DetectorState) -> str:
        return f"Shapiro-Wilk W = {state.statistic:.4f} < delta = {self.p.delta}"

    def state_arrays(self, state: DetectorState) -> dict[str, np.ndarray]:
        assert isinstance(state, PradaState)
        out: dict[str, np.ndarray] = {}
        for c, g in state.sets.items():
            out[f"set_{c}"] = g
            out[f"setd_{c}"] = np.asarray(state.set_dists[c], np.float64)
            out[f"thr_{c}"] = np.asarray(state.thresholds[c], np.float64)
        for c, d in state.dists.items():
            out[f"dist_{c}"] = np.asarray(d, np.float64)
        return out

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> PradaState:
        s = PradaState()
        for k, v in arrays.items():
            kind, _, c = k.partition("_")
            if kind == "set":
                s.sets[int(c)] = np.asarray(v, np.uint8)
            elif kind == "setd":
                s.set_dists[int(c)] = [float(t) for t in v]
            elif kind == "thr":
                s.thresholds[int(c)] = float(v)
            elif kind == "dist":
                s.dists[int(c)] = [float(t) for t in v]
        return s


def quantize(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] -> (B, C*H*W) uint8 pixels."""
    return (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).flatten(1).numpy()


def l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, D), (m, D) float64 -> (n, m) Euclidean distances (exact for integer pixels)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def threshold_update(set_dists: list[float]) -> float:
    """T_c candidate: mean(D_Gc) - std(D_Gc) (population std, as numpy's default)."""
    a = np.asarray(set_dists, np.float64)
    return float(a.mean() - a.std())


def shapiro_w(dists: Mapping[int, list[float]], *, min_class: int = 10,
              outlier_std: float = 3.0, min_total: int = 100) -> float | None:
    """PRADA's test statistic: W of the pooled per-class distances without outliers, or None
    while too few distances are pooled."""
    pooled = [d for ds in dists.values() if len(ds) >= min_class for d in ds]
    if not pooled:
        return None
    a = np.asarray(pooled, np.float64)
    if a.std() > 0:
        a = a[np.abs(a - a.mean()) < outlier_std * a.std()]
    if len(a) <= min_total:
        return None
    if np.ptp(a) == 0:  # all distances equal: as far from normal as it gets
        return 0.0
    with warnings.catch_warnings():  # scipy warns that p is inaccurate for N > 5000; W is fine
        warnings.simplefilter("ignore")
        return float(stats.shapiro(a).statistic)
