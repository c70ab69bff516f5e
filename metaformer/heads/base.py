"""The interface every few-shot head implements: adapt(support) -> predictor, and loss(episode batch).

A head turns a labelled support set into a predictor for the task's queries:

- ``head.adapt_batch(support_x, support_y, support_mask, n_way)`` adapts to T tasks at once
  (``support_x`` ``[T, S, *item]``) and returns a :class:`BatchPredictor` mapping ``query_x``
  ``[T, Q, *item]`` to logits ``[T, Q, n_out]`` (classification; classes >= ``n_way[t]`` are ``-inf``)
  or predictions ``[T, Q, d_out]`` (regression).
- ``head.adapt(support_x, support_y, n_way)`` does the same for one task (``[S, *item]`` -> a callable
  ``query_x [Q, *item] -> [Q, n_out]``).
- ``head.loss(batch)`` (also ``head(batch)``, so DDP sees a forward) returns the meta-training loss of an
  ``EpisodeBatch`` (mean over tasks of the per-task query loss) and a dict of float metrics.
- ``head.meta_backward(batch)`` runs ``loss(...).backward()`` in chunks of tasks, which keeps peak memory at
  one chunk's graph; heads whose loss decomposes over tasks use chunks of one task on the loop path.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from .losses import TASK_KINDS, batch_metrics, check_has_examples, check_targets, no_examples_error, task_losses

Inputs = Union[Tensor, list]


class BatchPredictor(ABC):
    """Predictions for the queries of T adapted tasks; holds fast weights, prototypes or embeddings."""

    @abstractmethod
    def __call__(self, query_x: Inputs, query_mask: Optional[Tensor] = None) -> Tensor:
        """query_x [T, Q, *item] (or T lists) -> logits [T, Q, n_out] or regression outputs [T, Q, d_out]."""


class TaskPredictor:
    """One adapted task: query_x [Q, *item] -> [Q, n_out]."""

    def __init__(self, batch_predictor: BatchPredictor) -> None:
        """Wrap a one-task BatchPredictor."""
        self.batch_predictor = batch_predictor

    def __call__(self, query_x: Inputs) -> Tensor:
        """Logits (or regression outputs) for the queries of the task."""
        q = [query_x] if isinstance(query_x, list) else query_x.unsqueeze(0)
        return self.batch_predictor(q)[0]


def num_tasks_of(x: Inputs) -> int:
    """T of a task-batched input (tensor [T, B, ...] or a list of T lists)."""
    return len(x) if isinstance(x, list) else int(x.shape[0])


def set_size_of(x: Inputs) -> int:
    """B of a task-batched input."""
    return max((len(v) for v in x), default=0) if isinstance(x, list) else int(x.shape[1])


class FewShotHead(nn.Module, ABC):
    """Base class of all heads: one interface for gradient-based, metric and learned-optimizer heads."""

    # True when a parameter has one row per way (a classifier layer sized n_out): trained weights then limit the
    # ways. Heads without such a parameter (metric heads, the transfer baselines, which fit a new classifier per
    # task) set it False: the same weights load into the head built with any n_way.
    fixed_ways: ClassVar[bool] = True

    def __init__(self, kind: str, n_out: int) -> None:
        """``kind`` is "classification" or "regression"; ``n_out`` the number of ways (max) or regression outputs."""
        super().__init__()
        if kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
        if not isinstance(n_out, int) or n_out < 1:
            raise ValueError(f"n_out (ways or regression outputs) must be a positive int, got {n_out!r}")
        self.kind = kind
        self.n_out = n_out

    # ------------------------------------------------------------------ interface
    @abstractmethod
    def adapt_batch(
        self,
        support_x: Inputs,
        support_y: Tensor,
        support_mask: Optional[Tensor] = None,
        n_way: Optional[Union[int, Tensor]] = None,
    ) -> BatchPredictor:
        """Adapt to T tasks at once and return their predictor."""

    def adapt(self, support_x: Inputs, support_y: Tensor, n_way: Optional[int] = None) -> TaskPredictor:
        """Adapt to one task (support_x [S, *item], support_y [S] or [S, d_out]) -> predictor of its queries."""
        x = [support_x] if isinstance(support_x, list) else support_x.unsqueeze(0)
        if not isinstance(support_y, Tensor):
            raise ValueError(f"support_y must be a Tensor, got {type(support_y).__name__}")
        return TaskPredictor(self.adapt_batch(x, support_y.unsqueeze(0), None, n_way))

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Meta-training loss of an EpisodeBatch (mean over tasks of the query loss) and float metrics."""
        check_has_examples(batch.query_mask, "query")
        with self.statistics_scope():
            predictor = self.adapt_batch(batch.support_x, batch.support_y, batch.support_mask, batch.n_way)
            out = predictor(batch.query_x, batch.query_mask)
        check_targets(out, batch.query_y, batch.query_mask, self.kind, getattr(batch, "n_way", None))
        per_task = task_losses(out, batch.query_y, batch.query_mask, self.kind)
        return per_task.mean(), batch_metrics(out, batch.query_y, batch.query_mask, self.kind, per_task)

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, float]]:  # type: ignore[override]
        """Same as loss(batch); calling the module lets DistributedDataParallel wrap a head."""
        return self.loss(batch)

    def check_gradients_allowed(self) -> None:
        """Heads that take gradient steps on the support set cannot adapt under torch.inference_mode(): say so."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{type(self).__name__} takes gradient steps on the support set at test time, which "
                               "torch.inference_mode() forbids; predict under torch.no_grad() instead")

    def statistics_scope(self) -> contextlib.AbstractContextManager:
        """A scope whose running-statistics updates count once (per-step BatchNorm); nothing for most heads."""
        return contextlib.nullcontext()

    def default_chunk_size(self, batch: Any) -> Optional[int]:
        """Tasks per backward in meta_backward (None: the whole batch at once)."""
        return None

    def meta_backward(self, batch: Any, chunk_size: Optional[int] = None, scale: float = 1.0) -> tuple[Tensor, dict[str, float]]:
        """Accumulate d(scale * loss(batch))/d(params) into .grad, in chunks of tasks; return detached loss, metrics.

        With chunks, only one chunk's graph is alive at a time (peak memory of one chunk). The result equals
        ``(scale * loss(batch)).backward()`` for heads whose loss is a mean of independent per-task losses
        (all gradient-based heads with transductive BatchNorm); metric heads default to one chunk.
        """
        with self.statistics_scope():  # one running-statistics update for the whole batch, whatever its chunks
            return self._meta_backward(batch, chunk_size, scale)

    def _meta_backward(self, batch: Any, chunk_size: Optional[int], scale: float) -> tuple[Tensor, dict[str, float]]:
        """meta_backward inside the statistics scope."""
        total = num_tasks_of(batch.support_x)
        size = chunk_size if chunk_size is not None else self.default_chunk_size(batch)
        if size is None or size >= total or not dataclasses.is_dataclass(batch):
            loss, metrics = self.loss(batch)
            (loss * scale).backward()
            return loss.detach(), metrics
        if size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {size}")
        loss_sum = torch.zeros(())
        metric_sum: dict[str, float] = {}
        for start in range(0, total, size):
            sub = slice_batch(batch, start, min(start + size, total))
            n = num_tasks_of(sub.support_x)
            loss, metrics = self.loss(sub)
            (loss * (scale * n / total)).backward()
            loss_sum = loss_sum + loss.detach().cpu() * n
            for k, v in metrics.items():
                metric_sum[k] = metric_sum.get(k, 0.0) + v * n
        return loss_sum / total, {k: v / total for k, v in metric_sum.items()}

    # ------------------------------------------------------------------ shared checks
    def check_support(
        self, support_x: Inputs, support_y: Tensor, support_mask: Optional[Tensor], n_way: Optional[Union[int, Tensor]]
    ) -> tuple[int, Optional[Tensor], Optional[Tensor]]:
        """Validate a task-batched support set; return (T, mask or None when nothing is padded, n_way [T] or None)."""
        if not isinstance(support_x, (Tensor, list)):
            raise ValueError(f"support_x must be a Tensor [T, S, *item] or a list of T lists, got {type(support_x).__name__}")
        if not isinstance(support_y, Tensor):
            raise ValueError(f"support_y must be a Tensor, got {type(support_y).__name__}")
        t = num_tasks_of(support_x)
        s = set_size_of(support_x)
        if t == 0:
            raise ValueError("the support set has no tasks (T = 0)")
        if support_y.shape[:1] != (t,) or support_y.dim() < 2:
            raise ValueError(f"support_y has shape {tuple(support_y.shape)} but support_x has T={t} tasks; expected [T, S, ...]")
        if isinstance(support_x, Tensor) and support_y.shape[1] != s:
            raise ValueError(f"support_y has {support_y.shape[1]} examples per task but support_x has {s}")
        if self.kind == "classification":
            if support_y.dtype != torch.int64 or support_y.dim() != 2:
                raise ValueError(
                    f"classification needs support_y as int64 labels [T, S], got {support_y.dtype} {tuple(support_y.shape)}; "
                    "for regression build the head with kind='regression'"
                )
        elif support_y.dim() != 3 or support_y.shape[2] != self.n_out or not support_y.is_floating_point():
            raise ValueError(
                f"regression needs float support_y [T, S, {self.n_out}], got {support_y.dtype} {tuple(support_y.shape)}"
            )
        if support_mask is not None:
            if support_mask.shape != support_y.shape[:2] or support_mask.dtype != torch.bool:
                raise ValueError(
                    f"support_mask must be bool [T, S] = {tuple(support_y.shape[:2])}, got {support_mask.dtype} {tuple(support_mask.shape)}"
                )
        elif isinstance(support_x, list) and any(len(v) < s for v in support_x):
            # ragged lists (text): the positions past a task's own length are padding, whatever their labels say
            lengths = torch.tensor([len(v) for v in support_x], device=support_y.device)
            support_mask = torch.arange(s, device=support_y.device)[None, :] < lengths[:, None]
        real = support_mask if support_mask is not None else torch.ones(support_y.shape[:2], dtype=torch.bool,
                                                                         device=support_y.device)
        ways = self._check_ways(n_way, t, support_y, real)
        if support_mask is not None and bool(support_mask.all()):
            support_mask = None
        return t, support_mask, ways

    def _check_ways(self, n_way: Optional[Union[int, Tensor]], t: int, support_y: Tensor, real: Tensor) -> Optional[Tensor]:
        """n_way as a [T] int64 tensor on the labels' device (None for regression or when all tasks use n_out);
        every task needs a real support example, and every real support label must be one of its task's classes."""
        empty = real.sum(dim=1) == 0
        if self.kind == "regression":
            if bool(empty.any()):
                raise no_examples_error(empty, "support")
            return None
        lo = hi = self.n_out
        if n_way is None:
            limit = torch.full((t,), self.n_out, dtype=torch.int64, device=support_y.device)
        else:
            ways = torch.full((t,), int(n_way), dtype=torch.int64) if isinstance(n_way, int) else n_way
            if not isinstance(ways, Tensor) or ways.shape != (t,):
                raise ValueError(f"n_way must be an int or an int64 tensor [T={t}], got {n_way!r}")
            lo, hi = (int(v) for v in torch.stack([ways.min(), ways.max()]).tolist())
            if lo < 1:
                raise ValueError(f"every task needs n_way >= 1, got {lo}; an Episode built without class_names has "
                                 "n_way 0: pass class_names (one name per class)")
            if hi > self.n_out:
                raise ValueError(f"n_way ranges over {lo}..{hi} but the head has {self.n_out} outputs; "
                                 f"build the head with n_way >= {hi}")
            limit = ways.to(support_y.device)
        bad = real & ((support_y < 0) | (support_y >= limit[:, None]))
        no_examples, bad_label = torch.stack([empty.any(), bad.any()]).tolist()  # one host sync for both checks
        if no_examples:
            raise no_examples_error(empty, "support")
        if bad_label:
            task, pos = (int(v) for v in bad.nonzero()[0])
            label, top = int(support_y[task, pos]), int(limit[task])
            fix = (f"build the head with n_way >= {label + 1} or pass n_way" if n_way is None and label >= self.n_out
                   else f"labels of a task must be 0..n_way-1 (here n_way={top}); mark padding with support_mask False")
            raise ValueError(f"support label {label} of task {task} (position {pos}) is out of range: {fix}")
        return None if lo == self.n_out else limit


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Tasks start..stop-1 of an EpisodeBatch-like dataclass (tensors and lists sliced along the task dim)."""
    changes = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, (Tensor, list, tuple)):
            changes[field.name] = value[start:stop]
    return dataclasses.replace(batch, **changes)


def expand_ways(n_way: Optional[Tensor], predictor_call: Callable[[], Tensor]) -> Tensor:
    """Evaluate a predictor and mask the classes beyond each task's n_way (helper shared by predictors)."""
    from .losses import mask_unused_classes

    out = predictor_call()
    return mask_unused_classes(out, n_way)
