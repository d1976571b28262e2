"""Every registered attack: budget exactness (contract), a tiny end-to-end steal, bad input."""

import pytest
import torch
from pydantic import ValidationError

from stealguard.attacks import (
    ATTACKS,
    Attack,
    AttackParams,
    attack_params_class,
    build_attack,
    validate_attack,
)
from stealguard.blackbox import LocalBlackBox
from stealguard.errors import ConfigError, InputError, UnknownNameError
from stealguard.models import build_model
from stealguard.training import TrainConfig, accuracy
from synthetic import quadrant_dataset, quadrant_images, quadrant_victim

FAST = TrainConfig(epochs=1, batch_size=32, lr=0.05)
ADAM = TrainConfig(epochs=6, batch_size=32, optimizer="adam", lr=3e-3, weight_decay=0.0,
                   schedule="constant")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def victim():
    return quadrant_victim()


@pytest.fixture(scope="module")
def test_set():
    return quadrant_images(256, seed=2)


def make(name: str, *, config: TrainConfig, seed_size: int = 20, rounds: int | None = 4,
         **options) -> Attack:
    """The attack `name` on the right kind of attacker data (seed set or surrogate; none
    for a data-free attack, whose clone trains online: tiny generator, no clone config)."""
    fields = attack_params_class(name).model_fields
    if data_free(name):
        return build_attack(name, None, {"batch": 8, "generator": {"ngf": 4, "nz": 8}})
    if "seed_size" in fields:  # the Jacobian family draws its seed set from in-distribution data
        return build_attack(name, quadrant_dataset(200, seed=6, split="train"),
                            {"seed_size": seed_size, "rounds": "budget" if rounds is None else rounds,
                             "clone": config, **options})
    return build_attack(name, quadrant_dataset(400, seed=5), {"clone": config, **options})


def data_free(name: str) -> bool:
    return getattr(ATTACKS.get(name), "data_free", False)


def test_registry_holds_every_attack_of_the_papers():
    assert set(ATTACKS.names()) >= {"knockoff", "adaptive_averaging", "jbda", "jbda_tr",
                                    "jb_self", "jb_top3"}
    with pytest.raises(UnknownNameError, match="valid attack names: .*jbda"):
        build_attack("jbdaa", quadrant_dataset(10))


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("budget", [37, 150])
def test_budget_never_exceeded_and_count_exact(victim, name, budget):
    bb = LocalBlackBox(victim, budget=1000)
    bb.query(quadrant_images(5, seed=9)[0])  # the box has served others: counts are deltas
    result = make(name, config=FAST, rounds=None)(bb, budget)
    assert result.queries == bb.queries_used - 5 <= budget
    if data_free(name):  # a sample of the queries it trained on (the rest are finite differences)
        assert result.transfer_x.shape[0] <= result.queries
    else:
        assert result.transfer_x.shape[0] * result.queries_per_row == result.queries
    assert result.transfer_y.shape == (result.transfer_x.shape[0], 4)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_budget_capped_by_what_the_black_box_has_left(victim, name):
    bb = LocalBlackBox(victim, budget=60)  # the attack is given more than the box allows
    options = ({} if name == "adaptive_averaging" or data_free(name)
               else {"nquery": 2, "nquery_mode": "each"})
    result = make(name, config=FAST, rounds=None, **options)(bb, 500)
    assert result.queries == bb.queries_used == 60  # every attack here can spend it all


@pytest.mark.parametrize("name", ATTACKS.names())
def test_tiny_steal_beats_a_random_clone(victim, test_set, name):
    if data_free(name):
        pytest.skip("300 queries are too few for a data-free attack; its tiny steal (6,000 "
                    "queries) is in test_attacks_datafree.py")
    xt, yt = test_set
    torch.manual_seed(0)
    random_clone = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    chance = accuracy(random_clone, xt, yt)
    config = TrainConfig(epochs=5, batch_size=32, lr=0.05) if name in (
        "knockoff", "adaptive_averaging") else ADAM
    budget = 1000 if name == "adaptive_averaging" else 300
    result = make(name, config=config)(LocalBlackBox(victim), budget)
    acc = accuracy(result.clone, xt, yt)
    assert acc > 0.8 and acc > chance + 0.3, (acc, chance)


# ---- bad input ---------------------------------------------------------------------------------


def test_budget_smaller_than_the_seed_set_is_refused(victim):
    attack = make("jbda", config=FAST, seed_size=50)
    with pytest.raises(ConfigError, match="budget 40 is smaller than the seed set: 50 seed"):
        attack(LocalBlackBox(victim), 40)
    attack = make("jb_top3", config=FAST, seed_size=20, nquery=3)
    with pytest.raises(ConfigError, match="20 seed images x nquery 3 = 60"):
        attack(LocalBlackBox(victim), 59)


