"""Shared embedding helper of the metric heads (ProtoNet, MatchingNet): backbone over real items only."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import Inputs


def embed_sets(backbone: nn.Module, x: Inputs, mask: Optional[Tensor]) -> Tensor:
    """Embed task-batched items [T, B, *item] (or T lists) -> [T, B, D]; padded items are skipped (zeros).

    Padded items never enter the backbone, so they cannot change BatchNorm statistics.
    """
    if isinstance(x, list):
        t = len(x)
        b = max((len(v) for v in x), default=0)
        keep = mask if mask is not None else torch.tensor([[j < len(v) for j in range(b)] for v in x])
        flat = [item for v, m in zip(x, keep.tolist()) for item, k in zip(v, m) if k]
        emb = backbone(flat)
        out = emb.new_zeros(t, b, emb.shape[-1])
        return out.index_put(keep.to(emb.device).nonzero(as_tuple=True), emb)
    t, b = x.shape[:2]
    if mask is None or bool(mask.all()):
        return backbone(x.reshape(t * b, *x.shape[2:])).reshape(t, b, -1)
    emb = backbone(x[mask])
    out = emb.new_zeros(t, b, emb.shape[-1])
    return out.index_put(mask.nonzero(as_tuple=True), emb)
