"""Contract tests over every registered defense, and the typed-parameter / bad-input paths."""

from __future__ import annotations

import math

import pytest
import torch

from stealguard.blackbox import LocalBlackBox
from stealguard.defenses import (
    DEFENSES,
    DISTANCES,
    MAD,
    Compose,
    NoDefense,
    TopK,
    build_defense,
    parse_defense_params,
)
from stealguard.defenses.random_noise import RandomNoise, project_l1_ball
from stealguard.errors import ConfigError, InputError, UnknownNameError
from stealguard.models import build_model
from synthetic import quadrant_images

K = 4

# Every registered defense, with the configurations the contract runs it in.
CONFIGS: dict[str, list[dict[str, str | float | int | bool]]] = {
    "none": [{}],
    "topk": [{"k": 1}, {"k": 2}, {"k": K}],
    "rounding": [{"decimals": 0}, {"decimals": 2}],
    "reverse_sigmoid": [{"beta": 0.5, "gamma": 0.2}, {"beta": 3.0, "gamma": 5.0}],
    "random_noise": [{"epsilon": 1.0, "dist": "l1"}, {"epsilon": 2.0, "dist": "l2"}],
    "mad": [
        {"epsilon": 0.5}, {"epsilon": 1.0, "dist": "l2", "jacobian": "last_layer"},
        {"epsilon": 0.1, "dist": "kl"}, {"epsilon": 2.0, "jacobian": "identity"},
        {"epsilon": 1.0, "ystar": "random"}, {"epsilon": 0.7, "objective": "unnormalized"},
        {"epsilon": 1.0, "jacobian": "last_layer", "surrogate_features": "victim"},
    ],
    "mad_argmax": [
        {"epsilon": 2.0}, {"epsilon": 0.5, "jacobian": "last_layer", "dist": "l2"},
        {"epsilon": 1.0, "ystar": "random"}, {"epsilon": 0.2, "dist": "kl"},
        {"epsilon": 0.5, "jacobian": "last_layer", "surrogate_features": "victim"},
    ],
    "adaptive_misinformation": [{"tau": 0.9}, {"tau": 0.3, "nu": 10.0}],
}
CASES = [(name, params) for name, configs in CONFIGS.items() for params in configs]
KEY = b"k" * 32


@pytest.fixture(scope="module")
def victim() -> torch.nn.Module:
    torch.manual_seed(7)
    return build_model("conv3", in_channels=1, image_size=8, num_classes=K).eval()


@pytest.fixture(scope="module")
def misinfo() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("conv3", in_channels=1, image_size=8, num_classes=K).eval()


