"""Bring your own model, in Python: `wrap` makes any differentiable nn.Module a victim.

    net = MyNet()                                   # (B, C, H, W) -> (B, K) logits
    model = stealguard.wrap(net, input_shape=(1, 28, 28), num_classes=10,
                            mean=[0.1307], std=[0.3081], last_layer="fc")
    LocalBlackBox(model, defense=build_defense("mad", {"epsilon": 0.5}, victim=model))
    create_app(model, defense=...)                  # the HTTP service
    steal(Victim(model, "mnist", model.classes, acc), attack="knockoff", ...)

The wrapped model takes pixels in [0, 1], (B, C, H, W); it normalises them with (mean, std)
when given (else the module gets the pixels as they are) and returns the module's logits
(B, K). It is checked when it is made: one probe forward pass on random images must give
(B, num_classes) finite logits, else a ConfigError says what to fix.

What the defenses get from it:
- MAD with the full Jacobian (the paper's text) on any architecture: its surrogate F is a
  randomly re-initialised copy of the module (`random_copy`: every submodule with
  `reset_parameters`, seeded), as the paper's "randomly initialised network of the victim's
  architecture". Parameters of layers without `reset_parameters` keep the victim's values.
- MAD's last-layer form when the final layer is known: `last_layer="fc"` (the name of the
  module's final nn.Linear, whose output must be the logits), or a module that exposes
  `forward_features(x)` and a linear `classifier` itself. Without either, last-layer MAD is
  refused with that reason.
- Attacks train a clone of a registered architecture (default `conv3`, with a warning;
  choose with options={"arch": ...}): the module's own class is not in the model registry.
  To train EDM members of your own architecture, register its factory with
  `stealguard.register_model` and use its name like any other.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stealguard.errors import ConfigError
from stealguard.models import Normalize

PROBE_BATCH = 2
SEED_OFFSET = 0x4D4144  # as MAD's surrogates: the copy's seed is apart from the victim's


class WrappedModel(nn.Module):
    """A user's module as a stealguard model: pixels in [0, 1] (B, C, H, W) -> logits (B, K)."""

    arch: str | None = None  # not a registered architecture

    def __init__(
        self, module: nn.Module, *, input_shape: Sequence[int], num_classes: int,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        c, h, w = _shape(input_shape)
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std (one value per channel), or neither")
        self.module = module
        self.input_shape: tuple[int, int, int] = (c, h, w)
        self.in_channels, self.image_size = c, h  # as a Classifier has them
        self.num_classes = int(num_classes)
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v is not None and len(v) != c:
                raise ConfigError(f"{name} has {len(v)} values; the input has {c} channels")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be > 0 per channel, got {self.std}")
        self.normalize = Normalize(self.mean or [0.0] * c, self.std or [1.0] * c)
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        if len(self.classes) != num_classes:
            raise ConfigError(f"{len(self.classes)} class names for {num_classes} classes")
        self.name = type(module).__name__

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> what the module takes (normalised when mean/std were given)."""
        return self.normalize(x) if self.mean is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.prepare(x))  # (B, K)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x).float(), dim=1)

    def random_copy(self, seed: int = 0) -> WrappedModel:
        """A copy with freshly initialised weights (MAD's surrogate of this architecture),
        eval mode, no gradients on its weights; the caller's random stream is left alone."""
        twin = copy.deepcopy(self)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED_OFFSET + seed)
            for m in twin.module.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
        return twin.eval().requires_grad_(False)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes})")


class WrappedModelWithHead(WrappedModel):
    """A wrapped module whose final linear layer is known: forward_features(x) (B, D) and
    `classifier` (nn.Linear D -> K), for MAD's last-layer form."""

    def __init__(self, module: nn.Module, *, last_layer: str | None, **kw: Any) -> None:
        super().__init__(module, **kw)
        self.last_layer = last_layer  # None: the module's own forward_features/classifier

    @property
    def classifier(self) -> nn.Linear:
        if self.last_layer is None:
            return self.module.classifier  # type: ignore[return-value]
        return self.module.get_submodule(self.last_layer)  # type: ignore[return-value]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): the input of the final linear layer."""
        if self.last_layer is None:
            return self.module.forward_features(self.prepare(x))  # type: ignore[operator]
        seen: list[torch.Tensor] = []
        handle = self.classifier.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            self.module(self.prepare(x))
        finally:
            handle.remove()
        return seen[-1].flatten(1)


