import pytest

from stealguard.attacks import ATTACKS, KnockoffNets
from stealguard.blackbox import LocalBlackBox
from stealguard.errors import ConfigError, UnknownNameError
from stealguard.metrics import clone_metrics
from stealguard.models import build_model
from stealguard.training import TrainConfig, accuracy
from synthetic import quadrant_dataset, quadrant_images, quadrant_victim


@pytest.fixture(scope="module")
def victim():
    return quadrant_victim()


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_knockoff_steals_and_counts_exactly(victim, labels):
    surrogate = quadrant_dataset(600, seed=5)  # attacker's own unlabelled images
    bb = LocalBlackBox(victim, budget=400)
    attack = KnockoffNets(surrogate, labels=labels, arch="conv3",
                          clone=TrainConfig(epochs=5, batch_size=32, lr=0.05), query_batch=64)
    result = attack(bb, 400)
    assert result.queries == bb.queries_used == 400
    assert result.transfer_x.shape == (400, 1, 8, 8) and result.transfer_y.shape == (400, 4)
    xt, yt = quadrant_images(256, seed=2)
    m = clone_metrics(result.clone, victim, xt, yt)
    assert m["clone_accuracy"] > 0.85 and m["agreement"] > 0.85
    assert m["normalized_accuracy"] == pytest.approx(m["clone_accuracy"] / accuracy(victim, xt, yt))


def test_budget_larger_than_surrogate_spends_only_what_exists(victim):
    bb = LocalBlackBox(victim, budget=1000)
    r = KnockoffNets(quadrant_dataset(50), clone=TrainConfig(epochs=1))(bb, 1000)
    assert r.queries == bb.queries_used == 50


def test_registry_and_bad_options():
    assert ATTACKS.get("knockoff") is KnockoffNets
    with pytest.raises(UnknownNameError, match="valid attack names: .*knockoff"):
        ATTACKS.get("knockon")
    with pytest.raises(ConfigError, match="valid: soft, hard"):
        KnockoffNets(quadrant_dataset(10), labels="fuzzy")
    with pytest.raises(ConfigError, match="budget must be >= 1"):
        KnockoffNets(quadrant_dataset(10))(LocalBlackBox(build_model(
            "conv3", in_channels=1, image_size=8, num_classes=4)), 0)