def test_zero_rounds_is_refused():
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        make("jbda", config=FAST, rounds=0)


def test_seed_set_of_another_shape_is_refused(victim):
    rgb = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    for name in ("jbda", "jbda_tr", "jb_self", "jb_top3"):
        attack = ATTACKS.get(name)(rgb, clone=FAST)
        with pytest.raises(InputError, match=r"shape \(3, 8, 8\), the victim takes \(1, 8, 8\)"):
            attack(LocalBlackBox(victim), 100)
    big = quadrant_images(10, seed=0)[0].repeat_interleave(2, 2).repeat_interleave(2, 3)
    with pytest.raises(InputError, match=r"\(1, 16, 16\)"):
        ATTACKS.get("jbda")(big)(LocalBlackBox(victim), 100)
    bb = LocalBlackBox(victim)
    assert bb.queries_used == 0  # refused before a single query


@pytest.mark.parametrize("bad, match", [
    ({"nqury": 3}, "unknown parameter 'nqury'; valid parameters: labels"),
    ({"labels": "fuzzy"}, "unknown label mode 'fuzzy'; valid: soft, hard"),
    ({"arch": "conv9"}, "unknown clone architecture 'conv9'; valid: conv3"),
    ({"nquery": 0}, "nquery=0 is invalid .*greater than or equal to 1.*valid: answers per"),
    ({"query_aug": "mixup"}, "query_aug='mixup' is invalid .*'none', 'crop_flip' or 'affine_c"),
    ({"jitter": {"hue": 2}}, "jitter.hue=2 is invalid"),
])
def test_unknown_or_invalid_options_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        make("knockoff", config=FAST, **bad)
    with pytest.raises(ConfigError, match=match):
        make("jbda", config=FAST, **bad)


def test_bad_jacobian_settings_and_data_are_refused():
    seeds = quadrant_dataset(50)
    with pytest.raises(ConfigError, match="attack 'jbda': unknown parameter 'lambda'; valid "
                       "parameters: .*step"):
        build_attack("jbda", seeds, {"lambda": 0.1})
    with pytest.raises(ConfigError, match="preset='papernot' is invalid .*'edm' or 'mad'"):
        build_attack("jbda", seeds, {"preset": "papernot"})
    with pytest.raises(ConfigError, match="'knockoff': unknown parameter 'seed_size'"):
        build_attack("knockoff", seeds, {"seed_size": 10})
    with pytest.raises(ConfigError, match="seed_size 80 exceeds the 50 images"):
        build_attack("jbda", seeds, {"seed_size": 80})
    with pytest.raises(ConfigError, match="'adaptive_averaging': unknown parameter 'nquery'"):
        build_attack("adaptive_averaging", seeds, {"nquery": 2})
    with pytest.raises(ConfigError, match="'knockoff' needs the attacker's images"):
        build_attack("knockoff", None)
    with pytest.raises(InputError, match="'jbda' needs in-distribution seed images"):
        build_attack("jbda", None)
    with pytest.raises(ConfigError, match="give clone or round_config, not both"):
        build_attack("jbda", seeds, {"clone": FAST, "round_config": FAST})


# ---- the contract: every registered attack's Params ----------------------------------------


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_declares_frozen_strict_params_with_described_fields(name):
    params_cls = attack_params_class(name)
    assert issubclass(params_cls, AttackParams)
    defaults = params_cls()  # valid defaults
    with pytest.raises(ValidationError):
        defaults.labels = "hard"  # frozen
    with pytest.raises(ConfigError, match=f"attack {name!r}: unknown parameter 'bogus'; valid "
                       "parameters: labels, arch"):
        validate_attack(name, {"bogus": 1})
    undescribed = [f for f, info in params_cls.model_fields.items() if not info.description]
    assert not undescribed, f"{name}: fields without a description of their range"
    # strings, as they come from the command line or a spec, are converted by the Params
    typed = validate_attack(name, {"seed": "3", "labels": "hard"})
    assert (typed.seed, typed.labels) == (3, "hard")


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_builds_from_default_params_and_keeps_its_budget(victim, name):
    data = quadrant_dataset(30, seed=6, split="train")
    attack = (build_attack(name) if data_free(name) else  # all defaults: no data, online clone
              build_attack(name, data, {"clone": FAST}))  # defaults besides the clone's training
    assert isinstance(attack.params, attack_params_class(name))
    bb = LocalBlackBox(victim)
    result = attack(bb, 45)
    assert result.queries == bb.queries_used <= 45
