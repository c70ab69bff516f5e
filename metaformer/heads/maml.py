"""The MAML family: MAML (second order), first-order MAML, ANIL and Meta-SGD.

- :class:`MAML` (Finn et al. 2017): every parameter of ``backbone -> Linear`` is a fast weight, adapted
  by ``inner_steps`` SGD steps (``inner_lr``) on the support loss; the meta-gradient is second order
  (differentiates through the inner gradients). ``first_order=True`` is FOMAML: the inner gradients are
  treated as constants, so the meta-gradient is the query-loss gradient at the adapted weights.
- :class:`ANIL` (Raghu et al. 2020): only the final linear layer is adapted in the inner loop; the
  backbone is meta-learned in the outer loop and its features are computed once per set.
- :class:`MetaSGD` (Li et al. 2017): a learned learning rate for every coordinate of every fast weight
  (initialised to ``inner_lr``), meta-learned together with the initialisation.

BatchNorm default: ``batch_norm="transductive"`` (original MAML: per-task batch statistics in training
and evaluation); ``batch_norm="per_step"`` gives MAML++ per-step running statistics and BN weights.
Memory: ``first_order=True`` and ``checkpoint=True`` (recompute each inner step in the backward).
All inner steps go through :func:`metaformer.ops.inner_update`. See :mod:`metaformer.heads.gradient`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .gradient import GradientHead


class MAML(GradientHead):
    """Model-agnostic meta-learning; ``first_order=True`` gives FOMAML. Keyword options: see GradientHead."""

    def __init__(self, backbone: nn.Module, n_way: int = 5, **kw: Any) -> None:
        """``MAML(backbone, n_way, inner_steps=1, inner_lr=0.4, first_order=False, batch_norm="transductive", ...)``."""
        super().__init__(backbone, n_way, adapt="all", **kw)


class ANIL(GradientHead):
    """Almost No Inner Loop: MAML whose inner loop adapts only the linear classifier."""

    def __init__(self, backbone: nn.Module, n_way: int = 5, **kw: Any) -> None:
        """Same options as MAML; the fast weights are ``classifier.weight`` and ``classifier.bias``."""
        super().__init__(backbone, n_way, adapt="head", **kw)


class MetaSGD(GradientHead):
    """Meta-SGD: MAML with a meta-learned learning rate per coordinate of every fast weight."""

    def __init__(self, backbone: nn.Module, n_way: int = 5, **kw: Any) -> None:
        """Same options as MAML; ``inner_lr`` initialises the learned per-coordinate rates."""
        adapt = kw.pop("adapt", "all")
        super().__init__(backbone, n_way, adapt=adapt, **kw)
        self.inner_lrs = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, self.inner_lr)) for p in self.fast_parameters()]
        )

    def inner_rates(
        self, step: int, fast: list[Tensor], grads: list[Tensor], losses: Tensor, state: dict
    ) -> tuple[Union[float, list[Tensor]], Optional[Union[float, list[Tensor]]]]:
        """The learned per-coordinate rates (shared by all tasks and steps), no decay."""
        return [lr.to(g.dtype) for lr, g in zip(self.inner_lrs, grads)], None
