"""train_edm end to end on tiny data, the auxiliary-set split, and refusals of bad options."""

import pytest
import torch

from stealguard import pipeline as sg_pipeline
from stealguard.data import ImageDataset
from stealguard.ensemble import (
    EDMPredictor,
    aux_sets,
    load_edm_victim,
    public_info,
    read_edm_manifest,
    save_edm_victim,
    split_halves,
    train_edm,
)
from stealguard.ensemble import pipeline as edm_pipeline
from stealguard.errors import ConfigError, DatasetNotFoundError
from stealguard.pipeline import steal_knockoff
from stealguard.training import TrainConfig
from synthetic import quadrant_dataset


def _glyphs(n: int, size: int = 8) -> ImageDataset:
    """An auxiliary labelled set that, like KMNIST here, has only a test split."""
    g = torch.Generator().manual_seed(9)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.rand(n, 1, size, size, generator=g) * 0.3
    images[torch.arange(n), 0, labels * 2, :] += 0.7  # class k: a bright row 2k
    return ImageDataset("glyphs", "test", (images.clamp(0, 1) * 255).to(torch.uint8), labels,
                        ["r0", "r2", "r4", "r6"], (0.3,), (0.3,))


def _fake_load(name: str, split: str, data_root=None) -> ImageDataset:
    if name == "quadrants":
        return quadrant_dataset(384 if split == "train" else 128, seed=0 if split == "train" else 1,
                                split=split)
    if name == "glyphs":
        if split == "train":
            raise DatasetNotFoundError("glyphs train split: not in this copy")
        return _glyphs(256)
    if name == "glyphs16":
        return _glyphs(64, size=16)
    raise AssertionError(name)


@pytest.fixture(autouse=True)
def tiny_datasets(monkeypatch):
    monkeypatch.setattr(edm_pipeline, "load_dataset", _fake_load)
    # the attacker's surrogate: glyph images (the attack uses the train split)
    monkeypatch.setattr(sg_pipeline, "load_dataset", lambda name, split, data_root=None: (
        _glyphs(256) if name == "glyphs" else _fake_load(name, split)))


def test_split_halves_are_disjoint_and_seeded():
    ds = _glyphs(101)
    a, b = split_halves(ds, seed=3)
    assert (len(a), len(b)) == (50, 51)
    rows = lambda d: {tuple(img.flatten().tolist()) for img in d.images}
    assert not rows(a) & rows(b) and len(rows(a) | rows(b)) == len(rows(ds))
    again, _ = split_halves(ds, seed=3)
    assert torch.equal(a.images, again.images)
    assert not torch.equal(split_halves(ds, seed=4)[0].images, a.images)


def test_same_dataset_for_ood_and_hash_task_is_split():
    hash_set, ood_set = aux_sets("glyphs", "glyphs", input_shape=(1, 8, 8))
    assert (len(hash_set), len(ood_set)) == (128, 128)  # test split (no train), two halves
    assert hash_set.split == "test[half0]" and ood_set.split == "test[half1]"
    with pytest.raises(ConfigError, match=r"OOD set 'glyphs16' has images \(1, 16, 16\), the "
                                          r"victim takes \(1, 8, 8\)"):
        aux_sets("glyphs16", "glyphs", input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="hash task 'glyphs16'"):
        aux_sets("glyphs", "glyphs16", input_shape=(1, 8, 8))


def test_bad_options_are_refused_before_training():
    cfg = TrainConfig(epochs=1)
    with pytest.raises(ConfigError, match="N >= 2 members, got 1"):
        train_edm("quadrants", "conv3", cfg, members=1)
    with pytest.raises(ConfigError, match="lambda_D must be >= 0, got -1"):
        train_edm("quadrants", "conv3", cfg, lambda_d=-1)
    with pytest.raises(ConfigError, match="m \\(sub-classes\\) must be >= 1"):
        train_edm("quadrants", "conv3", cfg, subclasses=0)
    with pytest.raises(ConfigError, match="OOD set 'glyphs16'"):
        train_edm("quadrants", "conv3", cfg, ood="glyphs16", hash_task="glyphs")
    with pytest.raises(ConfigError, match="M = 10 does not match the hash task 'glyphs', which "
                                          "has 4 classes"):
        train_edm("quadrants", "conv3", cfg, hash_classes=10, ood="glyphs", hash_task="glyphs")


def test_train_edm_end_to_end(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05)
    victim = train_edm("quadrants", "conv3", cfg, members=3, lambda_d=0.5, ood="glyphs",
                       hash_task="glyphs", ood_batch_size=16, hash_arch="conv3",
                       hash_config=TrainConfig(epochs=3, batch_size=32, lr=0.05),
                       progress=False)
    edm = victim.model
    assert isinstance(edm, EDMPredictor) and edm.n_members == 3
    assert victim.test_accuracy > 0.9 and victim.hash_accuracy > 0.5
    assert victim.hash_task == "glyphs/test[half0]" and victim.log["ood_images"] == 128
    # EDM behind the black box, attacked like any victim (the clone is built as `edm.arch`)
    result = steal_knockoff(victim, surrogate="glyphs", budget=64, labels="soft",
                            config=TrainConfig(epochs=1, batch_size=32), progress=False)
    assert result["queries"] == result["blackbox_count"] == 64
    path = save_edm_victim(victim, tmp_path / "edm")
    again = load_edm_victim(path)
    x = torch.rand(16, 1, 8, 8)
    assert torch.allclose(again.model.predict_proba(x), edm.predict_proba(x))
    assert (again.hash_task, again.lambda_d, again.ood) == ("glyphs/test[half0]", 0.5, "glyphs")
    info = public_info(read_edm_manifest(path))
    assert info["metrics"]["test_accuracy"] == victim.test_accuracy
    assert "half0" not in str(info) and "hash" not in str(info)
    assert "glyphs/test" not in repr(victim) and "hash_accuracy" not in repr(victim)
