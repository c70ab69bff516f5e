"""Running an unmodified nn.Module with task-batched fast weights: the "batched" and "loop" execution paths.

Fast weights carry a task dimension: a parameter of shape ``[*shape]`` becomes ``[T, *shape]`` after the
first inner step (before it, the shared meta-parameter is used for every task).

- ``"loop"``: one ``torch.func.functional_call`` per task with that task's slice of the fast weights.
  Works for any module (including ones that take lists of strings). Faster for convolutions on CPU,
  where one large per-task convolution beats a grouped one.
- ``"batched"``: one pass for the whole meta-batch. Activations are task-major ``[T*B, ...]``; a
  ``TorchFunctionMode`` rewrites the calls that consume task-batched weights: ``conv1d``/``conv2d`` become
  a grouped convolution with ``groups = T * groups``, ``linear`` becomes a per-task ``baddbmm``, and
  ``batch_norm`` / ``layer_norm`` use per-task statistics written as explicit mean/var ops (not
  ``F.batch_norm`` under ``vmap``, whose second-order meta-gradient is wrong). Per-sample ops (ReLU,
  pooling, reshapes, residual additions) run unchanged on the big batch. Only modules whose parameters
  all live in ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.BatchNorm1d/2d`` or ``nn.LayerNorm``
  (exact types) are accepted, and any other op that touches a task-batched weight raises.

In both paths BatchNorm follows the head's policy (see ``metaformer.heads.batchnorm``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from metaformer.ops.bn_relu_pool import batch_norm_relu_pool
from metaformer.ops.conv_bn_relu_pool import (
    conv3x3_bn_relu_pool,
    conv3x3_patches,
    conv_stem_bn_relu_pool,
    fused_stem_available,
)

from .batchnorm import PerStepBatchNorm, task_batch_norm

PATHS = ("auto", "batched", "loop")
Inputs = Union[Tensor, list]

BATCHED_MODULE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def unsupported_batched_modules(module: nn.Module, names: Sequence[str]) -> list[str]:
    """Names of the modules owning one of the parameters ``names`` that the batched path cannot run."""
    wanted = set(names)
    bad = []
    for mod_name, mod in module.named_modules():
        own = [f"{mod_name}.{p}" if mod_name else p for p, _ in mod.named_parameters(recurse=False)]
        if any(n in wanted for n in own) and type(mod) not in BATCHED_MODULE_TYPES:
            bad.append(f"{mod_name or '<root>'} ({type(mod).__name__})")
    return bad


def has_convolutions(module: nn.Module) -> bool:
    """Whether the module contains a convolution (the loop path is faster for those on CPU)."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def choose_path(path: str, module: nn.Module, names: Sequence[str], device: torch.device, inputs_are_tensors: bool) -> str:
    """Resolve "auto" to "loop" (convolutions on CPU, unsupported modules, text inputs) or "batched"."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    bad = unsupported_batched_modules(module, names)
    if path == "batched":
        if bad:
            raise ValueError(
                f"path='batched' cannot run parameters of {', '.join(bad)}: the batched path supports "
                f"{', '.join(t.__name__ for t in BATCHED_MODULE_TYPES)}; use path='loop' (or 'auto')"
            )
        if not inputs_are_tensors:
            raise ValueError("path='batched' needs tensor inputs; for lists (e.g. text) use path='loop' (or 'auto')")
        return "batched"
    if path == "loop":
        return "loop"
    if bad or not inputs_are_tensors:
        return "loop"
    if device.type == "cpu" and has_convolutions(module):
        return "loop"
    return "batched"


class BatchNormContext:
    """What a BatchNorm call needs to know besides its arguments: policy, inner step, tasks and padding."""

    def __init__(
        self,
        per_step: Optional[PerStepBatchNorm],
        step: int,
        num_tasks: Optional[int],
        sample_mask: Optional[Tensor],
        training: bool,
        query: bool = False,
    ) -> None:
        """Collect the BatchNorm settings for one forward pass (``query``: the query forward of adapted weights)."""
        self.per_step = per_step
        self.step = step
        self.query = query
        self.num_tasks = num_tasks
        self.sample_mask = sample_mask
        self.training = training
        self.calls = 0

    def __call__(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
        """Normalise one BatchNorm call according to the policy."""
        layer = self.calls
        self.calls += 1
        if self.per_step is not None:
            return self.per_step(layer, self.step, x, self.num_tasks, self.sample_mask, self.training, self.query)
        if self.num_tasks is None:
            # transductive, one task: batch statistics, running buffers never read nor written
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        return task_batch_norm(x, self.num_tasks, weight, bias, eps, self.sample_mask)[0]


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    """Positional-or-keyword argument ``name`` of an intercepted call."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# Calls that only read metadata of a tensor; harmless on a task-batched weight.
_METADATA = frozenset({"dim", "size", "numel", "__get__", "is_floating_point", "requires_grad_", "__len__", "ndimension"})


