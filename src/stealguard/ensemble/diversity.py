"""Coherence (eq. 1), the diversity loss (eq. 2) and the EDM training loss (eq. 3).

Kariyappa, Prakash & Qureshi, "Protecting DNNs from Theft using an Ensemble of Diverse
Models", ICLR 2021, section 4.1. For the N members' probability vectors {y_i} on one input:

    CS(y_a, y_b)      = <y_a, y_b> / (|y_a| |y_b|)                      cosine similarity
    Coherence({y_i})  = max_{a != b}  CS(y_a, y_b)                      (eq. 1)
    DivLoss({y_i})    = log( sum_{1 <= a < b <= N} exp(CS(y_a, y_b)) )  (eq. 2)
    L = E_{(x, y) ~ D_in, x~ ~ D_out} [ 1/N sum_i CE(f_i(x), y)
                                        + lambda_D DivLoss({f_i(x~)}) ]         (eq. 3)

Probability vectors are non-negative, so CS lies in [0, 1] and DivLoss in
[log P, 1 + log P] with P = N (N - 1) / 2 pairs (for N = 2 the lower bound is the paper's 0).
Every function takes the members' outputs stacked on a leading axis, (N, B, K).

    probs = torch.softmax(stacked_logits, dim=-1)  # (N, B, K)
    coherence(probs)        # (B,)
    diversity_loss(probs)   # scalar, mean over the batch
"""

from __future__ import annotations

import torch
from torch import nn

from stealguard.errors import ConfigError, InputError


def _check_stack(probs: torch.Tensor) -> None:
    if probs.dim() != 3 or probs.shape[0] < 2:
        raise InputError(f"expected member outputs stacked as (N >= 2, B, K), got "
                         f"{tuple(probs.shape)}")


def pairwise_cosine(probs: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """(N, B, K) member probabilities -> (B, N, N) cosine similarities CS(y_a, y_b)."""
    _check_stack(probs)
    unit = probs / probs.norm(dim=-1, keepdim=True).clamp_min(eps)  # (N, B, K)
    return torch.einsum("abk,cbk->bac", unit, unit)  # (B, N, N)


def _upper_pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.triu_indices(n, n, offset=1, device=device)  # the P pairs a < b, (P,) each
    return a, b


def coherence(probs: torch.Tensor) -> torch.Tensor:
    """Eq. 1: max over member pairs a != b of CS(y_a, y_b). (N, B, K) -> (B,)."""
    cs = pairwise_cosine(probs)  # (B, N, N), symmetric
    a, b = _upper_pairs(probs.shape[0], probs.device)
    return cs[:, a, b].amax(dim=1)  # (B, P) -> (B,)


def diversity_loss(probs: torch.Tensor) -> torch.Tensor:
    """Eq. 2, the LogSumExp smoothing of eq. 1, averaged over the batch. (N, B, K) -> ()."""
    cs = pairwise_cosine(probs)  # (B, N, N)
    a, b = _upper_pairs(probs.shape[0], probs.device)
    return torch.logsumexp(cs[:, a, b], dim=1).mean()  # (B, P) -> (B,) -> ()


def edm_loss(
    logits_in: torch.Tensor, labels: torch.Tensor, logits_out: torch.Tensor | None, *,
    lambda_d: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 3 for one step. Returns (loss, mean member cross-entropy, diversity loss).

    logits_in: (N, B, K) members on in-distribution images, labels: (B,) int64;
    logits_out: (N, B', K) members on the same OOD images (None when lambda_d == 0: the
    paper's "regular ensemble", which then never looks at OOD data).
    """
    if lambda_d < 0:
        raise ConfigError(f"lambda_D must be >= 0, got {lambda_d}")
    n, b, k = logits_in.shape
    # mean over members of each member's mean CE == one CE over the (N * B) rows
    ce = nn.functional.cross_entropy(logits_in.reshape(n * b, k), labels.repeat(n))
    if logits_out is None or lambda_d == 0:
        return ce, ce.detach(), torch.zeros((), device=ce.device)
    div = diversity_loss(torch.softmax(logits_out.float(), dim=-1))
    return ce + lambda_d * div, ce.detach(), div.detach()


def coherence_cdf(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical CDF of coherence values over a query set (the paper's Figure 5).

    values: (Q,) -> (sorted values (Q,), F(values) = fraction <= each value, (Q,)).
    """
    v = values.detach().flatten().float().sort().values
    q = v.numel()
    return v, torch.arange(1, q + 1, dtype=torch.float32) / max(q, 1)
