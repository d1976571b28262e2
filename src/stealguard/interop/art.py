"""IBM's Adversarial Robustness Toolbox (ART) and stealguard, both ways.

Optional: `pip install 'stealguard[art]'` (adversarial-robustness-toolbox). Three bridges:

    from stealguard.interop.art import as_postprocessor, blackbox_classifier, victim_from_art

    # 1. a stealguard output defense as an ART postprocessor (for defenses that read only the
    #    probabilities: topk, rounding, reverse_sigmoid, none)
    pp = as_postprocessor("reverse_sigmoid", {"beta": 0.7, "gamma": 0.2})
    art_clf = PyTorchClassifier(..., postprocessing_defences=[pp])

    # 2. an ART classifier (PyTorchClassifier) as a stealguard victim
    victim = victim_from_art(art_clf)            # -> stealguard.wrap(...) under the hood

    # 3. a stealguard black box as the victim of ART's attacks (KnockoffNets ...): every query
    #    ART sends goes through `BlackBox.query`, so it is counted and budgeted like ours
    art_victim = blackbox_classifier(bb)
    KnockoffNets(art_victim, nb_stolen=1000).extract(x, thieved_classifier=thief)

ART's postprocessors see only the predictions (no images), so a defense that reads the query
(MAD's Jacobian, keyed noise, adaptive misinformation's OOD score) cannot be one; asking for it
raises ConfigError with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from stealguard.blackbox import BlackBox
from stealguard.defenses.base import Defense
from stealguard.defenses.builder import build_defense
from stealguard.errors import ConfigError


def _art() -> Any:
    try:
        import art  # noqa: F401
        from art.defences.postprocessor import Postprocessor
        from art.estimators.classification import BlackBoxClassifier
    except ImportError:
        raise ConfigError("ART is not installed: pip install 'stealguard[art]' "
                          "(adversarial-robustness-toolbox)") from None
    return Postprocessor, BlackBoxClassifier


def as_postprocessor(defense: str | Defense, params: Mapping[str, Any] | None = None) -> Any:
    """A stealguard defense that reads only the probabilities, as an ART `Postprocessor`."""
    postprocessor_cls, _ = _art()
    d = build_defense(defense, params) if isinstance(defense, str) else defense
    if d.reads_input:
        raise ConfigError(f"defense {type(d).__name__} reads the query images, and ART "
                          "postprocessors see only the predictions; use it through a stealguard "
                          "black box instead (blackbox_classifier)")

    class StealguardPostprocessor(postprocessor_cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(is_fitted=True, apply_fit=False, apply_predict=True)
            self.defense = d

        def __call__(self, preds: np.ndarray) -> np.ndarray:
            probs = torch.as_tensor(np.asarray(preds), dtype=torch.float32)  # (B, K)
            x = torch.zeros(probs.shape[0], 0)  # no images: the defense does not read them
            return self.defense(x, probs).numpy().astype(preds.dtype, copy=False)

        def fit(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> None:
            return None

    return StealguardPostprocessor()


def blackbox_classifier(bb: BlackBox, *, batch_size: int = 512) -> Any:
    """An ART `BlackBoxClassifier` whose every prediction is a query to `bb` (counted, budgeted).

    ART hands float arrays (B, C, H, W) in [0, 1]; the answers are what the black box returns
    (probabilities, top-k or one-hot labels). A batch past the budget raises
    QueryBudgetExceeded out of ART, with nothing of it answered.
    """
    _, blackbox_cls = _art()

    def predict(x: np.ndarray) -> np.ndarray:
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return torch.cat([bb.query(xb) for xb in xt.split(batch_size)]).numpy()

    return blackbox_cls(predict, tuple(bb.input_shape), int(bb.num_classes), clip_values=(0.0, 1.0))


def victim_from_art(classifier: Any, *, classes: list[str] | None = None) -> Any:
    """An ART `PyTorchClassifier` as a stealguard victim (a wrapped module, see `stealguard.wrap`).

    ART's `preprocessing=(mean, std)` becomes the victim's normalisation; the module must map
    normalised images to logits, as ART's PyTorchClassifier expects.
    """
    from stealguard.wrapped import wrap

    module = getattr(classifier, "model", None)
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"victim_from_art takes an ART PyTorchClassifier; "
                          f"{type(classifier).__name__} has no torch module")
    shape = tuple(int(d) for d in classifier.input_shape)
    if len(shape) != 3:
        raise ConfigError(f"the ART classifier's input_shape must be (C, H, W), got {shape}")
    mean, std = _art_normalisation(classifier, shape[0])
    return wrap(module, input_shape=shape, num_classes=int(classifier.nb_classes),  # type: ignore[arg-type]
                mean=mean, std=std, classes=classes)


def _art_normalisation(classifier: Any, channels: int) -> tuple[list[float] | None, ...]:
    pre = getattr(classifier, "preprocessing", None)
    mean, std = getattr(pre, "mean", None), getattr(pre, "std", None)
    if mean is None or std is None:
        return None, None

    def per_channel(v: Any) -> list[float]:
        arr = np.asarray(v, dtype=np.float64).reshape(-1)
        return [float(arr[0])] * channels if arr.size == 1 else arr.tolist()

    return per_channel(mean), per_channel(std)
