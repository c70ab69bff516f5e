"""Counter-based randomness: every random draw is a pure function of integer keys.

Episode i of a sampler is built from ``episode_generator(seed, i)`` alone, so it does not depend on
which process, worker or machine computes it, nor on what was drawn before.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    """One splitmix64 finaliser step on a Python int (mod 2**64)."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """Hash integer keys (seed, index, stream, ...) into a 63-bit seed."""
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


def episode_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU torch.Generator seeded purely from (seed, index, stream)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, index, stream))
    return g


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 on uint64 arrays (wrapping arithmetic)."""
    # Wrap-around is the point of the hash; numpy only warns about it for 0-d inputs.
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_uniform(keys: np.ndarray, n: int) -> np.ndarray:
    """Uniform floats in [0, 1): shape [*keys.shape[:-1], n], a pure function of each key row.

    ``keys`` is an integer array whose last axis holds the key tuple (e.g. seed, split, class, item).
    """
    keys = np.asarray(keys).astype(np.uint64)
    h = np.full(keys.shape[:-1], 0x243F6A8885A308D3, dtype=np.uint64)
    for j in range(keys.shape[-1]):
        h = _splitmix64_np(h ^ keys[..., j])
    with np.errstate(over="ignore"):
        counters = np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(1)
    out = _splitmix64_np(h[..., None] ^ counters)
    # 53 high bits -> exactly representable double in [0, 1).
    return (out >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
