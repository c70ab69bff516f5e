"""Per-task losses and metrics over padded, task-batched predictions (cross-entropy / MSE, accuracy)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

TASK_KINDS = ("classification", "regression")


def mask_unused_classes(logits: Tensor, n_way: Optional[Tensor]) -> Tensor:
    """Set the logits of classes >= n_way[t] to -inf, so tasks with fewer ways ignore the extra outputs."""
    if n_way is None:
        return logits
    classes = torch.arange(logits.shape[-1], device=logits.device)
    unused = classes.view(1, 1, -1) >= n_way.view(-1, 1, 1).to(logits.device)
    return logits.masked_fill(unused, float("-inf"))


def _real(mask: Optional[Tensor], like: Tensor) -> Tensor:
    """The padding mask as a float tensor of shape [T, B] (all ones when absent)."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=like.dtype, device=like.device)
    return mask.to(like.dtype)


def task_losses(out: Tensor, y: Tensor, mask: Optional[Tensor], kind: str) -> Tensor:
    """Mean loss of every task over its real examples -> [T]: cross-entropy of logits [T,B,N] or MSE of [T,B,D]."""
    m = _real(mask, out)
    if kind == "classification":
        target = y.clamp_min(0)  # padded labels are -1; their loss is masked out below
        # logits of padded classes may be -inf; log_softmax handles it, and no real target points there
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="none").view(m.shape)
        ce = ce * m
        return ce.sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if kind == "regression":
        sq = (out - y.to(out.dtype)).pow(2).mean(dim=-1) * m
        return sq.sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")


def task_accuracy(logits: Tensor, y: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Accuracy of every task over its real queries -> [T]."""
    m = _real(mask, logits)
    hit = (logits.argmax(dim=-1) == y).to(m.dtype) * m
    return hit.sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def batch_metrics(out: Tensor, y: Tensor, mask: Optional[Tensor], kind: str, per_task_loss: Tensor) -> dict[str, float]:
    """Logged metrics of a meta-batch: mean loss, and accuracy (classification) or MSE (regression)."""
    with torch.no_grad():
        metrics = {"loss": float(per_task_loss.detach().float().mean())}
        if kind == "classification":
            metrics["accuracy"] = float(task_accuracy(out.detach(), y, mask).float().mean())
        else:
            metrics["mse"] = metrics["loss"]
    return metrics
