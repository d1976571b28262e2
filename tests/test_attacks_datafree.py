"""DFME and MAZE: exact query accounting (finite differences included), the zeroth-order
estimate against autograd, a tiny synthetic steal, output modes, HTTP, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stealguard.attacks import ATTACKS, DFME, MAZE, build_attack, zeroth_order_gradient
from stealguard.attacks.datafree import Reservoir
from stealguard.attacks.dfme import recover_logits
from stealguard.attacks.maze import kl_to_clone
from stealguard.blackbox import LocalBlackBox
from stealguard.errors import ConfigError, UnknownNameError
from stealguard.models import GENERATORS, GeneratorConfig, build_generator, build_model, to_pixels
from stealguard.training import accuracy
from synthetic import quadrant_images, quadrant_victim

TINY = {"batch": 8, "generator": {"ngf": 4, "nz": 8}, "log_every": 10**9}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def victim():
    return quadrant_victim()


class CountingBox(LocalBlackBox):
    """A local black box that also records the size of every batch it answered."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.batches: list[int] = []

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        return super()._answer(x)


def make(name: str, **params):
    return build_attack(name, None, {**TINY, "seed": 3, **params})


# ---- query accounting ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dfme", "maze"])
@pytest.mark.parametrize("budget", [5, 100, 333])
def test_every_query_counts_and_the_budget_is_spent_exactly(victim, name, budget):
    bb = CountingBox(victim, budget=2000)
    bb.query(quadrant_images(7, seed=9)[0])  # the box has served others: counts are deltas
    attack = make(name, directions=3, clone_steps=2)
    result = attack(bb, budget)
    assert result.queries == bb.queries_used - 7 == budget == sum(bb.batches[1:])
    per_round = attack.round_queries()
    zo_batch = 8 * (3 + 1)  # B (m + 1): a round's finite differences are one batch
    rounds = budget // per_round
    assert bb.batches[1:].count(zo_batch) >= rounds
    assert per_round == (8 * (4 + 2) if name == "dfme" else 8 * (4 + 1))  # MAZE reuses one batch
    assert max(bb.batches[1:]) <= zo_batch


@pytest.mark.parametrize("name", ["dfme", "maze"])
def test_budget_capped_by_what_the_black_box_has_left(victim, name):
    bb = LocalBlackBox(victim, budget=150)
    result = make(name)(bb, 10_000)
    assert result.queries == bb.queries_used == 150


def test_round_cost_follows_the_papers():
    assert DFME().round_queries() == 256 * (1 * (1 + 1) + 5)  # DFME: B (n_G (m + 1) + n_S)
    assert MAZE().round_queries() == 128 * ((10 + 1) * 1 + 5 - 1)  # MAZE: 1920


# ---- the zeroth-order estimate -----------------------------------------------------------------


class Smooth(nn.Module):
    """A small smooth classifier on 1x8x8 images (tanh features, no ReLU kinks)."""

    input_shape, num_classes = (1, 8, 8), 4

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 3.0


@pytest.mark.parametrize("loss", ["kl", "l1"])
def test_zeroth_order_estimate_points_along_the_true_gradient(loss):
    """m = 256 random directions in d = 64 dimensions: the forward-difference estimate's
    cosine similarity with autograd's gradient is ~sqrt(m / (m + d)) ~= 0.89 in expectation;
    we require a mean above 0.8 and every row above 0.6."""
    victim, clone = Smooth(0).eval(), Smooth(1).eval()
    bb = CountingBox(victim)
    x_pre = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))

    def objective(x, y):
        if loss == "kl":
            return kl_to_clone(clone(x), y)
        return (clone(x) - recover_logits(y, floor=1e-8, correction="mean")).abs().mean(1)

    est, value, x0, y0 = zeroth_order_gradient(objective, x_pre, bb, epsilon=1e-3,
                                               directions=256,
                                               generator=torch.Generator().manual_seed(0))
    assert bb.batches == [16 * 257] and bb.queries_used == 16 * 257
    xp = x_pre.clone().requires_grad_(True)
    x = to_pixels(xp)
    true_value = objective(x, F.softmax(victim(x), 1))
    true_value.sum().backward()
    cos = F.cosine_similarity(est.flatten(1), xp.grad.flatten(1), dim=1)  # (16,)
    assert cos.mean() > 0.8 and cos.min() > 0.6, cos
    assert torch.allclose(value, true_value.detach(), atol=1e-4)
    assert torch.allclose(x0, x.detach()) and y0.shape == (16, 4)
    norm_ratio = est.flatten(1).norm(dim=1) / xp.grad.flatten(1).norm(dim=1)
    assert ((norm_ratio > 0.5) & (norm_ratio < 2.0)).all()  # the d/m scaling: right magnitude


