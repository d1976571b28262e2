"""The Jacobian family: each augmentation step against autograd, the rounds, presets, options."""

import pytest
import torch
import torch.nn.functional as F

from stealguard.attacks import (
    JACOBIAN_PRESETS,
    JBDA,
    JBDATR,
    JBSelf,
    JBTop3,
    build_attack,
    sign_gradient,
)
from stealguard.blackbox import LocalBlackBox
from stealguard.data import ImageDataset
from stealguard.models import build_model
from stealguard.training import TrainConfig, train
from synthetic import quadrant_dataset, quadrant_images, quadrant_victim

ADAM = TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=3e-3, weight_decay=0.0,
                   schedule="constant")
STEP = 0.2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def victim():
    return quadrant_victim()


@pytest.fixture(scope="module")
def clone():
    """A half-trained clone: gradients that are neither zero nor saturated."""
    x, y = quadrant_images(128, seed=3)
    torch.manual_seed(1)
    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    train(model, x, y, config=TrainConfig(epochs=1, batch_size=32, lr=0.02), progress=False)
    return model


@pytest.fixture(scope="module")
def points():
    x, y = quadrant_images(8, seed=4)
    return x.float() / 255, F.one_hot(y, 4).float() * 0.7 + 0.075  # soft answers, argmax y


def augment(cls, clone, x, answers):
    """Step (iii) of attack class `cls` on points x (B, C, H, W) with answers (B, K)."""
    return cls(x).augment(clone, x, answers, step=STEP, generator=torch.Generator().manual_seed(0))


def one_image_step(clone, x, label):
    """x + sign(grad_x CE(C(x), label)) by autograd on a single image (1, C, H, W)."""
    xi = x[None].clone().requires_grad_(True)
    F.cross_entropy(clone(xi), torch.tensor([label])).backward()
    return xi.grad[0]


