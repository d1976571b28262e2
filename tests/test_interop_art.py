"""ART interop, both directions: our defenses inside ART, ART's KnockoffNets against our black box,
an ART PyTorchClassifier as our victim. Skipped where ART is not installed (`stealguard[art]`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.synthetic import quadrant_images
from torch import nn

from stealguard.blackbox import LocalBlackBox
from stealguard.defenses import build_defense
from stealguard.errors import ConfigError, QueryBudgetExceeded
from stealguard.models import build_model

pytest.importorskip("art")
from art.attacks.extraction import KnockoffNets
from art.estimators.classification import PyTorchClassifier

from stealguard.interop.art import (
    as_postprocessor,
    blackbox_classifier,
    victim_from_art,
)


def _victim() -> nn.Module:
    torch.manual_seed(0)
    return build_model("conv3", in_channels=1, image_size=8, num_classes=4).eval()


def _thief() -> PyTorchClassifier:
    torch.manual_seed(1)
    model = build_model("conv3", in_channels=1, image_size=8, num_classes=4)
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(),
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                             input_shape=(1, 8, 8), nb_classes=4, clip_values=(0.0, 1.0))


def test_output_defense_as_art_postprocessor_matches_ours() -> None:
    probs = torch.softmax(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) * 3, 1)
    ours = build_defense("reverse_sigmoid", {"beta": 0.7, "gamma": 0.2})
    pp = as_postprocessor("reverse_sigmoid", {"beta": 0.7, "gamma": 0.2})
    out = pp(probs.numpy())
    expected = ours(torch.zeros(16, 1, 8, 8), probs).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    top1 = as_postprocessor("topk", {"k": 1})(probs.numpy())
    assert (top1.argmax(1) == probs.numpy().argmax(1)).all() and set(np.unique(top1)) <= {0.0, 1.0}


def test_a_defense_that_reads_the_images_is_refused_as_postprocessor() -> None:
    with pytest.raises(ConfigError, match="reads the query images"):
        as_postprocessor(build_defense("random_noise", {"epsilon": 0.1}))


def test_art_knockoff_against_our_blackbox_is_counted_and_budgeted() -> None:
    x, _ = quadrant_images(400, seed=3)
    xf = x.float().div(255).numpy()
    bb = LocalBlackBox(_victim(), budget=300, output="probs")
    attack = KnockoffNets(blackbox_classifier(bb, batch_size=64), batch_size_fit=64,
                          batch_size_query=50, nb_epochs=1, nb_stolen=250,
                          sampling_strategy="random", verbose=False)
    thief = attack.extract(xf, thieved_classifier=_thief())
    assert bb.queries_used == 250  # every query ART sent went through our black box
    assert thief.predict(xf[:8]).shape == (8, 4)
    over = KnockoffNets(blackbox_classifier(bb, batch_size=100), batch_size_fit=64,
                        batch_size_query=100, nb_epochs=1, nb_stolen=100,
                        sampling_strategy="random", verbose=False)
    with pytest.raises(QueryBudgetExceeded):  # 250 + 100 > 300: refused, nothing answered
        over.extract(xf, thieved_classifier=_thief())
    assert bb.queries_used == 250


def test_art_classifier_as_our_victim() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    clf = PyTorchClassifier(model=net, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8),
                            nb_classes=4, clip_values=(0.0, 1.0), preprocessing=(0.5, 0.25))
    victim = victim_from_art(clf)
    x, _ = quadrant_images(32, seed=4)
    xf = x.float().div(255)
    bb = LocalBlackBox(victim, budget=32)
    ours = bb.query(xf).numpy()
    art_probs = torch.softmax(torch.as_tensor(clf.predict(xf.numpy())), 1).numpy()
    np.testing.assert_allclose(ours, art_probs, atol=1e-5)
