"""Randomness that cannot be averaged away: a keyed hash of the input bytes.

A randomised defense that drew fresh noise per query would let an attacker average it out
by asking the same image many times. Instead every random number a defense uses is a
function of (secret key, image bytes): the same image always gets the same answer, a
different image gets independent-looking noise, and without the key the noise cannot be
predicted. The key stays inside the defense object and is never returned.

    u = keyed_uniform(x, key, n)   # (B, n) float64 in [0, 1), row b depends only on x[b], key
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def new_key() -> bytes:
    """A fresh 32-byte secret key."""
    return secrets.token_bytes(32)


def row_seeds(x: torch.Tensor, key: bytes) -> np.ndarray:
    """(B, ...) -> (B,) uint64: keyed BLAKE2b of each row's float32 bytes (and its shape)."""
    rows = x.detach().to("cpu", torch.float32).contiguous().reshape(x.shape[0], -1).numpy()
    shape = repr(tuple(x.shape[1:])).encode()
    seeds = [int.from_bytes(hashlib.blake2b(shape + r.tobytes(), key=key, digest_size=8)
                            .digest(), "little") for r in rows]
    return np.array(seeds, dtype=np.uint64)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_uniform(x: torch.Tensor, key: bytes, n: int) -> torch.Tensor:
    """(B, ...) -> (B, n) float64 uniforms in [0, 1), a deterministic function of (key, x[b])."""
    seeds = row_seeds(x, key)  # (B,)
    counters = np.arange(1, n + 1, dtype=np.uint64) * GOLDEN  # (n,)
    with np.errstate(over="ignore"):
        bits = _splitmix64(seeds[:, None] + counters[None, :])  # (B, n)
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return torch.from_numpy(u).to(x.device)
