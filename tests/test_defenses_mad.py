"""MAD against a brute-force reference: K separate backward passes per sample, G built row by
row, the MAD objective evaluated on explicit vectors G^T y for every extreme (float64)."""

from __future__ import annotations

import copy
import gc
import itertools
from collections.abc import Sequence

import pytest
import torch
from scipy.optimize import brentq
from torch import nn

from stealguard.blackbox import LocalBlackBox
from stealguard.defenses import MAD, MADArgmax, build_defense
from stealguard.defenses.jacobian import (
    full_gram,
    last_layer_gram,
    logit_gram_functorch,
    logit_gram_layerwise,
    supports_layerwise,
)
from stealguard.defenses.mad import (
    MAX_EXHAUSTIVE_K,
    OBJECTIVES,
    TIE_BREAK,
    angular_objective,
    kl_alpha,
    quadratic_forms,
    subset_forms,
    surrogate_like,
)
from stealguard.ensemble import EDMPredictor
from stealguard.ensemble.hashing import SHA1Hash
from stealguard.errors import ConfigError
from stealguard.models import Classifier, build_model
from synthetic import quadrant_images

K = 4


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval-mode BN statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.load_state_dict({
                "running_mean": torch.rand(c, generator=g) - 0.5,
                "running_var": torch.rand(c, generator=g) + 0.5,
                "weight": torch.rand(c, generator=g) + 0.5,
                "bias": torch.rand(c, generator=g) - 0.5,
                "num_batches_tracked": torch.tensor(0)})
    return model


def surrogate(arch: str, size: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, in_channels=1, image_size=size, num_classes=K)
    return randomise_batchnorm(model.double().eval(), seed)


def inputs(n: int, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images, _ = quadrant_images(n, seed=seed, size=size)
    x = images.double() / 255
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.softmax(3 * torch.randn(n, K, generator=g, dtype=torch.float64), dim=1)
    return x, y


def last_weight(model: nn.Module) -> torch.Tensor:
    linear = model.classifier
    assert isinstance(linear, nn.Linear)
    return linear.weight


def explicit_jacobian(model: nn.Module, x1: torch.Tensor, params: Sequence[torch.Tensor]
                      ) -> torch.Tensor:
    """G (K, D) of one sample: one backward pass per class."""
    logp = torch.log_softmax(model(x1[None]), dim=1)[0]
    rows = [torch.autograd.grad(logp[k], params, retain_graph=True) for k in range(K)]
    return torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])


def reference_mad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                  dist: str = "l1", argmax: bool = False, last_layer: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 one query at a time. Returns (ỹ, y*) (B, K)."""
    model = copy.deepcopy(model).requires_grad_(True)
    params = [last_weight(model)] if last_layer else list(model.parameters())
    outs, stars = [], []
    for xi, yi in zip(x, y):
        G = explicit_jacobian(model, xi, params)  # (K, D)
        u = G.T @ yi
        u = u / u.norm()
        candidates = argmax_candidates(int(yi.argmax())) if argmax else list(torch.eye(K).double())
        scores = [((G.T @ v) / (G.T @ v).norm() - u).norm() ** 2 for v in candidates]
        ystar = candidates[int(torch.stack(scores).argmax())]
        alpha = reference_alpha(yi, ystar, eps, dist)
        outs.append((1 - alpha) * yi + alpha * ystar)
        stars.append(ystar)
    return torch.stack(outs), torch.stack(stars)


def argmax_candidates(c: int) -> list[torch.Tensor]:
    """Every vertex 1_S / |S| (S ∋ c) of {y_c >= y_j}, with the tie-break mass on c."""
    out = []
    for bits in itertools.product((0.0, 1.0), repeat=K - 1):
        s = torch.tensor(list(bits[:c]) + [1.0 + TIE_BREAK] + list(bits[c:]), dtype=torch.float64)
        out.append(s / s.sum())
    return out


def reference_alpha(y: torch.Tensor, ystar: torch.Tensor, eps: float, dist: str) -> float:
    if dist in ("l1", "l2"):
        n = float((ystar - y).norm(p=1 if dist == "l1" else 2))
        return min(1.0, eps / n) if n > 0 else 1.0

    def kl_minus_eps(a: float) -> float:
        h = (1 - a) * y + a * ystar
        return float((y * (y / h).log()).nansum()) - eps

    return 1.0 if kl_minus_eps(1.0 - 1e-15) <= 0 else brentq(kl_minus_eps, 0.0, 1.0 - 1e-15,
                                                             xtol=1e-14)


# ------------------------------------------------------------------ Gram matrices


@pytest.mark.parametrize("arch, size", [("lenet", 12), ("resnet20", 8)])
def test_full_gram_equals_explicit_jacobians(arch, size) -> None:
    model = surrogate(arch, size)
    x, _ = inputs(2, size)
    m, p = full_gram(model, x, chunk_size=1)
    grad_model = copy.deepcopy(model).requires_grad_(True)
    params = list(grad_model.parameters())
    for i in range(2):
        G = explicit_jacobian(grad_model, x[i], params)
        ref = G @ G.T
        assert torch.allclose(m[i], ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    with torch.no_grad():
        assert torch.allclose(p, torch.softmax(model(x), 1))


class OddNet(nn.Module):
    """Strided, dilated, grouped convs, a Linear over a sequence axis, GroupNorm."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2)
        self.norm = nn.GroupNorm(2, 4) if norm else nn.Identity()
        self.seq = nn.Linear(4, 5)  # applied to (B, positions, 4)
        self.classifier = nn.Linear(5, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))  # (B, 4, h, w)
        h = self.seq(h.flatten(2).transpose(1, 2)).relu()  # (B, T, 5)
        return self.classifier(h.mean(1))


