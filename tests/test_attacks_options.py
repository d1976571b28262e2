"""Attacker options (nquery, nquery+aug, arch, optimizer), the adaptive averaging attack, its
batched transforms, and accuracy-versus-budget curves."""

import math

import pytest
import torch

from stealguard.attacks import (
    AdaptiveAveraging,
    AffineColorJitter,
    KnockoffNets,
    accuracy_vs_budget,
    build_attack,
)
from stealguard.attacks.transforms import color_jitter, random_affine
from stealguard.blackbox import LocalBlackBox, predict_proba
from stealguard.errors import ConfigError
from stealguard.training import TrainConfig, accuracy
from synthetic import quadrant_dataset, quadrant_images, quadrant_victim

FAST = TrainConfig(epochs=3, batch_size=32, lr=0.05)
STILL = AffineColorJitter(degrees=0, translate=0, scale_min=1, scale_max=1, shear=0,
                          brightness=0, contrast=0, saturation=0, hue=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def victim():
    return quadrant_victim()


class Recording(LocalBlackBox):
    """A black box that keeps every image it was asked about."""

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.seen: list[torch.Tensor] = []

    def _answer(self, x):
        self.seen.append(x.clone())
        return super()._answer(x)


def answers_of(model, x):
    with torch.no_grad():
        return predict_proba(model, x.float() / 255 if x.dtype == torch.uint8 else x)


# ---- nquery, nquery+aug, arch, optimizer -------------------------------------------------------


def test_nquery_average_spends_n_per_image_and_keeps_one_row(victim):
    surrogate = quadrant_dataset(400, seed=5)
    bb = LocalBlackBox(victim)
    result = KnockoffNets(surrogate, {"nquery": 3}, clone=FAST)(bb, 301)
    assert result.queries == bb.queries_used == 300 and result.queries_per_row == 3
    assert result.transfer_x.shape[0] == 100 and result.transfer_x.dtype == torch.uint8
    # a deterministic victim answers the same thrice: the average is its answer
    torch.testing.assert_close(result.transfer_y, answers_of(victim, result.transfer_x))


def test_nquery_aug_each_keeps_every_cropped_flipped_query(victim):
    bb = Recording(victim)
    opts = {"nquery": 4, "nquery_mode": "each", "query_aug": "crop_flip", "crop_padding": 2}
    result = KnockoffNets(quadrant_dataset(400, seed=5), opts, clone=FAST)(bb, 200)
    assert result.queries == bb.queries_used == 200 and result.queries_per_row == 1
    x = result.transfer_x
    assert x.shape == (200, 1, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.cat(bb.seen))  # the rows are what was sent
    torch.testing.assert_close(result.transfer_y, answers_of(victim, x))
    copies = x.view(50, 4, 1, 8, 8)
    assert (copies[:, 0] != copies[:, 1]).flatten(1).any(1).float().mean() > 0.5  # augmented


def test_other_arch_optimizer_and_hard_labels(victim):
    config = TrainConfig(epochs=1, batch_size=32, optimizer="adagrad", lr=0.05)
    attack = build_attack("knockoff", quadrant_dataset(100, seed=5),
                          {"arch": "resnet20", "labels": "hard", "clone": config})
    result = attack(LocalBlackBox(victim), 64)
    assert result.clone.arch == "resnet20" and attack.clone_config.optimizer == "adagrad"
    assert attack.options.labels == "hard"
    legacy = KnockoffNets(quadrant_dataset(10), {"nquery": 2}, labels="hard", seed=3)
    assert (legacy.options.labels, legacy.options.seed, legacy.options.nquery) == ("hard", 3, 2)


# ---- adaptive averaging (EDM A.1) and its transforms -------------------------------------------


def test_adaptive_averaging_averages_k_perturbed_answers_per_image(victim):
    bb = Recording(victim)
    attack = AdaptiveAveraging(quadrant_dataset(400, seed=5), k=5, clone=FAST)
    result = attack(bb, 103)
    assert result.queries == bb.queries_used == 100 and result.queries_per_row == 5
    assert result.transfer_x.shape == (20, 1, 8, 8)  # the original images, one row each
    sent = torch.cat(bb.seen)  # (100, 1, 8, 8): five perturbed copies per image, in order
    expected = answers_of(victim, sent).view(20, 5, 4).mean(1)
    torch.testing.assert_close(result.transfer_y, expected)
    originals = result.transfer_x.float().div(255).repeat_interleave(5, 0)
    assert (sent - originals).abs().flatten(1).amax(1).min() > 0.05  # every copy perturbed


def test_transforms_are_identity_at_zero_ranges_and_random_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g)
    torch.testing.assert_close(random_affine(x, STILL, generator=g), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(color_jitter(x, STILL, generator=g), x, atol=1e-5, rtol=0)
    jitter = AffineColorJitter()
    a = random_affine(x, jitter, generator=torch.Generator().manual_seed(1))
    b = random_affine(x, jitter, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)  # seeded
    same = x[:1].repeat(6, 1, 1, 1)
    out = color_jitter(random_affine(same, jitter, generator=g), jitter, generator=g)
    assert out.shape == same.shape and out.min() >= 0 and out.max() <= 1
    assert (out[0] - out[1]).abs().max() > 0.01  # each image its own draw


def test_hue_shift_keeps_luma_and_rotation_turns_the_image():
    g = torch.Generator().manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(4, 3, 8, 8, generator=g)  # away from the clip
    hue_only = STILL.model_copy(update={"hue": 0.5})
    out = color_jitter(x, hue_only, generator=g)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((out * luma).sum(1), (x * luma).sum(1), atol=2e-3, rtol=0)
    assert (out - x).abs().max() > 0.02
    turn = STILL.model_copy(update={"degrees": 90})
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 1, 4] = 1.0  # a dot above the centre
    rotated = random_affine(img.repeat(64, 1, 1, 1), turn, generator=g)
    dist = [math.dist(divmod(int(r.argmax()), 9), (4, 4)) for r in rotated]
    assert all(abs(d - 3) < 1.5 for d in dist)  # rotations about the centre keep the radius