class _FastWeightMode(TorchFunctionMode):
    """Intercepts the ops that consume weights, to add per-task BatchNorm statistics and task-batched weights."""

    def __init__(self, bn: BatchNormContext, batched_ids: frozenset[int], memory_format: Optional[torch.memory_format] = None,
                 fuse_stem: bool = False, stem_patches: bool = False) -> None:
        """``batched_ids``: ids of the task-batched weight tensors of this forward pass; ``fuse_stem``: the pass is
        differentiated once at most, so a Conv-4 stem may run as the once-differentiable fused op;
        ``stem_patches``: the pass is differentiated twice, so a Conv-4 stem's conv runs as ``conv3x3_patches``."""
        super().__init__()
        self.memory_format = memory_format or torch.contiguous_format
        self.bn = bn
        self.num_tasks = bn.num_tasks
        self.batched_ids = batched_ids
        self.fuse_stem = fuse_stem
        self.stem_patches = stem_patches

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is conv_stem_bn_relu_pool:
            x, conv_w, conv_b, running_mean, running_var, bn_w, bn_b, training, momentum, eps = args
            if (
                self.fuse_stem
                and self.bn.per_step is None
                and self.num_tasks is None
                and fused_stem_available(x, conv_w, conv_b, bn_w, bn_b)
            ):
                # transductive BatchNorm of one task, as below for batch_norm_relu_pool, with the conv folded in
                self.bn.calls += 1
                return conv3x3_bn_relu_pool(x, conv_w, conv_b, bn_w, bn_b, eps)
            if self.stem_patches and self.num_tasks is None and not x.requires_grad and x.dim() == 4:
                y = conv3x3_patches(x, conv_w, conv_b)
            else:
                y = self.__torch_function__(F.conv2d, types, (x, conv_w, conv_b), {"padding": 1})
            tail = (y, running_mean, running_var, bn_w, bn_b, training, momentum, eps)
            return self.__torch_function__(batch_norm_relu_pool, types, tail, {})
        if func is F.batch_norm:
            x = args[0]
            weight = _arg(args, kwargs, 3, "weight", None)
            bias = _arg(args, kwargs, 4, "bias", None)
            eps = _arg(args, kwargs, 7, "eps", 1e-5)
            return self.bn(x, weight, bias, eps)
        if func is batch_norm_relu_pool:
            x = args[0]
            weight = _arg(args, kwargs, 3, "weight", None)
            bias = _arg(args, kwargs, 4, "bias", None)
            eps = _arg(args, kwargs, 7, "eps", 1e-5)
            if self.bn.per_step is None and self.num_tasks is None:
                # transductive BatchNorm of one task: the fused op with batch statistics, no running buffers
                self.bn.calls += 1
                return func(x, None, None, weight, bias, True, 0.0, eps)
            return F.max_pool2d(F.relu(self.bn(x, weight, bias, eps)), 2)
        if self.num_tasks is not None:
            if func is F.conv2d or func is F.conv1d:
                return self._conv(func, args, kwargs)
            if func is F.linear:
                return self._linear(args, kwargs)
            if func is F.layer_norm:
                return self._layer_norm(args, kwargs)
            if self.batched_ids and getattr(func, "__name__", "") not in _METADATA:
                self._reject_batched(func, args, kwargs)
        return func(*args, **kwargs)

    def _reject_batched(self, func: Callable, args: tuple, kwargs: dict) -> None:
        """Raise when an op the batched path does not rewrite receives a task-batched weight."""
        for a in list(args) + list(kwargs.values()):
            items = a if isinstance(a, (list, tuple)) else (a,)
            for t in items:
                if isinstance(t, Tensor) and id(t) in self.batched_ids:
                    raise NotImplementedError(
                        f"the batched path cannot apply {getattr(func, '__name__', func)} to a task-batched weight "
                        "(only conv1d/conv2d/linear/batch_norm/layer_norm are rewritten); use path='loop'"
                    )

    def _conv(self, func: Callable, args: tuple, kwargs: dict) -> Tensor:
        x, weight = args[0], _arg(args, kwargs, 1, "weight", None)
        bias = _arg(args, kwargs, 2, "bias", None)
        stride = _arg(args, kwargs, 3, "stride", 1)
        padding = _arg(args, kwargs, 4, "padding", 0)
        dilation = _arg(args, kwargs, 5, "dilation", 1)
        groups = _arg(args, kwargs, 6, "groups", 1)
        spatial = 2 if func is F.conv2d else 1
        t = self.num_tasks
        if weight.dim() == spatial + 2:
            if bias is None or bias.dim() == 1:  # shared weight and bias: one ordinary convolution over all tasks
                return func(x, weight, bias, stride, padding, dilation, groups)
            weight = weight.expand(t, *weight.shape)  # a frozen weight with an adapted (task-batched) bias
        fmt = self.memory_format if spatial == 2 else torch.contiguous_format
        xb = x.view(t, -1, *x.shape[1:])  # [T, B, C, *sp]
        b = xb.shape[1]
        xg = xb.transpose(0, 1).reshape(b, t * x.shape[1], *x.shape[2:]).contiguous(memory_format=fmt)
        w = weight.reshape(t * weight.shape[1], *weight.shape[2:])
        if bias is not None:
            bias = (bias if bias.dim() == 2 else bias.expand(t, -1)).reshape(-1)
        y = func(xg, w, bias, stride, padding, dilation, groups * t)  # [B, T*Cout, *sp']
        y = y.view(b, t, -1, *y.shape[2:]).transpose(0, 1).reshape(t * b, -1, *y.shape[2:])
        return y.contiguous(memory_format=fmt)

    def _linear(self, args: tuple, kwargs: dict) -> Tensor:
        x, weight = args[0], _arg(args, kwargs, 1, "weight", None)
        bias = _arg(args, kwargs, 2, "bias", None)
        if weight.dim() == 2:
            if bias is not None and bias.dim() == 2:
                return self._linear((x, weight.expand(self.num_tasks, -1, -1), bias), {})
            return F.linear(x, weight, bias)
        t = self.num_tasks
        xb = x.reshape(t, -1, x.shape[-1])
        if bias is None:
            y = torch.bmm(xb, weight.transpose(1, 2))
        else:
            bb = bias.unsqueeze(1) if bias.dim() == 2 else bias.expand(t, 1, -1)
            y = torch.baddbmm(bb, xb, weight.transpose(1, 2))
        return y.reshape(*x.shape[:-1], weight.shape[1])

    def _layer_norm(self, args: tuple, kwargs: dict) -> Tensor:
        x, shape = args[0], tuple(_arg(args, kwargs, 1, "normalized_shape", None))
        weight = _arg(args, kwargs, 2, "weight", None)
        bias = _arg(args, kwargs, 3, "bias", None)
        eps = _arg(args, kwargs, 4, "eps", 1e-5)
        nd = len(shape)
        if (weight is None or weight.dim() == nd) and (bias is None or bias.dim() == nd):
            return F.layer_norm(x, shape, weight, bias, eps)
        t = self.num_tasks
        y = F.layer_norm(x, shape, None, None, eps).reshape(t, -1, *shape)
        if weight is not None:
            y = y * (weight.unsqueeze(1) if weight.dim() == nd + 1 else weight)
        if bias is not None:
            y = y + (bias.unsqueeze(1) if bias.dim() == nd + 1 else bias)
        return y.reshape(x.shape)


