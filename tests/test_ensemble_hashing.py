"""EDM hashes (sec. 4.2.1, App. A.2) and the predictor that routes each query by one."""

import hashlib

import pytest
import torch
from torch import nn

from stealguard.blackbox import LocalBlackBox, predict_proba
from stealguard.defenses import Compose, Defense
from stealguard.defenses.builder import build_defense
from stealguard.ensemble import (
    HASHES,
    DCTHash,
    DNNHash,
    EDMPredictor,
    SHA1Hash,
    random_perturbation,
    sorted_index_histogram,
)
from stealguard.ensemble.hashing import _dct_matrix, dct_bits
from stealguard.errors import ConfigError, InputError
from stealguard.models import Classifier, build_model
from stealguard.training import TrainConfig, train
from synthetic import quadrant_images


class TableNet(nn.Module):
    """A stand-in f_H: image b (its pixel [0, 0, 0] * 255 is a row number) -> logits row."""

    arch, input_shape = "table", (1, 8, 8)

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.table = probs.log()  # (R, M): softmax gives back the probabilities
        self.num_classes = probs.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[(x[:, 0, 0, 0] * 255).round().long()]


def _rows(n: int) -> torch.Tensor:
    x = torch.zeros(n, 1, 8, 8)
    x[:, 0, 0, 0] = torch.arange(n) / 255
    return x


def test_dnn_hash_by_hand():
    # M = 4, m = 2: H = 2 * argmax + floor((4 * max - 1) / 3 * 2), clamped to m - 1 = 1
    probs = torch.tensor([
        [0.70, 0.10, 0.10, 0.10],  # c 0, (2.8 - 1) / 3 * 2 = 1.2 -> 1, H = 1
        [0.10, 0.30, 0.10, 0.50],  # c 3, (2.0 - 1) / 3 * 2 = 0.67 -> 0, H = 6
        [0.25, 0.25, 0.25, 0.25],  # c 0 (first maximum), 0 -> H = 0
        [1e-9, 1e-9, 1.0, 1e-9],   # c 2, (4 - 1) / 3 * 2 = 2 -> clamped to 1, H = 5
        [0.05, 0.55, 0.35, 0.05],  # c 1, (2.2 - 1) / 3 * 2 = 0.8 -> 0, H = 2
    ])
    h = DNNHash(TableNet(probs), subclasses=2)  # type: ignore[arg-type]
    x = _rows(5)
    assert h.value(x).tolist() == [1, 6, 0, 5, 2]
    assert h.index(x, members=3).tolist() == [1, 0, 0, 2, 2]  # H mod N
    one_sub = DNNHash(TableNet(probs), subclasses=1)  # type: ignore[arg-type]
    assert one_sub.value(x).tolist() == [0, 3, 0, 2, 1]  # m = 1: H is the argmax


def test_dnn_hash_parameters_must_match_the_network():
    net = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    with pytest.raises(ConfigError, match="M = 5 does not match the hash network, which has 4"):
        DNNHash(net, num_classes=5)
    with pytest.raises(ConfigError, match=r"m \(sub-classes\) must be >= 1, got 0"):
        DNNHash(net, subclasses=0)
    with pytest.raises(ConfigError, match="N >= 2 members, got 1"):
        DNNHash(net).index(torch.rand(2, 1, 8, 8), members=1)
    assert HASHES.names() == ["dct", "dnn", "sha1"]


def test_dct_hash_matches_zauner_definition():
    d = _dct_matrix(32, torch.device("cpu"))
    assert torch.allclose(d @ d.T, torch.eye(32, dtype=torch.float64), atol=1e-10)
    x, _ = quadrant_images(6, seed=3)
    xf = x.float() / 255
    bits = dct_bits(xf)
    assert bits.shape == (6, 64) and bits.sum(1).tolist() == [32] * 6  # median split: 32 / 32
    dct = DCTHash()
    values = dct.value(xf)
    for b in range(6):  # value: the bits, most significant first; index: unsigned value mod N
        unsigned = int("".join("1" if v else "0" for v in bits[b].tolist()), 2)
        assert values[b].item() == (unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned)
        assert dct.index(xf[b:b + 1], members=7).item() == unsigned % 7


def test_sha1_hash_is_sha1_of_the_pixels():
    x, _ = quadrant_images(4, seed=4)
    idx = SHA1Hash().index(x.float() / 255, members=5)
    for b in range(4):
        digest = hashlib.sha1(x[b].numpy().tobytes()).digest()
        assert idx[b].item() == int.from_bytes(digest, "big") % 5


def test_perceptual_hashes_are_more_invariant_than_sha1():
    """App. A.2: the sorted index histogram over random perturbations of each image."""
    x, _ = quadrant_images(8, seed=5)
    hist = {name: sorted_index_histogram(HASHES.get(name)(), x, members=5, perturbations=64,
                                         strength=0.02).mean(0) for name in ("dct", "sha1")}
    for h in hist.values():
        assert h.shape == (5,) and h.sum().item() == pytest.approx(1.0)
        assert (h[:-1] >= h[1:]).all()  # sorted, most frequent member first
    # even faint perturbations (+-0.3 deg, +-0.002 brightness) change every SHA-1 hash, so
    # its indices spread evenly; the DCT bits mostly survive them
    assert hist["sha1"][0] < 0.3
    assert hist["dct"][0] > hist["sha1"][0] + 0.15


