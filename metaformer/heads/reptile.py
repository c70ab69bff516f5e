"""Reptile (Nichol et al. 2018): adapt each task by SGD, then move the initialisation towards the mean.

Outer update: ``theta += outer_lr * (mean_t theta_t - theta)``, where ``theta_t`` are the weights after
``inner_steps`` inner steps (each a :func:`metaformer.ops.inner_update`) on task t's support set.
:meth:`Reptile.reptile_step` applies it directly (no optimizer); :meth:`Reptile.meta_backward` instead
accumulates the pseudo-gradient ``theta - mean_t theta_t`` into ``.grad``, so that an SGD optimizer with
``lr = outer_lr`` (or any other optimizer) performs the update inside a standard training loop.
BatchNorm: transductive batch statistics only (default of all gradient heads); no second-order graph.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .base import num_tasks_of
from .gradient import GradientHead
from .losses import batch_metrics, check_has_examples, check_targets, task_losses


class Reptile(GradientHead):
    """First-order meta-learning by moving the initialisation towards the task-adapted weights."""

    def __init__(self, backbone: nn.Module, n_way: int = 5, *, outer_lr: float = 0.1, **kw: Any) -> None:
        """Options as MAML (``first_order`` is always True); ``outer_lr`` is the Reptile step size epsilon."""
        if kw.pop("first_order", True) is not True:  # was dropped silently: Reptile never differentiates the inner loop
            raise ValueError("Reptile is first order by definition; drop first_order (or set it to True)")
        if kw.get("batch_norm", "transductive") != "transductive":
            raise ValueError("Reptile supports batch_norm='transductive' only (the per-step table has no Reptile update)")
        if kw.get("adapt", "all") != "all":
            raise ValueError("Reptile adapts all parameters; use adapt='all'")
        kw.pop("adapt", None)
        super().__init__(backbone, n_way, first_order=True, adapt="all", **kw)
        if not outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got {outer_lr}")
        self.outer_lr = float(outer_lr)
        fast_ids = {id(p) for p in self.fast_parameters()}
        missing = [n for n, p in self.named_parameters() if id(p) not in fast_ids]
        if missing:
            raise ValueError(f"Reptile needs every parameter to be a fast weight; not adapted: {missing}")

    def adapted_weights(self, batch: Any) -> tuple[list[Tensor], dict[str, float], Tensor]:
        """Adapt every task on its support set -> (mean over tasks of adapted weights, query metrics, loss)."""
        check_has_examples(batch.query_mask, "query")
        _, mask, ways = self.check_support(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)
        path = self.resolve_path(batch.support_x)
        fast = self.adapt_fast(batch.support_x, batch.support_y, mask, ways, self.inner_steps, path, track_meta=False)
        with torch.no_grad():
            from .gradient import GradientPredictor

            out = GradientPredictor(self, fast, ways, path)(batch.query_x, batch.query_mask)
            check_targets(out, batch.query_y, batch.query_mask, self.kind, ways)
            per_task = task_losses(out, batch.query_y, batch.query_mask, self.kind)
            metrics = batch_metrics(out, batch.query_y, batch.query_mask, self.kind, per_task)
        return [f.mean(dim=0) for f in fast.tensors], metrics, per_task.mean()

    def reptile_step(self, batch: Any, outer_lr: Optional[float] = None) -> dict[str, float]:
        """Apply ``theta += outer_lr * (mean_t theta_t - theta)`` in place; return the query metrics.

        Raises FloatingPointError, with the parameters left as they were, when an inner loop diverged (adapted
        weights not finite): written in place, one such step would turn every weight into NaN for good.
        """
        eps = self.outer_lr if outer_lr is None else float(outer_lr)
        with self.statistics_scope():
            means, metrics, _ = self.adapted_weights(batch)
        if not all(bool(torch.isfinite(m).all()) for m in means):
            raise FloatingPointError(
                f"Reptile step skipped: the adapted weights are not finite (an inner loop diverged; inner_lr="
                f"{self.inner_lr}, inner_steps={self.inner_steps}); the parameters are unchanged. Lower inner_lr, "
                "set max_grad_norm (inner gradient clipping), or skip this step and go on"
            )
        with torch.no_grad():
            for p, m in zip(self.fast_parameters(), means):
                p.add_(m - p, alpha=eps)
        return metrics

    def meta_backward(self, batch: Any, chunk_size: Optional[int] = None, scale: float = 1.0) -> tuple[Tensor, dict[str, float]]:
        """Accumulate ``scale * (theta - mean_t theta_t)`` into .grad (SGD with lr=outer_lr then is Reptile)."""
        with self.statistics_scope():
            return self._reptile_grad(batch, chunk_size, scale)

    def _reptile_grad(self, batch: Any, chunk_size: Optional[int], scale: float) -> tuple[Tensor, dict[str, float]]:
        """meta_backward inside the statistics scope."""
        total = num_tasks_of(batch.support_x)
        size = total if chunk_size is None else int(chunk_size)
        if size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {size}")
        from .base import slice_batch

        loss_sum = torch.zeros(())
        metric_sum: dict[str, float] = {}
        for start in range(0, total, size):
            sub = batch if size >= total else slice_batch(batch, start, min(start + size, total))
            n = num_tasks_of(sub.support_x)
            means, metrics, loss = self.adapted_weights(sub)
            with torch.no_grad():
                for p, m in zip(self.fast_parameters(), means):
                    g = (p - m) * (scale * n / total)
                    p.grad = g if p.grad is None else p.grad.add_(g)
            loss_sum = loss_sum + loss.detach().cpu() * n
            for k, v in metrics.items():
                metric_sum[k] = metric_sum.get(k, 0.0) + v * n
        return loss_sum / total, {k: v / total for k, v in metric_sum.items()}