def _flatten_tasks(x: Tensor) -> Tensor:
    """[T, B, *item] -> [T*B, *item] (task-major)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def functional_forward(
    module: nn.Module,
    names: Sequence[str],
    fast: Sequence[Tensor],
    shapes: Sequence[torch.Size],
    x: Inputs,
    *,
    path: str,
    sample_mask: Optional[Tensor] = None,
    step: int = 0,
    per_step_bn: Optional[PerStepBatchNorm] = None,
    training: bool = True,
    memory_format: Optional[torch.memory_format] = None,
    once_differentiable: bool = False,
    twice_differentiable: bool = False,
    query: bool = False,
) -> Tensor:
    """Run ``module`` on every task of ``x`` ([T, B, *item] or T lists) with its own fast weights -> [T, B, *out].

    ``fast[i]`` is ``[T, *shapes[i]]`` (task-batched) or ``shapes[i]`` (shared by all tasks); parameters of
    ``module`` not named in ``names`` are used as they are. ``once_differentiable``: the caller never
    differentiates this pass twice, so the loop path may run a Conv-4 stem as the fused stem op;
    ``twice_differentiable``: the caller differentiates it twice (second-order support passes), so the loop path
    runs a Conv-4 stem's conv as patches @ weight (``conv3x3_patches``), whose double backward is cheaper;
    ``query``: the query forward of adapted weights (its own row of the per-step BatchNorm table).
    """
    if once_differentiable and twice_differentiable:
        raise ValueError("functional_forward: a pass cannot be both once_differentiable and twice_differentiable")
    # one running-statistics update per pass, the mean over its tasks, on both paths (not one per task on the loop)
    scope = per_step_bn.deferred_updates() if per_step_bn is not None and training else contextlib.nullcontext()
    with scope:
        return _functional_forward(module, names, fast, shapes, x, path, sample_mask, step, per_step_bn, training,
                                   memory_format, once_differentiable, twice_differentiable, query)


def _functional_forward(module: nn.Module, names: Sequence[str], fast: Sequence[Tensor], shapes: Sequence[torch.Size],
                        x: Inputs, path: str, sample_mask: Optional[Tensor], step: int,
                        per_step_bn: Optional[PerStepBatchNorm], training: bool,
                        memory_format: Optional[torch.memory_format], once_differentiable: bool,
                        twice_differentiable: bool, query: bool) -> Tensor:
    """functional_forward without the running-statistics scope."""
    num_tasks = len(x) if isinstance(x, list) else x.shape[0]
    batched_flags = [f.dim() == len(s) + 1 for f, s in zip(fast, shapes)]
    if path == "batched":
        bn = BatchNormContext(per_step_bn, step, num_tasks, sample_mask, training, query)
        ids = frozenset(id(f) for f, b in zip(fast, batched_flags) if b)
        if sample_mask is not None:
            # padded items run through the network with the real ones: zero them, so that whatever a hand-built
            # batch holds there (NaN, say) cannot reach the weight gradients through 0 * NaN
            x = x.masked_fill(~sample_mask.view(*sample_mask.shape, *([1] * (x.dim() - 2))), 0)  # keeps int inputs
        xf = _flatten_tasks(x)
        if memory_format is not None and xf.dim() == 4:
            xf = xf.contiguous(memory_format=memory_format)
        with _FastWeightMode(bn, ids, memory_format):
            out = torch.func.functional_call(module, dict(zip(names, fast)), (xf,))
        return out.reshape(num_tasks, -1, *out.shape[1:])
    if path != "loop":
        raise ValueError(f"path must be 'batched' or 'loop' here, got {path!r}")
    per_task = [f.unbind(0) if b else None for f, b in zip(fast, batched_flags)]
    outs = []
    if sample_mask is not None and not isinstance(x, list):
        lengths = sample_mask.sum(dim=1).tolist()
        full = sample_mask.all(dim=1).tolist()
    for t in range(num_tasks):
        params = {n: (pt[t] if pt is not None else f) for n, pt, f in zip(names, per_task, fast)}
        if isinstance(x, list):
            xt = x[t]
            if sample_mask is not None and len(xt) == sample_mask.shape[1] and not bool(sample_mask[t].all()):
                xt = [item for item, keep in zip(xt, sample_mask[t].tolist()) if keep]
        else:
            xt = x[t]
            if sample_mask is not None and not full[t]:
                xt = xt[sample_mask[t]] if lengths[t] > 0 else xt[:0]
            if memory_format is not None and xt.dim() == 4:
                xt = xt.contiguous(memory_format=memory_format)
        bn = BatchNormContext(per_step_bn, step, None, None, training, query)
        with _FastWeightMode(bn, frozenset(), fuse_stem=once_differentiable, stem_patches=twice_differentiable):
            outs.append(torch.func.functional_call(module, params, (xt,)))
    return _pad_outputs(outs, sample_mask, x)


def _pad_outputs(outs: list[Tensor], sample_mask: Optional[Tensor], x: Inputs) -> Tensor:
    """Stack per-task outputs into [T, B, *out], scattering them to the real positions of padded tasks."""
    if sample_mask is None or bool(sample_mask.all()):
        return torch.stack(outs)
    t, b = sample_mask.shape
    out = outs[0].new_zeros(t, b, *outs[0].shape[1:])
    rows = torch.cat(outs)
    return out.index_put((sample_mask.nonzero(as_tuple=True)), rows)