def wrap(
    module: nn.Module, *, input_shape: Sequence[int], num_classes: int,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None, last_layer: str | None = None,
) -> WrappedModel:
    """Any differentiable nn.Module mapping images to logits, as a victim usable everywhere.

    input_shape: (C, H, W) of one image; pixels in [0, 1] go in.
    num_classes: K, the size of the module's output.
    mean, std: per-channel normalisation applied before the module (None: none).
    classes: K class names (default "0".."K-1").
    last_layer: the name of the module's final nn.Linear (as in named_modules()), for MAD's
        last-layer form; a module with forward_features and a linear `classifier` has one.
    Raises ConfigError when the module rejects the input shape, gives another output shape
    than (B, num_classes), or the last layer is not the final linear layer.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"wrap expects a torch.nn.Module, got {type(module).__name__}")
    kw: dict[str, Any] = {"input_shape": input_shape, "num_classes": num_classes,
                          "mean": mean, "std": std, "classes": classes}
    if last_layer is not None:
        layer = dict(module.named_modules()).get(last_layer)
        if not isinstance(layer, nn.Linear):
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            found = "no such submodule" if layer is None else f"a {type(layer).__name__}"
            raise ConfigError(f"last_layer={last_layer!r} must name the module's final "
                              f"nn.Linear, got {found}; its linear layers: {linears or 'none'}")
        model: WrappedModel = WrappedModelWithHead(module, last_layer=last_layer, **kw)
    elif callable(getattr(module, "forward_features", None)) and isinstance(
            getattr(module, "classifier", None), nn.Linear):
        model = WrappedModelWithHead(module, last_layer=None, **kw)
    else:
        model = WrappedModel(module, **kw)
    probe(model)
    return model.eval()


@torch.no_grad()
def probe(model: WrappedModel) -> None:
    """One forward pass on random images: the shapes the user gave must be the module's."""
    c, h, w = model.input_shape
    x = torch.rand(PROBE_BATCH, c, h, w, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    except Exception as e:  # whatever the module raises: say which shape it refused
        raise ConfigError(f"the module rejects input of shape (B, {c}, {h}, {w}) "
                          f"({type(e).__name__}: {e}); give the input_shape (C, H, W) it "
                          f"takes") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the module returns a {type(out).__name__}; it must return a "
                          f"(B, num_classes) tensor of logits")
    if tuple(out.shape) != (PROBE_BATCH, model.num_classes):
        raise ConfigError(f"the module maps ({PROBE_BATCH}, {c}, {h}, {w}) images to output of "
                          f"shape {tuple(out.shape)}; expected ({PROBE_BATCH}, "
                          f"{model.num_classes}): num_classes must be the size of its output")
    if not torch.isfinite(out).all():
        raise ConfigError("the module gives NaN or infinite logits on random images in [0, 1]")
    if isinstance(model, WrappedModelWithHead):
        with torch.no_grad():
            head = model.classifier(model.forward_features(x))
        if tuple(head.shape) != tuple(out.shape) or not torch.allclose(head, out, rtol=1e-4,
                                                                        atol=1e-5):
            where = model.last_layer or "classifier"
            raise ConfigError(f"the module's logits are not {where}(features): {where!r} "
                              f"must be its final layer, applied last (for MAD's last-layer "
                              f"form); name the final nn.Linear, or leave last_layer unset")


def _shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    dims = tuple(input_shape)
    if len(dims) != 3 or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ConfigError(f"input_shape must be (C, H, W), three positive ints, got "
                          f"{input_shape!r}")
    return dims  # type: ignore[return-value]
