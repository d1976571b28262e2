"""What a defense costs the defender: accuracy with the defense on, and how far it moves answers.

The utility measures of Orekondy et al., "Prediction Poisoning", ICLR 2020, sec. 3 ("Defense
objectives"): Acc(F_V^δ, D_test), the accuracy of the defended model, and the perturbation
dist(ỹ, y) (L1, L2, KL(y ‖ ỹ); mean and standard deviation over the test set, as the
authors' logs report them), plus the fraction of answers whose top class changed.

    defense_metrics(victim, build_defense("mad", {"epsilon": 0.5}, victim=victim),
                    test_images, test_labels)
    # {"accuracy": 0.981, "accuracy_undefended": 0.989, "l1_mean": 0.49, ...}
"""

from __future__ import annotations

import torch
from torch import nn

from stealguard.defenses.base import Defense
from stealguard.defenses.distances import DISTANCES
from stealguard.errors import InputError
from stealguard.victim import predict_proba


def defense_metrics(
    model: nn.Module, defense: Defense, images: torch.Tensor, labels: torch.Tensor, *,
    batch_size: int = 256, device: str | torch.device | None = "cpu", progress: bool = False,
) -> dict[str, float]:
    """Accuracy with and without `defense`, perturbation statistics, argmax changes.

    images: (N, C, H, W) uint8 or float in [0, 1]; labels: (N,). KL is +inf for rows where
    the defense zeroes a class the model gave mass to (top-k, rounding).
    """
    from tqdm.auto import tqdm

    from stealguard.training import resolve_device, to_float_images

    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise InputError(f"need N > 0 images and N labels, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    dists: dict[str, list[torch.Tensor]] = {name: [] for name in ("l1", "l2", "kl")}
    correct, correct_plain, changed = 0, 0, 0
    bar = tqdm(total=int(labels.shape[0]), desc="defended evaluation", unit="img",
               disable=not progress, leave=False)
    for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
        x = to_float_images(xb.to(dev))
        with torch.no_grad():
            y = predict_proba(model, x).double()  # (b, K)
        y_tilde = defense(x, y.float()).double()  # (b, K)
        for name, values in dists.items():
            values.append(DISTANCES.get(name)(y, y_tilde).cpu())
        yb = yb.to(dev)
        correct += int((y_tilde.argmax(1) == yb).sum())
        correct_plain += int((y.argmax(1) == yb).sum())
        changed += int((y_tilde.argmax(1) != y.argmax(1)).sum())
        bar.update(int(yb.shape[0]))
    bar.close()
    n = int(labels.shape[0])
    out: dict[str, float] = {"n": n, "accuracy": correct / n,
                             "accuracy_undefended": correct_plain / n,
                             "argmax_changed": changed / n}
    for name, values in dists.items():
        v = torch.cat(values)
        out[f"{name}_mean"] = float(v.mean())
        out[f"{name}_std"] = float(v.std(unbiased=False))
    return out
