"""EDM eqs. 1-3 against hand-computed values, and the joint (vmapped) training."""

import copy
import math

import pytest
import torch

from stealguard.ensemble import (
    StackedMembers,
    coherence,
    coherence_cdf,
    diversity_loss,
    edm_loss,
    pairwise_cosine,
    train_ensemble,
)
from stealguard.errors import ConfigError, InputError
from stealguard.models import build_model
from stealguard.training import TrainConfig, train
from synthetic import quadrant_images


def _three_members() -> torch.Tensor:
    # one input, K = 2: y1 = [1, 0], y2 = [0, 1], y3 = [0.6, 0.8] (all unit norm)
    return torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.8]]])  # (N=3, B=1, K=2)


def test_coherence_is_the_largest_pairwise_cosine():
    probs = _three_members()
    cs = pairwise_cosine(probs)[0]
    assert torch.allclose(cs, torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.8], [0.6, 0.8, 1.0]]))
    assert coherence(probs).tolist() == pytest.approx([0.8])  # CS(y2, y3), not the diagonal


def test_diversity_loss_by_hand():
    expected = math.log(math.exp(0.0) + math.exp(0.6) + math.exp(0.8))  # pairs (1,2) (1,3) (2,3)
    assert diversity_loss(_three_members()).item() == pytest.approx(expected, rel=1e-6)
    # cosine ignores scale: un-normalised probability vectors give the same value
    scaled = torch.tensor([[[0.5, 0.0]], [[0.0, 0.25]], [[0.3, 0.4]]])
    assert diversity_loss(scaled).item() == pytest.approx(expected, rel=1e-6)


def test_diversity_loss_bounds_and_batch_mean():
    same = torch.full((4, 1, 3), 1 / 3)  # identical members: every CS = 1, P = 6 pairs
    assert coherence(same).item() == pytest.approx(1.0)
    assert diversity_loss(same).item() == pytest.approx(1 + math.log(6), rel=1e-6)
    two = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # N = 2, orthogonal: the paper's 0
    assert diversity_loss(two).item() == pytest.approx(0.0, abs=1e-7)
    batch = torch.cat([same[:2], torch.eye(3)[:2].view(2, 1, 3)], dim=1)  # (2, 2, 3)
    assert coherence(batch).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert diversity_loss(batch).item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)


def test_edm_loss_is_eq3():
    torch.manual_seed(0)
    logits_in, logits_out = torch.randn(3, 5, 4), torch.randn(3, 6, 4)
    y = torch.randint(0, 4, (5,))
    ce = sum(torch.nn.functional.cross_entropy(logits_in[i], y) for i in range(3)) / 3
    div = diversity_loss(torch.softmax(logits_out, -1))
    loss, ce_part, div_part = edm_loss(logits_in, y, logits_out, lambda_d=0.7)
    assert loss.item() == pytest.approx((ce + 0.7 * div).item(), rel=1e-6)
    assert (ce_part.item(), div_part.item()) == pytest.approx((ce.item(), div.item()), rel=1e-6)
    regular, _, zero = edm_loss(logits_in, y, None, lambda_d=0.0)
    assert regular.item() == pytest.approx(ce.item(), rel=1e-6) and zero.item() == 0.0


def test_bad_shapes_and_lambda_are_refused():
    with pytest.raises(InputError, match=r"\(N >= 2, B, K\)"):
        coherence(torch.rand(1, 4, 3))
    with pytest.raises(ConfigError, match="lambda_D must be >= 0, got -0.1"):
        edm_loss(torch.randn(2, 3, 4), torch.zeros(3, dtype=torch.long), None, lambda_d=-0.1)


def test_coherence_cdf():
    v, f = coherence_cdf(torch.tensor([0.5, 0.1, 0.9, 0.5]))
    assert v.tolist() == pytest.approx([0.1, 0.5, 0.5, 0.9])
    assert f.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])


def _members(n: int, seed: int = 0, classes: int = 4):
    torch.manual_seed(seed)
    return [build_model("conv3", in_channels=1, image_size=8, num_classes=classes)
            for _ in range(n)]


