"""BatchNorm inside the inner loop: transductive batch statistics (original MAML) or per-step statistics (MAML++).

Two policies, chosen per head with ``batch_norm=``:

``"transductive"`` (default, Finn et al. 2017)
    Every BatchNorm call normalises with the statistics of the batch it is given: the task's support set
    during an inner step, the task's query set when predicting. This holds in training *and* evaluation
    (``head.eval()`` changes nothing), statistics are always per task, running buffers of the backbone are
    ignored, and the BatchNorm weight and bias are ordinary fast weights adapted by the inner loop.
    Predictions for a query therefore depend on the other queries of the same task.

``"per_step"`` (Antoniou et al. 2019, "How to train your MAML", BNRS + BNWB)
    Each BatchNorm layer gets, for every training inner step ``k = 0..K-1`` and for the query forward (row
    ``K``), its own running mean/variance and its own weight and bias. The weight and bias are meta-learned
    in the outer loop and *not* adapted by the inner loop. In training mode the layer normalises with
    per-task batch statistics and updates the row's running statistics once per forward pass of the meta-batch
    (exponential average with ``momentum`` of the mean over tasks of the per-task statistics), the same on the
    batched and the loop path; ``meta_backward`` makes that once per meta-batch, whatever its chunks. In
    evaluation mode it normalises with the row's running statistics, so a prediction no longer depends on the
    other queries. With more inner steps at test time than in training, the support steps beyond ``K - 1`` use
    row ``K - 1`` (the last trained support row) and the query forward always uses row ``K``.

BatchNorm layers are matched to table rows by the order in which they are *called* during a forward pass,
and the channel count is checked on every call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_MODES = ("transductive", "per_step")


def batchnorm_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm layers of a module in registration order."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def task_batch_norm(
    x: Tensor,
    num_tasks: int,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    sample_mask: Optional[Tensor] = None,
    stats: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm with separate statistics per task, written as explicit mean/var ops.

    ``x`` is task-major ``[T*B, C, *spatial]``; ``weight``/``bias`` are ``[C]`` (shared) or ``[T, C]``
    (task-batched); ``sample_mask`` ``[T, B]`` excludes padded examples from the statistics. Explicit ops
    (not ``F.batch_norm`` under ``vmap``) keep the second-order meta-gradient exact. Given ``stats``
    (mean, var ``[C]``), normalises with them instead (evaluation with running statistics).
    Returns (output, per-task mean ``[T, C]``, per-task biased variance ``[T, C]``).
    """
    channels = x.shape[1]
    xv = x.view(num_tasks, -1, *x.shape[1:])  # [T, B, C, *spatial]
    bshape = (num_tasks, 1, channels) + (1,) * (x.dim() - 2)
    red = (1,) + tuple(range(3, xv.dim()))
    if stats is not None:
        mean = stats[0].expand(num_tasks, channels)
        var = stats[1].expand(num_tasks, channels)
    elif sample_mask is None:
        mean = xv.mean(dim=red)
        var = (xv - mean.view(bshape)).pow(2).mean(dim=red)
    else:
        m = sample_mask.to(x.dtype).view((num_tasks, -1) + (1,) * (x.dim() - 1))
        per_item = 1
        for s in x.shape[2:]:
            per_item *= s
        count = (sample_mask.to(x.dtype).sum(dim=1) * per_item).clamp_min(1.0).unsqueeze(1)  # [T, 1]
        mean = (xv * m).sum(dim=red) / count
        var = ((xv - mean.view(bshape)).pow(2) * m).sum(dim=red) / count
    y = (xv - mean.view(bshape)) * torch.rsqrt(var + eps).view(bshape)
    if weight is not None:
        y = y * (weight.view(bshape) if weight.dim() == 2 else weight.view((1, 1, channels) + (1,) * (x.dim() - 2)))
    if bias is not None:
        y = y + (bias.view(bshape) if bias.dim() == 2 else bias.view((1, 1, channels) + (1,) * (x.dim() - 2)))
    return y.reshape(x.shape), mean, var