@pytest.mark.parametrize("norm", [False, True])
def test_layerwise_and_functorch_grams_agree_on_odd_layers(norm) -> None:
    torch.manual_seed(0)
    model = OddNet(norm).double().eval()
    assert supports_layerwise(model) is (not norm)  # GroupNorm goes through torch.func
    x = torch.rand(3, 2, 9, 9, dtype=torch.float64)
    ref, _ = logit_gram_functorch(model, x)
    got, _ = logit_gram_layerwise(model, x) if not norm else full_gram(model, x)
    if norm:  # full_gram returns the log-likelihood Gram: compare that instead
        p = torch.softmax(model(x), 1)
        P = torch.eye(K, dtype=torch.float64) - p[:, None, :].expand(-1, K, -1)  # rows e_k - p
        ref = P @ ref @ P.transpose(1, 2)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_last_layer_closed_form_equals_explicit_gradients() -> None:
    model = surrogate("conv3")
    x, _ = inputs(4)
    with torch.no_grad():
        m, _ = last_layer_gram(model, x)
    grad_model = copy.deepcopy(model).requires_grad_(True)
    for i in range(4):
        G = explicit_jacobian(grad_model, x[i], [last_weight(grad_model)])
        assert torch.allclose(m[i], G @ G.T, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ MAD == reference


@pytest.mark.parametrize("arch, size, n, dist, eps", [
    ("lenet", 12, 12, "l1", 0.6), ("lenet", 12, 12, "l2", 0.4), ("lenet", 12, 12, "kl", 0.3),
])
def test_mad_full_equals_brute_force_reference(arch, size, n, dist, eps) -> None:
    model = surrogate(arch, size)
    x, y = inputs(n, size)
    ref, ref_star = reference_mad(model, x, y, eps=eps, dist=dist)
    got = MAD(epsilon=eps, dist=dist, jacobian="full", surrogate=model, chunk_size=5)(x, y)
    assert (got - ref).abs().max() < 1e-5
    assert len(set(ref_star.argmax(1).tolist())) > 1  # the extremes chosen differ: not trivial
    moved = (got - y).abs().sum(1)
    assert (moved > 1e-3).all()


def test_mad_last_layer_and_argmax_equal_their_references() -> None:
    model = surrogate("lenet", 12)
    x, y = inputs(12, 12, seed=5)
    ref, _ = reference_mad(model, x, y, eps=0.5, last_layer=True)
    got = MAD(epsilon=0.5, jacobian="last_layer", surrogate=model)(x, y)
    assert (got - ref).abs().max() < 1e-5
    ref_am, stars = reference_mad(model, x, y, eps=1.5, argmax=True)
    got_am = MADArgmax(epsilon=1.5, surrogate=model)(x, y)
    assert (got_am - ref_am).abs().max() < 1e-5
    assert ((stars > 0).sum(1) > 1).any()  # some chosen vertices spread mass over several classes
    assert torch.equal(got_am.argmax(1), y.argmax(1))


def test_full_and_last_layer_make_different_choices() -> None:
    model = surrogate("conv3")
    x, y = inputs(40, seed=7)
    full = MAD(epsilon=2.0, surrogate=model)(x, y)  # epsilon 2: ỹ = y*
    last = MAD(epsilon=2.0, jacobian="last_layer", surrogate=model)(x, y)
    assert (full.argmax(1) != last.argmax(1)).any()


# ------------------------------------------------------------------ properties


def test_identity_ablation_picks_the_least_likely_class() -> None:
    x, y = inputs(30)
    out = MAD(epsilon=2.0, jacobian="identity")(x, y)
    assert torch.equal(out.argmax(1), y.argmin(1))


def test_random_extreme_is_keyed_uniform_and_repeatable() -> None:
    images, _ = quadrant_images(400, seed=9)
    x = images.double() / 255
    y = torch.full((400, K), 1 / K, dtype=torch.float64)
    mad = MAD(epsilon=2.0, ystar="random", key=b"a" * 32)
    picks = mad(x, y).argmax(1)
    counts = torch.bincount(picks, minlength=K)
    assert (counts > 60).all(), counts  # about 100 each
    assert torch.equal(mad(x, y).argmax(1), picks)
    assert not torch.equal(MAD(epsilon=2.0, ystar="random", key=b"b" * 32)(x, y).argmax(1), picks)


def test_mad_argmax_never_changes_the_top_class() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.softmax(4 * torch.randn(200, K, generator=g), dim=1)
    y[:50] = torch.softmax(torch.randint(0, 2, (50, K), generator=g).float() * 5, 1)  # ties
    x = torch.rand(200, 1, 12, 12, generator=g)
    torch.manual_seed(0)
    sur = build_model("lenet", in_channels=1, image_size=12, num_classes=K)
    cases = [(2.0, "full")]
    for eps, jac in itertools.product((0.1, 1.0, 2.0), ("last_layer", "identity")):
        cases.append((eps, jac))
    for eps, jac in cases:
        out = MADArgmax(epsilon=eps, jacobian=jac, surrogate=sur)(x, y)
        assert torch.equal(out.argmax(1), y.argmax(1)), (eps, jac)
        assert ((out - y).abs().sum(1) <= eps + 1e-5).all()


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_argmax_vertex_scores_equal_explicit_vertices(objective) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, K, 7, generator=g, dtype=torch.float64)
    m = a @ a.transpose(1, 2)  # (6, K, K) Gram matrices
    y = torch.softmax(torch.randn(6, K, generator=g, dtype=torch.float64), 1)
    top = y.argmax(1)
    masks = torch.tensor(list(itertools.product((0.0, 1.0), repeat=K)), dtype=torch.float64)
    got = OBJECTIVES[objective](subset_forms(m, y, top, masks))  # (6, 2^K)
    for i in range(6):
        c = int(top[i])
        for n, mask in enumerate(masks):
            if mask[c] == 0:
                continue
            s = mask.clone()
            s[c] += TIE_BREAK
            ref = OBJECTIVES[objective](quadratic_forms(m[i:i + 1], (s / s.sum())[None, None],
                                                        y[i:i + 1]))
            assert torch.allclose(got[i, n], ref[0, 0], rtol=1e-10, atol=1e-12)


