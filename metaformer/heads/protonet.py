"""Prototypical Networks (Snell et al. 2017): logits are negative squared distances to class means.

``logits[t, q, n] = -|| f(query_q) - c_n ||^2`` with ``c_n`` the mean embedding of the support examples of
class n in task t. Classes without support examples (or beyond ``n_way[t]``) get ``-inf``. No inner loop;
BatchNorm in the backbone behaves as in any module (batch statistics in train mode, running in eval).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .base import BatchPredictor, FewShotHead, Inputs
from .losses import mask_unused_classes
from .metric import embed_sets


def class_means(emb: Tensor, y: Tensor, mask: Optional[Tensor], n_out: int) -> tuple[Tensor, Tensor]:
    """Per-task class means of embeddings [T, S, D] with labels [T, S] -> (means [T, N, D], counts [T, N])."""
    onehot = torch.nn.functional.one_hot(y.clamp_min(0), n_out).to(emb.dtype)
    if mask is not None:
        onehot = onehot * mask.unsqueeze(-1).to(emb.dtype)
    counts = onehot.sum(dim=1)
    means = torch.einsum("tsn,tsd->tnd", onehot, emb) / counts.clamp_min(1.0).unsqueeze(-1)
    return means, counts


class ProtoPredictor(BatchPredictor):
    """Prototypes of T tasks; queries are scored by negative squared Euclidean distance."""

    def __init__(self, backbone: nn.Module, prototypes: Tensor, counts: Tensor, n_way: Optional[Tensor]) -> None:
        """Hold the prototypes [T, N, D] and class counts [T, N]."""
        self.backbone = backbone
        self.prototypes = prototypes
        self.counts = counts
        self.n_way = n_way

    def __call__(self, query_x: Inputs, query_mask: Optional[Tensor] = None) -> Tensor:
        """query_x [T, Q, *item] -> logits [T, Q, N] = -squared distances to the prototypes."""
        q = embed_sets(self.backbone, query_x, query_mask)
        d = (q.unsqueeze(2) - self.prototypes.unsqueeze(1)).pow(2).sum(-1)
        logits = (-d).masked_fill((self.counts == 0).unsqueeze(1), float("-inf"))
        return mask_unused_classes(logits, self.n_way)


class ProtoNet(FewShotHead):
    """Prototypical Networks head over any backbone with ``out_dim``."""

    fixed_ways = False  # no parameter has one row per way: any n_way loads the same weights

    def __init__(self, backbone: nn.Module, n_way: int = 5) -> None:
        """``n_way`` is the largest number of ways a task may have."""
        super().__init__("classification", n_way)
        self.backbone = backbone

    def adapt_batch(self, support_x: Inputs, support_y: Tensor, support_mask: Optional[Tensor] = None,
                    n_way: Optional[Union[int, Tensor]] = None) -> BatchPredictor:
        """Embed the support sets and average per class."""
        _, mask, ways = self.check_support(support_x, support_y, support_mask, n_way)
        emb = embed_sets(self.backbone, support_x, mask)
        means, counts = class_means(emb, support_y, mask, self.n_out)
        return ProtoPredictor(self.backbone, means, counts, ways)
