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


# ------------------------------------------------------------------ one loop, one batching rule

SEEN: list[int] = []  # batch sizes the Recorder saw in training mode, in order


class Recorder(torch.nn.Module):
    """A tiny classifier that records the batch size of every training forward pass."""

    arch, input_shape, num_classes = "recorder", (1, 8, 8), 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            SEEN.append(int(x.shape[0]))
        return self.fc(x.flatten(1))


def test_batch_starts_drops_only_a_final_batch_of_one():
    from stealguard.training import batch_starts

    assert batch_starts(9, 4) == [0, 4]  # 4, 4 and the lone ninth image dropped
    assert batch_starts(10, 4) == [0, 4, 8]  # a final batch of two stays
    assert batch_starts(8, 4) == [0, 4]
    assert batch_starts(1, 4) == [0]  # a one-image set still trains


def test_every_training_path_follows_the_same_batching_rule():
    """Victims/clones, EDM members, Outlier Exposure and the misinformation model: 9 images
    in batches of 4 give two steps per epoch (the final batch of one is dropped), each with
    its extra batch when it has one."""
    from stealguard.defenses import train_misinformation, train_outlier_exposure
    from stealguard.ensemble import train_ensemble

    x, y = quadrant_images(9, seed=3)
    out = quadrant_images(12, seed=4)[0]
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01)
    runs = {
        "train": (lambda: train(Recorder(), x, y, config=cfg, progress=False), [4] * 4),
        "ensemble": (lambda: train_ensemble([Recorder(), Recorder()], x, y, out, lambda_d=1.0,
                                            config=cfg, ood_batch_size=2, progress=False),
                     None),
        "outlier_exposure": (lambda: train_outlier_exposure(Recorder(), x, y, out, config=cfg),
                             [8] * 4),
        "misinformation": (lambda: train_misinformation(Recorder(), x, y, config=cfg), [4] * 4),
        "misinformation+outliers": (lambda: train_misinformation(
            Recorder(), x, y, config=cfg, outliers=out, victim=Recorder().eval()), [8] * 4),
    }
    for name, (run, expected) in runs.items():
        SEEN.clear()
        run()
        if expected is None:  # members may run as one vmapped call or one call each
            assert SEEN and set(SEEN) == {6}, (name, SEEN)  # 4 images + 2 OOD, never 1 + 2
            assert len(SEEN) in (4, 8), (name, SEEN)  # 2 epochs x 2 steps (x 2 members)
        else:
            assert SEEN == expected, (name, SEEN)


def test_pluggable_loss_sees_extra_batches_and_logs_its_parts():
    from stealguard.training import Batch, ExtraBatches, StepLoss

    x, y = quadrant_images(16, seed=3)
    extra = quadrant_images(6, seed=5)[0]
    shapes: list[tuple[int, int]] = []

    def loss(forward, b: Batch) -> StepLoss:
        shapes.append((len(b.x), len(b.extra["more"])))
        assert b.extra["more"].dtype == torch.float32 and b.extra["more"].max() <= 1
        ce = soft_cross_entropy(forward(b.x), b.y)
        return StepLoss(2 * ce, {"loss": ce.detach(), "half": ce.detach() / 2})

    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    log = train(model, x, y, config=TrainConfig(epochs=2, batch_size=8), progress=False,
                loss=loss, extras={"more": ExtraBatches(extra, batch_size=3)})
    assert shapes == [(8, 3)] * 4
    assert set(log.epochs[0]) == {"epoch", "loss", "half"}
    assert log.epochs[0]["half"] == pytest.approx(log.epochs[0]["loss"] / 2)
    with pytest.raises(InputError, match="extra batches 'more' must be images shaped like"):
        train(model, x, y, config=TrainConfig(epochs=1), progress=False,
              extras={"more": ExtraBatches(extra[:, :, :4])})


def test_extra_batches_cycle_through_every_image_once_per_pass():
    from stealguard.training import ExtraBatches

    images = torch.arange(7, dtype=torch.float32).view(7, 1, 1, 1) / 255  # image i holds i
    stream = ExtraBatches(images, batch_size=3).stream(99, torch.Generator().manual_seed(0),
                                                       torch.device("cpu"))
    first_pass = torch.cat([next(stream) for _ in range(2)]).flatten() * 255
    assert len(set(first_pass.round().tolist())) == 6  # two batches of 3, no repeats
    assert len(next(stream)) == 3  # the seventh image's tail batch is dropped, a new pass


def test_on_epoch_hook_sees_every_epoch_and_can_stop_training() -> None:
    images, labels = quadrant_images(64, seed=0)
    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    seen: list[int] = []
    log = train(model, images, labels, config=TrainConfig(epochs=5, batch_size=32, lr=0.05),
                progress=False, on_epoch=lambda epoch, m: seen.append(epoch) or epoch == 2)
    assert seen == [1, 2] and len(log.epochs) == 2  # stopped after epoch 2, as asked
    assert log.samples_per_second == pytest.approx(64 * 2 / log.seconds)


def test_channels_last_trains_the_same_model_and_hands_it_back_contiguous():
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    x, y = quadrant_images(256, seed=1)
    models = {}
    for cl in (False, True):
        torch.manual_seed(0)
        models[cl] = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
        train(models[cl], x, y, config=cfg, progress=False, channels_last=cl)
    for name, p in models[True].state_dict().items():
        assert p.is_contiguous(), name  # saved as safetensors: must be the default layout
        assert torch.allclose(p, models[False].state_dict()[name], atol=1e-4), name
