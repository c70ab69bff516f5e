"""Pure-PyTorch reference of the fused inner-loop update: the ground truth the extension is tested against."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .validation import Rate, normalize_inputs

# Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does, so a zero gradient is safe.
CLIP_EPS = 1e-6


def task_rows(x: Tensor, num_tasks: int) -> Tensor:
    """[T, *shape] -> [T, prod(shape)], also for T = 0 (where reshape(0, -1) is ambiguous)."""
    return x.reshape(num_tasks, math.prod(x.shape[1:]))


def clip_coefficients(grads: Sequence[Tensor], max_grad_norm: float) -> Tensor:
    """Per-task factor min(1, max_norm / (||g_t|| + eps)) over all tensors of each task, in float32 or float64."""
    acc = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    num_tasks = grads[0].shape[0]
    sq = torch.zeros(num_tasks, dtype=acc, device=grads[0].device)
    for g in grads:
        sq = sq + task_rows(g.to(acc), num_tasks).pow(2).sum(dim=1)
    return torch.clamp(max_grad_norm / (sq.sqrt() + CLIP_EPS), max=1.0)


def inner_update_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: Rate,
    decay: Optional[Rate] = None,
    *,
    max_grad_norm: Optional[float] = None,
) -> list[Tensor]:
    """new[i][t] = decay * params[i][t] - lr * clip_t * grads[i][t], written with plain differentiable torch ops."""
    spec = normalize_inputs(params, grads, lr, decay, max_grad_norm)
    if not spec.params:
        return []
    clip = None
    if max_grad_norm is not None:
        clip = clip_coefficients(spec.grads, max_grad_norm)
    out = []
    for i, (p, g) in enumerate(zip(spec.params, spec.grads)):
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        step_dims = (g.shape[0],) + (1,) * (g.dim() - 1)
        lr_i: Union[float, Tensor] = spec.lr_scalar if spec.lr_tensors is None else spec.lr_tensors[i].to(acc)
        update = g.to(acc)
        if clip is not None:
            update = update * clip.to(acc).reshape(step_dims)
        update = update * lr_i
        base = p.to(acc)
        if spec.decay_tensors is not None:
            base = base * spec.decay_tensors[i].to(acc)
        elif spec.decay_scalar != 1.0:
            base = base * spec.decay_scalar
        out.append((base - update).to(p.dtype).expand(g.shape).contiguous())
    return out