def assert_step(new, x, grad, step):
    """new == clip(x + step * sign(grad)) wherever the gradient is clearly non-zero."""
    clear = grad.abs() > 1e-6 * grad.abs().max()
    assert clear.float().mean() > 0.5  # the test would be vacuous on a flat clone
    expected = (x + step * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(new[clear], expected[clear], rtol=0, atol=1e-6)


def test_jbda_moves_each_input_in_the_sign_of_its_loss_gradient(clone, points):
    x, answers = points
    new = augment(JBDA, clone, x, answers)
    assert new.shape == x.shape and new.min() >= 0 and new.max() <= 1
    for i in (0, 5):  # batched step == per-image autograd, for two different images
        assert_step(new[i], x[i], one_image_step(clone, x[i], int(answers[i].argmax())), STEP)
    y = answers.argmax(1)
    assert F.cross_entropy(clone(new), y) > F.cross_entropy(clone(x), y)  # away from the label


def test_jbda_tr_steps_toward_a_random_other_class(clone, points):
    x, answers = points
    new = augment(JBDATR, clone, x, answers)
    targets = []
    for i in range(len(x)):
        matches = [c for c in range(4) if torch.allclose(
            new[i], (x[i] - STEP * one_image_step(clone, x[i], c).sign()).clamp(0, 1))]
        assert len(matches) >= 1 and int(answers[i].argmax()) not in matches
        targets.append(matches[0])
    assert len(set(targets)) > 1  # random, not one fixed class


def test_jb_self_steps_toward_the_clones_own_class(clone, points):
    x, answers = points
    new = augment(JBSelf, clone, x, answers)
    own = clone(x).argmax(1)
    for i in (1, 6):
        assert_step(new[i], x[i], -one_image_step(clone, x[i], int(own[i])), STEP)


def test_jb_top3_steps_toward_each_of_the_three_nearest_other_classes(clone, points):
    x, answers = points
    new = augment(JBTop3, clone, x, answers)
    assert new.shape == (3 * len(x), 1, 8, 8)
    agree = (clone(x).argmax(1) == answers.argmax(1)).nonzero().flatten()
    i = int(agree[0])  # an image whose answered label is the clone's top class: it must be skipped
    logits = clone(x[i:i + 1])[0].detach()
    logits[answers[i].argmax()] = float("-inf")
    for j, c in enumerate(logits.argsort(descending=True)[:3].tolist()):
        assert_step(new[3 * i + j], x[i], -one_image_step(clone, x[i], c), STEP)


def test_sign_gradient_chunks_agree_with_one_pass(clone, points):
    x, answers = points
    y = answers.argmax(1)
    torch.testing.assert_close(sign_gradient(clone, x, y, grad_batch=3),
                               sign_gradient(clone, x, y, grad_batch=64))


def test_rounds_double_the_set_and_query_only_new_points(victim):
    seeds = quadrant_dataset(20, seed=6)
    bb = LocalBlackBox(victim)
    attack = JBDA(seeds, rounds=3, clone=ADAM)
    result = attack(bb, 10_000)
    assert result.queries == bb.queries_used == 20 + 20 + 40
    trains = [e["rows"] for e in result.log if e["stage"] == "train"]
    assert trains == [20, 40, 80]
    assert sorted(map(bytes, attack.seed_images.numpy())) == sorted(map(bytes, seeds.images.numpy()))
    torch.testing.assert_close(result.transfer_x[:20], attack.seed_images.float() / 255)


def test_until_the_budget_with_reservoir_and_periodic_step(victim):
    steps = []

    class Recording(JBDA):
        def augment(self, clone, x, answers, *, step, generator):
            steps.append((step, len(x)))
            return super().augment(clone, x, answers, step=step, generator=generator)

    jac = {"rounds": "budget", "tau": 2, "kappa": 15, "sigma": 1, "round_config": ADAM}
    result = Recording(quadrant_dataset(10, seed=6), jac)(LocalBlackBox(victim), 57)
    assert result.queries == 57
    # round 0 augments all 10 seeds; from round 1 on only a reservoir of 15 (the last cut to
    # what the budget still buys); the step flips sign every tau = 2 rounds
    assert steps == [(0.2, 10), (0.2, 15), (-0.2, 15), (-0.2, 7)]


def test_mad_preset_trains_a_fresh_final_clone_and_config_replaces_it(victim):
    mad = JACOBIAN_PRESETS["mad"]
    assert mad.step == 0.1 and mad.rounds is None and mad.final_config is not None
    edm = JACOBIAN_PRESETS["edm"]
    assert (edm.rounds, edm.step, edm.round_config.optimizer, edm.round_config.lr,
            edm.round_config.epochs) == (6, 0.2, "adam", 1e-3, 10)
    final = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    attack = build_attack("jbda", quadrant_dataset(40), {"seed_size": 10, "preset": "mad",
                          "clone": final, "round_config": ADAM})
    assert attack.clone_config == final and attack.jacobian.round_config == ADAM
    result = attack(LocalBlackBox(victim), 45)
    stages = [e["stage"] for e in result.log if e["stage"] != "query"]
    assert stages[-1] == "final" and stages.count("final") == 1
    edm_attack = build_attack("jbda", quadrant_dataset(40), {"clone": final})
    assert edm_attack.jacobian.round_config == final


def test_mad_seed_sizes_by_dataset():
    x, y = quadrant_images(300, seed=0)
    mnist_like = ImageDataset("mnist", "test", x, y, [str(i) for i in range(4)])
    assert build_attack("jbda", mnist_like, {"preset": "mad"}).seed_images.shape[0] == 100
    assert build_attack("jbda", mnist_like).seed_images.shape[0] == 128
    a = build_attack("jbda", mnist_like, {"seed_size": 30, "seed": 1})
    b = build_attack("jbda", mnist_like, {"seed_size": 30, "seed": 2})
    assert a.seed_images.shape[0] == 30 and not torch.equal(a.seed_images, b.seed_images)


def test_hard_labels_and_nquery_each_in_the_rounds(victim):
    opts = {"labels": "hard", "nquery": 2, "nquery_mode": "each", "query_aug": "crop_flip",
            "crop_padding": 1}
    bb = LocalBlackBox(victim)
    result = JBDATR(quadrant_dataset(10, seed=6), {**opts, "rounds": 2}, clone=ADAM)(bb, 1000)
    assert result.queries == bb.queries_used == 2 * (10 + 10)
    assert result.transfer_x.shape[0] == 40 and result.queries_per_row == 1
