"""The defended predictor: the one place where an answer is computed.

    answer(x) = format_output(defense(x, predict_proba(x)), output, k)       (B, K)

`LocalBlackBox`, the HTTP service and a Ray Serve router all answer through a
`DefendedPredictor`, so a change to how a defense or an output mode is applied lands in all
three at once.

    dp = DefendedPredictor(victim, defense=build_defense("mad", {"epsilon": 0.5}, victim=victim),
                           output="topk", k=3)
    dp.predict_proba(x)        # (B, K) what the API returns
    dp.defended(x)             # (B, K) defended probabilities, before the output mode
    dp.format(probs, "label")  # an output mode applied to defended probabilities

The model runs under no_grad (not inference_mode: a defense after it, MAD, may need
autograd on its own surrogate); rows are processed `batch_size` at a time on `device`; the
answers come back as float32 on the CPU.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import nn

from stealguard.defenses.base import Defense, NoDefense
from stealguard.errors import ConfigError
from stealguard.victim import predict_proba

OutputMode = Literal["probs", "topk", "label"]
OUTPUT_MODES: tuple[str, ...] = get_args(OutputMode)


def check_output(mode: str) -> str:
    if mode not in OUTPUT_MODES:
        raise ConfigError(f"unknown output mode {mode!r}; valid: {', '.join(OUTPUT_MODES)}")
    return mode


def format_output(probs: torch.Tensor, mode: str, k: int = 1) -> torch.Tensor:
    """Turn (B, K) probabilities into what an API in `mode` returns, (B, K).

    topk keeps the k largest probabilities and renormalises them to sum to 1 (our choice:
    the papers' top-k baseline does not say; renormalising keeps every answer a distribution).
    label returns the one-hot argmax.
    """
    if mode == "probs":
        return probs
    if mode == "label":
        return nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
    if mode == "topk":
        vals, idx = probs.topk(min(k, probs.shape[1]), dim=1)  # (B, k)
        out = torch.zeros_like(probs).scatter_(1, idx, vals)
        return out / out.sum(1, keepdim=True).clamp_min(1e-12)
    raise ConfigError(f"unknown output mode {mode!r}; valid: {', '.join(OUTPUT_MODES)}")


class DefendedPredictor:
    """A predictor behind a defense and an output mode; itself a Predictor."""

    def __init__(
        self, model: Any, defense: Defense | None = None, *, output: str = "probs", k: int = 1,
        device: str | torch.device = "cpu", batch_size: int = 1024,
    ) -> None:
        for attr in ("input_shape", "num_classes"):
            if not hasattr(model, attr):
                raise ConfigError(f"a defended model needs `{attr}`; {type(model).__name__} has "
                                  f"none (bring a plain nn.Module in with stealguard.wrap)")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        if isinstance(model, nn.Module):
            model = model.to(self.device).eval()
        self.model = model
        self.defense = defense or NoDefense()
        self.output, self.k, self.batch_size = check_output(output), k, batch_size
        self.input_shape: tuple[int, int, int] = tuple(int(d) for d in model.input_shape)  # type: ignore[assignment]
        self.num_classes = int(model.num_classes)

    def apply(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The defense on the model's probabilities (B, K) for images x (B, C, H, W)."""
        with torch.no_grad():
            return self.defense(x, probs).float().cpu()

    def defended(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, K) defended probabilities, float32 on CPU."""
        outs = []
        for xb in x.split(self.batch_size):
            xb = xb.to(self.device, non_blocking=True)
            with torch.no_grad():
                probs = predict_proba(self.model, xb).float()  # (b, K)
            outs.append(self.apply(xb, probs))
        if not outs:
            return torch.zeros(0, self.num_classes)
        return torch.cat(outs)

    def format(self, probs: torch.Tensor, output: str | None = None,
               k: int | None = None) -> torch.Tensor:
        """An output mode (default: this predictor's) applied to defended probabilities."""
        return format_output(probs, output or self.output, self.k if k is None else k).float()

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K): what the API returns (defense, then the output mode)."""
        return self.format(self.defended(x))

    def __repr__(self) -> str:  # the defense's repr never shows its key
        return (f"DefendedPredictor({type(self.model).__name__}, {self.defense!r}, "
                f"output={self.output!r})")
