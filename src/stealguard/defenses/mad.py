"""MAD and MAD-argmax: perturb the posterior so the attacker's gradient turns away.

Orekondy, Schiele & Fritz, "Prediction Poisoning: Towards Defenses Against DNN Model
Stealing Attacks", ICLR 2020, sec. 4, eqs. 4-8 and Algorithm 1 (appendix C):

    max_ỹ  H(ỹ) = || G^T ỹ / ||G^T ỹ||_2  -  G^T y / ||G^T y||_2 ||_2^2      (4)
    where  G = ∇_w log F(x; w)   (K x D, a fixed randomly initialised surrogate F)   (5)
    s.t.   ỹ ∈ Δ^K                                                            (6)
           dist(ỹ, y) <= ε                                                    (7)
           argmax_k ỹ_k = argmax_k y_k            (MAD-argmax only)           (8)

Algorithm 1, batched over B queries:
    y* = argmax over the extremes of the feasible set of H   (K one-hot vertices for MAD;
         the vertices 1_S / |S|, S ∋ top class, of Δ^K_k = {y_k >= y_j} for MAD-argmax)
    ỹ  = (1 - α*) y + α* y*,   α* the largest α in [0, 1] with dist(ỹ, y) <= ε
         (closed form ε / ||y* - y||_p for L1/L2, bisection for KL).

H only needs inner products of G's rows, so we use the K x K Gram M = G G^T per sample
(`jacobian.py`): `jacobian=full` (all parameters, the paper's text), `last_layer` (the
last linear weight, the authors' code; closed form, no backward pass), `identity` (the
paper's G = I ablation). `ystar=random` is the y* = rand ablation (a random extreme, from a
keyed hash of the image so repeated queries get the same answer).

The surrogate F (`surrogate_features`). The paper's F is a randomly initialised network of the
victim's architecture (`own`, the default, paper-faithful). With `jacobian=last_layer` its
forward pass costs as much as the victim's, so MAD halves the black box's throughput. Our
option `victim` keeps the same random last layer (W_r, b_r: the paper surrogate's own, seed
for seed) but puts it on the victim's penultimate features h_V(x):

    F(x) = softmax(W_r h_V(x) + b_r) = p,     M = ||h_V||^2 (I - 1 p^T)(I - p 1^T)

The last-layer G depends on x only through h_V(x) and p (and ||h_V||^2 only scales M per
sample, which leaves y* unchanged), so once h_V(x) is known MAD costs one D x K layer.
h_V(x) was already computed by the victim's forward pass that produced y: a `FeatureTap`
(two forward hooks on the victim) keeps it, filed under the input tensor, and MAD reuses it
when it is called on that same tensor, as `LocalBlackBox`, the service and `defense_metrics`
do (they hand the defense the x they gave the model). On any other tensor it runs
`victim.forward_features(x)`: the same answer, one extra pass. The head is never the
victim's own: then p = y and G^T y = (y - p) h^T = 0, and eq. 4 is undefined. An EDM
ensemble has no single feature map (each query goes to one member), so it is refused.
This trades the paper's choice (App. E.1 finds MAD robust to the surrogate's architecture)
for speed; it is our choice, not the paper's.

    mad = MAD(epsilon=0.5, surrogate=build_model("lenet", ...))
    y_tilde = mad(x, probs)      # (B, C, H, W), (B, K) -> (B, K)
    fast = build_defense("mad", {"epsilon": 0.5, "jacobian": "last_layer",
                                 "surrogate_features": "victim"}, victim=victim)
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from stealguard.defenses.base import (
    DEFENSES,
    Budget,
    CheckedDefense,
    Defense,
    DefenseParams,
    validate_params,
)
from stealguard.defenses.distances import kl
from stealguard.defenses.jacobian import full_gram, last_layer_gram
from stealguard.defenses.keyed import keyed_uniform, new_key
from stealguard.errors import ConfigError
from stealguard.models import build_model
from stealguard.victim import has_head

SEED_OFFSET = 0x4D4144  # "MAD": keeps surrogate seed 0 apart from a victim initialised with seed 0
TIE_BREAK = 1e-5  # extra mass on the top class of an argmax vertex (the authors' code)
MAX_EXHAUSTIVE_K = 10  # MAD-argmax searches all 2^(K-1) vertices up to here, else greedily
DEFAULT_SURROGATE_ARCH = "conv3"  # for a victim with no architecture to copy (ONNX)


class MADParams(DefenseParams):
    epsilon: float = Field(ge=0, allow_inf_nan=False, description=(
        "utility budget dist(ỹ, y) <= epsilon, a number >= 0 (L1 saturates at 2, L2 at 1.414)"))
    dist: Literal["l1", "l2", "kl"] = Field("l1", description="utility distance: l1, l2 or kl")
    jacobian: Literal["full", "last_layer", "identity"] = Field("full", description=(
        "G over: full (all surrogate parameters), last_layer, identity (G = I ablation)"))
    ystar: Literal["extreme", "random"] = Field("extreme", description=(
        "y*: extreme (maximise eq. 4) or random (ablation)"))
    objective: Literal["angular", "unnormalized"] = Field("angular", description=(
        "angular (eq. 4) or unnormalized ||G^T(ỹ - y)||^2 (the authors' code default)"))
    surrogate_arch: str | None = Field(None, description=(
        "surrogate architecture name; default the victim's"))
    surrogate_seed: int = Field(0, description="seed of the surrogate's random initialisation")
    surrogate_features: Literal["own", "victim"] = Field("own", description=(
        "the surrogate's features: own (a random network, the paper) or victim (the victim's "
        "penultimate features under the same random last layer; jacobian=last_layer only)"))
    chunk_size: int = Field(32, ge=1, description="queries per Jacobian chunk, >= 1")


# ------------------------------------------------------------------ eq. 5: Gram M = G G^T


def _gram_identity(mad: MAD, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.eye(y.shape[1], dtype=torch.float64).expand(y.shape[0], -1, -1)


def _gram_last_layer(mad: MAD, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sur = mad.surrogate_for(x, y.shape[1])
    with torch.no_grad():
        m, _ = last_layer_gram(sur, x.to(_dtype_of(sur)))  # (B, K, K)
    return m.double()


def _gram_full(mad: MAD, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sur = mad.surrogate_for(x, y.shape[1])
    m, _ = full_gram(sur, x.to(_dtype_of(sur)), chunk_size=mad.chunk_size)  # (B, K, K)
    return m.double()


GRAMS: dict[str, Callable[[MAD, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "identity": _gram_identity, "last_layer": _gram_last_layer, "full": _gram_full,
}


# ------------------------------------------------------------------ eq. 4: objective


Forms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # v^T M v, v^T M y (B, N); y^T M y (B, 1)


def quadratic_forms(m: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> Forms:
    """m (B, K, K), candidates v (B or 1, N, K), y (B, K) -> the three quadratic forms."""
    mv = v @ m  # (B, N, K)
    my = (m @ y[:, :, None])[:, :, 0]  # (B, K)
    return (mv * v).sum(-1), (v * my[:, None, :]).sum(-1), (y * my).sum(-1, keepdim=True)


def angular(forms: Forms) -> torch.Tensor:
    """Eq. 4: ||a/||a|| - u/||u||||^2 = 2 - 2 cos(a, u), a = G^T v, u = G^T y. -> (B, N)."""
    vmv, vmy, ymy = forms
    return 2 - 2 * vmy / (vmv * ymy).clamp_min(1e-300).sqrt()


def unnormalized(forms: Forms) -> torch.Tensor:
    """||G^T v - G^T y||^2 (the `calc_surrogate_objective` of the authors' code). -> (B, N)."""
    vmv, vmy, ymy = forms
    return vmv - 2 * vmy + ymy


def angular_objective(m: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 4 for Gram m (B, K, K), candidates v (B or 1, N, K), posteriors y (B, K). -> (B, N)."""
    return angular(quadratic_forms(m, v, y))


OBJECTIVES: dict[str, Callable[[Forms], torch.Tensor]] = {
    "angular": angular, "unnormalized": unnormalized,
}


# ------------------------------------------------------------------ eq. 7: step size α*


def lp_alpha(y: torch.Tensor, ystar: torch.Tensor, eps: float, p: float) -> torch.Tensor:
    """Largest α <= 1 with ||α (y* - y)||_p <= ε (Algorithm 1, OptStep). -> (B,)."""
    n = (ystar - y).norm(p=p, dim=1)
    return torch.where(n > 0, (eps / n.clamp_min(1e-300)).clamp(max=1.0), torch.ones_like(n))


def kl_alpha(y: torch.Tensor, ystar: torch.Tensor, eps: float, iters: int = 50) -> torch.Tensor:
    """Largest α with KL(y ‖ (1-α) y + α y*) <= ε by bisection (KL grows with α). -> (B,)."""
    lo, hi = torch.zeros_like(y[:, 0]), torch.ones_like(y[:, 0])
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = kl(y, (1 - mid[:, None]) * y + mid[:, None] * ystar) <= eps
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(kl(y, ystar) <= eps, torch.ones_like(lo), lo)


STEPS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "l1": lambda y, s, e: lp_alpha(y, s, e, 1.0),
    "l2": lambda y, s, e: lp_alpha(y, s, e, 2.0),
    "kl": kl_alpha,
}


# ------------------------------------------------------------------ the defense


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def build_surrogate(arch: str, *, in_channels: int, image_size: int, num_classes: int,
                    mean: list[float] | None = None, std: list[float] | None = None,
                    seed: int = 0) -> nn.Module:
    """A fixed, randomly initialised surrogate F (eval mode, no gradients on its weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED_OFFSET + seed)
        model = build_model(arch, in_channels=in_channels, image_size=image_size,
                            num_classes=num_classes, mean=mean, std=std)
    return model.eval().requires_grad_(False)


def surrogate_like(victim: nn.Module, *, arch: str | None, seed: int) -> nn.Module:
    """A surrogate with the victim's input shape, classes and normalisation: a random model
    of `arch`, else of the victim's registered architecture, else a randomly re-initialised
    copy of the victim (a module brought in with `stealguard.wrap`), else (an ONNX model: no
    architecture to copy) DEFAULT_SURROGATE_ARCH, with a warning."""
    arch = arch or getattr(victim, "arch", None)
    if arch is None:
        random_copy = getattr(victim, "random_copy", None)
        if callable(random_copy):
            return random_copy(seed)
        arch = DEFAULT_SURROGATE_ARCH
        warnings.warn(f"mad: the victim ({type(victim).__name__}) has no architecture to "
                      f"copy; its surrogate is a random {arch!r} (choose one with "
                      f"surrogate_arch=<model name>)", UserWarning, stacklevel=3)
    norm = getattr(victim, "normalize", None)
    mean = norm.mean.flatten().tolist() if norm is not None else None
    std = norm.std.flatten().tolist() if norm is not None else None
    c, h, _ = tuple(victim.input_shape)  # type: ignore[arg-type]
    return build_surrogate(arch, in_channels=int(c), image_size=int(h),
                           num_classes=int(victim.num_classes),  # type: ignore[arg-type]
                           mean=mean, std=std, seed=seed)


class FeatureTap:
    """The victim's penultimate features h (B, D) from its latest forward pass, per thread.

    A pre-hook on the victim's classifier sees h; a hook after the victim's forward files h
    under the input x. `features(x)` hands h back only for that very tensor, unchanged since
    (same object, same in-place version counter), else None. Costs two dict writes a pass.
    """

    def __init__(self, victim: nn.Module) -> None:
        self._pending: dict[int, torch.Tensor] = {}  # thread -> h of the pass under way
        self._last: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}
        classifier: nn.Module = victim.classifier  # type: ignore[assignment]
        self._handles = [classifier.register_forward_pre_hook(self._saw_features),
                         victim.register_forward_hook(self._saw_output)]

    def _saw_features(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._pending[threading.get_ident()] = args[0].detach()

    def _saw_output(self, module: nn.Module, args: tuple[object, ...], out: object) -> None:
        h = self._pending.pop(threading.get_ident(), None)
        x = args[0] if args else None
        if h is not None and isinstance(x, torch.Tensor) and h.shape[0] == x.shape[0]:
            self._last[threading.get_ident()] = (weakref.ref(x), x._version, h)

    def features(self, x: torch.Tensor) -> torch.Tensor | None:
        last = self._last.get(threading.get_ident())
        if last is None or last[0]() is not x or last[1] != x._version:
            return None
        return last[2]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class VictimFeatureSurrogate(nn.Module):
    """F(x) = W_r h_V(x) + b_r: the victim's features, a fixed random last layer (eval mode).

    (W_r, b_r) is the last layer of `surrogate_like(victim, seed=seed)`, the paper surrogate
    of `surrogate_features=own` with the same seed. h_V(x) comes from the tap when the victim
    has just run on x, else from `victim.forward_features(x)`.
    """

    def __init__(self, victim: nn.Module, *, seed: int = 0) -> None:
        super().__init__()
        kind = type(victim).__name__
        if not has_head(victim):
            why = getattr(victim, "no_head_reason", "an EDM ensemble answers each query with "
                          "one member, so there is no single feature map")
            raise ConfigError(
                "MAD surrogate_features='victim' needs a victim with forward_features(x) and a "
                f"linear classifier; {kind} has none ({why}): use surrogate_features=own")
        linear: nn.Linear = victim.classifier  # type: ignore[assignment]
        if getattr(victim, "arch", None) is not None:
            head = surrogate_like(victim, arch=None, seed=seed).classifier
            assert isinstance(head, nn.Linear)
        else:  # no architecture to copy: PyTorch's default init of a layer of that shape
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED_OFFSET + seed)
                head = nn.Linear(linear.in_features, linear.out_features)
        self.classifier = head.to(_dtype_of(victim)).eval().requires_grad_(False)
        self._victim = [victim]  # a list: not a submodule, so .to()/freezing leave it alone
        self.tap = FeatureTap(victim)
        weakref.finalize(self, self.tap.remove)  # the hooks go when this surrogate goes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tap.features(x)  # (B, D) from the victim's own pass, or None
        if h is None:
            with torch.no_grad():
                h = self._victim[0].forward_features(x)  # type: ignore[operator]
        return h.to(self.classifier.weight.device, self.classifier.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, K)


def _check_victim_features(name: str, p: MADParams, victim: nn.Module | None,
                           surrogate: nn.Module | None) -> nn.Module:
    """The victim, after refusing what surrogate_features='victim' cannot be combined with."""
    what = f"defense {name!r}: surrogate_features='victim'"
    if p.jacobian != "last_layer":
        raise ConfigError(f"{what} needs jacobian='last_layer', got jacobian={p.jacobian!r}")
    if p.surrogate_arch is not None or surrogate is not None:
        raise ConfigError(f"{what} builds its surrogate on the victim's features: drop "
                          "surrogate_arch= and surrogate=")
    if victim is None:
        raise ConfigError(f"{what} needs the victim: build_defense(..., victim=model)")
    return victim


@DEFENSES.register("mad")
class MAD(CheckedDefense):
    """MAD (eqs. 4-7). Pass `surrogate` (a model with `forward_features` and `classifier`;
    it is put in eval mode with frozen weights), or `surrogate_arch` (built lazily from the
    first batch's shape), or build it through `build_defense(..., victim=...)`, which makes
    a fresh random model of the victim's architecture, input shape and classes. With
    `surrogate_features="victim"` pass `victim=`: the surrogate is a `VictimFeatureSurrogate`."""

    Params = MADParams
    preserves_argmax: ClassVar[bool] = False
    name: ClassVar[str] = "mad"

    def __init__(self, *, epsilon: float, dist: str = "l1", jacobian: str = "full",
                 ystar: str = "extreme", objective: str = "angular",
                 surrogate: nn.Module | None = None, surrogate_arch: str | None = None,
                 surrogate_seed: int = 0, surrogate_features: str = "own", chunk_size: int = 32,
                 key: bytes | None = None, victim: nn.Module | None = None) -> None:
        p = validate_params(self.name, MADParams, {
            "epsilon": epsilon, "dist": dist, "jacobian": jacobian, "ystar": ystar,
            "objective": objective, "surrogate_arch": surrogate_arch,
            "surrogate_seed": surrogate_seed, "surrogate_features": surrogate_features,
            "chunk_size": chunk_size})
        if p.surrogate_features == "victim":
            victim = _check_victim_features(self.name, p, victim, surrogate)
            surrogate = VictimFeatureSurrogate(victim, seed=p.surrogate_seed)
        self.surrogate_features = p.surrogate_features
        self.epsilon, self.dist, self.jacobian = p.epsilon, p.dist, p.jacobian
        self.ystar, self.objective, self.chunk_size = p.ystar, p.objective, p.chunk_size
        self.surrogate_arch, self.surrogate_seed = p.surrogate_arch, p.surrogate_seed
        if p.jacobian == "last_layer" and surrogate is not None and not has_head(surrogate):
            raise ConfigError(
                f"defense {self.name!r}: jacobian='last_layer' needs a surrogate with "
                f"forward_features(x) and a linear classifier; {type(surrogate).__name__} has "
                "none (for a wrapped module: name its final nn.Linear with "
                "wrap(..., last_layer=...)); or use jacobian='full'")
        self.surrogate = surrogate.eval().requires_grad_(False) if surrogate is not None else None
        self.budget = Budget(p.dist, p.epsilon)
        self._key = key if key is not None else new_key()

    @classmethod
    def from_params(cls, params: MADParams, *, victim: nn.Module | None = None,  # type: ignore[override]
                    key: bytes | None = None, surrogate: nn.Module | None = None,
                    **components: Any) -> Defense:
        needs_surrogate = params.ystar == "extreme" and params.jacobian != "identity"
        own = params.surrogate_features == "own"
        if surrogate is None and victim is not None and needs_surrogate and own:
            surrogate = surrogate_like(victim, arch=params.surrogate_arch,
                                       seed=params.surrogate_seed)
        return cls(**dict(params), surrogate=surrogate, key=key, victim=victim)

    def __repr__(self) -> str:  # never the key
        return (f"{type(self).__name__}(epsilon={self.epsilon}, dist={self.dist!r}, "
                f"jacobian={self.jacobian!r}, ystar={self.ystar!r}, objective={self.objective!r}, "
                f"surrogate_features={self.surrogate_features!r})")

    def surrogate_for(self, x: torch.Tensor, num_classes: int) -> nn.Module:
        """The surrogate on x's device; built on first use from surrogate_arch if needed."""
        if self.surrogate is None:
            if self.surrogate_arch is None:
                raise ConfigError(f"{self.name} jacobian={self.jacobian} needs a surrogate: pass "
                                  "victim= to build_defense, surrogate=, or surrogate_arch=")
            self.surrogate = build_surrogate(
                self.surrogate_arch, in_channels=x.shape[1], image_size=x.shape[-1],
                num_classes=num_classes, seed=self.surrogate_seed)
        if next(self.surrogate.parameters()).device != x.device:
            self.surrogate.to(x.device)
        return self.surrogate

    # -- the extremes of the feasible set, and the two oracles (Algorithm 1, line 4)

    def best_vertex(self, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """argmax of H over the K one-hot extremes of Δ^K. (B, K)."""
        eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)  # (K, K)
        scores = OBJECTIVES[self.objective](quadratic_forms(m, eye[None], y))  # (B, K)
        return eye[scores.argmax(1)]

    def random_vertex(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A uniformly random one-hot extreme, u (B, K) keyed uniforms."""
        k = (u[:, 0] * y.shape[1]).long().clamp_max(y.shape[1] - 1)  # (B,)
        return nn.functional.one_hot(k, y.shape[1]).to(y.dtype)

    def ystar_for(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.ystar == "random":
            return self.random_vertex(keyed_uniform(x, self._key, y.shape[1]), y)
        m = GRAMS[self.jacobian](self, x, y).to(y.device)  # (B, K, K) float64
        return self.best_vertex(m, y)

    def perturb(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self.epsilon == 0:
            return probs
        y = probs.double()  # (B, K): the solver runs in float64
        ystar = self.ystar_for(x, y)  # (B, K)
        alpha = STEPS[self.dist](y, ystar, self.epsilon)[:, None]  # (B, 1)
        return self.finish(probs, ((1 - alpha) * y + alpha * ystar).to(probs.dtype))

    def finish(self, y: torch.Tensor, y_tilde: torch.Tensor) -> torch.Tensor:
        """Last look at the answer ỹ (B, K) for y (B, K): MAD returns it as it is."""
        return y_tilde


# ------------------------------------------------------------------ MAD-argmax (eq. 8)


def _subset_masks(k: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """All 2^K subsets of K classes as 0/1 rows. (2^K, K)."""
    rows = list(itertools.product((0.0, 1.0), repeat=k))
    return torch.tensor(rows, dtype=dtype, device=device)


def subset_forms(m: torch.Tensor, y: torch.Tensor, top: torch.Tensor, masks: torch.Tensor
                 ) -> Forms:
    """Quadratic forms of every vertex v = s / |s|, s = 1_S + η e_c, S ranging over `masks`
    (N, K) (rows without c give no vertex: the caller discards them), with GEMMs instead of
    (B, N, K) temporaries:
        s^T M s = 1_S^T M 1_S + 2 η (M 1_S)_c + η² M_cc,   s^T M y = 1_S^T M y + η (M y)_c.
    """
    b, k = y.shape
    eta, rows = TIE_BREAK, torch.arange(b, device=y.device)
    outer = (masks[:, :, None] * masks[:, None, :]).reshape(-1, k * k)  # (N, K*K)
    sms = m.reshape(b, k * k) @ outer.T  # (B, N)  1_S^T M 1_S
    m_c = m[rows, top]  # (B, K)  row c of M
    my = (m @ y[:, :, None])[:, :, 0]  # (B, K)
    sms = sms + 2 * eta * (m_c @ masks.T) + eta**2 * m_c[rows, top][:, None]
    smy = my @ masks.T + eta * my[rows, top][:, None]  # (B, N)
    size = masks.sum(1) + eta  # (N,) |s|
    return sms / size**2, smy / size, (y * my).sum(1, keepdim=True)


def argmax_vertices(masks: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Vertices (1_S + η e_c) / (|S| + η) of Δ^K_c for masks (B, N, K) and top classes c (B,).

    The tie-break η (1e-5, as in the authors' code) keeps class c strictly on top at α = 1.
    """
    onehot = nn.functional.one_hot(top, masks.shape[-1]).to(masks.dtype)[:, None, :]
    s = torch.maximum(masks, onehot) + TIE_BREAK * onehot  # (B, N, K)
    return s / s.sum(-1, keepdim=True)


@DEFENSES.register("mad_argmax")
class MADArgmax(MAD):
    """MAD-argmax (eqs. 4-8): only the vertices of Δ^K_k = {ỹ ∈ Δ^K, ỹ_k >= ỹ_j}, k the top
    class, are searched, so the returned top class is the model's. Exhaustive over the
    2^(K-1) vertices for K <= 10; beyond, the authors' greedy search (grow S one class at a
    time, keeping the best vertex seen)."""

    preserves_argmax = True
    name = "mad_argmax"

    def best_vertex(self, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        top = y.argmax(1)  # (B,)
        objective = OBJECTIVES[self.objective]
        if y.shape[1] <= MAX_EXHAUSTIVE_K:
            masks = _subset_masks(y.shape[1], dtype=y.dtype, device=y.device)  # (N, K)
            scores = objective(subset_forms(m, y, top, masks))  # (B, N)
            scores = scores.masked_fill(masks.T[top] == 0, -torch.inf)  # S must contain c
            return argmax_vertices(masks[scores.argmax(1)][:, None], top)[:, 0]
        return self._greedy_vertex(m, y, top)

    def _greedy_vertex(self, m: torch.Tensor, y: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        b, k = y.shape
        chosen = nn.functional.one_hot(top, k).to(y.dtype)  # (B, K) current set S
        best = argmax_vertices(chosen[:, None], top)[:, 0]  # (B, K) the vertex e_c
        best_score = OBJECTIVES[self.objective](quadratic_forms(m, best[:, None], y))[:, 0]
        eye = torch.eye(k, dtype=y.dtype, device=y.device)
        for _ in range(k - 1):
            grown = torch.maximum(chosen[:, None, :], eye[None])  # (B, K, K): S ∪ {j}
            verts = argmax_vertices(grown, top)
            scores = OBJECTIVES[self.objective](quadratic_forms(m, verts, y))
            scores = scores.masked_fill(chosen > 0, -torch.inf)  # (B, K)
            j = scores.argmax(1)  # (B,)
            step_best = scores.gather(1, j[:, None])[:, 0]
            better = step_best > best_score
            best = torch.where(better[:, None], verts[torch.arange(b), j], best)
            best_score = torch.maximum(best_score, step_best)
            chosen = grown[torch.arange(b), j]
        return best

    def random_vertex(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A uniformly random vertex of Δ^K_c: each other class joins S with probability 1/2."""
        return argmax_vertices((u < 0.5).to(y.dtype)[:, None], y.argmax(1))[:, 0]

    def finish(self, y: torch.Tensor, y_tilde: torch.Tensor) -> torch.Tensor:
        """Guard against a rounding tie moving the top class: such rows answer y itself."""
        moved = y_tilde.argmax(1) != y.argmax(1)
        return torch.where(moved[:, None], y, y_tilde)
