"""Pieces shared by the architecture modules: argument checks and weight initialisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from stealguard.errors import ConfigError


class _NHWCMaxPool(torch.autograd.Function):
    """Max-pool forward in channels-last, backward in the caller's NCHW layout."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kernel: list[int], stride: list[int],
                padding: list[int], dilation: list[int], ceil_mode: bool) -> torch.Tensor:
        y, idx = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), kernel, stride, padding, dilation,
            ceil_mode)
        idx = idx.contiguous()
        ctx.save_for_backward(x, idx)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        ctx.mark_non_differentiable(idx)
        return y.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, idx = ctx.saved_tensors
        gx = torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.args,
                                                             idx)
        return gx, None, None, None, None, None


class MaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d` that pools a CPU batch in channels-last (NHWC) layout.

    On this project's CPU (torch 2.13, oneDNN 3.12) max-pooling an NCHW batch is 7x slower
    than pooling it in NHWC (16.8 ms against 2.4 ms for a (128, 32, 28, 28) batch), and it was
    about half of a conv3 clone's forward time; but NHWC's backward is slower than NCHW's. So
    the forward pools in NHWC (with its argmax indices) and the backward scatters the gradient
    with NCHW's kernel and those indices. A max is exact and both kernels pick the same
    (first) position on ties, so values and gradients are bit-identical to `nn.MaxPool2d`'s
    (tested in tests/test_models.py) and training is unchanged to the last bit while a step
    gets cheaper (`benchmarks/bench_training.py`). A batch already in channels-last (a model
    trained with `channels_last=True`), other devices, and torch.func transforms (vmap,
    jacrev: MAD's full Jacobian) take the plain path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch._C._functorch.maybe_current_level() is not None  # first: vmap cannot
                or x.device.type != "cpu" or x.dim() != 4 or self.return_indices  # answer
                or x.is_contiguous(memory_format=torch.channels_last)):  # is_contiguous(NHWC)
            return super().forward(x)
        kernel = list(_pair(self.kernel_size))
        stride = list(_pair(self.stride if self.stride is not None else self.kernel_size))
        args = (kernel, stride, list(_pair(self.padding)), list(_pair(self.dilation)),
                bool(self.ceil_mode))
        out: torch.Tensor = _NHWCMaxPool.apply(x, *args)
        return out


def with_torch_pools(model: nn.Module) -> nn.Module:
    """`model` with each of our MaxPool2d replaced in place by torch's own `nn.MaxPool2d`
    (same arguments): the reference our pooling is compared with (tests, benchmarks)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, MaxPool2d):
                setattr(parent, name, nn.MaxPool2d(child.kernel_size, child.stride,
                                                   child.padding, child.dilation,
                                                   ceil_mode=child.ceil_mode))
    return model


def check_spec(
    arch: str, *, in_channels: int, image_size: int, num_classes: int, min_size: int = 1,
) -> None:
    """Raise ConfigError unless the factory arguments describe a buildable network."""
    if in_channels < 1:
        raise ConfigError(f"{arch}: in_channels must be >= 1, got {in_channels}")
    if num_classes < 1:
        raise ConfigError(f"{arch}: num_classes must be >= 1, got {num_classes}")
    if image_size < min_size:
        raise ConfigError(
            f"{arch}: image_size must be >= {min_size} for this architecture, got {image_size}"
        )


def init_weights(net: nn.Module) -> None:
    """Standard init: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0.

    Linear layers keep PyTorch's default weights; every bias starts at 0.
    """
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