# ---- a tiny steal ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [
    ("dfme", {"clone_optimizer": "adam", "lr_clone": 3e-3, "lr_generator": 1e-3,
              "schedule": "constant"}),
    ("maze", {"lr_generator": 1e-3, "directions": 4}),
])
def test_tiny_data_free_steal_improves_the_clone(victim, name, params):
    xt, yt = quadrant_images(256, seed=2)
    attack = build_attack(name, None, {"batch": 32, "generator": {"ngf": 8, "nz": 16},
                                       **params})
    torch.manual_seed(0)  # the clone's initialisation in run() uses the attack's seed
    initial = accuracy(build_model("conv3", in_channels=1, image_size=8, num_classes=4), xt, yt)
    result = attack(LocalBlackBox(victim), 6000)
    acc = accuracy(result.clone, xt, yt)
    assert acc > initial + 0.3 and acc > 0.7, (acc, initial)


# ---- output modes, HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dfme", "maze"])
@pytest.mark.parametrize("output,k", [("topk", 2), ("label", 1)])
def test_top_k_and_label_answers_run_the_same_loop(victim, name, output, k):
    bb = LocalBlackBox(victim, budget=200, output=output, k=k)
    result = make(name)(bb, 200)
    assert result.queries == 200
    assert all(torch.isfinite(torch.tensor(e["clone_loss"])) for e in result.log[:-1])
    if output == "label":
        assert set(result.transfer_y.unique().tolist()) <= {0.0, 1.0}


def test_labels_hard_trains_on_the_argmax(victim):
    attack = DFME(None, TINY, labels="hard")
    y = torch.tensor([[0.2, 0.5, 0.3, 0.0]])
    assert attack.answers_for_loss(y).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_recovered_logits_and_kl_handle_zero_probabilities():
    p = torch.tensor([[0.7, 0.3, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    logits = recover_logits(p, floor=1e-6, correction="mean")
    assert torch.isfinite(logits).all() and torch.allclose(logits.mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(F.softmax(logits, 1)[0, :2] / F.softmax(logits, 1)[0, :2].sum(),
                          p[0, :2], atol=1e-5)
    kl = kl_to_clone(torch.log(p.clamp_min(1e-9)), p)
    assert torch.isfinite(kl).all() and (kl.abs() < 1e-5).all()


def test_attack_over_http_counts_equal_the_servers(victim, tmp_path):
    from fastapi.testclient import TestClient

    from stealguard.service import HttpBlackBox, KeyStore, create_app

    store = KeyStore(tmp_path / "keys.db")
    key, secret = store.create_key(budget=300)
    with TestClient(create_app(victim, store=store)) as client, \
            HttpBlackBox("http://testserver", secret, client=client) as bb:
        result = make("maze", directions=2)(bb, 1000)  # more than the key's 300
        assert result.queries == 300 == bb.queries_used == store.get(key.id).used


# ---- registry and bad input --------------------------------------------------------------------


def test_registered_and_typed():
    assert {"dfme", "maze"} <= set(ATTACKS.names())
    assert {"dfme", "maze"} <= set(GENERATORS.names())
    for arch, side, c in (("dfme", 28, 1), ("maze", 32, 3)):
        g = build_generator(GeneratorConfig(arch=arch), channels=c, image_size=side)
        out = g(torch.randn(2, g.nz))
        assert out.shape == (2, c, side, side) and torch.isfinite(out).all()


def test_bad_params_are_refused_with_the_field():
    with pytest.raises(ConfigError, match="'dfme': directions=0 is invalid"):
        build_attack("dfme", None, {"directions": 0})
    with pytest.raises(ConfigError, match="unknown parameter 'replay_size'"):
        build_attack("dfme", None, {"replay_size": 10})  # a MAZE field: DFME refuses it
    with pytest.raises(ConfigError, match="trains its clone online"):
        build_attack("maze", None, {"clone": {"epochs": 3}})
    with pytest.raises(ConfigError, match="'maze' is data-free"):
        build_attack("maze", torch.zeros(3, 1, 8, 8))
    with pytest.raises(UnknownNameError, match="valid generator names"):
        build_generator(GeneratorConfig(arch="dcgan"), channels=1, image_size=28)
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_generator(GeneratorConfig(), channels=1, image_size=30)


def test_reservoir_keeps_a_uniform_sample():
    r = Reservoir(100, generator=torch.Generator().manual_seed(0))
    for i in range(50):
        r.add(torch.full((20, 1, 2, 2), float(i)), torch.full((20, 3), float(i)))
    x, y = r.rows()
    assert r.size == 100 and r.seen == 1000 and x.shape == (100, 1, 2, 2)
    assert 15 < y[:, 0].mean() < 34  # a uniform sample of 0..49 has mean ~24.5


def test_the_measurement_script_runs_the_specs_quick_settings():
    """benchmarks/datafree_mnist.py (the numbers in BENCHMARKS.md) = datafree-table, quick."""
    import importlib.util
    from pathlib import Path

    from stealguard.reproduce.spec import load_spec

    path = Path(__file__).parents[1] / "benchmarks" / "datafree_mnist.py"
    spec = importlib.util.spec_from_file_location("datafree_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cells = load_spec("datafree-table").cells("quick")
    assert len(cells) == 2 * 2 * 7  # MNIST, FashionMNIST x DFME, MAZE x 7 targets
    for cell in cells:
        assert cell.queries is None and cell.options == module.QUICK[cell.attack]
        assert cell.attack_config().data is None
