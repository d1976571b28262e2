"""The EDM predictor: each query is answered by one member, chosen by a secret hash.

Kariyappa et al., "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, section 4.2 (Fig. 4):

    index(x) = H(x) mod N,      y_out = f_index(x)

It is a model like any other (pixels in [0, 1] -> log-probabilities), so it goes behind
`LocalBlackBox` unchanged and output defenses compose after it (EDM then MAD, App. A.3):

    edm = EDMPredictor(members, hash_fn=DNNHash(hash_net))
    bb = LocalBlackBox(edm, defense=mad, budget=50_000)

A batch is grouped by member: member i runs once, on the rows routed to it, so a batch costs
one pass per member over its share plus the hash (App. A.4). The routing is a pure function
of each image: the same image gets the same member whatever batch it comes in.

The hash network and its task are secret. `info()` is the public description (members,
architecture, shapes) and `repr` hides the hash; nothing a query returns depends on the
hash except through the chosen member's answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stealguard.ensemble.hashing import DNNHash, ImageHash
from stealguard.ensemble.joint import check_members
from stealguard.errors import ConfigError, InputError
from stealguard.models import Classifier

Parts = list[tuple[int, torch.Tensor]]  # (member i, its rows (B_i,) int64) for one batch


class HashRouting:
    """Section 4.2's routing, written once: index(x) = H(x) mod N, each member its rows, the
    answers put back in the batch's order. `EDMPredictor` (members in this process) and the
    Ray Serve router (members are remote deployments) both route through it. With no hash
    (`hash_fn=None`, a single model served as one member) every row goes to member 0."""

    hash_fn: ImageHash | None
    input_shape: tuple[int, int, int]
    num_classes: int

    @property
    def n_members(self) -> int:
        raise NotImplementedError

    @torch.no_grad()
    def member_index(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B,) int64 member indices in [0, N)."""
        self._check(x)
        if self.hash_fn is None:
            return torch.zeros(x.shape[0], dtype=torch.int64)
        return self.hash_fn.index(x, members=self.n_members)

    def split(self, x: torch.Tensor) -> Parts:
        """The batch by member: [(i, rows)], one entry per member that gets any row."""
        idx = self.member_index(x)  # (B,)
        return [(i, (idx == i).nonzero().squeeze(1)) for i in idx.unique().tolist()]

    def merge(self, x: torch.Tensor, parts: Parts, answers: Sequence[torch.Tensor]
              ) -> torch.Tensor:
        """Row b of the result (B, K) is its member's answer (B_i, K) for x_b."""
        out = x.new_empty(x.shape[0], self.num_classes)
        for (_, rows), a in zip(parts, answers):
            out[rows] = a.to(out.dtype)
        return out

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            c, h, w = self.input_shape
            raise InputError(f"EDM expects float images (B, {c}, {h}, {w}) in [0, 1], got "
                             f"{tuple(x.shape)}")


class EDMPredictor(nn.Module, HashRouting):
    """N members + a hash; `predict_proba(x)` (B, K) answers, `forward(x)` their logs.

    Args:
        members: N >= 2 classifiers of one architecture, input shape and class count.
        hash_fn: the member selector; a `DNNHash` (the paper's, default in the pipeline),
            `DCTHash` or `SHA1Hash`. A DNN hash network must take the members' input shape.
    """

    def __init__(self, members: Sequence[Classifier], *, hash_fn: ImageHash) -> None:
        super().__init__()
        for i, m in enumerate(members):
            if not isinstance(m, Classifier):
                raise ConfigError(
                    f"EDM member {i} is a {type(m).__name__}; members must be models of a "
                    "registered architecture (EDM trains them jointly on eq. 3 and its bundle "
                    "rebuilds them by name): register yours with stealguard.register_model and "
                    "train EDM members of it (an ONNX model cannot be a member: onnxruntime "
                    "gives no gradients to train it)")
        check_members(members)
        self.members = nn.ModuleList(members)
        if isinstance(hash_fn, DNNHash) and hash_fn.input_shape != tuple(members[0].input_shape):
            raise ConfigError(f"the hash network takes {hash_fn.input_shape} images, the members "
                              f"take {tuple(members[0].input_shape)}")
        self.hash_fn = hash_fn  # an nn.Module hash (DNNHash) is a submodule: moves with .to()
        self.arch: str = members[0].arch  # the clone architecture attacks default to
        self.num_classes: int = int(members[0].num_classes)
        self.input_shape: tuple[int, int, int] = tuple(members[0].input_shape)  # type: ignore
        # as a Classifier has them, so a defense can build a model like the victim (MAD)
        self.in_channels, self.image_size = self.input_shape[0], self.input_shape[1]
        self.eval()

    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def normalize(self) -> nn.Module:
        """The members' input normalisation (public, as a classifier artifact's)."""
        return self.members[0].normalize  # type: ignore[return-value]

    def routed_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K): row b is member index(x_b)'s logits for x_b."""
        parts = self.split(x)  # one pass per member, over its share of the batch
        return self.merge(x, parts, [self.members[i](x[rows]) for i, rows in parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) log-probabilities of the routed members."""
        return torch.log_softmax(self.routed_logits(x).float(), dim=1)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) probabilities, what the black box hands to the defenses."""
        return torch.softmax(self.routed_logits(x).float(), dim=1)

    @torch.no_grad()
    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Owner-side analysis: every member's probabilities, (N, B, K) (for coherence)."""
        self._check(x)
        return torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members])

    def info(self) -> dict[str, Any]:
        """The public description: nothing about the hash network or its task."""
        return {"defense": "edm", "members": self.n_members, "arch": self.arch,
                "input_shape": list(self.input_shape), "num_classes": self.num_classes}

    def __repr__(self) -> str:
        return (f"EDMPredictor(members={self.n_members} x {self.arch}, input_shape="
                f"{self.input_shape}, num_classes={self.num_classes}, hash=<secret>)")
