"""reverse_sigmoid gives IBM ART's numbers (stored in a fixture made with ART 1.20.1 by
tests/fixtures/make_art_reverse_sigmoid.py; ART itself is not needed here); random_noise
follows the authors' unclamped inverse sigmoid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stealguard.defenses import build_defense

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "art_reverse_sigmoid.json").read_text())
PROBS = torch.tensor(FIXTURE["probs"], dtype=torch.float64)  # (N, 10)
X = torch.zeros(PROBS.shape[0], 1, 28, 28)


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"beta{c['beta']}-gamma{c['gamma']}")
def test_reverse_sigmoid_matches_art(case):
    d = build_defense("reverse_sigmoid", {"beta": case["beta"], "gamma": case["gamma"]})
    ours = d(X, PROBS)
    art = torch.tensor(case["output"], dtype=torch.float64)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, art, rtol=0, atol=1e-12)


def test_the_fixture_is_sensitive_to_the_clamp():
    """With the old 1e-6 clamp the answers differ from ART's by far more than the tolerance,
    so the test above can fail."""
    worst = 0.0
    for case in FIXTURE["cases"]:
        y = PROBS.clamp(1e-6, 1 - 1e-6)
        r = case["beta"] * (torch.sigmoid(case["gamma"] * torch.logit(y)) - 0.5)
        old = (PROBS - r).clamp_min(0)
        old = old / old.sum(1, keepdim=True)
        art = torch.tensor(case["output"], dtype=torch.float64)
        worst = max(worst, float((old - art).abs().max()))
    assert worst > 1e-3


def test_random_noise_uses_the_unclamped_inverse_sigmoid():
    d = build_defense("random_noise", {"epsilon": 0.5, "dist": "l1"})
    y = torch.tensor([[1e-9, 1e-3, 1 - 1e-3 - 1e-9], [0.0, 0.0, 1.0]], dtype=torch.float64)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    delta = d.noise(x, 3)  # (2, 3) the logit noise, inside the L1 ball
    s = torch.sigmoid(torch.logit(y) + delta)  # the authors' formula, no clamp
    torch.testing.assert_close(d(x, y), s / s.sum(1, keepdim=True), rtol=0, atol=1e-15)
    assert d(x, y)[1].tolist() == [0.0, 0.0, 1.0]  # exact 0 / 1 stay exact, no NaN
