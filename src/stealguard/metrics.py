"""Clone metrics the papers report, computed by the model owner on the victim's test set.

    clone accuracy       acc(C) on the test set
    normalised accuracy  acc(C) / acc(V)        (the papers' "0.52x")
    agreement            P[argmax C(x) == argmax V(x)] over the test set

The victim here is the undefended model (or the defended predictor, as the caller passes);
these evaluations are the owner's and are not counted as queries.
"""

from __future__ import annotations

import torch
from torch import nn

from stealguard.blackbox import predict_proba
from stealguard.training import predict, resolve_device, to_float_images


@torch.no_grad()
def predicted_labels(model: nn.Module, images: torch.Tensor, *, device: str | torch.device | None
                     = "cpu", batch_size: int = 1024) -> torch.Tensor:
    """argmax labels (N,), using `predict_proba` so ensembles answer as they are deployed."""
    dev = resolve_device(device)
    model.to(dev).eval()
    outs = [predict_proba(model, to_float_images(xb.to(dev))).argmax(1).cpu()
            for xb in images.split(batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, dtype=torch.long)


def clone_metrics(
    clone: nn.Module, victim: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
    device: str | torch.device | None = "cpu", victim_accuracy: float | None = None,
) -> dict[str, float]:
    """{clone_accuracy, victim_accuracy, normalized_accuracy, agreement} in [0, 1] (normalised
    may exceed 1)."""
    c_pred = predict(clone, images, device=device).argmax(1)
    v_pred = predicted_labels(victim, images, device=device)
    clone_acc = float((c_pred == labels).float().mean())
    v_acc = victim_accuracy if victim_accuracy is not None else float((v_pred == labels).float().mean())
    return {
        "clone_accuracy": clone_acc,
        "victim_accuracy": v_acc,
        "normalized_accuracy": clone_acc / v_acc if v_acc > 0 else float("nan"),
        "agreement": float((c_pred == v_pred).float().mean()),
    }
