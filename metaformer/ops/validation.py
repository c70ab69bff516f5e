"""Input checks shared by the fused inner-loop update and its reference, so both reject the same inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Rate = Union[float, Sequence[Tensor]]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class UpdateSpec:
    """Normalised arguments of inner_update: lists of tensors plus scalar-or-tensor rates."""

    params: list[Tensor]
    grads: list[Tensor]
    lr_tensors: Optional[list[Tensor]]
    lr_scalar: float
    decay_tensors: Optional[list[Tensor]]
    decay_scalar: float
    max_grad_norm: Optional[float]


def _as_tensor_list(name: str, value: object) -> list[Tensor]:
    """Turn a sequence of tensors into a list, or raise a ValueError naming the argument."""
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise ValueError(
            f"inner_update: `{name}` must be a list or tuple of tensors (one per parameter), got {type(value).__name__}; "
            "wrap a single tensor as [tensor]"
        )
    for i, t in enumerate(value):
        if not isinstance(t, Tensor):
            raise ValueError(f"inner_update: {name}[{i}] must be a Tensor, got {type(t).__name__}")
    return list(value)


def _normalize_rate(
    name: str, value: Optional[Rate], grads: list[Tensor], device: torch.device, default: float
) -> tuple[Optional[list[Tensor]], float]:
    """Split a learning rate / decay argument into (tensor list or None, scalar) after checking shapes."""
    if value is None:
        return None, default
    if isinstance(value, bool) or isinstance(value, Tensor):
        raise ValueError(
            f"inner_update: `{name}` must be a float or a list of tensors (one per parameter), got {type(value).__name__}; "
            f"for one shared tensor rate pass [{name}] * len(params)"
        )
    if isinstance(value, Real):
        scalar = float(value)
        if not math.isfinite(scalar):
            raise ValueError(f"inner_update: `{name}` must be finite, got {scalar}")
        return None, scalar
    tensors = _as_tensor_list(name, value)
    if len(tensors) != len(grads):
        raise ValueError(
            f"inner_update: `{name}` has {len(tensors)} tensors but there are {len(grads)} parameters; pass one per parameter"
        )
    for i, (r, g) in enumerate(zip(tensors, grads)):
        if not r.is_floating_point():
            raise ValueError(f"inner_update: {name}[{i}] must be a floating-point tensor, got {r.dtype}")
        if r.device != device:
            raise ValueError(f"inner_update: {name}[{i}] is on {r.device} but the parameters are on {device}; move it there")
        try:
            shape = torch.broadcast_shapes(r.shape, g.shape)
        except RuntimeError:
            shape = None
        if shape != g.shape:
            raise ValueError(
                f"inner_update: {name}[{i}] has shape {tuple(r.shape)}, which does not broadcast to the task-batched "
                f"gradient shape {tuple(g.shape)} (give [*shape], [T, *shape], [T, 1, ...] or a single element)"
            )
    return tensors, 1.0


def normalize_inputs(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: Rate,
    decay: Optional[Rate],
    max_grad_norm: Optional[float],
) -> UpdateSpec:
    """Check every argument of inner_update and return them in one normalised form."""
    plist = _as_tensor_list("params", params)
    glist = _as_tensor_list("grads", grads)
    if len(plist) != len(glist):
        raise ValueError(f"inner_update: {len(plist)} params but {len(glist)} grads; pass one gradient per parameter")
    if max_grad_norm is not None:
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, Real) or not (max_grad_norm > 0) or not math.isfinite(max_grad_norm):
            raise ValueError(f"inner_update: max_grad_norm must be a positive finite float or None, got {max_grad_norm!r}")
        max_grad_norm = float(max_grad_norm)
    if not plist:
        if lr is None:
            raise ValueError("inner_update: `lr` is required")
        return UpdateSpec([], [], None, 0.0, None, 1.0, max_grad_norm)
    device = glist[0].device
    num_tasks = None
    for i, (p, g) in enumerate(zip(plist, glist)):
        if g.dim() == 0:
            raise ValueError(f"inner_update: grads[{i}] is 0-dimensional; gradients must be task-batched [T, *shape]")
        if num_tasks is None:
            num_tasks = g.shape[0]
        elif g.shape[0] != num_tasks:
            raise ValueError(
                f"inner_update: grads[{i}] has {g.shape[0]} tasks in dim 0 but grads[0] has {num_tasks}; "
                "every gradient must carry the same task dimension"
            )
        if p.shape != g.shape and p.shape != g.shape[1:]:
            raise ValueError(
                f"inner_update: params[{i}] has shape {tuple(p.shape)} but grads[{i}] has shape {tuple(g.shape)}; "
                f"a parameter is either task-batched {tuple(g.shape)} or shared {tuple(g.shape[1:])}"
            )
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"inner_update: params[{i}] has dtype {p.dtype}; supported are float32, float64, bfloat16, float16")
        if p.dtype != g.dtype or p.dtype != plist[0].dtype:
            raise ValueError(
                f"inner_update: params[{i}] is {p.dtype} and grads[{i}] is {g.dtype}, but params[0] is {plist[0].dtype}; "
                "one call updates tensors of a single dtype: cast them, or call once per dtype"
            )
        if p.device != device or g.device != device:
            raise ValueError(
                f"inner_update: params[{i}] is on {p.device} and grads[{i}] on {g.device}, but grads[0] is on {device}; "
                "put all tensors on one device"
            )
    lr_tensors, lr_scalar = _normalize_rate("lr", lr, glist, device, 0.0)
    if lr is None:
        raise ValueError("inner_update: `lr` is required (a float or one tensor per parameter)")
    decay_tensors, decay_scalar = _normalize_rate("decay", decay, glist, device, 1.0)
    return UpdateSpec(plist, glist, lr_tensors, lr_scalar, decay_tensors, decay_scalar, max_grad_norm)