def test_stacked_forward_equals_each_member():
    members = _members(3)
    x = torch.rand(6, 1, 8, 8)
    stack = StackedMembers(members)
    assert stack.shared_names == ["normalize.mean", "normalize.std"]  # passed once, unbatched
    stacked = stack(x)  # (3, 6, 4), one vmapped call
    assert stacked.shape == (3, 6, 4)
    for i, m in enumerate(members):
        assert torch.allclose(stacked[i], m(x), atol=1e-5)
    members[1].normalize.mean.fill_(0.1)  # members that normalise differently stay stacked
    stack = StackedMembers(members)
    assert (stack.shared_names, stack.buffer_names) == (["normalize.std"], ["normalize.mean"])
    assert torch.allclose(stack(x)[1], members[1](x), atol=1e-5)


def test_regular_ensemble_equals_independent_training():
    """lambda_D = 0: the joint step is exactly N separate SGD trainings (same batches)."""
    x, y = quadrant_images(192, seed=1)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    members = _members(2)
    alone = copy.deepcopy(members)
    for m in alone:
        train(m, x, y, config=cfg, progress=False)
    train_ensemble(members, x, y, None, lambda_d=0.0, config=cfg, progress=False)
    for joint, single in zip(members, alone):
        for pj, ps in zip(joint.parameters(), single.parameters()):
            assert torch.allclose(pj, ps, atol=1e-4)
    assert not torch.allclose(members[0].classifier.weight, members[1].classifier.weight)


def test_diversity_training_lowers_coherence_on_held_out_ood():
    x, y = quadrant_images(512, seed=1)
    g = torch.Generator().manual_seed(5)
    ood = (torch.rand(512, 1, 8, 8, generator=g) * 255).to(torch.uint8)  # noise: no quadrant
    held_out = torch.rand(256, 1, 8, 8, generator=g)  # fresh OOD images, never trained on
    xt, yt = quadrant_images(256, seed=2)
    cfg = TrainConfig(epochs=5, batch_size=32, lr=0.05)
    medians, accs = {}, {}
    for lam in (0.0, 1.0):
        members = _members(3)
        log = train_ensemble(members, x, y, ood, lambda_d=lam, config=cfg, progress=False)
        assert len(log.epochs) == 5 and log.samples_per_second > 0
        with torch.no_grad():
            probs = torch.stack([torch.softmax(m(held_out), -1) for m in members])
            medians[lam] = coherence(probs).median().item()
            accs[lam] = min((m(xt.float() / 255).argmax(1) == yt).float().mean().item()
                            for m in members)
    assert medians[0.0] > 0.9 and medians[1.0] < 0.3, medians  # the regular ensemble agrees
    assert accs[1.0] > 0.9 and accs[0.0] > 0.9, accs


def test_train_ensemble_refuses_bad_input():
    x, y = quadrant_images(16)
    cfg = TrainConfig(epochs=1)
    with pytest.raises(ConfigError, match="N >= 2 members, got 1"):
        train_ensemble(_members(1), x, y, x, lambda_d=1.0, config=cfg, progress=False)
    with pytest.raises(ConfigError, match="lambda_D must be >= 0"):
        train_ensemble(_members(2), x, y, x, lambda_d=-1.0, config=cfg, progress=False)
    wrong = torch.zeros(4, 1, 16, 16, dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"OOD images have shape \(1, 16, 16\).*\(1, 8, 8\)"):
        train_ensemble(_members(2), x, y, wrong, lambda_d=1.0, config=cfg, progress=False)
    with pytest.raises(ConfigError, match="needs an out-of-distribution"):
        train_ensemble(_members(2), x, y, None, lambda_d=1.0, config=cfg, progress=False)
    mixed = _members(1) + _members(1, classes=3)
    with pytest.raises(ConfigError, match="member 1 has num_classes 3"):
        train_ensemble(mixed, x, y, x, lambda_d=1.0, config=cfg, progress=False)


def test_member_list_and_vmapped_stack_train_the_same_ensemble():
    """The CPU form (members called one by one) and the CUDA form (one vmapped call) are
    the same computation: same batches, same OOD draws, same gradients up to rounding."""
    x, y = quadrant_images(160, seed=1)
    ood = (torch.rand(96, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 255).byte()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    trained = {}
    for batched in (True, False):
        members = _members(3)
        log = train_ensemble(members, x, y, ood, lambda_d=0.5, config=cfg, ood_batch_size=8,
                             progress=False, batched=batched)
        trained[batched] = (members, log.epochs[-1])
    for a, b in zip(trained[True][0], trained[False][0]):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.allclose(pa, pb, atol=1e-4)
    assert trained[True][1]["div"] == pytest.approx(trained[False][1]["div"], rel=1e-4)