def test_greedy_argmax_search_for_many_classes() -> None:
    k = MAX_EXHAUSTIVE_K + 2
    g = torch.Generator().manual_seed(0)
    y = torch.softmax(3 * torch.randn(64, k, generator=g, dtype=torch.float64), dim=1)
    mad = MADArgmax(epsilon=2.0, jacobian="identity")
    out = mad(torch.rand(64, 1, 8, 8, dtype=torch.float64), y)  # epsilon 2: ỹ = y*
    assert torch.equal(out.argmax(1), y.argmax(1))
    m = torch.eye(k, dtype=torch.float64).expand(64, k, k)
    onehot = torch.eye(k, dtype=torch.float64)[y.argmax(1)]
    # the greedy vertex is at least as good as the one-hot top class, and is a vertex
    assert (angular_objective(m, out[:, None], y) >= angular_objective(m, onehot[:, None], y)
            - 1e-12).all()
    support = (out > 1e-3).sum(1).double()
    assert torch.allclose(out.max(1).values * support, torch.ones(64, dtype=torch.float64),
                          atol=1e-4)


def test_kl_step_spends_the_budget_exactly() -> None:
    _, y = inputs(20)
    ystar = torch.eye(K, dtype=torch.float64)[y.argmin(1)]
    alpha = kl_alpha(y, ystar, 0.05)
    h = (1 - alpha[:, None]) * y + alpha[:, None] * ystar
    kl = (y * (y / h).log()).sum(1)
    assert torch.allclose(kl, torch.full_like(kl, 0.05), atol=1e-10)
    assert (alpha < 1).all()


