"""Per-task losses and metrics over padded, task-batched predictions (cross-entropy / MSE, accuracy)."""

from __future__ import annotations

from typing import Optional, Union

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


def no_examples_error(empty: Tensor, what: str) -> ValueError:
    """The error for the first task of ``empty`` [T] bool whose ``what`` positions are all padding."""
    return ValueError(f"task {int(empty.nonzero()[0])} has no {what} examples (all positions padded); every task "
                      "needs at least one")


def check_has_examples(mask: Optional[Tensor], what: str) -> None:
    """Raise a ValueError when a task of the padding mask [T, B] has no real example."""
    if mask is not None and mask.shape[0] > 0:
        empty = mask.sum(dim=1) == 0
        if bool(empty.any()):
            raise no_examples_error(empty, f"real {what}")


def check_targets(out: Tensor, y: Tensor, mask: Optional[Tensor], kind: str, n_way: Optional[Union[int, Tensor]] = None,
                  what: str = "query") -> None:
    """Raise a ValueError naming the problem when targets do not fit the predictions ``out`` [T, B, N or D]: a
    regression target of another shape (it would broadcast), or a real label outside its task's ``n_way`` classes
    (all N when ``n_way`` is None). Labels are checked, not logits: an overflowing logit is the trainer's to skip."""
    if kind == "regression":
        if tuple(y.shape) != tuple(out.shape):
            raise ValueError(f"{what}_y has shape {tuple(y.shape)} but the predictions are {tuple(out.shape)} [T, B, d_out]; "
                             "regression targets need the same shape (a [T, B] target needs .unsqueeze(-1))")
        return
    if tuple(y.shape) != tuple(out.shape[:2]) or y.dtype != torch.int64:
        raise ValueError(f"{what}_y must be int64 labels [T, B] = {tuple(out.shape[:2])}, got {y.dtype} {tuple(y.shape)}")
    limit = out.shape[-1] if n_way is None else n_way
    limit = torch.as_tensor(limit, device=y.device).reshape(-1, 1)
    bad = (y < 0) | (y >= limit)
    if mask is not None:
        bad &= mask.to(y.device)
    if bool(bad.any()):
        task, pos = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{what} label {int(y[task, pos])} of task {task} (position {pos}) is not one of the task's "
                         f"classes: labels must be 0..n_way-1 of their task; mark padding with {what}_mask False")


def task_losses(out: Tensor, y: Tensor, mask: Optional[Tensor], kind: str) -> Tensor:
    """Mean loss of every task over its real examples -> [T]: cross-entropy of logits [T,B,N] or MSE of [T,B,D]."""
    m = _real(mask, out)
    if kind == "classification":
        target = y.clamp_min(0)  # padded labels are -1; their loss is masked out below
        # logits of padded classes may be -inf; log_softmax handles it, and no real target points there
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="none").view(m.shape)
        ce = torch.where(m > 0, ce, 0.0)  # not ce * m: a non-finite value at a padded position must not leak
        return ce.sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if kind == "regression":
        sq = torch.where(m > 0, (out - y.to(out.dtype)).pow(2).mean(dim=-1), 0.0)
        return sq.sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")


def task_accuracy(logits: Tensor, y: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Accuracy of every task over its real queries -> [T]."""
    m = _real(mask, logits).float()  # float32 counts: in bfloat16, 599 hits of 600 would round to 1.0
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
