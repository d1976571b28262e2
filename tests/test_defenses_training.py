"""Adaptive misinformation (its training and blending), DP-SGD training, defense metrics."""

from __future__ import annotations

import pytest
import torch

from stealguard.defenses import (
    AdaptiveMisinformation,
    build_defense,
    defense_metrics,
    train_misinformation,
    train_outlier_exposure,
)
from stealguard.defenses.adaptive_misinformation import misinformation_loss
from stealguard.errors import ConfigError, InputError
from stealguard.models import build_model
from stealguard.training import TrainConfig, accuracy, train
from synthetic import quadrant_images

K = 4
FAST = TrainConfig.model_validate({"epochs": 6, "batch_size": 32, "lr": 0.05, "weight_decay": 0})


def conv3(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("conv3", in_channels=1, image_size=8, num_classes=K)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return quadrant_images(384, seed=0)


@pytest.fixture(scope="module")
def victim(data) -> torch.nn.Module:
    model = conv3(0)
    train(model, *data, config=FAST, progress=False)
    return model.eval()


def test_misinformation_loss_is_minus_log_one_minus_p_true() -> None:
    logits = torch.randn(16, K, dtype=torch.float64)
    labels = torch.randint(0, K, (16,))
    p_true = torch.softmax(logits, 1)[torch.arange(16), labels]
    assert torch.allclose(misinformation_loss(logits, labels), -(1 - p_true).log().mean())


def test_misinformation_model_learns_to_be_wrong(data) -> None:
    model = conv3(1)
    log = train_misinformation(model, *data, config=FAST)
    assert log.epochs[-1]["loss"] < log.epochs[0]["loss"]
    assert accuracy(model, *data) < 0.1  # chance is 0.25


def test_outlier_exposure_lowers_confidence_off_distribution(data) -> None:
    images, labels = data
    noise = (torch.rand(384, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 255).byte()
    model, plain = conv3(2), conv3(2)
    train_outlier_exposure(model, images, labels, noise, config=FAST)
    train(plain, images, labels, config=FAST, progress=False)
    with torch.no_grad():
        conf_in = torch.softmax(model(images.float() / 255), 1).max(1).values
        conf_out = torch.softmax(model(noise.float() / 255), 1).max(1).values
        conf_plain = torch.softmax(plain(noise.float() / 255), 1).max(1).values
    assert accuracy(model, images, labels) > 0.9
    assert conf_in.mean() > 0.9
    assert conf_out.mean() < 0.5
    assert conf_out.mean() < conf_plain.mean() - 0.15
    with pytest.raises(ConfigError, match="outliers must be images shaped like"):
        train_outlier_exposure(model, images, labels, noise[:, :, :4], config=FAST)


def test_adaptive_misinformation_blends_by_confidence() -> None:
    misinfo = conv3(3).eval()
    x = torch.rand(3, 1, 8, 8)
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.4, 0.3, 0.2, 0.1], [0.25] * 4])
    with torch.no_grad():
        wrong = torch.softmax(misinfo(x), 1)
    out = AdaptiveMisinformation(misinformation_model=misinfo, tau=0.6)(x, probs)
    assert torch.allclose(out[0], probs[0], atol=1e-6)  # confident: the victim's answer
    assert torch.allclose(out[1:], wrong[1:], atol=1e-6)  # unsure: the misinformation
    soft = AdaptiveMisinformation(misinformation_model=misinfo, tau=0.4, nu=10.0)(x, probs)
    a = torch.sigmoid(10.0 * (0.4 - probs.max(1, keepdim=True).values))
    assert torch.allclose(soft, (1 - a) * probs + a * wrong, atol=1e-6)


