"""Per-sample Gram matrices of the log-likelihood Jacobian G that MAD needs.

Orekondy, Schiele & Fritz, "Prediction Poisoning: Towards Defenses Against DNN Model Stealing
Attacks", ICLR 2020, eq. 5:  G = ∇_w log F(x; w)  (K x D), one per query x.

MAD's objective (eq. 4) only ever touches G through G^T ỹ with ỹ a (K,) vector, and
    <G^T a, G^T b> = a^T (G G^T) b,
so the K x K Gram M = G G^T per sample is all it needs, never the D-wide rows. This module
computes M (B, K, K) for a batch, three ways:

- `last_layer`: G over the last linear layer's weight W (K x D_h) only (the authors' released
  code, `w_idx = -2`). With h the penultimate features and p = softmax(W h + b),
      ∂ log p_k / ∂W = (e_k - p) h^T,
  hence   M_kj = <(e_k - p) h^T, (e_j - p) h^T>_F = (e_k - p)·(e_j - p) ||h||^2
              = (δ_kj - p_k - p_j + ||p||^2) ||h||^2.
  One forward pass, no backward pass at all. (Adding the bias b multiplies M by
  (||h||^2 + 1) / ||h||^2, a positive per-sample factor that leaves MAD's choice unchanged.)
- `full`: G over every parameter (the paper's text). log p_k = z_k - logsumexp(z), so
      G = P J,  P = I - 1 p^T,  J = ∂z/∂w (the logits' Jacobian),
      M = P (J J^T) P^T,
  and J J^T (the per-sample empirical NTK) is a sum over parameter tensors. For each Conv2d /
  Linear / BatchNorm layer we take its input a and the gradients g_k of the K logits w.r.t.
  its output (one forward, one backward with the K cotangents batched), and contract
  per layer without ever holding the D-wide G: the per-sample weight gradient of a layer is
  Σ_t g_{k,t} a_t^T over positions t, and its Gram is either formed from the materialised
  per-sample gradients (cheap when the layer has many positions) or as
  Σ_{t,s} (g_{k,t}·g_{j,s}) (a_t·a_s) ("ghost" Gram, cheap when it has few).
- `logit_gram_functorch`: the same J J^T with torch.func (vmap of jacrev over
  functional_call), for networks with other parameterised layers; generic, memory hungry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap


def last_layer_gram(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form Gram over the last linear layer's weight. Returns (M (B, K, K), p (B, K)).

    `model` must have `forward_features(x) -> (B, D)` and `classifier: nn.Linear`.
    """
    h = model.forward_features(x)  # type: ignore[operator]  # (B, D)
    p = torch.softmax(model.classifier(h), dim=1)  # type: ignore[operator]  # (B, K)
    k = p.shape[1]
    eye = torch.eye(k, dtype=p.dtype, device=p.device)  # (K, K)
    pp = (p * p).sum(1)[:, None, None]  # (B, 1, 1) ||p||^2
    c = eye - p[:, :, None] - p[:, None, :] + pp  # (B, K, K) (e_k - p)·(e_j - p)
    return c * (h * h).sum(1)[:, None, None].to(p.dtype), p


