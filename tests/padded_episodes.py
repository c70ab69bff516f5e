"""Tiny padded few-shot tasks shared by the head tests: a linear embedding of 2x2 images and three tasks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaformer.data import Episode


class Flat(nn.Module):
    """A linear embedding of flattened 2x2 images (out_dim 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.out_dim = 3

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.flatten(1))


def episodes(seed: int = 0) -> list[Episode]:
    """Three tasks with different ways and shots (so the batch is padded); class names unique per task."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, (n, k) in enumerate(((3, 2), (2, 3), (3, 1))):
        out.append(Episode(torch.randn(n * k, 1, 2, 2, generator=g), torch.arange(n).repeat_interleave(k),
                           torch.randn(4, 1, 2, 2, generator=g), torch.randint(0, n, (4,), generator=g),
                           [f"c{t}-{i}" for i in range(n)]))
    return out