def test_jitter_ranges_are_validated():
    with pytest.raises(ValueError, match="scale_min 1.2 > scale_max 1.1"):
        AffineColorJitter(scale_min=1.2)
    with pytest.raises(ConfigError, match="k=0 is invalid .*>= 1"):
        AdaptiveAveraging(quadrant_dataset(10), k=0)


# ---- accuracy versus budget -------------------------------------------------------------------


def test_curve_queries_once_and_each_point_is_a_fresh_clone_on_a_prefix(victim):
    xt, yt = quadrant_images(256, seed=2)
    surrogate = quadrant_dataset(400, seed=5)
    bb = LocalBlackBox(victim, budget=1000)
    points = accuracy_vs_budget(KnockoffNets(surrogate, clone=FAST), bb, [300, 40],
                                test_images=xt, test_labels=yt, victim=victim)
    assert bb.queries_used == 300  # one run at the largest budget
    assert [(p["budget"], p["rows"], p["queries"]) for p in points] == [(40, 40, 40),
                                                                      (300, 300, 300)]
    # each point is what a separate attack with that budget would have reached
    for p in points:
        alone = KnockoffNets(surrogate, clone=FAST)(LocalBlackBox(victim), p["budget"])
        assert p["clone_accuracy"] == accuracy(alone.clone, xt, yt)
    assert points[1]["clone_accuracy"] > 0.8 and "agreement" in points[1]


def test_curve_with_nquery_and_bad_budgets(victim):
    xt, yt = quadrant_images(64, seed=2)
    attack = KnockoffNets(quadrant_dataset(400, seed=5), {"nquery": 3}, clone=FAST)
    points = accuracy_vs_budget(attack, LocalBlackBox(victim), [31, 90], test_images=xt,
                                test_labels=yt)
    assert [(p["rows"], p["queries"]) for p in points] == [(10, 30), (30, 90)]
    assert set(points[0]) == {"budget", "queries", "rows", "clone_accuracy"}
    with pytest.raises(ConfigError, match="budgets must be a non-empty list of integers >= 1"):
        accuracy_vs_budget(attack, LocalBlackBox(victim), [0, 10], test_images=xt,
                           test_labels=yt)
    with pytest.raises(ConfigError, match="largest budget 200 exceeds .* remaining 100"):
        accuracy_vs_budget(attack, LocalBlackBox(victim, budget=100), [200], test_images=xt,
                           test_labels=yt)
    with pytest.raises(ConfigError, match="budget 2 buys no transfer-set row"):
        accuracy_vs_budget(attack, LocalBlackBox(victim), [2, 30], test_images=xt,
                           test_labels=yt)