def trim_per_step_tables(state: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with per-step BatchNorm tables cut to the rows ``expected`` has: earlier versions sized a table
    ``max(inner_steps, eval_inner_steps) + 1`` rows, but only rows ``0..inner_steps`` were ever trained."""
    out = dict(state)
    for key, want in expected.items():
        have = out.get(key)
        table = "per_step_bn." in key or key.startswith(("weight.", "bias.", "running_mean_", "running_var_"))
        if (table and isinstance(have, Tensor) and have.dim() == 2 and want.dim() == 2
                and have.shape[1] == want.shape[1] and have.shape[0] > want.shape[0]):
            out[key] = have[: want.shape[0]]
    return out


class PerStepBatchNorm(nn.Module):
    """MAML++ per-step BatchNorm tables: running statistics, weight and bias for every BN layer and inner step."""

    def __init__(self, bn_layers: list[nn.modules.batchnorm._BatchNorm], num_steps: int, momentum: float = 0.1) -> None:
        """Build tables with ``num_steps + 1`` rows (the training inner steps plus the query forward), initialised
        from the layers."""
        super().__init__()
        if num_steps < 0:
            raise ValueError(f"PerStepBatchNorm: num_steps must be >= 0, got {num_steps}")
        self.rows = num_steps + 1
        self.momentum = float(momentum)
        self.channels = [m.num_features for m in bn_layers]
        self.eps = [float(m.eps) for m in bn_layers]
        # (layer, row) -> [sum over tasks of the mean, of the unbiased variance, number of tasks] while deferred
        self._pending: Optional[dict[tuple[int, int], list[Any]]] = None
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()
        for i, m in enumerate(bn_layers):
            c = m.num_features
            w = m.weight.detach() if m.weight is not None else torch.ones(c)
            b = m.bias.detach() if m.bias is not None else torch.zeros(c)
            self.weight.append(nn.Parameter(w.clone().unsqueeze(0).repeat(self.rows, 1)))
            self.bias.append(nn.Parameter(b.clone().unsqueeze(0).repeat(self.rows, 1)))
            self.register_buffer(f"running_mean_{i}", torch.zeros(self.rows, c, dtype=w.dtype, device=w.device))
            self.register_buffer(f"running_var_{i}", torch.ones(self.rows, c, dtype=w.dtype, device=w.device))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Accept tables saved with extra rows (see trim_per_step_tables)."""
        own = self.state_dict(prefix=prefix)
        state_dict.update(trim_per_step_tables({k: state_dict[k] for k in own if k in state_dict}, own))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def row(self, step: int, query: bool) -> int:
        """Table row of a BatchNorm call: the query forward uses row K, support step k row min(k, K - 1)."""
        if query:
            return self.rows - 1
        return min(step, max(self.rows - 2, 0))

    @contextlib.contextmanager
    def deferred_updates(self) -> Iterator[None]:
        """Collect the running-statistics updates of the scope and apply them at its end, one EMA step per row
        with the mean over every task seen (nested scopes join the outer one; an exception discards them)."""
        if self._pending is not None:
            yield
            return
        self._pending = {}
        done = False
        try:
            yield
            done = True
        finally:
            pending, self._pending = self._pending, None
            if done:
                for (layer, row), (mean_sum, var_sum, n) in pending.items():
                    self._update(layer, row, mean_sum / n, var_sum / n)

    def _record(self, layer: int, row: int, mean: Tensor, var: Tensor, per_task: int) -> None:
        """Per-task batch statistics (``[T, C]``, biased variance over ``per_task`` values) of one call."""
        with torch.no_grad():
            unbiased = var.detach() * (per_task / max(per_task - 1, 1))
            mean = mean.detach()
            if self._pending is None:
                self._update(layer, row, mean.mean(0), unbiased.mean(0))
                return
            acc = self._pending.get((layer, row))
            if acc is None:
                self._pending[(layer, row)] = [mean.sum(0), unbiased.sum(0), mean.shape[0]]
            else:
                acc[0] = acc[0] + mean.sum(0)
                acc[1] = acc[1] + unbiased.sum(0)
                acc[2] += mean.shape[0]

    def _update(self, layer: int, row: int, mean: Tensor, unbiased_var: Tensor) -> None:
        """One exponential-average step of a row's running statistics."""
        with torch.no_grad():
            rm = getattr(self, f"running_mean_{layer}")[row]
            rv = getattr(self, f"running_var_{layer}")[row]
            rm.mul_(1 - self.momentum).add_(mean.to(rm.dtype), alpha=self.momentum)
            rv.mul_(1 - self.momentum).add_(unbiased_var.to(rv.dtype), alpha=self.momentum)

    def __len__(self) -> int:
        """Number of BatchNorm layers covered."""
        return len(self.channels)

    def forward(  # type: ignore[override]
        self,
        layer: int,
        step: int,
        x: Tensor,
        num_tasks: Optional[int],
        sample_mask: Optional[Tensor],
        training: bool,
        query: bool = False,
    ) -> Tensor:
        """Normalise ``x`` for BN layer ``layer`` at inner step ``step`` or the query forward (``query``);
        ``num_tasks`` None: one task."""
        if layer >= len(self.channels):
            raise RuntimeError(
                f"per-step BatchNorm: the forward called BatchNorm {layer + 1} times but the backbone registers "
                f"{len(self.channels)} BatchNorm layers; a layer used twice is not supported with batch_norm='per_step'"
            )
        if x.shape[1] != self.channels[layer]:
            raise RuntimeError(
                f"per-step BatchNorm: call {layer} has {x.shape[1]} channels but registered layer {layer} has "
                f"{self.channels[layer]}; the backbone calls its BatchNorm layers in another order than it registers them"
            )
        row = self.row(step, query)
        w, b = self.weight[layer][row], self.bias[layer][row]
        rm = getattr(self, f"running_mean_{layer}")[row]
        rv = getattr(self, f"running_var_{layer}")[row]
        eps = self.eps[layer]
        if num_tasks is None:
            if not training:
                return F.batch_norm(x, rm, rv, w, b, False, 0.0, eps)
            y = F.batch_norm(x, None, None, w, b, True, 0.0, eps)
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())), correction=0)  # one pass
                var, mean = var.unsqueeze(0), mean.unsqueeze(0)
            self._record(layer, row, mean, var, x.numel() // x.shape[1])
            return y
        if not training:
            return task_batch_norm(x, num_tasks, w, b, eps, stats=(rm, rv))[0]
        y, mean, var = task_batch_norm(x, num_tasks, w, b, eps, sample_mask=sample_mask)
        self._record(layer, row, mean, var, x.numel() // (x.shape[1] * num_tasks))
        return y