def test_defense_metrics(victim) -> None:
    images, labels = quadrant_images(200, seed=11)
    plain = defense_metrics(victim, build_defense("none"), images, labels, batch_size=64)
    assert plain["accuracy"] == plain["accuracy_undefended"] > 0.9
    assert plain["l1_mean"] == plain["kl_mean"] == plain["argmax_changed"] == 0.0
    top1 = defense_metrics(victim, build_defense("topk", {"k": 1}), images, labels)
    assert top1["accuracy"] == plain["accuracy"] and top1["argmax_changed"] == 0
    assert top1["l1_mean"] > 0 and top1["l2_std"] >= 0
    mad = build_defense("mad", {"epsilon": 1.9, "jacobian": "last_layer"}, victim=victim)
    m = defense_metrics(victim, mad, images, labels)
    assert 0 < m["argmax_changed"] and m["accuracy"] < plain["accuracy"]
    assert 0 < m["l1_mean"] <= 1.9 + 1e-5 and m["l2_mean"] <= m["l1_mean"]
    y = torch.softmax(victim(images.float() / 255), 1).detach().double()
    y_tilde = mad(images.float() / 255, y.float()).double()
    assert m["l1_mean"] == pytest.approx(float((y - y_tilde).abs().sum(1).mean()), rel=1e-5)
    assert m["argmax_changed"] == pytest.approx(float((y.argmax(1) != y_tilde.argmax(1))
                                                      .double().mean()))
    with pytest.raises(InputError, match="N labels"):
        defense_metrics(victim, mad, images, labels[:5])


def test_dp_sgd_clips_per_sample_gradients_and_reports_epsilon(data) -> None:
    pytest.importorskip("opacus")
    from stealguard.defenses.dp_sgd import train_dp

    images, labels = data[0][:128], data[1][:128]
    model = conv3(4)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    cfg = TrainConfig.model_validate({"epochs": 1, "batch_size": 32, "lr": 0.5, "momentum": 0,
                                      "weight_decay": 0, "schedule": "constant"})
    # no noise, tiny clip norm: each step moves the weights by at most lr * C
    clipped, log = train_dp(model, images, labels, config=cfg, noise_multiplier=0.0,
                            max_grad_norm=1e-3)
    after = torch.cat([p.detach().flatten() for p in clipped.parameters()])
    steps = 128 // 32
    moved = float((after - before).norm())
    assert 0 < moved <= 0.5 * 1e-3 * steps * 1.5  # Poisson lots vary in size around 32
    assert log.epsilon == float("inf")  # no noise, no privacy
    # with noise: learns, and spends a finite privacy budget
    noisy, log = train_dp(conv3(4), images, labels, config=cfg.model_copy(update={"epochs": 3}),
                          noise_multiplier=0.8, max_grad_norm=1.0)
    assert 0 < log.epsilon < 100 and log.delta == 1e-5 and not log.replaced_modules
    assert accuracy(noisy, images, labels) > 0.4
    with pytest.raises(ConfigError, match="max_grad_norm must be a finite number > 0"):
        train_dp(conv3(4), images, labels, config=cfg, noise_multiplier=1.0, max_grad_norm=0)


def test_am_follows_the_authors_code_where_the_paper_is_silent(data) -> None:
    """nu = 10000, OE weight 1, and f̂ trained on the outliers too, labelled by the victim's
    argmax, so that f̂ puts little mass on the victim's class on out-of-distribution queries
    (the ones AM answers with f̂), not only on the training set."""
    import inspect

    from stealguard.defenses.adaptive_misinformation import AdaptiveMisinformationParams

    assert AdaptiveMisinformationParams().nu == 10000.0
    assert inspect.signature(train_outlier_exposure).parameters["weight"].default == 1.0
    images, labels = data[0][:192], data[1][:192]
    a = quadrant_images(384, seed=8)[0]
    outliers = torch.maximum(a[0::2], a[1::2])  # two quadrants lit: no class of the task
    victim = conv3(5)
    train_outlier_exposure(victim, images, labels, outliers, config=FAST)
    with torch.no_grad():
        target = victim(outliers.float() / 255).argmax(1, keepdim=True)  # (M, 1)
    cfg = FAST.model_copy(update={"epochs": 20})
    mass = {}
    for with_outliers in (False, True):
        misinfo = conv3(6)
        extra = {"outliers": outliers, "victim": victim} if with_outliers else {}
        train_misinformation(misinfo, images, labels, config=cfg, **extra)
        assert accuracy(misinfo, images, labels) < 0.1
        with torch.no_grad():
            p = torch.softmax(misinfo(outliers.float() / 255), 1)
        mass[with_outliers] = p.gather(1, target).mean().item()  # f̂'s mass on f's class
    assert mass[True] < mass[False] / 4, mass  # measured: 0.0016 vs 0.018
    with pytest.raises(ConfigError, match="give outliers= and victim= together"):
        train_misinformation(conv3(6), images, labels, config=FAST, outliers=outliers)
