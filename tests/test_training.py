import pytest
import torch

from stealguard.errors import InputError
from stealguard.models import build_model
from stealguard.training import TrainConfig, accuracy, soft_cross_entropy, train
from synthetic import quadrant_images


def _fit(cfg: TrainConfig, targets=None):
    x, y = quadrant_images(512, seed=1)
    torch.manual_seed(cfg.seed)
    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    train(model, x, y if targets is None else targets, config=cfg, progress=False)
    return model


def test_learns_the_quadrant_problem():
    model = _fit(TrainConfig(epochs=4, batch_size=32, lr=0.05))
    xt, yt = quadrant_images(256, seed=2)
    assert accuracy(model, xt, yt) > 0.95


def test_soft_targets_and_adam():
    x, y = quadrant_images(512, seed=1)
    soft = torch.nn.functional.one_hot(y, 4).float() * 0.9 + 0.025
    model = _fit(TrainConfig(epochs=4, batch_size=32, optimizer="adam", lr=1e-3), targets=soft)
    xt, yt = quadrant_images(256, seed=2)
    assert accuracy(model, xt, yt) > 0.9


def test_seeded_training_is_repeatable():
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, augment=True, crop_padding=1)
    a, b = _fit(cfg), _fit(cfg)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = _fit(cfg.model_copy(update={"seed": 1}))
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_soft_cross_entropy_matches_hard_for_one_hot():
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    hard = soft_cross_entropy(logits, y)
    soft = soft_cross_entropy(logits, torch.nn.functional.one_hot(y, 3).float())
    assert torch.allclose(hard, soft)


def test_bad_targets_and_options_are_refused():
    x, y = quadrant_images(8)
    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    with pytest.raises(InputError, match=r"labels must lie in \[0, 4\)"):
        train(model, x, y + 4, config=TrainConfig(epochs=1), progress=False)
    with pytest.raises(InputError, match="soft targets have 3 classes, model has 4"):
        train(model, x, torch.rand(8, 3), config=TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(epoch=3)