def test_random_perturbation_is_seeded_and_in_range():
    x = torch.rand(4, 1, 8, 8)
    a = random_perturbation(x, generator=torch.Generator().manual_seed(0))
    b = random_perturbation(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    same = random_perturbation(x, generator=torch.Generator().manual_seed(1), strength=0.0)
    assert torch.allclose(same, x, atol=1e-5)


@pytest.fixture(scope="module")
def hash_net() -> Classifier:
    # an untrained f_H answers one class for nearly everything: train it on the quadrant task
    x, y = quadrant_images(256, seed=11)
    torch.manual_seed(0)
    net = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    train(net, x, y, config=TrainConfig(epochs=2, batch_size=32, lr=0.05), progress=False)
    return net


def _edm(hash_net: Classifier, n: int = 3) -> EDMPredictor:
    torch.manual_seed(0)
    members = [build_model("conv3", in_channels=1, image_size=8, num_classes=4)
               for _ in range(n)]
    return EDMPredictor(members, hash_fn=DNNHash(hash_net, subclasses=2))


def _queries(n: int) -> torch.Tensor:
    return quadrant_images(n, seed=12)[0].float() / 255


def test_routing_is_a_pure_function_of_the_image(hash_net):
    edm = _edm(hash_net)
    x = _queries(64)
    idx = edm.member_index(x)
    assert idx.min() >= 0 and idx.max() < 3 and idx.unique().numel() == 3
    one_by_one = torch.cat([edm.member_index(x[b:b + 1]) for b in range(64)])
    shuffled = torch.randperm(64)
    assert torch.equal(idx, one_by_one)
    assert torch.equal(edm.member_index(x[shuffled]), idx[shuffled])
    assert torch.equal(edm.member_index(x.clone()), idx)  # same image, same member


def test_grouped_batch_equals_one_by_one_answers(hash_net):
    edm = _edm(hash_net)
    x = _queries(48)
    idx = edm.member_index(x)
    with torch.no_grad():
        batched = edm.predict_proba(x)  # (48, 4)
        single = torch.cat([edm.predict_proba(x[b:b + 1]) for b in range(48)])
        chosen = torch.stack([torch.softmax(edm.members[int(i)](x[b:b + 1])[0], 0)
                              for b, i in enumerate(idx)])
        assert torch.allclose(batched, single, atol=1e-6)
        assert torch.allclose(batched, chosen, atol=1e-6)
        assert torch.allclose(edm(x).exp(), batched, atol=1e-6)  # forward: log-probabilities
        assert edm.member_probs(x).shape == (3, 48, 4)


def test_edm_behind_the_black_box_and_before_a_defense(hash_net):
    class Record(Defense):
        def __call__(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
            self.seen = probs.clone()
            return torch.full_like(probs, 1 / probs.shape[1])

    edm, record = _edm(hash_net), Record()
    bb = LocalBlackBox(edm, defense=Compose([record]), budget=40)
    x = _queries(32)
    out = bb.query(x)
    assert bb.queries_used == 32 and out.shape == (32, 4)
    assert torch.allclose(record.seen, predict_proba(edm, x), atol=1e-6)  # EDM, then defense
    assert torch.allclose(out, torch.full((32, 4), 0.25))
    plain = LocalBlackBox(edm, output="label").query(x[:5])
    assert torch.equal(plain.argmax(1), edm.predict_proba(x[:5]).argmax(1))


def test_edm_then_mad(hash_net):
    """App. A.3: EDM routes in the model, MAD perturbs the routed answer after it."""
    edm = _edm(hash_net)
    mad = build_defense("mad", {"epsilon": 0.5, "jacobian": "last_layer"}, victim=edm)
    x = _queries(16)
    out = LocalBlackBox(edm, defense=mad).query(x)
    plain = edm.predict_proba(x)
    assert out.shape == (16, 4) and torch.allclose(out.sum(1), torch.ones(16), atol=1e-5)
    assert (out >= 0).all() and (out - plain).abs().sum(1).max() <= 0.5 + 1e-4
    assert not torch.allclose(out, plain, atol=1e-3)


def test_predictor_refuses_bad_input():
    members = [build_model("conv3", in_channels=1, image_size=8, num_classes=4) for _ in range(2)]
    hash8 = DNNHash(build_model("conv3", in_channels=1, image_size=8, num_classes=10))
    with pytest.raises(ConfigError, match="N >= 2 members, got 1"):
        EDMPredictor(members[:1], hash_fn=hash8)
    hash16 = DNNHash(build_model("conv3", in_channels=1, image_size=16, num_classes=10))
    with pytest.raises(ConfigError, match=r"hash network takes \(1, 16, 16\)"):
        EDMPredictor(members, hash_fn=hash16)
    with pytest.raises(InputError, match=r"EDM expects float images \(B, 1, 8, 8\)"):
        EDMPredictor(members, hash_fn=hash8).predict_proba(torch.rand(2, 1, 16, 16))


def test_the_hash_is_not_in_public_info_or_repr(hash_net):
    edm = _edm(hash_net)
    public = f"{edm.info()} {edm!r}"
    assert edm.info() == {"defense": "edm", "members": 3, "arch": "conv3",
                          "input_shape": [1, 8, 8], "num_classes": 4}
    assert "secret" in repr(edm) and "hash_fn" not in public and "subclasses" not in public
    assert edm.arch == "conv3"  # attacks build their clone from this name