def test_zero_budget_and_surrogate_built_lazily() -> None:
    x, y = inputs(6)
    assert torch.equal(MAD(epsilon=0.0, surrogate_arch="conv3")(x, y), y)
    mad = MAD(epsilon=0.5, surrogate_arch="conv3")
    out = mad(x.float(), y.float())
    assert mad.surrogate is not None and mad.surrogate.input_shape == (1, 8, 8)
    assert ((out - y.float()).abs().sum(1) <= 0.5 + 1e-5).all()


# ------------------------------------------------------------------ surrogate_features=victim


class ExplicitFeatureSurrogate(nn.Module):
    """The reference: the victim's features (recomputed, differentiable) under a given head."""

    def __init__(self, victim: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.victim = victim
        self.classifier = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.victim.forward_features(x))  # type: ignore[operator]


def victim_features_mad(victim: nn.Module, cls: type[MAD] = MAD, **params) -> MAD:
    return cls(jacobian="last_layer", surrogate_features="victim", victim=victim, **params)


def spy_forward_features(victim: Classifier, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of victim.forward_features (rows per call)."""
    calls: list[int] = []
    inner = victim.forward_features

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return inner(x)

    monkeypatch.setattr(victim, "forward_features", counting)
    return calls


@pytest.mark.parametrize("dist, eps", [("l1", 0.6), ("l2", 0.4), ("kl", 0.3)])
def test_victim_features_mad_equals_explicit_reference(dist, eps) -> None:
    victim = surrogate("lenet", 12, seed=3)
    x, y = inputs(12, 12, seed=5)
    head = surrogate_like(victim, arch=None, seed=2).classifier  # the paper's head
    assert isinstance(head, nn.Linear)
    assert not torch.equal(head.weight, last_weight(victim))  # never the victim's own head
    reference = ExplicitFeatureSurrogate(victim, head.double())
    ref, stars = reference_mad(reference, x, y, eps=eps, dist=dist, last_layer=True)
    got = victim_features_mad(victim, epsilon=eps, dist=dist, surrogate_seed=2)(x, y)
    assert (got - ref).abs().max() < 1e-5
    assert len(set(stars.argmax(1).tolist())) > 1  # not one class for every query
    assert ((got - y).abs().sum(1) > 1e-3).all()
    ref_am, _ = reference_mad(reference, x, y, eps=1.5, argmax=True, last_layer=True)
    got_am = victim_features_mad(victim, MADArgmax, epsilon=1.5, surrogate_seed=2)(x, y)
    assert (got_am - ref_am).abs().max() < 1e-5
    assert torch.equal(got_am.argmax(1), y.argmax(1))


def test_victim_features_head_is_the_paper_surrogates_last_layer() -> None:
    torch.manual_seed(0)
    victim = build_model("conv3", in_channels=1, image_size=8, num_classes=K).eval()
    paper = build_defense("mad", {"epsilon": 1.0, "jacobian": "last_layer"}, victim=victim)
    ours = build_defense("mad", {"epsilon": 1.0, "jacobian": "last_layer",
                                 "surrogate_features": "victim"}, victim=victim)
    assert isinstance(paper, MAD) and isinstance(ours, MAD)
    assert paper.surrogate is not None and ours.surrogate is not None
    assert torch.equal(last_weight(ours.surrogate), last_weight(paper.surrogate))
    assert not any(p.requires_grad for p in ours.surrogate.parameters())
    assert all(p.requires_grad for p in victim.parameters())  # the victim is left alone


def test_victim_features_answers_are_valid_and_deterministic() -> None:
    torch.manual_seed(0)
    victim = build_model("conv3", in_channels=1, image_size=8, num_classes=K).eval()
    images, _ = quadrant_images(64, seed=4)
    x = images.float() / 255
    with torch.no_grad():
        y = torch.softmax(3 * victim(x), 1)
    for cls, dist, eps in ((MAD, "l1", 0.8), (MAD, "l2", 0.5), (MAD, "kl", 0.2),
                           (MADArgmax, "l1", 2.0)):
        mad = victim_features_mad(victim, cls, epsilon=eps, dist=dist)
        out = mad(x, y)
        assert out.dtype == y.dtype and torch.isfinite(out).all() and (out >= 0).all()
        assert torch.allclose(out.sum(1), torch.ones(64), atol=1e-5)
        d = {"l1": (out - y).abs().sum(1), "l2": (out - y).norm(dim=1),
             "kl": (y * (y / out).log()).sum(1)}[dist]
        assert (d <= eps + 1e-5).all(), d.max()
        assert torch.equal(mad(x, y), out)
        assert torch.equal(victim_features_mad(victim, cls, epsilon=eps, dist=dist)(x, y), out)
        assert torch.allclose(mad(x[3:4], y[3:4]), out[3:4], atol=1e-6)
        if cls is MADArgmax:
            assert torch.equal(out.argmax(1), y.argmax(1))
    other = victim_features_mad(victim, epsilon=2.0, surrogate_seed=1)(x, y)
    assert not torch.equal(other, victim_features_mad(victim, epsilon=2.0)(x, y))


def test_victim_features_reuse_the_victims_pass(monkeypatch) -> None:
    torch.manual_seed(0)
    victim = build_model("lenet", in_channels=1, image_size=12, num_classes=K).eval()
    mad = victim_features_mad(victim, epsilon=1.0)
    x = torch.rand(16, 1, 12, 12)
    calls = spy_forward_features(victim, monkeypatch)
    with torch.no_grad():
        y = torch.softmax(victim(x), 1)
    hit = mad(x, y)  # x went through the victim just now: its features are reused
    assert calls == []
    miss = mad(x.clone(), y)  # another tensor: one pass of the feature extractor
    assert calls == [16]
    assert torch.allclose(hit, miss, atol=1e-6)
    x.mul_(0.5)  # changed in place since the victim saw it: not reused
    mad(x, y)
    assert calls == [16, 16]
    bb = LocalBlackBox(victim, defense=mad, batch_size=8)
    assert torch.allclose(bb.query(x), mad(x.clone(), torch.softmax(victim(x), 1)), atol=1e-6)
    assert calls == [16, 16, 16]  # the black box's two batches of 8 reused their features


def test_victim_features_hooks_go_with_the_defense() -> None:
    torch.manual_seed(0)
    victim = build_model("conv3", in_channels=1, image_size=8, num_classes=K).eval()
    hooks = len(victim._forward_hooks), len(victim.classifier._forward_pre_hooks)
    mad = victim_features_mad(victim, epsilon=1.0)
    assert len(victim._forward_hooks) == hooks[0] + 1
    copy.deepcopy(victim)  # a hooked victim can still be copied
    del mad
    gc.collect()
    assert (len(victim._forward_hooks), len(victim.classifier._forward_pre_hooks)) == hooks


def test_victim_features_bad_combinations_are_refused() -> None:
    torch.manual_seed(0)
    victim = build_model("conv3", in_channels=1, image_size=8, num_classes=K).eval()
    base: dict[str, str | float | int] = {"epsilon": 1.0, "jacobian": "last_layer"}
    with pytest.raises(ConfigError, match=r"surrogate_features='random' is invalid.* own .*victim"):
        build_defense("mad", {**base, "surrogate_features": "random"}, victim=victim)
    for jacobian in ("full", "identity"):
        with pytest.raises(ConfigError, match=r"'mad': surrogate_features='victim' needs "
                                              f"jacobian='last_layer', got jacobian='{jacobian}'"):
            build_defense("mad", {**base, "jacobian": jacobian, "surrogate_features": "victim"},
                          victim=victim)
    with pytest.raises(ConfigError, match=r"'mad_argmax': surrogate_features='victim' .* drop "
                                          "surrogate_arch"):
        build_defense("mad_argmax", {**base, "surrogate_features": "victim",
                                     "surrogate_arch": "lenet"}, victim=victim)
    with pytest.raises(ConfigError, match="surrogate_features='victim' needs the victim"):
        build_defense("mad", {**base, "surrogate_features": "victim"})
    members = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        members.append(build_model("conv3", in_channels=1, image_size=8, num_classes=K))
    edm = EDMPredictor(members, hash_fn=SHA1Hash())
    with pytest.raises(ConfigError, match="forward_features.*EDMPredictor has none"):
        build_defense("mad", {**base, "surrogate_features": "victim"}, victim=edm)