def log_likelihood_gram(ntk: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """M = P N P^T with P = I - 1 p^T: the Gram of ∇ log p from the logits' Gram N (B, K, K)."""
    np_ = ntk @ p[:, :, None]  # (B, K, 1)  N p
    pnp = (p[:, None, :] @ np_)  # (B, 1, 1)  p^T N p
    return ntk - np_ - np_.transpose(1, 2) + pnp  # (B, K, K)


# ---------------------------------------------------------------------------------- full


def _outer_gram(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Gram over k of the per-sample weight gradients W_bk = Σ_t g[k, b, :, t] a[b, :, t]^T.

    g: (K, b, O, T) output gradients, a: (b, I, T) inputs -> (b, K, K).
    Picks whichever of the two exact contractions costs fewer multiply-adds.
    """
    k, b, o, t = g.shape
    i = a.shape[1]
    cost_materialise = k * o * i * t + k * k * o * i
    cost_ghost = (k * t) ** 2 * o + t * t * i + k * k * t * t
    if cost_materialise <= cost_ghost:
        w = torch.einsum("kbot,bit->bkoi", g, a).reshape(b, k, o * i)  # (b, K, O*I)
        return w @ w.transpose(1, 2)  # (b, K, K)
    aa = a.transpose(1, 2) @ a  # (b, T, T)   a_t·a_s
    gt = g.permute(1, 0, 3, 2).reshape(b, k * t, o)  # (b, K*T, O)
    gg = (gt @ gt.transpose(1, 2)).view(b, k, t, k, t)  # (b, K, T, K, T)  g_kt·g_js
    return torch.einsum("bktjs,bts->bkj", gg, aa)


def _vec_gram(v: torch.Tensor) -> torch.Tensor:
    """(K, b, P) per-sample gradients of a small parameter -> (b, K, K)."""
    v = v.transpose(0, 1)  # (b, K, P)
    return v @ v.transpose(1, 2)


def _unfold(a: torch.Tensor, m: nn.Conv2d, out_hw: tuple[int, int]) -> torch.Tensor:
    """im2col by kh*kw strided slices (several times faster than F.unfold on CPU).

    a: (b, C, H, W) -> (b, C*kh*kw, H'*W'), the layout of F.unfold.
    """
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ph, pw = m.padding if isinstance(m.padding, tuple) else (0, 0)  # "valid" is 0
    ho, wo = out_hw
    ap = nn.functional.pad(a, (pw, pw, ph, ph))
    cols = a.new_empty(a.shape[0], a.shape[1], kh, kw, ho, wo)  # (b, C, kh, kw, H', W')
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = ap[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                                  j * dw:j * dw + sw * (wo - 1) + 1:sw]
    return cols.view(a.shape[0], -1, ho * wo)


def _conv_gram(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a: (b, C_in, H, W) input, g: (K, b, C_out, H', W') -> (b, K, K) for weight and bias."""
    k, b = g.shape[:2]
    cols = _unfold(a, m, (g.shape[-2], g.shape[-1]))  # (b, C_in*kh*kw, T)
    gt = g.reshape(k, b, m.out_channels, -1)  # (K, b, C_out, T)
    groups = m.groups
    cin, cout = cols.shape[1] // groups, m.out_channels // groups
    out = _outer_gram(gt[:, :, :cout], cols[:, :cin])
    for j in range(1, groups):  # grouped conv: each group's weights see their own channels
        out = out + _outer_gram(gt[:, :, j * cout:(j + 1) * cout], cols[:, j * cin:(j + 1) * cin])
    if m.bias is not None:
        out = out + _vec_gram(gt.sum(3))
    return out


def _linear_gram(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a: (b, *, D_in), g: (K, b, *, D_out) -> (b, K, K)."""
    k, b = g.shape[:2]
    at = a.reshape(b, -1, m.in_features).transpose(1, 2)  # (b, D_in, T)
    gt = g.reshape(k, b, -1, m.out_features).transpose(2, 3)  # (K, b, D_out, T)
    out = _outer_gram(gt, at)
    if m.bias is not None:
        out = out + _vec_gram(gt.sum(3))
    return out


def _batchnorm_gram(m: nn.BatchNorm2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Eval-mode BN, y = γ x̂ + β with running statistics: ∂y/∂γ_c = x̂_c, ∂y/∂β_c = 1."""
    k, b, c = g.shape[:3]
    assert m.running_mean is not None and m.running_var is not None
    xhat = (a - m.running_mean[:, None, None]) * torch.rsqrt(m.running_var + m.eps)[:, None, None]
    gt = g.reshape(k, b, c, -1)  # (K, b, C, T)
    return _vec_gram((gt * xhat.reshape(1, b, c, -1)).sum(3)) + _vec_gram(gt.sum(3))


LayerGram = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
LAYER_GRAMS: dict[type[nn.Module], LayerGram] = {
    nn.Conv2d: _conv_gram,  # type: ignore[dict-item]
    nn.Linear: _linear_gram,  # type: ignore[dict-item]
    nn.BatchNorm2d: _batchnorm_gram,  # type: ignore[dict-item]
}


def supports_layerwise(model: nn.Module) -> bool:
    """True when every parameter sits in a layer `logit_gram_layerwise` knows exactly."""
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if type(m) not in LAYER_GRAMS:
            return False
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            return False
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is None:
            return False
    return True


def logit_gram_layerwise(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-sample J J^T over all parameters. Returns (N (B, K, K), logits (B, K)).

    `model` must be in eval mode (BatchNorm on running statistics), so that samples do not
    interact and the gradient of the batch's logit sum is each sample's own gradient.
    Falls back to torch.func when a layer is called twice (shared weights).
    """
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (layer, input, output)

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        calls.append((module, args[0].detach(), out))
        return out.clone()  # a following in-place ReLU must not overwrite the tensor we keep

    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))  # (B, K)
            if len({id(m) for m, _, _ in calls}) != len(calls):
                return logit_gram_functorch(model, x)
            k = logits.shape[1]
            cot = torch.eye(k, dtype=logits.dtype, device=logits.device)[:, None, :]
            cot = cot.expand(k, *logits.shape)  # (K, B, K): cotangent e_k on every sample
            grads = torch.autograd.grad(logits, [o for _, _, o in calls], cot,
                                        is_grads_batched=True)  # each (K, B, *out)
    finally:
        for h in handles:
            h.remove()
    ntk = sum(LAYER_GRAMS[type(m)](m, a, g) for (m, a, _), g in zip(calls, grads))
    return ntk, logits.detach()  # type: ignore[return-value]



def logit_gram_functorch(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """J J^T (B, K, K) via torch.func per-sample Jacobians; any differentiable `model`."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def logits_one(ps: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (ps, buffers), (xi[None],))[0]  # (K,)

    jac = vmap(jacrev(logits_one), in_dims=(None, 0))(params, x)  # name -> (B, K, *shape)
    ntk = sum(j.flatten(2) @ j.flatten(2).transpose(1, 2) for j in jac.values())
    with torch.no_grad():
        logits = model(x)
    return ntk, logits  # type: ignore[return-value]


def full_gram(model: nn.Module, x: torch.Tensor, *, chunk_size: int = 32
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram of ∇_w log p over all parameters. Returns (M (B, K, K), p (B, K)), in chunks."""
    fn = logit_gram_layerwise if supports_layerwise(model) else logit_gram_functorch
    ms, ps = [], []
    for xc in x.split(chunk_size):
        ntk, logits = fn(model, xc)
        p = torch.softmax(logits, dim=1)
        ms.append(log_likelihood_gram(ntk.detach(), p))
        ps.append(p)
    return torch.cat(ms), torch.cat(ps)