@pytest.fixture(scope="module")
def batch(victim: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and probabilities, with the awkward rows appended: one-hot, uniform, ties."""
    images, _ = quadrant_images(20, seed=3)
    x = images.float() / 255
    with torch.no_grad():
        probs = torch.softmax(victim(x) * 3, dim=1)
    probs[-4] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    probs[-3] = torch.full((K,), 1 / K)
    probs[-2] = torch.tensor([0.1, 0.45, 0.45, 0.0])
    probs[-1] = torch.tensor([0.0, 0.0, 0.3, 0.7])
    return x, probs


def make(name: str, params: dict, victim: torch.nn.Module, misinfo: torch.nn.Module,
         key: bytes = KEY):
    extra = {"misinformation_model": misinfo} if name == "adaptive_misinformation" else {}
    return build_defense(name, params, victim=victim, key=key, **extra)


def test_every_registered_defense_is_under_contract() -> None:
    assert set(CONFIGS) == set(DEFENSES.names())


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_contract(name, params, victim, misinfo, batch) -> None:
    x, probs = batch
    defense = make(name, params, victim, misinfo)
    out = defense(x, probs)
    assert out.shape == probs.shape and out.dtype == probs.dtype
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-5)
    if defense.budget is not None:
        d = DISTANCES.get(defense.budget.dist)(probs.double(), out.double())
        assert (d <= defense.budget.epsilon + 1e-5).all(), d.max()
    if defense.preserves_argmax:
        assert torch.equal(out.argmax(1), probs.argmax(1))
    # deterministic: again, per row alone, and from a second defense built with the same key
    assert torch.equal(defense(x, probs), out)
    assert torch.allclose(defense(x[5:6], probs[5:6]), out[5:6], atol=1e-6)
    assert torch.allclose(make(name, params, victim, misinfo)(x, probs), out, atol=1e-6)


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_bad_probabilities_are_refused(name, params, victim, misinfo, batch) -> None:
    x, probs = batch
    defense = make(name, params, victim, misinfo)
    nan = probs.clone()
    nan[0, 1] = math.nan
    with pytest.raises(InputError, match="probs .* NaN"):
        defense(x, nan)
    with pytest.raises(InputError, match="summing to 1 .* row sums"):
        defense(x, probs * 0.5)
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        defense(x, probs - 0.5)
    with pytest.raises(InputError, match=r"\(B, K\)"):
        defense(x, probs[0])
    bad_x = x.clone()
    bad_x[0, 0, 0, 0] = math.nan
    with pytest.raises(InputError, match="x contains NaN"):
        defense(bad_x, probs)


def test_random_defenses_change_with_the_key_and_hold_their_logit_budget(victim, misinfo, batch):
    x, probs = batch
    a = make("random_noise", {"epsilon": 1.0}, victim, misinfo)(x, probs)
    b = make("random_noise", {"epsilon": 1.0}, victim, misinfo, key=b"z" * 32)(x, probs)
    assert not torch.allclose(a, b)
    for dist, p in (("l1", 1), ("l2", 2)):
        rn = RandomNoise(epsilon=0.8, dist=dist, key=KEY)
        delta = rn.noise(x, K)
        assert (delta.norm(p=p, dim=1) <= 0.8 + 1e-9).all()
        assert (delta.norm(p=p, dim=1) > 0.1).all()  # noise was really added
        assert "key" not in repr(rn) and str(KEY) not in repr(rn)
    rand = make("mad", {"epsilon": 2.0, "ystar": "random"}, victim, misinfo)
    other = make("mad", {"epsilon": 2.0, "ystar": "random"}, victim, misinfo, key=b"z" * 32)
    assert not torch.equal(rand(x, probs), other(x, probs))


def test_l1_ball_projection_matches_a_brute_force_one() -> None:
    v = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = project_l1_ball(v, 1.0)
    assert (p.abs().sum(1) <= 1 + 1e-12).all()
    # optimality: no point on a fine random sample of the ball is closer to v
    cand = project_l1_ball(torch.randn(4000, 6, dtype=torch.float64), 1.0)
    d_best = (v[:, None] - cand[None]).norm(dim=2).min(1).values
    assert ((v - p).norm(dim=1) <= d_best + 1e-12).all()
    inside = v / v.abs().sum(1, keepdim=True) * 0.5
    assert torch.equal(project_l1_ball(inside, 1.0), inside)


def test_topk_rounding_reverse_sigmoid_values() -> None:
    y = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.333, 0.333, 0.334, 0.0]])
    x = torch.zeros(2, 1, 8, 8)
    top2 = build_defense("topk", {"k": 2})(x, y)
    assert torch.allclose(top2[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.equal(build_defense("topk", {"k": 1})(x, y)[1], torch.tensor([0.0, 0, 1, 0]))
    r = build_defense("rounding", {"decimals": 1})(x, y)
    assert torch.allclose(r, torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.3, 0.3, 0.4, 0.0]]))
    r0 = build_defense("rounding", {"decimals": 0})(x, y)
    assert torch.equal(r0, torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]]))
    rs = build_defense("reverse_sigmoid", {"beta": 0.4, "gamma": 0.5})(x[:1], y[:1])
    yc = y[:1].clamp(1e-6, 1 - 1e-6)
    expect = y[:1] - 0.4 * (torch.sigmoid(0.5 * torch.log(yc / (1 - yc))) - 0.5)
    assert torch.allclose(rs, expect / expect.sum(), atol=1e-6)
    assert torch.allclose(build_defense("reverse_sigmoid", {"beta": 0.0})(x, y), y)


def test_parse_and_build_from_cli_strings(victim) -> None:
    params = parse_defense_params(["epsilon=0.5", "dist = l2", "jacobian=last_layer"])
    assert params == {"epsilon": "0.5", "dist": "l2", "jacobian": "last_layer"}
    mad = build_defense("mad", params, victim=victim)
    assert isinstance(mad, MAD)
    assert (mad.epsilon, mad.dist, mad.jacobian) == (0.5, "l2", "last_layer")
    topk = build_defense("topk", parse_defense_params(["k=3"]))
    assert isinstance(topk, TopK) and topk.k == 3
    with pytest.raises(ConfigError, match="name=value"):
        parse_defense_params(["epsilon"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_defense_params(["k=1", "k=2"])


@pytest.mark.parametrize("name, params, pattern", [
    ("mad", {"epsilon": "-0.1"}, r"epsilon=.*-0.1.* valid: .*>= 0"),
    ("mad", {}, r"'epsilon' is required"),
    ("mad", {"epsilon": "abc"}, r"epsilon='abc' is invalid"),
    ("mad", {"epsilon": 1, "dist": "l3"}, r"dist='l3' is invalid .*l1, l2 or kl"),
    ("mad_argmax", {"epsilon": "nan"}, r"epsilon=.*nan"),
    ("random_noise", {"epsilon": -1}, r"epsilon=-1 .* >= 0"),
    ("reverse_sigmoid", {"beta": -0.5}, r"beta=-0.5 .*beta >= 0"),
    ("reverse_sigmoid", {"gamma": "-2"}, r"gamma='-2' .*gamma >= 0"),
    ("topk", {"k": 0}, r"k=0 .*1 <= k <= K"),
    ("rounding", {"decimals": 9}, r"decimals=9 .*0 <= decimals <= 6"),
    ("adaptive_misinformation", {"tau": 1.5}, r"tau=1.5 .*0 <= tau <= 1"),
    ("topk", {"kk": 1}, r"unknown parameter 'kk'; valid parameters: k"),
])
def test_bad_parameters_name_the_parameter_and_range(name, params, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build_defense(name, params)


def test_k_larger_than_the_classes_is_refused(victim, batch) -> None:
    with pytest.raises(ConfigError, match=r"k must be an integer in \[1, K=4\], got 5"):
        build_defense("topk", {"k": 5}, victim=victim)
    with pytest.raises(ConfigError, match=r"\[1, K=4\], got 5"):
        build_defense("topk", {"k": 5})(*batch)


def test_unknown_defense_and_missing_pieces() -> None:
    with pytest.raises(UnknownNameError, match="unknown defense 'madd'; valid .*mad_argmax"):
        build_defense("madd", {})
    with pytest.raises(ConfigError, match="misinformation_model"):
        build_defense("adaptive_misinformation", {})
    x, y = torch.rand(2, 1, 8, 8), torch.full((2, K), 0.25)
    with pytest.raises(ConfigError, match="needs a surrogate"):
        build_defense("mad", {"epsilon": 1.0})(x, y)


def test_mad_surrogate_is_a_fresh_frozen_random_model(victim) -> None:
    torch.manual_seed(0)  # even a victim initialised from seed 0 is not its own surrogate
    fresh = build_model("conv3", in_channels=1, image_size=8, num_classes=K)
    mad = build_defense("mad", {"epsilon": 1.0}, victim=fresh)
    assert isinstance(mad, MAD) and mad.surrogate is not None
    sur = mad.surrogate
    assert sur is not fresh and sur.arch == "conv3" and not sur.training
    assert not any(p.requires_grad for p in sur.parameters())
    assert not torch.equal(sur.state_dict()["net.classifier.weight"],
                           fresh.state_dict()["net.classifier.weight"])
    again = build_defense("mad", {"epsilon": 1.0, "surrogate_arch": "resnet20"}, victim=victim)
    assert isinstance(again, MAD) and again.surrogate is not None
    assert again.surrogate.arch == "resnet20" and again.surrogate.input_shape == (1, 8, 8)


def test_defended_black_box_and_compose(victim, batch) -> None:
    x, _ = batch
    mad = build_defense("mad_argmax", {"epsilon": 1.0}, victim=victim)
    bb = LocalBlackBox(victim, defense=Compose([NoDefense(), mad]))
    a, b = bb.query(x), bb.query(x)
    assert torch.equal(a, b) and bb.queries_used == 2 * len(x)
    plain = LocalBlackBox(victim).query(x)
    assert torch.equal(a.argmax(1), plain.argmax(1))
    assert (a - plain).abs().sum(1).max() <= 1.0 + 1e-5
    assert (a - plain).abs().sum(1).max() > 0.1  # it did perturb
