import threading

import pytest
import torch

from stealguard.blackbox import LocalBlackBox, format_output
from stealguard.errors import ConfigError, InputError, QueryBudgetExceeded
from stealguard.models import build_model


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model("conv3", in_channels=1, image_size=8, num_classes=4)


def test_budget_is_exact_and_refused_batch_answers_nothing(model):
    bb = LocalBlackBox(model, budget=10)
    x = torch.rand(4, 1, 8, 8)
    assert bb.query(x).shape == (4, 4)
    assert bb.query(x).shape == (4, 4)
    assert bb.queries_used == 8 and bb.remaining == 2
    with pytest.raises(QueryBudgetExceeded, match="batch of 4 .* budget 10 .*2 left"):
        bb.query(x)
    assert bb.queries_used == 8  # the refused batch was not counted
    assert bb.query(x[:2]).shape == (2, 4)  # exactly up to the budget
    assert bb.queries_used == 10
    with pytest.raises(QueryBudgetExceeded):
        bb.query(x[:1])


def test_concurrent_queries_never_overshoot(model):
    bb = LocalBlackBox(model, budget=50)
    answered = []

    def worker():
        for _ in range(10):
            try:
                answered.append(bb.query(torch.rand(3, 1, 8, 8)).shape[0])
            except QueryBudgetExceeded:
                pass

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(answered) == bb.queries_used <= 50
    assert bb.queries_used == 48  # 16 batches of 3 fit, the 17th would cross


def test_answers_are_probabilities(model):
    y = LocalBlackBox(model).query(torch.rand(5, 1, 8, 8))
    assert torch.allclose(y.sum(1), torch.ones(5), atol=1e-5)
    assert (y >= 0).all()


@pytest.mark.parametrize(
    "x, msg",
    [
        (torch.rand(2, 3, 8, 8), r"shape \(B, 1, 8, 8\).*got shape \(2, 3, 8, 8\)"),
        (torch.rand(1, 8, 8), r"got shape \(1, 8, 8\)"),
        (torch.ones(2, 1, 8, 8, dtype=torch.int64), "dtype torch.int64"),
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.full((2, 1, 8, 8), 3.0), r"values in \[3, 3\]"),
        ([[0.0]], "got list"),
    ],
)
def test_bad_images_are_refused_with_expected_shape(model, x, msg):
    bb = LocalBlackBox(model, budget=100)
    with pytest.raises(InputError, match=msg):
        bb.query(x)
    assert bb.queries_used == 0


def test_uint8_pixels_equal_float_pixels(model):
    bb = LocalBlackBox(model)
    x8 = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    assert torch.allclose(bb.query(x8), bb.query(x8.float() / 255))


def test_output_modes():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert torch.equal(format_output(p, "label"), torch.tensor([[0.0, 1, 0], [1, 0, 0]]))
    top2 = format_output(p, "topk", k=2)
    assert torch.allclose(top2, torch.tensor([[0, 0.6 / 0.9, 0.3 / 0.9], [0.5 / 0.8, 0, 0.3 / 0.8]]))
    assert torch.equal(format_output(p, "probs"), p)
    with pytest.raises(ConfigError, match="valid: probs, topk, label"):
        format_output(p, "logits")


def test_label_mode_through_blackbox(model):
    y = LocalBlackBox(model, output="label").query(torch.rand(6, 1, 8, 8))
    assert ((y == 0) | (y == 1)).all() and torch.equal(y.sum(1), torch.ones(6))
