"""Contract tests for every registered model architecture (timm style: one walk over names)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from stealguard.errors import ConfigError, UnknownNameError
from stealguard.models import MODELS, build_model

PAPER_ARCHS = {"conv3", "lenet", "wrn16_4", "wrn22_4", "resnet20", "resnet32", "resnet18",
               "resnet34", "vgg16_bn"}
INPUTS = [(1, 28), (3, 32)]  # (in_channels, image_size): MNIST family, CIFAR
NUM_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_architectures_are_registered() -> None:
    assert PAPER_ARCHS <= set(MODELS.names())


@pytest.mark.parametrize("in_channels,image_size", INPUTS)
@pytest.mark.parametrize("arch", MODELS.names())
def test_model_contract(arch: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, in_channels=in_channels, image_size=image_size,
                        num_classes=NUM_CLASSES)
    x = torch.rand(2, in_channels, image_size, image_size)  # pixels in [0, 1]
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.out_features == NUM_CLASSES

    model.eval()
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        via_head = model.classifier(feats)
    assert logits.shape == (2, NUM_CLASSES)
    assert feats.shape == (2, model.classifier.in_features)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    torch.testing.assert_close(via_head, logits, rtol=1e-5, atol=1e-5)

    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.classifier.weight.grad is not None
    assert model.classifier.weight.grad.abs().sum() > 0


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown model 'resnet9000'") as info:
        build_model("resnet9000", in_channels=3, image_size=32, num_classes=10)
    for name in MODELS.names():
        assert name in str(info.value)


# Reference sizes for 3x32x32 inputs and 10 classes, from the architectures' papers
# (He et al. 2016 Table 6; Zagoruyko & Komodakis 2016 Table 4) or the usual CIFAR variants.
@pytest.mark.parametrize("arch,expected", [
    ("wrn16_4", 2.7e6), ("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet18", 11.2e6),
    ("lenet", 0.083e6),
])
def test_parameter_counts(arch: str, expected: float) -> None:
    model = build_model(arch, in_channels=3, image_size=32, num_classes=10)
    assert 0.85 * expected <= n_params(model) <= 1.15 * expected


def test_max_pools_are_skipped_when_the_image_is_too_small() -> None:
    # VGG-16 has five pools; 28 -> 14 -> 7 -> 3 -> 1 leaves no room for the fifth.
    model = build_model("vgg16_bn", in_channels=1, image_size=28, num_classes=10).eval()
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4


def test_conv3_maze_has_the_authors_layers() -> None:
    """conv3_maze is the EDM authors' conv3 for MNIST (MAZE code, conv3_mnist.py): no padding,
    two pools, 2048 -> 256 -> 10. Its parameter count follows from those layers alone:
    conv 1*32*9+32, 32*64*9+64, 64*128*9+128, fc 2048*256+256, 256*10+10."""
    model = build_model("conv3_maze", in_channels=1, image_size=28, num_classes=10)
    assert n_params(model) == 320 + 18_496 + 73_856 + 524_544 + 2_570
    assert model.classifier.in_features == 256
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(0, 0)] * 3


@pytest.mark.parametrize("arch", ["conv3", "lenet", "conv3_maze"])
def test_too_small_images_are_rejected(arch: str) -> None:
    with pytest.raises(ConfigError, match="image_size must be >="):
        build_model(arch, in_channels=1, image_size=4, num_classes=10)


@pytest.mark.parametrize("kernel,stride,padding,ceil_mode", [(2, None, 0, False), (3, 2, 1, True)])
def test_cpu_max_pool_is_bit_identical_to_torch(kernel: int, stride: int | None, padding: int,
                                                ceil_mode: bool) -> None:
    """Our MaxPool2d pools in NHWC on a CPU: values and gradients equal nn.MaxPool2d's,
    ties included (ReLU zeros make whole windows tie)."""
    from stealguard.models.layers import MaxPool2d
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 5, 13, 13)).requires_grad_()
    ours = MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    ref = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    y, y_ref = ours(x), ref(x)
    assert y.is_contiguous() and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(gx, gx_ref)
    # under torch.func (MAD's full Jacobian) it takes torch's own path and still agrees
    jac = torch.func.jacrev(lambda t: ours(t).sum(dim=(2, 3)))(x[:1].detach())
    jac_ref = torch.func.jacrev(lambda t: ref(t).sum(dim=(2, 3)))(x[:1].detach())
    assert torch.equal(jac, jac_ref)
    # and under vmap (the CUDA form of EDM's members runs the pool inside one)
    batched = torch.func.vmap(ours)(x.detach().unsqueeze(0).expand(2, -1, -1, -1, -1))
    assert torch.equal(batched[1], y_ref.detach())


def test_training_with_our_max_pool_matches_torch_to_the_bit() -> None:
    from stealguard.models.layers import MaxPool2d, with_torch_pools
    torch.manual_seed(0)
    ours = build_model("conv3", in_channels=1, image_size=28, num_classes=10)
    ref = with_torch_pools(build_model("conv3", in_channels=1, image_size=28, num_classes=10))
    ref.load_state_dict(ours.state_dict())
    assert not any(isinstance(m, MaxPool2d) for m in ref.modules())
    for model in (ours, ref):
        gen = torch.Generator().manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            x = torch.rand(16, 1, 28, 28, generator=gen)
            y = torch.randint(0, 10, (16,), generator=gen)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
